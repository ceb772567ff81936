//! An in-memory kernel for unit tests of the engine: a thin pool and filesystems with the same
//! rules the real kernel enforces (each is checked on the real kernel by
//! [`crate::kernel::conformance`]), plus failure injection.
//!
//! Rules: a thin id cannot be created twice; deleting a missing id is `NotFound`, an active one
//! `Busy`; the transaction id only moves from its current value; activating an active device is
//! `AlreadyExists`; deactivating a mounted or held device is `Busy`; data and metadata run out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use devicemapper::Device;

use crate::kernel::catalog::{Catalog, SimCatalog, SimCatalogHost};
use crate::kernel::device_io::{zero_plan, ThinIo};
use crate::kernel::sim_blocks::{self, Block, Blocks};
use crate::kernel::sim_files::{self, Tree};
pub use crate::kernel::sim_gate::SimGate;
use crate::kernel::thin_tools::CheckReport;
use crate::kernel::{
    DeletedLoopFile, DeltaRun, DmDevice, FsKernel, PoolKernel, PoolUsage, Room, ThinUsage,
};
use crate::names::ThinId;
use crate::units::ByteSize;
use crate::vocab::FsType;
use crate::vocab::{Health, Space};

/// The names the sim's thin devices have, as the doctor lists them.
const SIM_DM_PREFIX: &str = "thinstack-sim-thin-";

/// The operations failure injection and gates can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimOp {
    /// `create_thin`
    CreateThin,
    /// `create_snap`
    Snapshot,
    /// `delete`
    Delete,
    /// `set_transaction_id`
    SetTransactionId,
    /// activation
    Activate,
    /// deactivation
    Deactivate,
    /// resize
    Resize,
    /// mkfs
    Mkfs,
    /// mount
    Mount,
    /// unmount
    Unmount,
    /// grow
    Grow,
    /// listing the pool's thin ids (a gate holds the call once it has the list)
    ThinIds,
}

/// Pool data a thin device maps outside its files (what mkfs wrote, what a test wrote): one
/// allocation, shared with the snapshots made since (a clone of the `Arc`), and given back
/// to the pool when the last device holding it lets it go.
type Chunk = Arc<u64>;

#[derive(Debug, Clone, Default)]
struct SimThin {
    /// Its data outside its files.
    chunks: Vec<Chunk>,
    /// Its files, when the sim keeps files ([`Sim::with_files`]): each file's contents are
    /// an allocation of their own, shared as chunks are.
    files: Tree,
    /// Files deleted or rewritten that it alone held: still mapped, as a filesystem's freed
    /// blocks stay mapped until it trims them (and shared with the snapshots made since).
    garbage: Vec<Chunk>,
    /// Its blocks, as export and import read and write them, with the filesystem mkfs made
    /// in block 0 ([`sim_blocks`]); a snapshot shares its origin's.
    blocks: Blocks,
}

/// What a thin device maps, taken out of it for [`Sim::let_go`].
#[derive(Default)]
struct SimData {
    chunks: Vec<Chunk>,
    files: Tree,
    blocks: Vec<Block>,
}

#[derive(Debug, Clone)]
struct SimActive {
    size: ByteSize,
    read_only: bool,
}

#[derive(Debug, Default)]
struct SimState {
    transaction_id: u64,
    /// Each host's transaction id, when the pool is shared ([`Sim::on_host`]).
    host_transaction_ids: BTreeMap<String, u64>,
    thins: BTreeMap<ThinId, SimThin>,
    active: BTreeMap<ThinId, SimActive>,
    /// Mount point -> thin id.
    /// Mount point -> (device, read-only).
    mounts: BTreeMap<PathBuf, (ThinId, bool)>,
    /// Devices held open by someone outside thinstack.
    held: BTreeSet<ThinId>,
    data_total: u64,
    metadata_total: u64,
    /// Metadata bytes one thin device costs, for running metadata out.
    metadata_per_thin: u64,
    /// Bytes written by mkfs, taken from the pool.
    mkfs_bytes: u64,
    /// Bytes of every chunk and file content some thin maps, each once, kept as they change
    /// operation, and summing thousands of thins each time made deep-chain tests quadratic).
    mapped_total: u64,
    /// Read-only, as thinstack's metadata guard makes a pool: pool messages are refused.
    read_only: bool,
    /// Mounts hold the layers' files ([`Sim::with_files`]).
    files: bool,
    /// The pool's name.
    name: String,
    /// Failures to inject: operation -> calls to let pass before failing once.
    failures: BTreeMap<SimOp, (usize, ErrorKind)>,
    calls: BTreeMap<SimOp, usize>,
    /// Gates the next call of an operation stops at ([`Sim::gate`]).
    gates: BTreeMap<SimOp, Arc<SimGate>>,
}

