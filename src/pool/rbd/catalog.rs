//! An rbd pool's catalog of layers ([`Catalog`]): one RADOS object beside the images, whose
//! omap holds an entry per layer (`layer.<name>`), the last thin id handed out, and a
//! generation that every change moves on by one. Each change is one RADOS write operation that
//! compares the entry and the generation before it writes, so it is atomic across hosts, and
//! a host that made the last change knows it has read everything else.

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::catalog::{self, Catalog, CatalogEntries, Moved};
use crate::kernel::rbd::{Guarded, Io};
use crate::names::ThinId;

const LAYER_PREFIX: &str = "layer.";
const GENERATION: &str = "generation";
const LAST_ID: &str = "last_thin_id";

/// The catalog of the pool whose state object is `object`, as host `host` sees it.
pub struct RadosCatalog {
    io: Io,
    object: String,
    host: String,
    /// The generation this host last read or wrote: the guess each change compares against
    /// (right unless another host changed the catalog since).
    generation: Mutex<u64>,
    /// The last thin id this host handed out or read (the guess of the next allocation).
    last_id: Mutex<u32>,
}

impl RadosCatalog {
    /// Open the catalog object `object` of `io`, making it when it is not there yet.
    pub fn open(io: Io, object: String, host: String) -> Result<Self> {
        match io.create_object(&object, LAST_ID, "0") {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            other => other?,
        }
        let catalog = RadosCatalog {
            io,
            object,
            host,
            generation: Mutex::new(0),
            last_id: Mutex::new(0),
        };
        catalog.read_generation()?;
        Ok(catalog)
    }

    /// The generation now, read from the cluster (0 for a catalog no change has touched).
    fn read_generation(&self) -> Result<u64> {
        let text = self
            .io
            .omap_value(&self.object, GENERATION)?
            .unwrap_or_default();
        let generation = if text.is_empty() {
            0
        } else {
            text.parse().map_err(|_| {
                Error::inconsistent(format!(
                    "{}: generation {text:?} is not a number",
                    self.object
                ))
            })?
        };
        *self.last_generation() = generation;
        Ok(generation)
    }

    fn last_generation(&self) -> MutexGuard<'_, u64> {
        self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Catalog for RadosCatalog {
    fn host(&self) -> &str {
        &self.host
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn allocate_id(&self) -> Result<ThinId> {
        // The id this host handed out last is the guess; a miss reads the counter.
        let mut last = self.last_id.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let id = catalog::next_id(*last)?;
            let (was, next) = (last.to_string(), id.value().to_string());
            if self
                .io
                .omap_swap(&self.object, LAST_ID, Some(&was), Some(&next), &[])?
            {
                *last = id.value();
                return Ok(id);
            }
            let text = self
                .io
                .omap_value(&self.object, LAST_ID)?
                .unwrap_or_default();
            *last = text.parse().map_err(|_| {
                Error::inconsistent(format!(
                    "{}: {LAST_ID} {text:?} is not a number",
                    self.object
                ))
            })?;
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn generation(&self) -> Result<String> {
        self.read_generation().map(|g| g.to_string())
    }

    fn entries(&self) -> Result<CatalogEntries> {
        let mut all = self.io.omap_entries(&self.object, "")?;
        let generation = all
            .remove(GENERATION)
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| "0".into());
        let entries = all
            .into_iter()
            .filter_map(|(key, value)| Some((key.strip_prefix(LAYER_PREFIX)?.to_string(), value)))
            .collect();
        Ok(CatalogEntries {
            generation,
            entries,
        })
    }

    fn entry(&self, name: &str) -> Result<Option<String>> {
        self.io
            .omap_value(&self.object, &format!("{LAYER_PREFIX}{name}"))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn swap(&self, name: &str, old: Option<&str>, new: Option<&str>) -> Result<Moved> {
        let key = format!("{LAYER_PREFIX}{name}");
        let mut before = *self.last_generation();
        // Each pass that meets a generation another host moved reads it and tries again.
        for _ in 0..100 {
            let (was, after) = (generation_text(before), generation_text(before + 1));
            let outcome = self.io.omap_swap_guarded(
                &self.object,
                (&key, old, new),
                (GENERATION, &was, &after),
            )?;
            match outcome {
                Guarded::Done => {
                    *self.last_generation() = before + 1;
                    return Ok(Moved {
                        before: before.to_string(),
                        after: (before + 1).to_string(),
                    });
                }
                Guarded::KeyDiffered => return Err(catalog::swap_refused(name, old)),
                Guarded::GuardDiffered => before = self.read_generation()?,
            }
        }
        Err(Error::new(
            ErrorKind::Busy,
            format!("the pool's catalog changed 100 times while this host changed layer {name:?}; try again"),
        ))
    }
}

/// How a generation is stored: the counter, but "" for 0 (an absent key compares as "").
fn generation_text(generation: u64) -> String {
    if generation == 0 {
        String::new()
    } else {
        generation.to_string()
    }
}
