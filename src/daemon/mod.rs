//! thinstackd: the pool and its layers behind an HTTP/1.1 JSON API on a Unix socket.
//!
//! Start-up: lock the state directory (before anything touches the pool), open or create the
//! pool, reconcile records with it, bind the socket, tell systemd it is ready. Each request
//! runs on a blocking thread of its own, so a client that disconnects mid-request never
//! interrupts an operation: it finishes whole. At most `daemon.max_connections` clients are
//! connected at once (on each socket); a request's head and body each have
//! `daemon.request_timeout` to arrive. Every request that changes something is audited (see
//! [`crate::audit`]). On SIGTERM or SIGINT the daemon stops accepting, gives open connections
//! `daemon.shutdown_timeout` to finish and cuts the rest, lets every operation already started
//! finish, leaves layers mounted and active (unless `daemon.deactivate_on_shutdown`), and
//! releases the lock.

mod background;
mod connections;
mod event_stream;
mod handler;
mod in_flight;
mod layer_stream;
mod metrics_tcp;
pub mod routes;
mod server;
mod socket;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Backend, Config};
use crate::containerd::{EngineHolder, SnapshotService};
use crate::engine::{Engine, EventKind, Settings, SnapshotRoot};
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::real::RealFs;
use crate::kernel::sim::Sim;
use crate::kernel::thin_tools::CheckReport;
use crate::kernel::{FsKernel, PoolKernel, Room};
use crate::metrics::{Interface, Metrics};
use crate::pool::rbd::RbdPool;
use crate::pool::{lvm, RealPool};
use crate::records::StateLock;
use crate::units::ByteSize;

/// The pool the daemon runs on: the real kernel's, or the sim's.
pub type HostPool = Box<dyn PoolKernel + Send + Sync>;
/// The filesystems the daemon runs on: the real kernel's, or the sim's.
pub type HostFs = Box<dyn FsKernel + Send + Sync>;
/// The daemon's engine.
pub type DaemonEngine = Engine<HostPool, HostFs>;

/// Which kernel the daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// device-mapper, loop devices, mkfs and mount(2): needs root and dm-thin.
    Real,
    /// The in-memory kernel ([`Sim`]): no root, no device-mapper. Its pool and devices live
    /// in memory and go with the process; the records in the state directory stay.
    Sim,
}

/// The running daemon's state, shared by request handlers and background work.
pub struct Daemon {
    engine: DaemonEngine,
    config: Config,
    /// What `/metrics` serves.
    metrics: Metrics,
    /// Turned true as the daemon begins to stop: event streams end then.
    closing: tokio::sync::watch::Sender<bool>,
    /// Set once the pool is destroyed: nothing more is served, and the daemon stops.
    destroyed: AtomicBool,
    stop: tokio::sync::Notify,
    /// Wakes the watcher for work left after an answer; its receiving end, until the
    /// watcher starts.
    wake_watcher: std::sync::mpsc::Sender<background::Wake>,
    watcher_woken: std::sync::Mutex<Option<std::sync::mpsc::Receiver<background::Wake>>>,
}

impl Daemon {
    /// Lock the state directory, open (or create) the pool, and reconcile records with it.
    pub fn open(config: Config, kernel: KernelChoice) -> Result<Daemon> {
        let state_dir = config.state_dir.path();
        let lock = StateLock::acquire(state_dir)?;
        let (pool, fs): (HostPool, HostFs) = match kernel {
            KernelChoice::Real if config.pool.backend == crate::config::Backend::Rbd => {
                (Box::new(RbdPool::open(&config)?), Box::new(RealFs))
            }
            KernelChoice::Real => (Box::new(RealPool::open(&config)?), Box::new(RealFs)),
            KernelChoice::Sim => {
                let files = &config.pool.loop_files;
                let sim = Sim::with_files(files.data_size, files.metadata_size.size())
                    .named(config.pool.name.as_str());
                (Box::new(sim.clone()), Box::new(sim))
            }
        };
        let settings = Settings::from_config(&config);
        let (engine, report) = Engine::open_locked(pool, fs, settings, lock)?;
        if !report.is_clean() {
            tracing::warn!(?report, "records were reconciled with the pool at start-up");
        }
        let (wake_watcher, watcher_woken) = std::sync::mpsc::channel();
        // Removed layers' devices are deleted by the watcher, after the removal answers.
        let wake = wake_watcher.clone();
        engine.set_deferred_waker(move || {
            let _ = wake.send(background::Wake::DeferredWork);
        });
        Ok(Daemon {
            engine,
            config,
            metrics: Metrics::new(),
            closing: tokio::sync::watch::channel(false).0,
            destroyed: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            wake_watcher,
            watcher_woken: std::sync::Mutex::new(Some(watcher_woken)),
        })
    }

