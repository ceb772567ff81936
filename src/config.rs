//! The configuration file: one TOML document, every key optional, every value checked.
//!
//! A value that is wrong is reported with the file, line and column, the key's full path
//! (`pool.block_size`), what was wrong and what is allowed. Unknown keys are refused, so a typo
//! never silently means "default".

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::names::PoolName;
use crate::units::{ByteSize, Percent, Ratio, Timeout};
use crate::vocab::FsType;
use crate::vocab::WhenFull;

/// Where the daemon looks for its configuration when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/thinstack/thinstack.toml";

/// Smallest and largest pool block size the kernel accepts (`thin-provisioning.rst`:
/// 64 KiB to 1 GiB, a multiple of 64 KiB).
pub const BLOCK_SIZE_MIN: ByteSize = ByteSize::from_bytes(64 * 1024);
/// See [`BLOCK_SIZE_MIN`].
pub const BLOCK_SIZE_MAX: ByteSize = ByteSize::gib(1);

/// Metadata device bounds: the kernel uses at most about 16 GiB of it
/// (`THIN_METADATA_MAX_SECTORS` in `dm-thin-metadata.h`); below 2 MiB it cannot be formatted.
pub const METADATA_SIZE_MIN: ByteSize = ByteSize::mib(2);
/// See [`METADATA_SIZE_MIN`].
pub const METADATA_SIZE_MAX: ByteSize = ByteSize::gib(16);

/// mkfs.xfs (xfsprogs 5.19 and later) refuses new filesystems below 300 MiB.
pub const XFS_SIZE_MIN: ByteSize = ByteSize::mib(300);

/// Smallest layer size accepted for ext4.
pub const EXT4_SIZE_MIN: ByteSize = ByteSize::mib(16);

/// The whole configuration, with defaults for everything absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Records, loop files and default mount points.
    pub state_dir: AbsolutePath,
    /// The API socket.
    pub socket: AbsolutePath,
    /// The thin pool.
    pub pool: PoolConfig,
    /// Defaults for layers.
    pub layers: LayersConfig,
    /// The daemon.
    pub daemon: DaemonConfig,
    /// containerd's snapshot service.
    pub containerd: ContainerdConfig,
}

/// `[containerd]`: thinstackd as a containerd proxy snapshotter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    /// Serve containerd's snapshot service (gRPC) on `socket`.
    pub enabled: bool,
    /// The gRPC socket, for containerd's `[proxy_plugins.<name>] address`.
    pub socket: AbsolutePath,
    /// A group whose members may use the socket (mode 0660); empty: root only (mode 0600).
    pub socket_group: String,
    /// Virtual size of a new root snapshot; default: `layers.base_size`.
    pub base_size: Option<ByteSize>,
    /// Filesystem of new root snapshots; default: `layers.filesystem`.
    pub filesystem: Option<FsType>,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            enabled: false,
            socket: AbsolutePath(PathBuf::from("/run/thinstack/containerd.sock")),
            socket_group: String::new(),
            base_size: None,
            filesystem: None,
        }
    }
}

impl Config {
    /// The size and filesystem of new containerd root snapshots.
    pub fn containerd_root(&self) -> (ByteSize, FsType) {
        (
            self.containerd.base_size.unwrap_or(self.layers.base_size),
            self.containerd.filesystem.unwrap_or(self.layers.filesystem),
        )
    }
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// A group whose members may use the socket (mode 0660); empty: root only (mode 0600).
    pub socket_group: String,
    /// Log level when `RUST_LOG` is not set: error, warn, info, debug or trace.
    pub log_level: LogLevel,
    /// Unmount and deactivate every layer when the daemon stops.
    pub deactivate_on_shutdown: bool,
    /// Seconds between checks of pool space and retries of deferred removals.
    pub watch_interval_seconds: u32,
    /// Most connections open at once on the API socket, and apart on containerd's; a client
    /// beyond it is refused at once, so idle or stalled clients cannot use up the daemon.
    pub max_connections: u32,
    /// How long a client may take to send a request's head (an idle connection is closed
    /// after it too) and then, again, its body.
    pub request_timeout: Timeout,
    /// At SIGTERM, how long open connections get to finish before they are cut. Operations
    /// already started always finish, however long they take.
    pub shutdown_timeout: Timeout,
    /// An address and port (such as `127.0.0.1:9464`) where `/metrics`, and nothing else, is
    /// served over TCP for a Prometheus scraper; none: only on the API socket.
    #[serde(deserialize_with = "listen_address")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// An IP address and port, with an error that says how to write one.
fn listen_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<std::net::SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP address and port; write one such as \"127.0.0.1:9464\" (or \"[::1]:9464\"), or leave the key out to serve metrics on the API socket only"
        ))
    })
}

/// `daemon.max_connections` bounds: at least one client; at most the file descriptors the
/// shipped systemd unit gives the daemon (`LimitNOFILE=65536`).
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<u32> = 1..=65536;

/// `layers.trim_interval` bounds: a trim reads every free block's bitmap, so not more often
/// than a minute; a week is the longest that still means "regularly".
const TRIM_INTERVAL_RANGE: std::ops::RangeInclusive<Timeout> =
    Timeout::secs(60)..=Timeout::secs(7 * 24 * 3600);

/// `daemon.request_timeout` bounds: a second is the least a real client needs; an hour is
/// already far more than any request of a few kilobytes takes.
pub const REQUEST_TIMEOUT_RANGE: std::ops::RangeInclusive<Timeout> =
    Timeout::secs(1)..=Timeout::secs(3600);

/// `daemon.shutdown_timeout` bounds: 0 cuts open connections at once.
pub const SHUTDOWN_TIMEOUT_RANGE: std::ops::RangeInclusive<Timeout> =
    Timeout::secs(0)..=Timeout::secs(3600);

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket_group: String::new(),
            log_level: LogLevel::Info,
            deactivate_on_shutdown: false,
            watch_interval_seconds: 5,
            max_connections: 256,
            request_timeout: Timeout::secs(30),
            shutdown_timeout: Timeout::secs(30),
            metrics_listen: None,
        }
    }
}

