//! `thinstack pool doctor`: what a crash or a foreign tool left beside thinstack's records,
//! listed, and with `repair` cleaned.
//!
//! What is found:
//! - device-mapper devices named as this pool's thin devices that no record owns;
//! - thin devices in the pool that no record owns;
//! - layers whose thin device is gone from the pool (only the operator can settle those);
//! - mount records whose mount is gone, and mounts of layers their records do not know;
//! - stale mount points under `<state_dir>/mnt`;
//! - loop devices bound to deleted files.
//!
//! Repair never touches what is in use, nor what is not this daemon's: devices with
//! thinstack's prefix that belong to another pool, and loop devices bound to deleted files
//! outside the state directory, are reported and left alone.

use crate::engine::{Engine, StalePoint};
use crate::error::{ErrorKind, Result};
use crate::kernel::{FsKernel, PoolKernel};

/// What kind of leftover a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// A device-mapper device with thinstack's prefix that no record owns.
    DmDevice,
    /// A thin device in the pool that no record owns.
    ThinDevice,
    /// A layer whose thin device is gone from the pool.
    MissingThinDevice,
    /// A mount record whose mount is gone.
    StaleMountRecord,
    /// A mount of a layer that its record does not know.
    UnrecordedMount,
    /// A directory under the state directory's `mnt` that no layer uses.
    StaleMountPoint,
    /// A loop device bound to a deleted file.
    DeletedLoopFile,
    /// A layer whose settling at start failed: its operations are refused until repaired.
    DegradedLayer,
}

/// Where a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Repair (`--repair`) cleans it.
    Repairable,
    /// Cleaned by this run.
    Repaired,
    /// In use, so left alone: release it and run again.
    InUse,
    /// Not this daemon's: reported, never touched.
    NotOurs,
    /// Only the operator can settle it (the detail says how).
    NeedsOperator,
    /// Repair was tried and failed (the detail says why).
    Failed,
}

/// One leftover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of leftover.
    pub kind: Leftover,
    /// The device, thin id, layer or path concerned.
    pub subject: String,
    /// What was found, and what repair does or did.
    pub detail: String,
    /// Where it stands.
    pub status: Status,
}

/// Everything the doctor found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DoctorReport {
    /// Whether this run repaired what it could.
    pub repair: bool,
    /// The leftovers, in the order they were examined.
    pub findings: Vec<Finding>,
}

impl DoctorReport {
    /// Whether something of this daemon's is still left to clean or settle.
    pub fn needs_attention(&self) -> bool {
        self.findings.iter().any(|f| {
            matches!(
                f.status,
                Status::Repairable | Status::InUse | Status::NeedsOperator | Status::Failed
            )
        })
    }

    fn note(&mut self, kind: Leftover, subject: impl ToString, detail: String, status: Status) {
        self.findings.push(Finding {
            kind,
            subject: subject.to_string(),
            detail,
            status,
        });
    }

    /// Record a repairable finding, repairing it with `fix` when this is a repair run.
    fn repairable(
        &mut self,
        kind: Leftover,
        subject: impl ToString,
        detail: String,
        fix: impl FnOnce() -> Result<()>,
    ) {
        let (status, detail) = if !self.repair {
            (Status::Repairable, detail)
        } else {
            match fix() {
                Ok(()) => (Status::Repaired, detail),
                Err(e) if e.kind() == ErrorKind::Busy => (Status::InUse, format!("{detail}; {e}")),
                Err(e) => (Status::Failed, format!("{detail}; repair failed: {e}")),
            }
        };
        self.note(kind, subject, detail, status);
    }
}

/// What a doctor run may clean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repair {
    /// Clean what is safe to clean.
    pub repair: bool,
    /// Delete thin devices no record owns too (only with `repair`).
    pub delete_unowned: bool,
}

