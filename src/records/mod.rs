//! Persisted records: small JSON files written atomically and durably, and the layer and
//! transaction records' journal.
//!
//! A file is written to `<name>.tmp`, fsynced, renamed over `<name>`, and the directory is
//! fsynced, so after a crash or power cut a reader sees either the old record or the new one,
//! never a torn one. Leftover `.tmp` files are ignored by readers and swept by [`sweep_temp`].
//! Layer and transaction records change through the [`journal`] first, and reach their files
//! at its checkpoints.

pub mod journal;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::{ContentId, LayerName, ThinId};
use crate::units::ByteSize;
use crate::vocab::FsType;

use journal::{Change, Checkpoint, Durability, Journal};

const TEMP_EXTENSION: &str = "tmp";

/// Create `dir` (and its parents) readable by root only, if it is not there yet.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating directory {}", dir.display()), e))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(TEMP_EXTENSION);
    path.with_file_name(name)
}

/// Replace the file at `path` with `bytes`, atomically and durably (mode 0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_file(path, bytes, true)
}

/// Replace the file at `path` with `bytes` (mode 0600) by writing a temporary file and
/// renaming it over: atomically, and durably when `durable` (the file synced before the
/// rename, its directory after), else left for the caller to make a batch durable at once.
fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let temp = temp_path(path);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            if durable {
                file.sync_all()?;
            }
            Ok(())
        })
        .and_then(|()| fs::rename(&temp, path))
        .and_then(|()| if durable { sync_dir_of(path) } else { Ok(()) });
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        Error::io(format!("writing record {}", path.display()), e)
    })
}

/// Store `value` as pretty JSON at `path`, atomically and durably.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &pretty_json(value))
}

fn pretty_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("records always serialize");
    bytes.push(b'\n');
    bytes
}

/// Replace the file at `path` with `value` as pretty JSON, atomically (by rename) but not
/// durably: the caller makes a batch of these durable at once.
fn write_json_unsynced<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    replace_file(path, &pretty_json(value), false)
}

/// Read the JSON record at `path`; `None` when there is none.
///
/// Returns an `Inconsistent` error naming the file when it exists but does not parse.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading record {}", path.display()), e)),
    };
    parse_json(path, &bytes).map(Some)
}

/// The record `bytes` read from `path` hold.
fn parse_json<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::inconsistent(format!(
            "record {} is damaged ({e}); move it out of the state directory and start again: \
             start-up keeps the thin device it described, `thinstack pool doctor` lists that \
             device by id, and a repaired record put back (then a restart) or \
             `thinstack pool doctor --adopt THIN_ID NAME` makes it a layer again",
            path.display()
        ))
    })
}

/// The layer records named `names` in `dir` (one gone meanwhile is skipped). Each is opened
/// relative to the directory and read into one reused buffer: with 10,000 layers, whole-path
/// reads (a path walk and a size query per file) were a tenth of start-up.
fn read_records(
    dir: &Path,
    dir_fd: BorrowedFd<'_>,
    names: &[OsString],
) -> Result<Vec<LayerRecord>> {
    use nix::fcntl::{openat, OFlag};
    let mut records = Vec::with_capacity(names.len());
    let mut buf = Vec::new();
    for name in names {
        let path = || dir.join(name);
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let fd = match openat(
            dir_fd,
            name.as_os_str(),
            flags,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => {
                let e = std::io::Error::from(e);
                return Err(Error::io(format!("reading record {}", path().display()), e));
            }
        };
        let len = read_all(File::from(fd), &mut buf)
            .map_err(|e| Error::io(format!("reading record {}", path().display()), e))?;
        records.push(parse_json(&path(), &buf[..len])?);
    }
    Ok(records)
}

/// Read what `file` holds into `buf` (grown when too small, never zeroed again); returns how
/// many bytes. Unlike `read_to_end` on a `File`, it asks for no size first (a `statx` per
/// file, 6% of a start with 10,000 layers).
fn read_all(mut file: File, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize((buf.len() * 2).max(64 << 10), 0);
        }
        match file.read(&mut buf[filled..]) {
            Ok(0) => return Ok(filled),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Remove the record at `path` durably; absent is fine.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir_of(path)
            .map_err(|e| Error::io(format!("syncing after removing {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing record {}", path.display()), e)),
    }
}

