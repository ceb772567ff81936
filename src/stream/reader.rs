//! Reading a layer stream: zstd noticed and undone, every record checked as it comes, the end
//! record's counts and digest checked at the end.

use std::fmt;
use std::io::{self, BufReader, Chain, Cursor, Read};

use super::*;
use crate::error::{Error, Result};

/// The underlying reader, remembering whether it failed, so an error that comes out of the
/// zstd decoder can be told apart (the source's I/O error, or damaged compressed data), and
/// how many bytes it gave (where a compressed stream ends).
struct Tracked<R> {
    inner: R,
    failed: bool,
    bytes: u64,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }
}

/// The sniffed first bytes, put back in front of the rest of the input.
type Sniffed<R> = Chain<Cursor<Vec<u8>>, Tracked<R>>;

/// Where a reader's uncompressed bytes come from.
enum Source<R: Read> {
    Plain(Sniffed<R>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<Sniffed<R>>>),
}

impl<R: Read> Source<R> {
    fn underlying(&self) -> &Tracked<R> {
        match self {
            Source::Plain(chain) => chain.get_ref().1,
            Source::Zstd(decoder) => decoder.get_ref().get_ref().get_ref().1,
        }
    }

    fn underlying_failed(&self) -> bool {
        self.underlying().failed
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(r) => r.read(buf),
            Source::Zstd(r) => r.read(buf),
        }
    }
}

/// Whether the reader is still reading records, has read a whole valid stream, or has refused
/// it (and so reads nothing more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Records,
    Done,
    Refused,
}

/// Decodes and checks one layer stream, plain or zstd-compressed. Every record is checked as
/// it is read (bounds, order, sizes); the end record's counts and digest are checked when it
/// is reached, so what was read is only known to be the exported layer once
/// [`StreamReader::next_run`] returns `None`.
pub struct StreamReader<R: Read> {
    input: Hashing<BufReader<Source<R>>>,
    compressed: bool,
    size: u64,
    /// The end of the previous record: the next must start at or after it.
    next_min: u64,
    summary: Summary,
    state: State,
}

