//! The stream format's tests: round trips, zero blocks, and every way a stream can be cut
//! short, changed or hostile.

use super::*;
use crate::error::{ErrorKind, Result};
use proptest::prelude::*;
use writer::data_record_head;

const BLOCK: u64 = 4096;

fn header(size: u64, block_size: u64) -> Header {
    Header {
        name: "app".into(),
        size: ByteSize::from_bytes(size),
        filesystem: FsType::Ext4,
        fs_uuid: "6f1c2b9e-5d1e-4c2a-9a57-1b2c3d4e5f60".into(),
        block_size: ByteSize::from_bytes(block_size),
        content_id: ContentId::new("0123456789abcdef0123456789abcdef").unwrap(),
        base: Some(Base {
            name: "base".into(),
            content_id: ContentId::new("fedcba9876543210fedcba9876543210").unwrap(),
            size: ByteSize::from_bytes(size),
        }),
        labels: BTreeMap::from([("team".to_string(), "web".to_string())]),
        created_ns: 1_700_000_000_123_456_789,
    }
}

/// What the engine gives a writer.
#[derive(Debug, Clone)]
enum Call {
    Data(u64, Vec<u8>),
    Unmapped(u64, u64),
}

fn write(header: &Header, calls: &[Call], compress: bool) -> (Vec<u8>, Summary) {
    let mut writer = StreamWriter::new(Vec::new(), header, compress).unwrap();
    for call in calls {
        match call {
            Call::Data(offset, bytes) => writer.data(*offset, bytes).unwrap(),
            Call::Unmapped(offset, length) => writer.unmapped(*offset, *length).unwrap(),
        }
    }
    writer.finish().unwrap()
}

fn read_all(stream: &[u8]) -> Result<(Header, Vec<Run>, Summary)> {
    let (mut reader, header) = StreamReader::open(stream)?;
    let mut runs = Vec::new();
    while let Some(run) = reader.next_run()? {
        runs.push(run);
    }
    Ok((header, runs, reader.summary()))
}

fn refusal(stream: &[u8]) -> String {
    match read_all(stream) {
        Ok(read) => panic!("a bad stream was accepted: {read:?}"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
            e.to_string()
        }
    }
}

/// Bytes with no zero byte, different at every offset.
fn pattern(offset: u64, length: usize) -> Vec<u8> {
    (0..length as u64)
        .map(|i| ((offset + i) % 251) as u8 + 1)
        .collect()
}

fn data(offset: u64, bytes: Vec<u8>) -> Run {
    Run::Data { offset, bytes }
}

fn unmapped(offset: u64, length: u64) -> Run {
    Run::Unmapped { offset, length }
}

/// A small stream with each kind of record.
fn sample() -> (Header, Vec<Call>, Vec<Run>) {
    let header = header(64 * BLOCK, BLOCK);
    let calls = vec![
        Call::Data(0, pattern(0, 3000)),
        Call::Unmapped(2 * BLOCK, 2 * BLOCK),
        Call::Data(20_000, pattern(20_000, 5000)),
    ];
    let runs = vec![
        data(0, pattern(0, 3000)),
        unmapped(2 * BLOCK, 2 * BLOCK),
        data(20_000, pattern(20_000, 5000)),
    ];
    (header, calls, runs)
}

/// The preamble and header of a stream, for hand-made records.
fn preamble(header: &Header) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Appends an end record with these counts and the right digest.
fn seal(mut stream: Vec<u8>, runs: u64, data_bytes: u64, unmapped_bytes: u64) -> Vec<u8> {
    stream.push(TAG_END);
    for n in [runs, data_bytes, unmapped_bytes] {
        stream.extend_from_slice(&n.to_le_bytes());
    }
    let digest = blake3::hash(&stream);
    stream.extend_from_slice(digest.as_bytes());
    stream
}

fn data_record(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut record = data_record_head(offset, bytes.len()).to_vec();
    record.extend_from_slice(bytes);
    record
}

fn unmapped_record(offset: u64, length: u64) -> Vec<u8> {
    let mut record = vec![TAG_UNMAPPED];
    record.extend_from_slice(&offset.to_le_bytes());
    record.extend_from_slice(&length.to_le_bytes());
    record
}