/// Delete `*.tmp` files a crash left in `dir`; returns how many.
pub fn sweep_temp(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        // `Path::extension`, not `ends_with`: the latter compares whole components.
        if path.extension().is_some_and(|ext| ext == TEMP_EXTENSION) {
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            swept += 1;
        }
    }
    Ok(swept)
}

/// The file of layer `name`'s record in `layers_dir`.
fn layer_file(layers_dir: &Path, name: &LayerName) -> PathBuf {
    // LayerName allows no '/', no NUL and never "." or "..": safe as a file name.
    layers_dir.join(format!("{}.json", name.as_str()))
}

fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

/// The layer and transaction records' format; bumped when their layout changes.
pub const RECORD_FORMAT: u32 = 1;

/// Where a layer is in its life. Records are written before the pool is touched, so every thin
/// device in the pool is owned by a record, even one that a crash left half made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Being made; a crash leaves it to be rolled back.
    Creating,
    /// Usable.
    Ready,
    /// Being removed; a crash leaves it to be finished.
    Removing,
}

/// One mount of a layer, with how many users hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Users holding this mount; the last unmount unmounts.
    pub refs: u32,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A layer as persisted: flat, for serde only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Record format.
    pub format: u32,
    /// The layer's name.
    pub name: LayerName,
    /// Its thin device in the pool.
    pub thin_id: ThinId,
    /// The layer it is a snapshot of.
    pub parent: Option<LayerName>,
    /// Virtual size.
    pub size: ByteSize,
    /// Filesystem type.
    pub filesystem: FsType,
    /// Filesystem UUID (snapshots share their origin's).
    pub fs_uuid: String,
    /// Read-only for good.
    pub committed: bool,
    /// Free-form labels for scripts.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Life-cycle state.
    pub state: LayerState,
    /// Whether the layer should be active (re-activated after a reboot).
    #[serde(default)]
    pub active: bool,
    /// Mounts thinstack made, by mount point.
    #[serde(default)]
    pub mounts: BTreeMap<PathBuf, MountRecord>,
    /// Removal waits until the device is no longer busy.
    #[serde(default)]
    pub deferred: bool,
    /// The pool has no thin device for this record (found at reconcile).
    #[serde(default)]
    pub missing: bool,
    /// The containerd snapshot this layer is, when containerd made it (`[containerd]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRecord>,
    /// A resize to this size is under way: written before the device grows, so a crash
    /// leaves a device no larger than the record allows; `size` takes it only once the
    /// kernel and the filesystem accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resizing_to: Option<ByteSize>,
    /// What a committed layer holds (given at commit, kept by export and import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<ContentId>,
    /// The layer this one is a checkpoint of (`layer checkpoint`), which may be reset to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_of: Option<LayerName>,
    /// A second thin device the layer owns while a reset is under way, to be deleted: the new
    /// device until the record takes it (a crash rolls the reset back), then the old one (a
    /// crash rolls it forward). Written before the pool is touched, so neither device is
    /// ever unowned. A commit names the layer's spare here too, which it no longer needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarding: Option<ThinId>,
    /// A snapshot of the parent made ahead for the layer's next reset to its parent, which
    /// then takes it with one record write and no pool message. Written before the pool is
    /// touched, so it may name a device a crash kept from being made: the next start drops
    /// it unless the pool has it. The parent is committed, so the spare never goes stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spare: Option<ThinId>,
    /// On a pool shared by hosts: the version of the layer's catalog entry this record last
    /// agreed with (`None`: never in a catalog). A start tells by it whether the catalog or
    /// this record has the newer facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_version: Option<u64>,
}

impl LayerRecord {
    /// The record of a layer about to be made on thin `thin_id`: `creating`, a base (no
    /// parent), writable, unlabelled, inactive, unmounted, nothing under way. Callers set
    /// what differs.
    pub fn creating(
        name: LayerName,
        thin_id: ThinId,
        size: ByteSize,
        filesystem: FsType,
        fs_uuid: String,
        created_ns: u64,
    ) -> LayerRecord {
        LayerRecord {
            format: RECORD_FORMAT,
            name,
            thin_id,
            parent: None,
            size,
            filesystem,
            fs_uuid,
            committed: false,
            labels: BTreeMap::new(),
            created_ns,
            state: LayerState::Creating,
            active: false,
            mounts: BTreeMap::new(),
            deferred: false,
            missing: false,
            snapshot: None,
            resizing_to: None,
            content_id: None,
            checkpoint_of: None,
            discarding: None,
            spare: None,
            shared_version: None,
        }
    }

