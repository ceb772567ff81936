//! A pool's metadata, read in-process from its metadata snapshot: which thin ids it holds
//! ([`ids`]), and where one thin device's mappings differ from another's ([`delta`]).
//!
//! `thin_dump` and `thin_delta` do the same as processes; under emulation each start cost a
//! quarter of a start with 10,000 layers, or a tenth of an export. The layout is dm-thin's
//! on-disk format (`dm-thin-metadata.c`, `persistent-data/dm-btree-internal.h`), little-endian,
//! in 4 KiB blocks. Every block read is checked against the block number it carries, and every
//! btree node against its header, so a stale or foreign block is refused rather than read.
//! Kernel tests compare the results with `thin_dump`'s and `thin_delta`'s.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

mod delta;
mod ids;

pub use delta::snapshot_delta;
pub use ids::snapshot_thin_ids;

const BLOCK: usize = 4096;
const SUPERBLOCK_MAGIC: u64 = 27_022_010;
/// Offsets in the superblock (and in the copy of it a metadata snapshot holds).
const HELD_ROOT: usize = 56;
const DATA_MAPPING_ROOT: usize = 320;
const DEVICE_DETAILS_ROOT: usize = 328;
const NODE_HEADER: usize = 32;
const INTERNAL_NODE: u32 = 1;
const LEAF_NODE: u32 = 2;
/// Far more than a btree of 2^64 keys needs: a deeper walk is a loop in damaged metadata.
const MAX_DEPTH: usize = 16;

/// One metadata block, aligned for O_DIRECT.
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

impl Block {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }
}

/// Reads blocks of the metadata device, past the page cache: the kernel writes the metadata
/// with its own buffers, so a cached page could be older than the device.
struct Device<'a> {
    file: File,
    path: &'a Path,
}

impl<'a> Device<'a> {
    fn open(path: &'a Path, flags: i32) -> Result<Device<'a>> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| Error::io(format!("opening pool metadata {}", path.display()), e))?;
        Ok(Device { file, path })
    }

    fn read(&self, block: u64) -> Result<Box<Block>> {
        let mut buf = Box::new(Block([0; BLOCK]));
        let offset = block
            .checked_mul(BLOCK as u64)
            .ok_or_else(|| self.damaged(block, "no device is that large"))?;
        self.file.read_exact_at(&mut buf.0, offset).map_err(|e| {
            Error::io(
                format!(
                    "reading block {block} of pool metadata {}",
                    self.path.display()
                ),
                e,
            )
        })?;
        if buf.u64_at(8) != block {
            return Err(self.damaged(block, "it names another block number"));
        }
        Ok(buf)
    }

    /// The copy of the superblock the metadata snapshot holds: the roots as they were when
    /// the snapshot was reserved.
    fn snapshot_superblock(&self) -> Result<Box<Block>> {
        let superblock = self.read(0)?;
        if superblock.u64_at(32) != SUPERBLOCK_MAGIC {
            return Err(self.damaged(0, "no thin-pool superblock magic"));
        }
        let held = superblock.u64_at(HELD_ROOT);
        if held == 0 {
            return Err(Error::inconsistent(format!(
                "pool metadata {} holds no metadata snapshot; reserve one first",
                self.path.display()
            )));
        }
        self.read(held)
    }

    /// Btree node `block`, its header checked against the block.
    fn node(&self, block: u64) -> Result<Node> {
        let node = Node {
            data: self.read(block)?,
        };
        let (entries, max) = (node.entries(), node.max_entries());
        let value_size = node.data.u32_at(24) as usize;
        let fits = (8 + value_size)
            .checked_mul(max)
            .is_some_and(|bytes| NODE_HEADER + bytes <= BLOCK);
        if entries > max || !fits {
            return Err(self.damaged(block, "a btree node's header does not fit its block"));
        }
        let internal = node.flags() == INTERNAL_NODE;
        if !(internal || node.flags() == LEAF_NODE) || (internal && value_size != 8) {
            return Err(self.damaged(block, "not a btree node"));
        }
        Ok(node)
    }

    /// Btree node `block`, which must be a leaf.
    fn leaf(&self, block: u64) -> Result<Node> {
        let node = self.node(block)?;
        if !node.is_leaf() {
            return Err(self.damaged(block, "the btree's leaves are not all at one depth"));
        }
        Ok(node)
    }

    fn damaged(&self, block: u64, why: &str) -> Error {
        Error::inconsistent(format!(
            "block {block} of pool metadata {} is not what the metadata snapshot points to \
             ({why}); check the metadata with thin_check",
            self.path.display()
        ))
    }
}

/// The leaves of the btree below `root` (the `tree` btree, as errors name it), left to right
/// (so in key order), read level by level: a dm-thin btree is balanced, so the first node of
/// a level tells whether the level is the leaves (the others are not read here).
fn leaves(device: &Device<'_>, root: u64, tree: &str) -> Result<Vec<u64>> {
    let mut level = vec![root];
    let mut seen = HashSet::from([root]);
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for (i, &block) in level.iter().enumerate() {
            let node = device.node(block)?;
            if node.is_leaf() {
                if i == 0 {
                    return Ok(level);
                }
                return Err(device.damaged(block, "the btree's leaves are not all at one depth"));
            }
            for child in (0..node.entries()).map(|e| node.value_u64(e)) {
                if !seen.insert(child) {
                    return Err(device.damaged(child, &format!("the {tree} btree loops")));
                }
                next.push(child);
            }
        }
        if next.is_empty() {
            return Ok(next);
        }
        level = next;
    }
    Err(device.damaged(root, &format!("the {tree} btree is deeper than any pool's")))
}

/// A btree node: keys, then values of `value_size` bytes (child block numbers in an internal
/// node).
struct Node {
    data: Box<Block>,
}

impl Node {
    fn flags(&self) -> u32 {
        self.data.u32_at(4) & (INTERNAL_NODE | LEAF_NODE)
    }

    fn is_leaf(&self) -> bool {
        self.flags() == LEAF_NODE
    }

    fn entries(&self) -> usize {
        self.data.u32_at(16) as usize
    }

    fn max_entries(&self) -> usize {
        self.data.u32_at(20) as usize
    }

    fn value_size(&self) -> usize {
        self.data.u32_at(24) as usize
    }

    fn key(&self, i: usize) -> u64 {
        self.data.u64_at(NODE_HEADER + 8 * i)
    }

    /// Value `i` read as a little-endian u64 (a child, a subtree root, or a mapping).
    fn value_u64(&self, i: usize) -> u64 {
        self.data
            .u64_at(NODE_HEADER + 8 * self.max_entries() + self.value_size() * i)
    }
}

#[cfg(test)]
mod image;