#[test]
fn runs_round_trip_plain_and_compressed() {
    let (header, calls, runs) = sample();
    for compress in [false, true] {
        let (stream, written) = write(&header, &calls, compress);
        assert_eq!(stream.starts_with(&ZSTD_MAGIC), compress);
        assert_eq!(stream.starts_with(&MAGIC), !compress);
        let (read_header, read_runs, read) = read_all(&stream).unwrap();
        assert_eq!(read_header, header);
        assert_eq!(read_runs, runs);
        assert_eq!(read, written);
        assert_eq!(
            written,
            Summary {
                runs: 3,
                data_bytes: 8000,
                unmapped_bytes: 2 * BLOCK,
                stream_bytes: written.stream_bytes,
            }
        );
        if !compress {
            assert_eq!(written.stream_bytes, stream.len() as u64);
        }
    }
}

#[test]
fn a_full_stream_without_base_or_runs_round_trips() {
    let mut header = header(0, BLOCK);
    header.base = None;
    header.labels.clear();
    let (stream, written) = write(&header, &[], false);
    let (read_header, runs, read) = read_all(&stream).unwrap();
    assert_eq!((read_header, runs, read), (header, vec![], written));
    assert_eq!(written.runs, 0);
}

#[test]
fn the_reader_keeps_answering_after_the_end_and_after_a_refusal() {
    let (header, calls, _) = sample();
    let (stream, _) = write(&header, &calls, false);
    let (mut reader, _) = StreamReader::open(&stream[..]).unwrap();
    while reader.next_run().unwrap().is_some() {}
    assert_eq!(reader.next_run().unwrap(), None);

    let cut = &stream[..stream.len() - 1];
    let (mut reader, _) = StreamReader::open(cut).unwrap();
    let first = loop {
        if let Err(e) = reader.next_run() {
            break e;
        }
    };
    assert!(first.to_string().contains("truncated"), "{first}");
    let again = reader.next_run().unwrap_err();
    assert!(again.to_string().contains("refused already"), "{again}");
}

#[test]
fn zero_blocks_become_unmapped_and_unaligned_edges_stay_data() {
    let header = header(16 * BLOCK, BLOCK);
    let mut bytes = vec![0u8; (4 * BLOCK) as usize];
    // device 2048..6144: zeros, then one byte in the third block, zeros after.
    let marked = (2 * BLOCK + 10 - 2048) as usize;
    bytes[marked] = 7;
    let calls = vec![
        Call::Unmapped(0, 1024),
        Call::Data(2048, bytes.clone()),
        // Contiguous with the zero block that ends the data: one record.
        Call::Unmapped(5 * BLOCK, BLOCK),
    ];
    let (stream, written) = write(&header, &calls, false);
    let (_, runs, _) = read_all(&stream).unwrap();
    let at = |offset: u64, length: u64| {
        let from = (offset - 2048) as usize;
        data(offset, bytes[from..from + length as usize].to_vec())
    };
    assert_eq!(
        runs,
        vec![
            unmapped(0, 1024),
            // The unaligned edge: the first block from 2048.
            at(2048, 2048),
            unmapped(BLOCK, BLOCK),
            at(2 * BLOCK, BLOCK),
            unmapped(3 * BLOCK, BLOCK),
            // The last 2048 bytes of the call start a block it does not finish.
            at(4 * BLOCK, 2048),
            unmapped(5 * BLOCK, BLOCK),
        ]
    );
    assert_eq!(written.data_bytes, 2048 + BLOCK + 2048);
}

#[test]
fn a_zero_block_given_in_several_calls_is_still_unmapped() {
    let header = header(10 * BLOCK + 100, BLOCK);
    let half = vec![0u8; (BLOCK / 2) as usize];
    let mut dirty = half.clone();
    dirty[100] = 1;
    let calls = vec![
        // Block 0 in two halves: unmapped, merged with block 1 (one call, whole).
        Call::Data(0, half.clone()),
        Call::Data(BLOCK / 2, half.clone()),
        Call::Data(BLOCK, vec![0; BLOCK as usize]),
        // Block 2: zeros, then a half with a byte set: all data.
        Call::Data(2 * BLOCK, half.clone()),
        Call::Data(2 * BLOCK + BLOCK / 2, dirty.clone()),
        // Block 3: zeros that a gap interrupts: data.
        Call::Data(3 * BLOCK, half.clone()),
        Call::Data(3 * BLOCK + BLOCK / 2 + 1, vec![0; 10]),
        // Block 5: zeros continued by an unmapped range: one unmapped record.
        Call::Data(5 * BLOCK, half.clone()),
        Call::Unmapped(5 * BLOCK + BLOCK / 2, BLOCK / 2 + BLOCK),
        // Block 8: zeros the stream ends in: data.
        Call::Data(8 * BLOCK, half.clone()),
        // The device's last, partial block (100 bytes) all zeros: unmapped.
        // (After a gap: the held-back zeros of block 8 are written first.)
        Call::Data(10 * BLOCK, vec![0; 100]),
    ];
    let (stream, _) = write(&header, &calls, false);
    let (_, runs, summary) = read_all(&stream).unwrap();
    let mut block2 = half.clone();
    block2.extend_from_slice(&dirty);
    assert_eq!(
        runs,
        vec![
            unmapped(0, 2 * BLOCK),
            data(2 * BLOCK, half.clone()),
            data(2 * BLOCK + BLOCK / 2, dirty.clone()),
            data(3 * BLOCK, half.clone()),
            data(3 * BLOCK + BLOCK / 2 + 1, vec![0; 10]),
            unmapped(5 * BLOCK, 2 * BLOCK),
            data(8 * BLOCK, half.clone()),
            unmapped(10 * BLOCK, 100),
        ]
    );
    assert_eq!(summary.unmapped_bytes, 4 * BLOCK + 100);
}

