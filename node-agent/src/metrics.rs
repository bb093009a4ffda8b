//! Prometheus metrics of the agent and the HTTP endpoints `/healthz`, `/readyz`, `/metrics`.
//!
//! ```text
//!  run loop ──(sync durations, results)──► Metrics ◄──(map fill, counters on scrape)── Dataplane
//!                                             │
//!                              axum on --metrics-addr ─► /metrics (text format)
//! ```

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::agent::Context;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The HTTP listener could not be bound.
    #[error("failed to listen on metrics address {addr}")]
    Bind {
        /// Address asked for.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The text encoding failed.
    #[error("failed to encode metrics")]
    Encode(#[from] std::fmt::Error),
}

/// Label: map name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    /// Pin name of the map.
    pub map: String,
}

/// Label: a kind or result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Kind (restart kind, sync result, counter name).
    pub kind: String,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Entries per pinned map.
    pub map_entries: Family<MapLabel, Gauge>,
    /// Capacity per pinned map.
    pub map_capacity: Family<MapLabel, Gauge>,
    /// Duration of applying a desired state to the maps.
    pub sync_duration: Histogram,
    /// Syncs by result (`applied`, `refused`, `failed`).
    pub syncs: Family<KindLabel, Counter>,
    /// Agent start-ups by kind (`fresh`, `warm`, `migrated`).
    pub restarts: Family<KindLabel, Counter>,
    /// Duration of the last data-plane start-up in seconds.
    pub start_duration: Gauge<f64, AtomicU64>,
    /// Data-plane program counters (`handled`, `rewritten`, `no_backend`), summed over CPUs.
    pub program_counters: Family<KindLabel, Gauge>,
    /// 1 once the first sync succeeded.
    pub ready: Gauge,
    /// Kubernetes source: watch errors (each followed by a backed-off restart), by resource.
    pub watch_restarts: Family<KindLabel, Counter>,
    /// Kubernetes source: skipped objects or addresses (once per new reason).
    pub source_skipped: Counter,
    /// NodeEnrollment status writes by result (`written`, `failed`).
    pub status_writes: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered under the `meshlet_agent` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshlet_agent");
        let map_entries = Family::<MapLabel, Gauge>::default();
        let map_capacity = Family::<MapLabel, Gauge>::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let syncs = Family::<KindLabel, Counter>::default();
        let restarts = Family::<KindLabel, Counter>::default();
        let start_duration = Gauge::<f64, AtomicU64>::default();
        let program_counters = Family::<KindLabel, Gauge>::default();
        let ready = Gauge::default();
        let watch_restarts = Family::<KindLabel, Counter>::default();
        let source_skipped = Counter::default();
        let status_writes = Family::<KindLabel, Counter>::default();
        registry.register(
            "watch_restarts",
            "Kubernetes watch errors by resource, each followed by a backed-off restart",
            watch_restarts.clone(),
        );
        registry.register(
            "source_skipped_objects",
            "Kubernetes objects or addresses skipped as unusable, once per new reason",
            source_skipped.clone(),
        );
        registry.register(
            "status_writes",
            "NodeEnrollment status writes by result",
            status_writes.clone(),
        );
        registry.register(
            "map_entries",
            "Entries stored in a pinned map",
            map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of a pinned map",
            map_capacity.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time to apply a desired state to the maps",
            sync_duration.clone(),
        );
        registry.register("syncs", "Syncs by result", syncs.clone());
        registry.register("restarts", "Data-plane start-ups by kind", restarts.clone());
        registry.register(
            "start_duration_seconds",
            "Duration of the last data-plane start-up",
            start_duration.clone(),
        );
        registry.register(
            "dataplane_events",
            "Data-plane program counters summed over CPUs (persist across agent restarts)",
            program_counters.clone(),
        );
        registry.register("ready", "1 once the first sync succeeded", ready.clone());
        Self {
            registry,
            map_entries,
            map_capacity,
            sync_duration,
            syncs,
            restarts,
            start_duration,
            program_counters,
            ready,
            watch_restarts,
            source_skipped,
            status_writes,
        }
    }

    /// Count one event of `family` with label `kind`.
    pub fn inc(family: &Family<KindLabel, Counter>, kind: &str) {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Refresh the gauges read from the kernel (map fill, program counters).
pub async fn refresh(ctx: &Arc<Context>) {
    let dp = ctx.dataplane.clone();
    let read = tokio::task::spawn_blocking(move || {
        let guard = dp.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|d| (d.maps(), d.counters()))
    })
    .await;
    let Ok(Some((maps, counters))) = read else {
        return;
    };
    if let Ok(maps) = maps {
        for m in maps {
            let label = MapLabel { map: m.name };
            ctx.metrics
                .map_entries
                .get_or_create(&label)
                .set(to_i64(m.entries));
            ctx.metrics
                .map_capacity
                .get_or_create(&label)
                .set(to_i64(m.capacity));
        }
    }
    if let Ok(c) = counters {
        for (kind, v) in [
            ("handled", c.handled),
            ("rewritten", c.rewritten),
            ("no_backend", c.no_backend),
        ] {
            ctx.metrics
                .program_counters
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(to_i64(v));
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    if ctx.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let why = ctx
            .last_error()
            .unwrap_or_else(|| "waiting for the first sync".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    }
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    refresh(&ctx).await;
    match ctx.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Bind `addr` and serve the HTTP endpoints until `shutdown` resolves.
pub async fn serve(
    ctx: Arc<Context>,
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}
