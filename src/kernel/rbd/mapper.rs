//! Which driver maps a pool's images (`pool.rbd.map`): the kernel's rbd driver ([`super::map`])
//! or rbd-nbd ([`super::nbd`]), behind one set of calls.

use super::map::{self, Driver, MapRequest, Mapped};
use super::nbd::{self, NbdClient};
use crate::error::Result;

/// How images are mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapper {
    /// The kernel's rbd driver, through sysfs.
    Krbd,
    /// rbd-nbd, a process per device, reaching the cluster as the client says.
    Nbd(NbdClient),
}

impl Mapper {
    /// Map `request`.
    pub fn map(&self, request: &MapRequest) -> Result<Mapped> {
        match self {
            Mapper::Krbd => map::map(request),
            Mapper::Nbd(client) => nbd::map(request, client),
        }
    }

    /// Every image this mapper's driver has mapped on this host.
    pub fn mapped(&self) -> Result<Vec<Mapped>> {
        match self {
            Mapper::Krbd => map::mapped(),
            Mapper::Nbd(_) => nbd::mapped(),
        }
    }

    /// Unmap `mapping`; `Busy` while it is mounted or open.
    pub fn unmap(&self, mapping: &Mapped) -> Result<()> {
        match mapping.driver {
            Driver::Krbd => map::unmap(mapping.id),
            Driver::Nbd => nbd::unmap(mapping),
        }
    }

    /// Make `mapping`'s device follow its image's resize to `bytes`.
    pub fn refresh(&self, mapping: &Mapped, bytes: u64) -> Result<()> {
        match mapping.driver {
            Driver::Krbd => map::refresh(mapping.id),
            Driver::Nbd => nbd::refresh(mapping, bytes),
        }
    }
}
