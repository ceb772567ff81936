//! Work the daemon does on its own: retrying deferred removals, deleting devices resets
//! replaced and spares commits let go, watching pool space (warnings
//! at 80% and 90%), and growing a loop or LVM pool before it fills (an LVM pool only where
//! dmeventd does not run: then LVM's own monitoring does it).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Daemon;
use crate::config::LoopConfig;
use crate::kernel::{PoolUsage, Room};
use crate::pool::lvm;
use crate::units::ByteSize;
use crate::vocab::Space;

/// Shares of use at which a warning is logged (once per crossing).
const WARN_AT: [f64; 2] = [80.0, 90.0];

/// What wakes the watcher before its next round.
pub enum Wake {
    /// The daemon is stopping.
    Stop,
    /// An operation left work to finish after its answer (a device a reset replaced, a spare
    /// a commit let go, or a removed layer's, to delete).
    DeferredWork,
}

/// The watcher thread; stop it with [`Watcher::stop`].
pub struct Watcher {
    wake: mpsc::Sender<Wake>,
    thread: JoinHandle<()>,
}

impl Watcher {
    /// Stop the watcher after its current round.
    pub async fn stop(self) {
        let _ = self.wake.send(Wake::Stop);
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// Start the watcher: a round every `watch_interval_seconds`, and the deferred work as soon
/// as the daemon asks for it ([`Daemon::defer_work`]), without moving the rounds.
pub fn spawn(
    daemon: Arc<Daemon>,
    wake: mpsc::Sender<Wake>,
    woken: mpsc::Receiver<Wake>,
) -> Watcher {
    let interval = Duration::from_secs(daemon.config.daemon.watch_interval_seconds.max(1).into());
    let thread = std::thread::Builder::new()
        .name("thinstackd-watch".into())
        .spawn(move || {
            let mut levels = Levels::default();
            loop {
                watch_once(&daemon, &mut levels);
                let next_round = Instant::now() + interval;
                loop {
                    let left = next_round.saturating_duration_since(Instant::now());
                    match woken.recv_timeout(left) {
                        Ok(Wake::DeferredWork) => {
                            let stopping = settle(&woken);
                            // Done before a stop too: what an answer just promised is not
                            // left for the next start.
                            deferred_work(&daemon);
                            if stopping {
                                return;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        })
        .expect("spawning the watcher thread");
    Watcher { wake, thread }
}

/// How long the deferred work waits after the wake that asked for it. The request that asked
/// is answered meanwhile: the round's pool messages would otherwise compete with its answer
/// for the CPU (in the VM a reset's round trip was 1 ms longer, median of 100), and wakes
/// close behind it (a removal each) are served by the same round.
const DEFERRED_WORK_SETTLE: Duration = Duration::from_millis(20);

/// Wait [`DEFERRED_WORK_SETTLE`], taking the wakes sent meanwhile; returns whether one of them
/// was `Stop` (which ends the wait at once, for the work to be done before the stop).
fn settle(woken: &mpsc::Receiver<Wake>) -> bool {
    let until = Instant::now() + DEFERRED_WORK_SETTLE;
    loop {
        match woken.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Wake::DeferredWork) => {}
            Err(RecvTimeoutError::Timeout) => return false,
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return true,
        }
    }
}

/// The warning level last logged for data and metadata (index into `WARN_AT`, plus one).
#[derive(Default)]
struct Levels {
    data: usize,
    metadata: usize,
    volume_group_full: bool,
    /// Watcher rounds the LVM pool has been over its extension threshold.
    rounds_over: u32,
    /// When the mounted layers were last trimmed (or the watcher started).
    last_trim: Option<std::time::Instant>,
}

/// Where dmeventd runs, it extends a monitored LVM pool (by the profile); thinstackd steps in
/// only when the pool stays over the threshold this many rounds (dmeventd checks every 10 s).
const DMEVENTD_GRACE_ROUNDS: u32 = 3;

/// Deferred removals whose devices were released, and devices resets replaced.
fn deferred_work(daemon: &Daemon) {
    match daemon.engine.process_deferred() {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(layers = ?removed, "deferred removals done")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "retrying deferred removals failed; will retry"),
    }
}

fn watch_once(daemon: &Daemon, levels: &mut Levels) {
    deferred_work(daemon);
    let usage = match daemon.engine.pool_usage() {
        Ok(usage) => usage,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the pool's status");
            return;
        }
    };
    warn_on_crossing("data", &usage.data, &mut levels.data);
    warn_on_crossing("metadata", &usage.metadata, &mut levels.metadata);
    match daemon.engine.kernel().room() {
        Ok(Room::Files { data, metadata }) => autoextend_files(
            daemon,
            &daemon.config.pool.loop_files,
            (data, metadata),
            &usage,
        ),
        Ok(Room::Volumes) => autoextend_lvm(daemon, &usage, levels),
        // Other pools are sized by whoever made them (or by hand, `thinstack pool extend`).
        Ok(Room::Fixed) => {}
        Err(e) => tracing::error!(error = %e, "cannot read how far the pool can grow"),
    }
    guard_metadata(daemon, &usage);
    trim_on_schedule(daemon, levels);
}

/// `layers.trim_interval`: trim every layer mounted read-write once the interval has passed
/// since the last round of trims (the first comes one interval after start).
fn trim_on_schedule(daemon: &Daemon, levels: &mut Levels) {
    let Some(interval) = daemon.config.layers.trim_interval else {
        return;
    };
    let last = *levels.last_trim.get_or_insert_with(std::time::Instant::now);
    if last.elapsed() < interval.duration() {
        return;
    }
    levels.last_trim = Some(std::time::Instant::now());
    let layers = match daemon.engine.list(&Default::default()) {
        Ok(layers) => layers,
        Err(e) => return tracing::warn!(error = %e, "listing layers to trim them failed"),
    };
    let mounted = layers
        .iter()
        .filter(|l| l.snapshot.is_none() && l.mounts.values().any(|m| !m.read_only));
    for layer in mounted {
        match daemon.engine.trim(layer.name.as_str()) {
            Ok(trimmed) => {
                tracing::info!(layer = %layer.name, given_back = %trimmed.given_back, "trimmed on schedule (layers.trim_interval)")
            }
            Err(e) => {
                tracing::warn!(layer = %layer.name, error = %e, "trimming on schedule failed; will try again next interval")
            }
        }
    }
}

/// After any growth: a pool whose metadata is still nearly full is made read-only.
fn guard_metadata(daemon: &Daemon, usage: &PoolUsage) {
    match daemon.guard_metadata() {
        Ok(Some(true)) => tracing::error!(
            metadata = %usage.metadata.describe(),
            "the pool's metadata is nearly full, so the pool is now read-only (running out would fail it for good); writes that need new blocks fail until `thinstack pool extend --metadata SIZE`"
        ),
        Ok(Some(false)) => {
            tracing::warn!("the pool's metadata has room again: the pool is writable")
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "could not guard the pool's metadata"),
    }
}

fn warn_on_crossing(area: &str, space: &Space, level: &mut usize) {
    // An area the pool does not have (an rbd pool's dm-thin metadata) never fills.
    if space.total.bytes() == 0 {
        return;
    }
    let percent = space.percent_used();
    let now = WARN_AT.iter().filter(|&&at| percent >= at).count();
    if now > *level {
        tracing::warn!(area, used = %space.describe(), "pool {area} is over {}% full; extend the pool (thinstack pool extend) or remove layers", WARN_AT[now - 1]);
    }
    *level = now;
}

/// Grow the pool's files (`files`: their data and metadata sizes now) by `autoextend_percent`
/// when use crosses `autoextend_threshold`, up to the configured maximum.
fn autoextend_files(
    daemon: &Daemon,
    config: &LoopConfig,
    files: (ByteSize, ByteSize),
    usage: &PoolUsage,
) {
    let threshold = f64::from(config.autoextend_threshold.value());
    if threshold >= 100.0 {
        return;
    }
    // Growth is reckoned from the files: the pool's data total is whole blocks of its file.
    let grow = |space: &Space, current: ByteSize, max: ByteSize| -> Option<ByteSize> {
        if space.percent_used() < threshold {
            return None;
        }
        if current >= max {
            return None;
        }
        let step = config.autoextend_percent.of(current.bytes()).max(1 << 20);
        Some(ByteSize::from_bytes(
            (current.bytes() + step).min(max.bytes()),
        ))
    };
    let data = grow(&usage.data, files.0, config.data_size_max);
    let metadata = grow(&usage.metadata, files.1, config.metadata_size_max.size());
    if data.is_none() && metadata.is_none() {
        return;
    }
    match daemon.extend_by(data, metadata, true) {
        Ok((new_data, new_metadata)) => {
            daemon.counted_autoextension(data.is_some(), metadata.is_some());
            tracing::warn!(data = %new_data, metadata = %new_metadata, "pool was filling up; extended it")
        }
        Err(e) => tracing::error!(error = %e, "automatic pool extension failed"),
    }
}

/// Extend the LVM pool's volumes when data or metadata use crosses `autoextend_threshold`, or
/// when its metadata has fallen behind its data, while the volume group has free extents; a
/// full volume group is reported once. Where dmeventd runs it goes first.
fn autoextend_lvm(daemon: &Daemon, usage: &PoolUsage, levels: &mut Levels) {
    let config = &daemon.config.pool.lvm;
    let threshold = f64::from(config.autoextend_threshold.value());
    if threshold >= 100.0 {
        return;
    }
    let over = usage.data.percent_used() >= threshold || usage.metadata.percent_used() >= threshold;
    let behind =
        usage.metadata.total.bytes() < lvm::metadata_wanted(usage.data.total.bytes(), config);
    if !over && !behind {
        levels.volume_group_full = false;
        levels.rounds_over = 0;
        return;
    }
    if over {
        levels.rounds_over += 1;
        if daemon.engine.kernel().monitored() && levels.rounds_over < DMEVENTD_GRACE_ROUNDS {
            return;
        }
    }
    match daemon.autoextend_lvm() {
        Ok(Some((growth, vg))) => {
            daemon.counted_autoextension(growth.data > 0, growth.metadata > 0);
            tracing::warn!(volume_group = %vg, data_extents = growth.data, metadata_extents = growth.metadata, "pool was filling up; extended its volumes")
        }
        Ok(None) if over && !levels.volume_group_full => {
            tracing::error!(data = %usage.data.describe(), "the pool is over its extension threshold but its volume group is full; add a disk (thinstack pool add-device DEVICE)");
            levels.volume_group_full = true;
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "automatic pool extension failed"),
    }
}

/// Used in tests: how a space crossing changes the level.
#[cfg(test)]
pub(super) fn level_after(percent_used: u64, level: usize) -> usize {
    level_after_space(&Space::new(percent_used, 100), level)
}

/// Used in tests: how `space` changes the level.
#[cfg(test)]
pub(super) fn level_after_space(space: &Space, level: usize) -> usize {
    let mut level = level;
    warn_on_crossing("data", space, &mut level);
    level
}

/// The watcher's policies over the sim: growth of a pool on files, and the metadata guard.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::daemon::KernelChoice;
    use crate::engine::CreateLayer;
    use crate::kernel::{PoolKernel, Room};

    fn sim_daemon(dir: &std::path::Path, extra: &str) -> Daemon {
        let text = format!("state_dir = {:?}\n{extra}", dir.join("state"));
        let config = Config::parse(&text, "test config").unwrap();
        Daemon::open(config, KernelChoice::Sim).unwrap()
    }

    /// The sizes of the sim pool's "files".
    fn files(daemon: &Daemon) -> (ByteSize, ByteSize) {
        match daemon.engine.kernel().room().unwrap() {
            Room::Files { data, metadata } => (data, metadata),
            other => panic!("the sim pool grows as files do, not {other:?}"),
        }
    }

    fn create(daemon: &Daemon, name: &str, parent: Option<&str>) {
        daemon
            .engine
            .create(&CreateLayer {
                name: name.into(),
                parent: parent.map(Into::into),
                ..CreateLayer::default()
            })
            .unwrap();
    }

    /// Write `mib` MiB into a new file of layer `name` (mapped at its unmount).
    fn write(daemon: &Daemon, name: &str, file: &str, mib: usize) {
        let target = daemon.engine.mount(name, None, false).unwrap();
        std::fs::write(target.join(file), vec![7u8; mib << 20]).unwrap();
        daemon.engine.unmount(name, None).unwrap();
    }

    const GROWING: &str = "[layers]\nbase_size = \"1G\"\n[pool.loop]\ndata_size = \"64M\"\nautoextend_threshold = \"50%\"\nautoextend_percent = \"50%\"\ndata_size_max = \"100M\"\n";

    #[test]
    fn the_deferred_work_waits_for_its_wakes_to_settle_and_a_stop_ends_the_wait() {
        let (wake, woken) = mpsc::channel();
        wake.send(Wake::DeferredWork).unwrap();
        let started = Instant::now();
        assert!(!settle(&woken));
        assert!(started.elapsed() >= DEFERRED_WORK_SETTLE);
        assert!(
            woken.try_recv().is_err(),
            "the wake sent meanwhile was taken"
        );
        wake.send(Wake::Stop).unwrap();
        assert!(settle(&woken), "a stop ends the wait");
    }

    #[test]
    fn a_pool_over_its_threshold_grows_by_its_step_until_its_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = sim_daemon(dir.path(), GROWING);
        let mut levels = Levels::default();
        create(&daemon, "base", None);
        watch_once(&daemon, &mut levels);
        assert_eq!(
            files(&daemon).0,
            ByteSize::mib(64),
            "grew below its threshold"
        );

        // 4 MiB of filesystem and 30 MiB of files: 53% of 64 MiB.
        write(&daemon, "base", "a", 30);
        watch_once(&daemon, &mut levels);
        assert_eq!(files(&daemon).0, ByteSize::mib(96), "50% more than 64 MiB");
        watch_once(&daemon, &mut levels);
        assert_eq!(
            files(&daemon).0,
            ByteSize::mib(96),
            "35% of 96 MiB: no growth"
        );

        // 64 MiB of 96: over again, but the step stops at the maximum.
        write(&daemon, "base", "b", 30);
        watch_once(&daemon, &mut levels);
        assert_eq!(
            files(&daemon).0,
            ByteSize::mib(100),
            "capped at data_size_max"
        );
        watch_once(&daemon, &mut levels);
        assert_eq!(files(&daemon).0, ByteSize::mib(100));
    }

    #[test]
    fn a_threshold_of_100_percent_never_grows_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let never = GROWING.replace(
            "\"50%\"\nautoextend_percent",
            "\"100%\"\nautoextend_percent",
        );
        let daemon = sim_daemon(dir.path(), &never);
        create(&daemon, "base", None);
        write(&daemon, "base", "a", 50);
        watch_once(&daemon, &mut Levels::default());
        assert_eq!(files(&daemon).0, ByteSize::mib(64));
    }

