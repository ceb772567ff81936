//! The records in memory, indexed for the engine's queries (children, snapshot keys, ids in
//! use, degraded layers).

use super::*;

/// The records in memory.
#[derive(Default)]
pub(super) struct Index {
    pub(super) layers: BTreeMap<LayerName, LayerRecord>,
    /// Thin ids in use: owned by a record, or seen in the pool at the last reconcile.
    pub(super) used_ids: BTreeSet<ThinId>,
    /// Parent -> children, kept with the records so no operation scans every layer.
    pub(super) children: BTreeMap<LayerName, BTreeSet<LayerName>>,
    /// containerd's (namespace, key) -> the layer that is that snapshot, for every snapshot
    /// not being removed (a removed key is free again at once, even while its device waits
    /// for deferred removal).
    pub(super) snapshot_keys: BTreeMap<(String, String), LayerName>,
    /// Layers whose settling at start failed, with why: refused until repaired.
    pub(super) degraded: BTreeMap<LayerName, String>,
    /// The records' virtual sizes, summed (for the overcommit limit); wider than a size, as
    /// many layers of the largest size add up past `u64`.
    pub(super) virtual_bytes: u128,
    /// Virtual bytes creates and resizes hold before their records count them.
    pub(super) reserved_virtual: u128,
}

impl Index {
    pub(super) fn children_of(&self, name: &LayerName) -> Vec<LayerName> {
        self.children
            .get(name)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn insert(&mut self, record: LayerRecord) {
        if let Some(old) = self.layers.get(&record.name).cloned() {
            self.forget_snapshot_key(&old);
            self.virtual_bytes -= u128::from(old.device_size().bytes());
            // A reset moves a layer to another thin device and deletes the old one first.
            for id in old
                .thin_ids()
                .filter(|id| !record.thin_ids().any(|new| new == *id))
            {
                self.used_ids.remove(&id);
            }
        }
        self.virtual_bytes += u128::from(record.device_size().bytes());
        self.used_ids.extend(record.thin_ids());
        index_child(&mut self.children, &record);
        if let Some(snapshot) = &record.snapshot {
            if record.state != LayerState::Removing {
                self.snapshot_keys.insert(
                    (snapshot.namespace.clone(), snapshot.key.clone()),
                    record.name.clone(),
                );
            }
        }
        self.layers.insert(record.name.clone(), record);
    }

    /// Free the key of snapshot `record`, if it is still this layer's.
    pub(super) fn forget_snapshot_key(&mut self, record: &LayerRecord) {
        if let Some(snapshot) = &record.snapshot {
            let key = (snapshot.namespace.clone(), snapshot.key.clone());
            if self.snapshot_keys.get(&key) == Some(&record.name) {
                self.snapshot_keys.remove(&key);
            }
        }
    }

    pub(super) fn remove(&mut self, name: &LayerName) {
        self.degraded.remove(name);
        let Some(record) = self.layers.remove(name) else {
            return;
        };
        self.forget_snapshot_key(&record);
        self.virtual_bytes -= u128::from(record.device_size().bytes());
        for id in record.thin_ids() {
            self.used_ids.remove(&id);
        }
        if let Some(parent) = &record.parent {
            if let Some(siblings) = self.children.get_mut(parent) {
                siblings.remove(name);
                if siblings.is_empty() {
                    self.children.remove(parent);
                }
            }
        }
    }

    /// Every thin id a record owns: each layer's own, one a reset is discarding, and a spare
    /// for the next reset.
    pub(super) fn owned_ids(&self) -> BTreeSet<ThinId> {
        self.layers
            .values()
            .flat_map(LayerRecord::thin_ids)
            .collect()
    }

    pub(super) fn deferred_count(&self) -> usize {
        self.layers.values().filter(|l| l.deferred).count()
    }

    pub(super) fn names_where(&self, keep: impl Fn(&LayerRecord) -> bool) -> Vec<LayerName> {
        self.layers
            .values()
            .filter(|l| keep(l))
            .map(|l| l.name.clone())
            .collect()
    }
}

/// Record `record` as a child of its parent in the parent -> children index.
pub(super) fn index_child(
    children: &mut BTreeMap<LayerName, BTreeSet<LayerName>>,
    record: &LayerRecord,
) {
    if let Some(parent) = &record.parent {
        children
            .entry(parent.clone())
            .or_default()
            .insert(record.name.clone());
    }
}
