//! Giving a thin device that no record owns its layer back (`pool doctor --adopt ID NAME`).
//!
//! Start-up keeps every such device (it may be a layer whose record was moved aside, damaged,
//! or lost to an older copy of the state directory). The pool keeps no virtual size for a
//! thin device, so adoption reads the filesystem's own superblock for its type, size and UUID.

use std::collections::BTreeMap;

use super::{now_ns, Engine, Layer};
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::{FsKernel, PoolKernel};
use crate::names::ThinId;
use crate::records::{LayerRecord, LayerState};
use crate::units::ByteSize;

/// Long enough to read any superblock; the activation is read-only and brief.
const PROBE_LENGTH: ByteSize = ByteSize::mib(1);

/// The label an adopted layer carries: the thin id it was adopted from.
pub const ADOPTED_LABEL: &str = "thinstack.adopted-thin-id";

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Make thin device `id`, which no record owns, the layer `name` (a base layer: its parent,
    /// if it had one, is not known any more). Refused when a record owns it, when the pool has
    /// no such device, or when it holds no ext4 or xfs filesystem.
    pub fn adopt(&self, id: ThinId, name: &str) -> Result<Layer> {
        let (name, _guard) = self.lock_layer(name)?;
        if self.contains(&name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a layer named {name:?} exists already; choose another name"),
            ));
        }
        // Pool messages held off: no delete (`pool doctor --repair`) or other adoption of the
        // same device can pass between the checks and the record.
        let record = self.exclusive_pool_txn(|kernel, txn| {
            if txn.is_deleting(id) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("thin device {id} is a removed layer's, queued for deletion; it cannot be adopted"),
                ));
            }
            let owner = self
                .index()
                .layers
                .values()
                .find(|l| l.thin_ids().any(|t| t == id))
                .map(|l| l.name.clone());
            if let Some(owner) = owner {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "thin device {id} belongs to layer {:?} already",
                        owner.as_str()
                    ),
                ));
            }
            if !kernel.thin_ids()?.contains(&id) {
                return Err(Error::not_found(format!(
                    "the pool has no thin device {id}; `thinstack pool doctor` lists the ones no record owns"
                )));
            }
            let found = self.probe_thin(id)?;
            let record = LayerRecord {
                labels: BTreeMap::from([(ADOPTED_LABEL.to_string(), id.to_string())]),
                state: LayerState::Ready,
                ..LayerRecord::creating(
                    name.clone(),
                    id,
                    found.size,
                    found.fs,
                    found.uuid,
                    now_ns(),
                )
            };
            self.put(record.clone())?;
            Ok(record)
        })?;
        self.index().used_ids.insert(id);
        tracing::warn!(layer = %name, thin_id = %id, size = %record.size, filesystem = %record.filesystem, "adopted a thin device no record owned as a layer");
        self.view(record)
    }

    /// The filesystem on thin device `id`, read through a brief read-only activation (or its
    /// active device).
    fn probe_thin(&self, id: ThinId) -> Result<crate::kernel::superblock::Found> {
        let active = self.kernel.active_node(id)?;
        let node = match &active {
            Some(node) => node.clone(),
            None => self.kernel.activate(id, PROBE_LENGTH, true)?,
        };
        let found = self.fs.probe(&node);
        if active.is_none() {
            self.kernel.deactivate(id)?;
        }
        found?.ok_or_else(|| {
            Error::invalid(format!(
                "thin device {id} holds no ext4 or xfs filesystem, so thinstack cannot tell what \
                 layer it was; inspect it with `dmsetup` and thin_dump, or delete it with \
                 `thinstack pool doctor --repair --delete-unowned`"
            ))
        })
    }
}
