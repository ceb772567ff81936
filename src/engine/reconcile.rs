//! Reconciling records with the pool when the engine opens: after a crash, a kill, a reboot,
//! or a foreign tool's changes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;

use super::{Engine, Removal};
use crate::error::{ErrorKind, Result};
use crate::kernel::{FsKernel, PoolKernel};
use crate::names::{LayerName, ThinId};
use crate::records::{LayerRecord, LayerState, MountRecord, PoolOp};

/// What reconciling found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// How a pool message that was in flight was settled.
    pub transaction: Option<String>,
    /// Layers a crash left half made, rolled back.
    pub rolled_back: Vec<LayerName>,
    /// Layers a crash left half removed, removed now.
    pub finished_removals: Vec<LayerName>,
    /// Layers whose removal still waits for their device to be released.
    pub still_deferred: Vec<LayerName>,
    /// Thin devices no record owned that the pending intent proves were being made, deleted.
    pub orphans_deleted: Vec<ThinId>,
    /// Thin devices no record owns and no intent explains, kept: they may be layers whose
    /// records were moved aside or lost. `pool doctor` lists them; `--adopt` names them.
    pub unowned_kept: Vec<ThinId>,
    /// Records whose thin device the pool does not have.
    pub missing: Vec<LayerName>,
    /// Layers active before a reboot, activated again.
    pub reactivated: Vec<LayerName>,
    /// Mount records whose mount is gone (after a reboot), dropped.
    pub stale_mounts: Vec<PathBuf>,
    /// Layers the kernel had active or mounted without their record saying so (a crash
    /// between the kernel step and the record): the records now say so.
    pub adopted: Vec<String>,
    /// Layers a resize was under way on: the size their filesystem reached, now recorded.
    pub resizes_settled: Vec<String>,
    /// Layers a crash left half made or half removed, left as they are because the pool was
    /// read-only (settling them needs pool messages); the first start on a writable pool
    /// settles them.
    pub awaiting_writable: Vec<LayerName>,
    /// Layers a reset was under way on, and how it was settled.
    pub resets_settled: Vec<String>,
    /// Layers whose spare for the next reset a crash kept from being made (the records no
    /// longer name it), and committed layers whose spare was deleted.
    pub spares_dropped: Vec<LayerName>,
}

