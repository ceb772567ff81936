//! The HTTP API's wire types, shared by the daemon and its clients.
//!
//! Every body is JSON. Errors are `{"error": {"kind": "...", "message": "..."}}` with the HTTP
//! status of [`status_of`]. The routes are in `daemon::routes` and `openapi.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine;
use crate::error::{Error, ErrorKind};
use crate::kernel::ThinUsage;
use crate::names::{LayerName, ThinId};
use crate::units::{ByteSize, Timeout};
use crate::vocab::FsType;

mod layer;
mod pool;

pub use layer::{Layer, LayerMount, LayerState, Removal, Snapshot, SnapshotKind};
pub use pool::{
    CheckResponse, DoctorResponse, Finding, FindingStatus, Health, Leftover, Overcommit, Pool,
    PoolStatus, Space, WhenFull,
};

/// Every route starts with this.
pub const API_PREFIX: &str = "/v1";

/// Largest request body the daemon reads.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// `POST /v1/layers`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The new layer's name.
    pub name: String,
    /// Snapshot this layer; absent for a new base layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Virtual size; default the base size or the parent's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Filesystem of a base layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsType>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Succeed with the existing layer when one of that name and parent exists.
    #[serde(default)]
    pub exists_ok: bool,
}

/// `POST /v1/layers/{name}/break-lock`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakLockResponse {
    /// The layer.
    pub name: LayerName,
    /// The host that held its writer lock.
    pub holder: String,
    /// The clients fenced (blocklisted by the cluster), so they cannot write on.
    pub fenced: Vec<String>,
}

/// `POST /v1/layers/{name}/mount`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// Mount point; default `<state_dir>/mnt/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    /// Mount read-only (committed layers always are).
    #[serde(default)]
    pub readonly: bool,
}

/// `POST /v1/layers/{name}/unmount`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmountRequest {
    /// Which mount, when the layer has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
}

/// `POST /v1/layers/{name}/resize`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The new virtual size.
    pub size: ByteSize,
}

/// `POST /v1/layers/{name}/checkpoint`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// The checkpoint's name (a new layer).
    pub name: String,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/layers/{name}/reset`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// The layer whose content it takes: its parent when absent, or a checkpoint of it.
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /v1/pool/extend`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    /// New size of the data area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ByteSize>,
    /// New size of the metadata area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ByteSize>,
}

/// `POST /v1/pool/add-device`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDeviceRequest {
    /// The disk to add to the volume group.
    pub device: PathBuf,
    /// Wipe signatures found on it instead of refusing.
    #[serde(default)]
    pub force: bool,
}

/// Answer to `POST /v1/pool/add-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddDeviceResponse {
    /// The disk added.
    pub device: PathBuf,
    /// Free space in the volume group after.
    pub volume_group_free: ByteSize,
}

/// `POST /v1/pool/doctor`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoctorRequest {
    /// Clean what is safe to clean (otherwise only list).
    #[serde(default)]
    pub repair: bool,
    /// With `repair`: delete thin devices no record owns too. They may be layers whose
    /// records were lost (`adopt` gives them back), so only on the operator's word.
    #[serde(default)]
    pub delete_unowned: bool,
}

/// `POST /v1/pool/adopt`: make a thin device no record owns a layer again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    /// The thin device (as `pool doctor` lists it).
    pub thin_id: ThinId,
    /// The layer's name.
    pub name: String,
}

/// `POST /v1/pool/destroy`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyRequest {
    /// Remove the layers too (refused while layers exist otherwise).
    #[serde(default)]
    pub force: bool,
}

/// Answer to `POST /v1/pool/destroy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyResponse {
    /// How many layers were removed with the pool.
    pub layers_removed: usize,
}

/// `POST /v1/layers/{name}/activate`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceResponse {
    /// The layer.
    pub name: LayerName,
    /// Its block device.
    pub device: PathBuf,
}

/// `POST /v1/layers/{name}/mount`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountResponse {
    /// The layer.
    pub name: LayerName,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// `GET /v1/layers/{name}/usage`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageResponse {
    /// The layer.
    pub name: LayerName,
    /// Pool data the layer maps (its own and what it shares with its parents and children).
    pub mapped: ByteSize,
    /// The same in bytes.
    pub mapped_bytes: u64,
    /// Pool data no other layer maps: what removing it gives back.
    pub exclusive: ByteSize,
    /// The same in bytes.
    pub exclusive_bytes: u64,
    /// Pool data it shares with another layer (`mapped - exclusive`).
    pub shared: ByteSize,
    /// The same in bytes.
    pub shared_bytes: u64,
}

