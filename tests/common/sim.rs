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
        let log = std::fs::File::create(dir.path().join("thinstackd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_thinstackd"))
            .arg("--sim")
            .arg("--config")
            .arg(&file)
            .stderr(Stdio::from(log))
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

    /// What it has logged (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("thinstackd.log")).unwrap_or_default()
    }

    /// A client on its API socket, once the API answers.
    pub fn client(&mut self) -> thinstack::client::Client {
        self.client_unless_exited()
            .unwrap_or_else(|exited| panic!("{exited}"))
    }

    /// A client on its API socket, once the API answers; or, if the daemon exits first, why,
    /// with its log.
    pub fn client_unless_exited(&mut self) -> Result<thinstack::client::Client, String> {
        let mut client = thinstack::client::Client::new(&self.api_socket());
        let started = Instant::now();
        while client.get::<serde_json::Value>("/v1/version").is_err() {
            self.exited_at_start()?;
            self.still_starting(started, "thinstackd --sim");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(client)
    }

    fn exited_at_start(&mut self) -> Result<(), String> {
        match self.child.try_wait().unwrap() {
            Some(status) => Err(format!(
                "thinstackd --sim exited at start: {status}; its log:\n{}",
                self.log()
            )),
            None => Ok(()),
        }
    }

    /// Between tries of `what` while it starts: fails if it has exited, or if `started` was
    /// longer ago than the tests' one deadline.
    pub fn still_starting(&mut self, started: Instant, what: &str) {
        if let Err(exited) = self.exited_at_start() {
            panic!("{exited}");
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
