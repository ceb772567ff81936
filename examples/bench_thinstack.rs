//! thinstack's side of `scripts/bench`: per-layer costs through thinstackd, over the API socket
//! (one kept-alive connection, as a program would) and through the `thinstack` command (a
//! process per call, as a shell script would), on a daemon this program starts and restarts.
//!
//! Operations, each over a chain of `--layers` layers, timed layer by layer:
//! - `create+commit`: `create --parent <previous>` and `commit` (the previous is committed,
//!   so inactive: a kernel message, no device);
//! - `create+activate`: `create --parent <previous>` and `activate`, the previous left
//!   active and writable (suspend, message, resume, new device: the floor's sequence);
//! - `activate+mount+unmount+deactivate` of each committed layer;
//! - `remove` of each layer, newest first.
//!
//! With `--thinstack-nopie BIN`, the CLI chains run again with that build of the command (a
//! position-dependent executable, as Go builds ctr): under emulation every start of a PIE
//! binary, loaded at a new address, has its code translated afresh.
//!
//! Then scale: the API chain grown to `--scale` layers (per-layer cost against layer count),
//! and the daemon's start-up (re-open + reconcile) timed at 100 layers and at `--scale`.
//! Rows `tool,operation,layer,ms` are appended to `--csv`.
//!
//! bench_thinstack --thinstackd BIN --thinstack BIN --config FILE --socket PATH --csv FILE
//!                 [--thinstack-nopie BIN] [--layers N] [--scale N] [--label SUFFIX]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use thinstack::api::{CreateRequest, MountRequest, UnmountRequest};
use thinstack::client::Client;

