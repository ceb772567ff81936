//! Committing, activating and deactivating, mounting and unmounting a layer.

use super::*;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Make a layer read-only for good. Refused while it is mounted read-write.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn commit(&self, name: &str) -> Result<Layer> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        if record.committed {
            return self.view(record);
        }
        if let Some((target, _)) = record.mounts.iter().find(|(_, m)| !m.read_only) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is mounted read-write at {}; unmount it before committing",
                    target.display()
                ),
            ));
        }
        // An active device is re-made read-only, so nothing can write it after the commit.
        if self.kernel.active_node(record.thin_id)?.is_some() {
            self.deactivate_with_retries(record.thin_id)?;
            self.kernel
                .activate(record.thin_id, record.device_size(), true)?;
            crash::point(crash::Point::CommitReactivated);
        }
        let mut committed = record;
        committed.committed = true;
        committed.content_id = Some(ContentId::random()?);
        // A committed layer is never reset, so its spare is let go in the same write, as a
        // device to discard: the daemon's round deletes it as it does the device a reset
        // replaced. (If a reset's old device holds that slot still, the round deletes that
        // one first and then lets the spare go.)
        let spare_let_go = committed.let_spare_go();
        self.put(committed.clone())?;
        crash::point(crash::Point::CommitDone);
        tracing::info!(layer = %committed.name, "layer committed");
        if spare_let_go.is_some() {
            self.after_answer(|| {
                if let Err(e) = self.finish_discarding(committed.clone()) {
                    tracing::warn!(layer = %committed.name, error = %e, "deleting the spare a commit let go failed; will retry");
                }
            });
        }
        self.emit(Some(&committed.name), EventKind::LayerCommitted);
        self.view(committed)
    }

    /// The layer's block device, activating it when needed (read-only when committed).
    pub fn activate(&self, name: &str) -> Result<PathBuf> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        self.keep_active(record)
    }

    /// The node of `record`'s device, activated if needed and recorded as active (so a
    /// reboot brings it back). The caller holds the layer's lock.
    pub(super) fn keep_active(&self, record: LayerRecord) -> Result<PathBuf> {
        let (node, _) = self.ensure_active(&record)?;
        if !record.active {
            let mut active = record;
            active.active = true;
            self.put(active)?;
        }
        Ok(node)
    }

    /// The node of the layer's device, activating it (read-only when committed) if needed;
    /// and whether it was activated now.
    pub(super) fn ensure_active(&self, record: &LayerRecord) -> Result<(PathBuf, bool)> {
        match self.kernel.active_node(record.thin_id)? {
            Some(node) => Ok((node, false)),
            None => self
                .kernel
                .activate(record.thin_id, record.device_size(), record.committed)
                .map(|node| (node, true)),
        }
    }

    /// Deactivate a layer's device. Refused while thinstack has it mounted; `Busy` when
    /// another user holds it after a few retries.
    pub fn deactivate(&self, name: &str) -> Result<()> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        if let Some(target) = record.mounts.keys().next() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {name:?} is mounted at {}; unmount it first",
                    target.display()
                ),
            ));
        }
        if self.kernel.active_node(record.thin_id)?.is_some() {
            self.deactivate_with_retries(record.thin_id)?;
        }
        if record.active {
            let mut inactive = record;
            inactive.active = false;
            self.put(inactive)?;
        }
        Ok(())
    }
    /// Deactivate, retrying `Busy` a few times (udev or a closing user may hold the device a
    /// moment longer).
    pub(super) fn deactivate_with_retries(&self, id: ThinId) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.kernel.deactivate(id) {
                Err(e) if e.kind() == ErrorKind::Busy && attempt < self.settings.busy_retries => {
                    attempt += 1;
                    std::thread::sleep(self.settings.busy_retry_interval);
                }
                other => return other,
            }
        }
    }

    /// Mount a layer at `target` (default `<state_dir>/mnt/<name>`), read-only when asked or
    /// committed. Mounting the same layer at the same place again adds a user; each user
    /// unmounts once. Returns the mount point.
    ///
    /// A given target must be beneath `<state_dir>/mnt` or a configured mount root (else
    /// `Permission`), and an existing empty directory reached through no symbolic link. The
    /// mount table is asked before a record is trusted: a recorded mount that is gone (unmounted
    /// by hand) is mounted again, not merely counted.
    pub fn mount(&self, name: &str, target: Option<&Path>, read_only: bool) -> Result<PathBuf> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        let read_only = read_only || record.committed;
        if !read_only {
            self.ensure_writable(&format!(
                "mount layer {name:?} read-write (mount it read-only meanwhile)"
            ))?;
        }
        let target = match target {
            Some(path) => self.mount_policy().check(path)?,
            None => {
                let path = self.settings.state_dir.join("mnt").join(name.as_str());
                std::fs::create_dir_all(&path)
                    .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
                path
            }
        };
        let mut updated = self.drop_gone_mounts(record)?;
        if let Some(existing) = updated.mounts.get_mut(&target) {
            if existing.read_only != read_only {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {name:?} is mounted {} at {} already",
                        if existing.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        },
                        target.display()
                    ),
                ));
            }
            existing.refs += 1;
            self.put(updated)?;
            return Ok(target);
        }
        if self.fs.is_mounted(&target)? {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{} has something else mounted on it", target.display()),
            ));
        }
        let (node, activated_now) = self.ensure_active(&updated)?;
        let mounted = self.fs.mount(
            &node,
            &target,
            updated.filesystem,
            read_only,
            &self.settings.mount_options,
        );
        if let Err(e) = mounted {
            // A refused target changes nothing: not even the device's activation.
            if activated_now {
                let _ = self.kernel.deactivate(updated.thin_id);
            }
            return Err(e);
        }
        updated.active = true;
        updated
            .mounts
            .insert(target.clone(), MountRecord { refs: 1, read_only });
        if let Err(e) = self.put(updated) {
            // Never a mount the records do not know: take it back.
            if let Err(undo) = self.fs.unmount(&target, &node) {
                tracing::error!(layer = %name, target = %target.display(), error = %undo, "could not undo a mount whose record was not written; the next start records it");
            }
            return Err(e);
        }
        tracing::info!(layer = %name, target = %target.display(), read_only, "layer mounted");
        let event = EventKind::LayerMounted {
            target: target.clone(),
            read_only,
        };
        self.emit(Some(&name), event);
        Ok(target)
    }

    /// Where callers may mount layers.
    pub(super) fn mount_policy(&self) -> mount_policy::MountPolicy<'_> {
        mount_policy::MountPolicy {
            state_dir: &self.settings.state_dir,
            roots: &self.settings.mount_roots,
        }
    }

    /// `record` without the mounts the kernel no longer has (unmounted behind thinstack's
    /// back), written back when any were dropped.
    pub(super) fn drop_gone_mounts(&self, record: LayerRecord) -> Result<LayerRecord> {
        if record.mounts.is_empty() {
            return Ok(record);
        }
        let live: BTreeSet<PathBuf> = match self.kernel.active_node(record.thin_id)? {
            Some(node) => self
                .fs
                .mounts_of(&node)?
                .into_iter()
                .map(|(target, _)| target)
                .collect(),
            None => BTreeSet::new(),
        };
        let mut updated = record;
        let gone: Vec<PathBuf> = updated
            .mounts
            .keys()
            .filter(|target| !live.contains(*target))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(updated);
        }
        for target in &gone {
            updated.mounts.remove(target);
        }
        self.put(updated.clone())?;
        tracing::warn!(layer = %updated.name, mounts = ?gone, "dropped mount records whose mount was gone (unmounted by hand?)");
        Ok(updated)
    }

    /// Drop one user of a mount of the layer (the only mount, or the one at `target`); the last
    /// user unmounts. The device stays active. A recorded mount that the kernel no longer has
    /// is dropped from the record; one that something else now covers is refused.
    pub fn unmount(&self, name: &str, target: Option<&Path>) -> Result<()> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.record(&name)?;
        let had = record.mounts.len();
        let record = self.drop_gone_mounts(record)?;
        let target = match target {
            Some(path) => mount_policy::plain(path)?,
            None => match record.mounts.keys().collect::<Vec<_>>().as_slice() {
                [only] => (*only).clone(),
                [] if had > 0 => return Ok(()),
                [] => return Err(Error::invalid(format!("layer {name:?} is not mounted"))),
                many => {
                    return Err(Error::invalid(format!(
                        "layer {name:?} is mounted at {} places ({}); say which to unmount",
                        many.len(),
                        many.iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            },
        };
        let mut updated = record;
        let Some(mount) = updated.mounts.get_mut(&target) else {
            if had > updated.mounts.len() {
                // The one named was among those already gone.
                return Ok(());
            }
            return Err(Error::invalid(format!(
                "layer {name:?} is not mounted at {}",
                target.display()
            )));
        };
        if mount.refs > 1 {
            mount.refs -= 1;
            return self.put(updated);
        }
        let node = self.kernel.active_node(updated.thin_id)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Inconsistent,
                format!("layer {name:?} is recorded mounted but its device is not active"),
            )
        })?;
        self.fs.unmount(&target, &node)?;
        updated.mounts.remove(&target);
        self.put(updated)?;
        tracing::info!(layer = %name, target = %target.display(), "layer unmounted");
        self.emit(Some(&name), EventKind::LayerUnmounted { target });
        Ok(())
    }
}