#[test]
fn long_data_is_split_at_the_record_limit() {
    let header = header(8 << 20, 64 * 1024);
    let length = 2 * MAX_RUN_BYTES + MAX_RUN_BYTES / 2;
    let bytes = pattern(4096, length);
    let (stream, summary) = write(&header, &[Call::Data(4096, bytes.clone())], true);
    let (_, runs, _) = read_all(&stream).unwrap();
    let mb = MAX_RUN_BYTES as u64;
    assert_eq!(
        runs,
        vec![
            data(4096, bytes[..MAX_RUN_BYTES].to_vec()),
            data(4096 + mb, bytes[MAX_RUN_BYTES..2 * MAX_RUN_BYTES].to_vec()),
            data(4096 + 2 * mb, bytes[2 * MAX_RUN_BYTES..].to_vec()),
        ]
    );
    assert_eq!((summary.runs, summary.data_bytes), (3, length as u64));
}

#[test]
fn the_writer_refuses_runs_out_of_order_or_past_the_size() {
    let header = header(16 * BLOCK, BLOCK);
    let mut writer = StreamWriter::new(Vec::new(), &header, false).unwrap();
    writer.data(BLOCK, &pattern(0, 100)).unwrap();
    let back = writer.unmapped(BLOCK + 50, 10).unwrap_err();
    assert!(back.to_string().contains("ascending order"), "{back}");
    let past = writer.data(16 * BLOCK - 10, &[1; 11]).unwrap_err();
    assert!(past.to_string().contains("past the layer's size"), "{past}");
    let wraps = writer.unmapped(u64::MAX, 2).unwrap_err();
    assert!(
        wraps.to_string().contains("past the layer's size"),
        "{wraps}"
    );
    // Empty runs are nothing, wherever they are.
    writer.data(0, &[]).unwrap();
    writer.unmapped(0, 0).unwrap();

    let zero_blocks = Header {
        block_size: ByteSize::from_bytes(0),
        ..header
    };
    let err = StreamWriter::new(Vec::new(), &zero_blocks, false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("block size"), "{err}");
}

#[test]
fn every_truncation_is_refused_as_truncated() {
    let (header, calls, _) = sample();
    let (stream, _) = write(&header, &calls, false);
    for cut in 0..stream.len() {
        let message = refusal(&stream[..cut]);
        assert!(
            message.contains("the stream is truncated")
                && message.contains(&format!("ends at byte {cut},")),
            "cut at {cut}: {message}"
        );
    }
    let message = refusal(&stream[..3100]);
    assert!(
        message.contains("inside a data record at device offset 0;"),
        "{message}"
    );

    let (compressed, _) = write(&header, &calls, true);
    for cut in 0..compressed.len() {
        let message = refusal(&compressed[..cut]);
        assert!(message.contains("truncated"), "cut at {cut}: {message}");
    }
}

#[test]
fn every_changed_byte_is_refused() {
    let (header, calls, runs) = sample();
    let (stream, _) = write(&header, &calls, false);
    for at in 0..stream.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut changed = stream.clone();
            changed[at] ^= flip;
            refusal(&changed);
        }
    }
    // A compressed stream may change in ways that decode to the same bytes; never to
    // different ones.
    let (compressed, _) = write(&header, &calls, true);
    for at in 0..compressed.len() {
        let mut changed = compressed.clone();
        changed[at] ^= 0x04;
        if let Ok((read_header, read_runs, _)) = read_all(&changed) {
            assert_eq!((read_header, read_runs), (header.clone(), runs.clone()));
        }
    }
}

