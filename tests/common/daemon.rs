//! A real `thinstackd` process on a test pool, and the real `thinstack` command against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use thinstack::client::Client;

use super::TestPool;

/// What a `thinstack` run gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// The one JSON document on stdout.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }
}

/// Kill the daemon with SIGKILL while `clients` clients make children of `parent` through the
/// API, once they were told of `at_least` layers made; returns the names they were told of.
pub fn kill_9_while_clients_create(
    d: &mut TestDaemon,
    clients: usize,
    parent: &str,
    at_least: usize,
) -> Vec<String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let told: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (told, stop, socket) = (told.clone(), stop.clone(), d.socket.clone());
            let parent = parent.to_string();
            std::thread::spawn(move || {
                let mut api = Client::new(&socket);
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let request = thinstack::api::CreateRequest {
                        name: format!("k{client}-{n}"),
                        parent: Some(parent.clone()),
                        ..Default::default()
                    };
                    match api.post::<Value>("/v1/layers", &request) {
                        Ok(_) => told.lock().unwrap().push(request.name),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    super::wait_until(
        &format!("{at_least} creates before the kill"),
        || told.lock().unwrap().len() >= at_least,
        || d.log_text(),
    );
    d.kill9();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let told = told.lock().unwrap().clone();
    told
}

/// A daemon on a test pool; stopped (SIGKILL if need be) and the pool cleaned up when dropped.
pub struct TestDaemon {
    pub pool: TestPool,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Where the daemon's sd_notify messages arrive (as systemd's NOTIFY_SOCKET).
    notify: std::os::unix::net::UnixDatagram,
    child: Option<Child>,
}

impl TestDaemon {
    /// Start thinstackd on a new test pool (`extra` is TOML added to the test config).
    pub fn start(test: &str, extra: &str) -> TestDaemon {
        let mut daemon = TestDaemon::prepare(test, extra);
        daemon.spawn();
        daemon
    }

    /// A test pool and config for thinstackd, not started yet.
    pub fn prepare(test: &str, extra: &str) -> TestDaemon {
        let mut pool = TestPool::new(test, extra);
        let socket = pool.dir.path().join("thinstack.sock");
        // The test config, with the socket and a quick watcher, written where the daemon reads it.
        let mut config = pool.config.clone();
        config.socket = thinstack::config::AbsolutePath::new(&socket).unwrap();
        config.daemon.watch_interval_seconds = 1;
        pool.config = config;
        let config_path = pool.dir.path().join("thinstack.toml");
        std::fs::write(&config_path, pool.config.to_toml()).unwrap();
        let log = pool.dir.path().join("thinstackd.log");
        let notify =
            std::os::unix::net::UnixDatagram::bind(pool.dir.path().join("notify.sock")).unwrap();
        notify.set_nonblocking(true).unwrap();
        TestDaemon {
            pool,
            config_path,
            socket,
            log,
            notify,
            child: None,
        }
    }

    /// Start the daemon process and wait until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_thinstackd"))
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", self.pool.dir.path().join("notify.sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start thinstackd");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let mut client = Client::new(&self.socket);
            if client.get::<Value>("/v1/version").is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "thinstackd exited at start ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                started.elapsed() < super::EVENTUALLY,
                "thinstackd did not answer within {:?}:\n{}",
                super::EVENTUALLY,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Write the test's config (after changing `pool.config`) where the daemon reads it.
    pub fn write_config(&self) {
        std::fs::write(&self.config_path, self.pool.config.to_toml()).unwrap();
    }

    /// Start thinstackd where it must refuse to start: its exit code and log.
    pub fn start_refused(&self) -> (i32, String) {
        self.start_refused_with(&[])
    }

    /// [`TestDaemon::start_refused`] with extra environment (a crash point, say).
    pub fn start_refused_with(&self, env: &[(&str, &str)]) -> (i32, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_thinstackd"))
            .arg("--config")
            .arg(&self.config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start thinstackd");
        let deadline = Instant::now() + super::EVENTUALLY;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                signal(&child, nix::sys::signal::Signal::SIGTERM);
                let _ = child.wait();
                panic!("thinstackd started although it should have refused");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Wait for the daemon to exit on its own (after `pool destroy`); its exit code.
    pub fn wait_exit(&mut self) -> i32 {
        self.wait_exit_within(super::EVENTUALLY)
    }

    /// Send SIGTERM and return at once (then [`TestDaemon::wait_exit_within`]).
    pub fn sigterm(&self) {
        let child = self.child.as_ref().expect("daemon running");
        signal(child, nix::sys::signal::Signal::SIGTERM);
    }

    /// Wait up to `limit` for the daemon to exit; its exit code. Panics with the log if not.
    pub fn wait_exit_within(&mut self, limit: Duration) -> i32 {
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                self.child = Some(child);
                panic!(
                    "thinstackd did not exit within {limit:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sd_notify messages received since the last call.
    pub fn notifications(&self) -> Vec<String> {
        let mut messages = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buffer) {
            messages.push(String::from_utf8_lossy(&buffer[..n]).trim().to_string());
        }
        messages
    }

    /// `thin_ls` on the pool's metadata: the pool's thin ids, told by the kernel's tools.
    pub fn pool_thin_ids(&self) -> std::collections::BTreeSet<u64> {
        let pool = format!("thinstack-1-{}-pool", self.pool.config.pool.name);
        let metadata = thinstack::kernel::loopdev::find_attached(&self.pool.metadata_file())
            .unwrap()
            .expect("metadata loop device");
        super::thin_ls_ids(&pool, &metadata)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `thinstack --socket <ours> ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Run {
        cli_at(&self.socket, args)
    }

    /// Run `thinstack --json ARGS...`, which must succeed, and return its JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let run = self.cli(&all);
        assert_eq!(run.code, 0, "thinstack {args:?} failed: {run:?}");
        run.json()
    }

    /// A client on the daemon's socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// SIGTERM, and the daemon's exit code.
    pub fn stop(&mut self) -> i32 {
        let mut child = self.child.take().expect("daemon running");
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = child.wait().unwrap();
        status.code().unwrap_or(-1)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        signal(&child, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, signal);
}

/// The real `thinstack` on `socket`, to add arguments and pipes to.
pub fn command_at(socket: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_thinstack"));
    command.arg("--socket").arg(socket);
    command
}

/// Run the real `thinstack` on `socket`.
pub fn cli_at(socket: &Path, args: &[&str]) -> Run {
    let out = command_at(socket)
        .args(args)
        .output()
        .expect("run thinstack");
    Run::from(out)
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, nix::sys::signal::Signal::SIGTERM);
            // Clean-up, not a check: a daemon that does not stop in a minute is killed.
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            signal(&child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}