/// `daemon.log_level`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// What happened (the default).
    Info,
    /// Details for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level as a tracing filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `[pool]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Device-mapper pool name (prefixed with `thinstack-1-`).
    pub name: PoolName,
    /// Where the pool's data and metadata live.
    pub backend: Backend,
    /// The pool's allocation unit.
    pub block_size: BlockSize,
    /// Refuse new layers when free data or metadata is below this share.
    pub min_free_space: Percent,
    /// Refuse a create or resize that would make the layers' virtual sizes, summed, more than
    /// this many times the pool's data (its largest size where thinstack grows it); 0: no
    /// limit.
    pub max_overcommit: Ratio,
    /// What writes meet when the pool's data is full.
    pub when_full: WhenFull,
    /// `[pool.loop]`
    #[serde(rename = "loop")]
    pub loop_files: LoopConfig,
    /// `[pool.lvm]`
    pub lvm: LvmConfig,
    /// `[pool.existing]`
    pub existing: ExistingConfig,
    /// `[pool.devices]`
    pub devices: DevicesConfig,
    /// `[pool.rbd]`
    pub rbd: RbdConfig,
}

/// `pool.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Sparse files under the state directory attached to loop devices.
    Loop,
    /// An LVM thin pool that thinstack makes on raw block devices ("direct-lvm").
    Lvm,
    /// A thin pool someone else made, adopted as it is.
    Existing,
    /// A thin pool that thinstack makes directly on a raw data and a raw metadata device.
    Devices,
    /// Ceph RBD images: a layer is an image, a child a clone of its parent's snapshot.
    Rbd,
}

impl Backend {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Loop => "loop",
            Backend::Lvm => "lvm",
            Backend::Existing => "existing",
            Backend::Devices => "devices",
            Backend::Rbd => "rbd",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[pool.lvm]`: the volume group and thin pool made on `devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LvmConfig {
    /// Raw block devices that become the volume group's physical volumes.
    pub devices: Vec<AbsolutePath>,
    /// The volume group made on them.
    pub volume_group: VolumeGroupName,
    /// Share of the volume group given to the pool's data at creation.
    pub data_percent: Percent,
    /// Share of the volume group given to the pool's metadata at creation.
    pub metadata_percent: Percent,
    /// The pool's chunk (block) size; it replaces `pool.block_size` for this backend.
    pub chunk_size: BlockSize,
    /// Extend the pool when data or metadata use crosses this share; 100% = never.
    pub autoextend_threshold: Percent,
    /// Extend by this share of the current size each time.
    pub autoextend_percent: Percent,
    /// Wipe filesystem, partition and RAID signatures found on `devices` instead of refusing.
    pub force: bool,
}

/// `[pool.existing]`: a thin pool made by someone else.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExistingConfig {
    /// The pool's device-mapper name, or its `/dev/mapper/<name>` path.
    pub device: String,
}

/// `[pool.devices]`: raw devices the pool is made on directly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// The block device for the pool's data.
    pub data: Option<AbsolutePath>,
    /// The block device for the pool's metadata (2M to 16G are used).
    pub metadata: Option<AbsolutePath>,
    /// Wipe signatures found on the devices instead of refusing.
    pub force: bool,
}

/// `[pool.rbd]`: the Ceph cluster, pool and client of an `rbd` pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RbdConfig {
    /// The RBD pool the images live in (required).
    pub pool: String,
    /// An RBD namespace in that pool, so that several fleets can share one pool.
    pub namespace: String,
    /// The cluster's configuration file.
    pub ceph_conf: AbsolutePath,
    /// The cephx client, without `client.`.
    pub client: String,
    /// A keyring holding the client's key, instead of the ones `ceph_conf` names.
    pub keyring: Option<AbsolutePath>,
    /// How a layer is mapped to a block device.
    pub map: RbdMap,
    /// The most parents a layer's image may have: a clone made deeper is flattened (its
    /// parents' data copied into it) when it is made. The kernel's rbd driver maps at most 16;
    /// rbd-nbd has no limit, and this key at most [`RBD_NBD_MAX_FLATTEN_DEPTH`].
    pub flatten_depth: u32,
    /// How long one call to the cluster may take before it fails.
    pub timeout: Timeout,
}

impl Default for RbdConfig {
    fn default() -> Self {
        RbdConfig {
            pool: String::new(),
            namespace: String::new(),
            ceph_conf: AbsolutePath::new("/etc/ceph/ceph.conf").expect("an absolute path"),
            client: "admin".to_string(),
            keyring: None,
            map: RbdMap::Krbd,
            flatten_depth: RBD_KERNEL_MAX_PARENTS,
            timeout: Timeout::secs(60),
        }
    }
}

/// The longest chain of parents the kernel's rbd driver maps (`rbd: parent chain is too long`
/// beyond it).
pub const RBD_KERNEL_MAX_PARENTS: u32 = 16;

/// The deepest `flatten_depth` with rbd-nbd, which maps any depth: librbd opens every parent
/// with an image and reads through them for what the image lacks, so a chain is still
/// flattened somewhere.
pub const RBD_NBD_MAX_FLATTEN_DEPTH: u32 = 64;

/// `pool.rbd.map`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RbdMap {
    /// The kernel's rbd driver (at most 16 parents in a chain).
    Krbd,
    /// rbd-nbd: a userspace librbd process per device, with no depth limit.
    Nbd,
}

/// A volume group name as LVM accepts it: letters, digits, `+_.-`, not starting with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct VolumeGroupName(String);

