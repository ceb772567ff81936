//! Mapping images to block devices with the kernel's rbd driver, through its sysfs interface:
//! `/sys/bus/rbd/add_single_major` to map, `remove_single_major` to unmap, and
//! `/sys/bus/rbd/devices/<id>/` to see what is mapped. The `rbd map` command does the same
//! writes, after a process start and a cluster connection of its own.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

const BUS: &str = "/sys/bus/rbd";

/// What to map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRequest {
    /// The monitors' messenger v1 addresses, comma-separated.
    pub monitors: String,
    /// The cephx client, without `client.`.
    pub client: String,
    /// Its secret key.
    pub secret: String,
    /// The pool.
    pub pool: String,
    /// The namespace, if any.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// Map read-only.
    pub read_only: bool,
    /// Take the image's exclusive lock at map time and never hand it over while mapped, so
    /// no other client (another host) writes it meanwhile.
    pub exclusive: bool,
}

impl MapRequest {
    /// The line the driver takes: `<monitors> <options> <pool> <image> <snapshot>`.
    fn line(&self) -> String {
        let mut options = format!("name={},secret={}", self.client, self.secret);
        if let Some(namespace) = &self.namespace {
            options.push_str(&format!(",_pool_ns={namespace}"));
        }
        if self.read_only {
            options.push_str(",read_only");
        }
        if self.exclusive {
            options.push_str(",exclusive");
        }
        format!("{} {options} {} {} -", self.monitors, self.pool, self.image)
    }

    /// `pool/[namespace/]image`, as the `rbd` command names it.
    pub fn spec(&self) -> String {
        match &self.namespace {
            Some(namespace) => format!("{}/{namespace}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

/// Which kernel driver serves a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// The kernel's rbd driver (`/dev/rbd<id>`).
    Krbd,
    /// The nbd driver, served by an rbd-nbd process (`/dev/nbd<id>`).
    Nbd,
}

/// A mapped image, as sysfs tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The driver that serves it.
    pub driver: Driver,
    /// The driver's number of the device (`/dev/rbd<id>`, `/dev/nbd<id>`).
    pub id: u32,
    /// The pool.
    pub pool: String,
    /// The namespace ("" for none).
    pub namespace: String,
    /// The image.
    pub image: String,
    /// `-` for the image's head, or the mapped snapshot.
    pub snapshot: String,
    /// Whether it was mapped read-only.
    pub read_only: bool,
    /// The Ceph client it was mapped as (`name=`; "" when the driver does not say): two
    /// daemons on one host, each its own client, tell their mappings apart by it.
    pub client: String,
}

impl Mapped {
    /// The device's name: `rbd<id>` or `nbd<id>`.
    pub fn device_name(&self) -> String {
        match self.driver {
            Driver::Krbd => format!("rbd{}", self.id),
            Driver::Nbd => format!("nbd{}", self.id),
        }
    }

    /// `/dev/rbd<id>` or `/dev/nbd<id>`.
    pub fn node(&self) -> PathBuf {
        Path::new("/dev").join(self.device_name())
    }
}

/// Whether the kernel has the rbd driver.
pub fn available() -> bool {
    Path::new(BUS).join("add_single_major").exists()
}

fn driver_missing() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "the kernel has no rbd driver (/sys/bus/rbd is missing): load it with `modprobe rbd`",
    )
}

/// Map `request`; returns the new mapping. The device node is there when this returns: the
/// driver makes the disk before the write to sysfs completes, and devtmpfs its node.
pub fn map(request: &MapRequest) -> Result<Mapped> {
    if !available() {
        return Err(driver_missing());
    }
    // The new device is the image's mapping that was not there before. Only this image's
    // are compared: an id another image's unmap freed meanwhile may be the new one's.
    let namespace = request.namespace.clone().unwrap_or_default();
    let of_image = |m: &Mapped| {
        m.pool == request.pool
            && m.image == request.image
            && m.namespace == namespace
            && m.snapshot == "-"
    };
    let before: Vec<u32> = mapped()?
        .iter()
        .filter(|m| of_image(m))
        .map(|m| m.id)
        .collect();
    write_bus("add_single_major", &request.line())
        .map_err(|e| e.context(format!("mapping {}", request.spec())))?;
    let found = mapped()?
        .into_iter()
        .find(|m| of_image(m) && !before.contains(&m.id));
    found.ok_or_else(|| {
        Error::inconsistent(format!(
            "mapping {}: the kernel accepted it but no new rbd device shows it in {BUS}/devices",
            request.spec()
        ))
    })
}

