//! Prometheus metrics of the operator, served as OpenMetrics text on `/metrics`.
//!
//! ```text
//!  controller loop ──► Metrics { reconciles, errors{reason}, duration, nodes{state},
//!                                rollout progress, leader } ──► encode() ──► GET /metrics
//!  IPsec key manager ──► ipsec_{rotations_started, rotations_completed, phase, acks} ──┘
//! ```

use std::{
    collections::BTreeSet,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
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

/// Rotation phases as `IPsecPolicy.status.phase` names them.
const IPSEC_PHASES: [&str; 4] = ["Stable", "Installing", "Switching", "Retiring"];

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
    /// IPsec key rotations started, by policy and trigger.
    pub ipsec_rotations_started: Family<Labels, Counter>,
    /// IPsec key rotations completed (old key retired everywhere), by policy.
    pub ipsec_rotations_completed: Family<Labels, Counter>,
    /// 1 for the current rotation phase of each policy, 0 for the others.
    pub ipsec_phase: Family<Labels, Gauge>,
    /// Acknowledgements of each policy's current phase, by kind
    /// (selected, installed, switched, retired).
    pub ipsec_acks: Family<Labels, Gauge>,
    /// Duration of one IPsec key manager pass in seconds.
    pub ipsec_reconcile_seconds: Histogram,
    reconcile_count: AtomicU64,
    ipsec_policies: Mutex<BTreeSet<String>>,
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
        let ipsec_rotations_started = Family::<Labels, Counter>::default();
        let ipsec_rotations_completed = Family::<Labels, Counter>::default();
        let ipsec_phase = Family::<Labels, Gauge>::default();
        let ipsec_acks = Family::<Labels, Gauge>::default();
        let ipsec_reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
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
        registry.register(
            "ipsec_rotations_started",
            "IPsec key rotations started, by policy and trigger",
            ipsec_rotations_started.clone(),
        );
        registry.register(
            "ipsec_rotations_completed",
            "IPsec key rotations completed, by policy",
            ipsec_rotations_completed.clone(),
        );
        registry.register(
            "ipsec_phase",
            "1 for the current key rotation phase of each IPsec policy",
            ipsec_phase.clone(),
        );
        registry.register(
            "ipsec_acks",
            "Node acknowledgements of each IPsec policy's current phase, by kind",
            ipsec_acks.clone(),
        );
        registry.register(
            "ipsec_reconcile_duration_seconds",
            "Duration of one IPsec key manager pass",
            ipsec_reconcile_seconds.clone(),
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
            ipsec_rotations_started,
            ipsec_rotations_completed,
            ipsec_phase,
            ipsec_acks,
            ipsec_reconcile_seconds,
            reconcile_count: AtomicU64::new(0),
            ipsec_policies: Mutex::new(BTreeSet::new()),
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

    /// Counts a started key rotation of `policy` caused by `trigger`.
    pub fn ipsec_rotation_started(&self, policy: &str, trigger: &str) {
        self.ipsec_rotations_started
            .get_or_create(&vec![
                ("policy".to_owned(), policy.to_owned()),
                ("trigger".to_owned(), trigger.to_owned()),
            ])
            .inc();
    }

    /// Counts a completed key rotation of `policy`.
    pub fn ipsec_rotation_completed(&self, policy: &str) {
        self.ipsec_rotations_completed
            .get_or_create(&vec![("policy".to_owned(), policy.to_owned())])
            .inc();
    }

    /// Sets the phase and acknowledgement gauges of `policy`.
    pub fn ipsec_set_policy(
        &self,
        policy: &str,
        phase: &str,
        acks: &meshlet_crds::v1alpha1::IPsecAcks,
    ) {
        for p in IPSEC_PHASES {
            self.ipsec_phase
                .get_or_create(&vec![
                    ("policy".to_owned(), policy.to_owned()),
                    ("phase".to_owned(), p.to_owned()),
                ])
                .set(i64::from(p == phase));
        }
        for (kind, n) in [
            ("selected", acks.selected),
            ("installed", acks.installed),
            ("switched", acks.switched),
            ("retired", acks.retired),
        ] {
            self.ipsec_acks
                .get_or_create(&vec![
                    ("policy".to_owned(), policy.to_owned()),
                    ("kind".to_owned(), kind.to_owned()),
                ])
                .set(n);
        }
        if let Ok(mut known) = self.ipsec_policies.lock() {
            known.insert(policy.to_owned());
        }
    }

    /// Drops the gauges of policies not in `live` (deleted policies).
    pub fn ipsec_retain_policies(&self, live: &[String]) {
        let Ok(mut known) = self.ipsec_policies.lock() else {
            return;
        };
        let gone: Vec<String> = known
            .iter()
            .filter(|p| !live.contains(p))
            .cloned()
            .collect();
        for policy in gone {
            for p in IPSEC_PHASES {
                self.ipsec_phase.remove(&vec![
                    ("policy".to_owned(), policy.clone()),
                    ("phase".to_owned(), p.to_owned()),
                ]);
            }
            for kind in ["selected", "installed", "switched", "retired"] {
                self.ipsec_acks.remove(&vec![
                    ("policy".to_owned(), policy.clone()),
                    ("kind".to_owned(), kind.to_owned()),
                ]);
            }
            known.remove(&policy);
        }
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
