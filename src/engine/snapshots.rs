//! containerd snapshots as layers.
//!
//! A snapshot is a layer whose record carries its [`SnapshotRecord`]: namespace, key and kind.
//! The layer's name is thinstack's own (`ctd-<hex>`), so a key (any string, in practice a
//! path) never becomes a device or file name, and each namespace is its own key space. There
//! is no second store: the records are the truth, and the index maps keys to layers.
//!
//! - Prepare makes an active snapshot (writable); View a view (its device read-only). Both are
//!   thin snapshots of a committed parent, or a new root with a bare filesystem.
//! - Commit makes an active snapshot committed under a new name. When its device can be
//!   deactivated (nobody has it mounted), the layer itself becomes committed: one record
//!   write. When it is still mounted, the committed snapshot is a thin snapshot of it (the
//!   mounted filesystem frozen and flushed meanwhile) and the active layer is removed, its
//!   removal deferred until its user lets go.
//! - A removed key is free at once; a device still in use goes later (deferred removal).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{check_labels, now_ns, usable, CreateLayer, Engine, Index, LayerGuard};
use crate::crash;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::{FsKernel, PoolKernel};
use crate::names::{ContentId, LayerName};
use crate::records::journal::Durability;
use crate::records::{LayerRecord, LayerState, PoolOp, SnapshotKind, SnapshotRecord};
use crate::units::ByteSize;
use crate::vocab::FsType;

/// containerd's limit on one label: key and value together.
const LABEL_PAIR_MAX: usize = 4096;

/// A snapshot as containerd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its key (active, view) or name (committed).
    pub key: String,
    /// The committed snapshot it was made from; empty for a root.
    pub parent: String,
    /// Active, view or committed.
    pub kind: SnapshotKind,
    /// Created, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Last changed, nanoseconds since the Unix epoch.
    pub updated_ns: u64,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
}

/// How a snapshot is mounted: its block device, filesystem and whether read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMount {
    /// The active device.
    pub device: PathBuf,
    /// Its filesystem.
    pub filesystem: FsType,
    /// Views and committed snapshots are read-only.
    pub read_only: bool,
}

/// The size and filesystem of new roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRoot {
    /// Virtual size.
    pub size: ByteSize,
    /// Filesystem.
    pub filesystem: FsType,
}

/// A new active snapshot or view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// The new key.
    pub key: &'a str,
    /// A committed snapshot's name; empty for a new root.
    pub parent: &'a str,
    /// Active (Prepare) or view (View).
    pub kind: SnapshotKind,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
}

/// Last name handed out, so two snapshots made in one nanosecond differ.
static LAST_NAME: AtomicU64 = AtomicU64::new(0);

/// What a client of thinstack's own API (not containerd) means to do to a layer; see
/// [`Engine::refuse_containerds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutsideChange {
    /// Remove it.
    Remove,
    /// Commit it.
    Commit,
    /// Activate it.
    Activate,
    /// Deactivate it.
    Deactivate,
    /// Mount it read-write.
    MountReadWrite,
    /// Resize it.
    Resize,
    /// Trim it (its filesystem mounted read-write for the call, when unmounted).
    Trim,
    /// Make a child of it.
    GiveChildren,
    /// Give it another content (reset), or checkpoint it.
    Reset,
}

