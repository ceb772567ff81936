//! Mapping images with rbd-nbd (`pool.rbd.map = "nbd"`): a librbd process per device serves
//! it to the kernel's nbd driver, so an image maps at any depth of parents (the kernel's rbd
//! driver stops at 16).
//!
//! A mapping is a process, and it must outlive thinstackd: a restart of the daemon must not
//! fail every mounted layer. rbd-nbd forks to the background but keeps its parent's session,
//! so it is started by `setsid`, in a session of its own, where no signal to thinstackd's
//! process group or terminal reaches it. Under systemd, whose stop of a service kills every
//! process of its control group, each mapping is also started in a transient scope unit of
//! its own (`thinstack-nbd-….scope`), outside thinstackd's. Either way the next start finds
//! the mapping where rbd-nbd's own `list-mapped` does: `/sys/block/nbd<N>/pid`, and the
//! serving process's command line.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::map::{Driver, MapRequest, Mapped};
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::cmd::{self, Program};

/// How rbd-nbd reaches the cluster: what it is given besides the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClient {
    /// The cluster's configuration file.
    pub ceph_conf: PathBuf,
    /// The keyring, when not the one the configuration names.
    pub keyring: Option<PathBuf>,
}

/// How long rbd-nbd may take to follow an image's resize, and an unmapped process to go.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

/// Whether the kernel has the nbd driver (built in or loaded).
pub fn available() -> bool {
    Path::new("/sys/module/nbd").exists()
}

/// Whether rbd-nbd is installed; the error says what to install.
pub fn installed() -> Result<()> {
    Program::RbdNbd.path().map(drop)
}

/// Map `request` with rbd-nbd; returns the new mapping once its device serves.
pub fn map(request: &MapRequest, client: &NbdClient) -> Result<Mapped> {
    if !available() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "the kernel has no nbd driver (/sys/module/nbd is missing), which pool.rbd.map = \
             \"nbd\" maps images with: load it with `modprobe nbd`",
        ));
    }
    // `--wait`: should setsid have to fork (it does for a process group leader), it still
    // returns rbd-nbd's status.
    let mut detached = vec![
        "--wait".to_string(),
        Program::RbdNbd.path()?.display().to_string(),
    ];
    detached.extend(map_args(request, client));
    let output = if under_systemd() {
        let mut scoped = scope_args(&unit_name(request));
        scoped.push(Program::Setsid.path()?.display().to_string());
        scoped.extend(detached);
        cmd::run(Program::SystemdRun, scoped)
    } else {
        cmd::run(Program::Setsid, detached)
    }
    .map_err(|e| e.context(format!("mapping {} with rbd-nbd", request.spec())))?;
    let printed = String::from_utf8_lossy(&output.stdout);
    let id = printed
        .lines()
        .find_map(|line| line.trim().strip_prefix("/dev/nbd")?.parse::<u32>().ok())
        .ok_or_else(|| {
            Error::inconsistent(format!(
                "mapping {}: rbd-nbd printed no device ({printed:?})",
                request.spec()
            ))
        })?;
    // rbd-nbd prints the device once it is set up; the driver's `pid` attribute may come a
    // moment after.
    wait_for(
        &format!(
            "an rbd-nbd process to serve /dev/nbd{id} ({})",
            request.spec()
        ),
        || read_mapping(id),
    )
}

/// rbd-nbd's arguments to map `request`, its image spec last.
fn map_args(request: &MapRequest, client: &NbdClient) -> Vec<String> {
    let mut args = vec![
        "map".to_string(),
        "--conf".to_string(),
        client.ceph_conf.display().to_string(),
        "--id".to_string(),
        request.client.clone(),
    ];
    if let Some(keyring) = &client.keyring {
        args.extend(["--keyring".to_string(), keyring.display().to_string()]);
    }
    if request.read_only {
        args.push("--read-only".to_string());
    }
    if request.exclusive {
        args.push("--exclusive".to_string());
    }
    args.push(request.spec());
    args
}

/// Whether systemd is the init system (as `sd_booted()` tells it).
fn under_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `systemd-run`'s arguments that start the command after them in a scope unit `unit`, out of
/// thinstackd's control group, collected when its process ends.
fn scope_args(unit: &str) -> Vec<String> {
    [
        "--scope",
        "--quiet",
        "--collect",
        &format!("--unit={unit}"),
        "--description=rbd-nbd mapping of thinstack",
    ]
    .map(str::to_string)
    .to_vec()
}