impl VolumeGroupName {
    /// Validate `name` by LVM's rules (`man lvm`, "VALID NAMES").
    pub fn new(name: &str) -> std::result::Result<Self, String> {
        let valid_chars = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-'));
        if name.is_empty()
            || name.len() > 127
            || !valid_chars
            || name.starts_with('-')
            || name == "."
            || name == ".."
        {
            return Err(format!(
                "{name:?} is not a volume group name; use 1 to 127 letters, digits and '+_.-', not starting with '-'"
            ));
        }
        Ok(VolumeGroupName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for VolumeGroupName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        VolumeGroupName::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for VolumeGroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[pool.loop]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Size of the sparse data file.
    pub data_size: ByteSize,
    /// Size of the sparse metadata file.
    pub metadata_size: MetadataSize,
    /// Grow the files when data or metadata use crosses this share; 100% = never.
    pub autoextend_threshold: Percent,
    /// Grow by this share of the current size each time.
    pub autoextend_percent: Percent,
    /// The data file never grows past this.
    pub data_size_max: ByteSize,
    /// The metadata file never grows past this.
    pub metadata_size_max: MetadataSize,
}

/// `[layers]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LayersConfig {
    /// Virtual size of a new base layer.
    pub base_size: ByteSize,
    /// Filesystem made on base layers.
    pub filesystem: FsType,
    /// Extra arguments for mkfs, appended after thinstack's own.
    pub mkfs_args: Vec<String>,
    /// Extra mount options, one per element. Layer mounts are `nodev,nosuid` unless these
    /// say `dev` or `suid`.
    pub mount_options: Vec<MountOption>,
    /// Directories beneath which a client may mount a layer (`layer mount --target`), besides
    /// `<state_dir>/mnt`. Empty: only there.
    pub mount_roots: Vec<AbsolutePath>,
    /// Discard a layer's blocks before deleting it, so the pool passes the discards down and
    /// a loop file (or thin-provisioned disk) gets the space back.
    pub discard_on_remove: bool,
    /// Wait for udev after a layer device appears or changes, so `/dev/mapper/<name>`
    /// exists when the call returns (as dmsetup does). thinstack itself needs no udev.
    pub udev_sync: bool,
    /// Trim the layers mounted read-write this often, so blocks their files freed go back
    /// to the pool; none: only `layer trim`.
    pub trim_interval: Option<Timeout>,
}

impl LayersConfig {
    /// How layer devices are announced to udev.
    pub fn udev(&self) -> crate::kernel::dm::Udev {
        use crate::kernel::dm::Udev;
        if self.udev_sync {
            Udev::WaitPrivate
        } else {
            Udev::NoWait
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: AbsolutePath(PathBuf::from("/var/lib/thinstack")),
            socket: AbsolutePath(PathBuf::from("/run/thinstack/thinstack.sock")),
            pool: PoolConfig::default(),
            layers: LayersConfig::default(),
            daemon: DaemonConfig::default(),
            containerd: ContainerdConfig::default(),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            name: PoolName::new("thinstack").expect("valid default"),
            backend: Backend::Loop,
            block_size: BlockSize(BLOCK_SIZE_MIN),
            min_free_space: Percent::new(10).expect("valid default"),
            max_overcommit: Ratio::NONE,
            when_full: WhenFull::default(),
            loop_files: LoopConfig::default(),
            lvm: LvmConfig::default(),
            existing: ExistingConfig::default(),
            devices: DevicesConfig::default(),
            rbd: RbdConfig::default(),
        }
    }
}

impl Default for LvmConfig {
    fn default() -> Self {
        LvmConfig {
            devices: Vec::new(),
            volume_group: VolumeGroupName("thinstack".to_string()),
            data_percent: Percent::new(95).expect("valid default"),
            metadata_percent: Percent::new(1).expect("valid default"),
            chunk_size: BlockSize(ByteSize::from_bytes(512 * 1024)),
            autoextend_threshold: Percent::new(80).expect("valid default"),
            autoextend_percent: Percent::new(20).expect("valid default"),
            force: false,
        }
    }
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            data_size: ByteSize::gib(100),
            metadata_size: MetadataSize(ByteSize::gib(2)),
            autoextend_threshold: Percent::new(80).expect("valid default"),
            autoextend_percent: Percent::new(20).expect("valid default"),
            data_size_max: ByteSize::gib(1024),
            metadata_size_max: MetadataSize(ByteSize::gib(16)),
        }
    }
}

impl Default for LayersConfig {
    fn default() -> Self {
        LayersConfig {
            base_size: ByteSize::gib(10),
            filesystem: FsType::Ext4,
            mkfs_args: Vec::new(),
            mount_options: Vec::new(),
            mount_roots: Vec::new(),
            discard_on_remove: true,
            udev_sync: false,
            trim_interval: None,
        }
    }
}

/// An absolute path (relative paths in a daemon's config depend on where it was started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AbsolutePath(PathBuf);

