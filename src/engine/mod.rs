//! The layer engine: named layers as thin devices, their life cycle, and records that survive a
//! crash at any step.
//!
//! The engine is logic over [`PoolKernel`] and [`FsKernel`], so the same code runs on the real
//! kernel and on the in-memory [`Sim`](crate::kernel::sim::Sim).
//!
//! How records stay true to the pool:
//! - a layer's record is written (state `creating` or `removing`) before the pool is touched,
//!   so every thin device in the pool is owned by a record;
//! - every pool message is preceded by an intent in `txn.json` and followed by
//!   `set_transaction_id old new`, so the pool's transaction id tells which messages happened;
//! - [`Engine::open`] reconciles: it settles the intent, rolls back layers left `creating`,
//!   finishes layers left `removing`, deletes thin devices no record owns, flags records whose
//!   thin device is gone, and re-activates layers that were active before a reboot.

mod adopt;
mod degraded;
mod leftovers;
mod locks;
mod mount_policy;
mod reconcile;
mod snapshots;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, MountOption};
use crate::crash;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::{FsKernel, PoolDetails, PoolKernel, PoolUsage};
use crate::names::{LayerName, ThinId, THIN_ID_MAX};
use crate::records::{
    ensure_private_dir, Intent, LayerRecord, LayerState, MountRecord, PoolOp, RecordStore,
    SnapshotKind, SnapshotRecord, StateLock, TxnRecord, RECORD_FORMAT,
};
use crate::units::{ByteSize, Percent};
use crate::vocab::FsType;
use crate::vocab::{Health, Space};

pub use leftovers::StalePoint;
use locks::{LayerGuard, LayerLocks};
pub use reconcile::ReconcileReport;
pub use snapshots::{NewSnapshot, OutsideChange, SnapshotInfo, SnapshotMount, SnapshotRoot};

/// Longest label key and value.
const LABEL_KEY_MAX: usize = 256;
const LABEL_VALUE_MAX: usize = 4096;

/// What the engine takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The state directory (records; `mnt/<layer>` default mount points).
    pub state_dir: PathBuf,
    /// Size of a new base layer unless one is requested.
    pub base_size: ByteSize,
    /// Filesystem of a new base layer unless one is requested.
    pub filesystem: FsType,
    /// Extra mkfs arguments.
    pub mkfs_args: Vec<String>,
    /// Extra mount options.
    pub mount_options: Vec<String>,
    /// Directories beneath which callers may mount layers, besides `<state_dir>/mnt`.
    pub mount_roots: Vec<PathBuf>,
    /// Refuse new layers below this share of free data or metadata.
    pub min_free_space: Percent,
    /// Discard a layer's blocks before deleting it (gives loop-file space back).
    pub discard_on_remove: bool,
    /// How often and how far apart a busy deactivation is retried before removal is deferred.
    pub busy_retries: u32,
    /// See `busy_retries`.
    pub busy_retry_interval: Duration,
}

impl Settings {
    /// The engine's settings from a configuration.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            state_dir: config.state_dir.path().to_path_buf(),
            base_size: config.layers.base_size,
            filesystem: config.layers.filesystem,
            mkfs_args: config.layers.mkfs_args.clone(),
            mount_options: config
                .layers
                .mount_options
                .iter()
                .map(|o: &MountOption| o.as_str().to_string())
                .collect(),
            mount_roots: config
                .layers
                .mount_roots
                .iter()
                .map(|root| root.path().to_path_buf())
                .collect(),
            min_free_space: config.pool.min_free_space,
            discard_on_remove: config.layers.discard_on_remove,
            // The devicemapper crate already retries EBUSY on removal (5 times, 200 ms apart),
            // so two more rounds make about 3 s before a busy removal is deferred.
            busy_retries: 2,
            busy_retry_interval: Duration::from_millis(100),
        }
    }
}

/// A request to create a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateLayer {
    /// The new layer's name.
    pub name: String,
    /// The layer to snapshot; none for a new base layer.
    pub parent: Option<String>,
    /// Virtual size; default: the base size, or the parent's size.
    pub size: Option<ByteSize>,
    /// Filesystem of a base layer; default: the configured one.
    pub filesystem: Option<FsType>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A layer as callers see it (the API's wire form is `api::Layer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Name.
    pub name: LayerName,
    /// Thin device id.
    pub thin_id: ThinId,
    /// Parent layer.
    pub parent: Option<LayerName>,
    /// Virtual size.
    pub size: ByteSize,
    /// Filesystem type.
    pub filesystem: FsType,
    /// Filesystem UUID.
    pub fs_uuid: String,
    /// Read-only for good.
    pub committed: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Life-cycle state.
    pub state: LayerState,
    /// The block device while active.
    pub device: Option<PathBuf>,
    /// Mount points thinstack made, with their users.
    pub mounts: BTreeMap<PathBuf, MountRecord>,
    /// Removal waits for the device to be released.
    pub deferred_removal: bool,
    /// The pool lost this layer's thin device.
    pub missing: bool,
    /// Layers made from this one.
    pub children: Vec<LayerName>,
    /// The containerd snapshot this layer is, if containerd made it.
    pub snapshot: Option<SnapshotRecord>,
    /// Why the layer is degraded: its settling at start failed, so its operations are refused
    /// until `pool doctor --repair` (or a restart) settles it.
    pub degraded: Option<String>,
}