/// The in-memory kernel. Clones share one state, as two handles on one kernel do.
#[derive(Debug, Clone)]
pub struct Sim {
    state: Arc<Mutex<SimState>>,
    /// The host this handle stands for, when the pool is shared ([`Sim::on_host`]).
    host: Option<SimCatalogHost>,
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new(ByteSize::gib(100), ByteSize::gib(1))
    }
}

impl Sim {
    /// A pool of `data` and `metadata` bytes.
    pub fn new(data: ByteSize, metadata: ByteSize) -> Self {
        Sim {
            host: None,
            state: Arc::new(Mutex::new(SimState {
                data_total: data.bytes(),
                metadata_total: metadata.bytes(),
                metadata_per_thin: 4096,
                name: "sim".to_string(),
                mkfs_bytes: 4 << 20,
                ..SimState::default()
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pool of `data` and `metadata` bytes whose mounts hold files: a mount fills its target
    /// directory with the layer's files, an unmount takes them back, a snapshot copies them
    /// (`thinstackd --sim`).
    pub fn with_files(data: ByteSize, metadata: ByteSize) -> Self {
        let sim = Sim::new(data, metadata);
        sim.state().files = true;
        sim
    }

    /// This pool as host `host` of a pool shared through `catalog` sees it (as an rbd pool
    /// is): the same thin devices, the catalog's thin ids and entries, and a transaction id
    /// of the host's own.
    pub fn on_host(&self, host: &str, catalog: &Arc<SimCatalog>) -> Sim {
        Sim {
            state: self.state.clone(),
            host: Some(catalog.for_host(host)),
        }
    }

    /// The transaction id this handle's host has (the pool's, when not shared).
    fn transaction_id_of(&self, state: &SimState) -> u64 {
        match &self.host {
            Some(host) => state
                .host_transaction_ids
                .get(host.host())
                .copied()
                .unwrap_or(0),
            None => state.transaction_id,
        }
    }

    /// Give the pool a name (as `pool.name` does).
    pub fn named(self, name: &str) -> Self {
        self.state().name = name.to_string();
        self
    }

    /// Where thin `id` is mounted read-write, if it is.
    fn writable_mount_of(state: &SimState, id: ThinId) -> Option<PathBuf> {
        state
            .mounts
            .iter()
            .find(|(_, &(mounted, read_only))| mounted == id && !read_only)
            .map(|(target, _)| target.clone())
    }

    /// Make the pool read-only (as the metadata guard does), or writable again.
    pub fn set_read_only(&self, read_only: bool) {
        self.state().read_only = read_only;
    }

    /// The kernel refuses pool messages while a pool is read-only.
    fn refuse_if_read_only(state: &SimState) -> Result<()> {
        if state.read_only {
            return Err(Error::new(
                ErrorKind::Kernel,
                "the pool is read-only: pool messages are refused",
            ));
        }
        Ok(())
    }

    /// Make the call of `op` after `after` more successful calls fail once with `kind`.
    pub fn fail_at(&self, op: SimOp, after: usize, kind: ErrorKind) {
        self.state().failures.insert(op, (after, kind));
    }

    /// Stop the next call of `op` at a gate until the test opens it: a delete before it
    /// deletes, a listing of thin ids once it has the list.
    pub fn gate(&self, op: SimOp) -> Arc<SimGate> {
        let gate = Arc::new(SimGate::default());
        self.state().gates.insert(op, gate.clone());
        gate
    }

    /// Wait at `op`'s gate, if a test set one (taken: it holds one call).
    fn pass_gate(&self, op: SimOp) {
        let gate = self.state().gates.remove(&op);
        if let Some(gate) = gate {
            gate.pass();
        }
    }

    /// Hold thin `id`'s device open, as another process would (deactivation is `Busy`).
    pub fn hold(&self, id: ThinId) {
        self.state().held.insert(id);
    }

    /// Release a hold.
    pub fn release(&self, id: ThinId) {
        self.state().held.remove(&id);
    }

    /// Add `bytes` of written data to thin `id` (as a writer inside a mount would).
    pub fn write(&self, id: ThinId, bytes: u64) {
        let mut state = self.state();
        if state.thins.contains_key(&id) {
            let chunk = Sim::allocate(&mut state, bytes);
            if let Some(thin) = state.thins.get_mut(&id) {
                thin.chunks.push(chunk);
            }
        }
    }

    /// Write `data` at `offset` of thin `id`'s blocks, active or not (as a writer on its
    /// device would; for tests).
    pub fn write_blocks(&self, id: ThinId, offset: u64, data: &[u8]) -> Result<()> {
        SimDevice::write_blocks(&mut self.state(), id, offset, data)
    }

    /// `length` bytes at `offset` of thin `id`'s blocks (for tests).
    pub fn read_blocks(&self, id: ThinId, offset: u64, length: usize) -> Result<Vec<u8>> {
        let state = self.state();
        let thin = state.thins.get(&id).ok_or_else(|| no_thin(id))?;
        let mut buf = vec![0; length];
        thin.blocks.read(offset, &mut buf);
        Ok(buf)
    }

    /// Forget every active device and mount, as a reboot does; the pool's metadata stays.
    pub fn reboot(&self) {
        let mut state = self.state();
        state.active.clear();
        state.mounts.clear();
        state.held.clear();
    }

    /// Thin ids in the pool (for test assertions).
    pub fn thin_ids_now(&self) -> BTreeSet<ThinId> {
        self.state().thins.keys().copied().collect()
    }

    /// Mount points in use (for test assertions).
    pub fn mounts_now(&self) -> Vec<PathBuf> {
        self.state().mounts.keys().cloned().collect()
    }

    /// At an unmount: a read-write mount's files become the layer's, and the target is
    /// emptied.
    fn take_files_back(
        state: &mut SimState,
        id: ThinId,
        target: &Path,
        read_only: bool,
    ) -> Result<()> {
        if !read_only {
            Sim::take_files(state, id, Tree::read(target)?)?;
        }
        sim_files::clear(target)
    }

    /// `files` become thin `id`'s: contents unchanged since its last files stay what they
    /// were (shared with snapshots), new or rewritten ones are new allocations, and what the
    /// old files held alone stays mapped as its garbage until a trim.
    fn take_files(state: &mut SimState, id: ThinId, mut files: Tree) -> Result<()> {
        let thin = state.thins.get_mut(&id).ok_or_else(|| no_thin(id))?;
        let old = std::mem::take(&mut thin.files);
        files.share_unchanged(&old);
        let kept: std::collections::HashSet<*const Vec<u8>> =
            old.contents().map(Arc::as_ptr).collect();
        let added: u64 = files
            .contents()
            .filter(|data| !kept.contains(&Arc::as_ptr(data)))
            .map(|data| data.len() as u64)
            .sum();
        thin.files = files;
        state.mapped_total += added;
        // What only the old files held is freed by the filesystem, not yet by the pool.
        let freed = old
            .contents()
            .filter(|data| Arc::strong_count(data) == 1)
            .map(|data| Arc::new(data.len() as u64));
        if let Some(thin) = state.thins.get_mut(&id) {
            thin.garbage.extend(freed);
        }
        Ok(())
    }

    /// Unmap thin `id`'s freed blocks (a trim): the bytes it unmapped (the pool gets back
    /// those no snapshot shares).
    fn trim_garbage(state: &mut SimState, id: ThinId) -> u64 {
        let garbage = state
            .thins
            .get_mut(&id)
            .map(|thin| std::mem::take(&mut thin.garbage))
            .unwrap_or_default();
        let unmapped = garbage.iter().map(|chunk| **chunk).sum();
        Sim::let_go(
            state,
            SimData {
                chunks: garbage,
                ..SimData::default()
            },
        );
        unmapped
    }

    /// A new chunk of `bytes`, taken from the pool.
    fn allocate(state: &mut SimState, bytes: u64) -> Chunk {
        state.mapped_total += bytes;
        Arc::new(bytes)
    }

    /// Let go of a thin device's `chunks` (its freed blocks among them) and `files`: what no
    /// other device holds goes back to the pool.
    fn let_go(state: &mut SimState, data: SimData) {
        let SimData {
            chunks,
            files,
            blocks,
        } = data;
        let blocks_freed: u64 = blocks
            .iter()
            .filter(|block| Arc::strong_count(block) == 1)
            .map(|block| block.len() as u64)
            .sum();
        let chunks_freed: u64 = chunks
            .iter()
            .filter(|chunk| Arc::strong_count(chunk) == 1)
            .map(|chunk| **chunk)
            .sum();
        let files_freed: u64 = files
            .contents()
            .filter(|data| Arc::strong_count(data) == 1)
            .map(|data| data.len() as u64)
            .sum();
        state.mapped_total -= chunks_freed + files_freed + blocks_freed;
    }

    /// Count a call of `op` and fail it when an injected failure is due.
    fn enter(&self, op: SimOp) -> Result<()> {
        let mut state = self.state();
        let calls = state.calls.entry(op).or_insert(0);
        *calls += 1;
        if let Some((after, kind)) = state.failures.get(&op).copied() {
            if after == 0 {
                state.failures.remove(&op);
                return Err(Error::new(kind, format!("injected failure of {op:?}")));
            }
            state.failures.insert(op, (after - 1, kind));
        }
        Ok(())
    }

    /// The device number a sim thin device has (device-mapper's usual major).
    fn device_number(id: ThinId) -> Device {
        Device {
            major: 253,
            minor: id.value(),
        }
    }

    fn dm_name(id: ThinId) -> String {
        format!("{SIM_DM_PREFIX}{id}")
    }

    fn node(id: ThinId) -> PathBuf {
        PathBuf::from(format!("/dev/sim/thin-{id}"))
    }

    fn id_of_node(node: &Path) -> Result<ThinId> {
        node.to_str()
            .and_then(|s| s.strip_prefix("/dev/sim/thin-"))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| Error::not_found(format!("{} is not a sim device", node.display())))
            .and_then(ThinId::new)
    }

    fn metadata_used(state: &SimState) -> u64 {
        state.thins.len() as u64 * state.metadata_per_thin
    }

    fn data_used(state: &SimState) -> u64 {
        state.mapped_total
    }
}

impl SimThin {
    /// Bytes it maps: its chunks, its garbage and its files, shared or not.
    fn mapped(&self) -> u64 {
        self.allocations().map(|(_, bytes)| bytes).sum()
    }

    /// Everything it maps, taken out of it (for [`Sim::let_go`]): its chunks with its
    /// garbage, and its files.
    fn take_data(&mut self) -> SimData {
        let mut chunks = std::mem::take(&mut self.chunks);
        chunks.append(&mut self.garbage);
        SimData {
            chunks,
            files: std::mem::take(&mut self.files),
            blocks: self.blocks.take(),
        }
    }

    /// Its allocations, each with its size, by address (what identifies an allocation).
    fn allocations(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let chunks = self
            .chunks
            .iter()
            .chain(&self.garbage)
            .map(|chunk| (Arc::as_ptr(chunk) as usize, **chunk));
        let files = self
            .files
            .contents()
            .map(|data| (Arc::as_ptr(data) as usize, data.len() as u64));
        chunks.chain(files).chain(self.blocks.allocations())
    }
}

fn no_thin(id: ThinId) -> Error {
    Error::not_found(format!("thin device {id}: no such thin device in the pool"))
}

impl PoolKernel for Sim {
    fn details(&self) -> crate::kernel::PoolDetails {
        crate::kernel::PoolDetails {
            name: self.state().name.clone(),
            device: "/dev/mapper/sim-pool".to_string(),
            backend: "sim".to_string(),
            block_size: ByteSize::from_bytes(64 << 10),
            data_source: "memory (thinstackd --sim: gone when it stops)".to_string(),
            metadata_source: "memory".to_string(),
        }
    }

    fn usage(&self) -> Result<PoolUsage> {
        let state = self.state();
        let data_used = Sim::data_used(&state).min(state.data_total);
        Ok(PoolUsage {
            transaction_id: self.transaction_id_of(&state),
            data: Space::new(data_used, state.data_total),
            metadata: Space::new(Sim::metadata_used(&state), state.metadata_total),
            health: Health {
                failed: false,
                needs_check: false,
                read_only: state.read_only,
                metadata_guard: state.read_only,
                out_of_space: data_used >= state.data_total,
                when_full: Some(crate::vocab::WhenFull::Error),
            },
        })
    }

    fn create_thin(&self, id: ThinId) -> Result<()> {
        self.enter(SimOp::CreateThin)?;
        let mut state = self.state();
        Sim::refuse_if_read_only(&state)?;
        if state.thins.contains_key(&id) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("thin device {id} exists already"),
            ));
        }
        if Sim::metadata_used(&state) + state.metadata_per_thin > state.metadata_total {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the pool is out of metadata space",
            ));
        }
        state.thins.insert(id, SimThin::default());
        Ok(())
    }

    fn snapshot(&self, origin: ThinId, new: ThinId) -> Result<()> {
        self.enter(SimOp::Snapshot)?;
        let mut state = self.state();
        Sim::refuse_if_read_only(&state)?;
        if !state.thins.contains_key(&origin) {
            return Err(no_thin(origin));
        }
        if state.thins.contains_key(&new) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("thin device {new} exists already"),
            ));
        }
        // A mounted origin's files are in its mount: the snapshot takes what was written, as
        // the kernel's does once the origin's filesystem is frozen.
        if state.files {
            if let Some(target) = Sim::writable_mount_of(&state, origin) {
                Sim::take_files(&mut state, origin, Tree::read(&target)?)?;
            }
        }
        // The snapshot shares every chunk and file of its origin: nothing new is taken.
        let copy = state.thins[&origin].clone();
        state.thins.insert(new, copy);
        Ok(())
    }

    fn delete_thin(&self, id: ThinId) -> Result<()> {
        self.enter(SimOp::Delete)?;
        self.pass_gate(SimOp::Delete);
        let mut state = self.state();
        Sim::refuse_if_read_only(&state)?;
        if !state.thins.contains_key(&id) {
            return Err(no_thin(id));
        }
        if state.active.contains_key(&id) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("thin device {id} is active"),
            ));
        }
        if let Some(mut thin) = state.thins.remove(&id) {
            let data = thin.take_data();
            Sim::let_go(&mut state, data);
        }
        Ok(())
    }

    fn catalog(&self) -> Option<&dyn Catalog> {
        self.host.as_ref().map(|host| host as &dyn Catalog)
    }

    fn other_hosts(&self) -> Result<Vec<String>> {
        let Some(me) = &self.host else {
            return Ok(Vec::new());
        };
        Ok(self
            .state()
            .host_transaction_ids
            .keys()
            .filter(|host| *host != me.host())
            .cloned()
            .collect())
    }

    fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        self.enter(SimOp::SetTransactionId)?;
        let mut state = self.state();
        Sim::refuse_if_read_only(&state)?;
        let current = self.transaction_id_of(&state);
        if current != old {
            return Err(Error::invalid(format!(
                "set_transaction_id {old} {new}: the pool's transaction id is {current}"
            )));
        }
        match &self.host {
            Some(host) => {
                state
                    .host_transaction_ids
                    .insert(host.host().to_string(), new);
            }
            None => state.transaction_id = new,
        }
        Ok(())
    }

    fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        self.enter(SimOp::ThinIds)?;
        let ids = self.thin_ids_now();
        self.pass_gate(SimOp::ThinIds);
        Ok(ids)
    }

    fn activate(&self, id: ThinId, size: ByteSize, read_only: bool) -> Result<PathBuf> {
        self.enter(SimOp::Activate)?;
        let mut state = self.state();
        if !state.thins.contains_key(&id) {
            return Err(no_thin(id));
        }
        if state.active.contains_key(&id) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("thin device {id} is active already"),
            ));
        }
        state.active.insert(id, SimActive { size, read_only });
        Ok(Sim::node(id))
    }

    fn deactivate(&self, id: ThinId) -> Result<()> {
        self.enter(SimOp::Deactivate)?;
        let mut state = self.state();
        if !state.active.contains_key(&id) {
            return Err(Error::not_found(format!(
                "thin device {id}: no such device"
            )));
        }
        if state.held.contains(&id) || state.mounts.values().any(|(m, _)| *m == id) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("thin device {id}: device is busy"),
            ));
        }
        state.active.remove(&id);
        Ok(())
    }

    fn active_node(&self, id: ThinId) -> Result<Option<PathBuf>> {
        Ok(self.state().active.contains_key(&id).then(|| Sim::node(id)))
    }

    fn active_read_only(&self, id: ThinId) -> Result<Option<bool>> {
        Ok(self.state().active.get(&id).map(|a| a.read_only))
    }

    fn active_ids(&self) -> Result<BTreeSet<ThinId>> {
        Ok(self.state().active.keys().copied().collect())
    }

    fn resize(&self, id: ThinId, size: ByteSize) -> Result<()> {
        self.enter(SimOp::Resize)?;
        let mut state = self.state();
        let active = state
            .active
            .get_mut(&id)
            .ok_or_else(|| Error::not_found(format!("thin device {id}: no such device")))?;
        active.size = size;
        Ok(())
    }

    fn mapped(&self, id: ThinId) -> Result<ByteSize> {
        let state = self.state();
        if !state.active.contains_key(&id) {
            return Err(Error::not_found(format!(
                "thin device {id}: no such device"
            )));
        }
        Ok(ByteSize::from_bytes(
            state.thins.get(&id).map_or(0, SimThin::mapped),
        ))
    }

    fn thin_usage(&self) -> Result<BTreeMap<ThinId, ThinUsage>> {
        let state = self.state();
        let mut holders: HashMap<usize, u32> = HashMap::new();
        for thin in state.thins.values() {
            for (allocation, _) in thin.allocations() {
                *holders.entry(allocation).or_default() += 1;
            }
        }
        Ok(state
            .thins
            .iter()
            .map(|(&id, thin)| {
                let exclusive = thin
                    .allocations()
                    .filter(|(allocation, _)| holders[allocation] == 1)
                    .map(|(_, bytes)| bytes)
                    .sum();
                let usage = ThinUsage {
                    mapped: ByteSize::from_bytes(thin.mapped()),
                    exclusive: ByteSize::from_bytes(exclusive),
                };
                (id, usage)
            })
            .collect())
    }

    fn thin_delta(&self, base: Option<ThinId>, id: ThinId) -> Result<Vec<DeltaRun>> {
        let state = self.state();
        let blocks_of = |id: ThinId| {
            state
                .thins
                .get(&id)
                .map(|thin| &thin.blocks)
                .ok_or_else(|| no_thin(id))
        };
        let base = base.map(blocks_of).transpose()?;
        Ok(blocks_of(id)?.delta(base))
    }

    fn open_thin(&self, id: ThinId) -> Result<Box<dyn ThinIo>> {
        let state = self.state();
        let active = state.active.get(&id).ok_or_else(|| {
            Error::not_found(format!(
                "thin device {id} is not active, so it cannot be read"
            ))
        })?;
        Ok(Box::new(SimDevice {
            sim: self.clone(),
            id,
            size: active.size.bytes(),
            writable: !active.read_only,
        }))
    }

    fn discard(&self, id: ThinId) -> Result<()> {
        let mut state = self.state();
        if !state.active.contains_key(&id) {
            return Err(Error::not_found(format!(
                "thin device {id}: no such device"
            )));
        }
        if let Some(thin) = state.thins.get_mut(&id) {
            let data = thin.take_data();
            Sim::let_go(&mut state, data);
        }
        Ok(())
    }

    fn room(&self) -> Result<Room> {
        let state = self.state();
        Ok(Room::Files {
            data: ByteSize::from_bytes(state.data_total),
            metadata: ByteSize::from_bytes(state.metadata_total),
        })
    }

    fn extend(
        &self,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)> {
        let mut state = self.state();
        let grown = |now: u64, wanted: Option<ByteSize>, area: &str| match wanted {
            Some(size) if size.bytes() < now => Err(Error::invalid(format!(
                "the pool's {area} is {} already; it cannot shrink to {size}",
                ByteSize::from_bytes(now)
            ))),
            Some(size) => Ok(size.bytes()),
            None => Ok(now),
        };
        let data = grown(state.data_total, data, "data")?;
        let metadata = grown(state.metadata_total, metadata, "metadata")?;
        // As on the real pool: growth reloads the pool's table, and the reload lifts the
        // read-only guard (the caller guards it again if the metadata is still nearly full).
        if data > state.data_total || metadata > state.metadata_total {
            state.read_only = false;
        }
        state.data_total = data;
        state.metadata_total = metadata;
        Ok((ByteSize::from_bytes(data), ByteSize::from_bytes(metadata)))
    }

    fn grow_volumes(
        &self,
        _group: &crate::kernel::lvm::VolumeGroup,
        _data: u64,
        _metadata: u64,
    ) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the sim pool is not on LVM volumes",
        ))
    }

    fn volume_group(&self) -> Result<crate::kernel::lvm::VolumeGroup> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the sim pool is not on LVM volumes",
        ))
    }

    fn read_only_guard(&self) -> Result<bool> {
        Ok(self.state().read_only)
    }

    fn set_read_only_guard(&self, on: bool) -> Result<bool> {
        let mut state = self.state();
        let changed = state.read_only != on;
        state.read_only = on;
        Ok(changed)
    }

    fn check_metadata(&self) -> Result<CheckReport> {
        Ok(CheckReport {
            clean: true,
            checked: "the sim pool's metadata (in memory)".to_string(),
            findings: "no damage found".to_string(),
        })
    }

    fn add_device(&self, device: &Path, _force: bool) -> Result<ByteSize> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "only an lvm pool takes more disks ({}); this pool's backend is sim",
                device.display()
            ),
        ))
    }

    fn monitored(&self) -> bool {
        false
    }

    fn destroy(&self) -> Result<()> {
        // A host of a shared pool that others still use only leaves it.
        if !self.other_hosts()?.is_empty() {
            let me = self.host.as_ref().map(|h| h.host().to_string());
            self.state()
                .host_transaction_ids
                .retain(|host, _| Some(host) != me.as_ref());
            return Ok(());
        }
        let mut state = self.state();
        if !state.active.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                "the sim pool still has active thin devices; deactivate them first",
            ));
        }
        state.thins.clear();
        state.mapped_total = 0;
        state.transaction_id = 0;
        Ok(())
    }

    fn thin_device_numbers(&self) -> Result<HashMap<Device, ThinId>> {
        Ok(self
            .state()
            .active
            .keys()
            .map(|&id| (Sim::device_number(id), id))
            .collect())
    }

    fn dm_devices(&self) -> Result<Vec<DmDevice>> {
        let state = self.state();
        Ok(state
            .active
            .keys()
            .map(|&id| DmDevice {
                name: Sim::dm_name(id),
                thin: Some(id),
                open_count: u32::from(state.held.contains(&id))
                    + state.mounts.values().filter(|(m, _)| *m == id).count() as u32,
            })
            .collect())
    }

    fn remove_dm_device(&self, name: &str) -> Result<()> {
        let id = name
            .strip_prefix(SIM_DM_PREFIX)
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| Error::not_found(format!("{name}: no such sim device")))
            .and_then(ThinId::new)?;
        self.deactivate(id)
    }

    fn deleted_loop_files(&self) -> Result<Vec<DeletedLoopFile>> {
        Ok(Vec::new())
    }

    fn loop_held(&self, device: &Path) -> Result<bool> {
        Err(no_loop_device(device))
    }

    fn detach_loop(&self, device: &Path) -> Result<()> {
        Err(no_loop_device(device))
    }
}

