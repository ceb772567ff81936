//! The thin ids a pool's metadata holds, read in-process from its metadata snapshot.
//!
//! `thin_dump --skip-mappings` does the same as a process, and was a quarter of a start with
//! 10,000 layers under emulation. What is read here is only the device-details btree: the
//! superblock copy the metadata snapshot holds names its root, and the keys of its leaves are
//! the thin ids. The layout is dm-thin's on-disk format (`dm-thin-metadata.c`,
//! `persistent-data/dm-btree-internal.h`), little-endian, in 4 KiB blocks. Every block read is
//! checked against the block number it carries, so a stale or foreign block is refused rather
//! than read as ids. A kernel test compares the result with `thin_dump`'s.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::names::ThinId;

const BLOCK: usize = 4096;
const SUPERBLOCK_MAGIC: u64 = 27_022_010;
const HELD_ROOT: usize = 56;
const DEVICE_DETAILS_ROOT: usize = 328;
const NODE_HEADER: usize = 32;
const INTERNAL_NODE: u32 = 1;
const LEAF_NODE: u32 = 2;
/// Far more than a btree of 2^24 ids needs: a deeper walk is a loop in damaged metadata.
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

impl Device<'_> {
    fn read(&self, block: u64) -> Result<Box<Block>> {
        let mut buf = Box::new(Block([0; BLOCK]));
        self.file
            .read_exact_at(&mut buf.0, block * BLOCK as u64)
            .map_err(|e| {
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

    fn damaged(&self, block: u64, why: &str) -> Error {
        Error::inconsistent(format!(
            "block {block} of pool metadata {} is not what the metadata snapshot points to \
             ({why}); check the metadata with thin_check",
            self.path.display()
        ))
    }
}

/// The thin ids in the metadata snapshot on `metadata` (a block device). The caller holds the
/// snapshot (`reserve_metadata_snap`) for the call.
pub fn snapshot_thin_ids(metadata: &Path) -> Result<BTreeSet<ThinId>> {
    read_thin_ids(metadata, nix::libc::O_DIRECT)
}

fn read_thin_ids(metadata: &Path, flags: i32) -> Result<BTreeSet<ThinId>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(metadata)
        .map_err(|e| Error::io(format!("opening pool metadata {}", metadata.display()), e))?;
    let device = Device {
        file,
        path: metadata,
    };
    let superblock = device.read(0)?;
    if superblock.u64_at(32) != SUPERBLOCK_MAGIC {
        return Err(device.damaged(0, "no thin-pool superblock magic"));
    }
    let held = superblock.u64_at(HELD_ROOT);
    if held == 0 {
        return Err(Error::inconsistent(format!(
            "pool metadata {} holds no metadata snapshot; reserve one first",
            metadata.display()
        )));
    }
    let snapshot = device.read(held)?;
    let root = snapshot.u64_at(DEVICE_DETAILS_ROOT);
    let mut ids = BTreeSet::new();
    collect_keys(&device, root, &mut ids)?;
    Ok(ids)
}

/// The keys of every leaf below btree node `root`, walked depth-first.
fn collect_keys(device: &Device<'_>, root: u64, ids: &mut BTreeSet<ThinId>) -> Result<()> {
    let mut seen = HashSet::new();
    let mut stack = vec![(root, 0)];
    while let Some((block, depth)) = stack.pop() {
        if depth > MAX_DEPTH || !seen.insert(block) {
            return Err(device.damaged(block, "the device-details btree loops"));
        }
        let node = device.read(block)?;
        let (flags, entries, max) = (node.u32_at(4), node.u32_at(16), node.u32_at(20));
        let (entries, max) = (entries as usize, max as usize);
        let value_size = node.u32_at(24) as usize;
        if entries > max || NODE_HEADER + max * (8 + value_size) > BLOCK {
            return Err(device.damaged(block, "a btree node's header does not fit its block"));
        }
        let key = |i: usize| node.u64_at(NODE_HEADER + 8 * i);
        match flags & (INTERNAL_NODE | LEAF_NODE) {
            LEAF_NODE => {
                for i in 0..entries {
                    let id = u32::try_from(key(i))
                        .map_err(|_| device.damaged(block, "a thin id is out of range"))?;
                    ids.insert(ThinId::new(id)?);
                }
            }
            INTERNAL_NODE if value_size == 8 => {
                let values = NODE_HEADER + 8 * max;
                for i in (0..entries).rev() {
                    stack.push((node.u64_at(values + 8 * i), depth + 1));
                }
            }
            _ => return Err(device.damaged(block, "not a btree node")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metadata image: superblock, snapshot superblock, and a two-level device-details
    /// btree whose leaves hold `leaves`.
    fn image(leaves: &[&[u64]]) -> Vec<u8> {
        let blocks = 3 + leaves.len();
        let mut bytes = vec![0u8; blocks * BLOCK];
        let put64 = |bytes: &mut Vec<u8>, at: usize, v: u64| {
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        let put32 = |bytes: &mut Vec<u8>, at: usize, v: u32| {
            bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        put64(&mut bytes, 32, SUPERBLOCK_MAGIC);
        put64(&mut bytes, HELD_ROOT, 1);
        let snap = BLOCK;
        put64(&mut bytes, snap + 8, 1);
        put64(&mut bytes, snap + DEVICE_DETAILS_ROOT, 2);
        let root = 2 * BLOCK;
        let max = 10;
        put64(&mut bytes, root + 8, 2);
        put32(&mut bytes, root + 4, INTERNAL_NODE);
        put32(&mut bytes, root + 16, leaves.len() as u32);
        put32(&mut bytes, root + 20, max);
        put32(&mut bytes, root + 24, 8);
        for (i, keys) in leaves.iter().enumerate() {
            let block = 3 + i;
            put64(&mut bytes, root + NODE_HEADER + 8 * i, keys[0]);
            put64(
                &mut bytes,
                root + NODE_HEADER + 8 * max as usize + 8 * i,
                block as u64,
            );
            let leaf = block * BLOCK;
            put64(&mut bytes, leaf + 8, block as u64);
            put32(&mut bytes, leaf + 4, LEAF_NODE);
            put32(&mut bytes, leaf + 16, keys.len() as u32);
            put32(&mut bytes, leaf + 20, 100);
            put32(&mut bytes, leaf + 24, 24);
            for (k, key) in keys.iter().enumerate() {
                put64(&mut bytes, leaf + NODE_HEADER + 8 * k, *key);
            }
        }
        bytes
    }

    /// Read `bytes` as a device (through the page cache: not every filesystem a test runs on
    /// takes O_DIRECT; the kernel tests read real metadata devices with it).
    fn ids_of(bytes: &[u8]) -> Result<BTreeSet<ThinId>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        std::fs::write(&path, bytes).unwrap();
        read_thin_ids(&path, 0)
    }

    fn ids(raw: &[u32]) -> BTreeSet<ThinId> {
        raw.iter().map(|&i| ThinId::new(i).unwrap()).collect()
    }

    #[test]
    fn the_leaves_keys_are_the_thin_ids() {
        let found = ids_of(&image(&[&[1, 2, 7], &[9, 4000]]));
        assert_eq!(found.unwrap(), ids(&[1, 2, 7, 9, 4000]));
    }

    #[test]
    fn a_loop_in_the_btree_is_refused_not_walked_for_ever() {
        let mut bytes = image(&[&[1], &[2]]);
        // The root's second child is the root itself.
        let at = 2 * BLOCK + NODE_HEADER + 8 * 10 + 8;
        bytes[at..at + 8].copy_from_slice(&2u64.to_le_bytes());
        let err = ids_of(&bytes).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
    }

    #[test]
    fn a_block_that_names_another_number_is_refused() {
        let mut bytes = image(&[&[1], &[2]]);
        bytes[4 * BLOCK + 8] = 9; // the second leaf says it is block 9
        let err = ids_of(&bytes).unwrap_err();
        assert!(
            err.to_string().contains("block 4 of pool metadata"),
            "{err}"
        );
    }

    #[test]
    fn no_snapshot_and_no_superblock_are_told_apart() {
        let mut bytes = image(&[&[1]]);
        bytes[HELD_ROOT] = 0;
        let err = ids_of(&bytes).unwrap_err();
        assert!(err.to_string().contains("no metadata snapshot"), "{err}");
        let err = ids_of(&vec![0; 2 * BLOCK]).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }
}
