//! Prometheus metrics of the operator, served as OpenMetrics text on `/metrics`.
//!
//! ```text
//!  controller loop ──► Metrics { reconciles, errors{reason}, duration, nodes{state},
//!                                rollout progress, leader } ──► encode() ──► GET /metrics
//! ```

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(String, String)>;

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run (successful or not).
    pub reconciles: Counter,
    /// Failed reconciles by reason (the failing step).
    pub errors: Family<Labels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// Nodes by state: selected, enrolled, ready, updated, failed.
    pub nodes: Family<Labels, Gauge>,
    /// Nodes on the rollout's target version.
    pub rollout_updated: Gauge,
    /// Nodes the rollout covers.
    pub rollout_total: Gauge,
    /// Nodes currently moving.
    pub rollout_in_flight: Gauge,
    /// 1 while this instance holds the leader lease.
    pub leader: Gauge,
    /// Kubernetes writes (apply, delete, status) made by the controller.
    pub writes: Counter,
    reconcile_count: AtomicU64,
    encode_lock: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `meshlet_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshlet_operator");
        let reconciles = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let nodes = Family::<Labels, Gauge>::default();
        let rollout_updated = Gauge::default();
        let rollout_total = Gauge::default();
        let rollout_in_flight = Gauge::default();
        let leader = Gauge::default();
        let writes = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by the step that failed",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            duration.clone(),
        );
        registry.register(
            "nodes",
            "Nodes by state (selected, enrolled, ready, updated, failed)",
            nodes.clone(),
        );
        registry.register(
            "rollout_updated_nodes",
            "Nodes running the rollout's target version",
            rollout_updated.clone(),
        );
        registry.register(
            "rollout_nodes",
            "Nodes the rollout covers",
            rollout_total.clone(),
        );
        registry.register(
            "rollout_nodes_in_flight",
            "Nodes moving to a new version now",
            rollout_in_flight.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "api_writes",
            "Writes (apply, delete, status) sent to the API server",
            writes.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            nodes,
            rollout_updated,
            rollout_total,
            rollout_in_flight,
            leader,
            writes,
            reconcile_count: AtomicU64::new(0),
            encode_lock: Mutex::new(()),
        }
    }

    /// Counts one reconcile.
    pub fn reconciled(&self, seconds: f64) {
        self.reconciles.inc();
        self.reconcile_count.fetch_add(1, Ordering::Relaxed);
        self.duration.observe(seconds);
    }

    /// Counts a failed reconcile under `reason`.
    pub fn failed(&self, reason: &str) {
        self.errors
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Sets the node gauge of `state`.
    pub fn set_nodes(&self, state: &str, n: usize) {
        self.nodes
            .get_or_create(&vec![("state".to_owned(), state.to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Reconciles run so far.
    pub fn reconcile_count(&self) -> u64 {
        self.reconcile_count.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let _guard = self.encode_lock.lock();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
