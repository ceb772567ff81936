//! The wire form of the pool's answers (`GET /v1/pool`, `POST /v1/pool/check`,
//! `POST /v1/pool/doctor`): the API's own types, converted from the engine's, the kernel
//! seam's and the doctor's, so a rename inside thinstack cannot change `/v1`.

use serde::{Deserialize, Serialize};

use crate::doctor;
use crate::engine;
use crate::kernel::thin_tools::CheckReport;
use crate::units::{ByteSize, Percent};
use crate::vocab::{self, FsType};

/// `GET /v1/pool`: the pool, its space and health, and the engine's settings and counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolStatus {
    /// What the pool is and what it sits on.
    pub pool: Pool,
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

/// The layers' virtual sizes against the pool's data (`pool.max_overcommit`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overcommit {
    /// The layers' virtual sizes, summed.
    pub virtual_size: ByteSize,
    /// The pool's data: the most it may hold where thinstack grows it, its size otherwise.
    pub capacity: ByteSize,
    /// `virtual_size / capacity`.
    pub ratio: f64,
    /// `pool.max_overcommit`; null when there is no limit.
    pub limit: Option<f64>,
}

/// What a pool is and what it sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// The thin-pool device.
    pub device: String,
    /// The backend ("loop", "lvm", "devices", "existing", "sim").
    pub backend: String,
    /// Allocation unit.
    pub block_size: ByteSize,
    /// What holds the data.
    pub data_source: String,
    /// What holds the metadata.
    pub metadata_source: String,
}

/// Used, total and available bytes of one of the pool's areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Space {
    /// Bytes in use.
    pub used: ByteSize,
    /// Bytes in all.
    pub total: ByteSize,
    /// Bytes free.
    pub available: ByteSize,
}

/// The pool's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// The kernel reports the pool failed.
    pub failed: bool,
    /// The metadata is flagged for `thin_check`.
    pub needs_check: bool,
    /// The pool is read-only.
    pub read_only: bool,
    /// thinstack made it read-only because its metadata is nearly full.
    #[serde(default)]
    pub metadata_guard: bool,
    /// The data area is full.
    pub out_of_space: bool,
    /// What writes meet when the data is full; none when failed.
    pub when_full: Option<WhenFull>,
}

/// What writes meet when the pool's data is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// They fail at once.
    Error,
    /// They wait for an extension (or the kernel's timeout).
    Queue,
}

/// `POST /v1/pool/check`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResponse {
    /// No damage was found.
    pub clean: bool,
    /// What was checked.
    pub checked: String,
    /// thin_check's findings.
    pub findings: String,
}

/// `POST /v1/pool/doctor`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoctorResponse {
    /// Whether this run repaired what it could.
    pub repair: bool,
    /// The leftovers, in the order they were examined.
    pub findings: Vec<Finding>,
}

/// One leftover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finding {
    /// What kind of leftover.
    pub kind: Leftover,
    /// The device, thin id, layer or path concerned.
    pub subject: String,
    /// What was found, and what repair does or did.
    pub detail: String,
    /// Where it stands.
    pub status: FindingStatus,
}

/// What kind of leftover a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Leftover {
    /// A device-mapper device with thinstack's prefix that no record owns.
    DmDevice,
    /// A thin device in the pool that no record owns.
    ThinDevice,
    /// A layer whose thin device is gone from the pool.
    MissingThinDevice,
    /// A mount record whose mount is gone.
    StaleMountRecord,
    /// A mount of a layer that its record does not know.
    UnrecordedMount,
    /// A directory under the state directory's `mnt` that no layer uses.
    StaleMountPoint,
    /// A loop device bound to a deleted file.
    DeletedLoopFile,
    /// A layer whose settling failed; its operations are refused until repaired.
    DegradedLayer,
}

/// Where a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingStatus {
    /// Repair cleans it.
    Repairable,
    /// Cleaned by this run.
    Repaired,
    /// In use: release it and run again.
    InUse,
    /// Not this daemon's: reported, never touched.
    NotOurs,
    /// Only the operator can settle it.
    NeedsOperator,
    /// Repair was tried and failed.
    Failed,
}

