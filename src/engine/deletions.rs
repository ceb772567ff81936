//! The deletion queue: thin devices of removed layers, discarded and deleted after the removal
//! has answered.
//!
//! A removal deactivates the layer's device (so a busy device is still refused or deferred
//! while the client waits), queues the device in the transaction record, and drops the
//! layer's record: the layer is gone from the API and the records. Discarding its blocks and the pool message
//! that deletes it come after, in the daemon's deferred work (woken at once), in the next
//! removal's wake, or at the next start's first round. The queue owns its devices until then:
//! start-up and `pool doctor` count them as owned, and no create is handed their ids.

use super::*;
use crate::records::Deletion;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Who to wake when there is deletion work: the daemon's watcher. Without one (an engine
    /// used on its own, as in tests and tools), the work is done at once, by the caller.
    pub fn set_deferred_waker(&self, wake: impl Fn() + Send + Sync + 'static) {
        let _ = self.deferred_waker.set(Box::new(wake));
    }

    /// Queue inactive thin device `id` of a removed layer for deletion. Queued already is
    /// fine (a removal settled again after a crash).
    pub(super) fn queue_deletion(&self, deletion: Deletion) -> Result<()> {
        let mut txn = self.txn();
        if txn.is_deleting(deletion.thin_id) {
            return Ok(());
        }
        txn.deleting.push(deletion);
        // Durable with the record's drop, which follows: the layer is either still there
        // with its device, or gone with its device queued.
        if let Err(e) = self.store.stage_txn(&txn) {
            txn.deleting.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Have the queued deletions done: by the watcher if there is one, else now.
    pub(super) fn deletions_queued(&self) {
        self.after_answer(|| {
            if let Err(e) = self.finish_deletions() {
                tracing::warn!(error = %e, "deleting removed layers' devices failed; will retry");
            }
        });
    }

    /// Work an operation leaves for after its answer: the daemon's watcher is woken for it
    /// (its deferred round does all such work), or, where no daemon runs one, `now` does it.
    pub(super) fn after_answer(&self, now: impl FnOnce()) {
        match self.deferred_waker.get() {
            Some(wake) => wake(),
            None => now(),
        }
    }

    /// Thin devices queued for deletion.
    pub fn deletions_pending(&self) -> usize {
        self.txn().deleting.len()
    }

    /// Whether thin device `id` is a removed layer's, queued for deletion.
    pub fn is_queued_for_deletion(&self, id: ThinId) -> bool {
        self.txn().is_deleting(id)
    }

    /// Discard and delete every queued device, oldest first; each leaves the queue once it
    /// is gone from the pool. One that fails stays queued, and the others are still tried;
    /// the first failure is returned. One caller at a time works the queue; a read-only pool
    /// takes no deletions. Returns how many were deleted.
    pub fn finish_deletions(&self) -> Result<usize> {
        let _work = self.deletion_work.lock().unwrap_or_else(|e| e.into_inner());
        let queued = self.txn().deleting.clone();
        if queued.is_empty() || self.kernel.usage_as_committed()?.health.read_only {
            return Ok(0);
        }
        let mut deleted = 0;
        let mut first_failure = None;
        for deletion in &queued {
            match self.delete_queued(deletion) {
                Ok(gone) => deleted += usize::from(gone),
                Err(e) => {
                    tracing::warn!(thin_id = %deletion.thin_id, error = %e, "deleting a removed layer's thin device failed; it stays queued");
                    first_failure.get_or_insert(e);
                }
            }
        }
        tracing::info!(
            deleted,
            queued = queued.len(),
            "removed layers' thin devices deleted"
        );
        first_failure.map_or(Ok(deleted), Err)
    }

    /// Delete one queued device; returns whether it was deleted (not kept for a layer).
    fn delete_queued(&self, deletion: &Deletion) -> Result<bool> {
        let id = deletion.thin_id;
        if let Some(owner) = self.ready_owner_of(id) {
            // Never delete what a layer holds (a record restored from a backup, say): the
            // queue lets it go instead.
            tracing::error!(thin_id = %id, layer = %owner, "a queued thin device is a layer's; kept, and taken off the deletion queue");
            return self.unqueue(id).map(|()| false);
        }
        // A crash may have left it active (during its discard).
        if self.kernel.active_node(id)?.is_some() {
            self.kernel.deactivate(id)?;
        }
        if deletion.discard {
            self.discard(id, deletion.size)?;
            crash::point(crash::Point::DeletionDiscarded);
        }
        // The pool step that deletes it also takes it off the queue (one record write).
        self.delete_thin(None, id)?;
        crash::point(crash::Point::DeletionDone);
        // Gone already (a crash after the message): take it off here.
        self.unqueue(id).map(|()| true)
    }

    fn unqueue(&self, id: ThinId) -> Result<()> {
        let mut txn = self.txn();
        if txn.unqueue(id) {
            self.store.put_txn(&txn)?;
        }
        Ok(())
    }

    /// The layer that holds thin device `id` other than by being removed, if any.
    fn ready_owner_of(&self, id: ThinId) -> Option<LayerName> {
        self.index()
            .layers
            .values()
            .find(|l| l.state != LayerState::Removing && l.thin_ids().any(|t| t == id))
            .map(|l| l.name.clone())
    }

    /// Every thin id the records own: each layer's own, one a reset is discarding, a spare
    /// for the next reset, and the devices queued for deletion.
    pub(super) fn owned_ids(&self) -> BTreeSet<ThinId> {
        // The index before the queue: a removal queues its device before it drops its record,
        // so a device between the two is seen in one or the other.
        let mut owned = self.index().owned_ids();
        owned.extend(self.txn().deleting.iter().map(|d| d.thin_id));
        // On a shared pool, images other hosts are making or removing are theirs.
        owned.extend(self.shared_ids());
        owned
    }
}
