//! LVM, driven through its commands (there is no library): state is read with JSON reports,
//! changes are made with one command each. Where udev is not running, commands run with
//! `DM_DISABLE_UDEV=1`, so LVM makes its device nodes itself instead of waiting for udev.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::cmd::{self, Program};
use crate::units::ByteSize;

/// A volume group, from `vgs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeGroup {
    /// Its name.
    pub name: String,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents in all.
    pub extents: u64,
    /// Extents not allocated to any LV.
    pub free_extents: u64,
}

impl VolumeGroup {
    /// Free space in bytes.
    pub fn free(&self) -> ByteSize {
        ByteSize::from_bytes(self.free_extents * self.extent_size)
    }
}

/// A logical volume, from `lvs -a`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalVolume {
    /// Its name; hidden LVs are shown as `[name]` by LVM and kept that way here.
    pub name: String,
    /// Size in bytes (a thin pool's: its data size).
    pub size: u64,
    /// A thin pool's metadata size in bytes (0 for other LVs).
    pub metadata_size: u64,
    /// Whether it is active.
    pub active: bool,
    /// The LV's attribute string (`twi-a-t---` for an active thin pool).
    pub attr: String,
}

impl LogicalVolume {
    /// Whether this is a thin pool (`t` in the first attribute position).
    pub fn is_thin_pool(&self) -> bool {
        self.attr.starts_with('t')
    }

    /// Hidden LVs (a pool's `_tdata`, `_tmeta`, the metadata spare) are bracketed.
    pub fn is_hidden(&self) -> bool {
        self.name.starts_with('[')
    }
}

/// The device-mapper name LVM gives `vg/lv`: `-` doubled in each part, joined by `-`.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// LVM commands limited to `devices` (`--devices`, LVM 2.03.12 and later): a command never
/// scans other disks, nor thinstack's own thin devices (thousands on a busy host, and a scan of
/// a device that is suspended for a snapshot blocks until it resumes).
#[derive(Clone, Default)]
pub struct Lvm {
    devices: Arc<RwLock<Vec<PathBuf>>>,
}

impl Lvm {
    /// LVM on these devices only.
    pub fn on(devices: Vec<PathBuf>) -> Lvm {
        Lvm {
            devices: Arc::new(RwLock::new(devices)),
        }
    }

    /// Include another device from now on (one added to the volume group).
    pub fn add(&self, device: PathBuf) {
        self.devices.write().expect("lvm devices lock").push(device);
    }

    /// The devices commands are limited to.
    pub fn devices(&self) -> Vec<PathBuf> {
        self.devices.read().expect("lvm devices lock").clone()
    }

    /// Run `lvm <command> --devices D... <rest>`.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.run_with_paths(args, &[])
    }

    /// [`Lvm::run`] with paths after the words.
    pub fn run_with_paths(&self, args: &[&str], paths: &[&Path]) -> Result<Output> {
        let (command, rest) = args.split_first().expect("an LVM command");
        let mut all: Vec<OsString> = vec![OsString::from(command)];
        if !dmeventd_running() {
            // Otherwise LVM would start a dmeventd of its own to monitor the pool; where none
            // runs, thinstackd extends the pool itself.
            all.extend(["--config".into(), "activation/monitoring=0".into()]);
        }
        for device in self.devices() {
            all.push("--devices".into());
            all.push(device.into_os_string());
        }
        all.extend(rest.iter().map(OsString::from));
        all.extend(paths.iter().map(|p| p.as_os_str().to_owned()));
        cmd::run_with_env(Program::Lvm, all, &environment())
    }

    /// Rows of one report (`vg`, `lv` or `pv`) from `lvm <command> --reportformat json ...`.
    fn report<T: DeserializeOwned>(
        &self,
        command: &str,
        key: &str,
        args: &[&str],
    ) -> Result<Vec<T>> {
        let mut all = vec![
            command,
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
        ];
        all.extend_from_slice(args);
        let out = self.run(&all)?;
        parse_report(&out.stdout, key)
            .map_err(|e| e.context(format!("reading the report of `lvm {command}`")))
    }

    /// The volume group `name`, or `None` when there is none.
    pub fn volume_group(&self, name: &str) -> Result<Option<VolumeGroup>> {
        let rows: Vec<VgRow> = self.report(
            "vgs",
            "vg",
            &["-o", "vg_name,vg_extent_size,vg_extent_count,vg_free_count"],
        )?;
        rows.into_iter()
            .find(|row| row.vg_name == name)
            .map(|row| {
                Ok(VolumeGroup {
                    extent_size: number(&row.vg_extent_size, "an extent size")?,
                    extents: number(&row.vg_extent_count, "an extent count")?,
                    free_extents: number(&row.vg_free_count, "free extents")?,
                    name: row.vg_name,
                })
            })
            .transpose()
    }

    /// Every LV of `vg`, hidden ones included.
    pub fn logical_volumes(&self, vg: &str) -> Result<Vec<LogicalVolume>> {
        let rows: Vec<LvRow> = self.report(
            "lvs",
            "lv",
            &[
                "-a",
                "-o",
                "lv_name,lv_size,lv_metadata_size,lv_attr,lv_active",
                vg,
            ],
        )?;
        rows.into_iter()
            .map(|row| {
                Ok(LogicalVolume {
                    size: number(&row.lv_size, "an LV size")?,
                    metadata_size: number(&row.lv_metadata_size, "a metadata size")?,
                    active: row.lv_active == "active",
                    attr: row.lv_attr,
                    name: row.lv_name,
                })
            })
            .collect()
    }

    /// The LV `lv` of `vg`.
    pub fn logical_volume(&self, vg: &str, lv: &str) -> Result<Option<LogicalVolume>> {
        Ok(self.logical_volumes(vg)?.into_iter().find(|l| l.name == lv))
    }

    /// The physical volumes of `vg`.
    pub fn physical_volumes(&self, vg: &str) -> Result<Vec<PathBuf>> {
        Ok(self
            .pv_rows()?
            .into_iter()
            .filter(|row| row.vg_name == vg)
            .map(|row| PathBuf::from(row.pv_name))
            .collect())
    }

    fn pv_rows(&self) -> Result<Vec<PvRow>> {
        self.report("pvs", "pv", &["-o", "pv_name,vg_name"])
    }
}

