//! The wire form of a layer (`GET /v1/layers/{name}` and every route that answers with a
//! layer): the API's own types, converted from the engine's, so a rename inside thinstack
//! cannot change `/v1`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine;
use crate::names::{ContentId, LayerName, ThinId};
use crate::records;
use crate::units::ByteSize;
use crate::vocab::FsType;

/// A layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub mounts: BTreeMap<PathBuf, LayerMount>,
    /// Removal waits for the device to be released.
    pub deferred_removal: bool,
    /// The pool lost this layer's thin device.
    pub missing: bool,
    /// Layers made from this one.
    pub children: Vec<LayerName>,
    /// The containerd snapshot this layer is, if containerd made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Snapshot>,
    /// Why the layer is degraded (its operations are refused until repaired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// What a committed layer holds: given at commit, kept by export and import, so an
    /// incremental stream is applied only onto the content it was made against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<ContentId>,
    /// The layer this one is a checkpoint of (`layer reset --to` takes it back there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_of: Option<LayerName>,
    /// The thin device made ahead for the layer's next reset to its parent (a snapshot of
    /// the parent), which that reset takes instead of snapshotting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_spare: Option<ThinId>,
    /// What it maps and holds alone, where asked for (`GET /v1/layers?usage=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<super::UsageResponse>,
}

/// A layer's life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Being made.
    Creating,
    /// Usable.
    Ready,
    /// Being removed.
    Removing,
}

/// One mount of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerMount {
    /// Users holding it; the last unmount unmounts.
    pub refs: u32,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The containerd snapshot a layer is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The containerd namespace.
    pub namespace: String,
    /// The snapshot's key (or name, when committed).
    pub key: String,
    /// Active, view or committed.
    pub kind: SnapshotKind,
    /// When containerd last changed it, nanoseconds since the Unix epoch.
    pub updated_ns: u64,
}

/// What kind of containerd snapshot a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Writable.
    Active,
    /// Read-only, from View.
    View,
    /// Read-only for good.
    Committed,
}

/// What a removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// The layer and its thin device are gone.
    Removed,
    /// The device is busy; it goes once released.
    Deferred,
}

impl From<engine::Layer> for Layer {
    fn from(layer: engine::Layer) -> Layer {
        Layer {
            name: layer.name,
            thin_id: layer.thin_id,
            parent: layer.parent,
            size: layer.size,
            filesystem: layer.filesystem,
            fs_uuid: layer.fs_uuid,
            committed: layer.committed,
            labels: layer.labels,
            created_ns: layer.created_ns,
            state: layer.state.into(),
            device: layer.device,
            mounts: layer
                .mounts
                .into_iter()
                .map(|(target, mount)| {
                    let mount = LayerMount {
                        refs: mount.refs,
                        read_only: mount.read_only,
                    };
                    (target, mount)
                })
                .collect(),
            deferred_removal: layer.deferred_removal,
            missing: layer.missing,
            children: layer.children,
            snapshot: layer.snapshot.map(Into::into),
            degraded: layer.degraded,
            content_id: layer.content_id,
            checkpoint_of: layer.checkpoint_of,
            reset_spare: layer.reset_spare,
            usage: None,
        }
    }
}

impl From<records::LayerState> for LayerState {
    fn from(state: records::LayerState) -> LayerState {
        match state {
            records::LayerState::Creating => LayerState::Creating,
            records::LayerState::Ready => LayerState::Ready,
            records::LayerState::Removing => LayerState::Removing,
        }
    }
}

impl From<records::SnapshotRecord> for Snapshot {
    fn from(snapshot: records::SnapshotRecord) -> Snapshot {
        Snapshot {
            namespace: snapshot.namespace,
            key: snapshot.key,
            kind: match snapshot.kind {
                records::SnapshotKind::Active => SnapshotKind::Active,
                records::SnapshotKind::View => SnapshotKind::View,
                records::SnapshotKind::Committed => SnapshotKind::Committed,
            },
            updated_ns: snapshot.updated_ns,
        }
    }
}

impl From<engine::Removal> for Removal {
    fn from(removal: engine::Removal) -> Removal {
        match removal {
            engine::Removal::Removed => Removal::Removed,
            engine::Removal::Deferred => Removal::Deferred,
        }
    }
}
