//! The stream's BLAKE3 digest, computed on a thread of its own once a stream is large enough to
//! gain from it: hashing then overlaps the reading and sending (or receiving and writing) of
//! the stream instead of adding to it. Small streams are hashed in place, with no thread.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Bytes handed to the hashing thread at a time.
const PIECE_BYTES: usize = 1 << 20;

/// Pieces queued for the hashing thread; a writer that gets ahead of the hash waits for it.
const PIECES_QUEUED: usize = 4;

/// The hashing thread, once started: where pieces go, where emptied ones come back (so a
/// stream of any size allocates a handful of pieces, not one per MiB), and its result.
struct Worker {
    pieces: SyncSender<Vec<u8>>,
    emptied: Receiver<Vec<u8>>,
    thread: JoinHandle<blake3::Hasher>,
}

/// A BLAKE3 hash of everything given to [`Digester::update`], in order.
pub(super) struct Digester {
    /// Bytes not handed over yet; hashed in place at the end if no thread was started.
    pending: Vec<u8>,
    worker: Option<Worker>,
}

impl Digester {
    pub(super) fn new() -> Digester {
        Digester {
            pending: Vec::new(),
            worker: None,
        }
    }

    pub(super) fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.pending.capacity() < PIECE_BYTES {
                self.pending.reserve_exact(PIECE_BYTES - self.pending.len());
            }
            let take = bytes.len().min(PIECE_BYTES - self.pending.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == PIECE_BYTES {
                self.hand_over();
            }
        }
    }

    /// The digest of everything given so far. Ends the hashing thread; the digester starts
    /// again empty.
    pub(super) fn finalize(&mut self) -> blake3::Hash {
        let pending = std::mem::take(&mut self.pending);
        match self.worker.take() {
            None => blake3::hash(&pending),
            Some(worker) => {
                let _ = worker.pieces.send(pending);
                drop(worker.pieces);
                match worker.thread.join() {
                    Ok(hasher) => hasher.finalize(),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }
    }

    /// Send the full pending piece to the hashing thread (started now if need be), and take
    /// an emptied one, if any, to fill next.
    fn hand_over(&mut self) {
        let worker = self.worker.get_or_insert_with(start_worker);
        let next = worker.emptied.try_recv().unwrap_or_default();
        let full = std::mem::replace(&mut self.pending, next);
        // The thread only ends when `pieces` is dropped, or by panicking, which finalize
        // raises again; a failed send here can only precede that.
        let _ = worker.pieces.send(full);
    }
}

fn start_worker() -> Worker {
    let (pieces, queued) = mpsc::sync_channel::<Vec<u8>>(PIECES_QUEUED);
    let (give_back, emptied) = mpsc::sync_channel::<Vec<u8>>(PIECES_QUEUED + 2);
    let thread = std::thread::Builder::new()
        .name("stream-digest".into())
        .spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for mut piece in queued {
                hasher.update(&piece);
                piece.clear();
                let _ = give_back.try_send(piece);
            }
            hasher
        })
        .expect("starting the stream's hashing thread");
    Worker {
        pieces,
        emptied,
        thread,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_blake3_of_the_bytes_however_they_are_given() {
        let bytes: Vec<u8> = (0..(3 * PIECE_BYTES + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for sizes in [
            vec![1],
            vec![4096, 17],
            vec![PIECE_BYTES],
            vec![bytes.len()],
        ] {
            let mut digester = Digester::new();
            let mut rest = &bytes[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*size).min(rest.len()));
                digester.update(now);
                rest = later;
            }
            assert_eq!(digester.finalize(), blake3::hash(&bytes), "{sizes:?}");
        }
    }

    #[test]
    fn a_small_stream_is_hashed_without_a_thread() {
        let mut digester = Digester::new();
        digester.update(b"a small stream");
        assert!(digester.worker.is_none());
        assert_eq!(digester.finalize(), blake3::hash(b"a small stream"));
    }
}
