//! The records' journal: an append-only file of record changes, so that an operation makes
//! everything it wrote durable with one `fdatasync`, where a file per record costs two fsyncs
//! (the file, then its directory) each.
//!
//! - A change is a whole record put, a layer record dropped, or the whole transaction record
//!   put. Replaying the changes in order over the record files gives the current records, and
//!   replaying them again gives the same (each change states a result, not a difference).
//! - A frame is the payload's length (u32, little-endian), the first 16 bytes of its BLAKE3
//!   digest, and the payload, a [`Change`] as compact JSON. A frame that is short or does not
//!   match its digest ends the journal: it is the tail of an append a power cut interrupted.
//!   Nothing after a synced frame can be lost, because a sync covers every byte before it.
//! - A change is either synced before the call returns, or staged: written, and durable with
//!   the next sync (a process killed meanwhile loses nothing, as the page cache keeps it; a
//!   power cut may drop it). The engine stages only what no kernel change depends on until
//!   its next synced write: every pool message is preceded by a synced intent, and every
//!   answer by a synced change.
//! - A checkpoint writes the current record of each layer changed since the last one into its
//!   file under `layers/` (and `txn.json`), makes them durable with one `syncfs`, and empties
//!   the journal. It runs once the journal holds [`CHECKPOINT_AFTER`] changes, at a clean stop,
//!   and before the records are cleared. A crash during one loses nothing: the journal is
//!   emptied only after the files are durable, and replaying it over them is harmless.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};

use super::{LayerRecord, TxnRecord};
use crate::error::{Error, Result};
use crate::names::LayerName;

/// Changes the journal holds before a checkpoint folds them into the record files.
pub const CHECKPOINT_AFTER: usize = 1024;

const DIGEST_LEN: usize = 16;
const HEADER_LEN: usize = 4 + DIGEST_LEN;
/// No record comes near this; a larger length is a torn or damaged frame.
const MAX_PAYLOAD: usize = 16 << 20;

/// One change to the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A layer's record, whole.
    Layer {
        /// The record.
        record: Box<LayerRecord>,
    },
    /// A layer's record is gone.
    Dropped {
        /// The layer.
        name: LayerName,
    },
    /// The transaction record, whole.
    Txn {
        /// The record.
        txn: TxnRecord,
    },
}

impl Change {
    /// A layer's record put, whole.
    pub fn layer(record: &LayerRecord) -> Change {
        Change::Layer {
            record: Box::new(record.clone()),
        }
    }
}

/// Whether a change must be durable before the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before the call returns.
    Now,
    /// Durable with the next synced change (see the module docs for when that is safe).
    WithNext,
}

/// The changes since the last checkpoint: each layer's latest record (`None` when dropped)
/// and the latest transaction record.
#[derive(Debug, Default)]
pub struct Pending {
    /// Layers changed, by name.
    pub layers: BTreeMap<LayerName, Option<LayerRecord>>,
    /// The transaction record, when it changed.
    pub txn: Option<TxnRecord>,
}

impl Pending {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Layer { record } => {
                self.layers.insert(record.name.clone(), Some(*record));
            }
            Change::Dropped { name } => {
                self.layers.insert(name, None);
            }
            Change::Txn { txn } => self.txn = Some(txn),
        }
    }
}

/// Where the record files of a checkpoint go.
#[derive(Debug)]
pub struct Checkpoint {
    /// `layers/`, one `<name>.json` per layer.
    pub layers_dir: PathBuf,
    /// `txn.json`.
    pub txn_path: PathBuf,
}

#[derive(Debug)]
struct Tail {
    /// Where the next frame goes.
    len: u64,
    /// Changes since the last checkpoint.
    changes: usize,
    pending: Pending,
}

/// The open journal of one state directory.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    tail: Mutex<Tail>,
    /// Set when a write or sync failed in a way that leaves the journal's durable content
    /// unknown: every later change is refused. Not under a lock, so that setting it takes no
    /// lock in any order.
    broken: OnceLock<String>,
    /// Bytes ever appended (not reset by checkpoints), and how many of them are durable.
    written: AtomicU64,
    synced: Mutex<u64>,
}