    /// Have the watcher do the deferred work now, after this answer, instead of at its next
    /// round. Before the watcher starts (or after it stops), its next round, or the next
    /// start, does it.
    fn defer_work(&self) {
        let _ = self.wake_watcher.send(background::Wake::DeferredWork);
    }

    /// The layer engine.
    pub fn engine(&self) -> &DaemonEngine {
        &self.engine
    }

    /// The watcher grew the pool's data, its metadata, or both.
    fn counted_autoextension(&self, data: bool, metadata: bool) {
        for (area, grown) in [("data", data), ("metadata", metadata)] {
            if grown {
                self.metrics.autoextended(area);
            }
        }
    }

    /// Every metric, read now, in Prometheus's text format.
    pub fn render_metrics(&self) -> String {
        self.metrics
            .render(self.engine.status(), self.engine.layer_counts())
    }

    /// Grow the pool's data and metadata areas to the sizes given (a `devices` pool: to its
    /// devices' current sizes, so no size is needed).
    pub fn extend(
        &self,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)> {
        self.extend_by(data, metadata, false)
    }

    /// [`Daemon::extend`]; `automatic` when the watcher grows the pool by itself.
    pub(super) fn extend_by(
        &self,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
        automatic: bool,
    ) -> Result<(ByteSize, ByteSize)> {
        if data.is_none() && metadata.is_none() && self.config.pool.backend != Backend::Devices {
            return Err(Error::invalid(
                "say how large the pool should become: data, metadata, or both",
            ));
        }
        // Checked here too, above the seam, so the sim refuses what the kernel would.
        if let Some(size) = metadata {
            crate::config::MetadataSize::new(size).map_err(Error::invalid)?;
        }
        let sizes = self
            .engine
            .exclusive_pool(|kernel| kernel.extend(data, metadata))?;
        let extended = EventKind::PoolExtended {
            data: sizes.0,
            metadata: sizes.1,
            automatic,
        };
        self.engine.emit(None, extended);
        // Grown metadata lifts the guard at once, not at the watcher's next round.
        if self.guard_metadata()? == Some(false) {
            tracing::warn!("the pool's metadata has room again: the pool is writable");
        }
        Ok(sizes)
    }

    /// Keep the metadata from running out, which fails a pool for good (the kernel cannot
    /// even record that it needs a check): while it is nearly full, the pool is made
    /// read-only, and writable again once there is room. "Nearly full" is the kernel's own
    /// low-water mark for metadata: less than 4 MiB or a quarter of it free; "room" is twice
    /// that, so a pool at the mark does not flap. Returns
    /// `Some(true)` when the pool was made read-only now, `Some(false)` when made writable,
    /// `None` when nothing changed (or the pool's table is not thinstack's).
    pub fn guard_metadata(&self) -> Result<Option<bool>> {
        let changed = self.engine.exclusive_pool(|kernel| {
            let metadata = kernel.usage()?.metadata;
            let read_only = if kernel.read_only_guard()? {
                !crate::pool::metadata_has_room(&metadata)
            } else {
                crate::pool::metadata_nearly_full(&metadata)
            };
            let changed = kernel.set_read_only_guard(read_only)?;
            Ok(changed.then_some(read_only))
        })?;
        match changed {
            Some(true) => self.engine.emit(None, EventKind::PoolGuardOn),
            Some(false) => self.engine.emit(None, EventKind::PoolGuardOff),
            None => {}
        }
        Ok(changed)
    }

    /// Add a disk to a direct-LVM pool's volume group (after the safety checks).
    pub fn add_device(&self, device: &Path, force: bool) -> Result<ByteSize> {
        self.engine
            .exclusive_pool(|kernel| kernel.add_device(device, force))
    }