/// The scope unit of `request`'s mapping: the client and the image spec, in the characters a
/// unit name allows.
fn unit_name(request: &MapRequest) -> String {
    let spec: String = format!("{}-{}", request.client, request.spec())
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '.' | '-' => c,
            _ => '_',
        })
        .collect();
    format!("thinstack-nbd-{spec}")
}

/// Every image rbd-nbd serves on this host.
pub fn mapped() -> Result<Vec<Mapped>> {
    let entries = fs::read_dir("/sys/block").map_err(|e| Error::io("reading /sys/block", e))?;
    let mut list: Vec<Mapped> = entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let id = name.to_str()?.strip_prefix("nbd")?.parse().ok()?;
            read_mapping(id)
        })
        .collect();
    list.sort_by_key(|m| m.id);
    Ok(list)
}

/// `/dev/nbd<id>`'s mapping: the process serving it, when that is rbd-nbd.
fn read_mapping(id: u32) -> Option<Mapped> {
    let pid = server_pid(id)?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut mapping = parse_command_line(&args)?;
    mapping.id = id;
    Some(mapping)
}

/// Options of rbd-nbd (and of every Ceph program) that take a value.
const VALUE_OPTIONS: [&str; 19] = [
    "--conf",
    "-c",
    "--id",
    "-i",
    "--name",
    "-n",
    "--keyring",
    "-k",
    "--cluster",
    "--device",
    "--io-timeout",
    "--reattach-timeout",
    "--nbds_max",
    "--max_part",
    "--cookie",
    "--quiesce-hook",
    "--encryption-format",
    "--encryption-passphrase-file",
    "--setuser",
];

/// What an rbd-nbd command line (`rbd-nbd [options] map|attach [options] SPEC`) maps: the
/// spec (`pool/[namespace/]image[@snapshot]`), read-only or not, and the client. `None` for
/// any other program or command.
fn parse_command_line(args: &[String]) -> Option<Mapped> {
    let program = Path::new(args.first()?).file_name()?.to_str()?;
    if program != "rbd-nbd" {
        return None;
    }
    let (mut command, mut spec) = (None, None);
    let (mut read_only, mut client) = (false, "admin".to_string());
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let (option, inline) = match arg.split_once('=') {
            Some((option, value)) if arg.starts_with("--") => (option, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        if option == "--read-only" {
            read_only = true;
        } else if VALUE_OPTIONS.contains(&option) {
            let value = inline.or_else(|| rest.next().cloned())?;
            match option {
                "--id" | "-i" => client = value,
                "--name" | "-n" => client = value.strip_prefix("client.")?.to_string(),
                _ => {}
            }
        } else if option.starts_with('-') {
            // A flag without a value (--exclusive, --try-netlink, ...): nothing to read.
        } else if command.is_none() {
            command = Some(arg.clone());
        } else {
            spec = Some(arg.clone());
        }
    }
    if !matches!(command.as_deref(), Some("map" | "attach")) {
        return None;
    }
    let spec = spec?;
    let (image_spec, snapshot) = match spec.split_once('@') {
        Some((image, snapshot)) => (image, snapshot.to_string()),
        None => (spec.as_str(), "-".to_string()),
    };
    let parts: Vec<&str> = image_spec.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [image] => ("rbd", "", *image),
        [pool, image] => (*pool, "", *image),
        [pool, namespace, image] => (*pool, *namespace, *image),
        _ => return None,
    };
    Some(Mapped {
        driver: Driver::Nbd,
        id: 0,
        pool: pool.to_string(),
        namespace: namespace.to_string(),
        image: image.to_string(),
        snapshot,
        read_only,
        client,
    })
}

/// Unmap `mapping`; `Busy` while its device is mounted or held open. The nbd driver would
/// disconnect a mounted device (the rbd driver refuses), so this looks first.
pub fn unmap(mapping: &Mapped) -> Result<()> {
    let node = mapping.node();
    if crate::kernel::blockdev::is_held(&node)? {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "unmapping {}: it is mounted or held open; unmount it first",
                node.display()
            ),
        ));
    }
    let server = server_pid(mapping.id);
    cmd::run(Program::RbdNbd, [Path::new("unmap"), node.as_path()])
        .map_err(|e| e.context(format!("unmapping {}", node.display())))?;
    // rbd-nbd's unmap returns once the device is disconnected; its process, which still has
    // the image open, ends after: wait for it, so the image is free when this returns.
    wait_until(&format!("rbd-nbd to let go of {}", node.display()), || {
        read_mapping(mapping.id).is_none() && !server.is_some_and(running)
    })
}

