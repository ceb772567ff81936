//! Reading and writing a thin device's bytes, for export and import: [`ThinIo`] is the seam's
//! handle on one active device; [`DeviceFile`] is the real one, over its node.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::blockdev;
use crate::units::ByteSize;

/// The bytes of one active thin device.
pub trait ThinIo: Send {
    /// Fill `buf` from `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make `length` bytes at `offset` read as zeros: the whole pool blocks among them are
    /// discarded (unmapped, their space given back), the edges written with zeros.
    fn zero(&mut self, offset: u64, length: u64) -> Result<()>;
    /// Make what was written durable.
    fn sync(&mut self) -> Result<()>;
}

/// A byte range of a device, `(start, end)`.
pub type Span = (u64, u64);

/// How [`ThinIo::zero`] makes `length` bytes at `offset` read as zeros on a device of
/// `block`-byte blocks: the whole blocks among them (`start..end`), unmapped, if any; and the
/// edges that only part-fill a block, written with zeros (empty ones left out).
pub fn zero_plan(offset: u64, length: u64, block: u64) -> (Option<Span>, Vec<Span>) {
    let end = offset + length;
    let first = offset.div_ceil(block) * block;
    let last = end / block * block;
    let (whole, edges) = if first >= last {
        (None, vec![(offset, end)])
    } else {
        (Some((first, last)), vec![(offset, first), (last, end)])
    };
    let edges = edges
        .into_iter()
        .filter(|(start, end)| start < end)
        .collect();
    (whole, edges)
}

/// The alignment of memory, offset and length that lets a read bypass the page cache.
/// Logical blocks are at most 4 KiB.
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer whose start is aligned for direct I/O, so [`DeviceFile::read_at`] can read into
/// it from the device without the page cache: no page allocated and cleared, no second copy,
/// and an export does not push other data out of the cache.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, aligned to [`DIRECT_ALIGN`].
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        // Unaligned is still correct, only slower (read through the cache).
        let start = match storage.as_ptr().align_offset(DIRECT_ALIGN) {
            offset if offset < DIRECT_ALIGN => offset,
            _ => 0,
        };
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Whether a read of `buf` at `offset` meets direct I/O's alignment.
fn direct_io_aligned(offset: u64, buf: &[u8]) -> bool {
    let align = DIRECT_ALIGN as u64;
    offset.is_multiple_of(align)
        && (buf.len() as u64).is_multiple_of(align)
        && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

/// A thin device's node, open for reading (and writing, when asked).
pub struct DeviceFile {
    file: File,
    /// The node opened again with O_DIRECT, for aligned reads; None where refused.
    direct: Option<File>,
    node: PathBuf,
    writable: bool,
    /// The pool's block size: only whole blocks can be unmapped.
    block_size: u64,
}

/// Zeros written at once for the edges of a [`ThinIo::zero`].
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl DeviceFile {
    /// Open `node`, a thin device of a pool with blocks of `block_size`.
    pub fn open(node: &Path, writable: bool, block_size: ByteSize) -> Result<DeviceFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(node)
            .map_err(|e| Error::io(format!("opening {}", node.display()), e))?;
        // Writes stay buffered: an import writes its runs and flushes once (see `sync`).
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(node)
            .ok();
        Ok(DeviceFile {
            file,
            direct,
            node: node.to_path_buf(),
            writable,
            block_size: block_size.bytes().max(512),
        })
    }

    /// A device active read-only is refused as the sim refuses it, not with EBADF.
    fn refuse_unless_writable(&self) -> Result<()> {
        if self.writable {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Permission,
            format!("{} is active read-only", self.node.display()),
        ))
    }

    fn write_zeros(&mut self, mut offset: u64, end: u64) -> Result<()> {
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            self.write_at(offset, &ZEROS[..n])?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl ThinIo for DeviceFile {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = match &self.direct {
            Some(direct) if direct_io_aligned(offset, buf) => direct,
            _ => &self.file,
        };
        file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "reading {} bytes at {offset} of {}",
                    buf.len(),
                    self.node.display()
                ),
                e,
            )
        })
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.refuse_unless_writable()?;
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(
                format!(
                    "writing {} bytes at {offset} of {}",
                    data.len(),
                    self.node.display()
                ),
                e,
            )
        })
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.refuse_unless_writable()?;
        let (whole, edges) = zero_plan(offset, length, self.block_size);
        if let Some((start, end)) = whole {
            blockdev::discard_range(&self.file, &self.node, start, end - start)?;
        }
        for (start, end) in edges {
            self.write_zeros(start, end)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("flushing {}", self.node.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aligned_buffer_is_read_directly_an_unaligned_one_through_the_cache() {
        let mut buf = AlignedBuf::new(1 << 20);
        assert_eq!(buf.len(), 1 << 20);
        assert!(direct_io_aligned(4096, &buf));
        assert!(!direct_io_aligned(512, &buf), "offset");
        assert!(!direct_io_aligned(0, &buf[..1000]), "length");
        assert!(!direct_io_aligned(0, &buf[1..4097]), "memory");
        buf[0] = 7;
        assert_eq!(buf.iter().map(|&b| b as u64).sum::<u64>(), 7);
    }

    #[test]
    fn zeroing_unmaps_the_whole_blocks_and_writes_the_edges() {
        assert_eq!(zero_plan(10, 5, 64), (None, vec![(10, 15)]));
        assert_eq!(
            zero_plan(60, 140, 64),
            (Some((64, 192)), vec![(60, 64), (192, 200)])
        );
        assert_eq!(zero_plan(64, 128, 64), (Some((64, 192)), vec![]));
        assert_eq!(zero_plan(0, 100, 64), (Some((0, 64)), vec![(64, 100)]));
    }
}