    /// One automatic extension of an LVM pool, planned from fresh figures with pool messages
    /// held off: what was added, and the volume group; `None` when nothing could be added.
    pub fn autoextend_lvm(&self) -> Result<Option<(lvm::Growth, String)>> {
        self.engine.exclusive_pool(|kernel| {
            if kernel.room()? != Room::Volumes {
                return Ok(None);
            }
            let vg = kernel.volume_group()?;
            let usage = kernel.usage()?;
            let growth = lvm::plan_growth(&usage.data, &usage.metadata, &vg, &self.config.pool.lvm);
            if growth == lvm::Growth::default() {
                return Ok(None);
            }
            tracing::info!(volume_group = %vg.name, free = %vg.free(), data_extents = growth.data, metadata_extents = growth.metadata, "extending the pool's volumes");
            kernel.grow_volumes(&vg, growth.data, growth.metadata)?;
            let grown = kernel.usage()?;
            let extended = EventKind::PoolExtended {
                data: grown.data.total,
                metadata: grown.metadata.total,
                automatic: true,
            };
            self.engine.emit(None, extended);
            Ok(Some((growth, vg.name)))
        })
    }

    /// Check the pool's metadata through a metadata snapshot.
    pub fn check(&self) -> Result<CheckReport> {
        self.engine.exclusive_pool(|kernel| kernel.check_metadata())
    }

    /// Remove every layer (only when `force`, if there are any), then what thinstack made for
    /// the pool, and the records; the daemon stops afterwards. On a pool other hosts share,
    /// only this host leaves it: the layers are theirs too.
    pub fn destroy(&self, force: bool) -> Result<usize> {
        // From here on new requests are refused, so no layer is made while the pool goes.
        self.destroyed.store(true, Ordering::SeqCst);
        let layers_go = self
            .engine
            .leaving_shared_pool()
            .map(|others| others.is_none());
        let destroyed = layers_go.and_then(|layers_go| {
            if layers_go {
                self.engine.remove_all(force)
            } else {
                Ok(0)
            }
        });
        let destroyed = destroyed.and_then(|removed| {
            self.engine
                .exclusive_pool(|kernel| kernel.destroy().map(|()| removed))
        });
        let removed = destroyed.inspect_err(|_| self.destroyed.store(false, Ordering::SeqCst))?;
        self.engine.forget_pool()?;
        tracing::warn!(layers = removed, "pool destroyed; thinstackd stops");
        self.stop.notify_one();
        Ok(removed)
    }

