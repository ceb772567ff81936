//! `thinstackd --sim` in a temporary directory of its own, for the tests that need neither root
//! nor dm-thin (the API's and containerd's contract tests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// A running `thinstackd --sim`, stopped with SIGTERM when dropped.
pub struct SimDaemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl SimDaemon {
    /// Starts it with its state and API socket in a new temporary directory; `config` gives the
    /// rest of its configuration, from that directory's path.
    pub fn start(config: impl FnOnce(&Path) -> String) -> SimDaemon {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("thinstack.toml");
        let head = format!(
            "state_dir = {:?}\nsocket = {:?}\n",
            dir.path().join("state"),
            dir.path().join("api.sock")
        );
        std::fs::write(&file, head + &config(dir.path())).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_thinstackd"))
            .arg("--sim")
            .arg("--config")
            .arg(&file)
            .stderr(Stdio::null())
            .spawn()
            .expect("thinstackd --sim");
        SimDaemon { child, dir }
    }

    /// The temporary directory it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir().join("api.sock")
    }

    /// A client on its API socket, once the API answers.
    pub fn client(&mut self) -> thinstack::client::Client {
        let mut client = thinstack::client::Client::new(&self.api_socket());
        let started = Instant::now();
        while client.get::<serde_json::Value>("/v1/version").is_err() {
            self.still_starting(started, "thinstackd --sim");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        client
    }

    /// Between tries of `what` while it starts: fails if it has exited, or if `started` was
    /// longer ago than the tests' one deadline.
    pub fn still_starting(&mut self, started: Instant, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("thinstackd --sim exited at start: {status}");
        }
        assert!(
            started.elapsed() < super::EVENTUALLY,
            "{what} did not answer in {:?}",
            super::EVENTUALLY
        );
    }
}

impl Drop for SimDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
