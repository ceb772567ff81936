//! The gRPC service: each call decoded, run on the engine in a blocking thread, and its error
//! given the gRPC status containerd maps back to its own (`errdefs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Response, Status};

use super::change::Change;
use super::filter::Filters;
use super::proto::containerd::services::snapshots::v1 as api;
use super::proto::containerd::types::Mount;
use crate::engine::{Engine, NewSnapshot, SnapshotInfo, SnapshotMount, SnapshotRoot};
use crate::error::{Error, ErrorKind};
use crate::kernel::{FsKernel, PoolKernel};
use crate::records::SnapshotKind;

/// The gRPC header that names the containerd namespace.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Snapshots listed per stream message.
const LIST_BATCH: usize = 100;

/// Whatever holds the engine: the daemon, or an engine itself in tests.
pub trait EngineHolder: Send + Sync + 'static {
    /// The pool kernel.
    type Pool: PoolKernel;
    /// The filesystem kernel.
    type Fs: FsKernel;
    /// The engine.
    fn engine(&self) -> &Engine<Self::Pool, Self::Fs>;
    /// An RPC (`Prepare`, ...) took `elapsed`, and failed with `error` if it did: for the
    /// holder's metrics, where it keeps any.
    fn observe(&self, _operation: &str, _elapsed: Duration, _error: Option<ErrorKind>) {}
}

impl<K, F> EngineHolder for Engine<K, F>
where
    K: PoolKernel + Send + Sync + 'static,
    F: FsKernel + Send + Sync + 'static,
{
    type Pool = K;
    type Fs = F;
    fn engine(&self) -> &Engine<K, F> {
        self
    }
}

/// containerd's snapshot service over the engine `H` holds.
pub struct SnapshotService<H> {
    holder: Arc<H>,
    root: SnapshotRoot,
}

impl<H: EngineHolder> SnapshotService<H> {
    /// The service; new roots get `root`'s size and filesystem.
    pub fn new(holder: Arc<H>, root: SnapshotRoot) -> Self {
        SnapshotService { holder, root }
    }

    /// Run `op` on the engine off the async threads (engine calls block on the kernel).
    /// `operation` names it (`containerd.Mounts`) for the holder's metrics.
    async fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        op: impl FnOnce(&Engine<H::Pool, H::Fs>) -> crate::error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let holder = self.holder.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = op(holder.engine());
            let error = result.as_ref().err().map(Error::kind);
            holder.observe(operation, started.elapsed(), error);
            result
        })
        .await
        .map_err(|e| Status::internal(format!("the operation did not finish: {e}")))?
        .map_err(status_of)
    }

    /// [`SnapshotService::run`] for an operation that changes something: audited when it
    /// ends, on its blocking thread, so even if containerd gives up waiting.
    async fn change<T: Send + 'static>(
        &self,
        change: Change,
        op: impl FnOnce(&Engine<H::Pool, H::Fs>) -> crate::error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        self.run(change.operation(), move |engine| {
            let result = op(engine);
            change.finished(&result);
            result
        })
        .await
    }

    async fn create<T>(
        &self,
        operation: &'static str,
        request: Request<T>,
        kind: SnapshotKind,
    ) -> Result<Vec<Mount>, Status>
    where
        T: CreateRequest,
    {
        let change = Change::begin(operation, &request);
        let namespace = namespace_of(&request).inspect_err(|s| change.refused(s))?;
        let request = request.into_inner();
        let (key, parent, labels) = request.parts();
        let change = change.on(&key);
        let root = self.root;
        let mount = self
            .change(change, move |engine| {
                let new = NewSnapshot {
                    namespace: &namespace,
                    key: &key,
                    parent: &parent,
                    kind,
                    labels: labels.into_iter().collect(),
                };
                engine.snapshot_create(new, root)
            })
            .await?;
        Ok(mounts_of(&mount))
    }
}

/// Prepare's and View's requests alike.
trait CreateRequest {
    fn parts(self) -> (String, String, std::collections::HashMap<String, String>);
}

impl CreateRequest for api::PrepareSnapshotRequest {
    fn parts(self) -> (String, String, std::collections::HashMap<String, String>) {
        (self.key, self.parent, self.labels)
    }
}

