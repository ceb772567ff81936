//! An rbd pool's catalog of layers ([`Catalog`]): one RADOS object beside the images, whose
//! omap holds an entry per layer (`layer.<name>`), the last thin id handed out, and a
//! generation that every change sets anew. Each change is one RADOS write operation that
//! compares before it writes, so it is atomic across hosts.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{ErrorKind, Result};
use crate::kernel::catalog::{self, Catalog, CatalogEntries};
use crate::kernel::rbd::Io;
use crate::names::ThinId;

const LAYER_PREFIX: &str = "layer.";
const GENERATION: &str = "generation";
const LAST_ID: &str = "last_thin_id";

/// The catalog of the pool whose state object is `object`, as host `host` sees it.
pub struct RadosCatalog {
    io: Io,
    object: String,
    host: String,
    /// Makes each generation this host writes distinct from its last.
    changes: AtomicU64,
}

impl RadosCatalog {
    /// Open the catalog object `object` of `io`, making it when it is not there yet.
    pub fn open(io: Io, object: String, host: String) -> Result<Self> {
        match io.create_object(&object, LAST_ID, "0") {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            other => other?,
        }
        Ok(RadosCatalog {
            io,
            object,
            host,
            changes: AtomicU64::new(0),
        })
    }

    fn new_generation(&self) -> String {
        let change = self.changes.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}:{now}:{change}", self.host)
    }
}

impl Catalog for RadosCatalog {
    fn host(&self) -> &str {
        &self.host
    }

    fn allocate_id(&self) -> Result<ThinId> {
        loop {
            let last = self
                .io
                .omap_value(&self.object, LAST_ID)?
                .unwrap_or_default();
            let id = catalog::next_id(last.parse().unwrap_or(0))?;
            let next = id.value().to_string();
            if self
                .io
                .omap_swap(&self.object, LAST_ID, Some(&last), Some(&next), &[])?
            {
                return Ok(id);
            }
        }
    }

    fn generation(&self) -> Result<String> {
        Ok(self
            .io
            .omap_value(&self.object, GENERATION)?
            .unwrap_or_default())
    }

    fn entries(&self) -> Result<CatalogEntries> {
        let mut all = self.io.omap_entries(&self.object, "")?;
        let generation = all.remove(GENERATION).unwrap_or_default();
        let entries = all
            .into_iter()
            .filter_map(|(key, value)| Some((key.strip_prefix(LAYER_PREFIX)?.to_string(), value)))
            .collect();
        Ok(CatalogEntries {
            generation,
            entries,
        })
    }

    fn swap(&self, name: &str, old: Option<&str>, new: Option<&str>) -> Result<()> {
        let key = format!("{LAYER_PREFIX}{name}");
        let generation = self.new_generation();
        if self
            .io
            .omap_swap(&self.object, &key, old, new, &[(GENERATION, &generation)])?
        {
            Ok(())
        } else {
            Err(catalog::swap_refused(name, old))
        }
    }
}
