//! The catalog of a pool that several hosts share (the `rbd` backend): one entry per layer
//! name, kept in the cluster beside the images, so every host sees every layer and no two hosts
//! take one name. Entries are opaque to the kernel seam (the engine writes them); what the seam
//! guarantees is that each change is a compare-and-set, so a host never overwrites a change it
//! has not seen, and that thin ids come from one counter, so no two hosts make one image.
//!
//! [`SimCatalog`] is the in-memory catalog two sim kernels share in the engine's tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::names::{ThinId, THIN_ID_MAX};

/// Every entry of a catalog, and the generation they are at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogEntries {
    /// Changes with every change of an entry; equal generations mean equal entries.
    pub generation: String,
    /// Layer name → entry.
    pub entries: BTreeMap<String, String>,
}

/// The generation a change of the catalog moved it from and to: a host that had read the
/// catalog at `before` has read all of it but this change, which it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The generation the change was made on.
    pub before: String,
    /// The generation it made.
    pub after: String,
}

/// A catalog of layers shared by the hosts of one pool.
pub trait Catalog: Send + Sync {
    /// This host's name in the catalog: which host made, or is changing, an entry.
    fn host(&self) -> &str;
    /// A thin id that the catalog has handed to no host before.
    fn allocate_id(&self) -> Result<ThinId>;
    /// The generation of the entries now (one small read: is a full read needed?).
    fn generation(&self) -> Result<String>;
    /// Every entry.
    fn entries(&self) -> Result<CatalogEntries>;
    /// Entry `name` now (one small read).
    fn entry(&self, name: &str) -> Result<Option<String>>;
    /// Set entry `name` to `new` (remove it when `None`) if it is `old` now (absent when
    /// `None`), moving the generation on by one. `AlreadyExists` when `old` is `None` and the
    /// name is taken; `Busy` when the entry is not `old` any more (another host changed it).
    fn swap(&self, name: &str, old: Option<&str>, new: Option<&str>) -> Result<Moved>;
}

/// What breaking another host's writer lock did ([`crate::kernel::PoolKernel::break_writer_lock`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokenLock {
    /// The host that held it.
    pub holder: String,
    /// The clients fenced (blocklisted) so that they cannot write on: that host's kernel
    /// mapping of the image, and whoever else had it open.
    pub fenced: Vec<String>,
}

/// The error of a [`Catalog::swap`] whose `old` did not hold.
pub fn swap_refused(name: &str, old: Option<&str>) -> Error {
    match old {
        None => Error::new(
            ErrorKind::AlreadyExists,
            format!("a layer named {name:?} exists already (made by another host of the pool)"),
        ),
        Some(_) => Error::new(
            ErrorKind::Busy,
            format!(
                "layer {name:?} was changed by another host of the pool meanwhile; \
                 try again (it is re-read first)"
            ),
        ),
    }
}

/// The next thin id after `id` the counter hands out, or `NoSpace`.
pub fn next_id(last: u32) -> Result<ThinId> {
    if last >= THIN_ID_MAX {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!("the pool's catalog has handed out all {THIN_ID_MAX} thin ids"),
        ));
    }
    ThinId::new(last + 1)
}

/// An in-memory catalog, shared by sim kernels standing for hosts.
#[derive(Debug, Default)]
pub struct SimCatalog {
    state: Mutex<SimCatalogState>,
}

#[derive(Debug, Default)]
struct SimCatalogState {
    entries: BTreeMap<String, String>,
    last_id: u32,
    changes: u64,
    /// What the next full read returns instead of the entries ([`SimCatalog::stale_read_once`]).
    stale: Option<CatalogEntries>,
}

impl SimCatalog {
    fn state(&self) -> MutexGuard<'_, SimCatalogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This catalog as seen from `host`.
    pub fn for_host(self: &std::sync::Arc<Self>, host: &str) -> SimCatalogHost {
        SimCatalogHost {
            catalog: self.clone(),
            host: host.to_string(),
        }
    }

    /// Every entry (for tests).
    pub fn entries_now(&self) -> BTreeMap<String, String> {
        self.state().entries.clone()
    }

    /// The entries as they are now, to be served by a later read.
    pub fn read_now(&self) -> CatalogEntries {
        let state = self.state();
        CatalogEntries {
            generation: state.changes.to_string(),
            entries: state.entries.clone(),
        }
    }

    /// Make the next full read return `read` (taken earlier), as a read that left the
    /// cluster before changes this host made since would: its generation moves on, so a
    /// host's next read is a full one.
    pub fn stale_read_once(&self, read: CatalogEntries) {
        let mut state = self.state();
        state.changes += 1;
        state.stale = Some(read);
    }
}

/// A [`SimCatalog`] as one host sees it.
#[derive(Debug, Clone)]
pub struct SimCatalogHost {
    catalog: std::sync::Arc<SimCatalog>,
    host: String,
}

impl Catalog for SimCatalogHost {
    fn host(&self) -> &str {
        &self.host
    }

    fn allocate_id(&self) -> Result<ThinId> {
        let mut state = self.catalog.state();
        let id = next_id(state.last_id)?;
        state.last_id = id.value();
        Ok(id)
    }

    fn generation(&self) -> Result<String> {
        Ok(self.catalog.state().changes.to_string())
    }

    fn entries(&self) -> Result<CatalogEntries> {
        let mut state = self.catalog.state();
        if let Some(stale) = state.stale.take() {
            return Ok(stale);
        }
        Ok(CatalogEntries {
            generation: state.changes.to_string(),
            entries: state.entries.clone(),
        })
    }

    fn entry(&self, name: &str) -> Result<Option<String>> {
        Ok(self.catalog.state().entries.get(name).cloned())
    }

    fn swap(&self, name: &str, old: Option<&str>, new: Option<&str>) -> Result<Moved> {
        let mut state = self.catalog.state();
        if state.entries.get(name).map(String::as_str) != old {
            return Err(swap_refused(name, old));
        }
        match new {
            Some(new) => state.entries.insert(name.to_string(), new.to_string()),
            None => state.entries.remove(name),
        };
        state.changes += 1;
        Ok(Moved {
            before: (state.changes - 1).to_string(),
            after: state.changes.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_name_is_claimed_once_and_changed_only_from_what_was_seen() {
        let catalog = Arc::new(SimCatalog::default());
        let (a, b) = (catalog.for_host("a"), catalog.for_host("b"));
        a.swap("base", None, Some("1")).unwrap();
        let taken = b.swap("base", None, Some("2")).unwrap_err();
        assert_eq!(taken.kind(), ErrorKind::AlreadyExists);
        b.swap("base", Some("1"), Some("2")).unwrap();
        let stale = a.swap("base", Some("1"), None).unwrap_err();
        assert_eq!(stale.kind(), ErrorKind::Busy);
        assert_eq!(a.entries().unwrap().entries["base"], "2");
    }

    #[test]
    fn ids_are_handed_out_once_across_hosts() {
        let catalog = Arc::new(SimCatalog::default());
        let ids: Vec<u32> = (0..4)
            .map(|i| {
                catalog
                    .for_host(&format!("h{i}"))
                    .allocate_id()
                    .unwrap()
                    .value()
            })
            .collect();
        assert_eq!(ids, [1, 2, 3, 4]);
    }
}