    /// Name the spare as the device to discard, unless that slot holds another still: a layer
    /// that will never be reset lets its spare go. Returns the spare let go.
    pub fn let_spare_go(&mut self) -> Option<ThinId> {
        if self.discarding.is_some() {
            return None;
        }
        self.discarding = self.spare.take();
        self.discarding
    }

    /// The thin devices the record owns: its own, one a reset is discarding, and a spare
    /// made ahead for the next reset.
    pub fn thin_ids(&self) -> impl Iterator<Item = ThinId> {
        std::iter::once(self.thin_id)
            .chain(self.discarding)
            .chain(self.spare)
    }

    /// The size to activate the device at: a resize under way may have grown it already.
    pub fn device_size(&self) -> ByteSize {
        self.resizing_to.map_or(self.size, |to| to.max(self.size))
    }
}

/// What kind of containerd snapshot a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Writable, from Prepare; becomes committed by Commit.
    Active,
    /// Read-only, from View.
    View,
    /// Read-only for good, a parent for others.
    Committed,
}

/// A containerd snapshot's identity: its key in its namespace's key space. The key is any
/// string; it never becomes a device or file name (the layer's name is thinstack's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The containerd namespace (the `containerd-namespace` gRPC header).
    pub namespace: String,
    /// The snapshot's key (active and view snapshots) or name (committed ones).
    pub key: String,
    /// Active, view or committed.
    pub kind: SnapshotKind,
    /// When containerd last changed it (created, committed, labels updated); nanoseconds
    /// since the Unix epoch.
    pub updated_ns: u64,
}

/// A pool message about to be sent, recorded first so a crash can be reconciled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PoolOp {
    /// `create_thin <id>`
    CreateThin {
        /// New thin id.
        id: ThinId,
    },
    /// `create_snap <id> <origin>`
    Snapshot {
        /// Origin thin id.
        origin: ThinId,
        /// New thin id.
        id: ThinId,
    },
    /// `delete <id>`
    Delete {
        /// Thin id to delete.
        id: ThinId,
    },
}

impl PoolOp {
    /// The message that makes thin `id`: a snapshot of `origin`, or a new empty device.
    pub fn make(id: ThinId, origin: Option<ThinId>) -> PoolOp {
        match origin {
            Some(origin) => PoolOp::Snapshot { origin, id },
            None => PoolOp::CreateThin { id },
        }
    }

    /// The thin id the message makes or deletes.
    pub fn id(&self) -> ThinId {
        match self {
            PoolOp::CreateThin { id } | PoolOp::Snapshot { id, .. } | PoolOp::Delete { id } => *id,
        }
    }
}

/// The intent of a pool message in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The transaction id the pool gets once the message is done.
    pub new_transaction_id: u64,
    /// The message.
    pub op: PoolOp,
    /// The layer it is for, if any (orphan clean-up has none).
    pub layer: Option<LayerName>,
}

/// The engine's view of the pool's transaction id, and the message in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// Record format.
    pub format: u32,
    /// The pool's transaction id after the last completed message.
    pub transaction_id: u64,
    /// Next thin id to try (ids are handed out in increasing order, wrapping at 2^24).
    pub next_thin_id: u32,
    /// The message in flight, if any.
    pub pending: Option<Intent>,
    /// Thin devices of removed layers, still to be discarded and deleted: a removal answers
    /// once its layer's record is gone, and the deferred work deletes these after it. The
    /// queue owns them until then, so no start-up takes them for strangers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleting: Vec<Deletion>,
}

/// The thin device of a removed layer, queued for deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    /// The device.
    pub thin_id: ThinId,
    /// Its size, to discard its blocks first.
    pub size: ByteSize,
    /// Whether its blocks are discarded before the delete (`layers.discard_on_remove`).
    pub discard: bool,
}

impl TxnRecord {
    /// Whether thin device `id` is queued for deletion.
    pub fn is_deleting(&self, id: ThinId) -> bool {
        self.deleting.iter().any(|d| d.thin_id == id)
    }

    /// Take thin device `id` off the deletion queue; returns whether it was there.
    pub fn unqueue(&mut self, id: ThinId) -> bool {
        let queued = self.deleting.len();
        self.deleting.retain(|d| d.thin_id != id);
        self.deleting.len() != queued
    }
}