impl AbsolutePath {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// An absolute path; relative ones, and ones with `..`, are refused.
    pub fn new(path: impl Into<PathBuf>) -> std::result::Result<Self, String> {
        let path = path.into();
        if !path.is_absolute() {
            return Err(format!(
                "{} is a relative path; write an absolute path such as \"/var/lib/thinstack\"",
                path.display()
            ));
        }
        if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!(
                "{} contains \"..\"; write the path without it",
                path.display()
            ));
        }
        Ok(AbsolutePath(path))
    }
}

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        AbsolutePath::new(PathBuf::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The pool's block size: a multiple of 64K from 64K to 1G.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BlockSize(ByteSize);

impl BlockSize {
    /// The size.
    pub fn size(self) -> ByteSize {
        self.0
    }
}

impl BlockSize {
    /// A block size; refused unless a multiple of 64K from 64K to 1G.
    pub fn new(size: ByteSize) -> std::result::Result<Self, String> {
        let in_range = (BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&size);
        if !in_range || !size.is_multiple_of(BLOCK_SIZE_MIN) {
            return Err(format!(
                "block size {size} is not allowed; it must be a multiple of 64K from 64K to 1G (such as \"64K\", \"512K\", \"1M\")"
            ));
        }
        Ok(BlockSize(size))
    }
}

impl<'de> Deserialize<'de> for BlockSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        BlockSize::new(ByteSize::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The metadata area's size: 2M to 16G.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MetadataSize(ByteSize);

impl MetadataSize {
    /// The size.
    pub fn size(self) -> ByteSize {
        self.0
    }
}

impl MetadataSize {
    /// A metadata size; refused outside 2M to 16G.
    pub fn new(size: ByteSize) -> std::result::Result<Self, String> {
        if !(METADATA_SIZE_MIN..=METADATA_SIZE_MAX).contains(&size) {
            return Err(format!(
                "metadata size {size} is out of range; it must be from 2M to 16G (the kernel uses at most about 16G)"
            ));
        }
        Ok(MetadataSize(size))
    }
}

impl<'de> Deserialize<'de> for MetadataSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        MetadataSize::new(ByteSize::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// One mount option such as `noatime` or `commit=60`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MountOption(String);

impl MountOption {
    /// The option text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for MountOption {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() || text.contains(',') || text.contains('\0') {
            return Err(serde::de::Error::custom(format!(
                "mount option {text:?} is not allowed; write one non-empty option per element, such as [\"noatime\", \"commit=60\"]"
            )));
        }
        Ok(MountOption(text))
    }
}

impl Config {
    /// Load the configuration from `path`; when `path` is the default and absent, all defaults.
    ///
    /// A path named explicitly must exist. Returns an `Invalid` error with line and column for
    /// any malformed or out-of-range value.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::io(format!("reading config {}", path.display()), e)),
        }
    }

    /// Parse and check TOML text; `origin` names it in errors (a file path).
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let config = deserialize(text).map_err(|e| e.into_error(text, origin))?;
        config.check().map_err(|e| e.into_error(text, origin))?;
        Ok(config)
    }

    /// The effective configuration as TOML, every key present.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Config always serializes")
    }

    /// Checks that involve more than one key.
    fn check(&self) -> std::result::Result<(), KeyError> {
        let block = self.pool.block_size.size();
        if self.pool.loop_files.data_size < block {
            return Err(KeyError::new(
                "pool.loop.data_size",
                format!(
                    "data size {} is smaller than one pool block ({block}); make it at least {block}",
                    self.pool.loop_files.data_size
                ),
            ));
        }
        let loop_files = &self.pool.loop_files;
        if loop_files.data_size_max < loop_files.data_size {
            return Err(KeyError::new(
                "pool.loop.data_size_max",
                format!(
                    "the largest data size {} is below the data size {}; make it at least {}",
                    loop_files.data_size_max, loop_files.data_size, loop_files.data_size
                ),
            ));
        }
        if loop_files.metadata_size_max.size() < loop_files.metadata_size.size() {
            return Err(KeyError::new(
                "pool.loop.metadata_size_max",
                format!(
                    "the largest metadata size {} is below the metadata size {}; make it at least {}",
                    loop_files.metadata_size_max.size(),
                    loop_files.metadata_size.size(),
                    loop_files.metadata_size.size()
                ),
            ));
        }
        self.check_backend()?;
        self.daemon.check()?;
        if let Some((i, _)) = self
            .layers
            .mkfs_args
            .iter()
            .enumerate()
            .find(|(_, arg)| arg.contains('\0'))
        {
            return Err(KeyError::new(
                "layers.mkfs_args",
                format!(
                    "argument {} holds a NUL byte, which no command line can carry; remove it",
                    i + 1
                ),
            ));
        }
        check_base_size(
            "layers.base_size",
            self.layers.base_size,
            self.layers.filesystem,
        )?;
        if let Some(interval) = self.layers.trim_interval {
            check_timeout("layers.trim_interval", interval, TRIM_INTERVAL_RANGE)?;
        }
        self.check_mount_roots()?;
        self.check_containerd()
    }

    /// A mount root lets clients hide what lies beneath it, so `/` (everything) and the state
    /// directory (the records) can never be one, nor anything that holds the state directory.
    fn check_mount_roots(&self) -> std::result::Result<(), KeyError> {
        let state_dir = self.state_dir.path();
        for root in &self.layers.mount_roots {
            let root = root.path();
            let problem = if root.parent().is_none() {
                "is the whole file system"
            } else if root.starts_with(state_dir) {
                "is the state directory or inside it (layers mount under its mnt without a root)"
            } else if state_dir.starts_with(root) {
                "holds the state directory, whose records a mount would hide"
            } else {
                continue;
            };
            return Err(KeyError::new(
                "layers.mount_roots",
                format!(
                    "mount root {} {problem}; name a directory set aside for layer mounts, such as \"/srv/layers\"",
                    root.display()
                ),
            ));
        }
        Ok(())
    }

    fn check_containerd(&self) -> std::result::Result<(), KeyError> {
        let containerd = &self.containerd;
        check_socket_group("containerd.socket_group", &containerd.socket_group)?;
        if containerd.enabled && containerd.socket == self.socket {
            return Err(KeyError::new(
                "containerd.socket",
                format!(
                    "{} is the API's socket too; give containerd's its own path",
                    self.socket.path().display()
                ),
            ));
        }
        let (size, filesystem) = self.containerd_root();
        let key = if containerd.base_size.is_some() {
            "containerd.base_size"
        } else {
            "layers.base_size"
        };
        check_base_size(key, size, filesystem)
    }
}

/// A new filesystem of `fs` needs at least its minimum size.
fn check_base_size(key: &str, size: ByteSize, fs: FsType) -> std::result::Result<(), KeyError> {
    let min = match fs {
        FsType::Xfs => XFS_SIZE_MIN,
        FsType::Ext4 => EXT4_SIZE_MIN,
    };
    if size < min {
        return Err(KeyError::new(
            key,
            format!("base size {size} is too small for {fs}; it must be at least {min}"),
        ));
    }
    Ok(())
}

impl DaemonConfig {
    fn check(&self) -> std::result::Result<(), KeyError> {
        check_socket_group("daemon.socket_group", &self.socket_group)?;
        if !MAX_CONNECTIONS_RANGE.contains(&self.max_connections) {
            return Err(KeyError::new(
                "daemon.max_connections",
                format!(
                    "{} is out of range; allow from {} to {} connections (each is a file descriptor)",
                    self.max_connections,
                    MAX_CONNECTIONS_RANGE.start(),
                    MAX_CONNECTIONS_RANGE.end()
                ),
            ));
        }
        check_timeout(
            "daemon.request_timeout",
            self.request_timeout,
            REQUEST_TIMEOUT_RANGE,
        )?;
        check_timeout(
            "daemon.shutdown_timeout",
            self.shutdown_timeout,
            SHUTDOWN_TIMEOUT_RANGE,
        )
    }
}

