//! containerd's snapshot service, without root (issue 17): every RPC over a real Unix socket
//! against `thinstackd --sim`, each answer's gRPC code held to what containerd's `errdefs`
//! expect for that case, the way containerd itself calls it (the namespace header, the proxy
//! plugin's snapshotter name).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use thinstack::containerd::proto::containerd::services::snapshots::v1 as api;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

mod common;

use common::sim::SimDaemon;

const SERVICE: &str = "/containerd.services.snapshots.v1.Snapshots/";

/// `thinstackd --sim` serving containerd's snapshot service on a socket of its own.
struct Snapshotter {
    daemon: SimDaemon,
    containerd: PathBuf,
}

impl Snapshotter {
    fn start() -> Snapshotter {
        let daemon = SimDaemon::start(|dir| {
            format!(
                "[containerd]\nenabled = true\nsocket = {:?}\nbase_size = \"64M\"\n",
                dir.join("containerd.sock")
            )
        });
        let containerd = daemon.dir().join("containerd.sock");
        Snapshotter { daemon, containerd }
    }

    /// A channel to the snapshot service, once its socket answers.
    async fn channel(&mut self) -> Channel {
        let started = Instant::now();
        loop {
            let path = self.containerd.clone();
            let connector = tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            let endpoint = Endpoint::try_from("http://thinstack").unwrap();
            if let Ok(channel) = endpoint.connect_with_connector(connector).await {
                return channel;
            }
            self.daemon.still_starting(started, "containerd's socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A client as containerd's proxy plugin is one, with the RPCs it made counted.
struct Client {
    grpc: tonic::client::Grpc<Channel>,
    called: std::collections::BTreeSet<&'static str>,
}

impl Client {
    fn request<T>(namespace: Option<&str>, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(namespace) = namespace {
            request
                .metadata_mut()
                .insert("containerd-namespace", namespace.parse().unwrap());
        }
        request
    }

    async fn unary<Q, A>(
        &mut self,
        rpc: &'static str,
        ns: Option<&str>,
        message: Q,
    ) -> Result<A, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        self.called.insert(rpc);
        self.grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("{SERVICE}{rpc}")).unwrap();
        let codec = tonic_prost::ProstCodec::default();
        self.grpc
            .unary(Self::request(ns, message), path, codec)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn list(&mut self, ns: &str, filters: &[&str]) -> Result<Vec<String>, Status> {
        self.called.insert("List");
        self.grpc.ready().await.unwrap();
        let path = PathAndQuery::from_static("/containerd.services.snapshots.v1.Snapshots/List");
        let request = api::ListSnapshotsRequest {
            snapshotter: "thinstack".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let codec = tonic_prost::ProstCodec::<api::ListSnapshotsRequest, api::ListSnapshotsResponse>::default();
        let mut stream = self
            .grpc
            .server_streaming(Self::request(Some(ns), request), path, codec)
            .await?
            .into_inner();
        let mut names = Vec::new();
        while let Some(batch) = stream.message().await? {
            names.extend(batch.info.into_iter().map(|info| info.name));
        }
        names.sort();
        Ok(names)
    }
}

fn prepare(key: &str, parent: &str) -> api::PrepareSnapshotRequest {
    api::PrepareSnapshotRequest {
        snapshotter: "thinstack".into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    }
}

fn view(key: &str, parent: &str) -> api::ViewSnapshotRequest {
    api::ViewSnapshotRequest {
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
        labels: Default::default(),
    }
}

fn key_of<T: Default>(key: &str, make: impl FnOnce(&mut T, String)) -> T {
    let mut message = T::default();
    make(&mut message, key.to_string());
    message
}

fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_with_the_code_containerd_expects() {
    let mut daemon = Snapshotter::start();
    let channel = daemon.channel().await;
    let mut c = Client {
        grpc: tonic::client::Grpc::new(channel),
        called: Default::default(),
    };
    let ns = Some("default");
    type Prepared = api::PrepareSnapshotResponse;
    type Empty = ();

    // Prepare: a root, then its rules.
    let root: Prepared = c.unary("Prepare", ns, prepare("root", "")).await.unwrap();
    assert_eq!(root.mounts.len(), 1, "{root:?}");
    assert_eq!(root.mounts[0].r#type, "ext4", "{root:?}");
    let again: Result<Prepared, _> = c.unary("Prepare", ns, prepare("root", "")).await;
    assert_eq!(code(again), Code::AlreadyExists);
    let orphan: Result<Prepared, _> = c.unary("Prepare", ns, prepare("x", "nope")).await;
    assert_eq!(code(orphan), Code::NotFound);
    let nameless: Result<Prepared, _> = c.unary("Prepare", ns, prepare("", "")).await;
    assert_eq!(code(nameless), Code::InvalidArgument);
    // Without the header a request is in the key space "" (containerd's metadata layer puts
    // the namespace into its keys), apart from "default".
    let no_namespace: Result<Prepared, _> = c.unary("Prepare", None, prepare("y", "")).await;
    assert_eq!(code(no_namespace), Code::Ok);
    let of_active: Result<Prepared, _> = c.unary("Prepare", ns, prepare("z", "root")).await;
    // containerd's own metastore: "parent is not committed snapshot", invalid argument.
    assert_eq!(
        code(of_active),
        Code::InvalidArgument,
        "a parent must be committed"
    );

    // Mounts and Commit.
    let mounts: Result<api::MountsResponse, _> = c
        .unary(
            "Mounts",
            ns,
            key_of("root", |m: &mut api::MountsRequest, k| m.key = k),
        )
        .await;
    assert_eq!(code(mounts), Code::Ok);
    let missing: Result<api::MountsResponse, _> = c
        .unary(
            "Mounts",
            ns,
            key_of("nope", |m: &mut api::MountsRequest, k| m.key = k),
        )
        .await;
    assert_eq!(code(missing), Code::NotFound);
    let done: Result<Empty, _> = c.unary("Commit", ns, commit("base", "root")).await;
    assert_eq!(code(done), Code::Ok);
    let gone: Result<Empty, _> = c.unary("Commit", ns, commit("base2", "root")).await;
    assert_eq!(
        code(gone),
        Code::NotFound,
        "the active key is gone after its commit"
    );
    let _: Prepared = c
        .unary("Prepare", ns, prepare("kid", "base"))
        .await
        .unwrap();
    let taken: Result<Empty, _> = c.unary("Commit", ns, commit("base", "kid")).await;
    assert_eq!(code(taken), Code::AlreadyExists);

    // View.
    let seen: Result<api::ViewSnapshotResponse, _> =
        c.unary("View", ns, view("look", "base")).await;
    assert_eq!(code(seen), Code::Ok);
    let blind: Result<api::ViewSnapshotResponse, _> =
        c.unary("View", ns, view("look2", "nope")).await;
    assert_eq!(code(blind), Code::NotFound);

    // Stat, Update, List, Usage.
    let stat = |key: &str| key_of(key, |m: &mut api::StatSnapshotRequest, k| m.key = k);
    let info: api::StatSnapshotResponse = c.unary("Stat", ns, stat("kid")).await.unwrap();
    let info = info.info.unwrap();
    assert_eq!((info.name.as_str(), info.parent.as_str()), ("kid", "base"));
    assert_eq!(info.kind, api::Kind::Active as i32);
    let unknown: Result<api::StatSnapshotResponse, _> = c.unary("Stat", ns, stat("nope")).await;
    assert_eq!(code(unknown), Code::NotFound);
    let other_namespace: Result<api::StatSnapshotResponse, _> =
        c.unary("Stat", Some("elsewhere"), stat("kid")).await;
    assert_eq!(
        code(other_namespace),
        Code::NotFound,
        "namespaces are apart"
    );
    let labelled = api::UpdateSnapshotRequest {
        snapshotter: "thinstack".into(),
        info: Some(api::Info {
            name: "kid".into(),
            labels: [("role".to_string(), "app".to_string())].into(),
            ..Default::default()
        }),
        update_mask: None,
    };
    let updated: api::UpdateSnapshotResponse = c.unary("Update", ns, labelled).await.unwrap();
    assert_eq!(updated.info.unwrap().labels["role"], "app");
    let nothing = api::UpdateSnapshotRequest {
        snapshotter: "thinstack".into(),
        info: Some(api::Info {
            name: "nope".into(),
            ..Default::default()
        }),
        update_mask: None,
    };
    let missing: Result<api::UpdateSnapshotResponse, _> = c.unary("Update", ns, nothing).await;
    assert_eq!(code(missing), Code::NotFound);
    assert_eq!(
        c.list("default", &[]).await.unwrap(),
        ["base", "kid", "look"]
    );
    assert_eq!(
        c.list("default", &["labels.role==app"]).await.unwrap(),
        ["kid"]
    );
    assert_eq!(
        code(c.list("default", &["kind=="]).await),
        Code::InvalidArgument
    );
    let usage = |key: &str| key_of(key, |m: &mut api::UsageRequest, k| m.key = k);
    let used: Result<api::UsageResponse, _> = c.unary("Usage", ns, usage("kid")).await;
    assert_eq!(code(used), Code::Ok);
    let no_usage: Result<api::UsageResponse, _> = c.unary("Usage", ns, usage("nope")).await;
    assert_eq!(code(no_usage), Code::NotFound);

    // Remove: not a parent with children; then children first.
    let remove = |key: &str| key_of(key, |m: &mut api::RemoveSnapshotRequest, k| m.key = k);
    let parent: Result<Empty, _> = c.unary("Remove", ns, remove("base")).await;
    assert_eq!(code(parent), Code::FailedPrecondition);
    for key in ["kid", "look", "base"] {
        let removed: Result<Empty, _> = c.unary("Remove", ns, remove(key)).await;
        assert_eq!(code(removed), Code::Ok, "{key}");
    }
    let twice: Result<Empty, _> = c.unary("Remove", ns, remove("base")).await;
    assert_eq!(code(twice), Code::NotFound);
    let cleanup = api::CleanupRequest {
        snapshotter: "thinstack".into(),
    };
    let cleaned: Result<Empty, _> = c.unary("Cleanup", ns, cleanup).await;
    assert_eq!(code(cleaned), Code::Ok);
    assert!(c.list("default", &[]).await.unwrap().is_empty());

    let every = [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup",
    ];
    let missed: Vec<_> = every
        .iter()
        .filter(|rpc| !c.called.contains(*rpc))
        .collect();
    assert!(missed.is_empty(), "RPCs not driven: {missed:?}");
}