impl Default for TxnRecord {
    fn default() -> Self {
        TxnRecord {
            format: RECORD_FORMAT,
            transaction_id: 0,
            next_thin_id: 1,
            pending: None,
            deleting: Vec::new(),
        }
    }
}

/// The exclusive lock on a state directory: one thinstack process per directory.
#[derive(Debug)]
pub struct StateLock {
    _lock: nix::fcntl::Flock<File>,
}

impl StateLock {
    /// Take the lock on `state_dir` (creating the directory), or fail at once with `Busy`
    /// when another process holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock> {
        ensure_private_dir(state_dir)?;
        let lock_path = state_dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    Error::new(
                        crate::ErrorKind::Busy,
                        format!(
                            "state directory {} is in use by another thinstack process (it holds {}); stop it first",
                            state_dir.display(),
                            lock_path.display()
                        ),
                    )
                } else {
                    Error::io(format!("locking {}", lock_path.display()), errno.into())
                }
            })?;
        Ok(StateLock { _lock: lock })
    }
}

/// The records of one state directory, held under its [`StateLock`].
///
/// Layout: `<state_dir>/layers/<name>.json` per layer, `<state_dir>/txn.json`,
/// `<state_dir>/journal` (the changes since the files were last brought up to date: see
/// [`journal`]), `<state_dir>/lock`.
#[derive(Debug)]
pub struct RecordStore {
    files: Checkpoint,
    journal: Journal,
    _lock: StateLock,
}

impl RecordStore {
    /// Open the records under `state_dir`, creating the directories, taking the lock, sweeping
    /// temporary files a crash left, and replaying the journal.
    ///
    /// Returns a `Busy` error when another process holds the state directory.
    pub fn open(state_dir: &Path) -> Result<RecordStore> {
        RecordStore::open_locked(state_dir, StateLock::acquire(state_dir)?)
    }

    /// [`RecordStore::open`] with the lock taken already.
    pub fn open_locked(state_dir: &Path, lock: StateLock) -> Result<RecordStore> {
        let layers_dir = state_dir.join("layers");
        ensure_private_dir(&layers_dir)?;
        let swept = sweep_temp(&layers_dir)? + sweep_temp(state_dir)?;
        if swept > 0 {
            tracing::info!(swept, "removed temporary record files left by a crash");
        }
        Ok(RecordStore {
            files: Checkpoint {
                layers_dir,
                txn_path: state_dir.join("txn.json"),
            },
            journal: Journal::open(&state_dir.join("journal"))?,
            _lock: lock,
        })
    }

    /// Every layer record: the files, with the journal's changes over them. Files are read
    /// and parsed on every core (with 10,000 layers this was a sixth of start-up on one); a
    /// file the journal has a newer record for is not read.
    pub fn load_layers(&self) -> Result<BTreeMap<LayerName, LayerRecord>> {
        let layers_dir = &self.files.layers_dir;
        let listing = |e| Error::io(format!("listing {}", layers_dir.display()), e);
        let dir = File::open(layers_dir).map_err(listing)?;
        let mut names = Vec::new();
        self.journal.with_pending(|pending| -> Result<()> {
            for entry in fs::read_dir(layers_dir).map_err(listing)? {
                let name = entry.map_err(listing)?.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                let changed = LayerName::new(stem).is_ok_and(|n| pending.layers.contains_key(&n));
                if !changed {
                    names.push(name);
                }
            }
            Ok(())
        })?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = names.len().div_ceil(threads).max(64);
        let dir_fd = dir.as_fd();
        let parsed: Vec<Result<Vec<LayerRecord>>> = std::thread::scope(|scope| {
            let readers: Vec<_> = names
                .chunks(chunk)
                .map(|part| scope.spawn(move || read_records(layers_dir, dir_fd, part)))
                .collect();
            readers
                .into_iter()
                .map(|reader| reader.join().expect("a record reader panicked"))
                .collect()
        });
        let mut layers = BTreeMap::new();
        for part in parsed {
            for record in part? {
                layers.insert(record.name.clone(), record);
            }
        }
        self.journal.with_pending(|pending| {
            for record in pending.layers.values().flatten() {
                layers.insert(record.name.clone(), record.clone());
            }
        });
        Ok(layers)
    }