/// Examine the host and the records for leftovers; with `repair`, clean what is safe to.
pub fn examine<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    how: Repair,
) -> Result<DoctorReport> {
    let repair = how.repair;
    let mut report = DoctorReport {
        repair,
        findings: Vec::new(),
    };
    // Mounts first: a mount keeps the devices below it busy.
    stale_mount_records(engine, &mut report)?;
    unrecorded_mounts(engine, &mut report)?;
    stale_mount_points(engine, &mut report)?;
    dm_devices(engine, &mut report)?;
    thin_devices(engine, how.delete_unowned, &mut report)?;
    missing_thin_devices(engine, &mut report);
    degraded_layers(engine, &mut report);
    deleted_loop_files(engine, &mut report)?;
    tracing::info!(
        repair,
        findings = report.findings.len(),
        needs_attention = report.needs_attention(),
        "doctor examined the pool"
    );
    Ok(report)
}

fn stale_mount_records<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    report: &mut DoctorReport,
) -> Result<()> {
    for (layer, target) in engine.stale_mount_records(report.repair)? {
        let detail = format!(
            "layer {:?} is recorded as mounted at {}, but nothing is mounted there; repair drops the record",
            layer.as_str(),
            target.display()
        );
        // The records were already mended by the call above when repairing.
        let status = if report.repair {
            Status::Repaired
        } else {
            Status::Repairable
        };
        report.note(Leftover::StaleMountRecord, target.display(), detail, status);
    }
    Ok(())
}

/// Mounts of this pool's active thin devices, found in the mount table by device number.
fn unrecorded_mounts<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    report: &mut DoctorReport,
) -> Result<()> {
    let thin_devices = engine.kernel().thin_device_numbers()?;
    for mount in engine.fs().mount_table()? {
        let Some(&id) = thin_devices.get(&mount.device) else {
            continue;
        };
        let Some(layer) = engine.layer_of(id) else {
            continue; // an orphan device; reported with the dm devices
        };
        if !engine.unrecorded_mount(&layer, &mount.target, false)? {
            continue;
        }
        let detail = format!(
            "layer {:?} (thin device {id}) is mounted at {} without a record of it (a crash while mounting, or a mount by hand); repair unmounts it",
            layer.as_str(),
            mount.target.display()
        );
        report.repairable(
            Leftover::UnrecordedMount,
            mount.target.display(),
            detail,
            || {
                engine
                    .unrecorded_mount(&layer, &mount.target, true)
                    .map(drop)
            },
        );
    }
    Ok(())
}

fn stale_mount_points<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    report: &mut DoctorReport,
) -> Result<()> {
    for point in engine.stale_mount_points()? {
        let (path, detail) = match &point {
            StalePoint::Directory(path) => (
                path,
                format!(
                    "{} is a mount point of no layer, with nothing mounted; repair removes it if empty",
                    path.display()
                ),
            ),
            StalePoint::GrowthMount(path) => (
                path,
                format!(
                    "{} is still mounted after a crash while growing a filesystem; repair unmounts and removes it",
                    path.display()
                ),
            ),
        };
        report.repairable(Leftover::StaleMountPoint, path.display(), detail, || {
            engine.remove_stale_point(&point)
        });
    }
    Ok(())
}

fn dm_devices<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    report: &mut DoctorReport,
) -> Result<()> {
    let kernel = engine.kernel();
    let pool = kernel.details().name;
    for device in kernel.dm_devices()? {
        let text = device.name.clone();
        let Some(id) = device.thin else {
            let detail = format!(
                "{text} has thinstack's prefix but is not a device of pool {pool}; left alone (the thinstackd of its pool cleans it, or `dmsetup remove {text}`)",
            );
            report.note(Leftover::DmDevice, text, detail, Status::NotOurs);
            continue;
        };
        // A removed layer's device is active while the background discards it.
        if engine.layer_of(id).is_some() || engine.is_queued_for_deletion(id) {
            continue;
        }
        if device.open_count > 0 {
            let detail = format!(
                "{text} is the device of thin device {id}, which no record owns, and is held open {} time(s) (mounted, or used by a process); release it and run again",
                device.open_count
            );
            report.note(Leftover::DmDevice, text, detail, Status::InUse);
            continue;
        }
        let detail = format!(
            "{text} is the device of thin device {id}, which no record owns; repair removes the device"
        );
        report.repairable(Leftover::DmDevice, &text, detail, || {
            kernel.remove_dm_device(&device.name)
        });
    }
    Ok(())
}