impl Layer {
    /// Each mount point once per user holding it: unmounting at each, in turn, unmounts the
    /// layer everywhere.
    pub fn mount_users(&self) -> impl Iterator<Item = &Path> {
        self.mounts
            .iter()
            .flat_map(|(target, mount)| std::iter::repeat_n(target.as_path(), mount.refs as usize))
    }
}

/// The pool's status with the engine's settings and counts (the API's wire form is
/// `api::PoolStatus`).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Name, device, backend, block size, data and metadata sources.
    pub pool: PoolDetails,
    /// Size of a new base layer.
    pub base_size: ByteSize,
    /// Filesystem of a new base layer.
    pub filesystem: FsType,
    /// Data space.
    pub data: Space,
    /// Metadata space.
    pub metadata: Space,
    /// New layers are refused below this share of free data or metadata.
    pub min_free_space: Percent,
    /// The pool's transaction id.
    pub transaction_id: u64,
    /// Health flags.
    pub health: Health,
    /// Layers in all.
    pub layers: usize,
    /// Layers waiting for deferred deletion.
    pub deferred_deletions: usize,
    /// Whether removal discards blocks first.
    pub discard_on_remove: bool,
}

/// What a removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// The layer and its thin device are gone.
    Removed,
    /// The device is busy; it will be removed once released ([`Engine::process_deferred`]).
    Deferred,
}

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
}

/// The records in memory.
#[derive(Default)]
struct Index {
    layers: BTreeMap<LayerName, LayerRecord>,
    /// Thin ids in use: owned by a record, or seen in the pool at the last reconcile.
    used_ids: BTreeSet<ThinId>,
    /// Parent -> children, kept with the records so no operation scans every layer.
    children: BTreeMap<LayerName, BTreeSet<LayerName>>,
    /// containerd's (namespace, key) -> the layer that is that snapshot, for every snapshot
    /// not being removed (a removed key is free again at once, even while its device waits
    /// for deferred removal).
    snapshot_keys: BTreeMap<(String, String), LayerName>,
    /// Layers whose settling at start failed, with why: refused until repaired.
    degraded: BTreeMap<LayerName, String>,
}

impl Index {
    fn children_of(&self, name: &LayerName) -> Vec<LayerName> {
        self.children
            .get(name)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn insert(&mut self, record: LayerRecord) {
        if let Some(old) = self.layers.get(&record.name).cloned() {
            self.forget_snapshot_key(&old);
        }
        self.used_ids.insert(record.thin_id);
        index_child(&mut self.children, &record);
        if let Some(snapshot) = &record.snapshot {
            if record.state != LayerState::Removing {
                self.snapshot_keys.insert(
                    (snapshot.namespace.clone(), snapshot.key.clone()),
                    record.name.clone(),
                );
            }
        }
        self.layers.insert(record.name.clone(), record);
    }

    /// Free the key of snapshot `record`, if it is still this layer's.
    fn forget_snapshot_key(&mut self, record: &LayerRecord) {
        if let Some(snapshot) = &record.snapshot {
            let key = (snapshot.namespace.clone(), snapshot.key.clone());
            if self.snapshot_keys.get(&key) == Some(&record.name) {
                self.snapshot_keys.remove(&key);
            }
        }
    }

    fn remove(&mut self, name: &LayerName) {
        self.degraded.remove(name);
        let Some(record) = self.layers.remove(name) else {
            return;
        };
        self.forget_snapshot_key(&record);
        self.used_ids.remove(&record.thin_id);
        if let Some(parent) = &record.parent {
            if let Some(siblings) = self.children.get_mut(parent) {
                siblings.remove(name);
                if siblings.is_empty() {
                    self.children.remove(parent);
                }
            }
        }
    }

    fn deferred_count(&self) -> usize {
        self.layers.values().filter(|l| l.deferred).count()
    }

    fn names_where(&self, keep: impl Fn(&LayerRecord) -> bool) -> Vec<LayerName> {
        self.layers
            .values()
            .filter(|l| keep(l))
            .map(|l| l.name.clone())
            .collect()
    }
}

fn now_ns() -> u64 {
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
        };
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

    /// The pool's transaction id as the records have it.
    pub fn transaction_id(&self) -> u64 {
        self.txn().transaction_id
    }

