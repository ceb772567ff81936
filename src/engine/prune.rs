//! Prune: remove the layers nobody uses, oldest first: leaves (a parent only once its
//! children are gone) that are not mounted, not active, not containerd's, carrying the labels
//! asked for and older than the age asked for. What a dry run lists is what a real run would
//! remove, unless a client starts using a layer meanwhile; each layer is checked again under
//! its lock just before its removal, and one in use by then is kept.

use super::*;

/// Which layers a prune may remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneFilter {
    /// Only layers carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
    /// Only layers made at least this long ago.
    pub older_than: Option<Duration>,
}

/// One layer a prune removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// The layer.
    pub name: LayerName,
    /// Pool data it held alone when the prune began (a parent's grows as its children go).
    pub exclusive: ByteSize,
    /// How its removal went; none in a dry run.
    pub removal: Option<Removal>,
}

/// What a prune did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// The layers, in the order they were (or would be) removed.
    pub removed: Vec<Pruned>,
    /// Layers that matched but were in use by the time their turn came, and were kept.
    pub kept_in_use: Vec<LayerName>,
    /// Pool data in use before, and after (the same in a dry run).
    pub data_used_before: ByteSize,
    /// See `data_used_before`.
    pub data_used_after: ByteSize,
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// Remove the unused layers `filter` selects (see the module); only list them when
    /// `dry_run`.
    pub fn prune(&self, filter: &PruneFilter, dry_run: bool) -> Result<PruneReport> {
        let now = now_ns();
        let active = self.kernel.active_ids()?;
        let order = self.prune_order(filter, now, &active);
        let usage = self.thin_usage()?;
        let exclusive_of = |name: &LayerName| {
            let record = self.record(name).ok()?;
            usage.get(&record.thin_id).map(|u| u.exclusive)
        };
        let before = self.kernel.usage()?.data.used;
        let mut report = PruneReport {
            removed: Vec::new(),
            kept_in_use: Vec::new(),
            data_used_before: before,
            data_used_after: before,
        };
        for name in order {
            let exclusive = exclusive_of(&name).unwrap_or(ByteSize::from_bytes(0));
            let removal = if dry_run {
                None
            } else {
                match self.remove_if_unused(&name)? {
                    Some(removal) => Some(removal),
                    None => {
                        report.kept_in_use.push(name);
                        continue;
                    }
                }
            };
            report.removed.push(Pruned {
                name,
                exclusive,
                removal,
            });
        }
        if !dry_run {
            // The space comes back when the devices are deleted, so the report waits for it.
            self.finish_deletions()?;
            report.data_used_after = self.kernel.usage()?.data.used;
        }
        Ok(report)
    }

    /// The layers `filter` selects that nobody uses, children before parents and otherwise
    /// oldest first: a parent comes once every child of its is in the list before it.
    fn prune_order(
        &self,
        filter: &PruneFilter,
        now: u64,
        active: &BTreeSet<ThinId>,
    ) -> Vec<LayerName> {
        let index = self.index();
        let old_enough = |record: &LayerRecord| match filter.older_than {
            None => true,
            Some(age) => now.saturating_sub(record.created_ns) >= age.as_nanos() as u64,
        };
        let mut candidates: Vec<&LayerRecord> = index
            .layers
            .values()
            .filter(|r| unused(r, active) && !index.degraded.contains_key(&r.name))
            .filter(|r| {
                filter
                    .labels
                    .iter()
                    .all(|(k, v)| r.labels.get(k) == Some(v))
            })
            .filter(|r| old_enough(r))
            .collect();
        candidates.sort_by_key(|r| (r.created_ns, r.name.clone()));
        let mut order: Vec<LayerName> = Vec::new();
        let mut planned: BTreeSet<LayerName> = BTreeSet::new();
        loop {
            let leaves: Vec<LayerName> = candidates
                .iter()
                .filter(|r| !planned.contains(&r.name))
                .filter(|r| {
                    index.children_of(&r.name).iter().all(|child| {
                        planned.contains(child)
                            || index
                                .layers
                                .get(child)
                                .is_some_and(|c| c.state == LayerState::Removing)
                    })
                })
                .map(|r| r.name.clone())
                .collect();
            if leaves.is_empty() {
                return order;
            }
            planned.extend(leaves.iter().cloned());
            order.extend(leaves);
        }
    }

    /// Remove `name` if, under its lock, nobody uses it still; `None` when it is in use now.
    fn remove_if_unused(&self, name: &LayerName) -> Result<Option<Removal>> {
        let (name, _guard) = match self.lock_healthy(name.as_str()) {
            Ok(locked) => locked,
            // Removed meanwhile, or degraded: not ours to prune any more.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Inconsistent) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let Ok(record) = self.record(&name) else {
            return Ok(None);
        };
        let active = self.kernel.active_ids()?;
        if !unused(&record, &active) || !self.live_children(&name).is_empty() {
            return Ok(None);
        }
        self.remove_locked(&name).map(Some)
    }
}

/// Whether nobody uses `record`'s layer: ready, not mounted, not active, not waiting for a
/// deferred removal, not lost, and not containerd's (its layers change only through it).
fn unused(record: &LayerRecord, active: &BTreeSet<ThinId>) -> bool {
    record.state == LayerState::Ready
        && record.mounts.is_empty()
        && !active.contains(&record.thin_id)
        && !record.deferred
        && !record.missing
        && record.snapshot.is_none()
}