/// Thin devices no record owns may be layers whose records were moved aside or lost: kept,
/// and left to the operator (adopt, or delete on their word), never deleted by `--repair`.
fn thin_devices<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    delete: bool,
    report: &mut DoctorReport,
) -> Result<()> {
    for id in engine.orphan_thin_ids()? {
        let mapped = engine
            .kernel()
            .mapped(id)
            .map(|m| m.human())
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let detail = format!(
            "thin device {id} ({mapped} mapped) is in pool {} but no record owns it: a layer whose \
             record was moved aside or lost, or another tool's; put the record back and restart, \
             or `thinstack pool doctor --adopt {id} NAME` to make it a layer again, or \
             `--repair --delete-unowned` to delete it",
            engine.kernel().details().name
        );
        if delete {
            report.repairable(Leftover::ThinDevice, id, detail, || {
                engine.delete_orphan_thin(id)
            });
        } else {
            report.note(Leftover::ThinDevice, id, detail, Status::NeedsOperator);
        }
    }
    Ok(())
}

/// Layers whose settling at start failed; repair tries the step again.
fn degraded_layers<K: PoolKernel, F: FsKernel>(engine: &Engine<K, F>, report: &mut DoctorReport) {
    for (layer, reason) in engine.degraded_layers() {
        let detail = format!(
            "layer {:?} is degraded ({reason}); its operations are refused; repair tries the failed step again",
            layer.as_str()
        );
        report.repairable(Leftover::DegradedLayer, layer.as_str(), detail, || {
            engine.repair_degraded(&layer)
        });
    }
}

fn missing_thin_devices<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    report: &mut DoctorReport,
) {
    for layer in engine.missing_layers() {
        let detail = format!(
            "layer {:?} has a record but its thin device is gone from the pool, so its data is lost; `thinstack remove {}` drops the record",
            layer.as_str(),
            layer.as_str()
        );
        report.note(
            Leftover::MissingThinDevice,
            layer.as_str(),
            detail,
            Status::NeedsOperator,
        );
    }
}

fn deleted_loop_files<K: PoolKernel, F: FsKernel>(
    engine: &Engine<K, F>,
    report: &mut DoctorReport,
) -> Result<()> {
    let state_dir = engine.state_dir();
    for binding in engine.kernel().deleted_loop_files()? {
        let device = binding.device.display().to_string();
        let file = binding.file.display();
        if !binding.file.starts_with(state_dir) {
            let detail = format!(
                "{device} is bound to {file}, which was deleted; it is outside thinstack's state directory {}, so it is left alone (`losetup -d {device}` frees it)",
                state_dir.display()
            );
            report.note(Leftover::DeletedLoopFile, device, detail, Status::NotOurs);
            continue;
        }
        // Probed only now: opening the device claims it for a moment, which another's
        // device must never see.
        if engine.kernel().loop_held(&binding.device)? {
            let detail = format!(
                "{device} is bound to {file}, which was deleted, and is in use (its data lives only in the device now); copy it out before detaching it"
            );
            report.note(Leftover::DeletedLoopFile, device, detail, Status::InUse);
            continue;
        }
        let detail = format!(
            "{device} is bound to {file}, which was deleted, and unused; repair detaches it"
        );
        report.repairable(Leftover::DeletedLoopFile, &device, detail, || {
            engine.kernel().detach_loop(&binding.device)
        });
    }
    Ok(())
}
