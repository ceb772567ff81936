//! Removing layers: one, a tree children first, or all; deferred while a device is busy.

use super::*;
use crate::records::Deletion;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Remove a layer and its thin device. Refused while it has children; never unmounts.
    /// A device that stays busy after brief retries is removed later, when released
    /// ([`Removal::Deferred`]).
    pub fn remove(&self, name: &str) -> Result<Removal> {
        let (name, _guard) = self.lock_healthy(name)?;
        self.remove_locked(&name)
    }

    /// [`Engine::remove`], with the layer's lock held by the caller.
    pub(super) fn remove_locked(&self, name: &LayerName) -> Result<Removal> {
        let name = name.clone();
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
        // Durable with the record's drop, or with `deferred` when the device is busy; a
        // power cut before either leaves the layer as it was.
        self.stage(removing.clone())?;
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
        // The pool is destroyed next: its devices go now, not in the background.
        self.finish_deletions()?;
        Ok(removed)
    }

    /// Forget the transaction record and the emptied layer-record directory, once the pool
    /// they describe is destroyed (its layers removed first, [`Engine::remove_all`]).
    pub fn forget_pool(&self) -> Result<()> {
        self.store.clear()
    }

    /// Bring the record files up to date from the journal (at a clean stop): the next start
    /// replays nothing, and the files alone hold every record.
    pub fn close_records(&self) -> Result<()> {
        self.store.close()
    }

    /// `name` and every layer below it, each after all of its descendants (so children are
    /// removed before their parents). A loop, not recursion: a chain tens of thousands deep
    /// needs no deeper stack, and a cycle damaged records might make is walked once.
    pub(super) fn descendants_post_order(&self, name: &LayerName) -> Vec<LayerName> {
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
    pub(super) fn finish_removal(&self, record: LayerRecord, wait: bool) -> Result<Removal> {
        // The device a reset left behind goes first, while the record still owns it.
        let record = self.finish_discarding(record)?;
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
                            self.emit(Some(&name), EventKind::LayerRemovalDeferred);
                        }
                        return Ok(Removal::Deferred);
                    }
                    other => other?,
                }
                crash::point(crash::Point::RemoveDeactivated);
            }
            // The device is inactive: its discard and delete need no client to wait.
            self.queue_deletion(Deletion {
                thin_id: id,
                size: record.size,
                discard: self.settings.discard_on_remove,
            })?;
            crash::point(crash::Point::RemoveQueued);
        }
        // A spare for a reset goes with the layer's device, deleted in the background.
        if let Some(spare) = record.spare {
            self.queue_deletion(Deletion {
                thin_id: spare,
                size: record.size,
                discard: false,
            })?;
        }
        self.remove_default_mount_point(&name);
        self.drop_record(&name)?;
        tracing::info!(layer = %name, thin_id = %id, "layer removed");
        self.emit(Some(&name), EventKind::LayerRemoved);
        if !record.missing || record.spare.is_some() {
            self.deletions_queued();
        }
        Ok(Removal::Removed)
    }

    /// The directory `mount` made for the layer goes with it (while the record still exists,
    /// so no crash leaves it behind). Only an empty directory is removed; failing to is
    /// harmless, and `pool doctor` reports what is left.
    pub(super) fn remove_default_mount_point(&self, name: &LayerName) {
        let path = self.settings.state_dir.join("mnt").join(name.as_str());
        if let Err(e) = std::fs::remove_dir(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(layer = %name, path = %path.display(), error = %e, "could not remove the layer's mount point");
            }
        }
    }

    /// Discard the blocks of inactive thin `id`, so the pool passes the discards down and a
    /// loop file gets its space back.
    pub(super) fn discard(&self, id: ThinId, size: ByteSize) -> Result<()> {
        self.kernel.activate(id, size, false)?;
        let discarded = self.kernel.discard(id);
        let deactivated = self.kernel.deactivate(id);
        discarded.and(deactivated)
    }

    /// Retry every deferred removal once, and delete the devices removals queued; returns the
    /// layers removed now.
    pub fn process_deferred(&self) -> Result<Vec<LayerName>> {
        // A read-only pool deletes nothing; they wait until it is writable.
        if self.kernel.usage_as_committed()?.health.read_only {
            return Ok(Vec::new());
        }
        self.finish_discards();
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
        self.finish_deletions()?;
        Ok(removed)
    }
}