    /// Run `f` on the pool kernel with pool messages held off (to reload the pool's table).
    pub fn exclusive_pool<R>(&self, f: impl FnOnce(&K) -> R) -> R {
        let _txn = self.txn();
        f(&self.kernel)
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
        })
    }

    /// One layer.
    pub fn inspect(&self, name: &str) -> Result<Layer> {
        self.view(self.record(&LayerName::new(name)?)?)
    }

    /// Every layer, by name; only those carrying every label in `labels` when it is not empty.
    pub fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<Layer>> {
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
        })
    }

    /// How many layers wait for deferred removal.
    pub fn deferred_count(&self) -> usize {
        self.index().deferred_count()
    }

    /// Bytes of pool data the layer maps (its own and those shared with its parents).
    pub fn usage(&self, name: &str) -> Result<ByteSize> {
        let (name, _guard) = self.lock_layer(name)?;
        let record = self.ready_record(&name)?;
        self.with_device(&record, |_| self.kernel.mapped(record.thin_id))
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

    // ----- records ---------------------------------------------------------------------------

    /// Write a record, then show it in the index. The caller holds the layer's lock.
    fn put(&self, record: LayerRecord) -> Result<()> {
        self.store.put_layer(&record)?;
        self.index().insert(record);
        Ok(())
    }

    fn drop_record(&self, name: &LayerName) -> Result<()> {
        self.store.remove_layer(name)?;
        self.index().remove(name);
        Ok(())
    }

    /// A thin id that is provably free: no record owns it and the pool did not hold it at the
    /// last reconcile (ids made since are all owned by records). It is reserved in the index
    /// until the caller's record owns it.
    fn allocate_id(&self) -> Result<ThinId> {
        let mut txn = self.txn();
        let mut index = self.index();
        let start = txn.next_thin_id.clamp(1, THIN_ID_MAX);
        let mut candidate = start;
        loop {
            let id = ThinId::new(candidate)?;
            candidate = if candidate >= THIN_ID_MAX {
                1
            } else {
                candidate + 1
            };
            if index.used_ids.insert(id) {
                txn.next_thin_id = candidate;
                return Ok(id);
            }
            if candidate == start {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "all 16777215 thin device ids are in use",
                ));
            }
        }
    }

    /// Send one pool message under the transaction protocol: intent, message, transaction id,
    /// record. A message that fails changes nothing in the pool; the intent is withdrawn.
    fn pool_step(&self, layer: Option<&LayerName>, op: PoolOp) -> Result<()> {
        // The operations asked ensure_writable before their first change; a status read per
        // message again was the costliest part of a create. A pool made read-only since
        // refuses the message itself. What a start left unsettled is checked again here.
        self.refuse_while_intent_unsettled()?;
        let mut txn = self.txn();
        let old = txn.transaction_id;
        let new = old + 1;
        txn.pending = Some(Intent {
            new_transaction_id: new,
            op: op.clone(),
            layer: layer.cloned(),
        });
        self.store.put_txn(&txn)?;
        crash::point(crash::Point::PoolStepIntentWritten);
        let sent = match &op {
            PoolOp::CreateThin { id } => self.kernel.create_thin(*id),
            PoolOp::Snapshot { origin, id } => self.kernel.snapshot(*origin, *id),
            PoolOp::Delete { id } => self.kernel.delete_thin(*id),
        };
        if let Err(err) = sent {
            txn.pending = None;
            if let Err(e) = self.store.put_txn(&txn) {
                tracing::warn!(error = %e, "could not withdraw the intent; the next open settles it");
            }
            return Err(err);
        }
        crash::point(crash::Point::PoolStepMessageSent);
        self.kernel.set_transaction_id(old, new)?;
        crash::point(crash::Point::PoolStepTransactionSet);
        txn.transaction_id = new;
        txn.pending = None;
        self.store.put_txn(&txn)
    }

    // ----- create ----------------------------------------------------------------------------

    /// Create a layer as [`Engine::create`] does, or, when `exists_ok` and a layer of that
    /// name exists already with the same parent, take that one: the layer, and whether it was
    /// made now. A layer of that name with another parent is `AlreadyExists` either way, so a
    /// retried script never takes a different layer for its own.
    pub fn create_or_existing(
        &self,
        request: &CreateLayer,
        exists_ok: bool,
    ) -> Result<(Layer, bool)> {
        match self.create(request) {
            Ok(layer) => Ok((layer, true)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && exists_ok => {
                let existing = self.inspect(&request.name)?;
                let parent = existing.parent.as_ref().map(LayerName::as_str);
                if parent != request.parent.as_deref() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "layer {:?} exists already with parent {parent:?}, not {:?}",
                            request.name, request.parent
                        ),
                    ));
                }
                Ok((existing, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Create a layer: a new base layer with a fresh filesystem, or a snapshot of `parent`.
    ///
    /// A snapshot of an active parent is taken with the parent suspended (a mounted filesystem
    /// is frozen and flushed). A size larger than the parent's grows the device and then the
    /// filesystem; a smaller one is refused. Refused with `NoSpace` when free data or metadata
    /// is below `min_free_space`. On failure nothing is left behind.
    pub fn create(&self, request: &CreateLayer) -> Result<Layer> {
        self.create_with(request, None)
    }

    /// [`Engine::create`], of a containerd snapshot when `snapshot` says which: its key is
    /// claimed with the record, a view is read-only, and a new root's filesystem is bare (no
    /// `lost+found`, root directory mode 0755), as containerd's snapshotters give it.
    fn create_with(
        &self,
        request: &CreateLayer,
        snapshot: Option<SnapshotRecord>,
    ) -> Result<Layer> {
        let name = LayerName::new(&request.name)?;
        // The parent's lock is held until the snapshot is taken: its device does not change
        // under the snapshot, and it cannot be removed before its child's record exists.
        let parent_name = request.parent.as_deref().map(LayerName::new).transpose()?;
        // Locking the same layer twice would wait forever.
        if parent_name.as_ref() == Some(&name) {
            return Err(Error::invalid(format!(
                "layer {name:?} cannot be a snapshot of itself; name another layer as its parent"
            )));
        }
        // Both names at once: two creates that name each other as parent would otherwise each
        // hold one and wait for the other for ever.
        let (_guard, parent_guard) = match &parent_name {
            Some(parent) => {
                let (guard, parent_guard) = self.locks.lock_both(&name, parent);
                (guard, Some(parent_guard))
            }
            None => (self.locks.lock(&name), None),
        };
        let mut plan = self.plan_create(name, request)?;
        plan.bare_root = snapshot.is_some();
        let usage = self.ensure_writable(&format!("create layer {:?}", plan.name.as_str()))?;
        self.check_space(&usage)?;
        let id = self.allocate_id()?;
        let record = LayerRecord {
            format: RECORD_FORMAT,
            name: plan.name.clone(),
            thin_id: id,
            parent: plan.parent.as_ref().map(|p| p.name.clone()),
            size: plan.size,
            filesystem: plan.filesystem,
            fs_uuid: plan
                .parent
                .as_ref()
                .map(|p| p.fs_uuid.clone())
                .unwrap_or_default(),
            committed: snapshot
                .as_ref()
                .is_some_and(|s| s.kind == SnapshotKind::View),
            labels: request.labels.clone(),
            // containerd expects a new snapshot's update time to equal its creation time.
            created_ns: snapshot.as_ref().map_or_else(now_ns, |s| s.updated_ns),
            state: LayerState::Creating,
            active: false,
            mounts: BTreeMap::new(),
            deferred: false,
            missing: false,
            snapshot,
            resizing_to: None,
        };
        if let Err(e) = self.put_claiming(record.clone()) {
            self.index().used_ids.remove(&id);
            return Err(e);
        }
        crash::point(crash::Point::CreateRecordWritten);
        match self.build_layer(&plan, id, parent_guard) {
            Ok(fs_uuid) => {
                let mut record = record;
                record.fs_uuid = fs_uuid;
                record.state = LayerState::Ready;
                self.put(record.clone())?;
                crash::point(crash::Point::CreateDone);
                tracing::info!(layer = %plan.name, thin_id = %id, parent = ?plan.parent.as_ref().map(|p| p.name.as_str()), size = %plan.size, "layer created");
                self.view(record)
            }
            Err(err) => {
                if let Err(undo) = self.undo_create(&plan.name) {
                    let reason = format!("the undo of a failed create failed: {undo}");
                    self.degrade(&plan.name, reason);
                }
                Err(err.context(format!("creating layer {:?}", plan.name.as_str())))
            }
        }
    }

    fn plan_create(&self, name: LayerName, request: &CreateLayer) -> Result<CreatePlan> {
        if self.contains(&name) {
            // A half-made layer whose undo failed says so, rather than "exists already".
            self.ensure_not_degraded(&name)?;
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a layer named {name:?} exists already"),
            ));
        }
        check_labels(&request.labels)?;
        let parent = match &request.parent {
            None => None,
            Some(parent) => Some(self.ready_record(&LayerName::new(parent)?)?),
        };
        let (size, filesystem) = match &parent {
            None => {
                let filesystem = request.filesystem.unwrap_or(self.settings.filesystem);
                let size = request.size.unwrap_or(self.settings.base_size);
                check_fs_size(filesystem, size)?;
                (size, filesystem)
            }
            Some(parent) => {
                if request.filesystem.is_some_and(|fs| fs != parent.filesystem) {
                    return Err(Error::invalid(format!(
                        "layer {name:?} is a snapshot of {:?}, which holds {}; a snapshot keeps its parent's filesystem",
                        parent.name.as_str(),
                        parent.filesystem
                    )));
                }
                let size = request.size.unwrap_or(parent.size);
                if size < parent.size {
                    return Err(Error::invalid(format!(
                        "size {size} for layer {name:?} is smaller than its parent {:?} ({}); layers can only grow",
                        parent.name.as_str(),
                        parent.size
                    )));
                }
                (size, parent.filesystem)
            }
        };
        Ok(CreatePlan {
            name,
            parent,
            size,
            filesystem,
            bare_root: false,
        })
    }

    /// Refuse `what` while the pool is read-only (it would need new blocks or a pool message),
    /// saying why and what to do. Reads, status and growth go on.
    /// Returns the pool's usage, read for the check, so a caller needs no second status read.
    fn ensure_writable(&self, what: &str) -> Result<PoolUsage> {
        let usage = self.kernel.usage()?;
        let health = usage.health;
        if !health.read_only {
            self.refuse_while_intent_unsettled()?;
            self.read_ids_if_unread()?;
            return Ok(usage);
        }
        let (kind, why, fix) = if health.metadata_guard {
            (
                ErrorKind::NoSpace,
                "thinstack made it read-only because its metadata is nearly full (running out would fail the pool for good)",
                "grow the metadata with `thinstack pool extend --metadata SIZE`; the pool is writable again at once",
            )
        } else {
            (
                ErrorKind::Kernel,
                "the kernel made it read-only after a metadata error or running out of metadata",
                "stop what uses the pool and thinstackd, check the metadata with thin_check (repair with thin_repair), then start thinstackd again",
            )
        };
        Err(Error::new(
            kind,
            format!("cannot {what}: the pool is read-only, because {why}; {fix}"),
        ))
    }

    /// A start on a read-only pool could not settle the intent a crash left; a new intent
    /// would hide it, so no pool change goes ahead of it.
    fn refuse_while_intent_unsettled(&self) -> Result<()> {
        if !self
            .intent_left_at_start
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Inconsistent,
            "a pool change a crash cut short is still unsettled (the pool was read-only when \
             thinstackd started); restart thinstackd now that the pool is writable: the start \
             settles it",
        ))
    }

    /// After a start on a read-only pool: reserve the pool's thin ids before any change, so
    /// no create is handed one that a device no record owns has.
    fn read_ids_if_unread(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.ids_unread.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        match self.kernel.thin_ids() {
            Ok(ids) => {
                self.index().used_ids.extend(ids);
                Ok(())
            }
            Err(e) => {
                self.ids_unread.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Refuse when free data or free metadata is below `min_free_space`.
    fn check_space(&self, usage: &PoolUsage) -> Result<()> {
        let min = self.settings.min_free_space;
        for (what, space) in [("data", &usage.data), ("metadata", &usage.metadata)] {
            let required = min.of(space.total.bytes());
            if space.available.bytes() < required {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "the pool has {} of {what} free of {}, below the minimum of {min} ({}); \
                         extend the pool (thinstack pool extend) or lower pool.min_free_space",
                        space.available.human(),
                        space.total.human(),
                        ByteSize::from_bytes(required).human()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The kernel steps of a create, after its record exists; returns the filesystem UUID.
    /// `parent_guard` is released as soon as the snapshot is in the pool.
    fn build_layer(
        &self,
        plan: &CreatePlan,
        id: ThinId,
        parent_guard: Option<LayerGuard<'_>>,
    ) -> Result<String> {
        let op = match &plan.parent {
            None => PoolOp::CreateThin { id },
            Some(parent) => PoolOp::Snapshot {
                origin: parent.thin_id,
                id,
            },
        };
        self.pool_step(Some(&plan.name), op)?;
        drop(parent_guard);
        match &plan.parent {
            None => {
                let node = self.kernel.activate(id, plan.size, false)?;
                crash::point(crash::Point::CreateActivated);
                let fs_uuid = self
                    .fs
                    .mkfs(plan.filesystem, &node, &self.settings.mkfs_args)?;
                crash::point(crash::Point::CreateFormatted);
                if plan.bare_root {
                    self.with_private_mount(id, &node, plan.filesystem, false, |root| {
                        crate::kernel::fs::make_bare_root(root)
                    })?;
                }
                self.kernel.deactivate(id)?;
                Ok(fs_uuid)
            }
            Some(parent) if plan.size > parent.size => {
                let node = self.kernel.activate(id, plan.size, false)?;
                crash::point(crash::Point::CreateActivated);
                self.grow_filesystem(id, &node, plan.filesystem)?;
                crash::point(crash::Point::CreateGrown);
                self.kernel.deactivate(id)?;
                Ok(parent.fs_uuid.clone())
            }
            Some(parent) => Ok(parent.fs_uuid.clone()),
        }
    }

    /// Grow the filesystem on `node` to its device: mounted at a private place for the call
    /// (xfs only grows mounted; online resize2fs needs no fsck first).
    fn grow_filesystem(&self, id: ThinId, node: &Path, filesystem: FsType) -> Result<()> {
        self.with_private_mount(id, node, filesystem, false, |target| {
            self.fs.grow(filesystem, node, target)
        })
    }

    /// Run `f` on thin `id`'s filesystem (on `node`) mounted at a private place (read-only
    /// when asked), then unmount it. The place, `mnt/.grow-<id>`, is one reconcile and `pool doctor` know
    /// to clean up after a crash; layer names start with a letter or digit, so it never meets
    /// a layer's mount point.
    fn with_private_mount<R>(
        &self,
        id: ThinId,
        node: &Path,
        filesystem: FsType,
        read_only: bool,
        f: impl FnOnce(&Path) -> Result<R>,
    ) -> Result<R> {
        let target = self
            .settings
            .state_dir
            .join("mnt")
            .join(format!(".grow-{id}"));
        std::fs::create_dir_all(&target)
            .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        self.fs.mount(node, &target, filesystem, read_only, &[])?;
        let done = f(&target);
        let unmounted = self.fs.unmount(&target, node);
        let _ = std::fs::remove_dir(&target);
        let done = done?;
        unmounted.map(|()| done)
    }

    /// Take back a create that failed after its record was written.
    fn undo_create(&self, name: &LayerName) -> Result<()> {
        let id = self.record(name)?.thin_id;
        self.remove_thin_device(Some(name), id)?;
        self.drop_record(name)
    }

    /// Deactivate (if active) and delete thin `id`; gone already is fine.
    fn remove_thin_device(&self, layer: Option<&LayerName>, id: ThinId) -> Result<()> {
        if self.kernel.active_node(id)?.is_some() {
            self.kernel.deactivate(id)?;
        }
        self.delete_thin(layer, id)
    }

    /// Delete inactive thin `id` from the pool under the transaction protocol; gone already is
    /// fine (a crash may have come after the message).
    fn delete_thin(&self, layer: Option<&LayerName>, id: ThinId) -> Result<()> {
        match self.pool_step(layer, PoolOp::Delete { id }) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    // ----- commit, activate, mount -------------------------------------------------------

    /// Make a layer read-only for good. Refused while it is mounted read-write.
    pub fn commit(&self, name: &str) -> Result<Layer> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        if record.committed {
            return self.view(record);
        }
        if let Some((target, _)) = record.mounts.iter().find(|(_, m)| !m.read_only) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is mounted read-write at {}; unmount it before committing",
                    target.display()
                ),
            ));
        }
        // An active device is re-made read-only, so nothing can write it after the commit.
        if self.kernel.active_node(record.thin_id)?.is_some() {
            self.deactivate_with_retries(record.thin_id)?;
            self.kernel
                .activate(record.thin_id, record.device_size(), true)?;
            crash::point(crash::Point::CommitReactivated);
        }
        let mut committed = record;
        committed.committed = true;
        self.put(committed.clone())?;
        crash::point(crash::Point::CommitDone);
        tracing::info!(layer = %committed.name, "layer committed");
        self.view(committed)
    }

    /// The layer's block device, activating it when needed (read-only when committed).
    pub fn activate(&self, name: &str) -> Result<PathBuf> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        self.keep_active(record)
    }

    /// The node of `record`'s device, activated if needed and recorded as active (so a
    /// reboot brings it back). The caller holds the layer's lock.
    fn keep_active(&self, record: LayerRecord) -> Result<PathBuf> {
        let (node, _) = self.ensure_active(&record)?;
        if !record.active {
            let mut active = record;
            active.active = true;
            self.put(active)?;
        }
        Ok(node)
    }

    /// The node of the layer's device, activating it (read-only when committed) if needed;
    /// and whether it was activated now.
    fn ensure_active(&self, record: &LayerRecord) -> Result<(PathBuf, bool)> {
        match self.kernel.active_node(record.thin_id)? {
            Some(node) => Ok((node, false)),
            None => self
                .kernel
                .activate(record.thin_id, record.device_size(), record.committed)
                .map(|node| (node, true)),
        }
    }

    /// Deactivate a layer's device. Refused while thinstack has it mounted; `Busy` when
    /// another user holds it after a few retries.
    pub fn deactivate(&self, name: &str) -> Result<()> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        if let Some(target) = record.mounts.keys().next() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is mounted at {}; unmount it first",
                    target.display()
                ),
            ));
        }
        if self.kernel.active_node(record.thin_id)?.is_some() {
            self.deactivate_with_retries(record.thin_id)?;
        }
        if record.active {
            let mut inactive = record;
            inactive.active = false;
            self.put(inactive)?;
        }
        Ok(())
    }
    /// Deactivate, retrying `Busy` a few times (udev or a closing user may hold the device a
    /// moment longer).
    fn deactivate_with_retries(&self, id: ThinId) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.kernel.deactivate(id) {
                Err(e) if e.kind() == ErrorKind::Busy && attempt < self.settings.busy_retries => {
                    attempt += 1;
                    std::thread::sleep(self.settings.busy_retry_interval);
                }
                other => return other,
            }
        }
    }

    /// Mount a layer at `target` (default `<state_dir>/mnt/<name>`), read-only when asked or
    /// committed. Mounting the same layer at the same place again adds a user; each user
    /// unmounts once. Returns the mount point.
    ///
    /// A given target must be beneath `<state_dir>/mnt` or a configured mount root (else
    /// `Permission`), and an existing empty directory reached through no symbolic link. The
    /// mount table is asked before a record is trusted: a recorded mount that is gone (unmounted
    /// by hand) is mounted again, not merely counted.
    pub fn mount(&self, name: &str, target: Option<&Path>, read_only: bool) -> Result<PathBuf> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        let read_only = read_only || record.committed;
        if !read_only {
            self.ensure_writable(&format!(
                "mount layer {name:?} read-write (mount it read-only meanwhile)"
            ))?;
        }
        let target = match target {
            Some(path) => self.mount_policy().check(path)?,
            None => {
                let path = self.settings.state_dir.join("mnt").join(name.as_str());
                std::fs::create_dir_all(&path)
                    .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
                path
            }
        };
        let mut updated = self.drop_gone_mounts(record)?;
        if let Some(existing) = updated.mounts.get_mut(&target) {
            if existing.read_only != read_only {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {name:?} is mounted {} at {} already",
                        if existing.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        },
                        target.display()
                    ),
                ));
            }
            existing.refs += 1;
            self.put(updated)?;
            return Ok(target);
        }
        if self.fs.is_mounted(&target)? {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{} has something else mounted on it", target.display()),
            ));
        }
        let (node, activated_now) = self.ensure_active(&updated)?;
        let mounted = self.fs.mount(
            &node,
            &target,
            updated.filesystem,
            read_only,
            &self.settings.mount_options,
        );
        if let Err(e) = mounted {
            // A refused target changes nothing: not even the device's activation.
            if activated_now {
                let _ = self.kernel.deactivate(updated.thin_id);
            }
            return Err(e);
        }
        updated.active = true;
        updated
            .mounts
            .insert(target.clone(), MountRecord { refs: 1, read_only });
        if let Err(e) = self.put(updated) {
            // Never a mount the records do not know: take it back.
            if let Err(undo) = self.fs.unmount(&target, &node) {
                tracing::error!(layer = %name, target = %target.display(), error = %undo, "could not undo a mount whose record was not written; the next start records it");
            }
            return Err(e);
        }
        tracing::info!(layer = %name, target = %target.display(), read_only, "layer mounted");
        Ok(target)
    }

    /// Where callers may mount layers.
    fn mount_policy(&self) -> mount_policy::MountPolicy<'_> {
        mount_policy::MountPolicy {
            state_dir: &self.settings.state_dir,
            roots: &self.settings.mount_roots,
        }
    }

    /// `record` without the mounts the kernel no longer has (unmounted behind thinstack's
    /// back), written back when any were dropped.
    fn drop_gone_mounts(&self, record: LayerRecord) -> Result<LayerRecord> {
        if record.mounts.is_empty() {
            return Ok(record);
        }
        let live: BTreeSet<PathBuf> = match self.kernel.active_node(record.thin_id)? {
            Some(node) => self
                .fs
                .mounts_of(&node)?
                .into_iter()
                .map(|(target, _)| target)
                .collect(),
            None => BTreeSet::new(),
        };
        let mut updated = record;
        let gone: Vec<PathBuf> = updated
            .mounts
            .keys()
            .filter(|target| !live.contains(*target))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(updated);
        }
        for target in &gone {
            updated.mounts.remove(target);
        }
        self.put(updated.clone())?;
        tracing::warn!(layer = %updated.name, mounts = ?gone, "dropped mount records whose mount was gone (unmounted by hand?)");
        Ok(updated)
    }

    /// Drop one user of a mount of the layer (the only mount, or the one at `target`); the last
    /// user unmounts. The device stays active. A recorded mount that the kernel no longer has
    /// is dropped from the record; one that something else now covers is refused.
    pub fn unmount(&self, name: &str, target: Option<&Path>) -> Result<()> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.record(&name)?;
        let had = record.mounts.len();
        let record = self.drop_gone_mounts(record)?;
        let target = match target {
            Some(path) => mount_policy::plain(path)?,
            None => match record.mounts.keys().collect::<Vec<_>>().as_slice() {
                [only] => (*only).clone(),
                [] if had > 0 => return Ok(()),
                [] => return Err(Error::invalid(format!("layer {name:?} is not mounted"))),
                many => {
                    return Err(Error::invalid(format!(
                        "layer {name:?} is mounted at {} places ({}); say which to unmount",
                        many.len(),
                        many.iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            },
        };
        let mut updated = record;
        let Some(mount) = updated.mounts.get_mut(&target) else {
            if had > updated.mounts.len() {
                // The one named was among those already gone.
                return Ok(());
            }
            return Err(Error::invalid(format!(
                "layer {name:?} is not mounted at {}",
                target.display()
            )));
        };
        if mount.refs > 1 {
            mount.refs -= 1;
            return self.put(updated);
        }
        let node = self.kernel.active_node(updated.thin_id)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Inconsistent,
                format!("layer {name:?} is recorded mounted but its device is not active"),
            )
        })?;
        self.fs.unmount(&target, &node)?;
        updated.mounts.remove(&target);
        self.put(updated)?;
        tracing::info!(layer = %name, target = %target.display(), "layer unmounted");
        Ok(())
    }

    // ----- remove ------------------------------------------------------------------------

    /// Remove a layer and its thin device. Refused while it has children; never unmounts.
    /// A device that stays busy after brief retries is removed later, when released
    /// ([`Removal::Deferred`]).
    pub fn remove(&self, name: &str) -> Result<Removal> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.record(&name)?;
        self.ensure_writable(&format!("remove layer {name:?}"))?;
        let children = self.live_children(&name);
        if !children.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} has children ({}); remove them first, or remove it with --recursive",
                    children
                        .iter()
                        .map(LayerName::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if record.state == LayerState::Creating {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("layer {name:?} is still being created"),
            ));
        }
        let mut removing = record;
        removing.state = LayerState::Removing;
        removing.active = false;
        self.put(removing.clone())?;
        crash::point(crash::Point::RemoveMarked);
        self.finish_removal(removing, true)
    }

    /// Remove a layer and every layer made from it, children first. Stops at the first layer
    /// that cannot be removed; returns what happened to each layer removed, in order.
    pub fn remove_recursive(&self, name: &str) -> Result<Vec<(LayerName, Removal)>> {
        let root = LayerName::new(name)?;
        self.record(&root)?;
        let order = self.descendants_post_order(&root);
        let mut done = Vec::new();
        for layer in order {
            let removal = self.remove(layer.as_str())?;
            done.push((layer, removal));
        }
        Ok(done)
    }

    /// Remove every layer, unmounting each first, children before parents (to destroy the
    /// pool). Refused while layers exist unless `force`. Stops with `Busy` at a layer whose
    /// device another process holds open; what was removed until then stays removed.
    pub fn remove_all(&self, force: bool) -> Result<usize> {
        let layers = self.list(&BTreeMap::new())?;
        if !layers.is_empty() && !force {
            let names: Vec<&str> = layers.iter().take(5).map(|l| l.name.as_str()).collect();
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "the pool still has {} layer(s) ({}{}); remove them first, or destroy it with --force to remove them too",
                    layers.len(),
                    names.join(", "),
                    if layers.len() > names.len() { ", ..." } else { "" }
                ),
            ));
        }
        for layer in &layers {
            for target in layer.mount_users() {
                self.unmount(layer.name.as_str(), Some(target))?;
            }
        }
        let mut removed = 0;
        for root in layers.iter().filter(|l| l.parent.is_none()) {
            for (name, removal) in self.remove_recursive(root.name.as_str())? {
                if removal == Removal::Deferred {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("layer {name:?} is held open by another process; close it, then destroy the pool again"),
                    ));
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Forget the transaction record and the emptied layer-record directory, once the pool
    /// they describe is destroyed (its layers removed first, [`Engine::remove_all`]).
    pub fn forget_pool(&self) -> Result<()> {
        self.store.clear()
    }

    /// `name` and every layer below it, each after all of its descendants (so children are
    /// removed before their parents). A loop, not recursion: a chain tens of thousands deep
    /// needs no deeper stack, and a cycle damaged records might make is walked once.
    fn descendants_post_order(&self, name: &LayerName) -> Vec<LayerName> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![(name.clone(), false)];
        while let Some((layer, children_done)) = stack.pop() {
            if children_done {
                order.push(layer);
                continue;
            }
            if !seen.insert(layer.clone()) {
                continue;
            }
            let children = self.children_of(&layer);
            stack.push((layer, true));
            stack.extend(children.into_iter().rev().map(|child| (child, false)));
        }
        order
    }

    /// Finish removing a layer in state `removing`; `wait` retries a busy device briefly.
    /// The caller holds the layer's lock.
    fn finish_removal(&self, record: LayerRecord, wait: bool) -> Result<Removal> {
        let name = record.name.clone();
        let id = record.thin_id;
        if !record.missing {
            if self.kernel.active_node(id)?.is_some() {
                let deactivated = if wait {
                    self.deactivate_with_retries(id)
                } else {
                    self.kernel.deactivate(id)
                };
                match deactivated {
                    Err(e) if e.kind() == ErrorKind::Busy => {
                        if !record.deferred {
                            let mut deferred = record;
                            deferred.deferred = true;
                            self.put(deferred)?;
                            tracing::info!(layer = %name, "layer busy: removal deferred until it is released");
                        }
                        return Ok(Removal::Deferred);
                    }
                    other => other?,
                }
                crash::point(crash::Point::RemoveDeactivated);
            }
            if self.settings.discard_on_remove {
                self.discard(id, record.size)?;
                crash::point(crash::Point::RemoveDiscarded);
            }
            self.delete_thin(Some(&name), id)?;
            crash::point(crash::Point::RemoveDeleted);
        }
        self.remove_default_mount_point(&name);
        self.drop_record(&name)?;
        tracing::info!(layer = %name, thin_id = %id, "layer removed");
        Ok(Removal::Removed)
    }

    /// The directory `mount` made for the layer goes with it (while the record still exists,
    /// so no crash leaves it behind). Only an empty directory is removed; failing to is
    /// harmless, and `pool doctor` reports what is left.
    fn remove_default_mount_point(&self, name: &LayerName) {
        let path = self.settings.state_dir.join("mnt").join(name.as_str());
        if let Err(e) = std::fs::remove_dir(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(layer = %name, path = %path.display(), error = %e, "could not remove the layer's mount point");
            }
        }
    }

    /// Discard the blocks of inactive thin `id`, so the pool passes the discards down and a
    /// loop file gets its space back.
    fn discard(&self, id: ThinId, size: ByteSize) -> Result<()> {
        self.kernel.activate(id, size, false)?;
        let discarded = self.kernel.discard(id);
        let deactivated = self.kernel.deactivate(id);
        discarded.and(deactivated)
    }

    /// Retry every deferred removal once; returns the layers removed now.
    pub fn process_deferred(&self) -> Result<Vec<LayerName>> {
        // A read-only pool deletes nothing; they wait until it is writable.
        if self.kernel.usage()?.health.read_only {
            return Ok(Vec::new());
        }
        let deferred = self
            .index()
            .names_where(|l| l.deferred && l.state == LayerState::Removing);
        let mut removed = Vec::new();
        for name in deferred {
            let _guard = self.locks.lock(&name);
            // Settled by someone else meanwhile?
            let Ok(record) = self.record(&name) else {
                continue;
            };
            if self.finish_removal(record, false)? == Removal::Removed {
                removed.push(name);
            }
        }
        Ok(removed)
    }

    // ----- resize ------------------------------------------------------------------------

    /// Grow a layer's device and filesystem to `size`; smaller is refused, equal grows the
    /// filesystem only (finishing a resize a crash interrupted).
    pub fn resize(&self, name: &str, size: ByteSize) -> Result<Layer> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        self.ensure_writable(&format!("resize layer {name:?}"))?;
        if record.committed {
            return Err(Error::invalid(format!(
                "layer {name:?} is committed; it cannot change"
            )));
        }
        if size < record.size {
            return Err(Error::invalid(format!(
                "size {size} for layer {name:?} is smaller than its size {}; layers can only grow",
                record.size
            )));
        }
        if !record.mounts.is_empty() && record.mounts.values().all(|m| m.read_only) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("layer {name:?} is mounted read-only; unmount it to grow its filesystem"),
            ));
        }
        // The intent first: after a crash the device may be activated at the larger size (a
        // device larger than its filesystem is harmless, the reverse not), and reconcile
        // settles the size by what the filesystem became.
        let mut resizing = record.clone();
        resizing.resizing_to = Some(size);
        self.put(resizing.clone())?;
        crash::point(crash::Point::ResizeRecorded);
        // Not accepted: the record keeps its size, and its intent, which the next start
        // settles by what the filesystem became (it may have grown part way).
        self.grow_device_and_filesystem(&record, size)
            .map_err(|e| e.context(format!("resizing layer {:?} to {size}", name.as_str())))?;
        let mut grown = resizing;
        grown.resizing_to = None;
        grown.size = size;
        self.put(grown.clone())?;
        tracing::info!(layer = %name, size = %size, "layer resized");
        self.view(grown)
    }

    /// Grow `record`'s device to `size`, then its filesystem (where it is mounted read-write,
    /// or at a private place when unmounted); an inactive device is deactivated again.
    fn grow_device_and_filesystem(&self, record: &LayerRecord, size: ByteSize) -> Result<()> {
        let id = record.thin_id;
        let node = match self.kernel.active_node(id)? {
            Some(node) => {
                self.kernel.resize(id, size)?;
                node
            }
            None => self.kernel.activate(id, size, false)?,
        };
        crash::point(crash::Point::ResizeReloaded);
        match record.mounts.iter().find(|(_, m)| !m.read_only) {
            Some((target, _)) => self.fs.grow(record.filesystem, &node, target)?,
            None if record.mounts.is_empty() => {
                self.grow_filesystem(id, &node, record.filesystem)?
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {:?} is mounted read-only; unmount it to grow its filesystem",
                        record.name.as_str()
                    ),
                ))
            }
        }
        crash::point(crash::Point::ResizeGrown);
        if !record.active && record.mounts.is_empty() {
            self.deactivate_with_retries(id)?;
        }
        Ok(())
    }
}

/// Record `record` as a child of its parent in the parent -> children index.
fn index_child(children: &mut BTreeMap<LayerName, BTreeSet<LayerName>>, record: &LayerRecord) {
    if let Some(parent) = &record.parent {
        children
            .entry(parent.clone())
            .or_default()
            .insert(record.name.clone());
    }
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
