//! The layer engine: named layers as thin devices, their life cycle, and records that survive a
//! crash at any step.
//!
//! The engine is logic over [`PoolKernel`] and [`FsKernel`], so the same code runs on the real
//! kernel and on the in-memory [`Sim`](crate::kernel::sim::Sim).
//!
//! How records stay true to the pool:
//! - a layer's record is written (state `creating` or `removing`) before the pool is touched,
//!   so every thin device in the pool is owned by a record; a removed layer's device is owned
//!   by the deletion queue in the transaction record from before its record goes until it is
//!   deleted (`deletions.rs`);
//! - every pool message is preceded by a synced intent in the transaction record and followed
//!   by `set_transaction_id old new`, so the pool's transaction id tells which messages
//!   happened;
//! - records change through the journal ([`crate::records::journal`]): a step no kernel change
//!   depends on is staged and synced with the operation's next synced change (see
//!   `Engine::stage`), so a create costs two syncs and most operations one;
//! - [`Engine::open`] reconciles: it settles the intent, rolls back layers left `creating`,
//!   finishes layers left `removing`, deletes a thin device no record owns only when the intent
//!   proves it was being made (and keeps any other), flags records whose thin device is gone,
//!   and re-activates layers that were active before a reboot.

mod activation;
mod adopt;
mod counts;
mod create;
mod degraded;
mod deletions;
mod events;
mod export;
mod import;
mod index;
mod leftovers;
mod locks;
mod mount_policy;
mod overcommit;
mod prune;
mod reconcile;
mod remove;
mod reset;
mod resize;
mod shared;
mod snapshots;
mod transaction;
mod trim;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, MountOption};
use crate::crash;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::{FsKernel, PoolDetails, PoolKernel, PoolUsage, ThinUsage};
use crate::names::{ContentId, LayerName, ThinId, THIN_ID_MAX};
use crate::records::journal::Durability;
use crate::records::{
    ensure_private_dir, Intent, LayerRecord, LayerState, MountRecord, PoolOp, RecordStore,
    SnapshotKind, SnapshotRecord, StateLock, TxnRecord,
};
use crate::units::{ByteSize, Percent, Ratio};
use crate::vocab::FsType;
use crate::vocab::{Health, Space};

pub use counts::LayerCounts;
pub use events::{Event, EventKind, EVENTS_BUFFERED};
pub use import::ImportLayer;
use index::Index;
pub use leftovers::StalePoint;
use locks::{LayerGuard, LayerLocks};
pub use overcommit::Overcommit;
pub use prune::{PruneFilter, PruneReport, Pruned};
pub use reconcile::ReconcileReport;
pub use snapshots::{
    NewSnapshot, OutsideChange, SnapshotInfo, SnapshotMount, SnapshotRoot, MAX_SIZE_LABEL,
};
pub use trim::Trimmed;
pub use types::{CreateLayer, Layer, Removal, Settings, Status};

/// Longest label key and value.
const LABEL_KEY_MAX: usize = 256;
const LABEL_VALUE_MAX: usize = 4096;

/// The layer engine over a pool kernel `K` and filesystems `F`.
///
/// The engine is shared between threads (`&self` everywhere): operations on one layer are
/// serialized by that layer's lock, pool messages by the transaction record's lock, and the
/// in-memory index is locked only for short reads and updates, never across a kernel call or
/// a record write. Locks are taken in this order: layer, parent layer, transaction, index.
pub struct Engine<K: PoolKernel, F: FsKernel> {
    kernel: K,
    fs: F,
    store: RecordStore,
    settings: Settings,
    index: Mutex<Index>,
    /// Held across each pool message, so messages reach the pool one at a time.
    txn: Mutex<TxnRecord>,
    locks: LayerLocks,
    /// Held from checking that a containerd key is free until a record owns it.
    snapshot_claims: Mutex<()>,
    /// A start on a read-only pool found an intent it could not settle: no pool message
    /// until a restart settles it.
    intent_left_at_start: std::sync::atomic::AtomicBool,
    /// A start on a read-only pool could not list its thin ids: they are read (and reserved)
    /// before the first change once it is writable.
    ids_unread: std::sync::atomic::AtomicBool,
    /// Where events go ([`Engine::subscribe`]).
    events: events::Events,
    /// Held while the deletion queue is worked, by one caller at a time.
    deletion_work: Mutex<()>,
    /// Who does the deferred work ([`Engine::set_deferred_waker`]).
    deferred_waker: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The pool's catalog as this host last read it, on a pool shared by hosts.
    seen: Mutex<shared::Seen>,
}

