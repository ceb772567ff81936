//! Layers on a pool several hosts share (the `rbd` backend): each layer's durable facts live in
//! the pool's catalog ([`Catalog`]), every host's records follow it, and each host keeps what
//! is its own (activations, mounts) in its records alone.
//!
//! How the catalog and this host's records stay one:
//! - every record change of this host's making goes to the catalog first, by compare-and-set
//!   against the entry this host last saw, then to the record: a new layer's name is claimed
//!   there before its record exists (two hosts racing for a name get one layer and one
//!   `AlreadyExists`), and a change another host made first is refused (`Busy`), not lost;
//! - an entry carries a version, and a record the version it last agreed with, so a start
//!   tells a change of its own the catalog has not yet had (a crash between the two writes:
//!   published now) from a change another host made (taken);
//! - a removed layer's entry goes after its record, so an entry left behind is one this host
//!   was removing, and a start releases it; an entry of a layer this host was creating whose
//!   record never became durable (so the pool was never touched) is released the same way;
//! - a host reads the catalog again when its generation moves, before an operation by name, a
//!   list or a create: it takes new layers, changed facts, and drops the records of layers
//!   removed elsewhere (never one active or mounted here).

use serde::{Deserialize, Serialize};

use super::*;
use crate::kernel::catalog::{BrokenLock, Catalog, CatalogEntries, Moved};

/// A layer's entry in the catalog: its durable facts, which version of them, and who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    version: u64,
    /// The host that wrote this version (and that settles it when it is `creating` or
    /// `removing`).
    host: String,
    #[serde(flatten)]
    facts: Facts,
}

/// What every host must know of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Facts {
    state: LayerState,
    thin_id: ThinId,
    parent: Option<LayerName>,
    size: ByteSize,
    filesystem: FsType,
    fs_uuid: String,
    committed: bool,
    labels: BTreeMap<String, String>,
    created_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_id: Option<ContentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint_of: Option<LayerName>,
    /// A second image a reset on some host owns for the moment: never another host's leftover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    discarding: Option<ThinId>,
}

impl Facts {
    fn of(record: &LayerRecord) -> Facts {
        Facts {
            state: record.state,
            thin_id: record.thin_id,
            parent: record.parent.clone(),
            size: record.size,
            filesystem: record.filesystem,
            fs_uuid: record.fs_uuid.clone(),
            committed: record.committed,
            labels: record.labels.clone(),
            created_ns: record.created_ns,
            content_id: record.content_id.clone(),
            snapshot: record.snapshot.clone(),
            checkpoint_of: record.checkpoint_of.clone(),
            discarding: record.discarding,
        }
    }

    /// `record` with these facts, keeping what is this host's own (activation, mounts).
    fn applied_to(self, mut record: LayerRecord, version: u64) -> LayerRecord {
        record.state = self.state;
        record.thin_id = self.thin_id;
        record.parent = self.parent;
        record.size = self.size;
        record.filesystem = self.filesystem;
        record.fs_uuid = self.fs_uuid;
        record.committed = self.committed;
        record.labels = self.labels;
        record.created_ns = self.created_ns;
        record.content_id = self.content_id;
        record.snapshot = self.snapshot;
        record.checkpoint_of = self.checkpoint_of;
        record.discarding = self.discarding;
        record.shared_version = Some(version);
        record
    }
}

/// The catalog as this host last saw it: the raw entries compare-and-set compares against.
#[derive(Default)]
pub(super) struct Seen {
    generation: Option<String>,
    raw: BTreeMap<String, String>,
}

impl Seen {
    /// This host changed entry `name` to `raw` (removed it when `None`), moving the catalog's
    /// generation: still up to date if it had read the generation the change was made on.
    fn changed(&mut self, name: String, raw: Option<String>, moved: Moved) {
        match raw {
            Some(raw) => self.raw.insert(name, raw),
            None => self.raw.remove(&name),
        };
        if self.generation.as_ref() == Some(&moved.before) {
            self.generation = Some(moved.after);
        }
    }
}

