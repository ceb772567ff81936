//! The API's routes: one table, used by the server to dispatch and by a test to check that
//! the OpenAPI document describes exactly these routes.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::Daemon;
use crate::api;
use crate::api::{
    AddDeviceRequest, AddDeviceResponse, AdoptRequest, BreakLockResponse, CheckpointRequest,
    CreateRequest, DestroyRequest, DestroyResponse, DeviceResponse, DoctorRequest, DoneResponse,
    ExtendRequest, ExtendResponse, MountRequest, MountResponse, PruneRequest, PruneResponse,
    RemoveResponse, RemovedLayer, ResetRequest, ResizeRequest, TrimResponse, UnmountRequest,
    UsageResponse, VersionResponse,
};
use crate::engine::{CreateLayer, OutsideChange, PruneFilter, Removal};
use crate::error::{Error, ErrorKind, Result};
use crate::names::LayerName;
use crate::units::Timeout;

/// What a handler gets from a request.
pub struct Call<'a> {
    /// The `{name}` path parameter, when the route has one.
    pub name: Option<&'a str>,
    /// Query parameters, decoded, in order.
    pub query: Vec<(String, String)>,
    /// The body (JSON, or empty).
    pub body: &'a [u8],
}

/// A handler's answer: HTTP status and body.
pub type Reply = (u16, Body);

/// A handler's body: JSON (every `/v1` route), text of a type of its own (`/metrics`), or
/// the stream of events (`/v1/events`).
pub enum Body {
    /// A JSON document.
    Json(Value),
    /// Text, with its `Content-Type`.
    Text(&'static str, String),
    /// Events as they happen, one JSON object a line; after `count` of them, if given.
    Events(
        tokio::sync::broadcast::Receiver<crate::engine::Event>,
        Option<u64>,
    ),
}

type Handler = fn(&Daemon, &Call) -> Result<Reply>;

/// What serving a route takes.
#[derive(Clone, Copy)]
pub enum Action {
    /// A handler of a JSON (or empty) body, read whole first.
    Call(Handler),
    /// A layer's export: a byte stream answered as it is made ([`super::layer_stream`]).
    Export,
    /// A layer's import: a byte stream read as it comes ([`super::layer_stream`]).
    Import,
}

/// One route.
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path template; `{name}` matches one layer name.
    pub path: &'static str,
    /// How it is served.
    pub action: Action,
}

/// Every route the daemon serves.
pub const ROUTES: &[Route] = &[
    route("GET", "/metrics", metrics),
    route("GET", "/v1/openapi.json", openapi),
    route("GET", "/v1/version", version),
    route("GET", "/v1/pool", pool_status),
    route("GET", "/v1/events", events),
    route("POST", "/v1/pool/extend", pool_extend),
    route("POST", "/v1/pool/add-device", pool_add_device),
    route("POST", "/v1/pool/check", pool_check),
    route("POST", "/v1/pool/doctor", pool_doctor),
    route("POST", "/v1/pool/adopt", pool_adopt),
    route("POST", "/v1/pool/destroy", pool_destroy),
    route("POST", "/v1/pool/prune", pool_prune),
    route("GET", "/v1/layers", list_layers),
    route("POST", "/v1/layers", create_layer),
    route("GET", "/v1/layers/{name}", inspect_layer),
    route("DELETE", "/v1/layers/{name}", remove_layer),
    route("POST", "/v1/layers/{name}/commit", commit_layer),
    route("GET", "/v1/layers/{name}/usage", layer_usage),
    route("POST", "/v1/layers/{name}/activate", activate_layer),
    route("POST", "/v1/layers/{name}/deactivate", deactivate_layer),
    route("POST", "/v1/layers/{name}/break-lock", break_lock),
    route("POST", "/v1/layers/{name}/mount", mount_layer),
    route("POST", "/v1/layers/{name}/unmount", unmount_layer),
    route("POST", "/v1/layers/{name}/resize", resize_layer),
    route("POST", "/v1/layers/{name}/trim", trim_layer),
    route("POST", "/v1/layers/{name}/checkpoint", checkpoint_layer),
    route("POST", "/v1/layers/{name}/reset", reset_layer),
    streamed("GET", "/v1/layers/{name}/export", Action::Export),
    streamed("POST", "/v1/layers/{name}/import", Action::Import),
];

