//! Events: one for each change a client may want to wait on instead of polling, sent to
//! every subscriber (`GET /v1/events`). Sending never blocks an operation: a subscriber that
//! falls more than [`EVENTS_BUFFERED`] behind is told how many it lost.

use std::path::PathBuf;

use tokio::sync::broadcast;

use super::*;

/// Events held for a subscriber that has not read them yet.
pub const EVENTS_BUFFERED: usize = 4096;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A layer was made (by a create, or by containerd's commit).
    LayerCreated,
    /// A layer became read-only for good.
    LayerCommitted,
    /// A layer was mounted at `target` (a further user of a mount is no event).
    LayerMounted {
        /// Where.
        target: PathBuf,
        /// Mounted read-only.
        read_only: bool,
    },
    /// A layer's mount at `target` went.
    LayerUnmounted {
        /// Where.
        target: PathBuf,
    },
    /// A layer grew to `size`.
    LayerResized {
        /// Its size now.
        size: ByteSize,
    },
    /// A layer is gone, with its thin device.
    LayerRemoved,
    /// A layer was given the content of its parent or of a checkpoint of it.
    LayerReset,
    /// A layer's removal waits until its device is released.
    LayerRemovalDeferred,
    /// A layer's operations are refused until it is repaired.
    LayerDegraded {
        /// Why.
        reason: String,
    },
    /// The pool grew (by a client, or by thinstackd itself).
    PoolExtended {
        /// Its data now.
        data: ByteSize,
        /// Its metadata now.
        metadata: ByteSize,
        /// thinstackd grew it by itself.
        automatic: bool,
    },
    /// thinstackd made the pool read-only: its metadata is nearly full.
    PoolGuardOn,
    /// The pool is writable again.
    PoolGuardOff,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The layer it is about, if any.
    pub layer: Option<LayerName>,
    /// What changed.
    pub kind: EventKind,
}

/// Where events go: every subscriber's queue.
pub(super) struct Events(broadcast::Sender<Event>);

impl Events {
    pub(super) fn new() -> Events {
        Events(broadcast::channel(EVENTS_BUFFERED).0)
    }
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// A queue of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.0.subscribe()
    }

    /// Tell the subscribers (none listening is no error).
    pub fn emit(&self, layer: Option<&LayerName>, kind: EventKind) {
        let _ = self.events.0.send(Event {
            time_ns: now_ns(),
            layer: layer.cloned(),
            kind,
        });
    }
}