/// How long an unmap that meets EBUSY on an unmounted device waits for udev to finish with
/// it: the last close of a written device makes the kernel send a change event, and udev's
/// blkid holds the device open while it probes (as `rbd unmap` knows: it settles udev and
/// retries).
const UDEV_PROBE_WAIT: Duration = Duration::from_secs(30);

/// Unmap `/dev/rbd<id>`; `Busy` while it is mounted, or held open by anything but udev's
/// probe.
pub fn unmap(id: u32) -> Result<()> {
    let node = PathBuf::from(format!("/dev/rbd{id}"));
    let deadline = Instant::now() + UDEV_PROBE_WAIT;
    loop {
        match write_bus("remove_single_major", &id.to_string()) {
            Err(e)
                if e.kind() == ErrorKind::Busy && Instant::now() < deadline && !mounted(&node) =>
            {
                wait_for_udev_queue(deadline);
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map_err(|e| e.context(format!("unmapping {}", node.display()))),
        }
    }
}

/// Whether the device at `node` is mounted anywhere.
fn mounted(node: &Path) -> bool {
    crate::kernel::blockdev::block_device(node)
        .and_then(crate::kernel::mounts::of_device)
        .map(|mounts| !mounts.is_empty())
        .unwrap_or(false)
}

/// Wait (until `deadline`) for udev's event queue to empty: `/run/udev/queue` exists while
/// events are queued or running, which is what `udevadm settle` waits on.
fn wait_for_udev_queue(deadline: Instant) {
    let queue = Path::new("/run/udev/queue");
    while queue.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every image the kernel has mapped.
pub fn mapped() -> Result<Vec<Mapped>> {
    let dir = Path::new(BUS).join("devices");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    let mut list = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A device being unmapped meanwhile loses its attributes: skip it.
        let Ok(mapping) = read_mapping(&entry.path(), id) else {
            continue;
        };
        list.push(mapping);
    }
    list.sort_by_key(|m| m.id);
    Ok(list)
}

fn read_mapping(dir: &Path, id: u32) -> std::io::Result<Mapped> {
    let attr = |name: &str| -> std::io::Result<String> {
        Ok(fs::read_to_string(dir.join(name))?.trim_end().to_owned())
    };
    let namespace = attr("pool_ns").unwrap_or_default();
    let read_only = fs::read_to_string(format!("/sys/block/rbd{id}/ro"))
        .map(|t| t.trim() == "1")
        .unwrap_or(false);
    Ok(Mapped {
        driver: Driver::Krbd,
        id,
        pool: attr("pool")?,
        namespace,
        image: attr("name")?,
        snapshot: attr("current_snap")?,
        read_only,
        client: attr("config_info")
            .map(|info| client_of(&info))
            .unwrap_or_default(),
    })
}

/// The client name in a mapping's `config_info` (what was written to `add`: monitors,
/// options, pool, image, snapshot); the default `admin` when the options name none.
fn client_of(config_info: &str) -> String {
    let Some(options) = config_info.split_whitespace().nth(1) else {
        return String::new();
    };
    options
        .split(',')
        .find_map(|option| option.strip_prefix("name="))
        .unwrap_or("admin")
        .to_string()
}

/// Write `line` to one of the bus's control files, in one write(2) as the driver requires.
fn write_bus(file: &str, line: &str) -> Result<()> {
    let path = Path::new(BUS).join(file);
    let mut handle = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    handle.write_all(line.as_bytes()).map_err(|e| {
        let errno = e.raw_os_error().unwrap_or(0);
        Error::ceph(
            &format!("writing {}", path.display()),
            "(see dmesg for the driver's reason)",
            -errno,
        )
    })
}

/// Refresh a mapping's size after the image was resized (the driver also learns it from the
/// image's header watch, but later).
pub fn refresh(id: u32) -> Result<()> {
    let path = Path::new(BUS)
        .join("devices")
        .join(id.to_string())
        .join("refresh");
    fs::write(&path, "1").map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_read_from_the_options_of_the_mapping() {
        let info = "127.0.0.1:6789 name=host-b,secret=QUJD,_pool_ns=ns rbd img -";
        assert_eq!(client_of(info), "host-b");
        assert_eq!(client_of("127.0.0.1:6789 secret=QUJD rbd img -"), "admin");
        assert_eq!(client_of(""), "");
    }
}