    /// Whether the pool was destroyed (requests are refused from then on).
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::SeqCst)
    }

    /// Unmount and deactivate every layer (for `daemon.deactivate_on_shutdown`).
    fn deactivate_all(&self) {
        let layers = match self.engine.list(&Default::default()) {
            Ok(layers) => layers,
            Err(e) => {
                tracing::error!(error = %e, "could not list layers to deactivate them");
                return;
            }
        };
        for layer in layers {
            for target in layer.mount_users() {
                if let Err(e) = self.engine.unmount(layer.name.as_str(), Some(target)) {
                    tracing::error!(layer = %layer.name, error = %e, "could not unmount at shutdown");
                }
            }
            if layer.device.is_some() {
                if let Err(e) = self.engine.deactivate(layer.name.as_str()) {
                    tracing::error!(layer = %layer.name, error = %e, "could not deactivate at shutdown");
                }
            }
        }
    }
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(config: Config, kernel: KernelChoice) -> Result<()> {
    let socket_path = config.socket.path().to_path_buf();
    let daemon = Arc::new(Daemon::open(config, kernel)?);
    let status = daemon.engine.status()?;
    tracing::info!(
        pool = %status.pool.name,
        layers = status.layers,
        data = %status.data.describe(),
        "pool ready"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("thinstackd")
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    runtime.block_on(serve(daemon.clone(), socket_path))?;
    // Blocking work still running (none after a graceful stop) must finish before the lock goes.
    drop(runtime);
    if daemon.config.daemon.deactivate_on_shutdown && !daemon.is_destroyed() {
        daemon.deactivate_all();
    }
    if !daemon.is_destroyed() {
        if let Err(e) = daemon.engine.close_records() {
            tracing::warn!(error = %e, "could not fold the records journal into the record files; the next start replays it");
        }
    }
    tracing::info!("thinstackd stopped");
    Ok(())
}

async fn serve(daemon: Arc<Daemon>, socket_path: PathBuf) -> Result<()> {
    let listener = socket::bind(&socket_path, &daemon.config.daemon.socket_group)?;
    let (stopped, stopping) = tokio::sync::watch::channel(false);
    let stopping_metrics = stopping.clone();
    let containerd = match serve_containerd(&daemon, stopping) {
        Ok(task) => task,
        Err(e) => {
            let _ = std::fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    let metrics = match daemon.config.daemon.metrics_listen {
        Some(address) => match metrics_tcp::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /metrics over TCP");
                Some(tokio::spawn(metrics_tcp::serve(
                    daemon.clone(),
                    listener,
                    stopping_metrics,
                )))
            }
            Err(e) => {
                let _ = stopped.send(true);
                let _ = std::fs::remove_file(&socket_path);
                return Err(e);
            }
        },
        None => None,
    };
    let woken = daemon
        .watcher_woken
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
        .ok_or_else(|| Error::inconsistent("the daemon's watcher was started twice"))?;
    let watcher = background::spawn(daemon.clone(), daemon.wake_watcher.clone(), woken);
    notify_systemd("READY=1");
    tracing::info!(socket = %socket_path.display(), "serving the API");
    let stop = async {
        tokio::select! {
            () = shutdown_signal() => {}
            () = daemon.stop.notified() => {}
        }
        notify_systemd("STOPPING=1");
        daemon.closing.send_replace(true);
        // Both sockets stop together, so the stop takes one shutdown_timeout, not two.
        let _ = stopped.send(true);
    };
    server::serve(daemon.clone(), listener, stop).await;
    if let Some(task) = containerd {
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "containerd's snapshot service failed"),
            Err(e) => {
                tracing::error!(error = %e, "containerd's snapshot service did not stop cleanly")
            }
            Ok(Ok(())) => {}
        }
    }
    if let Some(task) = metrics {
        let _ = task.await;
    }
    watcher.stop().await;
    finish_deletions_before_stopping(&daemon).await;
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// Serve containerd's snapshot service on its own socket when `[containerd] enabled`, until
/// `stopping` turns true.
fn serve_containerd(
    daemon: &Arc<Daemon>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<Result<()>>>> {
    let config = &daemon.config.containerd;
    if !config.enabled {
        return Ok(None);
    }
    let socket_path = config.socket.path().to_path_buf();
    let listener = socket::bind(&socket_path, &config.socket_group)?;
    let (size, filesystem) = daemon.config.containerd_root();
    let service = SnapshotService::new(daemon.clone(), SnapshotRoot { size, filesystem });
    let limits = crate::containerd::Limits {
        max_connections: daemon.config.daemon.max_connections,
        shutdown_timeout: daemon.config.daemon.shutdown_timeout,
    };
    Ok(Some(tokio::spawn(async move {
        let stop = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let served = crate::containerd::serve(service, listener, &socket_path, limits, stop).await;
        let _ = std::fs::remove_file(&socket_path);
        served
    })))
}

/// Removed layers' devices still queued go before a stop, so a stopped daemon leaves the pool
/// settled. A kill leaves them queued; the next start's first round deletes them.
async fn finish_deletions_before_stopping(daemon: &Arc<Daemon>) {
    if daemon.is_destroyed() {
        return;
    }
    let daemon = daemon.clone();
    let finished = tokio::task::spawn_blocking(move || daemon.engine.finish_deletions()).await;
    if let Ok(Err(e)) = finished {
        tracing::warn!(error = %e, "deleting removed layers' devices failed; the next start retries");
    }
}

impl EngineHolder for Daemon {
    type Pool = HostPool;
    type Fs = HostFs;
    fn engine(&self) -> &DaemonEngine {
        &self.engine
    }
    fn observe(&self, operation: &str, elapsed: Duration, error: Option<ErrorKind>) {
        self.metrics
            .observe(Interface::Containerd, operation, elapsed, error);
    }
}

/// Tell the service manager (`NOTIFY_SOCKET`, as systemd's `Type=notify` sets it) how the
/// daemon stands. The send never blocks: a socket nobody drains (its queue full) would
/// otherwise hold start-up forever, as a test harness's did after ten restarts. A message
/// that cannot go is logged and dropped.
fn notify_systemd(state: &str) {
    if let Some(target) = std::env::var_os("NOTIFY_SOCKET") {
        notify_socket(&target.to_string_lossy(), state);
    }
}

/// Send `state` to the datagram socket `target` (a path, or `@name` for an abstract one).
fn notify_socket(target: &str, state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let address = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(target),
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        socket.set_nonblocking(true)?;
        socket.send_to_addr(state.as_bytes(), &address?)
    });
    if let Err(e) = sent {
        tracing::warn!(socket = %target, state, error = %e, "could not notify the service manager");
    }
}

/// Resolves at the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "stopping: finishing in-flight operations");
}

#[cfg(test)]
mod tests;
