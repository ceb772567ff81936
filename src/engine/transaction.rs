//! Records and the pool step: every record written atomically, every pool message preceded by
//! its durable intent in the transaction record and followed by the transaction id (see the
//! module docs of [`super`]).

use super::*;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Write a record durably, then show it in the index. The caller holds the layer's lock.
    pub(super) fn put(&self, record: LayerRecord) -> Result<()> {
        self.write(record, Durability::Now)
    }

    /// Write a record that is durable with the next durable write, then show it in the index:
    /// for a step no kernel change depends on before that write (a pool message's intent, or
    /// the write the operation answers after). A process killed meanwhile keeps it; a power
    /// cut may take it, and the layer is then as it was before the operation.
    pub(super) fn stage(&self, record: LayerRecord) -> Result<()> {
        self.write(record, Durability::WithNext)
    }

    /// The catalog of a shared pool hears of the change first (see `shared.rs`).
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn write(&self, mut record: LayerRecord, durability: Durability) -> Result<()> {
        self.publish(&mut record)?;
        match durability {
            Durability::Now => self.store.put_layer(&record)?,
            Durability::WithNext => self.store.stage_layer(&record)?,
        }
        self.index().insert(record);
        Ok(())
    }

    pub(super) fn drop_record(&self, name: &LayerName) -> Result<()> {
        self.store.remove_layer(name)?;
        self.index().remove(name);
        self.unpublish(name);
        Ok(())
    }

    /// A thin id that is provably free: no record owns it and the pool did not hold it at the
    /// last reconcile (ids made since are all owned by records). It is reserved in the index
    /// until the caller's record owns it.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn allocate_id(&self) -> Result<ThinId> {
        // A shared pool's ids come from its catalog, so no two hosts make one image; one a
        // record here owns (a pool from before the catalog) is skipped.
        while let Some(id) = self.shared_id()? {
            let queued = self.txn().is_deleting(id);
            if !queued && self.index().used_ids.insert(id) {
                return Ok(id);
            }
        }
        let mut txn = self.txn();
        let mut index = self.index();
        let start = txn.next_thin_id.clamp(1, THIN_ID_MAX);
        let mut candidate = start;
        loop {
            let id = ThinId::new(candidate)?;
            candidate = if candidate >= THIN_ID_MAX {
                1
            } else {
                candidate + 1
            };
            let queued = txn.is_deleting(id);
            if !queued && index.used_ids.insert(id) {
                txn.next_thin_id = candidate;
                return Ok(id);
            }
            if candidate == start {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "all 16777215 thin device ids are in use",
                ));
            }
        }
    }

    /// Send one pool message under the transaction protocol: intent, message, transaction id,
    /// record. A message that fails changes nothing in the pool; the intent is withdrawn.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn pool_step(&self, layer: Option<&LayerName>, op: PoolOp) -> Result<()> {
        // The operations asked ensure_writable before their first change; a status read per
        // message again was the costliest part of a create. A pool made read-only since
        // refuses the message itself. What a start left unsettled is checked again here.
        self.refuse_while_intent_unsettled()?;
        let mut txn = self.txn();
        let old = txn.transaction_id;
        let new = old + 1;
        txn.pending = Some(Intent {
            new_transaction_id: new,
            op: op.clone(),
            layer: layer.cloned(),
        });
        self.store.put_txn(&txn)?;
        crash::point(crash::Point::PoolStepIntentWritten);
        let sent = match &op {
            PoolOp::CreateThin { id } => self.kernel.create_thin(*id),
            PoolOp::Snapshot { origin, id } => self.kernel.snapshot(*origin, *id),
            PoolOp::Delete { id } => self.kernel.delete_thin(*id),
        };
        if let Err(err) = sent {
            txn.pending = None;
            if let Err(e) = self.store.put_txn(&txn) {
                tracing::warn!(error = %e, "could not withdraw the intent; the next open settles it");
            }
            return Err(err);
        }
        crash::point(crash::Point::PoolStepMessageSent);
        self.kernel.set_transaction_id(old, new)?;
        crash::point(crash::Point::PoolStepTransactionSet);
        txn.transaction_id = new;
        txn.pending = None;
        if let PoolOp::Delete { id } = op {
            txn.unqueue(id);
        }
        // Durable with the operation's next write. Should a power cut take it, the start
        // settles the intent by the pool's transaction id, as after a crash before it.
        self.store.stage_txn(&txn)
    }
}