impl Journal {
    /// Open (or create) the journal at `path` and replay it. A torn tail is cut off, after
    /// being copied beside the journal unless it is only zeros.
    pub fn open(path: &Path) -> Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("opening the records journal {}", path.display()), e))?;
        let mut bytes = Vec::new();
        (&file)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("reading the records journal {}", path.display()), e))?;
        let (changes, good) = parse(&bytes, path)?;
        if good < bytes.len() {
            keep_torn_tail(path, &bytes[good..])?;
            file.set_len(good as u64)
                .and_then(|()| file.sync_data())
                .map_err(|e| {
                    Error::io(format!("cutting the torn tail of {}", path.display()), e)
                })?;
        }
        let mut pending = Pending::default();
        let count = changes.len();
        for change in changes {
            pending.apply(change);
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            tail: Mutex::new(Tail {
                len: good as u64,
                changes: count,
                pending,
            }),
            broken: OnceLock::new(),
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
        })
    }

    /// Where the journal is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the changes not yet in the record files.
    pub fn with_pending<R>(&self, f: impl FnOnce(&Pending) -> R) -> R {
        f(&self.tail().pending)
    }

    /// Append `change`; with [`Durability::Now`], return once it (and everything before it)
    /// is durable. A due checkpoint is taken in place of the sync, `at` saying where.
    pub fn append(&self, change: Change, durability: Durability, at: &Checkpoint) -> Result<()> {
        let frame = encode(&change);
        let (end, due) = {
            let mut tail = self.tail();
            if let Some(why) = self.broken.get() {
                return Err(broken(&self.path, why));
            }
            if let Err(e) = self.file.write_all_at(&frame, tail.len) {
                // Nothing past `len` counts; cut what part of the frame got there, so the
                // next frame follows the last whole one.
                if let Err(cut) = self.file.set_len(tail.len) {
                    let _ = self
                        .broken
                        .set(format!("a failed append could not be cut off: {cut}"));
                }
                return Err(Error::io(
                    format!("appending to the records journal {}", self.path.display()),
                    e,
                ));
            }
            tail.len += frame.len() as u64;
            tail.changes += 1;
            tail.pending.apply(change);
            let end =
                self.written.fetch_add(frame.len() as u64, Ordering::SeqCst) + frame.len() as u64;
            (end, tail.changes >= CHECKPOINT_AFTER)
        };
        match durability {
            Durability::WithNext => Ok(()),
            Durability::Now if due => self.checkpoint(at).or_else(|e| {
                // The change is in the journal already: it must not fail for want of a
                // checkpoint, which the next change due tries again.
                tracing::warn!(error = %e, "folding the records journal into the record files failed; the journal keeps every change until a checkpoint succeeds");
                self.sync_to(end)
            }),
            Durability::Now => self.sync_to(end),
        }
    }

    /// Make the first `end` bytes ever appended durable. One sync serves every caller whose
    /// bytes were written before it began (group commit).
    fn sync_to(&self, end: u64) -> Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self.broken.get() {
            return Err(broken(&self.path, why));
        }
        if *synced >= end {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        if let Err(e) = self.file.sync_data() {
            // After a failed sync the kernel may have dropped the dirty pages: what is
            // durable is unknown, so nothing more is written until a restart re-reads it.
            let _ = self.broken.set(format!("a sync failed: {e}"));
            return Err(Error::io(
                format!("syncing the records journal {}", self.path.display()),
                e,
            ));
        }
        *synced = target;
        Ok(())
    }

    /// Write every pending record into its file, make them durable, and empty the journal.
    pub fn checkpoint(&self, at: &Checkpoint) -> Result<()> {
        let mut tail = self.tail();
        if let Some(why) = self.broken.get() {
            return Err(broken(&self.path, why));
        }
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if tail.changes == 0 {
            return Ok(());
        }
        write_files(&tail.pending, at)?;
        // One call makes every file, rename and removal above durable.
        let dir = File::open(&at.layers_dir)
            .map_err(|e| Error::io(format!("opening {}", at.layers_dir.display()), e))?;
        nix::unistd::syncfs(&dir).map_err(|e| {
            // As after a failed fdatasync: the journal's last changes may be lost with the
            // files', so nothing more is written until a restart re-reads what is durable.
            let _ = self.broken.set(format!("syncing a checkpoint failed: {e}"));
            Error::io(
                format!("syncing the records in {}", at.layers_dir.display()),
                std::io::Error::from(e),
            )
        })?;
        // The files hold everything now. Emptying the journal needs no sync of its own: a
        // crash before it is durable replays changes the files already have.
        self.file.set_len(0).map_err(|e| {
            Error::io(
                format!("emptying the records journal {}", self.path.display()),
                e,
            )
        })?;
        tail.len = 0;
        tail.changes = 0;
        tail.pending = Pending::default();
        *synced = self.written.load(Ordering::SeqCst);
        Ok(())
    }

    /// Checkpoint, then make the emptied journal durable too (a clean stop: a record edited by
    /// hand afterwards is not overridden by a replay).
    pub fn close(&self, at: &Checkpoint) -> Result<()> {
        self.checkpoint(at)?;
        self.file.sync_all().map_err(|e| {
            Error::io(
                format!("syncing the records journal {}", self.path.display()),
                e,
            )
        })
    }

    /// Bytes of the journal known to be durable; what a power cut now would leave.
    #[cfg(test)]
    pub fn durable_len(&self) -> u64 {
        let tail = self.tail();
        let synced = *self.synced.lock().unwrap();
        let unsynced = self.written.load(Ordering::SeqCst) - synced;
        tail.len - unsynced.min(tail.len)
    }
}

