//! The rbd backend's side of `scripts/bench` (`--only rbd`), on the test cluster of
//! `scripts/ceph-cluster`, in one run:
//! - `snapshot+clone`: librbd's own steps for a child, in this process over one connection (a
//!   snapshot of the base named for the child, a clone v2 of it; clone v2 needs no protect),
//!   beside `create+commit` of a child through thinstackd's API socket (one kept-alive
//!   connection). Both fan out `--layers` children of the same image (thinstack's committed
//!   base, an ext4 filesystem), child by child in turn, which of the two goes first
//!   alternating: the cluster, the base's growing list of snapshots and the machine's load are
//!   the same for both (run one after the other, the second side met a busier cluster);
//! - `map`/`unmap`: the kernel's sysfs map of librbd's children, beside thinstack's `activate`
//!   and `deactivate` of its own (which add the writer lock and the catalog read);
//! - chain depth: a chain of 20 layers, each made and committed through the API (the 17th is
//!   flattened: the kernel maps at most 16 parents), and at each depth the first direct read of
//!   16 MiB of the base's data through the chain;
//! - `map = "nbd"`, a second thinstackd whose layers rbd-nbd serves: its activate and
//!   deactivate beside `rbd-nbd map` and `unmap` of the same images by hand (which goes first
//!   alternating), and the same chain of 20, which needs no flatten.
//!
//! Rows `tool,operation,layer,ms` go to `--csv`; a summary table (medians, ratios, the 1.2x
//! target) to `--table`.
//!
//! bench_rbd --thinstackd BIN --ceph-conf FILE --keyring FILE --pool POOL --csv FILE
//!           --table FILE --workdir DIR [--layers N]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use thinstack::api::CreateRequest;
use thinstack::client::Client;
use thinstack::kernel::rbd::{self, map, Cluster, ClusterConfig, ImageFeatures, MapRequest};
use thinstack::names::{PoolName, ThinId};

struct Args {
    thinstackd: PathBuf,
    conf: PathBuf,
    keyring: PathBuf,
    pool: String,
    csv: PathBuf,
    table: PathBuf,
    workdir: PathBuf,
    layers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut values = std::collections::HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        values.insert(flag, value);
    }
    let mut take = |flag: &str| values.remove(flag).ok_or(format!("{flag} is required"));
    Ok(Args {
        thinstackd: take("--thinstackd")?.into(),
        conf: take("--ceph-conf")?.into(),
        keyring: take("--keyring")?.into(),
        pool: take("--pool")?,
        csv: take("--csv")?.into(),
        table: take("--table")?.into(),
        workdir: take("--workdir")?.into(),
        layers: take("--layers")
            .unwrap_or_else(|_| "30".into())
            .parse()
            .map_err(|e| format!("--layers: {e}"))?,
    })
}

fn main() -> std::process::ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_rbd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Timings of one operation, in milliseconds.
#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

struct Csv(File);

impl Csv {
    fn row(&mut self, tool: &str, operation: &str, layer: usize, ms: f64) -> Result<(), String> {
        writeln!(self.0, "{tool},{operation},{layer},{ms:.3}").map_err(|e| e.to_string())
    }
}

fn timed<T>(f: impl FnOnce() -> Result<T, String>) -> Result<(T, f64), String> {
    let start = Instant::now();
    let value = f()?;
    Ok((value, start.elapsed().as_secs_f64() * 1000.0))
}

fn run(args: &Args) -> Result<(), String> {
    let mut csv = Csv(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)
        .map_err(|e| format!("{}: {e}", args.csv.display()))?);
    let cluster = Cluster::connect(&ClusterConfig {
        ceph_conf: args.conf.clone(),
        client: "admin".into(),
        keyring: Some(args.keyring.clone()),
        timeout: Duration::from_secs(120),
    })
    .map_err(|e| e.to_string())?;
    let daemon = Daemon::start(args, KRBD)?;
    let (floor, made) = children_in_turn(args, &cluster, &daemon, &mut csv)?;
    let sysfs = sysfs_maps(args, &cluster, &mut csv)?;
    let (activations, deactivations) = thinstack_maps(args, &daemon, &mut csv)?;
    let chain = chain_depth(&daemon, "rbd-thinstack", &mut csv)?;
    drop(daemon);
    let daemon = Daemon::start(args, NBD)?;
    let nbd = nbd_maps(args, &daemon, &mut csv)?;
    let nbd_chain = chain_depth(&daemon, "rbd-thinstack-nbd", &mut csv)?;
    drop(daemon);
    write_table(
        args,
        &floor,
        &sysfs,
        &(made, activations, deactivations),
        &nbd,
        &(chain, nbd_chain),
    )
}

