//! How many layers stand how, for the metrics: counted from the records in memory and one
//! question to the kernel (which devices are active), never by viewing every layer.

use super::*;

/// Layers counted by their record's state, and by what else holds for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerCounts {
    /// Being made.
    pub creating: usize,
    /// Usable.
    pub ready: usize,
    /// Being removed.
    pub removing: usize,
    /// Refused until repaired (their settling at start failed).
    pub degraded: usize,
    /// Their thin device is gone from the pool.
    pub missing: usize,
    /// Read-only for good.
    pub committed: usize,
    /// Mounted by thinstack somewhere.
    pub mounted: usize,
    /// Their device is active.
    pub active: usize,
    /// Their removal waits for the device to be released.
    pub deferred: usize,
    /// Thin devices of removed layers still to be deleted (no longer layers).
    pub deleting: usize,
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// The layers, counted (see [`LayerCounts`]).
    pub fn layer_counts(&self) -> Result<LayerCounts> {
        let active_ids = self.kernel.active_ids()?;
        let deleting = self.deletions_pending();
        let index = self.index();
        let mut counts = LayerCounts {
            degraded: index.degraded.len(),
            deleting,
            ..LayerCounts::default()
        };
        for record in index.layers.values() {
            match record.state {
                LayerState::Creating => counts.creating += 1,
                LayerState::Ready => counts.ready += 1,
                LayerState::Removing => counts.removing += 1,
            }
            counts.missing += usize::from(record.missing);
            counts.committed += usize::from(record.committed);
            counts.mounted += usize::from(!record.mounts.is_empty());
            counts.active += usize::from(active_ids.contains(&record.thin_id));
            counts.deferred += usize::from(record.deferred);
        }
        Ok(counts)
    }
}
