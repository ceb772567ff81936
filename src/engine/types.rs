//! The engine's own types: its settings, a create request, a layer and the pool's status as
//! callers see them, and what a removal did.

use super::*;

/// What the engine takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The state directory (records; `mnt/<layer>` default mount points).
    pub state_dir: PathBuf,
    /// Size of a new base layer unless one is requested.
    pub base_size: ByteSize,
    /// Filesystem of a new base layer unless one is requested.
    pub filesystem: FsType,
    /// Extra mkfs arguments.
    pub mkfs_args: Vec<String>,
    /// Extra mount options.
    pub mount_options: Vec<String>,
    /// Directories beneath which callers may mount layers, besides `<state_dir>/mnt`.
    pub mount_roots: Vec<PathBuf>,
    /// Refuse new layers below this share of free data or metadata.
    pub min_free_space: Percent,
    /// Discard a layer's blocks before deleting it (gives loop-file space back).
    pub discard_on_remove: bool,
    /// How often and how far apart a busy deactivation is retried before removal is deferred.
    pub busy_retries: u32,
    /// See `busy_retries`.
    pub busy_retry_interval: Duration,
    /// `pool.max_overcommit`.
    pub max_overcommit: Ratio,
    /// The most data the pool may hold where thinstack grows it ([`Config::data_capacity`]).
    pub data_capacity: Option<ByteSize>,
}

impl Settings {
    /// Settings for unit tests over the sim: records in `state_dir`, 1G ext4 bases, quick
    /// busy retries, no overcommit limit.
    #[cfg(test)]
    pub(crate) fn for_tests(state_dir: &Path) -> Settings {
        Settings {
            state_dir: state_dir.to_path_buf(),
            base_size: ByteSize::gib(1),
            filesystem: FsType::Ext4,
            mkfs_args: Vec::new(),
            mount_options: Vec::new(),
            mount_roots: Vec::new(),
            min_free_space: Percent::new(10).expect("valid"),
            discard_on_remove: true,
            busy_retries: 2,
            busy_retry_interval: Duration::from_millis(1),
            max_overcommit: Ratio::NONE,
            data_capacity: None,
        }
    }

    /// The engine's settings from a configuration.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            state_dir: config.state_dir.path().to_path_buf(),
            base_size: config.layers.base_size,
            filesystem: config.layers.filesystem,
            mkfs_args: config.layers.mkfs_args.clone(),
            mount_options: config
                .layers
                .mount_options
                .iter()
                .map(|o: &MountOption| o.as_str().to_string())
                .collect(),
            mount_roots: config
                .layers
                .mount_roots
                .iter()
                .map(|root| root.path().to_path_buf())
                .collect(),
            min_free_space: config.pool.min_free_space,
            discard_on_remove: config.layers.discard_on_remove,
            // The devicemapper crate already retries EBUSY on removal (5 times, 200 ms apart),
            // so two more rounds make about 3 s before a busy removal is deferred.
            busy_retries: 2,
            busy_retry_interval: Duration::from_millis(100),
            max_overcommit: config.pool.max_overcommit,
            data_capacity: config.data_capacity(),
        }
    }
}

/// A request to create a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateLayer {
    /// The new layer's name.
    pub name: String,
    /// The layer to snapshot; none for a new base layer.
    pub parent: Option<String>,
    /// Virtual size; default: the base size, or the parent's size.
    pub size: Option<ByteSize>,
    /// Filesystem of a base layer; default: the configured one.
    pub filesystem: Option<FsType>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A layer as callers see it (the API's wire form is `api::Layer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Name.
    pub name: LayerName,
    /// Thin device id.
    pub thin_id: ThinId,
    /// Parent layer.
    pub parent: Option<LayerName>,
    /// Virtual size.
    pub size: ByteSize,
    /// Filesystem type.
    pub filesystem: FsType,
    /// Filesystem UUID.
    pub fs_uuid: String,
    /// Read-only for good.
    pub committed: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Life-cycle state.
    pub state: LayerState,
    /// The block device while active.
    pub device: Option<PathBuf>,
    /// Mount points thinstack made, with their users.
    pub mounts: BTreeMap<PathBuf, MountRecord>,
    /// Removal waits for the device to be released.
    pub deferred_removal: bool,
    /// The pool lost this layer's thin device.
    pub missing: bool,
    /// Layers made from this one.
    pub children: Vec<LayerName>,
    /// The containerd snapshot this layer is, if containerd made it.
    pub snapshot: Option<SnapshotRecord>,
    /// Why the layer is degraded: its settling at start failed, so its operations are refused
    /// until `pool doctor --repair` (or a restart) settles it.
    pub degraded: Option<String>,
    /// What a committed layer holds, kept by export and import.
    pub content_id: Option<ContentId>,
    /// The layer this one is a checkpoint of.
    pub checkpoint_of: Option<LayerName>,
    /// The thin device made ahead for the next reset to the parent, if one is.
    pub reset_spare: Option<ThinId>,
}

impl Layer {
    /// Each mount point once per user holding it: unmounting at each, in turn, unmounts the
    /// layer everywhere.
    pub fn mount_users(&self) -> impl Iterator<Item = &Path> {
        self.mounts
            .iter()
            .flat_map(|(target, mount)| std::iter::repeat_n(target.as_path(), mount.refs as usize))
    }
}

/// The pool's status with the engine's settings and counts (the API's wire form is
/// `api::PoolStatus`).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Name, device, backend, block size, data and metadata sources.
    pub pool: PoolDetails,
    /// Size of a new base layer.
    pub base_size: ByteSize,
    /// Filesystem of a new base layer.
    pub filesystem: FsType,
    /// Data space.
    pub data: Space,
    /// Metadata space.
    pub metadata: Space,
    /// New layers are refused below this share of free data or metadata.
    pub min_free_space: Percent,
    /// The pool's transaction id.
    pub transaction_id: u64,
    /// Health flags.
    pub health: Health,
    /// Layers in all.
    pub layers: usize,
    /// Layers waiting for deferred deletion.
    pub deferred_deletions: usize,
    /// Whether removal discards blocks first.
    pub discard_on_remove: bool,
    /// The layers' virtual sizes against the pool's data.
    pub overcommit: Overcommit,
}

/// What a removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The layer is gone from the API and the records; its thin device is deleted, or
    /// queued for deletion in the background ([`Engine::finish_deletions`]).
    Removed,
    /// The device is busy; it will be removed once released ([`Engine::process_deferred`]).
    Deferred,
}