/// A thinstackd's pool: its name and namespace, and its `[pool.rbd]` keys beside the cluster's.
struct PoolSetup {
    name: &'static str,
    namespace: &'static str,
    keys: &'static str,
}

/// The kernel's rbd driver maps the layers (the default).
const KRBD: PoolSetup = PoolSetup {
    name: "bench",
    namespace: NAMESPACE,
    keys: "",
};

/// rbd-nbd maps them, and a chain of 20 is never flattened.
const NBD: PoolSetup = PoolSetup {
    name: "bench-nbd",
    namespace: "bench-nbd",
    keys: "map = \"nbd\"\nflatten_depth = 24\n",
};

/// The namespace thinstackd's pool and librbd's children share.
const NAMESPACE: &str = "bench-thinstack";

/// Each child of one committed base made both ways in turn: librbd's own snapshot + clone in
/// this process (`librbd-kid-N`), and thinstack's create + commit through the API (`kid-N`).
fn children_in_turn(
    args: &Args,
    cluster: &std::sync::Arc<Cluster>,
    daemon: &Daemon,
    csv: &mut Csv,
) -> Result<(Series, Series), String> {
    let mut client = daemon.client();
    create(&mut client, "base", None)?;
    on_layer(&mut client, "base", "commit")?;
    let base_image = image_of(&mut client, KRBD.name, "base")?;
    let io = cluster
        .io(&args.pool, Some(NAMESPACE))
        .map_err(|e| e.to_string())?;
    let (mut floor, mut made) = (Series::default(), Series::default());
    let librbd = |csv: &mut Csv, floor: &mut Series, i: usize| -> Result<(), String> {
        let ((), ms) = timed(|| librbd_child(&io, &base_image, i))?;
        csv.row("rbd-librbd", "snapshot+clone", i, ms)?;
        floor.0.push(ms);
        Ok(())
    };
    for i in 1..=args.layers {
        if i % 2 == 1 {
            librbd(csv, &mut floor, i)?;
        }
        let name = format!("kid-{i}");
        let ((), ms) = timed(|| create_and_commit(&mut client, &name, Some("base")))?;
        csv.row("rbd-thinstack", "create+commit", i, ms)?;
        made.0.push(ms);
        if i % 2 == 0 {
            librbd(csv, &mut floor, i)?;
        }
    }
    Ok((floor, made))
}

/// librbd's steps for child `i` of `base`: open, snapshot, close, clone.
fn librbd_child(io: &rbd::Io, base: &str, i: usize) -> Result<(), String> {
    let (child, snapshot) = (format!("librbd-kid-{i}"), format!("librbd-to-{i}"));
    let open = io.open(base, None, false).map_err(|e| e.to_string())?;
    open.snapshot(&snapshot).map_err(|e| e.to_string())?;
    drop(open);
    io.clone_image(base, &snapshot, &child, ImageFeatures::default())
        .map_err(|e| e.to_string())
}

/// The kernel's sysfs map and unmap of each of those children, with no thinstack.
fn sysfs_maps(
    args: &Args,
    cluster: &std::sync::Arc<Cluster>,
    csv: &mut Csv,
) -> Result<(Series, Series), String> {
    let request = MapRequest {
        monitors: cluster
            .kernel_monitor_addresses()
            .map_err(|e| e.to_string())?,
        client: "admin".into(),
        secret: rbd::secret_of(cluster).map_err(|e| e.to_string())?,
        pool: args.pool.clone(),
        namespace: Some(NAMESPACE.into()),
        image: String::new(),
        read_only: false,
        exclusive: false,
    };
    let (mut maps, mut unmaps) = (Series::default(), Series::default());
    for i in 1..=args.layers {
        let request = MapRequest {
            image: format!("librbd-kid-{i}"),
            ..request.clone()
        };
        let (mapped, ms) = timed(|| map::map(&request).map_err(|e| e.to_string()))?;
        csv.row("rbd-sysfs", "map", i, ms)?;
        maps.0.push(ms);
        let ((), ms) = timed(|| map::unmap(mapped.id).map_err(|e| e.to_string()))?;
        csv.row("rbd-sysfs", "unmap", i, ms)?;
        unmaps.0.push(ms);
    }
    Ok((maps, unmaps))
}