fn parse(name: &str, raw: &str) -> Result<Entry> {
    serde_json::from_str(raw).map_err(|e| {
        Error::inconsistent(format!(
            "the pool's catalog entry of layer {name:?} is damaged ({e}); \
             `thinstack pool doctor` on any host lists the layer's image"
        ))
    })
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Put `record`'s facts in the catalog, when the pool has one and they changed, and note
    /// the version in the record. A record new to this host claims its name. The caller
    /// holds the layer's lock and writes the record next.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn publish(&self, record: &mut LayerRecord) -> Result<()> {
        let Some(catalog) = self.kernel.catalog() else {
            return Ok(());
        };
        let name = record.name.as_str().to_string();
        let known_here = self.contains(&record.name);
        // A name this host has no record of is claimed, whatever it saw: an entry it saw
        // is another host's layer, never one to overwrite.
        let old_raw = if known_here {
            self.seen().raw.get(&name).cloned()
        } else {
            None
        };
        let old = old_raw
            .as_deref()
            .map(|raw| parse(&name, raw))
            .transpose()?;
        let facts = Facts::of(record);
        if let Some(old) = &old {
            if old.facts == facts {
                record.shared_version = Some(old.version);
                return Ok(());
            }
        }
        let entry = Entry {
            version: old.map_or(1, |old| old.version + 1),
            host: catalog.host().to_string(),
            facts,
        };
        let new_raw = serde_json::to_string(&entry).expect("entries always serialize");
        let moved = match catalog.swap(&name, old_raw.as_deref(), Some(&new_raw)) {
            Ok(moved) => moved,
            Err(e) => {
                // Read again before the next operation: the refusal says the catalog moved.
                self.seen().generation = None;
                return Err(e);
            }
        };
        self.seen().changed(name, Some(new_raw), moved);
        record.shared_version = Some(entry.version);
        crash::point(crash::Point::SharedPublished);
        Ok(())
    }

    /// Take layer `name`'s entry out of the catalog, after its record went. A failure is
    /// left to the next start, which releases an entry this host was removing.
    pub(super) fn unpublish(&self, name: &LayerName) {
        let Some(catalog) = self.kernel.catalog() else {
            return;
        };
        crash::point(crash::Point::SharedRecordDropped);
        let Some(old) = self.seen().raw.get(name.as_str()).cloned() else {
            return;
        };
        match catalog.swap(name.as_str(), Some(&old), None) {
            Ok(moved) => self.seen().changed(name.as_str().to_string(), None, moved),
            Err(e) => {
                tracing::warn!(layer = %name, error = %e, "could not take the removed layer out of the pool's catalog; the next start does");
            }
        }
    }

    /// Every thin id an entry of the catalog (as last read) owns: the layers of every host,
    /// those being made or removed on another host included.
    pub(super) fn shared_ids(&self) -> BTreeSet<ThinId> {
        self.seen()
            .raw
            .iter()
            .filter_map(|(name, raw)| parse(name, raw).ok())
            .flat_map(|entry| std::iter::once(entry.facts.thin_id).chain(entry.facts.discarding))
            .collect()
    }

    /// A thin id from the catalog, when the pool has one (so no two hosts make one image).
    pub(super) fn shared_id(&self) -> Result<Option<ThinId>> {
        self.kernel
            .catalog()
            .map(|catalog| catalog.allocate_id())
            .transpose()
    }

    /// Follow the catalog when it moved since this host last read it (see the module docs).
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn refresh_shared(&self) -> Result<()> {
        let Some(catalog) = self.kernel.catalog() else {
            return Ok(());
        };
        let generation = catalog.generation()?;
        if self.seen().generation.as_ref() == Some(&generation) {
            return Ok(());
        }
        self.sync_catalog(catalog)
    }

    /// Make this host's records and the catalog one (see the module docs). A layer some
    /// operation here holds is left for the next sync. A start calls it before it settles
    /// its records, so that what it writes is compared against what the catalog holds.
    pub(super) fn sync_catalog(&self, catalog: &dyn Catalog) -> Result<()> {
        let CatalogEntries {
            generation,
            entries,
        } = catalog.entries()?;
        // Not the entries themselves: an operation here may have changed one since the read.
        self.seen().generation = Some(generation);
        let mut names: BTreeSet<String> = entries.keys().cloned().collect();
        names.extend(self.index().layers.keys().map(|n| n.as_str().to_string()));
        let mut unsettled = false;
        for name in names {
            let Ok(layer) = LayerName::new(&name) else {
                tracing::warn!(
                    name,
                    "the pool's catalog holds a name thinstack refuses; left alone"
                );
                continue;
            };
            let Some(_guard) = self.locks.try_lock(&layer) else {
                unsettled = true;
                continue;
            };
            let raw = match self.entry_now(catalog, &name, entries.get(&name)) {
                Ok(raw) => raw,
                Err(e) => {
                    tracing::warn!(layer = %layer, error = %e, "could not read the layer's catalog entry; tried again at the next read");
                    unsettled = true;
                    continue;
                }
            };
            let entry = match raw.as_deref().map(|raw| parse(&name, raw)).transpose() {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(error = %e, "left alone");
                    continue;
                }
            };
            let local = self.index().layers.get(&layer).cloned();
            if let Err(e) = self.sync_layer(catalog, &layer, local, entry) {
                tracing::warn!(layer = %layer, error = %e, "could not follow the pool's catalog for this layer; tried again at the next read");
                unsettled = true;
            }
        }
        if unsettled {
            self.seen().generation = None;
        }
        Ok(())
    }

    /// Entry `name` as it is now, the layer's lock held: the full read's copy when it is what
    /// this host knew already, else read again (an operation here may have changed the entry
    /// after the full read: a layer made meanwhile would otherwise look removed elsewhere).
    /// This host's knowledge of it becomes that.
    fn entry_now(
        &self,
        catalog: &dyn Catalog,
        name: &str,
        read: Option<&String>,
    ) -> Result<Option<String>> {
        let known = self.seen().raw.get(name).cloned();
        let now = if read == known.as_ref() {
            known
        } else {
            catalog.entry(name)?
        };
        let mut seen = self.seen();
        match &now {
            Some(raw) => seen.raw.insert(name.to_string(), raw.clone()),
            None => seen.raw.remove(name),
        };
        Ok(now)
    }

    fn sync_layer(
        &self,
        catalog: &dyn Catalog,
        name: &LayerName,
        local: Option<LayerRecord>,
        entry: Option<Entry>,
    ) -> Result<()> {
        match (local, entry) {
            (None, None) => Ok(()),
            (None, Some(entry)) => self.take_new(catalog, name, entry),
            (Some(local), None) => self.follow_removal(local),
            (Some(local), Some(entry)) => self.follow_entry(local, entry),
        }
    }

    /// An entry this host has no record of: another host's layer (taken once ready), or an
    /// entry this host was making or removing when it stopped (released).
    fn take_new(&self, catalog: &dyn Catalog, name: &LayerName, entry: Entry) -> Result<()> {
        if entry.facts.state == LayerState::Ready {
            let blank = LayerRecord::creating(
                name.clone(),
                entry.facts.thin_id,
                entry.facts.size,
                entry.facts.filesystem,
                String::new(),
                0,
            );
            let host = entry.host.clone();
            let record = entry.facts.applied_to(blank, entry.version);
            tracing::info!(layer = %name, host = %host, "layer of another host taken from the pool's catalog");
            return self.write_unpublished(record);
        }
        if entry.host != catalog.host() {
            return Ok(()); // being made or removed on its host, which settles it
        }
        // This host's record of it is gone, and records go durable before the pool is
        // touched and are removed after the layer's image: nothing of it is in the pool.
        let raw = self.seen().raw.get(name.as_str()).cloned();
        if let Some(raw) = raw {
            let moved = catalog.swap(name.as_str(), Some(&raw), None)?;
            self.seen().changed(name.as_str().to_string(), None, moved);
            tracing::info!(layer = %name, state = ?entry.facts.state, "released the catalog entry of a layer this host's crash cut short");
        }
        Ok(())
    }

    /// A record whose layer has no entry: removed by another host (dropped here unless it is
    /// in use here), or a layer from before the catalog (published now).
    fn follow_removal(&self, local: LayerRecord) -> Result<()> {
        if local.shared_version.is_none() {
            let mut record = local;
            self.publish(&mut record)?;
            return self.write_unpublished(record);
        }
        if local.active || !local.mounts.is_empty() {
            tracing::warn!(layer = %local.name, "layer removed by another host is still active here; kept until deactivated");
            return Ok(());
        }
        tracing::info!(layer = %local.name, "layer removed by another host; its record here is dropped");
        self.store.remove_layer(&local.name)?;
        self.index().remove(&local.name);
        Ok(())
    }

    /// A record and its entry: the newer facts win.
    fn follow_entry(&self, local: LayerRecord, entry: Entry) -> Result<()> {
        match local.shared_version {
            Some(version) if version == entry.version => {
                if Facts::of(&local) != entry.facts {
                    // This host's change, cut off before the catalog had it.
                    let mut record = local;
                    self.publish(&mut record)?;
                    return self.write_unpublished(record);
                }
                Ok(())
            }
            Some(version) if version > entry.version => Err(Error::inconsistent(format!(
                "layer {:?}: this host's record is at catalog version {version}, the catalog \
                 at {}; the catalog was rolled back",
                local.name.as_str(),
                entry.version
            ))),
            None if local.thin_id != entry.facts.thin_id => Err(Error::inconsistent(format!(
                "layer {:?} is thin {} here and thin {} in the pool's catalog (made on host {})",
                local.name.as_str(),
                local.thin_id,
                entry.facts.thin_id,
                entry.host
            ))),
            _ => {
                let record = entry.facts.applied_to(local, entry.version);
                self.write_unpublished(record)
            }
        }
    }

    /// Before a destroy: `Some(other hosts)` when the pool is shared with others, after
    /// checking that nothing of it is in use here, so the destroy takes only this host out of
    /// it (its layers are every host's); `None` when this host is the pool's last or only one.
    pub fn leaving_shared_pool(&self) -> Result<Option<Vec<String>>> {
        let others = self.kernel.other_hosts()?;
        if others.is_empty() {
            return Ok(None);
        }
        let in_use = self
            .index()
            .names_where(|l| l.active || !l.mounts.is_empty());
        if !in_use.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "this host leaves the pool (hosts {} share it, so their layers stay), but \
                     layers are active or mounted here: {}; unmount and deactivate them first",
                    others.join(", "),
                    in_use
                        .iter()
                        .map(LayerName::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(Some(others))
    }

    /// Take layer `name`'s writer lock away from the host that holds it, fencing that host's
    /// clients of the layer's image, so this host may write it. For an operator who knows that
    /// host is dead: one still alive loses its writes from then on (see the README).
    pub fn break_lock(&self, name: &str) -> Result<BrokenLock> {
        let (name, _guard) = self.lock_layer(name)?;
        let record = self.ready_record(&name)?;
        let broken = self.kernel.break_writer_lock(record.thin_id).map_err(|e| {
            e.context(format!(
                "breaking the writer lock of layer {:?}",
                name.as_str()
            ))
        })?;
        tracing::warn!(layer = %name, holder = %broken.holder, fenced = ?broken.fenced, "writer lock broken");
        Ok(broken)
    }

    /// Write a record the catalog already agrees with.
    fn write_unpublished(&self, record: LayerRecord) -> Result<()> {
        self.store.put_layer(&record)?;
        self.index().insert(record);
        Ok(())
    }
}