fn check_timeout(
    key: &str,
    value: Timeout,
    range: std::ops::RangeInclusive<Timeout>,
) -> std::result::Result<(), KeyError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(KeyError::new(
        key,
        format!(
            "{value} is out of range; write from {} to {}, such as \"30s\"",
            range.start(),
            range.end()
        ),
    ))
}

impl Config {
    /// The pool's no-space policy, `auto` resolved: `queue` where thinstackd extends the pool
    /// by itself, `error` where nothing will.
    pub fn when_full(&self) -> WhenFull {
        let grows = match self.pool.backend {
            Backend::Loop => self.pool.loop_files.autoextend_threshold.value() < 100,
            Backend::Lvm => self.pool.lvm.autoextend_threshold.value() < 100,
            Backend::Devices | Backend::Existing | Backend::Rbd => false,
        };
        match self.pool.when_full {
            WhenFull::Auto if grows => WhenFull::Queue,
            WhenFull::Auto => WhenFull::Error,
            chosen => chosen,
        }
    }

    /// The chosen backend's section must say what it needs.
    fn check_backend(&self) -> std::result::Result<(), KeyError> {
        match self.pool.backend {
            Backend::Loop => Ok(()),
            Backend::Lvm => check_lvm(&self.pool.lvm),
            Backend::Existing => check_existing(&self.pool.existing),
            Backend::Devices => check_devices(&self.pool.devices),
            Backend::Rbd => check_rbd(&self.pool.rbd),
        }
    }

    /// The most data the pool may hold, where thinstack grows it by itself up to a limit (a
    /// loop pool with autoextension: `pool.loop.data_size_max`); `None` where the pool's size
    /// now is all it is promised (an LVM pool's volume group is shared with other volumes).
    pub fn data_capacity(&self) -> Option<ByteSize> {
        let files = &self.pool.loop_files;
        (self.pool.backend == Backend::Loop && files.autoextend_threshold.value() < 100)
            .then_some(files.data_size_max)
    }

    /// The pool's block size: `pool.lvm.chunk_size` for LVM, `pool.block_size` otherwise (an
    /// existing pool keeps its own, which is read from the kernel).
    pub fn block_size(&self) -> ByteSize {
        match self.pool.backend {
            Backend::Lvm => self.pool.lvm.chunk_size.size(),
            _ => self.pool.block_size.size(),
        }
    }
}

fn check_lvm(lvm: &LvmConfig) -> std::result::Result<(), KeyError> {
    if lvm.devices.is_empty() {
        return Err(KeyError::new(
            "pool.lvm.devices",
            "pool.backend is \"lvm\" but pool.lvm.devices is empty; name the raw block devices for the volume group, such as [\"/dev/sdb\"]".to_string(),
        ));
    }
    if let Some(twice) = first_repeated(lvm.devices.iter().map(AbsolutePath::path)) {
        return Err(KeyError::new(
            "pool.lvm.devices",
            format!("{} is listed twice; list each device once", twice.display()),
        ));
    }
    for (key, value) in [
        ("pool.lvm.data_percent", lvm.data_percent),
        ("pool.lvm.metadata_percent", lvm.metadata_percent),
    ] {
        if value.value() == 0 {
            return Err(KeyError::new(
                key,
                "0% leaves the pool no room; give it at least 1%".to_string(),
            ));
        }
    }
    let total = u16::from(lvm.data_percent.value()) + u16::from(lvm.metadata_percent.value());
    if total > 100 {
        return Err(KeyError::new(
            "pool.lvm.metadata_percent",
            format!(
                "data_percent {} + metadata_percent {} is {total}%, more than the volume group; make them add up to at most 100%",
                lvm.data_percent, lvm.metadata_percent
            ),
        ));
    }
    Ok(())
}

fn check_existing(existing: &ExistingConfig) -> std::result::Result<(), KeyError> {
    let name = existing
        .device
        .strip_prefix("/dev/mapper/")
        .unwrap_or(&existing.device);
    let usable = !name.is_empty()
        && name.len() < 128
        && !name.contains('/')
        && name != "."
        && name != ".."
        && !name.contains(char::is_control);
    if !usable {
        return Err(KeyError::new(
            "pool.existing.device",
            format!(
                "{:?} is not a thin pool's device-mapper name; write its name (\"docker-thinpool\") or /dev/mapper path (\"/dev/mapper/docker-thinpool\")",
                existing.device
            ),
        ));
    }
    Ok(())
}

fn check_devices(devices: &DevicesConfig) -> std::result::Result<(), KeyError> {
    let (Some(data), Some(metadata)) = (&devices.data, &devices.metadata) else {
        let key = if devices.data.is_none() {
            "pool.devices.data"
        } else {
            "pool.devices.metadata"
        };
        return Err(KeyError::new(
            key,
            format!("pool.backend is \"devices\" but {key} is not set; name a raw block device, such as \"/dev/sdb\""),
        ));
    };
    if data == metadata {
        return Err(KeyError::new(
            "pool.devices.metadata",
            format!(
                "data and metadata are both {}; they must be two different devices",
                data.path().display()
            ),
        ));
    }
    Ok(())
}

/// Names Ceph accepts for pools, namespaces and clients: no NUL, no `/` or `@` (they separate
/// pool, namespace, image and snapshot in a spec), no whitespace or `,` (the kernel's map line
/// separates by them).
fn ceph_name_problem(name: &str) -> Option<&'static str> {
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | ',' | '='))
    {
        Some("it holds whitespace, a control character, or one of / @ , =")
    } else if name.len() > 100 {
        Some("it is longer than 100 characters")
    } else {
        None
    }
}

