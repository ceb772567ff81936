//! What an export's bytes cost at the least, on this machine: the stream's digest (BLAKE3, in
//! 1 MiB pieces on one thread, as the stream's digest thread computes it) and one copy in
//! memory, over a file read into memory first. `scripts/bench` runs it over the exported
//! stream, so the export can be set beside what its digest alone costs here.
//!
//! bench_digest FILE   prints: bytes digest_ms copy_ms

use std::time::Instant;

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("bench_digest FILE");
        return std::process::ExitCode::from(2);
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("bench_digest: reading {path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    for piece in bytes.chunks(1 << 20) {
        hasher.update(piece);
    }
    std::hint::black_box(hasher.finalize());
    let digest_ms = started.elapsed().as_secs_f64() * 1000.0;

    // Touched first, as an export's reused buffers are: the copy alone is timed, not the
    // page faults of fresh memory.
    let mut copy = vec![1u8; bytes.len()];
    let started = Instant::now();
    copy.copy_from_slice(&bytes);
    std::hint::black_box(&copy);
    let copy_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!("{} {digest_ms:.1} {copy_ms:.1}", bytes.len());
    std::process::ExitCode::SUCCESS
}