/// The sim's answer about any loop device: it has none.
/// A sim thin device open for export or import ([`PoolKernel::open_thin`]).
struct SimDevice {
    sim: Sim,
    id: ThinId,
    size: u64,
    writable: bool,
}

impl SimDevice {
    /// The device's state, when `length` bytes at `offset` are within it (and it may be
    /// written, for a write).
    fn check(&self, offset: u64, length: u64, write: bool) -> Result<MutexGuard<'_, SimState>> {
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(Error::invalid(format!(
                "{length} bytes at {offset} are beyond the end of thin device {} ({} bytes)",
                self.id, self.size
            )));
        }
        if write && !self.writable {
            return Err(Error::new(
                ErrorKind::Permission,
                format!("thin device {} is active read-only", self.id),
            ));
        }
        let state = self.sim.state();
        if !state.active.contains_key(&self.id) {
            return Err(Error::not_found(format!(
                "thin device {}: no such device",
                self.id
            )));
        }
        Ok(state)
    }

    /// Write `data` at `offset`, taking what it maps anew from the pool (refused when the
    /// pool has no room, as a full pool fails the write).
    fn write_blocks(state: &mut SimState, id: ThinId, offset: u64, data: &[u8]) -> Result<()> {
        let thin = state.thins.get_mut(&id).ok_or_else(|| no_thin(id))?;
        let needed = thin.blocks.allocation_needed(offset, data.len() as u64);
        if state.mapped_total + needed > state.data_total {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("thin device {id}: the pool is out of data space"),
            ));
        }
        thin.blocks.write(offset, data);
        state.mapped_total += needed;
        Ok(())
    }
}