const fn route(method: &'static str, path: &'static str, handler: Handler) -> Route {
    streamed(method, path, Action::Call(handler))
}

const fn streamed(method: &'static str, path: &'static str, action: Action) -> Route {
    Route {
        method,
        path,
        action,
    }
}

/// The OpenAPI document, kept in the repository next to this file.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What a request path and method resolve to.
pub enum Resolved<'p> {
    /// A route, with its `{name}` parameter.
    Route(&'static Route, Option<&'p str>),
    /// The path exists, but not with this method; the methods it has.
    WrongMethod(Vec<&'static str>),
    /// No such path.
    NoPath,
}

/// Find the route for `method` and `path`.
pub fn resolve<'p>(method: &str, path: &'p str) -> Resolved<'p> {
    let mut methods = Vec::new();
    for route in ROUTES {
        let Some(name) = match_path(route.path, path) else {
            continue;
        };
        if route.method == method {
            return Resolved::Route(route, name);
        }
        methods.push(route.method);
    }
    if methods.is_empty() {
        Resolved::NoPath
    } else {
        Resolved::WrongMethod(methods)
    }
}

/// `Some(name parameter)` when `path` fits `template`.
fn match_path<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    let mut name = None;
    let mut segments = path.split('/');
    for expected in template.split('/') {
        let segment = segments.next()?;
        if expected == "{name}" {
            if segment.is_empty() {
                return None;
            }
            name = Some(segment);
        } else if expected != segment {
            return None;
        }
    }
    segments.next().is_none().then_some(name)
}

impl Route {
    /// Run the route's handler (a streamed route is served by [`super::layer_stream`]).
    pub fn call(&self, daemon: &Daemon, call: &Call) -> Result<Reply> {
        refuse_once_destroyed(daemon, self.method)?;
        match self.action {
            Action::Call(handler) => handler(daemon, call),
            Action::Export | Action::Import => Err(Error::inconsistent(format!(
                "{} {} streams its body and has no JSON handler",
                self.method, self.path
            ))),
        }
    }
}

// ----- helpers ---------------------------------------------------------------------------

/// Once the pool is destroyed, only reads are answered.
pub(super) fn refuse_once_destroyed(daemon: &Daemon, method: &str) -> Result<()> {
    if daemon.is_destroyed() && method != "GET" {
        return Err(Error::new(
            ErrorKind::NotFound,
            "the pool was destroyed and thinstackd is stopping; start it again to make a new pool",
        ));
    }
    Ok(())
}

fn ok<T: Serialize>(value: T) -> Result<Reply> {
    json(200, value)
}

fn json<T: Serialize>(status: u16, value: T) -> Result<Reply> {
    let value = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding the answer: {e}")))?;
    Ok((status, Body::Json(value)))
}

/// The JSON body as `T`; an empty body is `{}`.
fn body<T: DeserializeOwned>(call: &Call) -> Result<T> {
    let bytes = if call.body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        call.body
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let place = if path == "." {
            String::new()
        } else {
            format!(" at {path}")
        };
        Error::invalid(format!(
            "request body is not valid{place}: {inner}; see /v1/openapi.json"
        ))
    })
}

/// A yes-or-no query parameter: absent is false; `key`, `key=true` and `key=false`.
pub(super) fn flag(call: &Call, key: &str) -> Result<bool> {
    match call.query.iter().find(|(k, _)| k == key) {
        None => Ok(false),
        Some((_, v)) if v == "true" || v.is_empty() => Ok(true),
        Some((_, v)) if v == "false" => Ok(false),
        Some((_, v)) => Err(Error::invalid(format!(
            "{key}={v:?}: write {key}=true or {key}=false"
        ))),
    }
}

fn name<'c>(call: &'c Call) -> &'c str {
    call.name.unwrap_or_default()
}

