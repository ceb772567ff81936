//! Trim: have a layer's filesystem discard its free blocks, so the pool gets back what files
//! deleted since held (filesystems free blocks for themselves; the thin device keeps them
//! mapped until told). A mounted layer is trimmed where it is mounted read-write; an
//! unmounted one at a private mount for the call.

use super::*;

/// What a trim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// What the filesystem says it trimmed (ext4 and xfs count every free block they
    /// discarded, also those never written).
    pub trimmed: ByteSize,
    /// Pool data in use before the trim less after it: what came back to the pool (other
    /// layers' writes meanwhile count against it).
    pub given_back: ByteSize,
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Trim layer `name` (see the module). A committed layer is read-only and cannot be
    /// trimmed; one mounted only read-only, or mounted by someone other than thinstack (say
    /// containerd), is busy.
    pub fn trim(&self, name: &str) -> Result<Trimmed> {
        let (name, _guard) = self.lock_healthy(name)?;
        let record = self.ready_record(&name)?;
        if record.committed {
            return Err(Error::invalid(format!(
                "layer {name:?} is committed: its device is read-only, so nothing can be discarded from it"
            )));
        }
        self.ensure_writable(&format!("trim layer {name:?}"))?;
        // What is given back is the difference of two current counts.
        let before = self.kernel.usage()?.data.used;
        let record = self.drop_gone_mounts(record)?;
        let trimmed = match record.mounts.iter().find(|(_, m)| !m.read_only) {
            Some((target, _)) => self.fs.trim(target)?,
            None if !record.mounts.is_empty() => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("layer {name:?} is mounted read-only only; trim needs it unmounted or mounted read-write"),
                ))
            }
            None => self.trim_unmounted(&record)?,
        };
        let after = self.kernel.usage()?.data.used;
        let given_back = ByteSize::from_bytes(before.bytes().saturating_sub(after.bytes()));
        tracing::info!(layer = %name, %trimmed, %given_back, "layer trimmed");
        Ok(Trimmed {
            trimmed,
            given_back,
        })
    }

    /// Trim an unmounted layer at a private mount; its device is left as it was found.
    fn trim_unmounted(&self, record: &LayerRecord) -> Result<ByteSize> {
        let (node, activated_now) = self.ensure_active(record)?;
        let trimmed = if self.fs.mounts_of(&node)?.is_empty() {
            self.with_private_mount(record.thin_id, &node, record.filesystem, false, |target| {
                self.fs.trim(target)
            })
        } else {
            Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "layer {:?} is mounted by someone other than thinstack; trim it there (fstrim)",
                    record.name.as_str()
                ),
            ))
        };
        if activated_now {
            self.kernel.deactivate(record.thin_id)?;
        }
        trimmed
    }
}
