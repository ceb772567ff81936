//! Prometheus metrics: what operations took and how they failed, counted as they happen, and
//! the pool's and the layers' figures, read at each scrape. Served as `GET /metrics` in the
//! Prometheus text format (0.0.4), encoded by `prometheus-client`.
//!
//! Names follow Prometheus's conventions: the `thinstack_` prefix, base units (`_bytes`,
//! `_seconds`, `_ratio`) and `_total` for counters. No layer name is a label: a fleet's
//! scraper sees figures only, and the series stay few however many layers there are.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::engine::{LayerCounts, Status};
use crate::error::{ErrorKind, Result};
use crate::pool::{data_low_water_mark, metadata_low_water_mark};

/// The `Content-Type` of what [`Metrics::render`] gives.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Which interface an operation came through.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Interface {
    /// The HTTP API on the Unix socket.
    Http,
    /// containerd's snapshot service.
    Containerd,
}

impl Interface {
    /// Its label value.
    fn label(self) -> &'static str {
        match self {
            Interface::Http => "http",
            Interface::Containerd => "containerd",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    /// `http` or `containerd`.
    interface: &'static str,
    /// `POST /v1/layers` (a route, as the OpenAPI document names it) or `Prepare`.
    operation: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    interface: &'static str,
    operation: String,
    /// The error's kind, as the API names it (`no_space`, `busy`, ...).
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AreaLabels {
    /// `data` or `metadata`.
    area: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// A gauge of a fraction.
type Ratio = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Every metric the daemon serves.
pub struct Metrics {
    /// Counted as things happen; always served.
    live: Registry,
    operations: Family<OperationLabels, Histogram>,
    errors: Family<ErrorLabels, Counter>,
    autoextensions: Family<AreaLabels, Counter>,
    /// Read at each scrape from the pool (only when its status can be read).
    pool: Registry,
    figures: PoolFigures,
    /// The pool's health and the layers, read at each scrape; always served.
    state: Registry,
    health: Family<StateLabels, Gauge>,
    layers: Family<StateLabels, Gauge>,
    /// Removed layers' thin devices still to be deleted.
    deleting: Gauge,
    /// One scrape sets and encodes at a time, so a scrape never mixes two readings.
    scrape: Mutex<()>,
}

/// The pool's figures, set at each scrape.
#[derive(Default)]
struct PoolFigures {
    data_used: Gauge,
    data_size: Gauge,
    data_low_water: Gauge,
    metadata_used: Gauge,
    metadata_size: Gauge,
    metadata_low_water: Gauge,
    block_size: Gauge,
    transaction_id: Gauge,
    virtual_size: Gauge,
    overcommit: Ratio,
    overcommit_limit: Ratio,
}

/// The health states, each a gauge of its own (1 while it holds): `ok` when none of the
/// others does.
const HEALTH_STATES: [&str; 6] = [
    "ok",
    "read_only",
    "metadata_guard",
    "out_of_space",
    "needs_check",
    "failed",
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric registered, counters at zero.
    pub fn new() -> Metrics {
        let mut live = Registry::with_prefix("thinstack");
        // From a millisecond to about two minutes (an xfs mkfs under emulation).
        let operations = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        live.register_with_unit(
            "operation_duration",
            "How long operations took, from request to answer",
            Unit::Seconds,
            operations.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        live.register(
            "operation_errors",
            "Operations that failed, by the error's kind",
            errors.clone(),
        );
        let autoextensions = Family::<AreaLabels, Counter>::default();
        live.register(
            "pool_autoextensions",
            "Times thinstackd grew the pool's data or metadata by itself",
            autoextensions.clone(),
        );
        let mut state = Registry::with_prefix("thinstack");
        let health = Family::<StateLabels, Gauge>::default();
        state.register(
            "pool_health",
            "1 for each state the pool is in (ok when none of the others holds)",
            health.clone(),
        );
        let layers = Family::<StateLabels, Gauge>::default();
        state.register(
            "layers",
            "Layers by state: creating, ready and removing are their records' states (each layer in one); degraded, missing, committed, mounted, active and deferred_removal (waiting for its device to be released) count layers for which that holds too",
            layers.clone(),
        );
        let deleting = Gauge::default();
        state.register(
            "thin_devices_deleting",
            "Thin devices of removed layers still to be discarded and deleted in the background",
            deleting.clone(),
        );
        let figures = PoolFigures::default();
        let pool = figures.registry();
        Metrics {
            live,
            operations,
            errors,
            autoextensions,
            pool,
            figures,
            state,
            health,
            layers,
            deleting,
            scrape: Mutex::new(()),
        }
    }

    /// An operation through `interface` took `elapsed`, and failed with `error` if it did.
    pub fn observe(
        &self,
        interface: Interface,
        operation: &str,
        elapsed: Duration,
        error: Option<ErrorKind>,
    ) {
        let labels = OperationLabels {
            interface: interface.label(),
            operation: operation.to_string(),
        };
        self.operations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            let labels = ErrorLabels {
                interface: labels.interface,
                operation: labels.operation,
                kind: kind.to_string(),
            };
            self.errors.get_or_create(&labels).inc();
        }
    }

    /// thinstackd grew the pool's `area` (`data` or `metadata`) by itself.
    pub fn autoextended(&self, area: &'static str) {
        self.autoextensions
            .get_or_create(&AreaLabels { area })
            .inc();
    }

    /// Every metric in the text format, with the pool's figures from `status` and the
    /// layers' from `counts`. A pool whose status cannot be read (failed) is served as
    /// `failed`, without figures.
    pub fn render(&self, status: Result<Status>, counts: Result<LayerCounts>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        let mut encode = |registry: &Registry| {
            prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
                .expect("writing to a String cannot fail")
        };
        encode(&self.live);
        match &status {
            Ok(status) => {
                self.figures.set(status);
                self.set_health(status);
                encode(&self.pool);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: the pool's status cannot be read; served as failed");
                for state in HEALTH_STATES {
                    self.health_gauge(state).set(i64::from(state == "failed"));
                }
            }
        }
        if let Ok(counts) = counts {
            self.set_layers(&counts);
        }
        encode(&self.state);
        text
    }

    fn health_gauge(&self, state: &'static str) -> Gauge {
        self.health.get_or_create(&StateLabels { state }).clone()
    }

    fn set_health(&self, status: &Status) {
        let health = &status.health;
        let flags = [
            ("read_only", health.read_only),
            ("metadata_guard", health.metadata_guard),
            ("out_of_space", health.out_of_space),
            ("needs_check", health.needs_check),
            ("failed", health.failed),
        ];
        let ok = flags.iter().all(|(_, on)| !on);
        self.health_gauge("ok").set(i64::from(ok));
        for (state, on) in flags {
            self.health_gauge(state).set(i64::from(on));
        }
    }

    fn set_layers(&self, counts: &LayerCounts) {
        for (state, count) in [
            ("creating", counts.creating),
            ("ready", counts.ready),
            ("removing", counts.removing),
            ("degraded", counts.degraded),
            ("missing", counts.missing),
            ("committed", counts.committed),
            ("mounted", counts.mounted),
            ("active", counts.active),
            ("deferred_removal", counts.deferred),
        ] {
            self.layers
                .get_or_create(&StateLabels { state })
                .set(gauge_value(count as u64));
        }
        self.deleting.set(gauge_value(counts.deleting as u64));
    }
}

impl PoolFigures {
    fn registry(&self) -> Registry {
        let mut pool = Registry::with_prefix("thinstack_pool");
        let bytes: [(&str, &str, &Gauge); 8] = [
            ("data_used", "Pool data in use", &self.data_used),
            ("data_size", "Pool data in all", &self.data_size),
            (
                "data_low_water_mark",
                "Free data below which the kernel raises its low-water event (the mark thinstack gives the pool's table)",
                &self.data_low_water,
            ),
            ("metadata_used", "Pool metadata in use", &self.metadata_used),
            ("metadata_size", "Pool metadata in all", &self.metadata_size),
            (
                "metadata_low_water_mark",
                "Free metadata below which thinstackd makes the pool read-only (the metadata guard)",
                &self.metadata_low_water,
            ),
            ("block_size", "The pool's allocation unit", &self.block_size),
            (
                "virtual_size",
                "The layers' virtual sizes, summed",
                &self.virtual_size,
            ),
        ];
        for (name, help, gauge) in bytes {
            pool.register_with_unit(name, help, Unit::Bytes, gauge.clone());
        }
        pool.register(
            "transaction_id",
            "The pool's transaction id (it moves with every change to its thin devices)",
            self.transaction_id.clone(),
        );
        pool.register_with_unit(
            "overcommit",
            "The layers' virtual sizes over the pool's data (its most, where thinstackd grows it)",
            Unit::Other("ratio".into()),
            self.overcommit.clone(),
        );
        pool.register_with_unit(
            "overcommit_limit",
            "pool.max_overcommit: creates and resizes past it are refused; 0 for no limit",
            Unit::Other("ratio".into()),
            self.overcommit_limit.clone(),
        );
        pool
    }

    fn set(&self, status: &Status) {
        let bytes = |gauge: &Gauge, value: u64| {
            gauge.set(gauge_value(value));
        };
        bytes(&self.data_used, status.data.used.bytes());
        bytes(&self.data_size, status.data.total.bytes());
        let block = status.pool.block_size;
        bytes(
            &self.data_low_water,
            data_low_water_mark(&status.data, block).bytes(),
        );
        bytes(&self.metadata_used, status.metadata.used.bytes());
        bytes(&self.metadata_size, status.metadata.total.bytes());
        bytes(
            &self.metadata_low_water,
            metadata_low_water_mark(&status.metadata).bytes(),
        );
        bytes(&self.block_size, block.bytes());
        bytes(&self.transaction_id, status.transaction_id);
        bytes(&self.virtual_size, status.overcommit.virtual_size.bytes());
        self.overcommit.set(status.overcommit.ratio);
        self.overcommit_limit
            .set(status.overcommit.limit.unwrap_or(0.0));
    }
}

/// A count or size as a gauge's value (at most `i64::MAX`).
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
