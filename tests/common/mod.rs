//! Shared set-up for kernel tests: a pool of its own per test, on sparse files in a temporary
//! state directory, and cleanup of everything the test left behind, even when it failed.
//!
//! Kernel tests are `#[ignore]`d so a plain `cargo test` leaves them out; `scripts/vm-test`
//! runs them with `--ignored` as root on a kernel with dm-thin (in a VM where the host lacks it).
//! They never pass by skipping: without root or dm-thin, [`require_dm_thin`] fails the test.

#![allow(dead_code)]

pub mod ceph;
pub mod daemon;
pub mod disks;
pub mod sim;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use thinstack::config::MetadataSize;
use thinstack::kernel::dm::{Dm, Udev};
use thinstack::kernel::{fs, loopdev};
use thinstack::pool::loop_files;
use thinstack::units::ByteSize;
use thinstack::{Config, Pool};

/// Fail (never skip) unless this process can drive dm-thin.
pub fn require_dm_thin() -> Dm {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests need root and a dm-thin kernel: run them with scripts/vm-test"
    );
    let dm = Dm::open().unwrap_or_else(|e| {
        panic!("kernel tests need device-mapper ({e}): run them with scripts/vm-test")
    });
    let _ = Command::new("modprobe").arg("dm-thin-pool").status();
    dm
}

/// How long a test waits for something that must happen. Generous on purpose: under emulation
/// everything runs 10 to 50 times slower than on a host (a 2 s step there can take a minute
/// here), and a wait that expires on a slow day is a flaky test, not a finding.
pub const EVENTUALLY: Duration = Duration::from_secs(300);

/// Poll `done` until it holds, then return how long that took. After [`EVENTUALLY`] the test
/// fails, naming `what` and showing `context()` (a log, say). Every test that waits for
/// something waits here, on the condition itself, never on a fixed sleep.
pub fn wait_until(
    what: &str,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < EVENTUALLY,
            "timed out after {:?} waiting for {what}:\n{}",
            EVENTUALLY,
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Unmount `target` as an operator would by hand (`umount`), with none of thinstack's checks:
/// for clean-up, and for tests that change the mount table behind thinstack's back.
///
/// EBUSY is retried until [`EVENTUALLY`]: while another test thread starts a child process, the
/// child holds copies of this process's open files until its `exec` closes them, so a file this
/// test has just closed can keep the filesystem busy for a moment (seconds under emulation).
/// thinstackd's own unmount retries for the same reason.
pub fn unmount_by_hand(target: &Path) -> nix::Result<()> {
    unmount_retrying_busy(target, EVENTUALLY)
}

fn unmount_retrying_busy(target: &Path, within: Duration) -> nix::Result<()> {
    let started = Instant::now();
    loop {
        match nix::mount::umount(target) {
            Err(nix::errno::Errno::EBUSY) if started.elapsed() < within => {
                std::thread::sleep(Duration::from_millis(20))
            }
            done => return done,
        }
    }
}

static SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// A pool of a test's own, with its state directory; cleaned up when dropped.
pub struct TestPool {
    pub config: Config,
    pub dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl TestPool {
    /// A config for a small pool named after the test, in a fresh state directory.
    /// `extra` is TOML appended to the defaults (for example `[layers]` settings).
    pub fn new(test: &str, extra: &str) -> TestPool {
        let dir = tempfile::Builder::new()
            .prefix("thinstack-test-")
            .tempdir()
            .expect("temp dir");
        let n = SEQUENCE.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}-{n}-{test}", std::process::id());
        let name: String = name.chars().take(32).collect();
        let text = format!(
            "state_dir = {:?}\n{extra}\n",
            dir.path().join("state").display().to_string()
        );
        let mut config = Config::parse(&text, "test config").expect("test config");
        if !extra.contains("name =") {
            config.pool.name = name.parse().expect("pool name");
        }
        if !extra.contains("data_size") {
            config.pool.loop_files.data_size = ByteSize::gib(4);
        }
        // Tests mount at chosen places under their own directory (`mount_point`).
        if !extra.contains("mount_roots") {
            let root = thinstack::config::AbsolutePath::new(dir.path().join("mnt")).unwrap();
            config.layers.mount_roots = vec![root];
        }
        if !extra.contains("metadata_size") {
            config.pool.loop_files.metadata_size = MetadataSize::new(ByteSize::mib(64)).unwrap();
        }
        TestPool {
            config,
            dir,
            mounts: Vec::new(),
        }
    }

    /// A fresh directory under the test's temp dir, for a mount point.
    pub fn mount_point(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&path).expect("mount point");
        path
    }

    /// Mount and remember, so cleanup unmounts even when the test fails midway.
    pub fn mount(
        &mut self,
        device: &Path,
        target: &Path,
        fs_type: thinstack::vocab::FsType,
        read_only: bool,
    ) {
        fs::mount(device, target, fs_type, read_only, &[]).expect("mount");
        self.mounts.push(target.to_path_buf());
    }

    /// Unmount what [`TestPool::mount`] mounted.
    pub fn unmount(&mut self, target: &Path) {
        unmount_by_hand(target).expect("unmount");
        self.mounts.retain(|m| m != target);
    }

    pub fn data_file(&self) -> PathBuf {
        loop_files(self.config.state_dir.path()).0
    }

    pub fn metadata_file(&self) -> PathBuf {
        loop_files(self.config.state_dir.path()).1
    }
}

