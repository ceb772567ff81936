//! thinstack: the command line for thinstackd.
//!
//! Exit codes (stable): 0 success, 1 other error, 2 usage error, 3 not found, 4 already exists,
//! 5 busy, 6 no space, 7 daemon unreachable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;
use thinstack::api::{
    AddDeviceRequest, AddDeviceResponse, AdoptRequest, BreakLockResponse, CheckResponse,
    CreateRequest, DestroyRequest, DestroyResponse, DeviceResponse, DoctorRequest, DoctorResponse,
    DoneResponse, Event, ExtendRequest, ExtendResponse, FindingStatus, Layer, MountRequest,
    MountResponse, PoolStatus, PruneRequest, PruneResponse, Removal, RemoveResponse, ResizeRequest,
    TrimResponse, UnmountRequest, UsageResponse,
};
use thinstack::client::{Client, ClientError, DEFAULT_SOCKET};
use thinstack::names::{ThinId, THIN_ID_MAX};
use thinstack::units::{ByteSize, Timeout};
use thinstack::vocab::FsType;
use thinstack::ErrorKind;

/// Thin-provisioned block layers: talk to thinstackd.
#[derive(Parser, Debug)]
#[command(name = "thinstack", version, about, after_help = EXIT_CODES)]
struct Args {
    /// thinstackd's socket.
    #[arg(long, global = true, value_name = "PATH", env = "THINSTACK_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Print exactly one JSON document on stdout (errors too).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 success, 1 other error, 2 usage error, 3 not found, \
4 already exists, 5 busy, 6 no space, 7 daemon unreachable.";

#[derive(Subcommand, Debug)]
enum Command {
    /// The pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Layers.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Print each change as it happens (layers created, committed, mounted, unmounted,
    /// resized, removed or degraded; the pool extended or guarded), one a line, until
    /// interrupted or, with --count, after that many.
    Events {
        /// Stop after this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum PoolCommand {
    /// Space, health and settings of the pool.
    Status,
    /// The daemon's Prometheus metrics, as a scraper reads them (GET /metrics).
    Metrics,
    /// Grow the pool's data and/or metadata area (a devices pool: take up its devices' size).
    Extend {
        /// New size of the data area, such as 200G.
        #[arg(long, value_name = "SIZE")]
        data: Option<ByteSize>,
        /// New size of the metadata area, such as 4G.
        #[arg(long, value_name = "SIZE")]
        metadata: Option<ByteSize>,
    },
    /// Add a disk to an lvm pool's volume group (checked like the first disks).
    AddDevice {
        /// The disk, such as /dev/sdc.
        device: PathBuf,
        /// Wipe filesystem and partition signatures on it instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Check the pool's metadata with thin_check (through a metadata snapshot); exit 1 when
    /// damage is found.
    Check,
    /// List what a crash or a foreign tool left: dm devices and thin devices no record owns,
    /// layers whose thin device is gone, stale mounts and mount points, loop devices bound to
    /// deleted files. Exit 1 while something of this pool's needs attention.
    Doctor {
        /// Clean what is safe to clean: never what is in use, nor what is not this pool's,
        /// nor thin devices no record owns (they may be layers whose records were lost).
        #[arg(long, conflicts_with = "adopt")]
        repair: bool,
        /// With --repair: delete the thin devices no record owns too (their data is lost).
        #[arg(long, requires = "repair")]
        delete_unowned: bool,
        /// Make the thin device THIN_ID, which no record owns, the layer NAME again (its
        /// filesystem tells its size; its parent is not known any more).
        #[arg(long, num_args = 2, value_names = ["THIN_ID", "NAME"])]
        adopt: Option<Vec<String>>,
    },
    /// Remove the pool and what thinstack made for it (loop files, or LVM volumes, volume
    /// group and PV labels); an adopted pool stays. thinstackd stops afterwards.
    Destroy {
        /// Remove every layer too (refused while layers exist otherwise).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LayerCommand {
    /// Create a base layer (new filesystem) or a snapshot of a parent.
    Create {
        /// The new layer's name.
        name: String,
        /// Snapshot this layer.
        #[arg(long, value_name = "PARENT")]
        parent: Option<String>,
        /// Virtual size (default: the base size, or the parent's).
        #[arg(long, value_name = "SIZE")]
        size: Option<ByteSize>,
        /// Filesystem of a base layer.
        #[arg(long, value_name = "ext4|xfs", value_parser = parse_fs)]
        fs: Option<FsType>,
        /// A label; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Succeed when the layer exists already with the same parent.
        #[arg(long)]
        exists_ok: bool,
    },
    /// Make a layer read-only for good.
    Commit {
        /// The layer.
        name: String,
    },
    /// Every layer; with --label, those carrying every label given.
    List {
        /// Only layers with this label; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Also what each layer maps, holds alone (what removing it gives back) and shares.
        #[arg(long)]
        usage: bool,
    },
    /// Everything about one layer.
    Inspect {
        /// The layer.
        name: String,
    },
    /// Pool data the layer maps, holds alone (what removing it gives back) and shares.
    Usage {
        /// The layer.
        name: String,
    },
    /// Activate a layer's block device and print its path.
    Activate {
        /// The layer.
        name: String,
    },
    /// Deactivate a layer's block device.
    Deactivate {
        /// The layer.
        name: String,
    },
    /// Take a layer's writer lock from the host that holds it (backend rbd), fencing that
    /// host's clients of the layer. Only for a host known to be dead: one still alive loses
    /// its writes.
    BreakLock {
        /// The layer.
        name: String,
    },
    /// Mount a layer and print where.
    Mount {
        /// The layer.
        name: String,
        /// Mount point (an existing directory); default under the state directory.
        #[arg(long, value_name = "DIR")]
        target: Option<PathBuf>,
        /// Mount read-only (committed layers always are).
        #[arg(long)]
        readonly: bool,
    },
    /// Unmount a layer (drops one user; the last unmounts).
    Unmount {
        /// The layer.
        name: String,
        /// Which mount, when it has several.
        #[arg(long, value_name = "DIR")]
        target: Option<PathBuf>,
    },
    /// Grow a layer's device and filesystem.
    Resize {
        /// The layer.
        name: String,
        /// The new size.
        #[arg(long, value_name = "SIZE")]
        size: ByteSize,
    },
    /// Remove a layer (deferred while its device is busy).
    Remove {
        /// The layer.
        name: String,
        /// Remove the layers made from it first.
        #[arg(long)]
        recursive: bool,
    },
    /// Have a layer's filesystem discard its free blocks (fstrim; an unmounted layer is
    /// mounted privately for it), and print the pool data that came back.
    Trim {
        /// The layer.
        name: String,
    },
    /// Remove the layers nobody uses (not mounted, not active, no children left, not
    /// containerd's), oldest first and children before parents; print what went and the pool
    /// data given back.
    Prune {
        /// Only layers with this label; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Only layers made at least this long ago, such as 24h or 7d.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<Timeout>,
        /// List what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a layer's blocks as a stream (docs/layer-stream.md): all of them, or with
    /// --from only what changed since that committed ancestor. The layer must be committed,
    /// or unmounted and inactive.
    Export {
        /// The layer.
        name: String,
        /// A committed ancestor the importing host holds (imported from here, or exported
        /// with the same content): only the changes since it are sent.
        #[arg(long, value_name = "ANCESTOR")]
        from: Option<String>,
        /// Where to write the stream (default: standard output, which must not be a
        /// terminal).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Compress the stream with zstd (import notices by itself).
        #[arg(long)]
        compress: bool,
    },
    /// Make a committed layer of a stream `layer export` wrote, checked whole before it
    /// counts: a cut, changed or mismatched stream leaves nothing behind.
    Import {
        /// The new layer's name.
        name: String,
        /// For a stream of changes: the layer here that holds the content it was made
        /// against.
        #[arg(long, value_name = "PARENT")]
        parent: Option<String>,
        /// Where to read the stream (default: standard input).
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Take a read-only snapshot of a writable layer, mounted or not, as a new committed
    /// layer the layer can later be reset to.
    Checkpoint {
        /// The writable layer.
        name: String,
        /// The checkpoint's name.
        checkpoint: String,
        /// A label for the checkpoint; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Give a writable layer back the content of its parent, or of one of its checkpoints:
    /// one thin snapshot, no copying. It keeps its name and labels; it must be unmounted,
    /// and without children.
    Reset {
        /// The layer.
        name: String,
        /// One of its checkpoints (default: its parent).
        #[arg(long, value_name = "LAYER")]
        to: Option<String>,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn parse_fs(text: &str) -> Result<FsType, String> {
    serde_json::from_value(Value::String(text.to_string()))
        .map_err(|_| format!("{text:?} is not a filesystem thinstack makes; use ext4 or xfs"))
}

/// What a command prints: the JSON document, and the text for people.
struct Output {
    json: Value,
    text: String,
    /// The exit status of a command that succeeded but found something (pool doctor).
    status: u8,
}

mod transfer;

fn output<T: Serialize>(value: &T, text: String) -> Output {
    Output {
        json: serde_json::to_value(value).unwrap_or(Value::Null),
        text,
        status: 0,
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Completions { shell } = args.command {
        clap_complete::generate(
            shell,
            &mut Args::command(),
            "thinstack",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let mut client = Client::new(&args.socket);
    let result = match args.command {
        Command::Pool(command) => pool(&mut client, command),
        Command::Layer(command) => layer(&mut client, command),
        Command::Events { count } => events(&mut client, count, args.json),
        Command::Completions { .. } => unreachable!("handled above"),
    };
    let mut stdout = std::io::stdout().lock();
    match result {
        Ok(out) => {
            // A closed pipe (thinstack ... | head) is not an error of the operation.
            // An event stream printed its lines as they came.
            let _ = if out.json.is_null() && out.text.is_empty() {
                Ok(())
            } else if args.json {
                writeln!(stdout, "{}", out.json)
            } else if out.text.is_empty() {
                Ok(())
            } else {
                writeln!(stdout, "{}", out.text.trim_end())
            };
            ExitCode::from(out.status)
        }
        Err(e) => {
            if args.json {
                let _ = writeln!(stdout, "{}", e.to_json());
            }
            eprintln!("thinstack: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Print events as they come: the JSON lines as the daemon sends them, or a sentence each.
fn events(client: &mut Client, count: Option<u64>, json: bool) -> Result<Output, ClientError> {
    let path = match count {
        Some(count) => format!("/v1/events?count={count}"),
        None => "/v1/events".to_string(),
    };
    let mut stdout = std::io::stdout();
    client.stream_lines(&path, |line| {
        let text = if json {
            line.to_string()
        } else {
            match serde_json::from_str::<Event>(line) {
                Ok(event) => event_text(&event),
                Err(_) => line.to_string(),
            }
        };
        // A reader that went away (thinstack events | head -1) ends the stream.
        writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_ok()
    })?;
    Ok(Output {
        json: Value::Null,
        text: String::new(),
        status: 0,
    })
}

/// "2026-12-03T14:55:01Z layer_mounted app at /var/lib/thinstack/mnt/app (read-only)"
fn event_text(event: &Event) -> String {
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(event.time_ns);
    let mut text = format!("{} {}", humantime::format_rfc3339_seconds(when), event.kind);
    if let Some(layer) = &event.layer {
        text.push_str(&format!(" {layer}"));
    }
    if let Some(target) = &event.target {
        text.push_str(&format!(" at {}", target.display()));
    }
    if event.read_only == Some(true) {
        text.push_str(" (read-only)");
    }
    if let Some(size) = event.size {
        text.push_str(&format!(" to {size}"));
    }
    if let (Some(data), Some(metadata)) = (event.data, event.metadata) {
        let how = if event.automatic == Some(true) {
            "by thinstackd"
        } else {
            "on request"
        };
        text.push_str(&format!(" to {data} data, {metadata} metadata, {how}"));
    }
    if let Some(reason) = &event.reason {
        text.push_str(&format!(": {reason}"));
    }
    if let Some(lost) = event.lost {
        text.push_str(&format!(
            ": {lost} events were dropped, this reader fell behind"
        ));
    }
    text
}

fn exit_code(e: &ClientError) -> u8 {
    thinstack::client::exit_code_of(e.kind())
}

fn pool(client: &mut Client, command: PoolCommand) -> Result<Output, ClientError> {
    match command {
        PoolCommand::Status => {
            let status: PoolStatus = client.get("/v1/pool")?;
            Ok(output(&status, status_text(&status)))
        }
        PoolCommand::Metrics => {
            let text = client.get_text("/metrics")?;
            let text = text.trim_end().to_string();
            Ok(output(&Value::String(text.clone()), text))
        }
        PoolCommand::Extend { data, metadata } => {
            let sizes: ExtendResponse =
                client.post("/v1/pool/extend", &ExtendRequest { data, metadata })?;
            let text = format!(
                "The pool's data area is {}, its metadata area {}.",
                sizes.data, sizes.metadata
            );
            Ok(output(&sizes, text))
        }
        PoolCommand::AddDevice { device, force } => {
            let added: AddDeviceResponse =
                client.post("/v1/pool/add-device", &AddDeviceRequest { device, force })?;
            let text = format!(
                "Added {} to the volume group; it has {} free now.",
                added.device.display(),
                added.volume_group_free
            );
            Ok(output(&added, text))
        }
        PoolCommand::Check => {
            let report: CheckResponse = client.post("/v1/pool/check", &Value::Null)?;
            if !report.clean {
                return Err(ClientError::Api {
                    status: 200,
                    kind: ErrorKind::Inconsistent,
                    message: format!(
                        "pool metadata is damaged ({}): {}",
                        report.checked, report.findings
                    ),
                });
            }
            let text = format!("Pool metadata is clean ({}).", report.checked);
            Ok(output(&report, text))
        }
        PoolCommand::Doctor {
            adopt: Some(adopt), ..
        } => {
            let thin_id = adopt[0]
                .parse::<u32>()
                .ok()
                .and_then(|id| ThinId::new(id).ok());
            let Some(thin_id) = thin_id else {
                return Err(ClientError::Api {
                    status: 400,
                    kind: ErrorKind::Invalid,
                    message: format!(
                        "--adopt {:?}: a thin id is a number from 0 to {THIN_ID_MAX}, as `thinstack pool doctor` lists it",
                        adopt[0]
                    ),
                });
            };
            let request = AdoptRequest {
                thin_id,
                name: adopt[1].clone(),
            };
            let layer: Layer = client.post("/v1/pool/adopt", &request)?;
            let text = format!(
                "Thin device {} is layer {} again ({}, {}).",
                layer.thin_id, layer.name, layer.filesystem, layer.size
            );
            Ok(output(&layer, text))
        }
        PoolCommand::Doctor {
            repair,
            delete_unowned,
            adopt: None,
        } => {
            let request = DoctorRequest {
                repair,
                delete_unowned,
            };
            let report: DoctorResponse = client.post("/v1/pool/doctor", &request)?;
            let mut out = output(&report, doctor_text(&report));
            out.status = u8::from(report.needs_attention());
            Ok(out)
        }
        PoolCommand::Destroy { force } => {
            let destroyed: DestroyResponse =
                client.post("/v1/pool/destroy", &DestroyRequest { force })?;
            let text = format!(
                "Pool destroyed ({} layer(s) removed with it); thinstackd has stopped.",
                destroyed.layers_removed
            );
            Ok(output(&destroyed, text))
        }
    }
}

/// `pool status`: aligned "Label  value" lines, in the spirit of `docker info`.
fn status_text(status: &PoolStatus) -> String {
    let space = |area: &thinstack::api::Space| {
        let area = thinstack::vocab::Space {
            used: area.used,
            total: area.total,
            available: area.available,
        };
        area.describe()
    };
    let health = &status.health;
    let flags: Vec<&str> = [
        (health.failed, "FAILED"),
        (health.needs_check, "needs_check"),
        (health.read_only, "read-only"),
        (health.out_of_space, "out of data space"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    let rows = [
        ("Pool name", status.pool.name.clone()),
        ("Pool device", status.pool.device.clone()),
        ("Backend", status.pool.backend.clone()),
        ("Pool block size", status.pool.block_size.to_string()),
        ("Base device size", status.base_size.to_string()),
        ("Backing filesystem", status.filesystem.to_string()),
        ("Data", status.pool.data_source.clone()),
        ("Metadata", status.pool.metadata_source.clone()),
        ("Data space", space(&status.data)),
        ("Metadata space", space(&status.metadata)),
        ("Minimum free space", status.min_free_space.to_string()),
        ("Transaction id", status.transaction_id.to_string()),
        (
            "Health",
            if flags.is_empty() {
                "ok".to_string()
            } else {
                flags.join(", ")
            },
        ),
        (
            "When full",
            match health.when_full {
                Some(thinstack::api::WhenFull::Error) => "error (writes fail at once)".to_string(),
                Some(thinstack::api::WhenFull::Queue) => {
                    "queue (writes wait for an extension)".to_string()
                }
                None => "unknown".to_string(),
            },
        ),
        ("Layers", status.layers.to_string()),
        ("Deferred deletions", status.deferred_deletions.to_string()),
        ("Discard on remove", status.discard_on_remove.to_string()),
        ("Overcommit", overcommit_text(&status.overcommit)),
    ];
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}\n"))
        .collect()
}

/// "3.00x (300.0G virtual over 100.0G of data), limit 4x"
fn overcommit_text(overcommit: &thinstack::api::Overcommit) -> String {
    let limit = match overcommit.limit {
        Some(limit) => format!("limit {limit}x"),
        None => "no limit".to_string(),
    };
    format!(
        "{:.2}x ({} virtual over {} of data), {limit}",
        overcommit.ratio,
        overcommit.virtual_size.human(),
        overcommit.capacity.human()
    )
}

fn doctor_text(report: &DoctorResponse) -> String {
    if report.findings.is_empty() {
        return "Nothing left over: the records and the host agree.".to_string();
    }
    let mut text = String::new();
    for finding in &report.findings {
        let status = serde_json::to_value(finding.status).unwrap_or(Value::Null);
        let status = status.as_str().unwrap_or("?").replace('_', " ");
        text.push_str(&format!("{status:>14}  {}\n", finding.detail));
    }
    if !report.repair
        && report
            .findings
            .iter()
            .any(|f| f.status == FindingStatus::Repairable)
    {
        text.push_str("Run `thinstack pool doctor --repair` to clean what is repairable.\n");
    }
    text
}

fn layer_path(name: &str, action: &str) -> String {
    // Names are checked by the daemon; encoding keeps a bad one from changing the route.
    let name = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    if action.is_empty() {
        format!("/v1/layers/{name}")
    } else {
        format!("/v1/layers/{name}/{action}")
    }
}

fn layer(client: &mut Client, command: LayerCommand) -> Result<Output, ClientError> {
    match command {
        LayerCommand::Create {
            name,
            parent,
            size,
            fs,
            labels,
            exists_ok,
        } => {
            let request = CreateRequest {
                name,
                parent,
                size,
                filesystem: fs,
                labels: labels.into_iter().collect(),
                exists_ok,
            };
            let layer: Layer = client.post("/v1/layers", &request)?;
            let origin = match &layer.parent {
                Some(parent) => format!("a snapshot of {parent}"),
                None => "a new base layer".to_string(),
            };
            let text = format!(
                "Created layer {}: {origin}, {} {}, thin id {}.",
                layer.name, layer.size, layer.filesystem, layer.thin_id
            );
            Ok(output(&layer, text))
        }
        LayerCommand::Commit { name } => {
            let layer: Layer = client.post(&layer_path(&name, "commit"), &Value::Null)?;
            let text = format!("Committed layer {}; it is read-only now.", layer.name);
            Ok(output(&layer, text))
        }
        LayerCommand::List { labels, usage } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.extend_pairs(labels.iter().map(|(k, v)| ("label", format!("{k}={v}"))));
            if usage {
                query.append_pair("usage", "true");
            }
            let query = query.finish();
            let path = if query.is_empty() {
                "/v1/layers".to_string()
            } else {
                format!("/v1/layers?{query}")
            };
            let layers: Vec<Layer> = client.get(&path)?;
            let text = layer_table(&layers, usage);
            Ok(output(&layers, text))
        }
        LayerCommand::Inspect { name } => {
            let layer: Layer = client.get(&layer_path(&name, ""))?;
            let text = describe_layer(&layer);
            Ok(output(&layer, text))
        }
        LayerCommand::Usage { name } => {
            let usage: UsageResponse = client.get(&layer_path(&name, "usage"))?;
            let text = format!(
                "Layer {} maps {} of pool data ({} bytes): {} its own ({} bytes, what removing it gives back), {} shared with other layers ({} bytes).",
                usage.name,
                usage.mapped.human(),
                usage.mapped_bytes,
                usage.exclusive.human(),
                usage.exclusive_bytes,
                usage.shared.human(),
                usage.shared_bytes
            );
            Ok(output(&usage, text))
        }
        LayerCommand::Activate { name } => {
            let device: DeviceResponse =
                client.post(&layer_path(&name, "activate"), &Value::Null)?;
            let text = device.device.display().to_string();
            Ok(output(&device, text))
        }
        LayerCommand::Deactivate { name } => {
            let done: DoneResponse = client.post(&layer_path(&name, "deactivate"), &Value::Null)?;
            let text = format!("Deactivated layer {}.", done.name);
            Ok(output(&done, text))
        }
        LayerCommand::BreakLock { name } => {
            let broken: BreakLockResponse =
                client.post(&layer_path(&name, "break-lock"), &Value::Null)?;
            let text = format!(
                "Broke host {}'s writer lock on layer {}; fenced {} client(s){}{}.",
                broken.holder,
                broken.name,
                broken.fenced.len(),
                if broken.fenced.is_empty() { "" } else { ": " },
                broken.fenced.join(", ")
            );
            Ok(output(&broken, text))
        }
        LayerCommand::Mount {
            name,
            target,
            readonly,
        } => {
            let target = target.map(absolute).transpose()?;
            let mounted: MountResponse = client.post(
                &layer_path(&name, "mount"),
                &MountRequest { target, readonly },
            )?;
            let text = mounted.mount_point.display().to_string();
            Ok(output(&mounted, text))
        }
        LayerCommand::Unmount { name, target } => {
            let target = target.map(absolute).transpose()?;
            let done: DoneResponse =
                client.post(&layer_path(&name, "unmount"), &UnmountRequest { target })?;
            let text = format!("Unmounted layer {}.", done.name);
            Ok(output(&done, text))
        }
        LayerCommand::Resize { name, size } => {
            let layer: Layer =
                client.post(&layer_path(&name, "resize"), &ResizeRequest { size })?;
            let text = format!("Layer {} is {} now.", layer.name, layer.size);
            Ok(output(&layer, text))
        }
        LayerCommand::Remove { name, recursive } => {
            let mut path = layer_path(&name, "");
            if recursive {
                path.push_str("?recursive=true");
            }
            let removed: RemoveResponse = client.delete(&path)?;
            let text = removed
                .removed
                .iter()
                .map(|r| match r.result {
                    Removal::Removed => format!("Removed layer {}.", r.name),
                    Removal::Deferred => format!(
                        "Layer {} is in use; it will be removed as soon as it is released.",
                        r.name
                    ),
                })
                .collect::<Vec<_>>()
                .join("\n");
            Ok(output(&removed, text))
        }
        LayerCommand::Trim { name } => {
            let trimmed: TrimResponse = client.post(&layer_path(&name, "trim"), &Value::Null)?;
            let text = format!(
                "Trimmed layer {}: its filesystem discarded {} of free blocks; the pool got {} back.",
                trimmed.name,
                trimmed.trimmed.human(),
                trimmed.given_back.human()
            );
            Ok(output(&trimmed, text))
        }
        LayerCommand::Prune {
            labels,
            older_than,
            dry_run,
        } => {
            let request = PruneRequest {
                labels: labels.into_iter().collect(),
                older_than,
                dry_run,
            };
            let pruned: PruneResponse = client.post("/v1/pool/prune", &request)?;
            let text = prune_text(&pruned);
            Ok(output(&pruned, text))
        }
        LayerCommand::Export {
            name,
            from,
            output,
            compress,
        } => transfer::export(client, &name, from.as_deref(), output.as_deref(), compress),
        LayerCommand::Import {
            name,
            parent,
            input,
        } => transfer::import(client, &name, parent.as_deref(), input.as_deref()),
        LayerCommand::Checkpoint {
            name,
            checkpoint,
            labels,
        } => transfer::checkpoint(client, &name, checkpoint, labels.into_iter().collect()),
        LayerCommand::Reset { name, to } => transfer::reset(client, &name, to),
    }
}

/// One line per layer, then what came back.
fn prune_text(pruned: &PruneResponse) -> String {
    if pruned.removed.is_empty() {
        return "Nothing to prune: every matching layer is in use or has children.".to_string();
    }
    let mut lines: Vec<String> = pruned
        .removed
        .iter()
        .map(|layer| {
            let own = layer.exclusive.human();
            match layer.result {
                None => format!("Would remove layer {} ({own} of its own).", layer.name),
                Some(Removal::Removed) => {
                    format!("Removed layer {} ({own} of its own).", layer.name)
                }
                Some(Removal::Deferred) => format!(
                    "Layer {} is in use; it will be removed as soon as it is released.",
                    layer.name
                ),
            }
        })
        .collect();
    for name in &pruned.kept_in_use {
        lines.push(format!("Kept layer {name}: it came into use meanwhile."));
    }
    lines.push(if pruned.dry_run {
        "Dry run: nothing was removed.".to_string()
    } else {
        format!("Gave back {} of pool data.", pruned.given_back.human())
    });
    lines.join("\n")
}

/// The daemon resolves paths in its own working directory; make a relative one absolute here.
fn absolute(path: PathBuf) -> Result<PathBuf, ClientError> {
    std::path::absolute(&path).map_err(|e| ClientError::Api {
        status: 400,
        kind: ErrorKind::Invalid,
        message: format!("cannot make {} absolute: {e}", path.display()),
    })
}

/// Aligned columns, in the spirit of `docker ps`.
/// The layers as a table; `usage` adds what each maps, holds alone and shares.
fn layer_table(layers: &[Layer], usage: bool) -> String {
    if layers.is_empty() {
        return "No layers.".to_string();
    }
    let usage_columns = |cells: [String; 3]| if usage { cells.to_vec() } else { Vec::new() };
    let mut header: Vec<String> = ["NAME", "PARENT", "SIZE"].map(String::from).to_vec();
    header.extend(usage_columns(
        ["MAPPED", "EXCLUSIVE", "SHARED"].map(String::from),
    ));
    header.extend(["FS", "STATE", "DEVICE", "MOUNTED AT", "LABELS"].map(String::from));
    let mut rows = vec![header];
    for layer in layers {
        let sizes = layer
            .usage
            .as_ref()
            .map_or(["-".into(), "-".into(), "-".into()], |u| {
                [u.mapped.human(), u.exclusive.human(), u.shared.human()]
            });
        let mut row = vec![
            layer.name.to_string(),
            layer.parent.as_ref().map_or("-".into(), |p| p.to_string()),
            layer.size.to_string(),
        ];
        row.extend(usage_columns(sizes));
        row.extend([
            layer.filesystem.to_string(),
            state_word(layer),
            layer
                .device
                .as_ref()
                .map_or("-".into(), |d| d.display().to_string()),
            join_or_dash(layer.mounts.keys().map(|p| p.display().to_string())),
            join_or_dash(layer.labels.iter().map(|(k, v)| format!("{k}={v}"))),
        ]);
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn join_or_dash(items: impl Iterator<Item = String>) -> String {
    let joined: Vec<String> = items.collect();
    if joined.is_empty() {
        "-".to_string()
    } else {
        joined.join(",")
    }
}

fn state_word(layer: &Layer) -> String {
    let state = serde_json::to_value(layer.state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    if let Some(reason) = &layer.degraded {
        return format!("degraded: {reason}");
    }
    match (layer.missing, layer.deferred_removal, layer.committed) {
        (true, _, _) => "missing".into(),
        (_, true, _) => "removal deferred".into(),
        (_, _, true) if state == "ready" => "committed".into(),
        _ => state,
    }
}

fn describe_layer(layer: &Layer) -> String {
    let rows: Vec<(&str, String)> = vec![
        ("Name", layer.name.to_string()),
        ("State", state_word(layer)),
        (
            "Parent",
            layer.parent.as_ref().map_or("-".into(), |p| p.to_string()),
        ),
        (
            "Children",
            join_or_dash(layer.children.iter().map(|c| c.to_string())),
        ),
        ("Size", layer.size.to_string()),
        (
            "Filesystem",
            format!("{} ({})", layer.filesystem, layer.fs_uuid),
        ),
        ("Committed", layer.committed.to_string()),
        ("Thin id", layer.thin_id.to_string()),
        (
            "Device",
            layer
                .device
                .as_ref()
                .map_or("inactive".into(), |d| d.display().to_string()),
        ),
        (
            "Mounts",
            join_or_dash(layer.mounts.iter().map(|(p, m)| {
                format!(
                    "{} ({}, {} user{})",
                    p.display(),
                    if m.read_only { "ro" } else { "rw" },
                    m.refs,
                    if m.refs == 1 { "" } else { "s" }
                )
            })),
        ),
        (
            "Labels",
            join_or_dash(layer.labels.iter().map(|(k, v)| format!("{k}={v}"))),
        ),
        ("Created", format_created(layer.created_ns)),
    ];
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn format_created(ns: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_status_is_aligned_lines_with_every_label() {
        let status: PoolStatus = serde_json::from_value(serde_json::json!({
            "pool": {"name": "p", "device": "/dev/mapper/p", "backend": "loop",
                     "block_size": "64K", "data_source": "d", "metadata_source": "m"},
            "base_size": "10G", "filesystem": "ext4",
            "data": {"used": "1G", "total": "100G", "available": "99G"},
            "metadata": {"used": "1M", "total": "1G", "available": "1023M"},
            "min_free_space": "10%", "transaction_id": 3,
            "health": {"failed": false, "needs_check": false, "read_only": false,
                       "metadata_guard": false, "out_of_space": false, "when_full": "error"},
            "layers": 2, "deferred_deletions": 0, "discard_on_remove": true,
            "overcommit": {"virtual_size": "20G", "capacity": "100G", "ratio": 0.2, "limit": 3.0}
        }))
        .unwrap();
        let text = status_text(&status);
        for line in [
            "Pool name           p",
            "Backend             loop",
            "Data space          1.0G used of 100.0G (1.0%), 99.0G available",
            "Transaction id      3",
            "Health              ok",
            "When full           error (writes fail at once)",
            "Layers              2",
            "Overcommit          0.20x (20.0G virtual over 100.0G of data), limit 3x",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}