#[test]
fn a_changed_payload_is_refused_by_the_digest() {
    let (header, calls, _) = sample();
    let (mut stream, _) = write(&header, &calls, false);
    let at = preamble(&header).len() + 13 + 100;
    stream[at] ^= 1;
    let message = refusal(&stream);
    assert!(
        message.contains("digest does not match its contents"),
        "{message}"
    );
}

#[test]
fn anything_after_the_end_is_refused() {
    let (header, calls, _) = sample();
    let (mut stream, _) = write(&header, &calls, false);
    let end = stream.len();
    stream.push(0);
    let message = refusal(&stream);
    assert!(
        message.contains(&format!("goes on after its end record (at byte {end})")),
        "{message}"
    );

    let (compressed, _) = write(&header, &calls, true);
    let mut garbage = compressed.clone();
    garbage.extend_from_slice(b"appended");
    let message = refusal(&garbage);
    assert!(
        message.contains("goes on after its end record"),
        "{message}"
    );
    let mut another_frame = compressed.clone();
    another_frame.extend_from_slice(&zstd::encode_all(&b"more"[..], 3).unwrap());
    let message = refusal(&another_frame);
    assert!(
        message.contains("goes on after its end record"),
        "{message}"
    );
    // An empty frame adds no bytes: the same stream.
    let mut empty_frame = compressed.clone();
    empty_frame.extend_from_slice(&zstd::encode_all(&b""[..], 3).unwrap());
    read_all(&empty_frame).unwrap();
}

#[test]
fn a_stream_in_several_zstd_frames_is_read() {
    let (header, calls, runs) = sample();
    let (stream, _) = write(&header, &calls, false);
    let mut frames = Vec::new();
    for piece in stream.chunks(1000) {
        frames.extend_from_slice(&zstd::encode_all(piece, 1).unwrap());
    }
    assert_eq!(read_all(&frames).unwrap().1, runs);
}

#[test]
fn a_newer_version_asks_for_an_upgrade() {
    let (header, calls, _) = sample();
    let (mut stream, _) = write(&header, &calls, false);
    stream[8..10].copy_from_slice(&2u16.to_le_bytes());
    let message = refusal(&stream);
    assert!(
        message.contains(
            "stream format version 2 is newer than this thinstack reads (1); upgrade \
             thinstack on this host"
        ),
        "{message}"
    );
    stream[8..10].copy_from_slice(&0u16.to_le_bytes());
    assert!(refusal(&stream).contains("version 0"));
}

#[test]
fn other_files_are_not_streams() {
    let message = refusal(b"#!/bin/sh\necho hello\n");
    assert!(
        message.contains("not a thinstack layer stream (it starts with \"#!/bin/s\""),
        "{message}"
    );
    let text = zstd::encode_all(&b"some text, compressed"[..], 3).unwrap();
    let message = refusal(&text);
    assert!(
        message.contains("not a thinstack layer stream (it is zstd-compressed"),
        "{message}"
    );
    assert!(refusal(b"").contains("truncated"));
    assert!(refusal(b"TH").contains("truncated"));
    assert!(refusal(b"TX").contains("not a thinstack layer stream"));
}

#[test]
fn bad_headers_are_refused() {
    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&1u16.to_le_bytes());
    let json = b"{\"name\": ";
    stream.extend_from_slice(&(json.len() as u32).to_le_bytes());
    stream.extend_from_slice(json);
    let message = refusal(&stream);
    assert!(
        message.contains("the stream's header is not valid JSON"),
        "{message}"
    );

    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&1u16.to_le_bytes());
    let json = b"{\"name\": \"x\"}";
    stream.extend_from_slice(&(json.len() as u32).to_le_bytes());
    stream.extend_from_slice(json);
    let message = refusal(&stream);
    assert!(message.contains("missing field"), "{message}");

    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&1u16.to_le_bytes());
    stream.extend_from_slice(&u32::MAX.to_le_bytes());
    let message = refusal(&stream);
    assert!(message.contains("more than the 1048576"), "{message}");

    let zero_blocks = Header {
        block_size: ByteSize::from_bytes(0),
        ..header(BLOCK, BLOCK)
    };
    let message = refusal(&seal(preamble(&zero_blocks), 0, 0, 0));
    assert!(message.contains("block size of 0"), "{message}");
}