impl OutsideChange {
    fn done(self) -> &'static str {
        match self {
            OutsideChange::Remove => "removed",
            OutsideChange::Commit => "committed",
            OutsideChange::Activate => "activated",
            OutsideChange::Deactivate => "deactivated",
            OutsideChange::MountReadWrite => "mounted read-write",
            OutsideChange::Resize => "resized",
            OutsideChange::Trim => "trimmed",
            OutsideChange::GiveChildren => "given children",
            OutsideChange::Reset => "reset or checkpointed",
        }
    }
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// containerd's snapshots change, activate and take children only through containerd,
    /// whose records would otherwise name snapshots that are gone or changed, or miss a user
    /// of a device it removes: `change` of `layer` through thinstack's own API is refused
    /// (`Permission`) when containerd made it. Reading them (inspect, usage, a read-only
    /// mount) stays open.
    pub fn refuse_containerds(&self, layer: &str, change: OutsideChange) -> Result<()> {
        // The record says it; a view would also ask the kernel about the device.
        self.refresh_shared()?;
        match self.record(&LayerName::new(layer)?)?.snapshot {
            None => Ok(()),
            Some(snapshot) => Err(Error::new(
                ErrorKind::Permission,
                format!(
                    "layer {layer:?} is containerd's snapshot {:?} in namespace {:?}; it is {} through containerd (ctr snapshots), not here",
                    snapshot.key,
                    snapshot.namespace,
                    change.done()
                ),
            )),
        }
    }

    /// A layer name no layer has: `ctd-` and the time in hex, later than any handed out.
    fn fresh_snapshot_name(&self) -> LayerName {
        loop {
            let now = now_ns();
            let last = LAST_NAME.load(Ordering::SeqCst);
            let next = now.max(last + 1);
            if LAST_NAME
                .compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            let name = LayerName::new(&format!("ctd-{next:x}")).expect("a valid layer name");
            if !self.contains(&name) {
                return name;
            }
        }
    }

    /// The layer that is snapshot `key` in `namespace`.
    pub(super) fn snapshot_layer(&self, namespace: &str, key: &str) -> Result<LayerName> {
        self.index()
            .snapshot_keys
            .get(&(namespace.to_string(), key.to_string()))
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!(
                    "snapshot {key:?} does not exist in namespace {namespace:?}"
                ))
            })
    }

    /// The ready record of snapshot `key`, its layer locked.
    fn lock_snapshot(&self, namespace: &str, key: &str) -> Result<(LayerRecord, LayerGuard<'_>)> {
        let name = self.snapshot_layer(namespace, key)?;
        let guard = self.locks.lock(&name);
        // Looked up again under the lock: a commit or remove may have moved the key meanwhile.
        if self.snapshot_layer(namespace, key)? != name {
            drop(guard);
            return self.lock_snapshot(namespace, key);
        }
        let record = usable(self.record(&name)?)?;
        Ok((record, guard))
    }

    /// Write a record; a snapshot's record only if its key is free (checked and claimed in
    /// one step, so two callers cannot both take a key).
    pub(super) fn put_claiming(&self, record: LayerRecord, durability: Durability) -> Result<()> {
        let Some(snapshot) = &record.snapshot else {
            return self.write(record, durability);
        };
        let _claims = self
            .snapshot_claims
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(owner) = self
            .index()
            .snapshot_keys
            .get(&(snapshot.namespace.clone(), snapshot.key.clone()))
        {
            if owner != &record.name {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "snapshot {:?} already exists in namespace {:?}",
                        snapshot.key, snapshot.namespace
                    ),
                ));
            }
        }
        self.write(record, durability)
    }

    fn snapshot_info(&self, record: &LayerRecord) -> Option<SnapshotInfo> {
        self.index().snapshot_info(record)
    }

    /// Prepare (active) or View: a thin snapshot of committed `parent`, or a new root with a
    /// bare filesystem; its device is active on return.
    pub fn snapshot_create(
        &self,
        new: NewSnapshot<'_>,
        root: SnapshotRoot,
    ) -> Result<SnapshotMount> {
        if new.key.is_empty() {
            return Err(Error::invalid("a snapshot key must not be empty"));
        }
        check_snapshot_labels(&new.labels)?;
        let parent = match new.parent {
            "" => None,
            parent => {
                let name = self.snapshot_layer(new.namespace, parent).map_err(|_| {
                    Error::not_found(format!(
                        "parent snapshot {parent:?} does not exist in namespace {:?}",
                        new.namespace
                    ))
                })?;
                let record = usable(self.record(&name)?)?;
                if record.snapshot.as_ref().map(|s| s.kind) != Some(SnapshotKind::Committed) {
                    return Err(Error::invalid(format!(
                        "parent {parent:?} is not a committed snapshot; only committed snapshots can be parents"
                    )));
                }
                Some(name)
            }
        };
        let now = now_ns();
        let max_size = max_size_of(&new.labels)?;
        let request = CreateLayer {
            name: self.fresh_snapshot_name().as_str().to_string(),
            parent: parent.as_ref().map(|p| p.as_str().to_string()),
            // A child without the label takes its parent's size (create's default).
            size: max_size.or(parent.is_none().then_some(root.size)),
            filesystem: parent.is_none().then_some(root.filesystem),
            labels: new.labels,
        };
        let snapshot = SnapshotRecord {
            namespace: new.namespace.to_string(),
            key: new.key.to_string(),
            kind: new.kind,
            updated_ns: now,
        };
        let layer = self.create_with(&request, Some(snapshot))?;
        let device = match self.activate(layer.name.as_str()) {
            Ok(device) => device,
            Err(e) => {
                // Not left half made: the key is free for a retry.
                if let Err(undo) = self.remove(layer.name.as_str()) {
                    tracing::error!(layer = %layer.name, error = %undo, "could not take back a snapshot that failed to activate");
                }
                return Err(e);
            }
        };
        tracing::info!(layer = %layer.name, namespace = new.namespace, key = new.key, kind = ?new.kind, "snapshot created");
        Ok(SnapshotMount {
            device,
            filesystem: layer.filesystem,
            read_only: layer.committed,
        })
    }

    /// The mount of an active snapshot or view, its device activated if it was not.
    pub fn snapshot_mounts(&self, namespace: &str, key: &str) -> Result<SnapshotMount> {
        let (record, _guard) = self.lock_snapshot(namespace, key)?;
        if record.snapshot.as_ref().map(|s| s.kind) == Some(SnapshotKind::Committed) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("snapshot {key:?} is committed; mount an active snapshot or a view of it"),
            ));
        }
        let (filesystem, read_only) = (record.filesystem, record.committed);
        let device = self.keep_active(record)?;
        Ok(SnapshotMount {
            device,
            filesystem,
            read_only,
        })
    }

    /// Commit active snapshot `key` as `name`, with `labels`. See the module docs.
    pub fn snapshot_commit(
        &self,
        namespace: &str,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid(
                "a committed snapshot's name must not be empty",
            ));
        }
        check_snapshot_labels(&labels)?;
        let (record, _guard) = self.lock_snapshot(namespace, key)?;
        let snapshot = record.snapshot.clone().expect("a snapshot's record");
        if snapshot.kind != SnapshotKind::Active {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("snapshot {key:?} is not active; only active snapshots can be committed"),
            ));
        }
        if self.snapshot_layer(namespace, name).is_ok() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("snapshot {name:?} already exists in namespace {namespace:?}"),
            ));
        }
        let committed = SnapshotRecord {
            key: name.to_string(),
            kind: SnapshotKind::Committed,
            updated_ns: now_ns(),
            ..snapshot
        };
        // One try, no retries: a device still busy is snapshotted instead.
        let in_place = match self.kernel.active_node(record.thin_id)? {
            None => true,
            Some(_) => match self.kernel.deactivate(record.thin_id) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::Busy => false,
                Err(e) => return Err(e),
            },
        };
        if in_place {
            let mut layer = record;
            layer.committed = true;
            layer.content_id = Some(ContentId::random()?);
            layer.active = false;
            layer.labels = labels;
            layer.created_ns = committed.updated_ns;
            layer.snapshot = Some(committed);
            self.put_claiming(layer.clone(), Durability::Now)?;
            crash::point(crash::Point::SnapshotCommitInPlace);
            tracing::info!(layer = %layer.name, namespace, key, name, "snapshot committed");
            return Ok(());
        }
        self.commit_by_snapshot(record, committed, labels)
    }

    /// Commit the still-mounted `active` (locked by the caller): a thin snapshot of it becomes
    /// the committed one, and `active` is removed, deferred until released.
    fn commit_by_snapshot(
        &self,
        active: LayerRecord,
        committed: SnapshotRecord,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let name = self.fresh_snapshot_name();
        let _new_guard = self.locks.lock(&name);
        let usage = self.ensure_writable("commit by a snapshot")?;
        self.check_space(&usage)?;
        let id = self.allocate_id()?;
        let created_ns = committed.updated_ns;
        let record = LayerRecord {
            parent: active.parent.clone(),
            committed: true,
            labels,
            snapshot: Some(committed),
            content_id: Some(ContentId::random()?),
            ..LayerRecord::creating(
                name.clone(),
                id,
                active.size,
                active.filesystem,
                active.fs_uuid.clone(),
                created_ns,
            )
        };
        let origin = active.thin_id;
        let (size, filesystem) = (active.size, active.filesystem);
        self.create_claimed(record, crash::Point::SnapshotCommitRecordWritten, |_| {
            self.pool_step(Some(&name), PoolOp::Snapshot { origin, id })?;
            // Its filesystem was in use: a view of it mounts read-only.
            self.settle_frozen_snapshot(id, size, filesystem)
        })?;
        crash::point(crash::Point::SnapshotCommitSnapshotted);
        let mut removing = active;
        removing.state = LayerState::Removing;
        removing.active = false;
        self.put(removing.clone())?;
        let removal = self.finish_removal(removing.clone(), false)?;
        tracing::info!(layer = %name, active = %removing.name, removal = ?removal, "snapshot committed from a mounted active snapshot");
        Ok(())
    }

    /// Remove snapshot `key`; refused while snapshots are made from it.
    pub fn snapshot_remove(&self, namespace: &str, key: &str) -> Result<()> {
        let (record, guard) = self.lock_snapshot(namespace, key)?;
        let children: Vec<String> = self
            .live_children(&record.name)
            .iter()
            .filter_map(|child| self.record(child).ok())
            .filter_map(|child| child.snapshot.map(|s| format!("{:?}", s.key)))
            .collect();
        if !children.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "cannot remove snapshot {key:?}: snapshots are made from it ({}); remove them first",
                    children.join(", ")
                ),
            ));
        }
        drop(guard);
        let removal = self.remove(record.name.as_str())?;
        tracing::info!(layer = %record.name, namespace, key, removal = ?removal, "snapshot removed");
        Ok(())
    }

    /// Snapshot `key`.
    pub fn snapshot_stat(&self, namespace: &str, key: &str) -> Result<SnapshotInfo> {
        let (record, _guard) = self.lock_snapshot(namespace, key)?;
        Ok(self.snapshot_info(&record).expect("a snapshot's record"))
    }

    /// Change snapshot `key`'s labels: all of them (`paths` empty, or `labels`), or the ones
    /// `labels.<key>` names (set, or dropped when `labels` lacks it). Nothing else can change.
    pub fn snapshot_update(
        &self,
        namespace: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotInfo> {
        let (record, _guard) = self.lock_snapshot(namespace, key)?;
        let mut updated = record.labels.clone();
        if paths.is_empty() {
            updated = labels.clone();
        }
        for path in paths {
            if path == "labels" {
                updated = labels.clone();
            } else if let Some(label) = path.strip_prefix("labels.") {
                match labels.get(label) {
                    Some(value) => updated.insert(label.to_string(), value.clone()),
                    None => updated.remove(label),
                };
            } else {
                return Err(Error::invalid(format!(
                    "cannot update {path:?} of snapshot {key:?}: only labels (\"labels\", \"labels.<key>\") can change"
                )));
            }
        }
        check_snapshot_labels(&updated)?;
        let mut layer = record;
        layer.labels = updated;
        if let Some(snapshot) = layer.snapshot.as_mut() {
            snapshot.updated_ns = now_ns();
        }
        self.put(layer.clone())?;
        Ok(self.snapshot_info(&layer).expect("a snapshot's record"))
    }

    /// Every snapshot of `namespace` (ready ones: being made or removed is not there yet).
    pub fn snapshot_list(&self, namespace: &str) -> Vec<SnapshotInfo> {
        let index = self.index();
        index
            .layers
            .values()
            .filter(|l| {
                l.state == LayerState::Ready
                    && l.snapshot
                        .as_ref()
                        .is_some_and(|s| s.namespace == namespace)
            })
            .filter_map(|l| index.snapshot_info(l))
            .collect()
    }

    /// Bytes the snapshot holds alone (blocks no other device shares: what removing it gives
    /// back, the size containerd's `Usage` means), and inodes its filesystem uses (read where
    /// it is mounted, or from a private read-only mount).
    pub fn snapshot_usage(&self, namespace: &str, key: &str) -> Result<(ByteSize, u64)> {
        let (record, _guard) = self.lock_snapshot(namespace, key)?;
        let exclusive = super::usage_of(&self.thin_usage()?, &record)?.exclusive;
        self.with_device(&record, |node| {
            let inodes = match self.fs.mounts_of(node)?.first() {
                Some((target, _)) => crate::kernel::fs::inodes_used(target)?,
                None => self.with_private_mount(
                    record.thin_id,
                    node,
                    record.filesystem,
                    true,
                    crate::kernel::fs::inodes_used,
                )?,
            };
            Ok((exclusive, inodes))
        })
    }
}