impl Drop for TestPool {
    /// Best-effort cleanup of a test that may have failed anywhere: unmount, remove every dm
    /// device of the pool (thins first), detach the loop devices.
    fn drop(&mut self) {
        // A failed test may have left files open: do not wait for them as long as a test would.
        let within = Duration::from_secs(10);
        for target in self.mounts.drain(..).rev() {
            let _ = unmount_retrying_busy(&target, within);
        }
        // Anything else mounted under the test's directory (by the engine), deepest first.
        for target in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = unmount_retrying_busy(&target, within);
        }
        let Ok(dm) = Dm::open() else { return };
        let prefix = self.config.pool.name.dm_prefix();
        let pool_name = self.config.pool.name.pool_dm_name();
        if let Ok(names) = dm.list_with_prefix(&prefix) {
            for name in names
                .iter()
                .filter(|n| n.to_string() != pool_name.to_string())
            {
                let _ = dm.remove_device(name, Udev::Wait);
            }
        }
        let _ = dm.remove_device(&pool_name, Udev::Wait);
        for file in [self.data_file(), self.metadata_file()] {
            if let Ok(Some(device)) = loopdev::find_attached(&file) {
                let _ = loopdev::detach(&device);
            }
        }
    }
}

/// Open (create or re-open) the test's pool.
pub fn open_pool(test: &TestPool, dm: &Dm) -> Pool {
    Pool::open(&test.config, dm).expect("open pool")
}

/// Run `thin_check` on a metadata file and fail with its findings when it finds a problem.
pub fn thin_check(metadata: &Path) {
    if let Err(e) = thinstack::kernel::thin_tools::check(metadata) {
        panic!("{e}");
    }
}