impl UsageResponse {
    /// `name`'s usage.
    pub fn of(name: LayerName, usage: ThinUsage) -> UsageResponse {
        let shared = usage.shared();
        UsageResponse {
            name,
            mapped: usage.mapped,
            mapped_bytes: usage.mapped.bytes(),
            exclusive: usage.exclusive,
            exclusive_bytes: usage.exclusive.bytes(),
            shared,
            shared_bytes: shared.bytes(),
        }
    }
}

/// Answer to `POST /v1/layers/{name}/trim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimResponse {
    /// The layer.
    pub name: LayerName,
    /// What its filesystem says it trimmed (every free block it discarded, also those never
    /// written).
    pub trimmed: ByteSize,
    /// The same in bytes.
    pub trimmed_bytes: u64,
    /// Pool data that came back.
    pub given_back: ByteSize,
    /// The same in bytes.
    pub given_back_bytes: u64,
}

impl TrimResponse {
    /// The wire form of a trim of `name`.
    pub fn of(name: LayerName, trimmed: engine::Trimmed) -> TrimResponse {
        TrimResponse {
            name,
            trimmed: trimmed.trimmed,
            trimmed_bytes: trimmed.trimmed.bytes(),
            given_back: trimmed.given_back,
            given_back_bytes: trimmed.given_back.bytes(),
        }
    }
}

/// `POST /v1/pool/prune`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Only layers carrying every one of these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Only layers made at least this long ago (`24h`, `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than: Option<Timeout>,
    /// List what would go; remove nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Answer to `POST /v1/pool/prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneResponse {
    /// Nothing was removed: `removed` is what a real run would remove.
    pub dry_run: bool,
    /// The layers removed (or that would be), in order.
    pub removed: Vec<PrunedLayer>,
    /// Layers that matched but were in use by their turn, and were kept.
    pub kept_in_use: Vec<LayerName>,
    /// Pool data given back (0 in a dry run: see each layer's `exclusive`).
    pub given_back: ByteSize,
    /// The same in bytes.
    pub given_back_bytes: u64,
}

/// One layer a prune removed, or would remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedLayer {
    /// The layer.
    pub name: LayerName,
    /// Pool data it held alone when the prune began.
    pub exclusive: ByteSize,
    /// The same in bytes.
    pub exclusive_bytes: u64,
    /// Removed now, or deferred until its device is released; absent in a dry run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Removal>,
}

impl PruneResponse {
    /// The wire form of a prune's report.
    pub fn of(report: engine::PruneReport, dry_run: bool) -> PruneResponse {
        let given_back = ByteSize::from_bytes(
            report
                .data_used_before
                .bytes()
                .saturating_sub(report.data_used_after.bytes()),
        );
        PruneResponse {
            dry_run,
            removed: report
                .removed
                .into_iter()
                .map(|pruned| PrunedLayer {
                    name: pruned.name,
                    exclusive: pruned.exclusive,
                    exclusive_bytes: pruned.exclusive.bytes(),
                    result: pruned.removal.map(Into::into),
                })
                .collect(),
            kept_in_use: report.kept_in_use,
            given_back,
            given_back_bytes: given_back.bytes(),
        }
    }
}

/// One line of `GET /v1/events`: what changed, when, and to which layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// What changed: `subscribed` (the stream's first line, not counted: every change from
    /// then on is reported), `layer_created`, `layer_committed`, `layer_mounted`, `layer_unmounted`,
    /// `layer_resized`, `layer_removed`, `layer_reset`, `layer_removal_deferred`, `layer_degraded`,
    /// `pool_extended`, `pool_guard_on`, `pool_guard_off`; `events_lost` when this client fell
    /// so far behind that `lost` events were dropped for it.
    #[serde(rename = "type")]
    pub kind: String,
    /// The layer, for a layer's event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerName>,
    /// Where (mounted, unmounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    /// Mounted read-only (mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// The layer's size now (resized).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Why (degraded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The pool's data and metadata now (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ByteSize>,
    /// See `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ByteSize>,
    /// thinstackd grew the pool by itself (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic: Option<bool>,
    /// Events dropped for this client (events_lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