impl Index {
    /// `record` as containerd sees it (none unless containerd made it); its parent is named
    /// by the parent's key.
    fn snapshot_info(&self, record: &LayerRecord) -> Option<SnapshotInfo> {
        let snapshot = record.snapshot.as_ref()?;
        let parent = record
            .parent
            .as_ref()
            .and_then(|p| self.layers.get(p))
            .and_then(|p| p.snapshot.as_ref())
            .map(|s| s.key.clone())
            .unwrap_or_default();
        Some(SnapshotInfo {
            key: snapshot.key.clone(),
            parent,
            kind: snapshot.kind,
            created_ns: record.created_ns,
            updated_ns: snapshot.updated_ns,
            labels: record.labels.clone(),
        })
    }
}

/// containerd's label rules (key and value together at most 4096 bytes) and thinstack's
/// (no control characters, no '=' in keys).
fn check_snapshot_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in labels {
        if key.len() + value.len() > LABEL_PAIR_MAX {
            return Err(Error::invalid(format!(
                "label {key:?} is too long: key and value together may be at most {LABEL_PAIR_MAX} bytes"
            )));
        }
    }
    check_labels(labels)
}

/// The label containerd defines for a snapshot's size: the new snapshot's device and
/// filesystem get it (a child's grown from its parent's; one smaller than the parent's is
/// refused as invalid).
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

/// The size [`MAX_SIZE_LABEL`] asks for: whole bytes, in decimal, rounded down to whole 4 KiB
/// blocks (the filesystems' block); none without the label.
fn max_size_of(labels: &BTreeMap<String, String>) -> Result<Option<ByteSize>> {
    let Some(text) = labels.get(MAX_SIZE_LABEL) else {
        return Ok(None);
    };
    let bytes: u64 = text.trim().parse().map_err(|_| {
        Error::invalid(format!(
            "label {MAX_SIZE_LABEL}={text:?} is not a size in bytes; write a whole number in decimal, such as 10737418240 for 10 GiB"
        ))
    })?;
    let blocks = bytes / 4096 * 4096;
    if blocks == 0 {
        return Err(Error::invalid(format!(
            "label {MAX_SIZE_LABEL}={text:?} is smaller than one 4 KiB block; a snapshot needs room for its filesystem"
        )));
    }
    Ok(Some(ByteSize::from_bytes(blocks)))
}
