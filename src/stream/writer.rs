//! Writing a layer stream: records in device order, zero blocks as unmapped records, the end
//! record with its digest.

use std::fmt;
use std::io::{self, BufWriter, Write};

use super::*;
use crate::error::{Error, Result};

/// Where a writer's (uncompressed) bytes go.
enum Sink<W: Write> {
    Plain(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

/// A half-open range of device bytes, `start..end`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
}

/// Encodes one layer stream. Runs are given in ascending device order; zero blocks in data
/// become unmapped records; the end record and digest are written by [`StreamWriter::finish`].
/// A writer dropped without `finish` leaves a stream every reader refuses as truncated.
pub struct StreamWriter<W: Write> {
    out: Hashing<BufWriter<Sink<W>>>,
    size: u64,
    block_size: u64,
    /// The end of the last range given: the next must start at or after it.
    next_min: u64,
    /// An unmapped range not written yet, so a following contiguous one extends it.
    unmapped: Option<Span>,
    /// Zeros at the end of the last data call that start a block the call did not finish:
    /// withheld, since the next call may complete the block (then it is unmapped) or not
    /// (then they are written as data).
    zero_tail: Option<Span>,
    summary: Summary,
}

impl<W: Write> fmt::Debug for StreamWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamWriter")
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("next_min", &self.next_min)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream on `out`: writes magic, version and header. With `compress`, everything
    /// written goes through zstd (level 3, one thread: fast enough not to slow an export from
    /// a disk much, and deterministic).
    ///
    /// Refuses a header whose block size is zero (there would be no blocks to find zeros in)
    /// or whose JSON is longer than a reader accepts (1 MiB).
    pub fn new(out: W, header: &Header, compress: bool) -> Result<Self> {
        if header.block_size.bytes() == 0 {
            return Err(Error::invalid(
                "a layer stream's block size cannot be 0; give the pool's block size",
            ));
        }
        let json = serde_json::to_vec(header).map_err(|e| {
            Error::invalid(format!("writing the layer stream's header as JSON: {e}"))
        })?;
        if json.len() > MAX_HEADER_BYTES {
            return Err(Error::invalid(format!(
                "the layer stream's header would be {} bytes, more than the {MAX_HEADER_BYTES} a \
                 reader accepts; the layer's labels are too large to export",
                json.len()
            )));
        }
        let sink = if compress {
            let mut encoder = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)
                .map_err(|e| Error::io("starting zstd compression of the layer stream", e))?;
            // zstd's own checksum lets a damaged compressed stream be named as such, before
            // the stream's digest would catch it.
            encoder
                .include_checksum(true)
                .map_err(|e| Error::io("starting zstd compression of the layer stream", e))?;
            Sink::Zstd(encoder)
        } else {
            Sink::Plain(out)
        };
        let mut writer = StreamWriter {
            out: Hashing::new(BufWriter::with_capacity(BUFFER_BYTES, sink)),
            size: header.size.bytes(),
            block_size: header.block_size.bytes(),
            next_min: 0,
            unmapped: None,
            zero_tail: None,
            summary: Summary::default(),
        };
        let mut preamble = Vec::with_capacity(14);
        preamble.extend_from_slice(&MAGIC);
        preamble.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        preamble.extend_from_slice(&(json.len() as u32).to_le_bytes());
        writer.put(&preamble)?;
        writer.put(&json)?;
        Ok(writer)
    }

    /// `bytes` read from the device at `offset`. Splits into records of at most MAX_RUN_BYTES.
    /// Pieces of `bytes` that are all zeros, whole `header.block_size`-aligned blocks of the
    /// device (aligned to the device offset, not to the slice), become unmapped records
    /// (merged with an adjacent unmapped record when contiguous), so mapped zeros cost
    /// nothing on the wire. Non-aligned edges are sent as data.
    ///
    /// A zero block may span several calls (blocks can be larger than the reads that fill
    /// them): zeros that start a block at the end of `bytes` are held back until the next call
    /// shows whether the block is all zeros. The device's last block ends at the layer's size.
    /// Empty `bytes` are ignored; a range before the end of the previous one, or past the
    /// layer's size, is refused.
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let end = self.check_range("data", offset, bytes.len() as u64)?;
        if self.zero_tail.is_some_and(|tail| tail.end != offset) {
            self.flush_zero_tail()?;
        }
        // Index into `bytes` of data not written yet.
        let mut pending: Option<usize> = None;
        let mut at = 0usize;
        while at < bytes.len() {
            let device = offset + at as u64;
            let block_start = device - device % self.block_size;
            let block_end = block_start.saturating_add(self.block_size).min(self.size);
            let piece_end = at + (block_end - device).min((bytes.len() - at) as u64) as usize;
            let piece = &bytes[at..piece_end];
            let starts_block = device == block_start
                || self
                    .zero_tail
                    .is_some_and(|tail| tail.start == block_start && tail.end == device);
            if starts_block && is_zero(piece) {
                if let Some(from) = pending.take() {
                    self.emit_data(offset + from as u64, &bytes[from..at])?;
                }
                let piece_end_device = offset + piece_end as u64;
                if piece_end_device == block_end {
                    self.zero_tail = None;
                    self.emit_unmapped(block_start, block_end)?;
                } else {
                    self.zero_tail = Some(Span {
                        start: block_start,
                        end: piece_end_device,
                    });
                }
            } else {
                if self.zero_tail.is_some() {
                    self.flush_zero_tail()?;
                }
                pending.get_or_insert(at);
            }
            at = piece_end;
        }
        if let Some(from) = pending {
            self.emit_data(offset + from as u64, &bytes[from..])?;
        }
        self.next_min = end;
        Ok(())
    }

    /// A range that reads as zeros on the device (unmapped in it, mapped in the base).
    ///
    /// Contiguous unmapped ranges (and zeros held back from the data just before) become one
    /// record. A zero `length` is ignored; a range before the end of the previous one, or past
    /// the layer's size, is refused.
    pub fn unmapped(&mut self, offset: u64, length: u64) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let end = self.check_range("unmapped", offset, length)?;
        let start = match self.zero_tail {
            Some(tail) if tail.end == offset => {
                self.zero_tail = None;
                tail.start
            }
            Some(_) => {
                self.flush_zero_tail()?;
                offset
            }
            None => offset,
        };
        self.emit_unmapped(start, end)?;
        self.next_min = end;
        Ok(())
    }

    /// Ends the stream: writes zeros still held back and the pending unmapped range, then the
    /// end record (counts and digest), finishes zstd and flushes. Returns `out` and what the
    /// stream holds.
    pub fn finish(mut self) -> Result<(W, Summary)> {
        self.flush_zero_tail()?;
        self.flush_unmapped()?;
        let mut end = [0u8; 25];
        end[0] = TAG_END;
        end[1..9].copy_from_slice(&self.summary.runs.to_le_bytes());
        end[9..17].copy_from_slice(&self.summary.data_bytes.to_le_bytes());
        end[17..25].copy_from_slice(&self.summary.unmapped_bytes.to_le_bytes());
        self.put(&end)?;
        let digest = self.out.hasher.finalize();
        // The digest covers every byte before it, not itself.
        self.out
            .inner
            .write_all(digest.as_bytes())
            .map_err(write_error)?;
        self.summary.stream_bytes = self.out.bytes + digest.as_bytes().len() as u64;
        let sink = self
            .out
            .inner
            .into_inner()
            .map_err(|e| write_error(e.into_error()))?;
        let mut out = match sink {
            Sink::Plain(out) => out,
            Sink::Zstd(encoder) => encoder.finish().map_err(write_error)?,
        };
        out.flush().map_err(write_error)?;
        Ok((out, self.summary))
    }

    /// `offset..offset+length` lies after the previous range and within the layer; its end.
    fn check_range(&self, kind: &str, offset: u64, length: u64) -> Result<u64> {
        let end = offset
            .checked_add(length)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a {kind} run of {length} bytes at offset {offset} goes past the layer's \
                     size ({} bytes); the export read past the device",
                    self.size
                ))
            })?;
        if offset < self.next_min {
            return Err(Error::invalid(format!(
                "a {kind} run at offset {offset} starts before the end of the previous run \
                 ({}); runs must be given in ascending order, without overlap",
                self.next_min
            )));
        }
        Ok(end)
    }

    /// Data records for `bytes` at `offset`, each at most [`MAX_RUN_BYTES`].
    fn emit_data(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.flush_unmapped()?;
        let mut at = offset;
        for chunk in bytes.chunks(MAX_RUN_BYTES) {
            self.put(&data_record_head(at, chunk.len()))?;
            self.put(chunk)?;
            self.count_data(chunk.len());
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes the held-back zeros, if any, as data records: the block they started was not
    /// all zeros, or not given whole.
    fn flush_zero_tail(&mut self) -> Result<()> {
        let Some(tail) = self.zero_tail.take() else {
            return Ok(());
        };
        self.flush_unmapped()?;
        let mut at = tail.start;
        while at < tail.end {
            let length = (tail.end - at).min(MAX_RUN_BYTES as u64) as usize;
            self.put(&data_record_head(at, length))?;
            let mut left = length;
            while left > 0 {
                let n = left.min(ZEROS.len());
                self.put(&ZEROS[..n])?;
                left -= n;
            }
            self.count_data(length);
            at += length as u64;
        }
        Ok(())
    }

    /// An unmapped range `start..end`, merged into the pending one when contiguous.
    fn emit_unmapped(&mut self, start: u64, end: u64) -> Result<()> {
        match &mut self.unmapped {
            Some(pending) if pending.end == start => pending.end = end,
            _ => {
                self.flush_unmapped()?;
                self.unmapped = Some(Span { start, end });
            }
        }
        Ok(())
    }

    /// Writes the pending unmapped range, if any, as one record.
    fn flush_unmapped(&mut self) -> Result<()> {
        let Some(span) = self.unmapped.take() else {
            return Ok(());
        };
        let length = span.end - span.start;
        let mut record = [0u8; 17];
        record[0] = TAG_UNMAPPED;
        record[1..9].copy_from_slice(&span.start.to_le_bytes());
        record[9..17].copy_from_slice(&length.to_le_bytes());
        self.put(&record)?;
        self.summary.runs += 1;
        self.summary.unmapped_bytes += length;
        Ok(())
    }

    fn count_data(&mut self, length: usize) {
        self.summary.runs += 1;
        self.summary.data_bytes += length as u64;
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(write_error)
    }
}

fn write_error(e: io::Error) -> Error {
    Error::io("writing the layer stream", e)
}

/// A data record's tag, offset and length.
pub(super) fn data_record_head(offset: u64, length: usize) -> [u8; 13] {
    let mut head = [0u8; 13];
    head[0] = TAG_DATA;
    head[1..9].copy_from_slice(&offset.to_le_bytes());
    head[9..13].copy_from_slice(&(length as u32).to_le_bytes());
    head
}

/// Whether `bytes` are all zeros: OR-folds fixed-size chunks (which the compiler vectorises)
/// and stops at the first chunk that is not zero, so data costs little to check.
fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(256);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}