impl CreateRequest for api::ViewSnapshotRequest {
    fn parts(self) -> (String, String, std::collections::HashMap<String, String>) {
        (self.key, self.parent, self.labels)
    }
}

/// The request's containerd namespace. Without the header, requests share the key space ""
/// (containerd's own metadata layer puts the namespace into the keys it sends).
fn namespace_of<T>(request: &Request<T>) -> Result<String, Status> {
    match request.metadata().get(NAMESPACE_HEADER) {
        None => Ok(String::new()),
        Some(value) => value.to_str().map(str::to_string).map_err(|_| {
            Status::invalid_argument(format!("the {NAMESPACE_HEADER} header is not text"))
        }),
    }
}

/// The gRPC status containerd turns back into the matching `errdefs` error.
pub fn status_of(error: Error) -> Status {
    Status::new(code_of(error.kind()), error.to_string())
}

/// The gRPC code of an error of `kind`.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::Busy | ErrorKind::Inconsistent | ErrorKind::Unsupported => {
            Code::FailedPrecondition
        }
        ErrorKind::NoSpace => Code::ResourceExhausted,
        ErrorKind::Permission => Code::PermissionDenied,
        ErrorKind::Kernel | ErrorKind::Command | ErrorKind::Io => Code::Internal,
    }
}