fn broken(path: &Path, why: &str) -> Error {
    Error::new(
        crate::error::ErrorKind::Io,
        format!(
            "the records journal {} takes no more changes ({why}); restart thinstackd: it \
             re-reads what is durable and settles the rest",
            path.display()
        ),
    )
}

fn encode(change: &Change) -> Vec<u8> {
    let payload = serde_json::to_vec(change).expect("records always serialize");
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len() + 1);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&blake3::hash(&payload).as_bytes()[..DIGEST_LEN]);
    frame.extend_from_slice(&payload);
    frame
}

/// The whole frames of `bytes` as changes, and how many bytes they take. A frame whose
/// digest matches but whose change does not parse was written by another version: refused,
/// never cut off.
fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<Change>, usize)> {
    let mut changes = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER_LEN {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let start = at + HEADER_LEN;
        if len == 0 || len > MAX_PAYLOAD || bytes.len() - start < len {
            break;
        }
        let payload = &bytes[start..start + len];
        if blake3::hash(payload).as_bytes()[..DIGEST_LEN] != bytes[at + 4..start] {
            break;
        }
        let change = serde_json::from_slice(payload).map_err(|e| {
            Error::inconsistent(format!(
                "the records journal {} holds a change at byte {at} that this thinstack cannot \
                 read ({e}); run the thinstackd that wrote it, or move the journal aside and \
                 check the layers with `thinstack pool doctor`",
                path.display()
            ))
        })?;
        changes.push(change);
        at = start + len;
    }
    Ok((changes, at))
}

