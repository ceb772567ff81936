//! Creating a layer: a base with a fresh filesystem, or a snapshot of a parent; the record
//! first, then the pool step, and on failure the undo.

use super::*;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Create a layer as [`Engine::create`] does, or, when `exists_ok` and a layer of that
    /// name exists already with the same parent, take that one: the layer, and whether it was
    /// made now. A layer of that name with another parent is `AlreadyExists` either way, so a
    /// retried script never takes a different layer for its own.
    pub fn create_or_existing(
        &self,
        request: &CreateLayer,
        exists_ok: bool,
    ) -> Result<(Layer, bool)> {
        match self.create(request) {
            Ok(layer) => Ok((layer, true)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && exists_ok => {
                let existing = self.inspect(&request.name)?;
                let parent = existing.parent.as_ref().map(LayerName::as_str);
                if parent != request.parent.as_deref() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "layer {:?} exists already with parent {parent:?}, not {:?}",
                            request.name, request.parent
                        ),
                    ));
                }
                Ok((existing, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Create a layer: a new base layer with a fresh filesystem, or a snapshot of `parent`.
    ///
    /// A snapshot of an active parent is taken with the parent suspended (a mounted filesystem
    /// is frozen and flushed). A size larger than the parent's grows the device and then the
    /// filesystem; a smaller one is refused. Refused with `NoSpace` when free data or metadata
    /// is below `min_free_space`. On failure nothing is left behind.
    pub fn create(&self, request: &CreateLayer) -> Result<Layer> {
        self.create_with(request, None)
    }

    /// [`Engine::create`], of a containerd snapshot when `snapshot` says which: its key is
    /// claimed with the record, a view is read-only, and a new root's filesystem is bare (no
    /// `lost+found`, root directory mode 0755), as containerd's snapshotters give it.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn create_with(
        &self,
        request: &CreateLayer,
        snapshot: Option<SnapshotRecord>,
    ) -> Result<Layer> {
        let name = LayerName::new(&request.name)?;
        // The parent's lock is held until the snapshot is taken: its device does not change
        // under the snapshot, and it cannot be removed before its child's record exists.
        let parent_name = request.parent.as_deref().map(LayerName::new).transpose()?;
        // Locking the same layer twice would wait forever.
        if parent_name.as_ref() == Some(&name) {
            return Err(Error::invalid(format!(
                "layer {name:?} cannot be a snapshot of itself; name another layer as its parent"
            )));
        }
        // Another host's layers (a parent, a name taken) are known before the plan.
        self.refresh_shared()?;
        // Both names at once: two creates that name each other as parent would otherwise each
        // hold one and wait for the other for ever.
        let (_guard, parent_guard) = self.locks.lock_with(&name, parent_name.as_ref());
        let mut plan = self.plan_create(name, request)?;
        plan.bare_root = snapshot.is_some();
        let what = format!("create layer {:?}", plan.name.as_str());
        let usage = self.ensure_writable(&what)?;
        self.check_space(&usage)?;
        let _virtual = self.reserve_virtual(&what, &usage, plan.size)?;
        let id = self.allocate_id()?;
        // containerd expects a new snapshot's update time to equal its creation time.
        let created_ns = snapshot.as_ref().map_or_else(now_ns, |s| s.updated_ns);
        let record = LayerRecord {
            parent: plan.parent.as_ref().map(|p| p.name.clone()),
            committed: snapshot
                .as_ref()
                .is_some_and(|s| s.kind == SnapshotKind::View),
            labels: request.labels.clone(),
            snapshot,
            ..LayerRecord::creating(
                plan.name.clone(),
                id,
                plan.size,
                plan.filesystem,
                plan.parent
                    .as_ref()
                    .map(|p| p.fs_uuid.clone())
                    .unwrap_or_default(),
                created_ns,
            )
        };
        let record = self
            .create_claimed(record, crash::Point::CreateRecordWritten, |record| {
                record.fs_uuid = self.build_layer(&plan, id, parent_guard)?;
                Ok(())
            })
            .map_err(|err| err.context(format!("creating layer {:?}", plan.name.as_str())))?;
        crash::point(crash::Point::CreateDone);
        tracing::info!(layer = %plan.name, thin_id = %id, parent = ?plan.parent.as_ref().map(|p| p.name.as_str()), size = %plan.size, "layer created");
        self.view(record)
    }

    /// The protocol every new layer goes through, written once: claim its record (state
    /// `creating`, written before the pool is touched, so a crash leaves it for the next
    /// start to roll back), pass crash point `recorded`, `make` the layer (which may fill in
    /// the record), then mark it ready. On failure the layer is undone; when the undo fails
    /// too, it is left degraded, with why. Returns the ready record.
    pub(super) fn create_claimed(
        &self,
        record: LayerRecord,
        recorded: crash::Point,
        make: impl FnOnce(&mut LayerRecord) -> Result<()>,
    ) -> Result<LayerRecord> {
        let (name, id) = (record.name.clone(), record.thin_id);
        // The record is durable with the first pool message's intent, before the pool is
        // touched; a power cut before then takes it, and nothing was made.
        if let Err(e) = self.put_claiming(record.clone(), Durability::WithNext) {
            self.index().used_ids.remove(&id);
            return Err(e);
        }
        crash::point(recorded);
        let mut record = record;
        if let Err(err) = make(&mut record) {
            if let Err(undo) = self.undo_create(&name) {
                self.degrade(&name, format!("the undo of a failed create failed: {undo}"));
            }
            return Err(err);
        }
        record.state = LayerState::Ready;
        self.put(record.clone())?;
        self.emit(Some(&name), EventKind::LayerCreated);
        Ok(record)
    }

    pub(super) fn plan_create(&self, name: LayerName, request: &CreateLayer) -> Result<CreatePlan> {
        if self.contains(&name) {
            // A half-made layer whose undo failed says so, rather than "exists already".
            self.ensure_not_degraded(&name)?;
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a layer named {name:?} exists already"),
            ));
        }
        check_labels(&request.labels)?;
        let parent = match &request.parent {
            None => None,
            Some(parent) => Some(self.ready_record(&LayerName::new(parent)?)?),
        };
        let (size, filesystem) = match &parent {
            None => {
                let filesystem = request.filesystem.unwrap_or(self.settings.filesystem);
                let size = request.size.unwrap_or(self.settings.base_size);
                check_fs_size(filesystem, size)?;
                (size, filesystem)
            }
            Some(parent) => {
                if request.filesystem.is_some_and(|fs| fs != parent.filesystem) {
                    return Err(Error::invalid(format!(
                        "layer {name:?} is a snapshot of {:?}, which holds {}; a snapshot keeps its parent's filesystem",
                        parent.name.as_str(),
                        parent.filesystem
                    )));
                }
                let size = request.size.unwrap_or(parent.size);
                if size < parent.size {
                    return Err(Error::invalid(format!(
                        "size {size} for layer {name:?} is smaller than its parent {:?} ({}); layers can only grow",
                        parent.name.as_str(),
                        parent.size
                    )));
                }
                (size, parent.filesystem)
            }
        };
        Ok(CreatePlan {
            name,
            parent,
            size,
            filesystem,
            bare_root: false,
        })
    }

    /// Refuse `what` while the pool is read-only (it would need new blocks or a pool message),
    /// saying why and what to do. Reads, status and growth go on.
    /// Returns the pool's usage, read for the check, so a caller needs no second status read.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn ensure_writable(&self, what: &str) -> Result<PoolUsage> {
        // As of the last commit: the guard needs health and room, not the latest block.
        let usage = self.kernel.usage_as_committed()?;
        let health = usage.health;
        if !health.read_only {
            self.refuse_while_intent_unsettled()?;
            self.read_ids_if_unread()?;
            return Ok(usage);
        }
        let (kind, why, fix) = if health.metadata_guard {
            (
                ErrorKind::NoSpace,
                "thinstack made it read-only because its metadata is nearly full (running out would fail the pool for good)",
                "grow the metadata with `thinstack pool extend --metadata SIZE`; the pool is writable again at once",
            )
        } else {
            (
                ErrorKind::Kernel,
                "the kernel made it read-only after a metadata error or running out of metadata",
                "stop what uses the pool and thinstackd, check the metadata with thin_check (repair with thin_repair), then start thinstackd again",
            )
        };
        Err(Error::new(
            kind,
            format!("cannot {what}: the pool is read-only, because {why}; {fix}"),
        ))
    }

    /// A start on a read-only pool could not settle the intent a crash left; a new intent
    /// would hide it, so no pool change goes ahead of it.
    pub(super) fn refuse_while_intent_unsettled(&self) -> Result<()> {
        if !self
            .intent_left_at_start
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Inconsistent,
            "a pool change a crash cut short is still unsettled (the pool was read-only when \
             thinstackd started); restart thinstackd now that the pool is writable: the start \
             settles it",
        ))
    }

    /// After a start on a read-only pool: reserve the pool's thin ids before any change, so
    /// no create is handed one that a device no record owns has.
    pub(super) fn read_ids_if_unread(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.ids_unread.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        match self.kernel.thin_ids() {
            Ok(ids) => {
                self.index().used_ids.extend(ids);
                Ok(())
            }
            Err(e) => {
                self.ids_unread.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Refuse when free data or free metadata is below `min_free_space`, once removed
    /// layers' devices still queued for deletion are gone.
    pub(super) fn check_space(&self, usage: &PoolUsage) -> Result<()> {
        match self.space_above_minimum(usage) {
            Err(short) if short.kind() == ErrorKind::NoSpace && self.deletions_pending() > 0 => {
                if let Err(e) = self.finish_deletions() {
                    tracing::warn!(error = %e, "deleting removed layers' devices to make room failed");
                    return Err(short);
                }
                self.space_above_minimum(&self.kernel.usage_as_committed()?)
            }
            other => other,
        }
    }

    fn space_above_minimum(&self, usage: &PoolUsage) -> Result<()> {
        let min = self.settings.min_free_space;
        for (what, space) in [("data", &usage.data), ("metadata", &usage.metadata)] {
            let required = min.of(space.total.bytes());
            if space.available.bytes() < required {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "the pool has {} of {what} free of {}, below the minimum of {min} ({}); \
                         extend the pool (thinstack pool extend) or lower pool.min_free_space",
                        space.available.human(),
                        space.total.human(),
                        ByteSize::from_bytes(required).human()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The kernel steps of a create, after its record exists; returns the filesystem UUID.
    /// `parent_guard` is released as soon as the snapshot is in the pool.
    pub(super) fn build_layer(
        &self,
        plan: &CreatePlan,
        id: ThinId,
        parent_guard: Option<LayerGuard<'_>>,
    ) -> Result<String> {
        let origin = plan.parent.as_ref().map(|p| p.thin_id);
        self.pool_step(Some(&plan.name), PoolOp::make(id, origin))?;
        drop(parent_guard);
        match &plan.parent {
            None => {
                let node = self.kernel.activate(id, plan.size, false)?;
                crash::point(crash::Point::CreateActivated);
                let fs_uuid = self
                    .fs
                    .mkfs(plan.filesystem, &node, &self.settings.mkfs_args)?;
                crash::point(crash::Point::CreateFormatted);
                if plan.bare_root {
                    self.with_private_mount(id, &node, plan.filesystem, false, |root| {
                        crate::kernel::fs::make_bare_root(root)
                    })?;
                }
                self.kernel.deactivate(id)?;
                Ok(fs_uuid)
            }
            Some(parent) if plan.size > parent.size => {
                let node = self.kernel.activate(id, plan.size, false)?;
                crash::point(crash::Point::CreateActivated);
                self.grow_filesystem(id, &node, plan.filesystem)?;
                crash::point(crash::Point::CreateGrown);
                self.kernel.deactivate(id)?;
                Ok(parent.fs_uuid.clone())
            }
            Some(parent) => Ok(parent.fs_uuid.clone()),
        }
    }

    /// Grow the filesystem on `node` to its device: mounted at a private place for the call
    /// (xfs only grows mounted; online resize2fs needs no fsck first).
    pub(super) fn grow_filesystem(
        &self,
        id: ThinId,
        node: &Path,
        filesystem: FsType,
    ) -> Result<()> {
        self.with_private_mount(id, node, filesystem, false, |target| {
            self.fs.grow(filesystem, node, target)
        })
    }

    /// Run `f` on thin `id`'s filesystem (on `node`) mounted at a private place (read-only
    /// when asked), then unmount it. The place, `mnt/.grow-<id>`, is one reconcile and `pool doctor` know
    /// to clean up after a crash; layer names start with a letter or digit, so it never meets
    /// a layer's mount point.
    pub(super) fn with_private_mount<R>(
        &self,
        id: ThinId,
        node: &Path,
        filesystem: FsType,
        read_only: bool,
        f: impl FnOnce(&Path) -> Result<R>,
    ) -> Result<R> {
        let target = self
            .settings
            .state_dir
            .join("mnt")
            .join(format!(".grow-{id}"));
        std::fs::create_dir_all(&target)
            .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        self.fs.mount(node, &target, filesystem, read_only, &[])?;
        let done = f(&target);
        let unmounted = self.fs.unmount(&target, node);
        let _ = std::fs::remove_dir(&target);
        let done = done?;
        unmounted.map(|()| done)
    }

    /// Make a snapshot of an origin that was in use (active, perhaps mounted) mountable
    /// read-only. The snapshot holds a filesystem frozen, not unmounted: ext4's freeze leaves
    /// its journal clean, but xfs's leaves a log that needs recovery, and xfs refuses to
    /// mount such a log read-only ("recovery required on read-only device"). Mounted
    /// writable once, privately, xfs replays it and leaves it clean, as an unmount would.
    pub(super) fn settle_frozen_snapshot(
        &self,
        id: ThinId,
        size: ByteSize,
        filesystem: FsType,
    ) -> Result<()> {
        if filesystem != FsType::Xfs {
            return Ok(());
        }
        let node = self.kernel.activate(id, size, false)?;
        let settled = self.with_private_mount(id, &node, filesystem, false, |_| Ok(()));
        let deactivated = self.deactivate_with_retries(id);
        settled.and(deactivated)
    }

    /// Take back a create that failed after its record was written.
    pub(super) fn undo_create(&self, name: &LayerName) -> Result<()> {
        let id = self.record(name)?.thin_id;
        self.remove_thin_device(Some(name), id)?;
        self.drop_record(name)
    }

    /// Deactivate (if active) and delete thin `id`; gone already is fine.
    pub(super) fn remove_thin_device(&self, layer: Option<&LayerName>, id: ThinId) -> Result<()> {
        if self.kernel.active_node(id)?.is_some() {
            self.kernel.deactivate(id)?;
        }
        self.delete_thin(layer, id)
    }

    /// Delete inactive thin `id` from the pool under the transaction protocol; gone already is
    /// fine (a crash may have come after the message).
    pub(super) fn delete_thin(&self, layer: Option<&LayerName>, id: ThinId) -> Result<()> {
        match self.pool_step(layer, PoolOp::Delete { id }) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