/// Refuse query parameters a route does not take (a typo must not mean "default").
pub(super) fn only_query(call: &Call, allowed: &[&str]) -> Result<()> {
    match call
        .query
        .iter()
        .find(|(k, _)| !allowed.contains(&k.as_str()))
    {
        Some((key, _)) => Err(Error::invalid(format!(
            "unknown query parameter {key:?}; this route takes {}",
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            }
        ))),
        None => Ok(()),
    }
}

// ----- handlers --------------------------------------------------------------------------

fn metrics(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    Ok((
        200,
        Body::Text(crate::metrics::CONTENT_TYPE, daemon.render_metrics()),
    ))
}

fn openapi(_: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    static DOCUMENT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let document =
        DOCUMENT.get_or_init(|| serde_json::from_str(OPENAPI).expect("openapi.json is JSON"));
    ok(document)
}

fn version(_: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    ok(VersionResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api: "v1".to_string(),
    })
}

fn pool_status(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    ok(api::PoolStatus::from(daemon.engine.status()?))
}

fn events(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &["count"])?;
    let count = match call.query.iter().find(|(k, _)| k == "count") {
        None => None,
        Some((_, v)) => Some(v.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
            Error::invalid(format!(
                "count={v:?}: write how many events to wait for, a whole number of at least 1"
            ))
        })?),
    };
    Ok((200, Body::Events(daemon.engine.subscribe(), count)))
}

fn pool_extend(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: ExtendRequest = body(call)?;
    let (data, metadata) = daemon.extend(request.data, request.metadata)?;
    ok(ExtendResponse { data, metadata })
}

fn pool_add_device(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: AddDeviceRequest = body(call)?;
    let free = daemon.add_device(&request.device, request.force)?;
    ok(AddDeviceResponse {
        device: request.device,
        volume_group_free: free,
    })
}

fn pool_check(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    ok(api::CheckResponse::from(daemon.check()?))
}

fn pool_doctor(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: DoctorRequest = body(call)?;
    if request.delete_unowned && !request.repair {
        return Err(Error::invalid(
            "delete_unowned deletes thin devices only in a repair run; send repair: true too",
        ));
    }
    let report = crate::doctor::examine(daemon.engine(), crate::doctor::Repair::from(&request))?;
    ok(api::DoctorResponse::from(report))
}

fn pool_adopt(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: AdoptRequest = body(call)?;
    let layer = daemon.engine().adopt(request.thin_id, &request.name)?;
    json(201, api::Layer::from(layer))
}

fn pool_destroy(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: DestroyRequest = body(call)?;
    let layers_removed = daemon.destroy(request.force)?;
    ok(DestroyResponse { layers_removed })
}

fn pool_prune(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: PruneRequest = body(call)?;
    let filter = PruneFilter {
        labels: request.labels,
        older_than: request.older_than.map(Timeout::duration),
    };
    let report = daemon.engine.prune(&filter, request.dry_run)?;
    ok(PruneResponse::of(report, request.dry_run))
}

fn list_layers(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &["label", "usage"])?;
    let with_usage = flag(call, "usage")?;
    let mut labels = BTreeMap::new();
    for (_, pair) in call.query.iter().filter(|(k, _)| k == "label") {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            Error::invalid(format!(
                "label filter {pair:?} is not KEY=VALUE; write label=role%3Dbase"
            ))
        })?;
        labels.insert(key.to_string(), value.to_string());
    }
    let mut usage = if with_usage {
        daemon.engine.usage_all(&labels)?
    } else {
        BTreeMap::new()
    };
    let layers: Vec<api::Layer> = daemon
        .engine
        .list(&labels)?
        .into_iter()
        .map(|layer| {
            let usage = usage.remove(&layer.name);
            let name = layer.name.clone();
            api::Layer {
                usage: usage.map(|u| UsageResponse::of(name, u)),
                ..layer.into()
            }
        })
        .collect();
    ok(layers)
}

fn create_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: CreateRequest = body(call)?;
    if let Some(parent) = &request.parent {
        if daemon.engine.inspect(parent).is_ok() {
            daemon
                .engine
                .refuse_containerds(parent, OutsideChange::GiveChildren)?;
        }
    }
    let create = CreateLayer {
        name: request.name.clone(),
        parent: request.parent.clone(),
        size: request.size,
        filesystem: request.filesystem,
        labels: request.labels.clone(),
    };
    let (layer, made) = daemon
        .engine
        .create_or_existing(&create, request.exists_ok)?;
    json(if made { 201 } else { 200 }, api::Layer::from(layer))
}

