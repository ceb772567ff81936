//! Resizing a layer: its device, then its filesystem, with the intent recorded so a crash
//! is settled at the next start.

use super::*;

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Grow a layer's device and filesystem to `size`; smaller is refused, equal grows the
    /// filesystem only (finishing a resize a crash interrupted).
    pub fn resize(&self, name: &str, size: ByteSize) -> Result<Layer> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        let what = format!("resize layer {name:?}");
        let usage = self.ensure_writable(&what)?;
        if record.committed {
            return Err(Error::invalid(format!(
                "layer {name:?} is committed; it cannot change"
            )));
        }
        if size < record.size {
            return Err(Error::invalid(format!(
                "size {size} for layer {name:?} is smaller than its size {}; layers can only grow",
                record.size
            )));
        }
        if !record.mounts.is_empty() && record.mounts.values().all(|m| m.read_only) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("layer {name:?} is mounted read-only; unmount it to grow its filesystem"),
            ));
        }
        let growth =
            ByteSize::from_bytes(size.bytes().saturating_sub(record.device_size().bytes()));
        let _virtual = self.reserve_virtual(&what, &usage, growth)?;
        // The intent first: after a crash the device may be activated at the larger size (a
        // device larger than its filesystem is harmless, the reverse not), and reconcile
        // settles the size by what the filesystem became.
        let mut resizing = record.clone();
        resizing.resizing_to = Some(size);
        self.put(resizing.clone())?;
        crash::point(crash::Point::ResizeRecorded);
        // Not accepted: the record keeps its size, and its intent, which the next start
        // settles by what the filesystem became (it may have grown part way).
        self.grow_device_and_filesystem(&record, size)
            .map_err(|e| e.context(format!("resizing layer {:?} to {size}", name.as_str())))?;
        let mut grown = resizing;
        grown.resizing_to = None;
        grown.size = size;
        self.put(grown.clone())?;
        tracing::info!(layer = %name, size = %size, "layer resized");
        self.emit(Some(&name), EventKind::LayerResized { size });
        self.view(grown)
    }

    /// Grow `record`'s device to `size`, then its filesystem (where it is mounted read-write,
    /// or at a private place when unmounted); an inactive device is deactivated again.
    pub(super) fn grow_device_and_filesystem(
        &self,
        record: &LayerRecord,
        size: ByteSize,
    ) -> Result<()> {
        let id = record.thin_id;
        let node = match self.kernel.active_node(id)? {
            Some(node) => {
                self.kernel.resize(id, size)?;
                node
            }
            None => self.kernel.activate(id, size, false)?,
        };
        crash::point(crash::Point::ResizeReloaded);
        match record.mounts.iter().find(|(_, m)| !m.read_only) {
            Some((target, _)) => self.fs.grow(record.filesystem, &node, target)?,
            None if record.mounts.is_empty() => {
                self.grow_filesystem(id, &node, record.filesystem)?
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "layer {:?} is mounted read-only; unmount it to grow its filesystem",
                        record.name.as_str()
                    ),
                ))
            }
        }
        crash::point(crash::Point::ResizeGrown);
        if !record.active && record.mounts.is_empty() {
            self.deactivate_with_retries(id)?;
        }
        Ok(())
    }
}