impl ThinIo for SimDevice {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let state = self.check(offset, buf.len() as u64, false)?;
        let thin = state.thins.get(&self.id).ok_or_else(|| no_thin(self.id))?;
        thin.blocks.read(offset, buf);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let id = self.id;
        let mut state = self.check(offset, data.len() as u64, true)?;
        SimDevice::write_blocks(&mut state, id, offset, data)
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        let id = self.id;
        let mut state = self.check(offset, length, true)?;
        let (whole, edges) = zero_plan(offset, length, sim_blocks::BLOCK);
        if let Some((start, end)) = whole {
            let thin = state.thins.get_mut(&id).ok_or_else(|| no_thin(id))?;
            let unmapped = thin
                .blocks
                .unmap(start / sim_blocks::BLOCK..end / sim_blocks::BLOCK);
            Sim::let_go(
                &mut state,
                SimData {
                    blocks: unmapped,
                    ..SimData::default()
                },
            );
        }
        for (start, end) in edges {
            let zeros = vec![0u8; (end - start) as usize];
            SimDevice::write_blocks(&mut state, id, start, &zeros)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.check(0, 0, false).map(drop)
    }
}

fn no_loop_device(device: &Path) -> Error {
    Error::not_found(format!("{}: the sim has no loop devices", device.display()))
}