    /// The kernel takes at most 16 GiB of metadata: the sim daemon refuses more, as the real
    /// one does, and changes nothing.
    #[test]
    fn metadata_beyond_what_the_kernel_takes_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = sim_daemon(dir.path(), "");
        let before = files(&daemon);
        let err = daemon.extend(None, Some(ByteSize::gib(100))).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Invalid, "{err}");
        assert_eq!(files(&daemon), before);
    }

    /// 2 MiB of metadata, 4 KiB a thin device: "nearly full" is less than 512 KiB free (a
    /// quarter), "room" twice that, 1 MiB.
    #[test]
    fn nearly_full_metadata_makes_the_pool_read_only_until_it_has_room_again() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[pool.loop]\nmetadata_size = \"2M\"\nautoextend_threshold = \"100%\"\n";
        let daemon = sim_daemon(dir.path(), text);
        let mut levels = Levels::default();
        create(&daemon, "base", None);
        daemon.engine.commit("base").unwrap();
        for n in 0..380 {
            create(&daemon, &format!("c{n}"), Some("base"));
        }
        watch_once(&daemon, &mut levels);
        assert!(
            !daemon.engine.kernel().read_only_guard().unwrap(),
            "381 of 512: not yet"
        );

        for n in 380..390 {
            create(&daemon, &format!("c{n}"), Some("base"));
        }
        watch_once(&daemon, &mut levels);
        assert!(
            daemon.engine.kernel().read_only_guard().unwrap(),
            "391 of 512: guarded"
        );
        let refused = daemon.engine.create(&CreateLayer {
            name: "more".into(),
            parent: Some("base".into()),
            ..CreateLayer::default()
        });
        assert!(refused.is_err(), "a create on a guarded pool went through");

        // Growing the data alone reloads the pool's table, which lifts the guard (on the real
        // pool too); the metadata is still nearly full, so it is guarded again at once.
        let data = daemon.engine.kernel().usage().unwrap().data.total;
        let more_data = ByteSize::from_bytes(data.bytes() + ByteSize::gib(1).bytes());
        daemon.extend(Some(more_data), None).unwrap();
        assert!(
            daemon.engine.kernel().read_only_guard().unwrap(),
            "data growth left nearly full metadata unguarded"
        );
        // At 3 MiB the mark is 768 KiB, and 1.47 MiB is free: writable again.
        daemon.extend(None, Some(ByteSize::mib(3))).unwrap();
        assert!(
            !daemon.engine.kernel().read_only_guard().unwrap(),
            "room again, still guarded"
        );
        create(&daemon, "more", Some("base"));
        watch_once(&daemon, &mut levels);
        assert!(
            !daemon.engine.kernel().read_only_guard().unwrap(),
            "the watcher guarded a pool with room"
        );
    }
}