/// The pid of the process serving `/dev/nbd<id>`, if one does.
fn server_pid(id: u32) -> Option<u32> {
    fs::read_to_string(format!("/sys/block/nbd{id}/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` is alive (a zombie is not: it has let go of everything).
fn running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Wait until the device of `mapping` is `bytes` long: rbd-nbd learns of an image's resize
/// from the image's header watch and resizes the device itself.
pub fn refresh(mapping: &Mapped, bytes: u64) -> Result<()> {
    let size = format!("/sys/block/nbd{}/size", mapping.id);
    wait_until(
        &format!(
            "rbd-nbd to grow {} to {bytes} bytes",
            mapping.node().display()
        ),
        || {
            fs::read_to_string(&size)
                .ok()
                .and_then(|sectors| sectors.trim().parse::<u64>().ok())
                .is_some_and(|sectors| sectors * 512 >= bytes)
        },
    )
}

fn wait_until(what: &str, done: impl Fn() -> bool) -> Result<()> {
    wait_for(what, || done().then_some(()))
}

/// What `found` gives once it gives something, within [`SETTLE_WAIT`].
fn wait_for<T>(what: &str, found: impl Fn() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        if let Some(value) = found() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Kernel,
                format!(
                    "waited {}s for {what}; see the rbd-nbd process's log",
                    SETTLE_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn request(read_only: bool) -> MapRequest {
        MapRequest {
            monitors: String::new(),
            client: "host-b".into(),
            secret: String::new(),
            pool: "rbd".into(),
            namespace: Some("ci".into()),
            image: "tp.thin-5".into(),
            read_only,
            exclusive: false,
        }
    }

    #[test]
    fn what_is_mapped_is_read_back_from_the_command_line_it_was_mapped_with() {
        let client = NbdClient {
            ceph_conf: "/etc/ceph/ceph.conf".into(),
            keyring: Some("/etc/ceph/k".into()),
        };
        for read_only in [false, true] {
            let mut line = vec!["/usr/bin/rbd-nbd".to_string()];
            line.extend(map_args(&request(read_only), &client));
            let mapping = parse_command_line(&line).unwrap();
            assert_eq!(
                (
                    mapping.pool.as_str(),
                    mapping.namespace.as_str(),
                    mapping.image.as_str(),
                    mapping.snapshot.as_str()
                ),
                ("rbd", "ci", "tp.thin-5", "-")
            );
            assert_eq!(mapping.client, "host-b");
            assert_eq!(mapping.read_only, read_only);
        }
    }

    #[test]
    fn other_programs_and_other_forms_are_read_as_rbd_nbd_reads_them() {
        let m = parse_command_line(&args("rbd-nbd -n client.x --device /dev/nbd3 map p/img@s1"))
            .unwrap();
        assert_eq!((m.pool.as_str(), m.image.as_str()), ("p", "img"));
        assert_eq!((m.snapshot.as_str(), m.client.as_str()), ("s1", "x"));
        let m = parse_command_line(&args("rbd-nbd map img")).unwrap();
        assert_eq!((m.pool.as_str(), m.client.as_str()), ("rbd", "admin"));
        assert!(parse_command_line(&args("rbd-nbd list-mapped")).is_none());
        assert!(parse_command_line(&args("qemu-nbd map p/img")).is_none());
        assert!(parse_command_line(&args("rbd-nbd map a/b/c/d")).is_none());
    }

    #[test]
    fn a_live_process_is_running_and_a_gone_one_is_not() {
        assert!(running(std::process::id()));
        assert!(!running(u32::MAX));
    }

    #[test]
    fn a_mapping_gets_a_scope_unit_named_after_its_client_and_image() {
        assert_eq!(
            unit_name(&request(false)),
            "thinstack-nbd-host-b-rbd_ci_tp.thin-5"
        );
        assert!(scope_args("u").contains(&"--scope".to_string()));
    }
}