#[test]
fn unknown_header_fields_are_ignored() {
    let header = header(BLOCK, BLOCK);
    let mut value = serde_json::to_value(&header).unwrap();
    value["compression_hint"] = serde_json::json!({"added": "later"});
    let json = serde_json::to_vec(&value).unwrap();
    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&1u16.to_le_bytes());
    stream.extend_from_slice(&(json.len() as u32).to_le_bytes());
    stream.extend_from_slice(&json);
    let (read, _, _) = read_all(&seal(stream, 0, 0, 0)).unwrap();
    assert_eq!(read, header);
}

#[test]
fn bad_records_are_refused_even_with_a_good_digest() {
    let header = header(16 * BLOCK, BLOCK);
    let start = preamble(&header);
    let record_at = start.len();
    let with = |records: &[Vec<u8>], counts: (u64, u64, u64)| {
        let mut stream = start.clone();
        for record in records {
            stream.extend_from_slice(record);
        }
        refusal(&seal(stream, counts.0, counts.1, counts.2))
    };

    let message = with(&[vec![0x7a]], (0, 0, 0));
    assert!(
        message.contains(&format!("unknown record tag 0x7a at byte {record_at}")),
        "{message}"
    );
    let message = with(&[data_record(0, &[])], (1, 0, 0));
    assert!(message.contains("is empty (length 0)"), "{message}");
    let message = with(&[unmapped_record(BLOCK, 0)], (1, 0, 0));
    assert!(message.contains("is empty (length 0)"), "{message}");
    let message = with(&[data_record(16 * BLOCK - 1, &[1, 2])], (1, 2, 0));
    assert!(message.contains("past the layer's size"), "{message}");
    let message = with(&[unmapped_record(1, u64::MAX)], (1, 0, u64::MAX));
    assert!(message.contains("past the layer's size"), "{message}");
    let message = with(
        &[unmapped_record(0, BLOCK), data_record(BLOCK - 1, &[1])],
        (2, 1, BLOCK),
    );
    assert!(
        message.contains("before the end of the previous record"),
        "{message}"
    );
    let message = with(
        &[data_record(BLOCK, &[1]), unmapped_record(0, 1)],
        (2, 1, 1),
    );
    assert!(
        message.contains("before the end of the previous record"),
        "{message}"
    );
    let message = with(&[data_record(0, &[1, 2, 3])], (1, 4, 0));
    assert!(
        message.contains("end record counts 1 runs, 4 data bytes"),
        "{message}"
    );
    // Adjacent records are fine, and need not be merged.
    let mut stream = start.clone();
    stream.extend_from_slice(&unmapped_record(0, 10));
    stream.extend_from_slice(&unmapped_record(10, 10));
    stream.extend_from_slice(&data_record(20, &[0]));
    read_all(&seal(stream, 3, 1, 20)).unwrap();
}

/// A reader that counts what was asked of it: a hostile length must be refused before a
/// buffer for it is made or filled.
#[test]
fn a_hostile_data_length_is_refused_without_reading_it() {
    let header = header(u64::MAX, BLOCK);
    let mut stream = preamble(&header);
    stream.push(TAG_DATA);
    stream.extend_from_slice(&0u64.to_le_bytes());
    stream.extend_from_slice(&u32::MAX.to_le_bytes());
    // Four gigabytes would follow; a few do.
    stream.extend_from_slice(&[1; 64]);
    let message = refusal(&stream);
    assert!(
        message.contains("holds 4294967295 bytes, more than the 1048576 a record may"),
        "{message}"
    );
    let mut stream = preamble(&header);
    stream.push(TAG_DATA);
    stream.extend_from_slice(&0u64.to_le_bytes());
    stream.extend_from_slice(&(MAX_RUN_BYTES as u32 + 1).to_le_bytes());
    assert!(refusal(&stream).contains("more than the 1048576"));
}

/// Reads `good` bytes, then fails like a broken connection.
struct Failing<'a> {
    good: &'a [u8],
}

impl Read for Failing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good.is_empty() {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
        }
        self.good.read(buf)
    }
}