/// The thin ids `thin_ls` reads from the metadata of the live pool `pool_dm` (a dm name),
/// through a metadata snapshot: what the pool holds, told by the kernel's own tools.
pub fn thin_ls_ids(pool_dm: &str, metadata: &Path) -> std::collections::BTreeSet<u64> {
    let message = |text: &str| {
        let out = Command::new("dmsetup")
            .args(["message", pool_dm, "0", text])
            .output()
            .expect("dmsetup");
        assert!(
            out.status.success(),
            "dmsetup message {pool_dm} {text}: {out:?}"
        );
    };
    message("reserve_metadata_snap");
    let out = Command::new("thin_ls")
        .args(["--metadata-snap", "--no-headers", "-o", "DEV"])
        .arg(metadata)
        .output()
        .expect("thin_ls");
    message("release_metadata_snap");
    assert!(out.status.success(), "thin_ls: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|id| id.parse().expect("thin_ls prints ids"))
        .collect()
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// The engine on the real kernel.
pub type RealEngine =
    thinstack::engine::Engine<thinstack::pool::RealPool, thinstack::kernel::real::RealFs>;

/// An engine on the test's pool, on the real kernel.
pub fn open_engine(test: &TestPool) -> (RealEngine, thinstack::engine::ReconcileReport) {
    open_engine_with(&test.config)
}

/// An engine on the pool `config` describes, on the real kernel.
pub fn open_engine_with(config: &Config) -> (RealEngine, thinstack::engine::ReconcileReport) {
    let dm = Dm::open().expect("device-mapper");
    let pool = Pool::open(config, &dm).expect("open pool");
    let kernel = thinstack::pool::RealPool::new(dm, pool, config.clone());
    thinstack::engine::Engine::open(
        kernel,
        thinstack::kernel::real::RealFs,
        thinstack::engine::Settings::from_config(config),
    )
    .expect("open engine")
}

/// Tear down the pool under a closed engine and check its metadata with thin_check.
pub fn teardown_and_check(test: &TestPool) {
    let dm = Dm::open().expect("device-mapper");
    let pool = Pool::open(&test.config, &dm).expect("open pool");
    for name in dm
        .list_with_prefix(&test.config.pool.name.dm_prefix())
        .unwrap()
    {
        if name.to_string() != test.config.pool.name.pool_dm_name().to_string() {
            dm.remove_device(&name, Udev::NoWait)
                .expect("deactivate thin device");
        }
    }
    pool.teardown(&dm).expect("teardown");
    thin_check(&test.metadata_file());
}

/// Run promtool (Debian's `prometheus` package, which `scripts/setup` installs) with `args`
/// and `input` on its standard input, from `dir`: what it said, or a failure that says it.
pub fn promtool(args: &[&str], input: &str, dir: &std::path::Path) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package): run scripts/setup");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {args:?} failed ({}):\n{said}",
        output.status
    );
    said
}

/// The value of the sample `series` (name and labels, as written) in the metrics `text`.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            value.parse().ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// `promtool check metrics` on `text`: fails the test on any problem it reports.
pub fn promtool_check_metrics(text: &str) {
    let said = promtool(&["check", "metrics"], text, std::path::Path::new("."));
    assert!(
        said.trim().is_empty(),
        "promtool check metrics found:\n{said}\non:\n{text}"
    );
}

/// `GET /v1/events` read on a thread of its own: its lines, as they come.
pub struct EventLines {
    lines: std::sync::mpsc::Receiver<String>,
}

impl EventLines {
    /// Subscribe on `socket`, and return once the stream is live (its `subscribed` line came):
    /// every change from then on is in it.
    pub fn subscribe(socket: &std::path::Path) -> EventLines {
        let (sender, lines) = std::sync::mpsc::channel();
        let socket = socket.to_path_buf();
        std::thread::spawn(move || {
            let mut client = thinstack::client::Client::new(&socket);
            let _ = client.stream_lines("/v1/events", |line| sender.send(line.to_string()).is_ok());
        });
        let events = EventLines { lines };
        let first = events.next();
        assert_eq!(first["type"], "subscribed", "{first}");
        events
    }

    /// The next event (failing the test after [`EVENTUALLY`]).
    pub fn next(&self) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(EVENTUALLY)
            .unwrap_or_else(|e| panic!("no event within {EVENTUALLY:?}: {e}"));
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("an event that is not JSON ({e}): {line}"))
    }

    /// The next `n` events' (type, layer), with `layer` "" for the pool's.
    pub fn kinds(&self, n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|_| {
                let event = self.next();
                let layer = event["layer"].as_str().unwrap_or_default().to_string();
                (
                    event["type"].as_str().unwrap_or_default().to_string(),
                    layer,
                )
            })
            .collect()
    }
}

/// A request for layer `name`, a snapshot of `parent` or a new base, with the defaults.
pub fn layer(name: &str, parent: Option<&str>) -> thinstack::engine::CreateLayer {
    thinstack::engine::CreateLayer {
        name: name.into(),
        parent: parent.map(Into::into),
        ..Default::default()
    }
}
