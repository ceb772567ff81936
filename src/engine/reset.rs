//! Checkpoints and resets: a read-only snapshot of a writable layer, taken even while it is
//! mounted, and a layer given back the content of its parent or of one of its checkpoints,
//! in place (same name, labels and record), by one thin snapshot.
//!
//! A reset moves the layer to a new thin device. The record names both devices while it is
//! under way (`discarding`), so a crash at any step leaves each device owned, and the next
//! start deletes the one the record does not hold: the new one before the record took it
//! (rolled back), the old one after (finished).
//!
//! After a reset, the deferred work makes a spare: a snapshot of the parent, named by the
//! record (`spare`), which the next reset to the parent takes with one record write instead
//! of a snapshot. The parent is committed, so a spare made at any time holds what a snapshot
//! made at the reset would.

use super::*;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Take a read-only snapshot of writable layer `name`, as layer `checkpoint` with
    /// `labels`. A mounted layer's filesystem is frozen for the moment of the snapshot (the
    /// kernel suspends its device), so the checkpoint holds a clean filesystem. The
    /// checkpoint is a committed layer of its own, beside `name` (a child of `name`'s
    /// parent), so `name` can still be reset or removed.
    pub fn checkpoint(
        &self,
        name: &str,
        checkpoint: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Layer> {
        let name = LayerName::new(name)?;
        let checkpoint = LayerName::new(checkpoint)?;
        if name == checkpoint {
            return Err(Error::invalid(format!(
                "a checkpoint needs a name of its own, not {name:?}'s"
            )));
        }
        let (_origin_guard, _guard) = self.locks.lock_both(&name, &checkpoint);
        self.ensure_not_degraded(&name)?;
        let origin = self.ready_record(&name)?;
        if origin.committed {
            return Err(Error::invalid(format!(
                "layer {name:?} is committed: it never changes, so it needs no checkpoint"
            )));
        }
        if self.contains(&checkpoint) {
            self.ensure_not_degraded(&checkpoint)?;
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a layer named {checkpoint:?} exists already"),
            ));
        }
        check_labels(labels)?;
        let what = format!("checkpoint layer {name:?}");
        let usage = self.ensure_writable(&what)?;
        self.check_space(&usage)?;
        let _virtual = self.reserve_virtual(&what, &usage, origin.size)?;
        let id = self.allocate_id()?;
        let record = LayerRecord {
            parent: origin.parent.clone(),
            committed: true,
            labels: labels.clone(),
            content_id: Some(ContentId::random()?),
            checkpoint_of: Some(name.clone()),
            ..LayerRecord::creating(
                checkpoint.clone(),
                id,
                origin.size,
                origin.filesystem,
                origin.fs_uuid.clone(),
                now_ns(),
            )
        };
        let origin_id = origin.thin_id;
        let in_use = self.kernel.active_node(origin_id)?.is_some();
        let record = self
            .create_claimed(record, crash::Point::CheckpointRecordWritten, |_| {
                self.pool_step(
                    Some(&checkpoint),
                    PoolOp::Snapshot {
                        origin: origin_id,
                        id,
                    },
                )?;
                if in_use {
                    self.settle_frozen_snapshot(id, origin.size, origin.filesystem)?;
                }
                Ok(())
            })
            .map_err(|e| e.context(format!("checkpointing layer {name:?}")))?;
        tracing::info!(layer = %name, checkpoint = %checkpoint, thin_id = %id, "checkpoint taken");
        self.view(record)
    }

    /// Give writable layer `name` the content of `to`: its parent by default, or a checkpoint
    /// of it. The layer keeps its name, labels and record; it takes `to`'s size. One thin
    /// snapshot, no copying. Refused as busy while the layer is mounted, its device is held
    /// open, or it has children.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn reset(&self, name: &str, to: Option<&str>) -> Result<Layer> {
        let name = LayerName::new(name)?;
        let to = match to {
            Some(to) => LayerName::new(to)?,
            None => self.record(&name)?.parent.ok_or_else(|| {
                Error::invalid(format!(
                    "layer {name:?} is a base layer, with no parent to go back to; name one of its checkpoints with --to"
                ))
            })?,
        };
        if to == name {
            return Err(Error::invalid(format!(
                "layer {name:?} cannot be reset to itself; name its parent or a checkpoint of it"
            )));
        }
        let (_guard, _to_guard) = self.locks.lock_both(&name, &to);
        self.ensure_not_degraded(&name)?;
        // The record names one device to discard at a time: an earlier reset's goes now.
        let record = self.finish_discarding(self.ready_record(&name)?)?;
        let target = self.ready_record(&to)?;
        self.check_reset(&record, &target)?;
        let spare = record.spare.filter(|&spare| {
            record.parent.as_ref() == Some(&to)
                && target.committed
                && !self.txn().is_deleting(spare)
        });
        if spare.is_some() {
            // Taking a spare sends the pool nothing, so there is no room or health to check;
            // a change a crash left unsettled still goes first (it may be the spare's).
            self.refuse_while_intent_unsettled()?;
        } else {
            let usage = self.ensure_writable(&format!("reset layer {name:?}"))?;
            self.check_space(&usage)?;
        }
        self.release_for_reset(&record)?;
        let reset = match spare {
            Some(spare) => self.take_spare(record, &target, spare),
            None => {
                let new_id = self.allocate_id()?;
                self.switch_device(record, &target, new_id)
            }
        }
        .map_err(|e| e.context(format!("resetting layer {name:?} to {to:?}")))?;
        crash::point(crash::Point::ResetDone);
        if reset.active {
            self.ensure_active(&reset)?;
        }
        tracing::info!(layer = %name, to = %to, thin_id = %reset.thin_id, spare = spare.is_some(), "layer reset");
        self.emit(Some(&name), EventKind::LayerReset);
        self.view(reset)
    }

    /// Refuse a reset of `record` to `target` unless `target` is its parent or a checkpoint
    /// of it, and the layer is writable and free of users and children.
    fn check_reset(&self, record: &LayerRecord, target: &LayerRecord) -> Result<()> {
        let name = &record.name;
        let is_parent = record.parent.as_ref() == Some(&target.name);
        if !is_parent && target.checkpoint_of.as_ref() != Some(name) {
            return Err(Error::invalid(format!(
                "layer {:?} is neither {name:?}'s parent nor a checkpoint of it; a reset takes a layer back to its parent or to one of its checkpoints (`thinstack layer list` shows checkpoint_of)",
                target.name.as_str()
            )));
        }
        if record.committed {
            return Err(Error::invalid(format!(
                "layer {name:?} is committed: its content never changes; make a new child instead"
            )));
        }
        if let Some(target) = record.mounts.keys().next() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is mounted at {}; unmount it before resetting it",
                    target.display()
                ),
            ));
        }
        let children = self.live_children(name);
        if !children.is_empty() {
            let names: Vec<&str> = children.iter().map(LayerName::as_str).collect();
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} has children ({}), which hold its content; remove them before resetting it",
                    names.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Deactivate `record`'s device for the reset (its record still says whether it should
    /// be active, so a crash brings the new device back as the old one was); `Busy` when
    /// someone holds it open.
    #[tracing::instrument(level = "debug", skip_all)]
    fn release_for_reset(&self, record: &LayerRecord) -> Result<()> {
        if self.kernel.active_node(record.thin_id)?.is_none() {
            return Ok(());
        }
        self.deactivate_with_retries(record.thin_id)
            .map_err(|e| match e.kind() {
                ErrorKind::Busy => Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {:?}'s device is held open by a process; close it before resetting the layer",
                        record.name.as_str()
                    ),
                ),
                _ => e,
            })
    }

    /// The reset's steps: the record claims thin `new_id`, the pool snapshots `target` as
    /// it, the record takes it and names the old device as discarding. The old device is
    /// deleted after the answer ([`Engine::finish_discard`]), or by the next operation on the
    /// layer, the next round of deferred work, or the next start, whichever comes first.
    #[tracing::instrument(level = "debug", skip_all)]
    fn switch_device(
        &self,
        record: LayerRecord,
        target: &LayerRecord,
        new_id: ThinId,
    ) -> Result<LayerRecord> {
        let old_id = record.thin_id;
        let claiming = LayerRecord {
            discarding: Some(new_id),
            ..record
        };
        self.snapshot_claimed(
            &claiming,
            target.thin_id,
            new_id,
            crash::Point::ResetRecordWritten,
            "reset",
            |claim| self.finish_discarding(claim),
        )?;
        self.switch_record(claiming, target, new_id, old_id)
    }

    /// Snapshot `origin` as thin `id`, which `claiming` (a layer's record) claims. The record
    /// is staged first, durable with the snapshot's intent, so the pool never makes a device
    /// no record names. If the snapshot fails, `undo` lets the claim go (with whatever the
    /// pool made); an undo that fails too degrades the layer, naming `what` failed.
    fn snapshot_claimed(
        &self,
        claiming: &LayerRecord,
        origin: ThinId,
        id: ThinId,
        claimed: crash::Point,
        what: &str,
        undo: impl FnOnce(LayerRecord) -> Result<LayerRecord>,
    ) -> Result<()> {
        let name = &claiming.name;
        if let Err(e) = self.stage(claiming.clone()) {
            self.index().used_ids.remove(&id);
            return Err(e);
        }
        crash::point(claimed);
        if let Err(e) = self.pool_step(Some(name), PoolOp::Snapshot { origin, id }) {
            if let Err(failed) = undo(claiming.clone()) {
                self.degrade(
                    name,
                    format!("the undo of a failed {what} failed: {failed}"),
                );
            }
            return Err(e);
        }
        Ok(())
    }

    /// The reset to the parent when a spare was made ahead: the record takes the spare and
    /// names the old device as discarding, in one write; the pool is not touched.
    #[tracing::instrument(level = "debug", skip_all)]
    fn take_spare(
        &self,
        record: LayerRecord,
        target: &LayerRecord,
        spare: ThinId,
    ) -> Result<LayerRecord> {
        let old_id = record.thin_id;
        let taken = LayerRecord {
            spare: None,
            ..record
        };
        self.switch_record(taken, target, spare, old_id)
    }

    /// The record's step of a reset: it holds `new_id` with `target`'s size and filesystem,
    /// and names `old_id` as discarding.
    fn switch_record(
        &self,
        record: LayerRecord,
        target: &LayerRecord,
        new_id: ThinId,
        old_id: ThinId,
    ) -> Result<LayerRecord> {
        let switched = LayerRecord {
            thin_id: new_id,
            discarding: Some(old_id),
            size: target.size,
            fs_uuid: target.fs_uuid.clone(),
            resizing_to: None,
            ..record
        };
        self.put(switched.clone())?;
        crash::point(crash::Point::ResetSwitched);
        Ok(switched)
    }

    /// Make a spare for layer `name`'s next reset to its parent, unless it has one: the
    /// record claims a thin id (durable with the snapshot's intent), then the pool snapshots
    /// the parent as it. Not on a pool with a catalog (rbd), whose ids and images it keeps
    /// for every host. A failure leaves the layer without a spare, and its next reset
    /// snapshots as it would without one.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn prepare_spare(&self, name: &LayerName) -> Result<()> {
        if self.kernel.catalog().is_some() {
            return Ok(());
        }
        let _guard = self.locks.lock(name);
        let Ok(record) = self.ready_record(name) else {
            return Ok(()); // removed or being removed meanwhile
        };
        if self.ensure_not_degraded(name).is_err() {
            return Ok(());
        }
        if record.committed {
            return self.let_committed_spare_go(record).map(drop);
        }
        let Some(parent) = record.parent.clone() else {
            return Ok(());
        };
        if record.spare.is_some() || record.discarding.is_some() {
            return Ok(());
        }
        let parent = self.ready_record(&parent)?;
        // A writable parent may change after the snapshot: only a committed one's holds.
        if !parent.committed {
            return Ok(());
        }
        let usage = self.ensure_writable(&format!("prepare a reset of layer {name:?}"))?;
        self.check_space(&usage)?;
        let id = self.allocate_id()?;
        let claiming = LayerRecord {
            spare: Some(id),
            ..record
        };
        self.snapshot_claimed(
            &claiming,
            parent.thin_id,
            id,
            crash::Point::ResetSpareClaimed,
            "spare",
            |claim| self.drop_spare(claim),
        )?;
        crash::point(crash::Point::ResetSpareMade);
        tracing::debug!(layer = %name, thin_id = %id, "spare made for the next reset");
        Ok(())
    }

    /// Delete `record`'s spare, if it has one, and record that it is gone. Gone already is
    /// fine.
    pub(super) fn drop_spare(&self, record: LayerRecord) -> Result<LayerRecord> {
        let Some(id) = record.spare else {
            return Ok(record);
        };
        self.remove_thin_device(Some(&record.name), id)?;
        let settled = LayerRecord {
            spare: None,
            ..record
        };
        self.put(settled.clone())?;
        Ok(settled)
    }

    /// A committed layer is never reset: the spare a commit could not let go (the record's
    /// slot for a device to discard held a reset's old device then) goes now, named as the
    /// device to discard first, so a failed delete is retried by the next round.
    /// Returns whether it had one to let go.
    pub(super) fn let_committed_spare_go(&self, mut record: LayerRecord) -> Result<bool> {
        if record.let_spare_go().is_none() {
            return Ok(false);
        }
        self.put(record.clone())?;
        self.finish_discarding(record)?;
        Ok(true)
    }

    /// Delete the device layer `name` let go (the one a reset replaced, or the spare a commit
    /// made useless), if it still has one. The daemon's deferred round calls it after the
    /// answer, so a reset waits for one pool message (the snapshot), not two.
    pub fn finish_discard(&self, name: &str) -> Result<()> {
        let name = LayerName::new(name)?;
        let _guard = self.locks.lock(&name);
        match self.record(&name) {
            Ok(record)
                if record.discarding.is_some() && self.ensure_not_degraded(&name).is_ok() =>
            {
                self.finish_discarding(record).map(drop)
            }
            // Removed, or settled by another operation, meanwhile.
            _ => Ok(()),
        }
    }

    /// [`Engine::finish_discard`] for every layer that has a device to discard: the deferred
    /// work's round catches what an answered reset left (a failed delete, say). A layer
    /// that was reset is likely to be reset again: each then gets a spare made ahead.
    pub(super) fn finish_discards(&self) {
        let discarding = self.index().names_where(|l| l.discarding.is_some());
        for name in discarding {
            if let Err(e) = self.finish_discard(name.as_str()) {
                tracing::warn!(layer = %name, error = %e, "deleting the device a reset replaced failed; will retry");
                continue;
            }
            if let Err(e) = self.prepare_spare(&name) {
                tracing::warn!(layer = %name, error = %e, "making a spare for the next reset failed; that reset will snapshot");
            }
        }
    }

    /// Delete the thin device `record` names as discarding (one a reset replaced, or a spare
    /// its commit let go), if any, and record that it is gone. Gone already is fine.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn finish_discarding(&self, record: LayerRecord) -> Result<LayerRecord> {
        let Some(id) = record.discarding else {
            return Ok(record);
        };
        self.remove_thin_device(Some(&record.name), id)?;
        let settled = LayerRecord {
            discarding: None,
            ..record
        };
        self.put(settled.clone())?;
        Ok(settled)
    }
}