#[test]
fn io_errors_are_io_errors() {
    let (header, calls, _) = sample();
    for compress in [false, true] {
        let (stream, _) = write(&header, &calls, compress);
        for cut in [0, stream.len() / 2, stream.len()] {
            let failing = Failing {
                good: &stream[..cut],
            };
            let err = match StreamReader::open(failing) {
                Err(e) => e,
                Ok((mut reader, _)) => loop {
                    match reader.next_run() {
                        Err(e) => break e,
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("a failing read was not noticed"),
                    }
                },
            };
            assert_eq!(err.kind(), ErrorKind::Io, "{compress} {cut}: {err}");
            assert!(
                err.to_string().starts_with("reading the layer stream: "),
                "{err}"
            );
        }
    }

    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::StorageFull, "full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut writer = StreamWriter::new(Full, &header, false).unwrap();
    writer.data(0, &pattern(0, 1 << 20)).unwrap_err();
    let writer = StreamWriter::new(Full, &header, false).unwrap();
    let err = writer.finish().err().unwrap();
    assert!(
        err.to_string().starts_with("writing the layer stream: "),
        "{err}"
    );
}

/// Applies runs to an image of the device: which bytes were written, and with what.
fn apply(size: usize, runs: &[Run]) -> (Vec<u8>, Vec<bool>) {
    let mut image = vec![0xAAu8; size];
    let mut written = vec![false; size];
    for run in runs {
        let (offset, length) = match run {
            Run::Data { offset, bytes } => {
                let at = *offset as usize;
                image[at..at + bytes.len()].copy_from_slice(bytes);
                (at, bytes.len())
            }
            Run::Unmapped { offset, length } => {
                let at = *offset as usize;
                image[at..at + *length as usize].fill(0);
                (at, *length as usize)
            }
        };
        assert!(written[offset..offset + length].iter().all(|w| !w));
        written[offset..offset + length].fill(true);
    }
    (image, written)
}

/// Calls with gaps between them: data made of zero and non-zero stretches (so some blocks
/// are all zeros), and unmapped ranges.
fn calls() -> impl Strategy<Value = (u64, Vec<Call>)> {
    let stretch = (any::<bool>(), 1usize..3000);
    let call = (
        0u64..6000,
        any::<bool>(),
        proptest::collection::vec(stretch, 1..5),
        any::<u8>(),
    );
    proptest::collection::vec(call, 0..12).prop_map(|specs| {
        let mut at = 0u64;
        let mut calls = Vec::new();
        for (gap, is_data, stretches, seed) in specs {
            at += gap;
            let length: usize = stretches.iter().map(|(_, n)| n).sum();
            if is_data {
                let mut bytes = Vec::with_capacity(length);
                for (zero, n) in stretches {
                    let fill = if zero { 0 } else { seed | 1 };
                    bytes.extend(std::iter::repeat_n(fill, n));
                }
                calls.push(Call::Data(at, bytes));
            } else {
                calls.push(Call::Unmapped(at, length as u64));
            }
            at += length as u64;
        }
        (at, calls)
    })
}

proptest! {
    #[test]
    fn random_runs_round_trip(
        (end, calls) in calls(),
        slack in 0u64..5000,
        block_size in prop_oneof![Just(512u64), Just(1024), Just(4096)],
        compress in any::<bool>(),
    ) {
        let size = end + slack;
        let header = header(size, block_size);
        let (stream, written) = write(&header, &calls, compress);
        let (read_header, runs, read) = read_all(&stream).unwrap();
        prop_assert_eq!(read_header, header);
        prop_assert_eq!(read, written);
        let expected_runs: Vec<Run> = calls
            .iter()
            .map(|call| match call {
                Call::Data(offset, bytes) => Run::Data { offset: *offset, bytes: bytes.clone() },
                Call::Unmapped(offset, length) => Run::Unmapped { offset: *offset, length: *length },
            })
            .collect();
        let expected = apply(size as usize, &expected_runs);
        let got = apply(size as usize, &runs);
        prop_assert!(expected == got, "the stream's runs write a different image");
        prop_assert_eq!(
            read.data_bytes + read.unmapped_bytes,
            got.1.iter().filter(|w| **w).count() as u64
        );
        for run in &runs {
            if let Run::Unmapped { offset, length } = run {
                // An unmapped record comes from an unmapped call or from whole zero
                // blocks: anything else starts and ends on a block boundary or the size.
                let from_call = expected_runs.iter().any(|call| matches!(call,
                    Run::Unmapped { offset: o, length: l } if o + l > *offset && *o < offset + length));
                prop_assert!(
                    from_call || (offset % block_size == 0
                        && ((offset + length) % block_size == 0 || offset + length == size))
                );
            }
        }
    }
}
