//! Leftovers found while the daemon runs (for `thinstack pool doctor`): thin devices no record
//! owns, records whose thin device is gone, mount records whose mount is gone, mounts of
//! layers their records do not know, and stale mount points under `<state_dir>/mnt`.
//!
//! Each check takes the locks the operations it could race with take, so a create, mount or
//! removal in flight is never mistaken for a leftover.

use std::path::{Path, PathBuf};

use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::{FsKernel, PoolKernel};
use crate::names::{LayerName, ThinId};
use crate::records::LayerState;

/// A stale mount point and what is left there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StalePoint {
    /// An empty directory of a layer that is gone.
    Directory(PathBuf),
    /// The mount a crash left while a filesystem was being grown.
    GrowthMount(PathBuf),
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Thin devices in the pool that no record owns.
    pub fn orphan_thin_ids(&self) -> Result<Vec<ThinId>> {
        // The pool is listed first, its owners read after: an owner (a record, the deletion
        // queue, another host's catalog entry) exists before its device is made and lets it
        // go only once it is deleted, so an id listed here that no owner has afterwards was
        // never a layer's, or was deleted in between.
        let listed = self.kernel.thin_ids()?;
        self.refresh_shared()?;
        let owned = self.owned_ids();
        let unowned: Vec<ThinId> = listed.difference(&owned).copied().collect();
        if unowned.is_empty() {
            return Ok(unowned);
        }
        // Ids are never handed out twice, so one still in the pool is the device listed, and
        // no owner had it: a leftover. (On rbd a deletion takes long enough to often finish
        // in the gap, and the owners' read waits for the deletion in flight.)
        let still = self.kernel.thin_ids()?;
        Ok(unowned
            .into_iter()
            .filter(|id| still.contains(id))
            .collect())
    }

    /// Deactivate and delete thin device `id`, which no record owns. Refused when a record
    /// owns it by now; `Busy` when someone holds its device.
    pub fn delete_orphan_thin(&self, id: ThinId) -> Result<()> {
        // The transaction lock comes before the index's: the queue is asked first.
        if self.is_queued_for_deletion(id) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("thin device {id} is queued for deletion already (a removed layer's); it goes in the background"),
            ));
        }
        {
            let mut index = self.index();
            if let Some(layer) = index
                .layers
                .values()
                .find(|l| l.thin_ids().any(|t| t == id))
            {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "thin device {id} belongs to layer {:?}",
                        layer.name.as_str()
                    ),
                ));
            }
            // Reserved for good, so no create is handed this id while (or after) it goes.
            index.used_ids.insert(id);
        }
        self.remove_thin_device(None, id)?;
        tracing::warn!(thin_id = %id, "deleted a thin device no record owned");
        Ok(())
    }

    /// The layer whose thin device is `id`.
    pub fn layer_of(&self, id: ThinId) -> Option<LayerName> {
        self.index()
            .layers
            .values()
            .find(|l| l.thin_id == id)
            .map(|l| l.name.clone())
    }

    /// Layers whose thin device the pool does not have.
    pub fn missing_layers(&self) -> Vec<LayerName> {
        self.index()
            .names_where(|l| l.missing && l.state == LayerState::Ready)
    }

    /// Mount records whose mount is gone (unmounted behind thinstack's back); with `repair`,
    /// the records drop them.
    pub fn stale_mount_records(&self, repair: bool) -> Result<Vec<(LayerName, PathBuf)>> {
        let mut stale = Vec::new();
        // Bound first: the index's lock must not be held across the loop.
        let mounted = self.index().names_where(|l| !l.mounts.is_empty());
        for name in mounted {
            let (name, _guard) = self.lock_layer(name.as_str())?;
            let Ok(mut record) = self.record(&name) else {
                continue; // removed meanwhile
            };
            let mut gone = Vec::new();
            for target in record.mounts.keys() {
                if !self.fs.is_mounted(target)? {
                    gone.push(target.clone());
                }
            }
            if gone.is_empty() {
                continue;
            }
            if repair {
                for target in &gone {
                    record.mounts.remove(target);
                }
                self.put(record)?;
                tracing::warn!(layer = %name, mounts = ?gone, "dropped mount records whose mount was gone");
            }
            stale.extend(gone.into_iter().map(|target| (name.clone(), target)));
        }
        Ok(stale)
    }

    /// Whether layer `name`'s device is mounted at `target` without its record knowing (a
    /// crash between mount and record, or a mount by hand); with `repair`, it is unmounted.
    pub fn unrecorded_mount(&self, name: &LayerName, target: &Path, repair: bool) -> Result<bool> {
        let (name, _guard) = self.lock_layer(name.as_str())?;
        let Ok(record) = self.record(&name) else {
            return Ok(false);
        };
        // containerd mounts its snapshots itself.
        if record.snapshot.is_some() {
            return Ok(false);
        }
        if record.mounts.contains_key(target) || !self.fs.is_mounted(target)? {
            return Ok(false);
        }
        if repair {
            let Some(node) = self.kernel.active_node(record.thin_id)? else {
                return Ok(false);
            };
            self.fs.unmount(target, &node)?;
            tracing::warn!(layer = %name, target = %target.display(), "unmounted a mount the records did not know");
        }
        Ok(true)
    }

    /// Directories under `<state_dir>/mnt` that no layer uses: empty default mount points of
    /// layers that are gone, and growth mounts a crash left (`.grow-<id>` of no create in
    /// flight). A directory that is not empty, or has something else mounted on it, is not
    /// thinstack's to judge.
    pub fn stale_mount_points(&self) -> Result<Vec<StalePoint>> {
        let mnt = self.settings.state_dir.join("mnt");
        let Ok(entries) = std::fs::read_dir(&mnt) else {
            return Ok(Vec::new());
        };
        let mut stale = Vec::new();
        for entry in entries.flatten() {
            if let Some(point) = self.stale_point(&entry.path())? {
                stale.push(point);
            }
        }
        stale.sort_by(|a, b| a.path().cmp(b.path()));
        Ok(stale)
    }

    /// Remove a stale mount point (unmounting a growth mount first), if it is still stale.
    pub fn remove_stale_point(&self, point: &StalePoint) -> Result<()> {
        if self.stale_point(point.path())?.as_ref() != Some(point) {
            return Ok(());
        }
        if let StalePoint::GrowthMount(target) = point {
            let node = self.growth_device(target)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Permission,
                    format!(
                        "{} has a mount of no active layer device; thinstack unmounts only its own mounts",
                        target.display()
                    ),
                )
            })?;
            self.fs.unmount(target, &node)?;
        }
        let path = point.path();
        std::fs::remove_dir(path)
            .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        tracing::warn!(path = %path.display(), "removed a stale mount point");
        Ok(())
    }

    /// The active device a growth mount point (`.grow-<id>`) was made for.
    pub(super) fn growth_device(&self, point: &Path) -> Result<Option<PathBuf>> {
        let id = point
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(".grow-"))
            .and_then(|id| id.parse::<u32>().ok())
            .and_then(|id| ThinId::new(id).ok());
        match id {
            Some(id) => self.kernel.active_node(id),
            None => Ok(None),
        }
    }

    fn stale_point(&self, path: &Path) -> Result<Option<StalePoint>> {
        let Some(file_name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Ok(None);
        };
        match file_name.strip_prefix(".grow-") {
            Some(id) => self.stale_growth_point(path, id),
            None => self.stale_layer_point(path, &file_name),
        }
    }

    fn stale_growth_point(&self, path: &Path, id: &str) -> Result<Option<StalePoint>> {
        let in_flight = id.parse::<u32>().ok().is_some_and(|id| {
            self.index()
                .layers
                .values()
                .any(|l| l.thin_id.value() == id && l.state == LayerState::Creating)
        });
        if in_flight {
            return Ok(None);
        }
        Ok(if self.fs.is_mounted(path)? {
            Some(StalePoint::GrowthMount(path.to_path_buf()))
        } else if is_empty_dir(path) {
            Some(StalePoint::Directory(path.to_path_buf()))
        } else {
            None
        })
    }

    fn stale_layer_point(&self, path: &Path, file_name: &str) -> Result<Option<StalePoint>> {
        let has_layer = LayerName::new(file_name).is_ok_and(|name| self.contains(&name));
        if has_layer || !is_empty_dir(path) || self.fs.is_mounted(path)? {
            return Ok(None);
        }
        Ok(Some(StalePoint::Directory(path.to_path_buf())))
    }
}

impl StalePoint {
    /// The directory.
    pub fn path(&self) -> &Path {
        match self {
            StalePoint::Directory(path) | StalePoint::GrowthMount(path) => path,
        }
    }
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}