impl ReconcileReport {
    /// Whether nothing needed repair.
    pub fn is_clean(&self) -> bool {
        *self == ReconcileReport::default()
    }
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    pub(super) fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let usage = self.kernel.usage()?;
        let pool_txn = usage.transaction_id;
        // A read-only pool takes no messages: what needs them waits for a writable start.
        let writable = !usage.health.read_only;
        if writable {
            // Settling the intent moves only the transaction id, so one listing serves
            // throughout.
            let pool_ids = self.kernel.thin_ids()?;
            let being_made = self.settle_intent(pool_txn, &pool_ids, &mut report)?;
            self.unqueue_deleted(&pool_ids)?;
            self.unmount_growth_mounts(&mut report)?;
            self.index().used_ids.extend(pool_ids.iter().copied());
            self.flag_missing(&pool_ids, &mut report)?;
            // What the records own before settling deletes some of it: the listing above
            // still holds those devices, and they were owned, not unowned.
            let owned = self.owned_ids();
            self.roll_back_creating(&mut report)?;
            self.finish_removing(&mut report)?;
            self.settle_resets(&mut report)?;
            self.settle_spares(&pool_ids, &mut report)?;
            self.settle_unowned(&pool_ids, &owned, being_made, &mut report)?;
        } else {
            // The pool's thin ids are read through a metadata snapshot, a message a read-only
            // pool refuses: they are read when it is writable again, before the first change.
            self.ids_unread
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.unmount_growth_mounts(&mut report)?;
            self.leave_until_writable(&mut report);
        }
        self.settle_resizes(&mut report)?;
        self.drop_stale_mounts(&mut report)?;
        self.remove_stale_mount_points(&mut report)?;
        // One listing of the active devices, not a question per layer: with 10,000 layers the
        // questions were a fifth of start-up. Nothing else runs while the engine opens.
        let active = self.kernel.active_ids()?;
        self.adopt_active_and_mounted(&active, &mut report)?;
        self.reactivate(&active, &mut report)?;
        if report.is_clean() {
            tracing::info!(
                layers = self.index().layers.len(),
                transaction_id = self.transaction_id(),
                "records agree with the pool"
            );
        } else {
            tracing::warn!(?report, "reconciled records with the pool");
        }
        Ok(report)
    }

    /// Settle the message that was in flight, using the pool's transaction id (and, when that
    /// cannot tell, whether the message's effect is in the pool). Returns the thin id the
    /// message was making, if it was a create or a snapshot: the one unowned device start-up
    /// may prove it made.
    fn settle_intent(
        &self,
        pool_txn: u64,
        pool_ids: &BTreeSet<ThinId>,
        report: &mut ReconcileReport,
    ) -> Result<Option<ThinId>> {
        let mut txn = self.txn();
        let being_made = txn.pending.as_ref().and_then(|intent| match intent.op {
            PoolOp::CreateThin { id } | PoolOp::Snapshot { id, .. } => Some(id),
            PoolOp::Delete { .. } => None,
        });
        let Some(intent) = txn.pending.clone() else {
            if pool_txn != txn.transaction_id {
                report.transaction = Some(format!(
                    "the pool's transaction id is {pool_txn} but the records had {}; the pool's was adopted",
                    txn.transaction_id
                ));
                txn.transaction_id = pool_txn;
                self.store.put_txn(&txn)?;
            }
            return Ok(None);
        };
        let new = intent.new_transaction_id;
        let old = new.saturating_sub(1);
        let settled = if pool_txn == new {
            txn.transaction_id = new;
            format!("{:?} had completed; recorded transaction {new}", intent.op)
        } else if pool_txn == old {
            let present = pool_ids.contains(&intent.op.id());
            if let PoolOp::Snapshot { origin, id } = intent.op {
                self.kernel.settle_snapshot(origin, id, present)?;
            }
            let happened = match intent.op {
                PoolOp::Delete { .. } => !present,
                PoolOp::CreateThin { .. } | PoolOp::Snapshot { .. } => present,
            };
            if happened {
                self.kernel.set_transaction_id(old, new)?;
                txn.transaction_id = new;
                format!(
                    "{:?} had happened without its transaction id; set it to {new}",
                    intent.op
                )
            } else {
                txn.transaction_id = old;
                format!(
                    "{:?} had not happened; nothing to undo in the pool",
                    intent.op
                )
            }
        } else {
            txn.transaction_id = pool_txn;
            format!(
                "{:?} was in flight for transaction {new}, but the pool is at {pool_txn}; the pool's was adopted",
                intent.op
            )
        };
        txn.pending = None;
        self.store.put_txn(&txn)?;
        report.transaction = Some(settled);
        Ok(being_made)
    }

    /// Devices queued for deletion that the pool no longer has (a crash came after the
    /// message that deleted one) leave the queue. The rest stay for the deferred work.
    fn unqueue_deleted(&self, pool_ids: &BTreeSet<ThinId>) -> Result<()> {
        let mut txn = self.txn();
        let queued = txn.deleting.len();
        txn.deleting.retain(|d| pool_ids.contains(&d.thin_id));
        if txn.deleting.len() != queued {
            self.store.put_txn(&txn)?;
        }
        if !txn.deleting.is_empty() {
            tracing::info!(
                devices = txn.deleting.len(),
                "removed layers' thin devices are still to be deleted"
            );
        }
        Ok(())
    }

    fn flag_missing(
        &self,
        pool_ids: &BTreeSet<ThinId>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let missing: Vec<_> = self
            .index()
            .layers
            .values()
            .filter(|l| {
                l.state != LayerState::Creating && !l.missing && !pool_ids.contains(&l.thin_id)
            })
            .cloned()
            .collect();
        for mut record in missing {
            record.missing = true;
            if record.state == LayerState::Ready {
                tracing::error!(layer = %record.name, thin_id = %record.thin_id, "the pool has no thin device for this layer; it is flagged missing");
                report.missing.push(record.name.clone());
            }
            // A layer being removed whose device is gone already only needs its record dropped.
            self.put(record)?;
        }
        Ok(())
    }

    fn names_in_state(&self, state: LayerState) -> Vec<LayerName> {
        self.index().names_where(|l| l.state == state)
    }

    /// A resize a crash or a failure cut short: the record takes the new size if the
    /// filesystem grew past the old one (the device must hold it), or keeps its size if not.
    fn settle_resizes(&self, report: &mut ReconcileReport) -> Result<()> {
        let resizing: Vec<_> = self
            .usable_records()
            .into_iter()
            .filter(|l| l.resizing_to.is_some())
            .collect();
        for record in resizing {
            self.settle_or_degrade(&record.name, "settling an interrupted resize", || {
                let size = self.settle_resize(&record)?;
                report
                    .resizes_settled
                    .push(format!("{}: {size}", record.name));
                Ok(())
            });
        }
        Ok(())
    }

    pub(super) fn settle_resize(&self, record: &LayerRecord) -> Result<crate::units::ByteSize> {
        let grew = self.with_device(record, |node| {
            Ok(self
                .fs
                .probe(node)?
                .is_some_and(|found| found.size > record.size))
        })?;
        let mut settled = record.clone();
        if grew {
            settled.size = record.device_size();
        }
        settled.resizing_to = None;
        self.put(settled.clone())?;
        tracing::warn!(layer = %record.name, size = %settled.size, "settled a resize that was cut short");
        Ok(settled.size)
    }

    fn leave_until_writable(&self, report: &mut ReconcileReport) {
        let mut waiting = self.names_in_state(LayerState::Creating);
        waiting.extend(self.names_in_state(LayerState::Removing));
        waiting.extend(self.index().names_where(|l| l.discarding.is_some()));
        let intent_left = self.txn().pending.is_some();
        self.intent_left_at_start
            .store(intent_left, std::sync::atomic::Ordering::SeqCst);
        if !waiting.is_empty() || intent_left {
            tracing::error!(layers = ?waiting, "the pool is read-only: what a crash left half done is settled at the first start on a writable pool");
        }
        report.awaiting_writable = waiting;
    }

    fn roll_back_creating(&self, report: &mut ReconcileReport) -> Result<()> {
        let creating = self.names_in_state(LayerState::Creating);
        for name in creating {
            self.settle_or_degrade(&name, "rolling back its half-made create", || {
                self.undo_create(&name)?;
                report.rolled_back.push(name.clone());
                Ok(())
            });
        }
        Ok(())
    }

    fn finish_removing(&self, report: &mut ReconcileReport) -> Result<()> {
        let removing = self.names_in_state(LayerState::Removing);
        for name in removing {
            self.settle_or_degrade(&name, "finishing its removal", || {
                match self.finish_removal(self.record(&name)?, false)? {
                    Removal::Removed => report.finished_removals.push(name.clone()),
                    Removal::Deferred => report.still_deferred.push(name.clone()),
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Spares a crash cut short: a record claims its spare's id before the pool snapshots
    /// the parent, so one the pool does not have was never made, and the record lets it go
    /// (as it does one queued for deletion, which no record should name). A committed
    /// layer's spare, which no reset will take, is deleted.
    fn settle_spares(
        &self,
        pool_ids: &BTreeSet<ThinId>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        // The index's lock is let go before the queue's is taken: elsewhere they nest the
        // other way round.
        let claimed: Vec<(LayerName, ThinId)> = self
            .index()
            .layers
            .values()
            .filter_map(|l| l.spare.map(|id| (l.name.clone(), id)))
            .collect();
        let unmade = claimed
            .into_iter()
            .filter(|&(_, id)| !pool_ids.contains(&id) || self.txn().is_deleting(id));
        for (name, _) in unmade {
            let record = self.record(&name)?;
            self.put(LayerRecord {
                spare: None,
                ..record
            })?;
            report.spares_dropped.push(name);
        }
        // A committed layer is never reset: a spare it still has (a commit found the slot
        // for a device to discard taken, and the daemon stopped before its round) goes.
        let committed = self
            .index()
            .names_where(|l| l.committed && l.spare.is_some());
        for name in committed {
            // The layer itself is whole: a failure leaves the spare to the rounds, not the
            // layer degraded.
            match self.let_committed_spare_go(self.record(&name)?) {
                Ok(true) => report.spares_dropped.push(name),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(layer = %name, error = %e, "deleting a committed layer's spare failed; the daemon's rounds retry")
                }
            }
        }
        Ok(())
    }

    /// Resets a crash cut short: the device the record does not hold is deleted. Before the
    /// record took the new device, that rolls the reset back; after, it finishes it. (A
    /// spare a commit let go is such a device too.)
    fn settle_resets(&self, report: &mut ReconcileReport) -> Result<()> {
        let resetting = self.index().names_where(|l| l.discarding.is_some());
        for name in resetting {
            self.settle_or_degrade(&name, "settling its interrupted reset", || {
                let record = self.record(&name)?;
                let held = record.thin_id;
                self.finish_discarding(record)?;
                report
                    .resets_settled
                    .push(format!("{name}: holds thin device {held}"));
                Ok(())
            });
        }
        Ok(())
    }

    /// Thin devices no record owns. Start-up deletes one only when the intent in flight
    /// proves it was this thinstack making it; any other is kept, because it may be a layer
    /// whose record was moved aside, damaged, or restored from an older copy.
    fn settle_unowned(
        &self,
        pool_ids: &BTreeSet<ThinId>,
        owned: &BTreeSet<ThinId>,
        being_made: Option<ThinId>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        for &id in pool_ids.difference(owned) {
            if being_made != Some(id) {
                tracing::warn!(thin_id = %id, "kept a thin device no record owns: it may be a layer whose record is missing; `thinstack pool doctor` lists it, `--adopt` names it");
                report.unowned_kept.push(id);
                continue;
            }
            match self.remove_thin_device(None, id) {
                Ok(()) => {
                    tracing::warn!(thin_id = %id, "deleted a thin device a crash left half made");
                    report.orphans_deleted.push(id);
                }
                Err(e) if e.kind() == ErrorKind::Busy => {
                    tracing::error!(thin_id = %id, error = %e, "a half-made thin device is in use; left alone");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn drop_stale_mounts(&self, report: &mut ReconcileReport) -> Result<()> {
        let records: Vec<_> = self
            .index()
            .layers
            .values()
            .filter(|l| !l.mounts.is_empty())
            .cloned()
            .collect();
        for mut record in records {
            let before = record.mounts.len();
            let mut stale = Vec::new();
            for target in record.mounts.keys() {
                if !self.fs.is_mounted(target)? {
                    stale.push(target.clone());
                }
            }
            for target in &stale {
                record.mounts.remove(target);
            }
            if record.mounts.len() != before {
                report.stale_mounts.extend(stale);
                self.put(record)?;
            }
        }
        Ok(())
    }

    /// Records of the layers that are ready and whose thin device is in the pool.
    fn usable_records(&self) -> Vec<LayerRecord> {
        self.index()
            .layers
            .values()
            .filter(|l| l.state == LayerState::Ready && !l.missing)
            .cloned()
            .collect()
    }

    /// Empty mount points of layers that are gone (left by a crash, or an older thinstack).
    fn remove_stale_mount_points(&self, report: &mut ReconcileReport) -> Result<()> {
        for point in self.stale_mount_points()? {
            self.remove_stale_point(&point)?;
            report.stale_mounts.push(point.path().to_path_buf());
        }
        Ok(())
    }

    /// A crash between a kernel step and its record leaves a layer active, or mounted, without
    /// its record saying so. The kernel is right about those (the device and the mount are
    /// there), so the record learns them, and a later deactivate or remove sees them.
    fn adopt_active_and_mounted(
        &self,
        active: &BTreeSet<ThinId>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let ready = self.usable_records();
        for mut record in ready {
            if !active.contains(&record.thin_id) {
                continue;
            }
            let Some(node) = self.kernel.active_node(record.thin_id)? else {
                continue;
            };
            let mut learned = Vec::new();
            if !record.active {
                record.active = true;
                learned.push("active".to_string());
            }
            // containerd mounts its snapshots itself; those mounts are not thinstack's.
            let ours = if record.snapshot.is_some() {
                Vec::new()
            } else {
                self.fs.mounts_of(&node)?
            };
            for (target, read_only) in ours {
                if let std::collections::btree_map::Entry::Vacant(entry) =
                    record.mounts.entry(target)
                {
                    learned.push(format!("mounted at {}", entry.key().display()));
                    entry.insert(MountRecord { refs: 1, read_only });
                }
            }
            if !learned.is_empty() {
                tracing::warn!(layer = %record.name, learned = ?learned, "the kernel had this layer active or mounted without a record of it; recorded");
                report
                    .adopted
                    .push(format!("{}: {}", record.name, learned.join(", ")));
                self.put(record)?;
            }
        }
        Ok(())
    }

    /// A crash while a filesystem was mounted for growing leaves that mount; it would keep the
    /// device busy.
    fn unmount_growth_mounts(&self, report: &mut ReconcileReport) -> Result<()> {
        let mnt = self.settings.state_dir.join("mnt");
        let Ok(entries) = std::fs::read_dir(&mnt) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_name().to_string_lossy().starts_with(".grow-") {
                continue;
            }
            if self.fs.is_mounted(&path)? {
                let Some(node) = self.growth_device(&path)? else {
                    tracing::warn!(path = %path.display(), "left a mount on a growth mount point alone: it is no active layer device's");
                    continue;
                };
                self.fs.unmount(&path, &node)?;
                report.stale_mounts.push(path.clone());
            }
            let _ = std::fs::remove_dir(&path);
        }
        Ok(())
    }

    /// Activate layers that should be active, and make every active layer's device read-only
    /// exactly when the layer is committed (a crash inside commit can leave them apart).
    fn reactivate(&self, active: &BTreeSet<ThinId>, report: &mut ReconcileReport) -> Result<()> {
        let ready = self.usable_records();
        for record in ready {
            // Inactive, and meant to be: nothing to settle.
            if !record.active && !active.contains(&record.thin_id) {
                continue;
            }
            self.settle_or_degrade(&record.name, "reactivating its device", || {
                if self.settle_activation(&record)? {
                    report.reactivated.push(record.name.clone());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Make the kernel's activation of `record`'s device what the record says: active again
    /// after a reboot, read-only when committed. Returns whether it (re)activated the device.
    pub(super) fn settle_activation(&self, record: &LayerRecord) -> Result<bool> {
        match self.kernel.active_read_only(record.thin_id)? {
            None if record.active => {
                self.kernel
                    .activate(record.thin_id, record.size, record.committed)?;
                Ok(true)
            }
            Some(read_only) if read_only != record.committed && record.mounts.is_empty() => {
                self.kernel.deactivate(record.thin_id)?;
                self.kernel
                    .activate(record.thin_id, record.size, record.committed)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
