//! The sim's block data: what a thin device holds where, block by block, for the layer data
//! operations (export, import). A block is an allocation shared, as dm-thin shares it, by the
//! snapshots made since it was written; writing a shared block copies it first (copy on
//! write), and two devices differ where they hold different allocations, which is what
//! `thin_delta` compares (mappings, never contents).
//!
//! The filesystem mkfs makes is written to block 0 as a small superblock of the sim's own, so
//! a device's filesystem travels with its blocks, as a real one does.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::kernel::superblock::Found;
use crate::kernel::{DeltaKind, DeltaRun};
use crate::units::ByteSize;
use crate::vocab::FsType;

/// The sim pool's block size.
pub const BLOCK: u64 = 64 << 10;

/// One block's bytes.
pub type Block = Arc<Vec<u8>>;

/// A device's blocks, by index.
#[derive(Debug, Clone, Default)]
pub struct Blocks(BTreeMap<u64, Block>);

/// Marks block 0 as the sim's superblock.
const SUPERBLOCK_MAGIC: &[u8; 8] = b"SIMFS\0\0\x01";

impl Blocks {
    /// Fill `buf` from `offset`; what no block holds reads as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        for (at, piece) in pieces(offset, buf.len() as u64) {
            let into = &mut buf[(at.start - offset) as usize..][..piece.len];
            match self.0.get(&at.index) {
                Some(block) => into.copy_from_slice(&block[piece.within..][..piece.len]),
                None => into.fill(0),
            }
        }
    }

    /// Bytes a write of `length` at `offset` takes from the pool: the blocks it maps anew,
    /// and the shared ones it copies.
    pub fn allocation_needed(&self, offset: u64, length: u64) -> u64 {
        pieces(offset, length)
            .filter(|(at, _)| {
                self.0
                    .get(&at.index)
                    .is_none_or(|block| Arc::strong_count(block) > 1)
            })
            .count() as u64
            * BLOCK
    }

    /// Write `data` at `offset`, copying shared blocks first (see
    /// [`Blocks::allocation_needed`] for what it takes from the pool).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (at, piece) in pieces(offset, data.len() as u64) {
            let block = self
                .0
                .entry(at.index)
                .or_insert_with(|| Arc::new(vec![0; BLOCK as usize]));
            let from = &data[(at.start - offset) as usize..][..piece.len];
            Arc::make_mut(block)[piece.within..][..piece.len].copy_from_slice(from);
        }
    }

    /// The blocks of `indexes` that are mapped, unmapped and handed back (for the pool to
    /// let go).
    pub fn unmap(&mut self, indexes: std::ops::Range<u64>) -> Vec<Block> {
        let indexes: Vec<u64> = self.0.range(indexes).map(|(i, _)| *i).collect();
        indexes
            .into_iter()
            .filter_map(|index| self.0.remove(&index))
            .collect()
    }

    /// Every block, taken out (for the pool to let go).
    pub fn take(&mut self) -> Vec<Block> {
        std::mem::take(&mut self.0).into_values().collect()
    }

    /// Its allocations, by address, with their sizes.
    pub fn allocations(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.0
            .values()
            .map(|block| (Arc::as_ptr(block) as usize, block.len() as u64))
    }

    /// Where these blocks differ from `base`'s (or, without one, where they are mapped), as
    /// `thin_delta` reports it: adjacent blocks of one kind are one run.
    pub fn delta(&self, base: Option<&Blocks>) -> Vec<DeltaRun> {
        let empty = Blocks::default();
        let base = base.unwrap_or(&empty);
        let mut indexes: Vec<u64> = self.0.keys().chain(base.0.keys()).copied().collect();
        indexes.sort_unstable();
        indexes.dedup();
        let mut runs: Vec<DeltaRun> = Vec::new();
        for index in indexes {
            let kind = match (self.0.get(&index), base.0.get(&index)) {
                (Some(mine), Some(theirs)) if Arc::ptr_eq(mine, theirs) => continue,
                (Some(_), _) => DeltaKind::Data,
                (None, _) => DeltaKind::Unmapped,
            };
            let offset = index * BLOCK;
            match runs.last_mut() {
                Some(last) if last.kind == kind && last.offset + last.length == offset => {
                    last.length += BLOCK;
                }
                _ => runs.push(DeltaRun {
                    offset,
                    length: BLOCK,
                    kind,
                }),
            }
        }
        runs
    }

    /// The filesystem block 0 describes, if it holds the sim's superblock.
    pub fn filesystem(&self) -> Option<Found> {
        let block = self.0.get(&0)?;
        let rest = block.strip_prefix(SUPERBLOCK_MAGIC)?;
        let length = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let text = std::str::from_utf8(rest.get(2..2 + length)?).ok()?;
        let mut fields = text.split(' ');
        let fs = match fields.next()? {
            "ext4" => FsType::Ext4,
            "xfs" => FsType::Xfs,
            _ => return None,
        };
        let size = ByteSize::from_bytes(fields.next()?.parse().ok()?);
        let uuid = fields.next()?.to_string();
        Some(Found { fs, size, uuid })
    }

    /// Write the sim's superblock for `found` to block 0.
    pub fn write_superblock(&mut self, found: &Found) {
        let text = format!("{} {} {}", found.fs, found.size.bytes(), found.uuid);
        let mut block = SUPERBLOCK_MAGIC.to_vec();
        block.extend_from_slice(&(text.len() as u16).to_le_bytes());
        block.extend_from_slice(text.as_bytes());
        self.write(0, &block);
    }
}