fn check_rbd(rbd: &RbdConfig) -> std::result::Result<(), KeyError> {
    if rbd.pool.is_empty() {
        return Err(KeyError::new(
            "pool.rbd.pool",
            "pool.backend is \"rbd\" but pool.rbd.pool is not set; name the Ceph pool the layers' images live in, such as \"rbd\"".to_string(),
        ));
    }
    for (key, value) in [
        ("pool.rbd.pool", &rbd.pool),
        ("pool.rbd.namespace", &rbd.namespace),
        ("pool.rbd.client", &rbd.client),
    ] {
        if let Some(problem) = ceph_name_problem(value) {
            return Err(KeyError::new(key, format!("{value:?} is not a name Ceph and the kernel's rbd client both accept: {problem}")));
        }
    }
    if rbd.client.is_empty() || rbd.client.starts_with("client.") {
        return Err(KeyError::new(
            "pool.rbd.client",
            format!(
                "{:?}: write the cephx client's name without \"client.\", such as \"admin\"",
                rbd.client
            ),
        ));
    }
    check_timeout("pool.rbd.timeout", rbd.timeout, REQUEST_TIMEOUT_RANGE)?;
    let (deepest, why) = match rbd.map {
        RbdMap::Krbd => (
            RBD_KERNEL_MAX_PARENTS,
            "the kernel's rbd driver maps no image with more parents; map = \"nbd\" allows \
             deeper chains",
        ),
        RbdMap::Nbd => (
            RBD_NBD_MAX_FLATTEN_DEPTH,
            "every parent is opened and read through",
        ),
    };
    if !(1..=deepest).contains(&rbd.flatten_depth) {
        return Err(KeyError::new(
            "pool.rbd.flatten_depth",
            format!(
                "{} is out of range; write from 1 to {deepest} ({why})",
                rbd.flatten_depth
            ),
        ));
    }
    Ok(())
}

fn first_repeated<'a>(paths: impl Iterator<Item = &'a Path>) -> Option<&'a Path> {
    let mut seen = std::collections::BTreeSet::new();
    paths.into_iter().find(|path| !seen.insert(*path))
}

/// A socket's group: empty (root only) or a group name.
fn check_socket_group(key: &str, group: &str) -> std::result::Result<(), KeyError> {
    if group.is_empty() || is_group_name(group) {
        return Ok(());
    }
    Err(KeyError::new(
        key,
        format!(
            "{group:?} is not a group name; write a name such as \"thinstack\", or \"\" for root only"
        ),
    ))
}

/// A POSIX-style group name (checked here; whether it exists is checked at start-up).
fn is_group_name(name: &str) -> bool {
    name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Deserialize, keeping the path of the key that failed.
fn deserialize(text: &str) -> std::result::Result<Config, KeyError> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| KeyError {
        key: String::new(),
        message: e.message().to_string(),
        span: e.span(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        KeyError {
            key: if key == "." { String::new() } else { key },
            message: inner.message().to_string(),
            span: inner.span(),
        }
    })
}

/// A failure tied to a key, before it is placed in the text.
struct KeyError {
    key: String,
    message: String,
    span: Option<Range<usize>>,
}

impl KeyError {
    fn new(key: &str, message: String) -> Self {
        KeyError {
            key: key.to_string(),
            message,
            span: None,
        }
    }

    /// Place the failure at a line and column of `text` and make the user-facing error.
    fn into_error(self, text: &str, origin: &str) -> Error {
        let span = self.span.or_else(|| locate_key(text, &self.key));
        let place = span.map(|s| Place::of(text, s.start));
        let key = if self.key.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.key)
        };
        let message = match place {
            Some(place) => format!(
                "invalid configuration {origin}, line {}, column {}: {key}{}\n{place}",
                place.line, place.column, self.message
            ),
            None => format!("invalid configuration {origin}: {key}{}", self.message),
        };
        Error::invalid(message)
    }
}

/// The span of the value of a dotted `key` in `text`, when the key is written there.
fn locate_key(text: &str, key: &str) -> Option<Range<usize>> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            return Some(value.span());
        }
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => table = inner,
            _ => return None,
        }
    }
    None
}

/// A line and column (both from 1) and the line's text, for error messages.
struct Place {
    line: usize,
    column: usize,
    text: String,
}

