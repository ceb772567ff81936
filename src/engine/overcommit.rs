//! The overcommit limit (`pool.max_overcommit`): the layers' virtual sizes, summed, against
//! the pool's data. Nothing else sees a pool overcommitted until it goes read-only, so a
//! create or resize past the limit is refused with the figures.

use super::*;

/// How far the layers' virtual sizes exceed the pool's data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overcommit {
    /// The layers' virtual sizes, summed (a resize in progress at its new size).
    pub virtual_size: ByteSize,
    /// The pool's data: the most it may hold where thinstack grows it, its size otherwise.
    pub capacity: ByteSize,
    /// `virtual_size / capacity`.
    pub ratio: f64,
    /// `pool.max_overcommit`; none when there is no limit.
    pub limit: Option<f64>,
}

/// Virtual bytes a create or resize holds against the limit until its record counts them (the
/// two counted at once in between only make a racing create see more, never less).
pub(super) struct Reservation<'e> {
    index: &'e Mutex<Index>,
    bytes: u128,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.reserved_virtual -= self.bytes;
    }
}

impl<K: PoolKernel, F: FsKernel> Engine<K, F> {
    /// The overcommit figures, with the pool's data from `usage`.
    pub fn overcommit(&self, usage: &PoolUsage) -> Overcommit {
        let virtual_size = self.index().virtual_bytes;
        self.figures(virtual_size, usage)
    }

    fn figures(&self, virtual_bytes: u128, usage: &PoolUsage) -> Overcommit {
        let capacity = self
            .settings
            .data_capacity
            .map_or(usage.data.total, |most| most.max(usage.data.total));
        Overcommit {
            virtual_size: saturated(virtual_bytes),
            capacity,
            ratio: Ratio::of(virtual_bytes, capacity.bytes()),
            limit: self.settings.max_overcommit.limit(),
        }
    }

    /// Hold `added` virtual bytes for `what` against `pool.max_overcommit`, or refuse with
    /// `NoSpace` and the figures when they would take the layers past it. Nothing is held
    /// where there is no limit.
    pub(super) fn reserve_virtual(
        &self,
        what: &str,
        usage: &PoolUsage,
        added: ByteSize,
    ) -> Result<Option<Reservation<'_>>> {
        let Some(limit) = self.settings.max_overcommit.limit() else {
            return Ok(None);
        };
        let mut index = self.index();
        let now = index.virtual_bytes + index.reserved_virtual;
        let after = self.figures(now + u128::from(added.bytes()), usage);
        if after.ratio > limit {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "cannot {what}: it would give the layers {} of virtual size ({} now, plus {}) over {} of pool data, {:.2} times it, above pool.max_overcommit {limit}; remove layers, extend the pool, or raise pool.max_overcommit",
                    after.virtual_size.human(),
                    saturated(now).human(),
                    added.human(),
                    after.capacity.human(),
                    after.ratio,
                ),
            ));
        }
        index.reserved_virtual += u128::from(added.bytes());
        Ok(Some(Reservation {
            index: &self.index,
            bytes: u128::from(added.bytes()),
        }))
    }
}

/// A sum of sizes as a size, at most the largest one.
fn saturated(bytes: u128) -> ByteSize {
    ByteSize::from_bytes(u64::try_from(bytes).unwrap_or(u64::MAX))
}