impl<R: Read> fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamReader")
            .field("compressed", &self.compressed)
            .field("size", &self.size)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl<R: Read> StreamReader<R> {
    /// Starts reading a stream: undoes zstd if the input starts with a zstd frame, then reads
    /// and checks the magic, the format version and the header. Errors say what is wrong: not
    /// a layer stream, a format version newer than this thinstack reads (upgrade it), a header
    /// that is not valid JSON or not a layer header, a truncated stream.
    ///
    /// The header is not yet covered by the digest check: trust it for the import's preflight
    /// (base content id, size), but keep nothing until `next_run` returns `None`.
    pub fn open(input: R) -> Result<(Self, Header)> {
        let mut input = Tracked {
            inner: input,
            failed: false,
            bytes: 0,
        };
        let mut sniffed = vec![0u8; ZSTD_MAGIC.len()];
        let n = read_up_to(&mut input, &mut sniffed)
            .map_err(|e| Error::io("reading the layer stream", e))?;
        sniffed.truncate(n);
        if n > 0 && n < ZSTD_MAGIC.len() && sniffed[..] == ZSTD_MAGIC[..n] {
            return Err(Error::invalid(format!(
                "the stream is truncated: it ends at byte {n}, inside the zstd magic number at \
                 its start; export it again (an interrupted transfer cuts a stream short)"
            )));
        }
        let compressed = is_zstd(&sniffed);
        let sniffed = Cursor::new(sniffed).chain(input);
        let source = if compressed {
            Source::Zstd(
                zstd::stream::read::Decoder::new(sniffed)
                    .map_err(|e| Error::io("starting zstd decompression of the layer stream", e))?,
            )
        } else {
            Source::Plain(sniffed)
        };
        let mut reader = StreamReader {
            input: Hashing::new(BufReader::with_capacity(BUFFER_BYTES, source)),
            compressed,
            size: 0,
            next_min: 0,
            summary: Summary::default(),
            state: State::Records,
        };
        let header = reader.read_preamble()?;
        reader.size = header.size.bytes();
        Ok((reader, header))
    }

    /// The next run, checked as it is read: not empty, within the layer's size, after the
    /// previous run, a data record no longer than [`MAX_RUN_BYTES`] (its length is checked
    /// before anything is allocated). `None` once the end record was read, its counts and
    /// digest match, and nothing follows it.
    ///
    /// After an error the stream stays refused: later calls fail too.
    pub fn next_run(&mut self) -> Result<Option<Run>> {
        match self.state {
            State::Done => return Ok(None),
            State::Refused => {
                return Err(Error::invalid(
                    "the layer stream was refused already; nothing more is read from it",
                ))
            }
            State::Records => {}
        }
        let result = self.read_record();
        match &result {
            Err(_) => self.state = State::Refused,
            Ok(None) => self.state = State::Done,
            Ok(Some(_)) => {}
        }
        result
    }

    /// What was read so far; after `next_run` returned `None`, the whole stream's (equal to
    /// the writer's summary).
    pub fn summary(&self) -> Summary {
        Summary {
            stream_bytes: self.input.bytes,
            ..self.summary
        }
    }

    /// Magic, version, header length and header.
    fn read_preamble(&mut self) -> Result<Header> {
        let mut magic = [0u8; MAGIC.len()];
        let n = read_up_to(&mut self.input, &mut magic).map_err(|e| {
            self.read_error(e, || "inside the magic number at its start".to_string())
        })?;
        if magic[..n] != MAGIC[..n] {
            let zstd = if self.compressed {
                "it is zstd-compressed, and its content starts"
            } else {
                "it starts"
            };
            return Err(Error::invalid(format!(
                "not a thinstack layer stream ({zstd} with \"{}\", not \"{}\"); give a file \
                 written by `thinstack layer export`",
                magic[..n].escape_ascii(),
                MAGIC.escape_ascii()
            )));
        }
        if n < MAGIC.len() {
            return Err(self.truncated("inside the magic number at its start"));
        }
        let version = u16::from_le_bytes(self.read_array(|| "inside the format version".into())?);
        if version > FORMAT_VERSION {
            return Err(Error::invalid(format!(
                "stream format version {version} is newer than this thinstack reads \
                 ({FORMAT_VERSION}); upgrade thinstack on this host"
            )));
        }
        if version == 0 {
            return Err(Error::invalid(
                "stream format version 0 is not one thinstack writes: the stream is damaged; \
                 export it again",
            ));
        }
        let length = u32::from_le_bytes(self.read_array(|| "inside the header length".into())?);
        if length as usize > MAX_HEADER_BYTES {
            return Err(Error::invalid(format!(
                "the stream's header would be {length} bytes, more than the \
                 {MAX_HEADER_BYTES} a header may have: the stream is damaged; export it again"
            )));
        }
        let mut json = vec![0u8; length as usize];
        self.read_exact(&mut json, || "inside the header".into())?;
        let header: Header = serde_json::from_slice(&json).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => Error::invalid(format!(
                    "the stream's header is not a layer stream header: {e}; export it again"
                )),
                _ => Error::invalid(format!(
                    "the stream's header is not valid JSON: {e}; export it again"
                )),
            }
        })?;
        if header.block_size.bytes() == 0 {
            return Err(Error::invalid(
                "the stream's header gives a block size of 0: the stream is damaged; export it \
                 again",
            ));
        }
        Ok(header)
    }

    /// One record: a run, or `None` after a valid end record.
    fn read_record(&mut self) -> Result<Option<Run>> {
        let at = self.input.bytes;
        let records = self.summary.runs;
        let [tag] = self.read_array(|| {
            format!("after {records} records, where another record or the end record should start")
        })?;
        match tag {
            TAG_DATA => {
                let offset =
                    u64::from_le_bytes(self.read_array(|| {
                        format!("inside the data record that starts at byte {at}")
                    })?);
                let length =
                    u32::from_le_bytes(self.read_array(|| {
                        format!("inside the data record that starts at byte {at}")
                    })?);
                if length as usize > MAX_RUN_BYTES {
                    return Err(Error::invalid(format!(
                        "the data record at byte {at} holds {length} bytes, more than the \
                         {MAX_RUN_BYTES} a record may: the stream is damaged; export it again"
                    )));
                }
                self.check_run("data", at, offset, u64::from(length))?;
                let mut bytes = vec![0u8; length as usize];
                self.read_exact(&mut bytes, || {
                    format!("inside a data record at device offset {offset}")
                })?;
                self.summary.runs += 1;
                self.summary.data_bytes += u64::from(length);
                Ok(Some(Run::Data { offset, bytes }))
            }
            TAG_UNMAPPED => {
                let place = || format!("inside the unmapped record that starts at byte {at}");
                let offset = u64::from_le_bytes(self.read_array(place)?);
                let length = u64::from_le_bytes(self.read_array(place)?);
                self.check_run("unmapped", at, offset, length)?;
                self.summary.runs += 1;
                self.summary.unmapped_bytes += length;
                Ok(Some(Run::Unmapped { offset, length }))
            }
            TAG_END => {
                self.read_end(at)?;
                Ok(None)
            }
            other => Err(Error::invalid(format!(
                "unknown record tag 0x{other:02x} at byte {at}: the stream is damaged; export it \
                 again"
            ))),
        }
    }

    /// A record's range: not empty, within the layer, after the previous record.
    fn check_run(&mut self, kind: &str, at: u64, offset: u64, length: u64) -> Result<()> {
        if length == 0 {
            return Err(Error::invalid(format!(
                "the {kind} record at byte {at} is empty (length 0): the stream is damaged; \
                 export it again"
            )));
        }
        let end = offset.checked_add(length).filter(|end| *end <= self.size);
        let Some(end) = end else {
            return Err(Error::invalid(format!(
                "the {kind} record at byte {at} covers {length} bytes at device offset {offset}, \
                 past the layer's size ({} bytes): the stream is damaged; export it again",
                self.size
            )));
        };
        if offset < self.next_min {
            return Err(Error::invalid(format!(
                "the {kind} record at byte {at} starts at device offset {offset}, before the end \
                 of the previous record ({}); records must ascend without overlap: the stream is \
                 damaged; export it again",
                self.next_min
            )));
        }
        self.next_min = end;
        Ok(())
    }

    /// The end record's counts and digest, then the check that nothing follows.
    fn read_end(&mut self, at: u64) -> Result<()> {
        let place = || format!("inside the end record that starts at byte {at}");
        let runs = u64::from_le_bytes(self.read_array(place)?);
        let data_bytes = u64::from_le_bytes(self.read_array(place)?);
        let unmapped_bytes = u64::from_le_bytes(self.read_array(place)?);
        let computed = self.input.hasher.finalize();
        let mut digest = [0u8; blake3::OUT_LEN];
        // Read past the hasher: the digest is not part of what it digests.
        let n = read_up_to(&mut self.input.inner, &mut digest)
            .map_err(|e| self.read_error(e, place))?;
        self.input.bytes += n as u64;
        if n < digest.len() {
            return Err(self.truncated(&place()));
        }
        if computed != blake3::Hash::from_bytes(digest) {
            return Err(Error::invalid(format!(
                "the stream's digest does not match its contents: it was changed or damaged \
                 after export (read {}); export it again",
                ByteSize::from_bytes(self.input.bytes).human()
            )));
        }
        let read = (
            self.summary.runs,
            self.summary.data_bytes,
            self.summary.unmapped_bytes,
        );
        if (runs, data_bytes, unmapped_bytes) != read {
            return Err(Error::invalid(format!(
                "the stream's end record counts {runs} runs, {data_bytes} data bytes and \
                 {unmapped_bytes} unmapped bytes, but the stream holds {} runs, {} data bytes \
                 and {} unmapped bytes: the exporting thinstack wrote a broken stream",
                read.0, read.1, read.2
            )));
        }
        let end = self.input.bytes;
        let mut extra = [0u8; 1];
        let follows = match read_up_to(&mut self.input.inner, &mut extra) {
            Ok(n) => n > 0,
            Err(e) if self.input.inner.get_ref().underlying_failed() => {
                return Err(Error::io("reading the layer stream", e))
            }
            // The last zstd frame is cut short, after the stream's own bytes.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(self.truncated("inside the zstd frame's end, after the end record"))
            }
            // The decoder met bytes after the last zstd frame that are not zstd.
            Err(_) => true,
        };
        if follows {
            return Err(Error::invalid(format!(
                "the stream goes on after its end record (at byte {end}): something was \
                 appended to it; export it again"
            )));
        }
        Ok(())
    }

    fn read_array<const N: usize>(&mut self, place: impl FnOnce() -> String) -> Result<[u8; N]> {
        let mut bytes = [0u8; N];
        self.read_exact(&mut bytes, place)?;
        Ok(bytes)
    }

    fn read_exact(&mut self, buf: &mut [u8], place: impl FnOnce() -> String) -> Result<()> {
        self.input
            .read_exact(buf)
            .map_err(|e| self.read_error(e, place))
    }

    /// An I/O error while reading at `place`: the source's own failure, the end of the
    /// stream (truncation), or damaged compressed data.
    fn read_error(&self, e: io::Error, place: impl FnOnce() -> String) -> Error {
        if self.input.inner.get_ref().underlying_failed() {
            Error::io("reading the layer stream", e)
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            self.truncated(&place())
        } else {
            Error::invalid(format!(
                "the stream's zstd-compressed form is damaged (zstd: {e}): decompressing \
                 stopped at byte {} of the stream, {}; export it again",
                self.input.bytes,
                place(),
            ))
        }
    }

    /// The stream ended early: where, in the stream (and in its compressed form, whose
    /// length is what an operator sees of a cut file).
    fn truncated(&self, place: &str) -> Error {
        let at = self.input.bytes;
        let ends = if self.compressed {
            let compressed = self.input.inner.get_ref().underlying().bytes;
            format!(
                "its zstd-compressed form ends at byte {compressed}, at byte {at} of the stream"
            )
        } else {
            format!("it ends at byte {at}")
        };
        Error::invalid(format!(
            "the stream is truncated: {ends}, {place}; export it again (an interrupted transfer \
             cuts a stream short)"
        ))
    }
}

/// Reads into `buf` until it is full or the input ends; how many bytes were read.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Whether a stream's first bytes are a zstd frame's magic, or a zstd skippable frame's
/// (0x184D2A50 to 0x184D2A5F), which a zstd stream may also start with.
fn is_zstd(first: &[u8]) -> bool {
    let Ok(first) = <[u8; 4]>::try_from(first) else {
        return false;
    };
    first == ZSTD_MAGIC || u32::from_le_bytes(first) & 0xFFFF_FFF0 == 0x184D_2A50
}
