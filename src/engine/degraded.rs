//! Degraded layers: one layer whose settling at start fails (its reactivation, the roll-back
//! of its half-made create, the end of its half-done removal), or whose failed create could not
//! be undone, is marked with the reason, and its operations are refused until it is repaired;
//! the engine serves every other layer.
//! Marks live in memory: a restart, or `pool doctor --repair`, tries the step again.

use super::{Engine, LayerGuard, Removal};
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::{FsKernel, PoolKernel};
use crate::names::LayerName;
use crate::records::LayerState;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Run `step` for layer `name` at start; a failure marks the layer degraded instead of
    /// keeping every other layer down.
    pub(super) fn settle_or_degrade(
        &self,
        name: &LayerName,
        what: &str,
        step: impl FnOnce() -> Result<()>,
    ) {
        if let Err(e) = step() {
            self.degrade(name, format!("{what} failed at start: {e}"));
        }
    }

    /// Mark layer `name` degraded for `reason`: its operations are refused, and `pool doctor`
    /// lists it, until a repair (or the next start) settles it.
    pub(super) fn degrade(&self, name: &LayerName, reason: String) {
        tracing::error!(layer = %name, reason = %reason, "layer degraded: its operations are refused until `thinstack pool doctor --repair` settles it");
        self.index().degraded.insert(name.clone(), reason.clone());
        self.emit(Some(name), super::EventKind::LayerDegraded { reason });
    }

    /// Check `name` and hold its lock, refusing a degraded layer.
    pub(super) fn lock_healthy(&self, name: &str) -> Result<(LayerName, LayerGuard<'_>)> {
        let (name, guard) = self.lock_layer(name)?;
        self.ensure_not_degraded(&name)?;
        Ok((name, guard))
    }

    pub(super) fn ensure_not_degraded(&self, name: &LayerName) -> Result<()> {
        match self.index().degraded.get(name) {
            None => Ok(()),
            Some(reason) => Err(Error::new(
                ErrorKind::Inconsistent,
                format!(
                    "layer {name:?} is degraded ({reason}); its operations are refused until \
                     `thinstack pool doctor --repair` settles it (fix what the reason names first)"
                ),
            )),
        }
    }

    /// The degraded layers and why.
    pub fn degraded_layers(&self) -> Vec<(LayerName, String)> {
        let index = self.index();
        index
            .degraded
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// Try the failed start step of degraded layer `name` again; on success it is healthy.
    pub fn repair_degraded(&self, name: &LayerName) -> Result<()> {
        let (name, _guard) = self.lock_layer(name.as_str())?;
        let record = self.record(&name)?;
        match record.state {
            LayerState::Creating => self.undo_create(&name)?,
            LayerState::Removing => {
                if self.finish_removal(record, false)? == Removal::Deferred {
                    tracing::info!(layer = %name, "removal deferred until the device is released");
                }
            }
            LayerState::Ready => {
                let record = self.drop_spare(self.finish_discarding(record)?)?;
                self.settle_activation(&record)?;
            }
        }
        self.index().degraded.remove(&name);
        tracing::warn!(layer = %name, "degraded layer repaired");
        Ok(())
    }
}