/// Keep a torn tail beside the journal, for whoever wants to look (it was never synced, so
/// nothing depended on it).
fn keep_torn_tail(path: &Path, torn: &[u8]) -> Result<()> {
    if torn.iter().all(|&b| b == 0) {
        tracing::info!(
            bytes = torn.len(),
            "cut a zeroed tail off the records journal"
        );
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = path.with_file_name(format!("journal.torn-{now}"));
    super::write_atomic(&aside, torn)?;
    tracing::warn!(bytes = torn.len(), kept = %aside.display(), "the records journal ended in a torn change (an append cut by a crash, never synced); cut off and kept aside");
    Ok(())
}

/// Write each pending record into its file (each atomically, by rename; durable only with
/// the caller's sync), or remove the file of a dropped one.
fn write_files(pending: &Pending, at: &Checkpoint) -> Result<()> {
    for (name, record) in &pending.layers {
        let path = super::layer_file(&at.layers_dir, name);
        match record {
            Some(record) => super::write_json_unsynced(&path, record)?,
            None => match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("removing record {}", path.display()), e));
                }
                _ => {}
            },
        }
    }
    if let Some(txn) = &pending.txn {
        super::write_json_unsynced(&at.txn_path, txn)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::ThinId;
    use crate::records::{LayerState, RecordStore};
    use crate::units::ByteSize;
    use crate::vocab::FsType;

    fn record(name: &str, id: u32) -> LayerRecord {
        let mut record = LayerRecord::creating(
            LayerName::new(name).unwrap(),
            ThinId::new(id).unwrap(),
            ByteSize::gib(1),
            FsType::Ext4,
            "uuid".into(),
            1,
        );
        record.state = LayerState::Ready;
        record
    }

    fn names(store: &RecordStore) -> Vec<String> {
        let layers = store.load_layers().unwrap();
        layers.keys().map(|n| n.to_string()).collect()
    }

    /// Put `count` versions of `record` (each a change), leaving it at the last.
    fn put_versions(store: &RecordStore, record: &mut LayerRecord, count: usize) {
        for n in 0..count {
            record.created_ns = n as u64;
            store.put_layer(record).unwrap();
        }
    }

    fn torn_tails_kept(dir: &Path) -> Vec<fs::DirEntry> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("journal.torn-"))
            .collect()
    }

    fn journal_len(dir: &Path) -> u64 {
        fs::metadata(dir.join("journal")).unwrap().len()
    }

    #[test]
    fn changes_live_in_the_journal_until_a_clean_close_folds_them_into_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.put_layer(&record("a", 1)).unwrap();
        store.put_layer(&record("b", 2)).unwrap();
        store.remove_layer(&LayerName::new("a").unwrap()).unwrap();
        let txn = TxnRecord {
            transaction_id: 7,
            ..TxnRecord::default()
        };
        store.stage_txn(&txn).unwrap();
        assert!(!dir.path().join("layers/b.json").exists());
        drop(store);

        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(names(&store), ["b"]);
        assert_eq!(store.load_txn().unwrap(), Some(txn.clone()));
        store.close().unwrap();
        assert_eq!(journal_len(dir.path()), 0);
        assert!(dir.path().join("layers/b.json").exists());
        assert!(!dir.path().join("layers/a.json").exists());
        drop(store);

        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(names(&store), ["b"]);
        assert_eq!(store.load_txn().unwrap(), Some(txn));
    }

    #[test]
    fn a_newer_record_in_the_journal_wins_over_its_file_even_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.put_layer(&record("a", 1)).unwrap();
        store.close().unwrap();
        let mut newer = record("a", 1);
        newer.committed = true;
        store.put_layer(&newer).unwrap();
        drop(store);
        fs::write(dir.path().join("layers/a.json"), b"{damaged").unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let layers = store.load_layers().unwrap();
        assert_eq!(layers.values().collect::<Vec<_>>(), [&newer]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.put_layer(&record("a", 1)).unwrap();
        let whole = journal_len(dir.path());
        store.put_layer(&record("b", 2)).unwrap();
        drop(store);
        // The second append got only part of the way to the disk.
        let journal = OpenOptions::new()
            .write(true)
            .open(dir.path().join("journal"))
            .unwrap();
        let torn = journal_len(dir.path()) - 10;
        journal.set_len(torn).unwrap();

        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(names(&store), ["a"]);
        assert_eq!(journal_len(dir.path()), whole);
        let kept = torn_tails_kept(dir.path());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].metadata().unwrap().len(), torn - whole);
        // New changes follow the last whole one.
        store.put_layer(&record("c", 3)).unwrap();
        drop(store);
        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(names(&store), ["a", "c"]);
    }

    #[test]
    fn a_zeroed_tail_is_cut_off_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.put_layer(&record("a", 1)).unwrap();
        let whole = journal_len(dir.path());
        drop(store);
        let journal = OpenOptions::new()
            .write(true)
            .open(dir.path().join("journal"))
            .unwrap();
        journal.set_len(whole + 4096).unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(names(&store), ["a"]);
        assert_eq!(journal_len(dir.path()), whole);
        assert!(torn_tails_kept(dir.path()).is_empty());
    }

    #[test]
    fn a_whole_change_this_version_cannot_read_is_refused_not_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let payload = br#"{"change":"from_the_future"}"#;
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&blake3::hash(payload).as_bytes()[..DIGEST_LEN]);
        frame.extend_from_slice(payload);
        fs::write(dir.path().join("journal"), &frame).unwrap();
        let err = RecordStore::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Inconsistent, "{err}");
        assert!(err.to_string().contains("journal"), "{err}");
        assert_eq!(journal_len(dir.path()), frame.len() as u64);
    }

    #[test]
    fn staged_changes_become_durable_with_the_next_synced_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        store.stage_layer(&record("a", 1)).unwrap();
        assert_eq!(store.durable_journal_len(), 0);
        store.put_layer(&record("b", 2)).unwrap();
        assert_eq!(store.durable_journal_len(), journal_len(dir.path()));
        store.stage_layer(&record("c", 3)).unwrap();
        assert!(store.durable_journal_len() < journal_len(dir.path()));
    }

    #[test]
    fn a_checkpoint_that_fails_fails_no_change_and_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let mut a = record("a", 1);
        put_versions(&store, &mut a, CHECKPOINT_AFTER - 1);
        // The record files cannot be written (a file where their directory was).
        let layers = dir.path().join("layers");
        let aside = dir.path().join("layers.aside");
        fs::rename(&layers, &aside).unwrap();
        fs::write(&layers, b"").unwrap();
        a.created_ns = u64::MAX;
        store.put_layer(&a).unwrap();
        assert!(journal_len(dir.path()) > 0, "the journal keeps the changes");
        assert_eq!(store.durable_journal_len(), journal_len(dir.path()));
        drop(store);
        fs::remove_file(&layers).unwrap();
        fs::rename(&aside, &layers).unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(store.load_layers().unwrap()[&a.name], a);
    }

    #[test]
    fn the_journal_is_folded_into_the_files_after_so_many_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let mut a = record("a", 1);
        put_versions(&store, &mut a, CHECKPOINT_AFTER);
        assert_eq!(journal_len(dir.path()), 0);
        let file: LayerRecord = crate::records::read_json(&dir.path().join("layers/a.json"))
            .unwrap()
            .unwrap();
        assert_eq!(file, a);
        assert_eq!(store.durable_journal_len(), 0);
        drop(store);
        let store = RecordStore::open(dir.path()).unwrap();
        assert_eq!(store.load_layers().unwrap()[&a.name], a);
    }
}