    /// Write a layer record durably.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn put_layer(&self, record: &LayerRecord) -> Result<()> {
        self.change(Change::layer(record), Durability::Now)
    }

    /// Write a layer record, durable with the next durable change (see [`journal`] for when
    /// that is enough).
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn stage_layer(&self, record: &LayerRecord) -> Result<()> {
        self.change(Change::layer(record), Durability::WithNext)
    }

    /// Drop a layer record durably.
    pub fn remove_layer(&self, name: &LayerName) -> Result<()> {
        self.change(Change::Dropped { name: name.clone() }, Durability::Now)
    }

    /// The transaction record, if one was written.
    pub fn load_txn(&self) -> Result<Option<TxnRecord>> {
        match self.journal.with_pending(|pending| pending.txn.clone()) {
            Some(txn) => Ok(Some(txn)),
            None => read_json(&self.files.txn_path),
        }
    }

    /// Write the transaction record durably.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn put_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.change(Change::Txn { txn: txn.clone() }, Durability::Now)
    }

    /// Write the transaction record, durable with the next durable change.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn stage_txn(&self, txn: &TxnRecord) -> Result<()> {
        self.change(Change::Txn { txn: txn.clone() }, Durability::WithNext)
    }

    fn change(&self, change: Change, durability: Durability) -> Result<()> {
        self.journal.append(change, durability, &self.files)
    }

    /// Bring the record files up to date and empty the journal, durably (at a clean stop:
    /// the files alone then hold every record, for a reader or an editor).
    pub fn close(&self) -> Result<()> {
        self.journal.close(&self.files)
    }

    /// Bytes of the journal a power cut now would leave.
    #[cfg(test)]
    pub fn durable_journal_len(&self) -> u64 {
        self.journal.durable_len()
    }

    /// Drop the transaction record, the journal and the layer-record directory when it is
    /// empty (after the pool is destroyed); anything else left in that directory stays.
    pub fn clear(&self) -> Result<()> {
        self.journal.close(&self.files)?;
        remove(&self.files.txn_path)?;
        remove(self.journal.path())?;
        let _ = fs::remove_dir(&self.files.layers_dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.json");
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
        write_json(&path, &vec![1, 2]).unwrap();
        write_json(&path, &vec![3]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), Some(vec![3]));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!temp_path(&path).exists());
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
    }

    #[test]
    fn damaged_record_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.json");
        fs::write(&path, b"{not json").unwrap();
        let err = read_json::<Vec<u32>>(&path).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Inconsistent);
        assert!(err.to_string().contains("pool.json"), "{err}");
    }

    #[test]
    fn leftover_temp_files_are_swept_and_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json.tmp"), b"x").unwrap();
        fs::write(dir.path().join("a.json"), b"[]").unwrap();
        assert_eq!(sweep_temp(dir.path()).unwrap(), 1);
        assert!(dir.path().join("a.json").exists());
    }

    #[test]
    fn a_second_store_on_one_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = RecordStore::open(dir.path()).unwrap();
        let err = RecordStore::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Busy);
        assert!(
            err.to_string()
                .contains("in use by another thinstack process"),
            "{err}"
        );
        drop(first);
        RecordStore::open(dir.path()).unwrap();
    }

    #[test]
    fn layer_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let record = LayerRecord {
            format: RECORD_FORMAT,
            name: LayerName::new("base").unwrap(),
            thin_id: ThinId::new(1).unwrap(),
            parent: None,
            size: ByteSize::gib(10),
            filesystem: FsType::Ext4,
            fs_uuid: "u".into(),
            committed: false,
            labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
            created_ns: 1,
            state: LayerState::Ready,
            active: false,
            mounts: BTreeMap::new(),
            deferred: false,
            missing: false,
            snapshot: None,
            resizing_to: None,
            content_id: Some(ContentId::new("0123456789abcdef0123456789abcdef").unwrap()),
            checkpoint_of: Some(LayerName::new("work").unwrap()),
            discarding: Some(ThinId::new(2).unwrap()),
            spare: Some(ThinId::new(4).unwrap()),
            shared_version: Some(3),
        };
        store.put_layer(&record).unwrap();
        fs::write(dir.path().join("layers/stray.json.tmp"), b"x").unwrap();
        let layers = store.load_layers().unwrap();
        assert_eq!(layers.values().collect::<Vec<_>>(), [&record]);
        store.remove_layer(&record.name).unwrap();
        assert!(store.load_layers().unwrap().is_empty());
    }

    #[test]
    fn private_dirs_are_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        ensure_private_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