/// thinstackd on an rbd pool, stopped (pool destroyed) on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(args: &Args, setup: PoolSetup) -> Result<Daemon, String> {
        let dir = args.workdir.join(format!("rbd-daemon-{}", setup.name));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let socket = dir.join("thinstack.sock");
        let config = dir.join("thinstack.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\nsocket = {:?}\n[pool]\nname = {:?}\nbackend = \"rbd\"\n\
                 [pool.rbd]\npool = {:?}\nnamespace = {:?}\nceph_conf = {:?}\n\
                 keyring = {:?}\n{}[layers]\nbase_size = \"512M\"\n",
                dir.join("state").display().to_string(),
                socket.display().to_string(),
                setup.name,
                args.pool,
                setup.namespace,
                args.conf.display().to_string(),
                args.keyring.display().to_string(),
                setup.keys,
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = File::create(dir.join("log")).map_err(|e| e.to_string())?;
        let child = Command::new(&args.thinstackd)
            .arg("--config")
            .arg(&config)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting thinstackd: {e}"))?;
        let daemon = Daemon { child, socket };
        let deadline = Instant::now() + Duration::from_secs(300);
        while Client::new(&daemon.socket)
            .get::<Value>("/v1/pool")
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(format!(
                    "thinstackd did not answer; see {}",
                    dir.join("log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(daemon)
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self
            .client()
            .post::<Value>("/v1/pool/destroy", &serde_json::json!({"force": true}));
        let _ = self.child.wait();
    }
}

fn post(client: &mut Client, path: &str, body: &impl serde::Serialize) -> Result<Value, String> {
    client
        .post(path, body)
        .map_err(|e| format!("POST {path}: {e}"))
}

fn create(client: &mut Client, name: &str, parent: Option<&str>) -> Result<(), String> {
    let request = CreateRequest {
        name: name.into(),
        parent: parent.map(Into::into),
        ..CreateRequest::default()
    };
    post(client, "/v1/layers", &request).map(drop)
}

/// The image of layer `name` in thinstackd's pool `pool`.
fn image_of(client: &mut Client, pool: &str, name: &str) -> Result<String, String> {
    let layer: Value = client
        .get(&format!("/v1/layers/{name}"))
        .map_err(|e| format!("GET /v1/layers/{name}: {e}"))?;
    let id = layer["thin_id"]
        .as_u64()
        .and_then(|id| ThinId::new(u32::try_from(id).ok()?).ok())
        .ok_or(format!("no thin id for layer {name}"))?;
    let pool = PoolName::new(pool).map_err(|e| e.to_string())?;
    Ok(thinstack::pool::rbd::image_name(&pool, id))
}

/// `POST /v1/layers/{name}/{action}` with no body (commit, activate, deactivate).
fn on_layer(client: &mut Client, name: &str, action: &str) -> Result<Value, String> {
    post(client, &format!("/v1/layers/{name}/{action}"), &Value::Null)
}

/// Layer `name` made (a child of `parent`) and committed: the operation timed per layer.
fn create_and_commit(client: &mut Client, name: &str, parent: Option<&str>) -> Result<(), String> {
    create(client, name, parent)?;
    on_layer(client, name, "commit").map(drop)
}

/// Per child made by `children_in_turn`: thinstack's activate, then deactivate.
fn thinstack_maps(args: &Args, daemon: &Daemon, csv: &mut Csv) -> Result<(Series, Series), String> {
    let mut client = daemon.client();
    let (mut activations, mut deactivations) = (Series::default(), Series::default());
    for i in 1..=args.layers {
        let name = format!("kid-{i}");
        let (_, ms) = timed(|| on_layer(&mut client, &name, "activate"))?;
        csv.row("rbd-thinstack", "activate", i, ms)?;
        activations.0.push(ms);
        let (_, ms) = timed(|| on_layer(&mut client, &name, "deactivate"))?;
        csv.row("rbd-thinstack", "deactivate", i, ms)?;
        deactivations.0.push(ms);
    }
    Ok((activations, deactivations))
}

/// A depth, its create+commit and its read, in ms.
type ChainRow = (usize, f64, f64);

/// Depth d: the create+commit of layer d of a chain, and the first direct read of 16 MiB of
/// the base's data through it.
fn chain_depth(
    daemon: &Daemon,
    tool: &str,
    csv: &mut Csv,
) -> Result<Vec<(usize, f64, f64)>, String> {
    const DEPTH: usize = 20;
    const READ: usize = 16 << 20;
    let mut client = daemon.client();
    create(&mut client, "c0", None)?;
    // Data in the base to read through the chain: 16 MiB written once.
    let node = activate(&mut client, "c0")?;
    write_direct(&node, READ)?;
    on_layer(&mut client, "c0", "deactivate")?;
    on_layer(&mut client, "c0", "commit")?;
    let mut rows = Vec::new();
    for depth in 1..=DEPTH {
        let (name, parent) = (format!("c{depth}"), format!("c{}", depth - 1));
        let ((), made) = timed(|| create_and_commit(&mut client, &name, Some(&parent)))?;
        csv.row(tool, "chain create+commit", depth, made)?;
        let node = activate(&mut client, &name)?;
        let ((), read) = timed(|| read_direct(&node, READ))?;
        on_layer(&mut client, &name, "deactivate")?;
        csv.row(tool, "chain read 16MiB", depth, read)?;
        rows.push((depth, made, read));
    }
    Ok(rows)
}

/// Medians of an nbd pool's activate and deactivate, and of `rbd-nbd map` and `unmap`.
struct NbdMaps {
    activate: Series,
    deactivate: Series,
    map: Series,
    unmap: Series,
}

/// How many children the nbd comparison maps: each map starts a process and connects it.
const NBD_CHILDREN: usize = 10;

/// Children of a committed base on the nbd daemon's pool, each mapped both ways in turn:
/// thinstack's activate and deactivate, and `rbd-nbd map` and `unmap` of its image by hand.
fn nbd_maps(args: &Args, daemon: &Daemon, csv: &mut Csv) -> Result<NbdMaps, String> {
    let mut client = daemon.client();
    create_and_commit(&mut client, "base", None)?;
    let mut times = NbdMaps {
        activate: Series::default(),
        deactivate: Series::default(),
        map: Series::default(),
        unmap: Series::default(),
    };
    for i in 1..=NBD_CHILDREN.min(args.layers) {
        let name = format!("kid-{i}");
        create_and_commit(&mut client, &name, Some("base"))?;
        let spec = format!(
            "{}/{}/{}",
            args.pool,
            NBD.namespace,
            image_of(&mut client, NBD.name, &name)?
        );
        let mut by_hand = |csv: &mut Csv| -> Result<(), String> {
            let (device, ms) = timed(|| rbd_nbd(args, &["map", &spec]))?;
            csv.row("rbd-nbd", "map", i, ms)?;
            times.map.0.push(ms);
            let (_, ms) = timed(|| rbd_nbd(args, &["unmap", device.trim()]))?;
            csv.row("rbd-nbd", "unmap", i, ms)?;
            times.unmap.0.push(ms);
            Ok(())
        };
        if i % 2 == 1 {
            by_hand(csv)?;
        }
        let (_, ms) = timed(|| on_layer(&mut client, &name, "activate"))?;
        csv.row("rbd-thinstack-nbd", "activate", i, ms)?;
        times.activate.0.push(ms);
        let (_, ms) = timed(|| on_layer(&mut client, &name, "deactivate"))?;
        csv.row("rbd-thinstack-nbd", "deactivate", i, ms)?;
        times.deactivate.0.push(ms);
        if i % 2 == 0 {
            by_hand(csv)?;
        }
    }
    Ok(times)
}

/// `rbd-nbd` with `args`, as an operator maps by hand; what it printed.
fn rbd_nbd(args: &Args, command: &[&str]) -> Result<String, String> {
    let out = Command::new("rbd-nbd")
        .arg("--conf")
        .arg(&args.conf)
        .arg("--keyring")
        .arg(&args.keyring)
        .args(command)
        .output()
        .map_err(|e| format!("rbd-nbd: {e}"))?;
    if !out.status.success() {
        return Err(format!("rbd-nbd {command:?}: {out:?}"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn activate(client: &mut Client, name: &str) -> Result<PathBuf, String> {
    let device = on_layer(client, name, "activate")?;
    Ok(PathBuf::from(device["device"].as_str().ok_or("no device")?))
}

/// A buffer of `fill` with room to align `len` bytes of it for O_DIRECT.
fn aligned(len: usize, fill: u8) -> Vec<u8> {
    vec![fill; len + 4096]
}

/// `node` opened for direct I/O, to write or to read.
fn open_direct(node: &Path, write: bool) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(node)
        .map_err(|e| format!("{}: {e}", node.display()))
}

fn write_direct(node: &Path, len: usize) -> Result<(), String> {
    let buf = aligned(len, 0xa5);
    let offset = buf.as_ptr().align_offset(4096);
    open_direct(node, true)?
        .write_all(&buf[offset..offset + len])
        .map_err(|e| format!("writing {}: {e}", node.display()))
}

fn read_direct(node: &Path, len: usize) -> Result<(), String> {
    let mut buf = aligned(len, 0);
    let offset = buf.as_ptr().align_offset(4096);
    open_direct(node, false)?
        .read_exact(&mut buf[offset..offset + len])
        .map_err(|e| format!("reading {}: {e}", node.display()))?;
    if buf[offset..offset + len].iter().any(|&b| b != 0xa5) {
        return Err(format!(
            "{}: the base's data did not read back",
            node.display()
        ));
    }
    Ok(())
}

fn write_table(
    args: &Args,
    floor: &Series,
    (maps, unmaps): &(Series, Series),
    (made, activations, deactivations): &(Series, Series, Series),
    nbd: &NbdMaps,
    (chain, nbd_chain): &(Vec<ChainRow>, Vec<ChainRow>),
) -> Result<(), String> {
    let ratio = made.median() / floor.median();
    let mut t = String::new();
    t.push_str(&format!(
        "Medians over {} children of one committed base, made both ways in turn; one cluster, one run.\n\n",
        args.layers
    ));
    t.push_str("| per layer | thinstack (API) | beside | ms | ratio | target |\n|---|---|---|---|---|---|\n");
    t.push_str(&format!(
        "| create+commit a child | {:.1} ms | librbd snapshot+clone, in-process | {:.1} | {ratio:.2}x | 1.2x: {} |\n",
        made.median(),
        floor.median(),
        if ratio <= 1.2 { "met" } else { "not met" }
    ));
    t.push_str(&format!(
        "| activate | {:.1} ms | sysfs map | {:.1} | {:.2}x | |\n",
        activations.median(),
        maps.median(),
        activations.median() / maps.median()
    ));
    t.push_str(&format!(
        "| deactivate | {:.1} ms | sysfs unmap | {:.1} | {:.2}x | |\n",
        deactivations.median(),
        unmaps.median(),
        deactivations.median() / unmaps.median()
    ));
    for (what, ours, theirs, by_hand) in [
        ("activate", &nbd.activate, &nbd.map, "rbd-nbd map"),
        ("deactivate", &nbd.deactivate, &nbd.unmap, "rbd-nbd unmap"),
    ] {
        t.push_str(&format!(
            "| {what}, map = nbd ({} children) | {:.1} ms | {by_hand}, by hand | {:.1} | {:.2}x | |\n",
            ours.0.len(),
            ours.median(),
            theirs.median(),
            ours.median() / theirs.median()
        ));
    }
    t.push_str("\nChain depth: create+commit, and the first direct read of 16 MiB of the base through the chain. With the kernel's rbd driver the 17th layer is flattened when made; with `map = \"nbd\"` (`flatten_depth = 24`) none is.\n\n| depth | krbd: create+commit ms | krbd: read ms | nbd: create+commit ms | nbd: read ms |\n|---|---|---|---|---|\n");
    for ((depth, made, read), (_, nbd_made, nbd_read)) in chain.iter().zip(nbd_chain) {
        t.push_str(&format!(
            "| {depth} | {made:.1} | {read:.1} | {nbd_made:.1} | {nbd_read:.1} |\n"
        ));
    }
    std::fs::write(&args.table, t).map_err(|e| format!("{}: {e}", args.table.display()))
}