impl fmt::Debug for Lvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lvm")
            .field("devices", &self.devices())
            .finish()
    }
}

impl PartialEq for Lvm {
    fn eq(&self, other: &Lvm) -> bool {
        self.devices() == other.devices()
    }
}

impl Eq for Lvm {}

/// `LVM_SUPPRESS_FD_WARNINGS` keeps the output clean; without udev, LVM must not wait for it.
fn environment() -> Vec<(&'static str, &'static str)> {
    let mut env = vec![("LVM_SUPPRESS_FD_WARNINGS", "1")];
    if !udev_running() {
        env.push(("DM_DISABLE_UDEV", "1"));
    }
    env
}

/// Whether systemd-udevd (or eudev) is running: its control socket exists.
pub fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// Whether dmeventd runs (or systemd starts it on demand through `dm-event.socket`), so LVM's
/// own monitoring can extend the pool.
pub fn dmeventd_running() -> bool {
    let running = std::fs::read_to_string("/run/dmeventd.pid")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    running || systemd_listens_for_dmeventd()
}

/// systemd's `dm-event.socket` holds dmeventd's request FIFO open when it is active.
fn systemd_listens_for_dmeventd() -> bool {
    Path::new("/run/systemd/system").exists()
        && Path::new("/run/dmeventd-server").exists()
        && Path::new("/run/systemd/units/invocation:dm-event.socket").exists()
}

fn parse_report<T: DeserializeOwned>(stdout: &[u8], key: &str) -> Result<Vec<T>> {
    let doc: serde_json::Value = serde_json::from_slice(stdout).map_err(|e| {
        Error::new(
            ErrorKind::Command,
            format!("LVM printed something other than a JSON report: {e}"),
        )
    })?;
    let rows = doc["report"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|part| part.get(key))
        .filter_map(|rows| rows.as_array())
        .flatten()
        .cloned()
        .map(serde_json::from_value)
        .collect::<std::result::Result<Vec<T>, _>>();
    rows.map_err(|e| {
        Error::new(
            ErrorKind::Command,
            format!("LVM's {key} report has an unexpected row: {e}"),
        )
    })
}

#[derive(Deserialize)]
struct VgRow {
    vg_name: String,
    vg_extent_size: String,
    vg_extent_count: String,
    vg_free_count: String,
}

#[derive(Deserialize)]
struct LvRow {
    lv_name: String,
    lv_size: String,
    #[serde(default)]
    lv_metadata_size: String,
    lv_attr: String,
    #[serde(default)]
    lv_active: String,
}

#[derive(Deserialize)]
struct PvRow {
    pv_name: String,
    vg_name: String,
}

fn number(text: &str, what: &str) -> Result<u64> {
    if text.is_empty() {
        return Ok(0);
    }
    text.parse().map_err(|_| {
        Error::new(
            ErrorKind::Command,
            format!("LVM reported {what} as {text:?}, which is not a number"),
        )
    })
}

/// The volume group the physical volume at `path` belongs to, if any.
pub fn volume_group_of(path: &Path) -> Result<Option<String>> {
    Ok(pv_row_of(path)?
        .map(|row| row.vg_name)
        .filter(|vg| !vg.is_empty()))
}

/// Whether `path` is an LVM physical volume (in a VG or not).
pub fn is_physical_volume(path: &Path) -> Result<bool> {
    Ok(pv_row_of(path)?.is_some())
}

fn pv_row_of(path: &Path) -> Result<Option<PvRow>> {
    let wanted = canonical(path);
    Ok(Lvm::on(vec![path.to_path_buf()])
        .pv_rows()?
        .into_iter()
        .find(|row| canonical(Path::new(&row.pv_name)) == wanted))
}

/// `/dev/disk/by-id/...` and `/dev/sdb` name the same PV; compare where links lead.
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_read() {
        let vgs = br#"  {
      "report": [ { "vg": [
          {"vg_name":"tsvg", "vg_extent_size":"4194304", "vg_extent_count":"94", "vg_free_count":"31"}
      ] } ] }"#;
        let rows: Vec<VgRow> = parse_report(vgs, "vg").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(number(&rows[0].vg_free_count, "x").unwrap(), 31);
        let lvs = br#"{"report": [ { "lv": [
          {"lv_name":"[lvol0_pmspare]", "lv_size":"4194304", "lv_metadata_size":"", "lv_attr":"ewi-------", "lv_active":""},
          {"lv_name":"pool", "lv_size":"209715200", "lv_metadata_size":"4194304", "lv_attr":"twi-a-t---", "lv_active":"active"}
        ] } ] }"#;
        let rows: Vec<LvRow> = parse_report(lvs, "lv").unwrap();
        assert_eq!(rows[1].lv_metadata_size, "4194304");
        assert!(parse_report::<VgRow>(b"not json", "vg").is_err());
        assert!(number("12x", "a size").is_err());
    }

    #[test]
    fn dm_names_double_dashes() {
        assert_eq!(dm_name("tsvg", "pool"), "tsvg-pool");
        assert_eq!(dm_name("my-vg", "thin-pool"), "my--vg-thin--pool");
    }
}