impl DoctorResponse {
    /// Whether something of this daemon's is still left to clean or settle (the command
    /// exits 1).
    pub fn needs_attention(&self) -> bool {
        self.findings.iter().any(|f| {
            matches!(
                f.status,
                FindingStatus::Repairable
                    | FindingStatus::InUse
                    | FindingStatus::NeedsOperator
                    | FindingStatus::Failed
            )
        })
    }
}

impl From<engine::Status> for PoolStatus {
    fn from(status: engine::Status) -> PoolStatus {
        PoolStatus {
            pool: Pool {
                name: status.pool.name,
                device: status.pool.device,
                backend: status.pool.backend,
                block_size: status.pool.block_size,
                data_source: status.pool.data_source,
                metadata_source: status.pool.metadata_source,
            },
            base_size: status.base_size,
            filesystem: status.filesystem,
            data: status.data.into(),
            metadata: status.metadata.into(),
            min_free_space: status.min_free_space,
            transaction_id: status.transaction_id,
            health: status.health.into(),
            layers: status.layers,
            deferred_deletions: status.deferred_deletions,
            discard_on_remove: status.discard_on_remove,
            overcommit: Overcommit {
                virtual_size: status.overcommit.virtual_size,
                capacity: status.overcommit.capacity,
                ratio: status.overcommit.ratio,
                limit: status.overcommit.limit,
            },
        }
    }
}

impl From<vocab::Space> for Space {
    fn from(space: vocab::Space) -> Space {
        Space {
            used: space.used,
            total: space.total,
            available: space.available,
        }
    }
}

impl From<vocab::Health> for Health {
    fn from(health: vocab::Health) -> Health {
        Health {
            failed: health.failed,
            needs_check: health.needs_check,
            read_only: health.read_only,
            metadata_guard: health.metadata_guard,
            out_of_space: health.out_of_space,
            when_full: health.when_full.and_then(|policy| match policy {
                vocab::WhenFull::Error => Some(WhenFull::Error),
                vocab::WhenFull::Queue => Some(WhenFull::Queue),
                // A live pool's policy is error or queue; "auto" is the config's choice.
                vocab::WhenFull::Auto => None,
            }),
        }
    }
}

impl From<CheckReport> for CheckResponse {
    fn from(report: CheckReport) -> CheckResponse {
        CheckResponse {
            clean: report.clean,
            checked: report.checked,
            findings: report.findings,
        }
    }
}

impl From<doctor::DoctorReport> for DoctorResponse {
    fn from(report: doctor::DoctorReport) -> DoctorResponse {
        DoctorResponse {
            repair: report.repair,
            findings: report.findings.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<doctor::Finding> for Finding {
    fn from(finding: doctor::Finding) -> Finding {
        Finding {
            kind: match finding.kind {
                doctor::Leftover::DmDevice => Leftover::DmDevice,
                doctor::Leftover::ThinDevice => Leftover::ThinDevice,
                doctor::Leftover::MissingThinDevice => Leftover::MissingThinDevice,
                doctor::Leftover::StaleMountRecord => Leftover::StaleMountRecord,
                doctor::Leftover::UnrecordedMount => Leftover::UnrecordedMount,
                doctor::Leftover::StaleMountPoint => Leftover::StaleMountPoint,
                doctor::Leftover::DeletedLoopFile => Leftover::DeletedLoopFile,
                doctor::Leftover::DegradedLayer => Leftover::DegradedLayer,
            },
            subject: finding.subject,
            detail: finding.detail,
            status: match finding.status {
                doctor::Status::Repairable => FindingStatus::Repairable,
                doctor::Status::Repaired => FindingStatus::Repaired,
                doctor::Status::InUse => FindingStatus::InUse,
                doctor::Status::NotOurs => FindingStatus::NotOurs,
                doctor::Status::NeedsOperator => FindingStatus::NeedsOperator,
                doctor::Status::Failed => FindingStatus::Failed,
            },
        }
    }
}