struct Args {
    thinstackd: PathBuf,
    thinstack: PathBuf,
    thinstack_nopie: Option<PathBuf>,
    config: PathBuf,
    socket: PathBuf,
    csv: PathBuf,
    layers: usize,
    scale: usize,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        thinstackd: PathBuf::new(),
        thinstack: PathBuf::new(),
        thinstack_nopie: None,
        config: PathBuf::new(),
        socket: PathBuf::new(),
        csv: PathBuf::new(),
        layers: 20,
        scale: 0,
        label: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--thinstackd" => args.thinstackd = value.into(),
            "--thinstack" => args.thinstack = value.into(),
            "--thinstack-nopie" => args.thinstack_nopie = Some(value.into()),
            "--config" => args.config = value.into(),
            "--socket" => args.socket = value.into(),
            "--csv" => args.csv = value.into(),
            "--layers" => args.layers = value.parse().map_err(|e| format!("--layers: {e}"))?,
            "--scale" => args.scale = value.parse().map_err(|e| format!("--scale: {e}"))?,
            "--label" => args.label = value,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> std::process::ExitCode {
    match parse_args().and_then(|args| Bench::start(args).and_then(|mut b| b.run())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_thinstack: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

struct Bench {
    args: Args,
    daemon: Option<Child>,
    client: Client,
    rows: Vec<String>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.stop_daemon();
    }
}

impl Bench {
    fn start(args: Args) -> Result<Bench, String> {
        let client = Client::new(&args.socket);
        let mut bench = Bench {
            args,
            daemon: None,
            client,
            rows: Vec::new(),
        };
        let ready = bench.start_daemon()?;
        eprintln!("bench_thinstack: daemon made its pool and was ready in {ready:.0} ms");
        Ok(bench)
    }

    fn run(&mut self) -> Result<(), String> {
        let n = self.args.layers;
        let api = self.tool("API");
        let cli = self.tool("CLI");
        let nopie = self.args.thinstack_nopie.clone();
        let thinstack = self.args.thinstack.clone();

        // create + commit: committed parents are inactive, so a snapshot is a message.
        // create + activate: the parent stays active and writable, so it is suspended around
        // the snapshot, and the child's device is made.
        for (then, api_prefix, cli_prefix, nopie_prefix) in
            [("commit", "a", "c", "n"), ("activate", "aw", "cw", "nw")]
        {
            let operation = format!("create+{then}");
            let costs = self.api_chain(api_prefix, then)?;
            self.record(&api, &operation, &costs);
            let costs = self.cli_chain(&thinstack, cli_prefix, then)?;
            self.record(&cli, &operation, &costs);
            if let Some(nopie) = &nopie {
                let costs = self.cli_chain(nopie, nopie_prefix, then)?;
                self.record(&self.tool("CLI (non-PIE)"), &operation, &costs);
            }
        }

        // What `ctr snapshots prepare` + `commit` does per layer, through the CLI: make the
        // device and activate it (prepare), then commit it and deactivate it (commit).
        let costs = self.cli_chain_like_ctr(&thinstack, "k")?;
        self.record(&cli, "create+activate+commit+deactivate", &costs);

        // activate + mount + unmount + deactivate of each committed layer.
        let costs = each(n, "a", |name| {
            self.api_activate(name)?;
            self.api_post(name, "mount", &MountRequest::default())?;
            self.api_post(name, "unmount", &UnmountRequest::default())?;
            self.api_post(name, "deactivate", &Value::Null)
        })?;
        self.record(&api, "activate+mount+unmount+deactivate", &costs);
        let costs = each(n, "c", |name| {
            self.cli(&["layer", "activate", name])?;
            self.cli(&["layer", "mount", name])?;
            self.cli(&["layer", "unmount", name])?;
            self.cli(&["layer", "deactivate", name])
        })?;
        self.record(&cli, "activate+mount+unmount+deactivate", &costs);

        // remove, newest first: the create+activate chains (active devices go too).
        let costs = each_newest_first(n, "aw", |name| self.api_remove(name))?;
        self.record(&api, "remove", &costs);
        let costs = each_newest_first(n, "cw", |name| self.cli(&["layer", "remove", name]))?;
        self.record(&cli, "remove", &costs);
        self.flush()?;

        if self.args.scale > 0 {
            self.scale()?;
        }
        self.flush()
    }

    /// A chain `<prefix>-1 ..= <prefix>-n` through the API, each layer created on the one
    /// before and then `then` ("commit" or "activate"), on a base made the same way.
    fn api_chain(&mut self, prefix: &str, then: &str) -> Result<Vec<f64>, String> {
        self.chain_base(prefix, then)?;
        chain(self.args.layers, prefix, |parent, name| {
            self.api_create(name, Some(parent))?;
            self.api_post(name, then, &Value::Null)
        })
    }

    /// The same chain through the command `bin`, two processes per layer.
    fn cli_chain(&mut self, bin: &Path, prefix: &str, then: &str) -> Result<Vec<f64>, String> {
        self.chain_base(prefix, then)?;
        chain(self.args.layers, prefix, |parent, name| {
            self.cli_with(bin, &["layer", "create", name, "--parent", parent])?;
            self.cli_with(bin, &["layer", then, name])
        })
    }

    /// A chain through the command `bin` doing per layer what `ctr snapshots prepare` and
    /// `commit` do: create on the committed previous layer, activate, commit, deactivate.
    fn cli_chain_like_ctr(&mut self, bin: &Path, prefix: &str) -> Result<Vec<f64>, String> {
        self.chain_base(prefix, "commit")?;
        chain(self.args.layers, prefix, |parent, name| {
            self.cli_with(bin, &["layer", "create", name, "--parent", parent])?;
            self.cli_with(bin, &["layer", "activate", name])?;
            self.cli_with(bin, &["layer", "commit", name])?;
            self.cli_with(bin, &["layer", "deactivate", name])
        })
    }

    /// One untimed create, commit and remove: a daemon just started has its code and its
    /// caches cold (under emulation, its code is translated at first use), unlike one that
    /// has been running.
    fn warm_up(&mut self) -> Result<(), String> {
        self.api_create("warm-up", None)?;
        self.api_commit("warm-up")?;
        self.api_remove("warm-up").map(drop)
    }

    fn chain_base(&mut self, prefix: &str, then: &str) -> Result<(), String> {
        let base = format!("{prefix}-0");
        self.api_create(&base, None)?;
        self.api_post(&base, then, &Value::Null)
    }

    /// Grow one API chain to `--scale` layers; time the daemon's start-up at 100 layers and at
    /// the end.
    fn scale(&mut self) -> Result<(), String> {
        let api = self.tool("API");
        self.api_create("s-0", None)?;
        self.api_commit("s-0")?;
        let mut costs = Vec::with_capacity(self.args.scale);
        // Start-up is timed at these layer counts, outside the timed windows: the restarted
        // daemon is warmed up (one create, commit and remove, untimed) before the chain goes on,
        // as a daemon that has been running is.
        let restart_at: Vec<usize> = [100, 1000, 10000]
            .into_iter()
            .filter(|&at| at <= self.args.scale)
            .collect();
        for i in 1..=self.args.scale {
            let (parent, name) = (format!("s-{}", i - 1), format!("s-{i}"));
            let started = Instant::now();
            self.api_create(&name, Some(&parent))?;
            self.api_commit(&name)?;
            costs.push(started.elapsed().as_secs_f64() * 1000.0);
            if restart_at.contains(&i) {
                let layers = self.layer_count()?;
                self.stop_daemon()?;
                let ready = self.start_daemon()?;
                self.warm_up()?;
                eprintln!("bench_thinstack: start-up with {layers} layers: {ready:.0} ms");
                self.rows.push(format!(
                    "thinstack,start-up (re-open + reconcile),{layers},{ready:.3}"
                ));
            }
        }
        self.record(&api, "create+commit (scale)", &costs);
        Ok(())
    }

    fn tool(&self, path: &str) -> String {
        format!("thinstack {path}{}", self.args.label)
    }

    fn record(&mut self, tool: &str, operation: &str, costs: &[f64]) {
        for (i, ms) in costs.iter().enumerate() {
            self.rows
                .push(format!("{tool},{operation},{},{ms:.3}", i + 1));
        }
        let (median, min, max) = summary(costs);
        eprintln!(
            "bench_thinstack: {tool} {operation}: median {median:.1} ms (min {min:.1}, max {max:.1}) over {}",
            costs.len()
        );
    }

    fn flush(&mut self) -> Result<(), String> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.args.csv)
            .map_err(|e| format!("{}: {e}", self.args.csv.display()))?;
        for row in self.rows.drain(..) {
            writeln!(file, "{row}").map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    // ----- the daemon ----------------------------------------------------------------------

    /// Start thinstackd; the time until its API answers, in ms.
    fn start_daemon(&mut self) -> Result<f64, String> {
        let started = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.args.config.with_extension("log"))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.args.thinstackd)
            .arg("--config")
            .arg(&self.args.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.args.thinstackd.display()))?;
        loop {
            if let Ok(_status) = self.client.get::<Value>("/v1/pool") {
                break;
            }
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "thinstackd exited ({status}); see {}",
                    self.args.config.with_extension("log").display()
                ));
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err("thinstackd was not ready after 600 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.daemon = Some(child);
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }

    fn stop_daemon(&mut self) -> Result<(), String> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| e.to_string())?;
        child.wait().map_err(|e| e.to_string())?;
        // A new connection for the next daemon.
        self.client = Client::new(&self.args.socket);
        Ok(())
    }

    fn layer_count(&mut self) -> Result<usize, String> {
        let layers: Value = self.client.get("/v1/layers").map_err(|e| e.to_string())?;
        layers
            .as_array()
            .map(Vec::len)
            .ok_or_else(|| format!("GET /v1/layers answered {layers}"))
    }

    // ----- API and CLI calls ---------------------------------------------------------------

    fn api_create(&mut self, name: &str, parent: Option<&str>) -> Result<(), String> {
        let request = CreateRequest {
            name: name.into(),
            parent: parent.map(Into::into),
            // Bases take the configured layers.base_size: the same size every other tool's
            // layers have in the run (scripts/bench).
            ..CreateRequest::default()
        };
        let _: Value = self
            .client
            .post("/v1/layers", &request)
            .map_err(|e| format!("create {name}: {e}"))?;
        Ok(())
    }

    fn api_commit(&mut self, name: &str) -> Result<(), String> {
        self.api_post(name, "commit", &Value::Null)
    }

    fn api_activate(&mut self, name: &str) -> Result<(), String> {
        self.api_post(name, "activate", &Value::Null)
    }

    fn api_post(
        &mut self,
        name: &str,
        action: &str,
        body: &impl serde::Serialize,
    ) -> Result<(), String> {
        let _: Value = self
            .client
            .post(&format!("/v1/layers/{name}/{action}"), body)
            .map_err(|e| format!("{action} {name}: {e}"))?;
        Ok(())
    }

    fn api_remove(&mut self, name: &str) -> Result<(), String> {
        let _: Value = self
            .client
            .delete(&format!("/v1/layers/{name}"))
            .map_err(|e| format!("remove {name}: {e}"))?;
        Ok(())
    }

    fn cli(&self, args: &[&str]) -> Result<(), String> {
        self.cli_with(&self.args.thinstack, args)
    }

    fn cli_with(&self, bin: &Path, args: &[&str]) -> Result<(), String> {
        let out = Command::new(bin)
            .arg("--socket")
            .arg(&self.args.socket)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "thinstack {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

/// Make a chain `<prefix>-1 ..= <prefix>-n` on `<prefix>-0`; the cost of each link in ms.
fn chain(
    n: usize,
    prefix: &str,
    mut link: impl FnMut(&str, &str) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    timed(
        (1..=n).map(|i| (format!("{prefix}-{}", i - 1), format!("{prefix}-{i}"))),
        |(p, c)| link(&p, &c),
    )
}

/// Run `op` on `<prefix>-1 ..= <prefix>-n`; the cost of each in ms.
fn each(
    n: usize,
    prefix: &str,
    mut op: impl FnMut(&str) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    timed((1..=n).map(|i| format!("{prefix}-{i}")), |name| op(&name))
}

/// Run `op` on `<prefix>-n ..= <prefix>-0`, newest first; the cost of each in ms.
fn each_newest_first(
    n: usize,
    prefix: &str,
    mut op: impl FnMut(&str) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    timed((0..=n).rev().map(|i| format!("{prefix}-{i}")), |name| {
        op(&name)
    })
}

fn timed<T>(
    items: impl Iterator<Item = T>,
    mut op: impl FnMut(T) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    let mut costs = Vec::new();
    for item in items {
        let started = Instant::now();
        op(item)?;
        costs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(costs)
}

fn summary(costs: &[f64]) -> (f64, f64, f64) {
    let mut sorted = costs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let min = sorted.first().copied().unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    (median, min, max)
}