impl Event {
    fn bare(time_ns: u64, kind: &str, layer: Option<LayerName>) -> Event {
        Event {
            time_ns,
            kind: kind.to_string(),
            layer,
            target: None,
            read_only: None,
            size: None,
            reason: None,
            data: None,
            metadata: None,
            automatic: None,
            lost: None,
        }
    }

    /// The stream's first line: from here on, every change is reported.
    pub fn subscribed(time_ns: u64) -> Event {
        Event::bare(time_ns, "subscribed", None)
    }

    /// The line a client that fell behind gets instead of the `lost` events it missed.
    pub fn lost(time_ns: u64, lost: u64) -> Event {
        Event {
            lost: Some(lost),
            ..Event::bare(time_ns, "events_lost", None)
        }
    }
}

impl From<engine::Event> for Event {
    fn from(event: engine::Event) -> Event {
        use engine::EventKind as K;
        let (time, layer) = (event.time_ns, event.layer);
        match event.kind {
            K::LayerCreated => Event::bare(time, "layer_created", layer),
            K::LayerCommitted => Event::bare(time, "layer_committed", layer),
            K::LayerMounted { target, read_only } => Event {
                target: Some(target),
                read_only: Some(read_only),
                ..Event::bare(time, "layer_mounted", layer)
            },
            K::LayerUnmounted { target } => Event {
                target: Some(target),
                ..Event::bare(time, "layer_unmounted", layer)
            },
            K::LayerResized { size } => Event {
                size: Some(size),
                ..Event::bare(time, "layer_resized", layer)
            },
            K::LayerRemoved => Event::bare(time, "layer_removed", layer),
            K::LayerReset => Event::bare(time, "layer_reset", layer),
            K::LayerRemovalDeferred => Event::bare(time, "layer_removal_deferred", layer),
            K::LayerDegraded { reason } => Event {
                reason: Some(reason),
                ..Event::bare(time, "layer_degraded", layer)
            },
            K::PoolExtended {
                data,
                metadata,
                automatic,
            } => Event {
                data: Some(data),
                metadata: Some(metadata),
                automatic: Some(automatic),
                ..Event::bare(time, "pool_extended", layer)
            },
            K::PoolGuardOn => Event::bare(time, "pool_guard_on", layer),
            K::PoolGuardOff => Event::bare(time, "pool_guard_off", layer),
        }
    }
}

/// One layer a removal handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedLayer {
    /// The layer.
    pub name: LayerName,
    /// Removed now, or deferred until its device is released.
    pub result: Removal,
}

/// `DELETE /v1/layers/{name}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveResponse {
    /// The layers handled, children first.
    pub removed: Vec<RemovedLayer>,
}

/// `POST /v1/layers/{name}/deactivate` and `.../unmount`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneResponse {
    /// The layer.
    pub name: LayerName,
    /// What was done ("deactivated", "unmounted").
    pub done: String,
}

/// `POST /v1/pool/extend`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendResponse {
    /// Data area size after.
    pub data: ByteSize,
    /// Metadata area size after.
    pub metadata: ByteSize,
}

/// `GET /v1/version`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionResponse {
    /// thinstackd's version.
    pub version: String,
    /// The API version ("v1").
    pub api: String,
}

/// An error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, for programs: `not_found`, `already_exists`, `busy`, `no_space`, `invalid`, ...
    pub kind: ErrorKind,
    /// For people: what failed and what to do.
    pub message: String,
}

impl From<&Error> for ErrorBody {
    fn from(e: &Error) -> Self {
        ErrorBody {
            error: ErrorDetail {
                kind: e.kind(),
                message: e.to_string(),
            },
        }
    }
}

/// The HTTP status for an error kind.
pub fn status_of(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::NotFound => 404,
        // Unsupported: the request cannot be served by this pool as it is set up (a disk for
        // a pool that is not lvm), which is the client's to change, not a server failure.
        ErrorKind::AlreadyExists | ErrorKind::Busy | ErrorKind::Unsupported => 409,
        ErrorKind::Permission => 403,
        ErrorKind::NoSpace => 507,
        ErrorKind::Invalid => 400,
        ErrorKind::Inconsistent | ErrorKind::Kernel | ErrorKind::Command | ErrorKind::Io => 500,
    }
}

impl From<&DoctorRequest> for crate::doctor::Repair {
    fn from(request: &DoctorRequest) -> crate::doctor::Repair {
        crate::doctor::Repair {
            repair: request.repair,
            delete_unowned: request.repair && request.delete_unowned,
        }
    }
}
