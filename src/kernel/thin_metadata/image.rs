//! Metadata images for the unit tests: a superblock whose metadata snapshot's copy names the
//! roots of btrees built block by block, laid out as dm-thin lays them out.

use super::*;

/// Block 0 is the superblock, block 1 the snapshot's copy of it; nodes follow.
pub(super) struct Image {
    bytes: Vec<u8>,
}

impl Image {
    pub(super) fn new() -> Image {
        let mut image = Image {
            bytes: vec![0; 2 * BLOCK],
        };
        image.put64(32, SUPERBLOCK_MAGIC);
        image.put64(HELD_ROOT, 1);
        image.put64(BLOCK + 8, 1);
        image
    }

    pub(super) fn put64(&mut self, at: usize, value: u64) {
        self.bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn put32(&mut self, at: usize, value: u32) {
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Name `block` as the snapshot's root at superblock offset `at`.
    pub(super) fn set_root(&mut self, at: usize, block: u64) {
        self.put64(BLOCK + at, block);
    }

    /// A leaf of `(key, value)` entries, values `value_size` bytes (the u64 first): its block.
    pub(super) fn leaf(&mut self, entries: &[(u64, u64)], value_size: usize) -> u64 {
        self.node(LEAF_NODE, entries, value_size)
    }

    /// An internal node over `children` (each keyed by its first key): its block.
    pub(super) fn internal(&mut self, children: &[u64]) -> u64 {
        let entries: Vec<(u64, u64)> = children
            .iter()
            .map(|&child| (self.first_key(child), child))
            .collect();
        self.node(INTERNAL_NODE, &entries, 8)
    }

    fn first_key(&self, block: u64) -> u64 {
        let at = block as usize * BLOCK + NODE_HEADER;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }

    fn node(&mut self, flags: u32, entries: &[(u64, u64)], value_size: usize) -> u64 {
        let block = (self.bytes.len() / BLOCK) as u64;
        let base = self.bytes.len();
        self.bytes.resize(base + BLOCK, 0);
        let max = (BLOCK - NODE_HEADER) / (8 + value_size);
        assert!(
            entries.len() <= max,
            "a test node holds at most {max} entries"
        );
        self.put32(base + 4, flags);
        self.put64(base + 8, block);
        self.put32(base + 16, entries.len() as u32);
        self.put32(base + 20, max as u32);
        self.put32(base + 24, value_size as u32);
        for (i, &(key, value)) in entries.iter().enumerate() {
            self.put64(base + NODE_HEADER + 8 * i, key);
            self.put64(base + NODE_HEADER + 8 * max + value_size * i, value);
        }
        block
    }

    /// The byte at which node `block`'s value `i` starts.
    pub(super) fn value_at(&self, block: u64, i: usize) -> usize {
        let base = block as usize * BLOCK;
        let at =
            |o: usize| u32::from_le_bytes(self.bytes[base + o..base + o + 4].try_into().unwrap());
        let (max, value_size) = (at(20) as usize, at(24) as usize);
        base + NODE_HEADER + 8 * max + value_size * i
    }

    pub(super) fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Run `read` on the image written to a file (read through the page cache: not every
    /// filesystem a test runs on takes O_DIRECT; the kernel tests read real metadata devices
    /// with it).
    pub(super) fn read<T>(&self, read: impl FnOnce(&Device<'_>) -> Result<T>) -> Result<T> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        std::fs::write(&path, &self.bytes).unwrap();
        read(&Device::open(&path, 0)?)
    }
}