/// Now, in nanoseconds since the Unix epoch (the time events and records carry).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A ready layer's record, or why the layer cannot be used.
fn usable(record: LayerRecord) -> Result<LayerRecord> {
    let name = record.name.as_str();
    match record.state {
        LayerState::Ready if record.missing => Err(Error::inconsistent(format!(
            "layer {name:?} has lost its thin device {} in the pool; remove it",
            record.thin_id
        ))),
        LayerState::Ready => Ok(record),
        LayerState::Creating => Err(Error::new(
            ErrorKind::Busy,
            format!("layer {name:?} is still being created"),
        )),
        LayerState::Removing => Err(Error::new(
            ErrorKind::Busy,
            format!("layer {name:?} is being removed"),
        )),
    }
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Open the engine on `kernel`'s pool with the records under `settings.state_dir`, and
    /// reconcile records with the pool (see the module docs). Returns what was repaired.
    ///
    /// Returns a `Busy` error when another process holds the state directory.
    pub fn open(kernel: K, fs: F, settings: Settings) -> Result<(Self, ReconcileReport)> {
        let lock = StateLock::acquire(&settings.state_dir)?;
        Engine::open_locked(kernel, fs, settings, lock)
    }

    /// [`Engine::open`] with the state directory's lock taken already (the daemon takes it
    /// before it touches the pool).
    pub fn open_locked(
        kernel: K,
        fs: F,
        settings: Settings,
        lock: StateLock,
    ) -> Result<(Self, ReconcileReport)> {
        let store = RecordStore::open_locked(&settings.state_dir, lock)?;
        ensure_private_dir(&settings.state_dir.join("mnt"))?;
        let mut index = Index::default();
        let mut owners: BTreeMap<ThinId, LayerName> = BTreeMap::new();
        for (_, layer) in store.load_layers()? {
            if let Some(other) = owners.insert(layer.thin_id, layer.name.clone()) {
                return Err(two_owners(
                    &settings.state_dir,
                    layer.thin_id,
                    &other,
                    &layer.name,
                ));
            }
            index.insert(layer);
        }
        let txn = store.load_txn()?.unwrap_or_default();
        let engine = Engine {
            kernel,
            fs,
            store,
            settings,
            index: Mutex::new(index),
            txn: Mutex::new(txn),
            locks: LayerLocks::default(),
            snapshot_claims: Mutex::new(()),
            intent_left_at_start: std::sync::atomic::AtomicBool::new(false),
            ids_unread: std::sync::atomic::AtomicBool::new(false),
            events: events::Events::new(),
            deletion_work: Mutex::new(()),
            deferred_waker: std::sync::OnceLock::new(),
            seen: Mutex::new(shared::Seen::default()),
        };
        if let Some(catalog) = engine.kernel.catalog() {
            engine.sync_catalog(catalog)?;
        }
        let report = engine.reconcile()?;
        Ok((engine, report))
    }

    /// The pool kernel (for status and tests).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The filesystem kernel.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// The state directory (records, default mount points).
    pub fn state_dir(&self) -> &Path {
        &self.settings.state_dir
    }

    /// Bytes of the records journal a power cut now would leave.
    #[cfg(test)]
    pub(crate) fn durable_journal_len(&self) -> u64 {
        self.store.durable_journal_len()
    }

    /// The pool's transaction id as the records have it.
    pub fn transaction_id(&self) -> u64 {
        self.txn().transaction_id
    }

    /// Run `f` on the pool kernel with pool messages held off (to reload the pool's table).
    pub fn exclusive_pool<R>(&self, f: impl FnOnce(&K) -> R) -> R {
        let _txn = self.txn();
        f(&self.kernel)
    }

    /// [`Engine::exclusive_pool`], with the transaction record (and its deletion queue) seen.
    fn exclusive_pool_txn<R>(&self, f: impl FnOnce(&K, &TxnRecord) -> R) -> R {
        let txn = self.txn();
        f(&self.kernel, &txn)
    }

    // ----- locks ---------------------------------------------------------------------------

    fn index(&self) -> MutexGuard<'_, Index> {
        // A panicking thread leaves the index no less true than the records it mirrors.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn txn(&self) -> MutexGuard<'_, TxnRecord> {
        self.txn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Check `name` and hold its layer's lock.
    fn lock_layer(&self, name: &str) -> Result<(LayerName, LayerGuard<'_>)> {
        let name = LayerName::new(name)?;
        self.refresh_shared()?;
        let guard = self.locks.lock(&name);
        Ok((name, guard))
    }

    // ----- queries -------------------------------------------------------------------------

    fn record(&self, name: &LayerName) -> Result<LayerRecord> {
        self.index()
            .layers
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no layer named {:?}", name.as_str())))
    }

    /// A layer that is usable (ready, its thin device present).
    fn ready_record(&self, name: &LayerName) -> Result<LayerRecord> {
        self.ensure_not_degraded(name)?;
        usable(self.record(name)?)
    }

    fn children_of(&self, name: &LayerName) -> Vec<LayerName> {
        self.index().children_of(name)
    }

    /// Children of `name` that are not being removed: a thin snapshot does not depend on its
    /// origin, so a child whose removal waits for its user does not hold its parent.
    fn live_children(&self, name: &LayerName) -> Vec<LayerName> {
        let index = self.index();
        index
            .children_of(name)
            .into_iter()
            .filter(|child| {
                index
                    .layers
                    .get(child)
                    .is_some_and(|c| c.state != LayerState::Removing)
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn view(&self, record: LayerRecord) -> Result<Layer> {
        let device = self.kernel.active_node(record.thin_id)?;
        let children = self.children_of(&record.name);
        let degraded = self.index().degraded.get(&record.name).cloned();
        Ok(Layer {
            name: record.name,
            thin_id: record.thin_id,
            parent: record.parent,
            size: record.size,
            filesystem: record.filesystem,
            fs_uuid: record.fs_uuid,
            committed: record.committed,
            labels: record.labels,
            created_ns: record.created_ns,
            state: record.state,
            device,
            mounts: record.mounts,
            deferred_removal: record.deferred,
            missing: record.missing,
            children,
            snapshot: record.snapshot,
            degraded,
            content_id: record.content_id,
            checkpoint_of: record.checkpoint_of,
            reset_spare: record.spare,
        })
    }

    /// One layer.
    pub fn inspect(&self, name: &str) -> Result<Layer> {
        self.refresh_shared()?;
        self.view(self.record(&LayerName::new(name)?)?)
    }

    /// Every layer, by name; only those carrying every label in `labels` when it is not empty.
    pub fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<Layer>> {
        self.refresh_shared()?;
        let matching: Vec<LayerRecord> = self
            .index()
            .layers
            .values()
            .filter(|l| labels.iter().all(|(k, v)| l.labels.get(k) == Some(v)))
            .cloned()
            .collect();
        matching.into_iter().map(|l| self.view(l)).collect()
    }

    /// Whether a layer of that name exists (in any state).
    fn contains(&self, name: &LayerName) -> bool {
        self.index().layers.contains_key(name)
    }

    /// The pool's space, transaction id and health.
    pub fn pool_usage(&self) -> Result<PoolUsage> {
        self.kernel.usage()
    }

    /// Everything about the pool users ask for (what `docker info` showed for devicemapper).
    pub fn status(&self) -> Result<Status> {
        let usage = self.kernel.usage()?;
        let (layers, deferred_deletions) = {
            let index = self.index();
            (index.layers.len(), index.deferred_count())
        };
        Ok(Status {
            pool: self.kernel.details(),
            base_size: self.settings.base_size,
            filesystem: self.settings.filesystem,
            data: usage.data,
            metadata: usage.metadata,
            min_free_space: self.settings.min_free_space,
            transaction_id: usage.transaction_id,
            health: usage.health,
            layers,
            deferred_deletions,
            discard_on_remove: self.settings.discard_on_remove,
            overcommit: self.overcommit(&usage),
        })
    }

    /// How many layers wait for deferred removal.
    pub fn deferred_count(&self) -> usize {
        self.index().deferred_count()
    }

    /// Pool data the layer maps, and how much of it no other thin device maps.
    pub fn usage(&self, name: &str) -> Result<ThinUsage> {
        let (name, _guard) = self.lock_layer(name)?;
        let record = self.ready_record(&name)?;
        let usage = self.thin_usage()?;
        usage_of(&usage, &record)
    }

    /// What every ready layer carrying every label in `labels` maps, and holds alone: one
    /// read of the pool's metadata for all of them.
    pub fn usage_all(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<LayerName, ThinUsage>> {
        let usage = self.thin_usage()?;
        let index = self.index();
        index
            .layers
            .values()
            .filter(|l| l.state == LayerState::Ready && !l.missing)
            .filter(|l| labels.iter().all(|(k, v)| l.labels.get(k) == Some(v)))
            .map(|record| Ok((record.name.clone(), usage_of(&usage, record)?)))
            .collect()
    }

    /// Every thin device's usage, read with pool messages held off (the real pool reads it
    /// through the one metadata snapshot a pool may hold).
    fn thin_usage(&self) -> Result<BTreeMap<ThinId, ThinUsage>> {
        self.exclusive_pool(|kernel| kernel.thin_usage())
    }

    /// Run `f` on the node of `record`'s device: the active one, or one activated read-only
    /// for the call (a measurement never writes). The caller holds the layer's lock.
    fn with_device<R>(
        &self,
        record: &LayerRecord,
        f: impl FnOnce(&Path) -> Result<R>,
    ) -> Result<R> {
        let id = record.thin_id;
        if let Some(node) = self.kernel.active_node(id)? {
            return f(&node);
        }
        let node = self.kernel.activate(id, record.device_size(), true)?;
        let done = f(&node);
        self.kernel.deactivate(id)?;
        done
    }
}

/// `record`'s entry in the pool's `usage`.
pub(super) fn usage_of(
    usage: &BTreeMap<ThinId, ThinUsage>,
    record: &LayerRecord,
) -> Result<ThinUsage> {
    usage.get(&record.thin_id).copied().ok_or_else(|| {
        Error::inconsistent(format!(
            "layer {:?}: its thin device {} is not in the pool; see thinstack pool doctor",
            record.name.as_str(),
            record.thin_id
        ))
    })
}

struct CreatePlan {
    name: LayerName,
    parent: Option<LayerRecord>,
    size: ByteSize,
    filesystem: FsType,
    /// A new root without `lost+found`, its root directory mode 0755 (containerd's).
    bare_root: bool,
}

fn check_fs_size(filesystem: FsType, size: ByteSize) -> Result<()> {
    let min = match filesystem {
        FsType::Ext4 => crate::config::EXT4_SIZE_MIN,
        FsType::Xfs => crate::config::XFS_SIZE_MIN,
    };
    if size < min {
        return Err(Error::invalid(format!(
            "size {size} is too small for {filesystem}; it must be at least {min}"
        )));
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in labels {
        let bad = |c: char| c.is_control();
        if key.is_empty() || key.len() > LABEL_KEY_MAX || key.contains(bad) || key.contains('=') {
            return Err(Error::invalid(format!(
                "label key {key:?} is not allowed: keys are 1 to {LABEL_KEY_MAX} bytes without '=' or control characters"
            )));
        }
        if value.len() > LABEL_VALUE_MAX || value.contains(bad) {
            return Err(Error::invalid(format!(
                "label {key:?} has a value that is not allowed: values are up to {LABEL_VALUE_MAX} bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// Two records claim one thin device (a record put back after its device was adopted under
/// another name, say): removing either would destroy the other's data, so nothing starts.
fn two_owners(state_dir: &Path, id: ThinId, a: &LayerName, b: &LayerName) -> Error {
    Error::new(
        ErrorKind::Inconsistent,
        format!(
            "layers {:?} and {:?} both claim thin device {id}; move one record out of {} \
             (the one that should not exist), then start again",
            a.as_str(),
            b.as_str(),
            state_dir.join("layers").display()
        ),
    )
}

#[cfg(test)]
mod tests;
