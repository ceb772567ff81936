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
//! - `remove` of each layer, newest first: the active chain's (with `discard_on_remove`), then
//!   the inactive one's (`remove (inactive)`);
//! - `clients`: 1, 2, 4, 8 and 16 clients at once, each with its own connection building its own
//!   chain of `--layers` create+commit on one shared base: layers per second in aggregate;
//! - `fsync-class calls`: the daemon traced with `strace -f -c` while it creates, commits,
//!   activates, deactivates and removes `--layers` layers (removal until its background
//!   deletion is done): fsync, fdatasync, sync_file_range, syncfs, sync and msync per operation.
//!
//! With `--thinstack-nopie BIN`, the CLI chains run again with that build of the command (a
//! position-dependent executable, as Go builds ctr): under emulation every start of a PIE
//! binary, loaded at a new address, has its code translated afresh.
//!
//! Then scale: the API chain grown to `--scale` layers (per-layer cost against layer count),
//! the daemon's start-up (re-open + reconcile) timed, and its resident memory read, at 100,
//! 1000 and 10000 layers. Rows `tool,operation,layer,ms` are appended to `--csv` (for clients,
//! `layer` is the number of clients and `ms` layers per second; for fsync-class calls, `layer`
//! is the operations traced and `ms` calls per operation; for memory, `ms` is MiB).
//!
//! `--mode durable` runs only what a state directory on a real disk changes: the API
//! create+commit chain, the removals, and the fsync-class calls. `--mode scale` runs only the
//! scale part (for profiling start-up).
//!
//! bench_thinstack --thinstackd BIN --thinstack BIN --config FILE --socket PATH --csv FILE
//!                 [--thinstack-nopie BIN] [--layers N] [--scale N] [--label SUFFIX]
//!                 [--mode full|durable|scale]

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
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    Durable,
    Scale,
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
        mode: Mode::Full,
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
            "--mode" => {
                args.mode = match value.as_str() {
                    "full" => Mode::Full,
                    "durable" => Mode::Durable,
                    "scale" => Mode::Scale,
                    other => return Err(format!("--mode: full, durable or scale, not {other:?}")),
                }
            }
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
        match self.args.mode {
            Mode::Durable => return self.run_durable(),
            Mode::Scale => return self.scale().and_then(|()| self.flush()),
            Mode::Full => {}
        }
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
        let costs = each_newest_first(n, "a", |name| self.api_remove(name))?;
        self.record(&api, "remove (inactive)", &costs);
        self.flush()?;

        self.clients()?;
        self.count_syncs()?;
        self.flush()?;

        if self.args.scale > 0 {
            self.scale()?;
        }
        self.flush()
    }

    /// What a state directory on a real disk changes: the API create+commit chain, removals,
    /// and the fsync-class calls per operation.
    fn run_durable(&mut self) -> Result<(), String> {
        let n = self.args.layers;
        let api = self.tool("API");
        let costs = self.api_chain("a", "commit")?;
        self.record(&api, "create+commit", &costs);
        let costs = each_newest_first(n, "a", |name| self.api_remove(name))?;
        self.record(&api, "remove (inactive)", &costs);
        self.count_syncs()?;
        self.flush()
    }

    /// 1, 2, 4, 8 and 16 clients at once, each on its own connection making its own chain of
    /// `--layers` create+commit on one shared committed base; layers per second in aggregate.
    /// Each round's chains are removed (untimed) before the next.
    fn clients(&mut self) -> Result<(), String> {
        let per_client = self.args.layers;
        // The removals before leave deletions to the background: none may run into a round.
        self.wait_for_deletions()?;
        self.api_create("m-base", None)?;
        self.api_commit("m-base")?;
        for clients in [1usize, 2, 4, 8, 16] {
            let socket = self.args.socket.clone();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
            let workers: Vec<_> = (0..clients)
                .map(|c| {
                    let (socket, barrier) = (socket.clone(), barrier.clone());
                    std::thread::spawn(move || -> Result<(), String> {
                        let mut client = Client::new(&socket);
                        barrier.wait();
                        let mut parent = "m-base".to_string();
                        for i in 1..=per_client {
                            let name = format!("m{clients}-{c}-{i}");
                            api_create_with(&mut client, &name, Some(&parent))?;
                            api_post_with(&mut client, &name, "commit", &Value::Null)?;
                            parent = name;
                        }
                        Ok(())
                    })
                })
                .collect();
            barrier.wait();
            let started = Instant::now();
            for worker in workers {
                worker.join().map_err(|_| "a client thread panicked")??;
            }
            let seconds = started.elapsed().as_secs_f64();
            let per_second = (clients * per_client) as f64 / seconds;
            eprintln!(
                "bench_thinstack: {clients} client(s): {} layers in {seconds:.2} s, {per_second:.1} layers/s",
                clients * per_client
            );
            let tool = self.tool("API");
            self.rows.push(format!(
                "{tool},create+commit layers/s (clients at once),{clients},{per_second:.3}"
            ));
            for c in 0..clients {
                for i in (1..=per_client).rev() {
                    self.api_remove(&format!("m{clients}-{c}-{i}"))?;
                }
            }
            self.wait_for_deletions()?;
        }
        self.api_remove("m-base")
    }

    /// The daemon traced with `strace -f -c` while it does `--layers` of each mutating
    /// operation; rows of fsync-class calls per operation.
    fn count_syncs(&mut self) -> Result<(), String> {
        let n = self.args.layers;
        // Only the traced operations' own calls: no deletion of an earlier removal runs meanwhile.
        self.wait_for_deletions()?;
        self.api_create("f-0", None)?;
        self.api_commit("f-0")?;
        let names: Vec<String> = (1..=n).map(|i| format!("f-{i}")).collect();
        self.traced("create", n, |b| {
            names
                .iter()
                .try_for_each(|name| b.api_create(name, Some("f-0")))
        })?;
        self.traced("commit", n, |b| {
            names.iter().try_for_each(|name| b.api_commit(name))
        })?;
        self.traced("activate", n, |b| {
            names.iter().try_for_each(|name| b.api_activate(name))
        })?;
        self.traced("deactivate", n, |b| {
            names
                .iter()
                .try_for_each(|name| b.api_post(name, "deactivate", &Value::Null))
        })?;
        self.traced("remove", n, |b| {
            names.iter().try_for_each(|name| b.api_remove(name))?;
            b.wait_for_deletions()
        })?;
        self.api_remove("f-0")?;
        self.wait_for_deletions()
    }

    /// Run `work` (`ops` operations) with the daemon traced; records its fsync-class calls
    /// per operation.
    fn traced(
        &mut self,
        what: &str,
        ops: usize,
        work: impl FnOnce(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        let pid = self.daemon.as_ref().ok_or("no daemon")?.id();
        let out = self
            .args
            .config
            .with_file_name(format!("strace-{what}.txt"));
        let mut strace = Command::new("strace")
            .args(["-f", "-c", "-e", &format!("trace={SYNC_CALLS}"), "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("strace: {e} (scripts/setup installs it)"))?;
        wait_until_attached(&mut strace)?;
        let worked = work(self);
        let stopped = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(strace.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = strace.wait();
        worked?;
        stopped.map_err(|e| e.to_string())?;
        let summary =
            std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let calls = sync_calls(&summary);
        let per_op = calls as f64 / ops as f64;
        eprintln!("bench_thinstack: {what}: {calls} fsync-class calls over {ops} operations ({per_op:.2} each)");
        let tool = self.tool("API");
        self.rows.push(format!(
            "{tool},fsync-class calls per {what},{ops},{per_op:.3}"
        ));
        Ok(())
    }

    /// Until the daemon has deleted the thin devices removals queued.
    fn wait_for_deletions(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let text = self
                .client
                .get_text("/metrics")
                .map_err(|e| format!("GET /metrics: {e}"))?;
            let pending = text
                .lines()
                .find_map(|l| l.strip_prefix("thinstack_thin_devices_deleting "))
                .ok_or("no thinstack_thin_devices_deleting in /metrics")?;
            if pending.trim() == "0" {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(format!("{pending} deletions still pending after 600 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
                let rss = self.daemon_rss_mib()?;
                eprintln!("bench_thinstack: resident memory with {layers} layers: {rss:.1} MiB");
                self.rows
                    .push(format!("thinstack,resident memory (MiB),{layers},{rss:.3}"));
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

    /// The daemon's resident memory (VmRSS), in MiB.
    fn daemon_rss_mib(&self) -> Result<f64, String> {
        let pid = self.daemon.as_ref().ok_or("no daemon")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no VmRSS")?;
        Ok(kib / 1024.0)
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
        api_create_with(&mut self.client, name, parent)
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
        api_post_with(&mut self.client, name, action, body)
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

fn api_create_with(client: &mut Client, name: &str, parent: Option<&str>) -> Result<(), String> {
    let request = CreateRequest {
        name: name.into(),
        parent: parent.map(Into::into),
        // Bases take the configured layers.base_size: the same size every other tool's
        // layers have in the run (scripts/bench).
        ..CreateRequest::default()
    };
    let _: Value = client
        .post("/v1/layers", &request)
        .map_err(|e| format!("create {name}: {e}"))?;
    Ok(())
}

fn api_post_with(
    client: &mut Client,
    name: &str,
    action: &str,
    body: &impl serde::Serialize,
) -> Result<(), String> {
    let _: Value = client
        .post(&format!("/v1/layers/{name}/{action}"), body)
        .map_err(|e| format!("{action} {name}: {e}"))?;
    Ok(())
}

/// The system calls that make data durable, traced by [`Bench::traced`].
const SYNC_CALLS: &str = "fsync,fdatasync,sync_file_range,syncfs,sync,msync";

/// Wait until `strace` reports `pid` attached (with all its threads: "attached with N
/// threads"; threads made later are followed by `-f`).
fn wait_until_attached(strace: &mut Child) -> Result<(), String> {
    use std::io::BufRead;
    let stderr = strace.stderr.take().ok_or("strace's stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .ok_or("strace ended before attaching")?
            .map_err(|e| e.to_string())?;
        if line.contains("attached") {
            break;
        }
    }
    // The rest of strace's messages are read and dropped, so it never blocks on them.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(())
}

/// The calls column of `strace -c`'s summary, summed over the sync calls.
fn sync_calls(summary: &str) -> u64 {
    summary
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.last()?;
            if fields.len() < 5 || !SYNC_CALLS.split(',').any(|c| c == name) {
                return None;
            }
            fields[3].parse::<u64>().ok()
        })
        .sum()
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