impl Place {
    fn of(text: &str, offset: usize) -> Place {
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
        Place {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
            text: text[line_start..line_end].to_string(),
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gutter = self.line.to_string();
        writeln!(f, "{gutter} | {}", self.text)?;
        write!(
            f,
            "{} | {}^",
            " ".repeat(gutter.len()),
            " ".repeat(self.column - 1)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text, "test.toml").unwrap_err().to_string()
    }

    #[test]
    fn an_rbd_pool_needs_a_ceph_pool_and_names_the_kernel_client_accepts() {
        let good = "[pool]\nbackend = \"rbd\"\n[pool.rbd]\npool = \"rbd\"\nnamespace = \"ci\"\ntimeout = \"90s\"\n";
        let config = Config::parse(good, "t").unwrap();
        assert_eq!(config.pool.rbd.timeout, Timeout::secs(90));
        assert_eq!(config.pool.rbd.flatten_depth, RBD_KERNEL_MAX_PARENTS);
        let round = Config::parse(&config.to_toml(), "t").unwrap();
        assert_eq!(round.pool.rbd, config.pool.rbd);
        let nbd = format!("{good}map = \"nbd\"\nflatten_depth = 40\n");
        assert_eq!(Config::parse(&nbd, "t").unwrap().pool.rbd.map, RbdMap::Nbd);
        for (bad, key) in [
            ("", "pool.rbd.pool"),
            ("pool = \"a b\"", "pool.rbd.pool"),
            ("pool = \"rbd\"\nnamespace = \"x/y\"", "pool.rbd.namespace"),
            (
                "pool = \"rbd\"\nclient = \"client.admin\"",
                "pool.rbd.client",
            ),
            (
                "pool = \"rbd\"\nflatten_depth = 17",
                "pool.rbd.flatten_depth",
            ),
            (
                "pool = \"rbd\"\nflatten_depth = 0",
                "pool.rbd.flatten_depth",
            ),
            ("pool = \"rbd\"\ntimeout = \"2h\"", "pool.rbd.timeout"),
            ("pool = \"rbd\"\nmap = \"ndb\"", "pool.rbd.map"),
            (
                "pool = \"rbd\"\nmap = \"nbd\"\nflatten_depth = 65",
                "pool.rbd.flatten_depth",
            ),
            ("pool = \"rbd\"\nmonitors = \"x\"", "monitors"),
        ] {
            let err = error_of(&format!("[pool]\nbackend = \"rbd\"\n[pool.rbd]\n{bad}\n"));
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn trim_interval_is_a_length_of_time_from_a_minute_to_a_week() {
        let config = Config::parse("[layers]\ntrim_interval = \"1h\"\n", "t").unwrap();
        assert_eq!(config.layers.trim_interval, Some(Timeout::secs(3600)));
        assert_eq!(Config::default().layers.trim_interval, None);
        let round = Config::parse(&config.to_toml(), "t").unwrap();
        assert_eq!(round.layers.trim_interval, config.layers.trim_interval);
        for bad in ["\"10s\"", "\"30d\"", "\"often\""] {
            let err = error_of(&format!("[layers]\ntrim_interval = {bad}\n"));
            assert!(err.contains("layers.trim_interval"), "{bad}: {err}");
        }
    }

    #[test]
    fn max_overcommit_takes_a_ratio_and_metrics_listen_an_address() {
        let config = Config::parse("[pool]\nmax_overcommit = 3\n", "t").unwrap();
        assert_eq!(config.pool.max_overcommit.limit(), Some(3.0));
        let config = Config::parse("[pool]\nmax_overcommit = 2.5\n", "t").unwrap();
        assert_eq!(config.pool.max_overcommit.limit(), Some(2.5));
        assert_eq!(Config::default().pool.max_overcommit.limit(), None);
        for bad in ["-1", "1e9", "\"3x\"", "nan"] {
            let err = error_of(&format!("[pool]\nmax_overcommit = {bad}\n"));
            assert!(err.contains("pool.max_overcommit"), "{bad}: {err}");
        }
        let text = "[daemon]\nmetrics_listen = \"127.0.0.1:9464\"\n";
        let config = Config::parse(text, "t").unwrap();
        assert_eq!(
            config.daemon.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let round = Config::parse(&config.to_toml(), "t").unwrap();
        assert_eq!(round.daemon.metrics_listen, config.daemon.metrics_listen);
        let err = error_of("[daemon]\nmetrics_listen = \"localhost\"\n");
        assert!(err.contains("daemon.metrics_listen"), "{err}");
    }

    #[test]
    fn each_backend_must_say_what_it_needs() {
        let lvm = "[pool]\nbackend = \"lvm\"\n";
        let text = error_of(lvm);
        assert!(text.contains("pool.lvm.devices is empty"), "{text}");
        let text = error_of(&format!(
            "{lvm}[pool.lvm]\ndevices = [\"/dev/sdb\", \"/dev/sdb\"]\n"
        ));
        assert!(text.contains("/dev/sdb is listed twice"), "{text}");
        let text = error_of(&format!(
            "{lvm}[pool.lvm]\ndevices = [\"/dev/sdb\"]\ndata_percent = 95\nmetadata_percent = 10\n"
        ));
        assert!(text.contains("is 105%"), "{text}");
        assert!(text.contains("line 6"), "{text}");
        let text = error_of("[pool.lvm]\nvolume_group = \"-bad\"\n");
        assert!(text.contains("is not a volume group name"), "{text}");
        let text = error_of("[pool.lvm]\ndevices = [\"sdb\"]\n");
        assert!(text.contains("pool.lvm.devices"), "{text}");
        let ok = Config::parse(
            &format!("{lvm}[pool.lvm]\ndevices = [\"/dev/sdb\"]\nchunk_size = \"1M\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(ok.block_size(), ByteSize::mib(1));

        let text = error_of("[pool]\nbackend = \"devices\"\n[pool.devices]\ndata = \"/dev/sdb\"\n");
        assert!(text.contains("pool.devices.metadata is not set"), "{text}");
        let text = error_of(
            "[pool]\nbackend = \"devices\"\n[pool.devices]\ndata = \"/dev/sdb\"\nmetadata = \"/dev/sdb\"\n",
        );
        assert!(text.contains("two different devices"), "{text}");

        let text = error_of("[pool]\nbackend = \"existing\"\n");
        assert!(text.contains("pool.existing.device"), "{text}");
        let text = error_of(
            "[pool]\nbackend = \"existing\"\n[pool.existing]\ndevice = \"/dev/mapper/../x\"\n",
        );
        assert!(
            text.contains("is not a thin pool's device-mapper name"),
            "{text}"
        );
        Config::parse(
            "[pool]\nbackend = \"existing\"\n[pool.existing]\ndevice = \"/dev/mapper/docker-thinpool\"\n",
            "t",
        )
        .unwrap();
    }

    #[test]
    fn empty_text_means_all_defaults() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    }

    #[test]
    fn absent_default_file_means_defaults_but_named_file_must_exist() {
        let missing = Path::new("/nonexistent/thinstack.toml");
        let err = Config::load(Some(missing)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::NotFound);
    }

    #[test]
    fn every_key_is_read() {
        let text = r#"
state_dir = "/srv/ts"
socket = "/run/ts.sock"
[pool]
name = "p1"
backend = "loop"
block_size = "512K"
min_free_space = "5%"
[pool.loop]
data_size = "1T"
metadata_size = "4G"
[layers]
base_size = "20G"
filesystem = "xfs"
mkfs_args = ["-m", "reflink=0"]
mount_options = ["noatime"]
mount_roots = ["/srv/layers"]
"#;
        let c = Config::parse(text, "x").unwrap();
        assert_eq!(c.state_dir.path(), Path::new("/srv/ts"));
        assert_eq!(c.pool.name.as_str(), "p1");
        assert_eq!(c.pool.block_size.size(), ByteSize::from_bytes(512 * 1024));
        assert_eq!(c.pool.min_free_space.value(), 5);
        assert_eq!(c.pool.loop_files.data_size, ByteSize::gib(1024));
        assert_eq!(c.pool.loop_files.metadata_size.size(), ByteSize::gib(4));
        assert_eq!(c.layers.filesystem, FsType::Xfs);
        assert_eq!(c.layers.mkfs_args, ["-m", "reflink=0"]);
        assert_eq!(c.layers.mount_options[0].as_str(), "noatime");
        assert_eq!(c.layers.mount_roots[0].path(), Path::new("/srv/layers"));
    }

    #[test]
    fn a_mount_root_may_not_hide_the_system_or_the_records() {
        for (root, says) in [
            ("/", "whole file system"),
            ("/var/lib/thinstack/mnt", "inside it"),
            ("/var/lib", "holds the state directory"),
            ("/var", "holds the state directory"),
        ] {
            let err = error_of(&format!("[layers]\nmount_roots = [\"{root}\"]\n"));
            assert!(
                err.contains("layers.mount_roots") && err.contains(says),
                "{root}: {err}"
            );
        }
        let err = error_of("[layers]\nmount_roots = [\"srv\"]\n");
        assert!(err.contains("relative"), "{err}");
        let c = Config::parse("[layers]\nmount_roots = [\"/var/lib/other\"]\n", "x").unwrap();
        assert_eq!(c.layers.mount_roots.len(), 1);
    }

    #[test]
    fn unknown_key_names_key_line_and_column() {
        let err = error_of("[pool]\nname = \"x\"\nblok_size = \"64K\"\n");
        assert!(err.contains("line 3, column 1"), "{err}");
        assert!(err.contains("blok_size"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
    }

    #[test]
    fn malformed_size_names_key_line_and_column() {
        let err = error_of("[pool.loop]\n\ndata_size = \"10 gigs\"\n");
        assert!(err.contains("line 3, column 13"), "{err}");
        assert!(err.contains("pool.loop.data_size"), "{err}");
        assert!(err.contains("not a size"), "{err}");
    }

    #[test]
    fn out_of_range_values_say_what_is_allowed() {
        let err = error_of("[pool]\nblock_size = \"96K\"\n");
        assert!(
            err.contains("pool.block_size") && err.contains("multiple of 64K"),
            "{err}"
        );
        let err = error_of("[pool]\nblock_size = \"2G\"\n");
        assert!(err.contains("from 64K to 1G"), "{err}");
        let err = error_of("[pool.loop]\nmetadata_size = \"1M\"\n");
        assert!(
            err.contains("pool.loop.metadata_size") && err.contains("2M to 16G"),
            "{err}"
        );
        let err = error_of("[pool]\nmin_free_space = \"150%\"\n");
        assert!(
            err.contains("pool.min_free_space") && err.contains("0% to 100%"),
            "{err}"
        );
        let err = error_of("[pool]\nbackend = \"zfs\"\n");
        assert!(
            err.contains("pool.backend") && err.contains("loop"),
            "{err}"
        );
        let err = error_of("[layers]\nfilesystem = \"btrfs\"\n");
        assert!(
            err.contains("layers.filesystem") && err.contains("ext4"),
            "{err}"
        );
        let err = error_of("[pool]\nname = \"../etc\"\n");
        assert!(
            err.contains("pool.name") && err.contains("pool names are"),
            "{err}"
        );
        let err = error_of("state_dir = \"relative/dir\"\n");
        assert!(
            err.contains("state_dir") && err.contains("absolute"),
            "{err}"
        );
        let err = error_of("[layers]\nmount_options = [\"a,b\"]\n");
        assert!(
            err.contains("layers.mount_options") && err.contains("one"),
            "{err}"
        );
    }

    #[test]
    fn cross_key_checks_point_at_the_key() {
        let err = error_of("[layers]\nfilesystem = \"xfs\"\nbase_size = \"100M\"\n");
        assert!(err.contains("line 3"), "{err}");
        assert!(
            err.contains("layers.base_size") && err.contains("300M"),
            "{err}"
        );
        let err = error_of("[pool]\nblock_size = \"1M\"\n[pool.loop]\ndata_size = \"64K\"\n");
        assert!(
            err.contains("line 4") && err.contains("pool.loop.data_size"),
            "{err}"
        );
    }

    #[test]
    fn malformed_toml_has_line_and_column() {
        let err = error_of("[pool\nname = 1\n");
        assert!(err.contains("line 1"), "{err}");
        let err = error_of("state_dir = \n");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::default();
        let again = Config::parse(&c.to_toml(), "x").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn connection_limits_and_timeouts_are_read_with_their_defaults() {
        let d = Config::default().daemon;
        assert_eq!(d.max_connections, 256);
        assert_eq!(d.request_timeout, Timeout::secs(30));
        assert_eq!(d.shutdown_timeout, Timeout::secs(30));
        let text =
            "[daemon]\nmax_connections = 4\nrequest_timeout = \"2s\"\nshutdown_timeout = 90\n";
        let c = Config::parse(text, "x").unwrap().daemon;
        assert_eq!(c.max_connections, 4);
        assert_eq!(
            c.request_timeout.duration(),
            std::time::Duration::from_secs(2)
        );
        assert_eq!(c.shutdown_timeout, Timeout::secs(90));
        let zero = Config::parse("[daemon]\nshutdown_timeout = \"0s\"\n", "x").unwrap();
        assert_eq!(zero.daemon.shutdown_timeout, Timeout::secs(0));
        // Written back as text, so the effective config round-trips.
        let shown = Config::parse(text, "x").unwrap().to_toml();
        assert!(shown.contains("shutdown_timeout = \"1m 30s\""), "{shown}");
        assert_eq!(Config::parse(&shown, "x").unwrap().daemon, c);
    }

    #[test]
    fn connection_limits_and_timeouts_out_of_range_say_what_is_allowed() {
        for (text, key, says) in [
            (
                "max_connections = 0",
                "daemon.max_connections",
                "from 1 to 65536",
            ),
            (
                "max_connections = 70000",
                "daemon.max_connections",
                "from 1 to 65536",
            ),
            (
                "max_connections = -1",
                "daemon.max_connections",
                "invalid value",
            ),
            (
                "request_timeout = \"0s\"",
                "daemon.request_timeout",
                "from 1s to 1h",
            ),
            (
                "request_timeout = \"2h\"",
                "daemon.request_timeout",
                "from 1s to 1h",
            ),
            (
                "shutdown_timeout = \"61m\"",
                "daemon.shutdown_timeout",
                "from 0s to 1h",
            ),
            (
                "shutdown_timeout = \"soon\"",
                "daemon.shutdown_timeout",
                "not a length of time",
            ),
            (
                "shutdown_timeout = -5",
                "daemon.shutdown_timeout",
                "negative",
            ),
        ] {
            let err = error_of(&format!("[daemon]\n{text}\n"));
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains("line 2"), "{text}: {err}");
        }
    }
}
