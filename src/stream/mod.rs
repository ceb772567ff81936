//! A layer's blocks as a byte stream, to move a layer between hosts (`thinstack layer export`
//! and `layer import`).
//!
//! The engine decides which byte ranges of a layer's thin device to send (from the pool's
//! metadata) and reads and writes the devices; this module only encodes a stream
//! ([`StreamWriter`]), decodes and checks one ([`StreamReader`]), and digests it. The format is
//! described byte by byte in `docs/layer-stream.md`; in short:
//!
//! - an 8-byte magic, a format version (u16), a header length (u32) and a JSON [`Header`];
//! - data records (bytes at a device offset, at most [`MAX_RUN_BYTES`] each) and unmapped
//!   records (a range that reads as zeros), in ascending device order, never overlapping;
//! - an end record with the record count, the data and unmapped byte totals and a BLAKE3
//!   digest of every byte before the digest;
//! - optionally the whole thing zstd-compressed, which the reader notices by itself.
//!
//! Integers are little-endian. Nothing a reader returns can be trusted until
//! [`StreamReader::next_run`] has returned `None`: only then has the digest been checked, so
//! an importer writes into a new device and throws it away if the stream fails.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::names::ContentId;
use crate::units::ByteSize;
use crate::vocab::FsType;

mod digest;
mod reader;
mod writer;

pub use reader::StreamReader;
pub use writer::StreamWriter;

/// The largest data record's payload: large enough that record headers cost nothing next to
/// the data, small enough that a reader holds one record in memory without thinking about it
/// (and refuses a hostile length before allocating it).
pub const MAX_RUN_BYTES: usize = 1 << 20;

/// The stream format this module writes, and the newest it reads. Readers refuse a newer
/// version outright rather than misread it; optional header fields may be added without a
/// new version, since readers ignore unknown ones.
pub const FORMAT_VERSION: u16 = 1;

/// The media type a stream is served with over HTTP: plain bytes, since a stream is opaque to
/// anything but thinstack and a vendor type would only get in the way of proxies and tools.
pub const MEDIA_TYPE: &str = "application/octet-stream";

/// The first bytes of every (uncompressed) stream: the name, then a NUL so that no text file
/// is mistaken for a stream.
const MAGIC: [u8; 8] = *b"THINSTK\0";

/// A header longer than this is refused before it is read, so a damaged or hostile length
/// cannot make the reader allocate much.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// The tag of a data record ('D').
const TAG_DATA: u8 = b'D';
/// The tag of an unmapped record ('U').
const TAG_UNMAPPED: u8 = b'U';
/// The tag of the end record ('E').
const TAG_END: u8 = b'E';

/// The 4 bytes a zstd frame starts with (0xFD2FB528 little-endian).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The zstd level of `layer export --compress`: zstd's default, fast enough to keep up with a
/// disk on one core.
const ZSTD_LEVEL: i32 = 3;

/// Buffer sizes on both sides: a few record headers' worth of syscalls saved, while data
/// payloads (larger) pass straight through.
const BUFFER_BYTES: usize = 128 * 1024;

/// A source of zeros to write a withheld zero run as data without allocating.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// What a stream is: the layer it holds, and for an incremental stream the layer it applies
/// onto. Unknown fields are ignored (not refused), so a later writer of the same format
/// version may add optional fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The exported layer's name; informational, since the importer names the new layer.
    pub name: String,
    /// The layer's virtual size in bytes: every record lies within it.
    pub size: ByteSize,
    /// The filesystem on the layer, so the importer records the same one.
    pub filesystem: FsType,
    /// The filesystem's uuid, kept so the imported layer mounts the same way.
    pub fs_uuid: String,
    /// The exporter's pool block size: the granularity of its runs, and of its unmapped
    /// records when they come from zero blocks. Never zero.
    pub block_size: ByteSize,
    /// What the stream's layer holds; the importer keeps it, so the imported layer can be the
    /// base of a later incremental stream.
    pub content_id: ContentId,
    /// For an incremental stream, the layer it holds differences from: the importer applies
    /// it only onto a parent with this content id.
    pub base: Option<Base>,
    /// The layer's labels.
    pub labels: BTreeMap<String, String>,
    /// When the layer was created, in nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// The base of an incremental stream: the layer whose blocks the stream leaves out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// The base layer's name on the exporting host (for messages only: names differ between
    /// hosts, content ids do not).
    pub name: String,
    /// What the base holds: the parent an import applies onto must have this content id.
    pub content_id: ContentId,
    /// The base's virtual size.
    pub size: ByteSize,
}

/// One record of a stream, as the importer applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// Write `bytes` at `offset` (bytes into the device); 1 to [`MAX_RUN_BYTES`] bytes.
    Data {
        /// Where the bytes go, in bytes from the start of the device.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The range reads as zeros: the importer discards it (or zeroes what it cannot discard).
    Unmapped {
        /// The range's start, in bytes from the start of the device.
        offset: u64,
        /// The range's length in bytes, at least 1.
        length: u64,
    },
}

/// What a stream holds, for progress and the export/import report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Data and unmapped records.
    pub runs: u64,
    /// Bytes of data in data records.
    pub data_bytes: u64,
    /// Bytes covered by unmapped records.
    pub unmapped_bytes: u64,
    /// The stream's uncompressed length in bytes (what the digest covers, plus the digest).
    pub stream_bytes: u64,
}

/// Digests and counts the bytes that pass through it, either way, so the digest is computed as
/// the stream flows rather than over a buffered copy.
struct Hashing<T> {
    inner: T,
    hasher: digest::Digester,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Hashing {
            inner,
            hasher: digest::Digester::new(),
            bytes: 0,
        }
    }

    fn pass(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pass(&buf[..n]);
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pass(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests;