impl FsKernel for Sim {
    fn mkfs(&self, fs: FsType, device: &Path, _extra: &[String]) -> Result<String> {
        self.enter(SimOp::Mkfs)?;
        let id = Sim::id_of_node(device)?;
        let mut state = self.state();
        let written = state.mkfs_bytes;
        let size = state
            .active
            .get(&id)
            .map_or(ByteSize::from_bytes(0), |a| a.size);
        let uuid = format!("sim-{fs}-uuid-{id}");
        let thin = state.thins.get_mut(&id).ok_or_else(|| no_thin(id))?;
        // A new filesystem: what the device held before is gone.
        let data = thin.take_data();
        Sim::let_go(&mut state, data);
        // Its superblock is one block of what mkfs writes.
        let chunk = Sim::allocate(&mut state, written.saturating_sub(sim_blocks::BLOCK));
        state.mapped_total += sim_blocks::BLOCK;
        if let Some(thin) = state.thins.get_mut(&id) {
            thin.chunks.push(chunk);
            thin.blocks
                .write_superblock(&crate::kernel::superblock::Found {
                    fs,
                    size,
                    uuid: uuid.clone(),
                });
        }
        Ok(uuid)
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        _fs: FsType,
        read_only: bool,
        _options: &[String],
    ) -> Result<()> {
        self.enter(SimOp::Mount)?;
        let id = Sim::id_of_node(device)?;
        let mut state = self.state();
        let active = state
            .active
            .get(&id)
            .ok_or_else(|| Error::not_found(format!("{}: no such device", device.display())))?;
        if active.read_only && !read_only {
            return Err(Error::new(
                ErrorKind::Permission,
                format!("{} is read-only", device.display()),
            ));
        }
        if state.mounts.contains_key(target) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{} is a mount point already", target.display()),
            ));
        }
        if state.files {
            // The real seam's own checks: an empty directory, reached through no link.
            crate::kernel::mount_target::MountTarget::open(target)?.ensure_empty()?;
            let files = state
                .thins
                .get(&id)
                .ok_or_else(|| no_thin(id))?
                .files
                .clone();
            if let Err(e) = files.write(target) {
                let _ = sim_files::clear(target);
                return Err(e);
            }
        }
        state.mounts.insert(target.to_path_buf(), (id, read_only));
        Ok(())
    }

    fn unmount(&self, target: &Path, device: &Path) -> Result<()> {
        self.enter(SimOp::Unmount)?;
        let id = Sim::id_of_node(device)?;
        let mut state = self.state();
        match state.mounts.get(target).copied() {
            Some((mounted, read_only)) if mounted == id => {
                if state.files {
                    Sim::take_files_back(&mut state, id, target, read_only)?;
                }
                state.mounts.remove(target);
                Ok(())
            }
            _ => Err(Error::new(
                ErrorKind::Permission,
                format!(
                    "{} is not where {} is mounted; thinstack unmounts only its own mounts",
                    target.display(),
                    device.display()
                ),
            )),
        }
    }

    fn grow(&self, _fs: FsType, device: &Path, mount_point: &Path) -> Result<()> {
        self.enter(SimOp::Grow)?;
        let id = Sim::id_of_node(device)?;
        let mut state = self.state();
        if !state.mounts.contains_key(mount_point) {
            return Err(Error::invalid(format!(
                "{} is not mounted",
                mount_point.display()
            )));
        }
        let size = state.active.get(&id).map(|a| a.size);
        let state = &mut *state;
        if let (Some(size), Some(thin)) = (size, state.thins.get_mut(&id)) {
            // A filesystem's growth rewrites its superblock (a snapshot's copy of it first).
            if let Some(mut found) = thin.blocks.filesystem() {
                found.size = size;
                state.mapped_total += thin.blocks.allocation_needed(0, 1);
                thin.blocks.write_superblock(&found);
            }
        }
        Ok(())
    }

    fn probe(&self, device: &Path) -> Result<Option<crate::kernel::superblock::Found>> {
        let id = Sim::id_of_node(device)?;
        let state = self.state();
        if !state.active.contains_key(&id) {
            return Err(Error::not_found(format!(
                "{}: no such device",
                device.display()
            )));
        }
        Ok(state.thins.get(&id).and_then(|t| t.blocks.filesystem()))
    }

    fn is_mounted(&self, target: &Path) -> Result<bool> {
        Ok(self.state().mounts.contains_key(target))
    }

    fn trim(&self, target: &Path) -> Result<ByteSize> {
        let mut state = self.state();
        let (id, read_only) = *state.mounts.get(target).ok_or_else(|| {
            Error::not_found(format!("nothing is mounted at {}", target.display()))
        })?;
        if read_only {
            return Err(Error::invalid(format!(
                "the filesystem at {} is read-only; trim needs it mounted read-write",
                target.display()
            )));
        }
        // What was deleted in the mount is freed by the filesystem first, as on the kernel.
        if state.files {
            Sim::take_files(&mut state, id, Tree::read(target)?)?;
        }
        Ok(ByteSize::from_bytes(Sim::trim_garbage(&mut state, id)))
    }

    fn mount_table(&self) -> Result<Vec<crate::kernel::mounts::Mount>> {
        Ok(self
            .state()
            .mounts
            .iter()
            .map(|(target, &(id, read_only))| crate::kernel::mounts::Mount {
                device: Sim::device_number(id),
                target: target.clone(),
                read_only,
            })
            .collect())
    }

    fn mounts_of(&self, device: &Path) -> Result<Vec<(PathBuf, bool)>> {
        let id = Sim::id_of_node(device)?;
        Ok(self
            .state()
            .mounts
            .iter()
            .filter(|(_, (mounted, _))| *mounted == id)
            .map(|(target, (_, read_only))| (target.clone(), *read_only))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_follows_the_kernel_rules() {
        let sim = Sim::default();
        crate::kernel::conformance::check_rules(&sim, &sim, 100, Path::new("/mnt/sim"));
    }

    #[test]
    fn injected_failures_fire_once_after_the_given_calls() {
        let sim = Sim::default();
        sim.fail_at(SimOp::CreateThin, 1, ErrorKind::NoSpace);
        sim.create_thin(ThinId::new(1).unwrap()).unwrap();
        let err = sim.create_thin(ThinId::new(2).unwrap()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        sim.create_thin(ThinId::new(2).unwrap()).unwrap();
    }

    #[test]
    fn metadata_runs_out() {
        let sim = Sim::new(ByteSize::gib(1), ByteSize::from_bytes(8192));
        sim.create_thin(ThinId::new(1).unwrap()).unwrap();
        sim.create_thin(ThinId::new(2).unwrap()).unwrap();
        let err = sim.create_thin(ThinId::new(3).unwrap()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
    }
}
