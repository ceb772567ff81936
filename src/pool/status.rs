//! What `pool status` shows of the pool: its space, transaction id and health, as the kernel
//! reports them.

use super::*;

impl Pool {
    /// Everything about the pool's space and health, current.
    pub fn status(&self, dm: &Dm) -> Result<PoolStatus> {
        self.status_from(dm, dm.pool_status(&self.dm_name)?)
    }

    /// [`Pool::status`] as of the pool's last metadata commit
    /// ([`Dm::pool_status_as_committed`]): no metadata write, space counts up to a second old.
    pub fn status_as_committed(&self, dm: &Dm) -> Result<PoolStatus> {
        self.status_from(dm, dm.pool_status_as_committed(&self.dm_name)?)
    }

    fn status_from(&self, dm: &Dm, status: ThinPoolStatus) -> Result<PoolStatus> {
        let working = match status {
            ThinPoolStatus::Working(status) => status,
            ThinPoolStatus::Error | ThinPoolStatus::Fail => {
                return Ok(PoolStatus::failed(self));
            }
        };
        let usage = &working.usage;
        let block = ByteSize::from_sectors(self.block_size).bytes();
        let meta_block = ByteSize::from_sectors(MetaBlocks(1).sectors()).bytes();
        Ok(PoolStatus {
            name: self.name.to_string(),
            dm_name: self.dm_name.to_string(),
            backend: self.backend(),
            block_size: ByteSize::from_sectors(self.block_size),
            data: Space::new(*usage.used_data * block, *usage.total_data * block),
            metadata: Space::new(
                *usage.used_meta * meta_block,
                *usage.total_meta * meta_block,
            ),
            transaction_id: Some(working.transaction_id),
            health: Health {
                failed: false,
                needs_check: working.needs_check,
                read_only: working.summary == ThinPoolStatusSummary::ReadOnly,
                // Only a read-only pool whose table is thinstack's can be guarded (the table
                // is read only then); an adopted or LVM pool's read_only is its owner's.
                metadata_guard: working.summary == ThinPoolStatusSummary::ReadOnly
                    && !matches!(self.backing, Backing::Lvm(_) | Backing::Existing)
                    && self.is_read_only(dm)?,
                out_of_space: working.summary == ThinPoolStatusSummary::OutOfSpace,
                when_full: Some(when_full_of(working.no_space_policy)),
            },
        })
    }
}

/// What `pool status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// The thin-pool dm device.
    pub dm_name: String,
    /// The backend.
    pub backend: Backend,
    /// Allocation unit.
    pub block_size: ByteSize,
    /// Data space.
    pub data: Space,
    /// Metadata space.
    pub metadata: Space,
    /// The pool's transaction id (absent when the pool failed).
    pub transaction_id: Option<u64>,
    /// Health flags.
    pub health: Health,
}

impl PoolStatus {
    fn failed(pool: &Pool) -> PoolStatus {
        PoolStatus {
            name: pool.name.to_string(),
            dm_name: pool.dm_name.to_string(),
            backend: pool.backend(),
            block_size: ByteSize::from_sectors(pool.block_size),
            data: Space::new(0, 0),
            metadata: Space::new(0, 0),
            transaction_id: None,
            health: Health {
                failed: true,
                needs_check: true,
                read_only: true,
                metadata_guard: false,
                out_of_space: false,
                when_full: None,
            },
        }
    }
}