/// The mount containerd makes of a snapshot: its device, read-only for views, and `nouuid`
/// for xfs (snapshots share their origin's filesystem UUID).
fn mounts_of(mount: &SnapshotMount) -> Vec<Mount> {
    let read_only: &[&str] = if mount.read_only { &["ro"] } else { &[] };
    let options: Vec<String> = read_only
        .iter()
        .chain(crate::kernel::fs::implied_mount_options(mount.filesystem))
        .map(|o| o.to_string())
        .collect();
    vec![Mount {
        r#type: mount.filesystem.name().to_string(),
        source: mount.device.display().to_string(),
        target: String::new(),
        options,
    }]
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

fn kind_of(kind: SnapshotKind) -> api::Kind {
    match kind {
        SnapshotKind::Active => api::Kind::Active,
        SnapshotKind::View => api::Kind::View,
        SnapshotKind::Committed => api::Kind::Committed,
    }
}

fn info_of(info: SnapshotInfo) -> api::Info {
    api::Info {
        name: info.key,
        parent: info.parent,
        kind: kind_of(info.kind) as i32,
        created_at: Some(timestamp(info.created_ns)),
        updated_at: Some(timestamp(info.updated_ns)),
        labels: info.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl<H: EngineHolder> api::snapshots_server::Snapshots for SnapshotService<H> {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let mounts = self
            .create("containerd.Prepare", request, SnapshotKind::Active)
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let mounts = self
            .create("containerd.View", request, SnapshotKind::View)
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let namespace = namespace_of(&request)?;
        let key = request.into_inner().key;
        let mount = self
            .run("containerd.Mounts", move |engine| {
                engine.snapshot_mounts(&namespace, &key)
            })
            .await?;
        Ok(Response::new(api::MountsResponse {
            mounts: mounts_of(&mount),
        }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let change = Change::begin("containerd.Commit", &request);
        let namespace = namespace_of(&request).inspect_err(|s| change.refused(s))?;
        let request = request.into_inner();
        let change = change.on(&request.key);
        self.change(change, move |engine| {
            let labels: BTreeMap<String, String> = request.labels.into_iter().collect();
            engine.snapshot_commit(&namespace, &request.key, &request.name, labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let change = Change::begin("containerd.Remove", &request);
        let namespace = namespace_of(&request).inspect_err(|s| change.refused(s))?;
        let key = request.into_inner().key;
        let change = change.on(&key);
        self.change(change, move |engine| {
            engine.snapshot_remove(&namespace, &key)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let namespace = namespace_of(&request)?;
        let key = request.into_inner().key;
        let info = self
            .run("containerd.Stat", move |engine| {
                engine.snapshot_stat(&namespace, &key)
            })
            .await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info_of(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let change = Change::begin("containerd.Update", &request);
        let namespace = namespace_of(&request).inspect_err(|s| change.refused(s))?;
        let request = request.into_inner();
        let info = request
            .info
            .ok_or_else(|| Status::invalid_argument("the update carries no snapshot info"))
            .inspect_err(|s| change.refused(s))?;
        let change = change.on(&info.name);
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let labels: BTreeMap<String, String> = info.labels.into_iter().collect();
        let updated = self
            .change(change, move |engine| {
                engine.snapshot_update(&namespace, &info.name, &labels, &paths)
            })
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info_of(updated)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<api::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let namespace = namespace_of(&request)?;
        let filters =
            Filters::parse(&request.into_inner().filters).map_err(Status::invalid_argument)?;
        let infos = self
            .run("containerd.List", move |engine| {
                Ok(engine.snapshot_list(&namespace))
            })
            .await?;
        let matching: Vec<api::Info> = infos
            .into_iter()
            .filter(|info| filters.matches(info))
            .map(info_of)
            .collect();
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = matching
            .chunks(LIST_BATCH)
            .map(|chunk| {
                Ok(api::ListSnapshotsResponse {
                    info: chunk.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let namespace = namespace_of(&request)?;
        let key = request.into_inner().key;
        let (size, inodes) = self
            .run("containerd.Usage", move |engine| {
                engine.snapshot_usage(&namespace, &key)
            })
            .await?;
        Ok(Response::new(api::UsageResponse {
            size: i64::try_from(size.bytes()).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, request: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let change = Change::begin("containerd.Cleanup", &request);
        self.change(change, |engine| engine.process_deferred().map(|_| ()))
            .await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::api::snapshots_server::Snapshots;
    use super::*;
    use crate::engine::Settings;
    use crate::kernel::sim::Sim;
    use crate::units::ByteSize;
    use crate::vocab::FsType;
    use tokio_stream::StreamExt;
    use tonic::Code;

    struct Fixture {
        service: SnapshotService<Engine<Sim, Sim>>,
        _dir: tempfile::TempDir,
    }

    fn fixture(filesystem: FsType) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sim = Sim::default();
        let settings = Settings {
            discard_on_remove: false,
            busy_retries: 1,
            ..Settings::for_tests(dir.path())
        };
        let (engine, _) = Engine::open(sim.clone(), sim, settings).unwrap();
        let root = SnapshotRoot {
            size: ByteSize::gib(1),
            filesystem,
        };
        Fixture {
            service: SnapshotService::new(Arc::new(engine), root),
            _dir: dir,
        }
    }

    fn in_ns<T>(namespace: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, namespace.parse().unwrap());
        request
    }

    fn prepare(key: &str, parent: &str) -> api::PrepareSnapshotRequest {
        api::PrepareSnapshotRequest {
            snapshotter: "thinstack".into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        }
    }

    fn commit(name: &str, key: &str) -> api::CommitSnapshotRequest {
        api::CommitSnapshotRequest {
            snapshotter: "thinstack".into(),
            name: name.into(),
            key: key.into(),
            labels: [("l".to_string(), name.to_string())].into(),
        }
    }

    fn stat(key: &str) -> api::StatSnapshotRequest {
        api::StatSnapshotRequest {
            snapshotter: "thinstack".into(),
            key: key.into(),
        }
    }

    async fn list(
        s: &SnapshotService<Engine<Sim, Sim>>,
        ns: &str,
        filters: &[&str],
    ) -> Result<Vec<String>, Status> {
        let request = api::ListSnapshotsRequest {
            snapshotter: "thinstack".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut stream = s.list(in_ns(ns, request)).await?.into_inner();
        let mut names = Vec::new();
        while let Some(batch) = stream.next().await {
            names.extend(batch?.info.into_iter().map(|i| i.name));
        }
        names.sort();
        Ok(names)
    }

    #[tokio::test]
    async fn the_service_answers_with_containerds_status_codes() {
        let f = fixture(FsType::Ext4);
        let s = &f.service;
        let mounts = s
            .prepare(in_ns("a", prepare("/k/1", "")))
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].r#type, "ext4");
        assert!(mounts[0].options.is_empty(), "{:?}", mounts[0].options);
        let code = |r: Result<Response<()>, Status>| r.unwrap_err().code();
        let again = s
            .prepare(in_ns("a", prepare("/k/1", "")))
            .await
            .unwrap_err();
        assert_eq!(again.code(), Code::AlreadyExists);
        let missing = s.stat(in_ns("b", stat("/k/1"))).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        let not_committed = s
            .prepare(in_ns("a", prepare("/k/2", "/k/1")))
            .await
            .unwrap_err();
        assert_eq!(not_committed.code(), Code::InvalidArgument);
        s.commit(in_ns("a", commit("c", "/k/1"))).await.unwrap();
        assert_eq!(
            code(s.commit(in_ns("a", commit("d", "c"))).await),
            Code::FailedPrecondition
        );
        let view = api::ViewSnapshotRequest {
            snapshotter: "thinstack".into(),
            key: "v".into(),
            parent: "c".into(),
            labels: Default::default(),
        };
        let mounts = s.view(in_ns("a", view)).await.unwrap().into_inner().mounts;
        assert_eq!(mounts[0].options, ["ro"]);
        let remove = |key: &str| api::RemoveSnapshotRequest {
            snapshotter: "thinstack".into(),
            key: key.into(),
        };
        let refused = s.remove(in_ns("a", remove("c"))).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(
            refused.message().contains("remove"),
            "{}",
            refused.message()
        );
        let mounts_of_committed = s
            .mounts(in_ns(
                "a",
                api::MountsRequest {
                    snapshotter: "thinstack".into(),
                    key: "c".into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(mounts_of_committed.code(), Code::FailedPrecondition);
        s.remove(in_ns("a", remove("v"))).await.unwrap();
        s.remove(in_ns("a", remove("c"))).await.unwrap();
        assert_eq!(
            code(s.remove(in_ns("a", remove("c"))).await),
            Code::NotFound
        );
    }

    #[tokio::test]
    async fn stat_update_and_list_follow_containerd() {
        let f = fixture(FsType::Xfs);
        let s = &f.service;
        let mounts = s
            .prepare(in_ns("n", prepare("a", "")))
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(mounts[0].r#type, "xfs");
        assert_eq!(mounts[0].options, ["nouuid"]);
        s.commit(in_ns("n", commit("p", "a"))).await.unwrap();
        s.prepare(in_ns("n", prepare("b", "p"))).await.unwrap();
        s.prepare(in_ns("other", prepare("b", ""))).await.unwrap();
        let info = s
            .stat(in_ns("n", stat("b")))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.parent, "p");
        assert_eq!(info.kind, api::Kind::Active as i32);
        assert_eq!(info.created_at, info.updated_at);
        let created = info.created_at.unwrap();
        assert!(created.seconds > 1_700_000_000 && created.nanos >= 0);
        // Update: labels only.
        let mut changed = info.clone();
        changed.labels = [("x".to_string(), "1".to_string())].into();
        changed.parent = "ignored without a mask naming it".into();
        let update = |info: api::Info, paths: &[&str]| {
            in_ns(
                "n",
                api::UpdateSnapshotRequest {
                    snapshotter: "thinstack".into(),
                    info: Some(info),
                    update_mask: Some(prost_types::FieldMask {
                        paths: paths.iter().map(|p| p.to_string()).collect(),
                    }),
                },
            )
        };
        let updated = s
            .update(update(changed.clone(), &["labels.x"]))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(updated.labels.get("x").map(String::as_str), Some("1"));
        assert_eq!(updated.parent, "p");
        assert_eq!(updated.created_at, info.created_at);
        assert_ne!(updated.updated_at, info.updated_at);
        let bad = s.update(update(changed, &["parent"])).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        // List: this namespace only, containerd's filters.
        assert_eq!(list(s, "n", &[]).await.unwrap(), ["b", "p"]);
        assert_eq!(list(s, "n", &["kind==committed"]).await.unwrap(), ["p"]);
        assert_eq!(
            list(s, "n", &["parent==p", "labels.x"]).await.unwrap(),
            ["b"]
        );
        assert_eq!(list(s, "other", &[]).await.unwrap(), ["b"]);
        let bad = list(s, "n", &["kind=="]).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
    }
}
