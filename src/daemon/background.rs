//! Work the daemon does on its own: retrying deferred removals, watching pool space (warnings
//! at 80% and 90%), and growing a loop-backed pool before it fills.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Daemon;
use crate::config::{Backend, LoopConfig};
use crate::kernel::{loopdev, PoolUsage, Space};
use crate::units::ByteSize;

/// Shares of use at which a warning is logged (once per crossing).
const WARN_AT: [f64; 2] = [80.0, 90.0];

/// The watcher thread; stop it with [`Watcher::stop`].
pub struct Watcher {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Watcher {
    /// Stop the watcher after its current round.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// Start the watcher.
pub fn spawn(daemon: Arc<Daemon>) -> Watcher {
    let (stop, stopped) = mpsc::channel();
    let interval = Duration::from_secs(daemon.config.daemon.watch_interval_seconds.max(1).into());
    let thread = std::thread::Builder::new()
        .name("thinstackd-watch".into())
        .spawn(move || {
            let mut levels = Levels::default();
            loop {
                watch_once(&daemon, &mut levels);
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            }
        })
        .expect("spawning the watcher thread");
    Watcher { stop, thread }
}

/// The warning level last logged for data and metadata (index into `WARN_AT`, plus one).
#[derive(Default)]
struct Levels {
    data: usize,
    metadata: usize,
}

fn watch_once(daemon: &Daemon, levels: &mut Levels) {
    match daemon.engine.process_deferred() {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(layers = ?removed, "deferred removals done")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "retrying deferred removals failed; will retry"),
    }
    let usage = match daemon.engine.pool_usage() {
        Ok(usage) => usage,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the pool's status");
            return;
        }
    };
    warn_on_crossing("data", &usage.data, &mut levels.data);
    warn_on_crossing("metadata", &usage.metadata, &mut levels.metadata);
    match daemon.config.pool.backend {
        Backend::Loop => autoextend_loop(daemon, &daemon.config.pool.loop_files, &usage),
    }
}

fn warn_on_crossing(area: &str, space: &Space, level: &mut usize) {
    let percent = space.percent_used();
    let now = WARN_AT.iter().filter(|&&at| percent >= at).count();
    if now > *level {
        tracing::warn!(area, used = %space.describe(), "pool {area} is over {}% full; extend the pool (thinstack pool extend) or remove layers", WARN_AT[now - 1]);
    }
    *level = now;
}

/// Grow the loop files by `autoextend_percent` when use crosses `autoextend_threshold`, up to
/// the configured maximum.
fn autoextend_loop(daemon: &Daemon, config: &LoopConfig, usage: &PoolUsage) {
    let threshold = f64::from(config.autoextend_threshold.value());
    if threshold >= 100.0 {
        return;
    }
    // Growth is reckoned from the files: the pool's data total is whole blocks of its file.
    let backing = daemon.engine.kernel().pool().backing();
    let grow = |space: &Space, file: &Path, max: ByteSize| -> Option<ByteSize> {
        if space.percent_used() < threshold {
            return None;
        }
        let current = loopdev::file_size(file).ok()?;
        if current >= max {
            return None;
        }
        let step = config.autoextend_percent.of(current.bytes()).max(1 << 20);
        Some(ByteSize::from_bytes(
            (current.bytes() + step).min(max.bytes()),
        ))
    };
    let data = grow(&usage.data, &backing.data_file, config.data_size_max);
    let metadata = grow(
        &usage.metadata,
        &backing.metadata_file,
        config.metadata_size_max.size(),
    );
    if data.is_none() && metadata.is_none() {
        return;
    }
    match daemon.extend(data, metadata) {
        Ok((data, metadata)) => {
            tracing::warn!(%data, %metadata, "pool was filling up; extended it")
        }
        Err(e) => tracing::error!(error = %e, "automatic pool extension failed"),
    }
}

/// Used in tests: how a space crossing changes the level.
#[cfg(test)]
pub(super) fn level_after(percent_used: u64, level: usize) -> usize {
    let mut level = level;
    let space = Space::new(percent_used, 100);
    warn_on_crossing("data", &space, &mut level);
    level
}