fn inspect_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    ok(api::Layer::from(daemon.engine.inspect(name(call))?))
}

fn remove_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &["recursive"])?;
    let recursive = flag(call, "recursive")?;
    not_containerds(daemon, call, OutsideChange::Remove)?;
    let removed: Vec<(LayerName, Removal)> = if recursive {
        daemon.engine.remove_recursive(name(call))?
    } else {
        let result = daemon.engine.remove(name(call))?;
        vec![(LayerName::new(name(call))?, result)]
    };
    ok(RemoveResponse {
        removed: removed
            .into_iter()
            .map(|(name, result)| RemovedLayer {
                name,
                result: result.into(),
            })
            .collect(),
    })
}

fn commit_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    not_containerds(daemon, call, OutsideChange::Commit)?;
    ok(api::Layer::from(daemon.engine.commit(name(call))?))
}

/// The engine's rule: containerd's layers change only through containerd.
fn not_containerds(daemon: &Daemon, call: &Call, change: OutsideChange) -> Result<()> {
    daemon.engine.refuse_containerds(name(call), change)
}

fn layer_usage(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let usage = daemon.engine.usage(name(call))?;
    ok(UsageResponse::of(LayerName::new(name(call))?, usage))
}

fn activate_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    not_containerds(daemon, call, OutsideChange::Activate)?;
    let device = daemon.engine.activate(name(call))?;
    ok(DeviceResponse {
        name: LayerName::new(name(call))?,
        device,
    })
}

fn deactivate_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    not_containerds(daemon, call, OutsideChange::Deactivate)?;
    daemon.engine.deactivate(name(call))?;
    done(call, "deactivated")
}

fn break_lock(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let broken = daemon.engine.break_lock(name(call))?;
    ok(BreakLockResponse {
        name: LayerName::new(name(call))?,
        holder: broken.holder,
        fenced: broken.fenced,
    })
}

fn done(call: &Call, what: &str) -> Result<Reply> {
    ok(DoneResponse {
        name: LayerName::new(name(call))?,
        done: what.to_string(),
    })
}

fn mount_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: MountRequest = body(call)?;
    if !request.readonly {
        not_containerds(daemon, call, OutsideChange::MountReadWrite)?;
    }
    let mount_point =
        daemon
            .engine
            .mount(name(call), request.target.as_deref(), request.readonly)?;
    ok(MountResponse {
        name: LayerName::new(name(call))?,
        mount_point,
    })
}

fn unmount_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: UnmountRequest = body(call)?;
    daemon
        .engine
        .unmount(name(call), request.target.as_deref())?;
    done(call, "unmounted")
}

fn trim_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    not_containerds(daemon, call, OutsideChange::Trim)?;
    let trimmed = daemon.engine.trim(name(call))?;
    ok(TrimResponse::of(LayerName::new(name(call))?, trimmed))
}

fn resize_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: ResizeRequest = body(call)?;
    not_containerds(daemon, call, OutsideChange::Resize)?;
    ok(api::Layer::from(
        daemon.engine.resize(name(call), request.size)?,
    ))
}

fn checkpoint_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: CheckpointRequest = body(call)?;
    not_containerds(daemon, call, OutsideChange::Reset)?;
    let layer = daemon
        .engine
        .checkpoint(name(call), &request.name, &request.labels)?;
    json(201, api::Layer::from(layer))
}

fn reset_layer(daemon: &Daemon, call: &Call) -> Result<Reply> {
    only_query(call, &[])?;
    let request: ResetRequest = body(call)?;
    not_containerds(daemon, call, OutsideChange::Reset)?;
    let reset = daemon.engine.reset(name(call), request.to.as_deref())?;
    // The device the layer had is deleted after the answer (the record names it until then).
    daemon.defer_work();
    ok(api::Layer::from(reset))
}

/// A query parameter's value, if given.
pub(super) fn query_value<'a>(call: &'a Call, key: &str) -> Option<&'a str> {
    call.query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