/// Where a piece of a range starts on the device, and in which block.
struct At {
    start: u64,
    index: u64,
}

/// A piece of a range within one block.
struct Piece {
    within: usize,
    len: usize,
}

/// The pieces of `length` bytes at `offset`, one per block they touch.
fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (At, Piece)> {
    let end = offset + length;
    let mut start = offset;
    std::iter::from_fn(move || {
        if start >= end {
            return None;
        }
        let index = start / BLOCK;
        let within = start % BLOCK;
        let len = (BLOCK - within).min(end - start);
        let piece = (
            At { start, index },
            Piece {
                within: within as usize,
                len: len as usize,
            },
        );
        start += len;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_and_holes_read_as_zeros() {
        let mut blocks = Blocks::default();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        blocks.write(BLOCK - 7, &data);
        let mut back = vec![1u8; data.len() + 20];
        blocks.read(BLOCK - 17, &mut back);
        assert_eq!(&back[..10], &[0; 10]);
        assert_eq!(&back[10..10 + data.len()], &data[..]);
        assert_eq!(&back[10 + data.len()..], &[0; 10]);
    }

    #[test]
    fn a_snapshot_shares_blocks_until_written_and_the_delta_says_where() {
        let mut origin = Blocks::default();
        origin.write(0, &vec![1; 3 * BLOCK as usize]);
        let mut snapshot = origin.clone();
        assert!(snapshot.delta(Some(&origin)).is_empty());
        assert_eq!(snapshot.allocation_needed(BLOCK, 1), BLOCK);
        snapshot.write(BLOCK + 5, b"new");
        snapshot.write(10 * BLOCK, b"far");
        let freed = snapshot.unmap(2..3);
        assert_eq!(freed.len(), 1);
        let run = |block: u64, blocks: u64, kind| DeltaRun {
            offset: block * BLOCK,
            length: blocks * BLOCK,
            kind,
        };
        assert_eq!(
            snapshot.delta(Some(&origin)),
            [
                run(1, 1, DeltaKind::Data),
                run(2, 1, DeltaKind::Unmapped),
                run(10, 1, DeltaKind::Data),
            ]
        );
        assert_eq!(
            snapshot.delta(None),
            [run(0, 2, DeltaKind::Data), run(10, 1, DeltaKind::Data)]
        );
        let mut byte = [0u8; 1];
        origin.read(BLOCK + 5, &mut byte);
        assert_eq!(byte, [1], "the origin keeps its block");
    }

    #[test]
    fn the_superblock_names_the_filesystem() {
        let mut blocks = Blocks::default();
        assert_eq!(blocks.filesystem(), None);
        let found = Found {
            fs: FsType::Xfs,
            size: ByteSize::gib(1),
            uuid: "sim-xfs-uuid-3".to_string(),
        };
        blocks.write_superblock(&found);
        assert_eq!(blocks.filesystem(), Some(found));
    }
}
