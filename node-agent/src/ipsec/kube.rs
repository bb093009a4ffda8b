//! IPsec in Kubernetes mode: the node's policy, peers and published key generations from the
//! API server, reconciled into xfrm, acknowledged through the NodeEnrollment status.
//!
//! ```text
//!  watch IPsecPolicies ─┐
//!  watch NodeEnrollments├─► caches ─► debounce ─► decide (pure) ─┬─ Remove ─► reconcile(None)
//!  watch Nodes          │                                        ├─ Hold   ─► xfrm untouched
//!  watch Secret         │  (fieldSelector metadata.name=         ├─ Refuse ─► xfrm untouched,
//!   meshlet-ipsec-key) ─┘   meshlet-ipsec-key: RBAC is           │            IPsecReady False
//!                           scoped to that one name)             └─ Apply  ─► reconcile_once
//!  outcome ─► IpsecReport (status.ipsec + IPsecReady) ─► watch channel ─► KubeNode ─► the one
//!             StatusWriter (written only when it changed)
//! ```
//!
//! The published generations are those of the node's policy in the key Secret; outbound SAs
//! and policies follow `status.activeSPI` only while that generation is published. A view in
//! which activeSPI is not published (one watch ahead of the other) holds the kernel as it is.
//! A failed apply is rolled back by the reconciler and retried every [`RETRY`]; a generation
//! that could not be installed is never acknowledged, because acks are read back from xfrm.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use meshlet_crds::conditions::Status;
use meshlet_crds::ipsec::{algorithm_name, policy_for_node, published};
use meshlet_crds::names::{IPSEC_KEY_SECRET, NAMESPACE};
use meshlet_crds::v1alpha1::{IPsecNodeStatus, IPsecPolicy, NodeEnrollment};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::backend::Backend;
use super::reconcile;
use super::runner::{PassError, reconcile_once};
use super::xfrm::{Xfrm, XfrmError};
use super::{Algorithm, IpsecConfig, KeyGeneration, Peer};
use crate::metrics::KindLabel;
use crate::source::kubernetes::Cache;

/// Delay before a failed or held apply is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// `IPsecReady` reasons.
pub mod reason {
    /// The SAs the policy asks for are in force.
    pub const APPLIED: &str = "Applied";
    /// The kernel lacks the algorithm of a published generation.
    pub const ALGORITHM_UNAVAILABLE: &str = "AlgorithmUnavailable";
    /// The published key Secret cannot be used.
    pub const KEY_UNAVAILABLE: &str = "KeyUnavailable";
    /// xfrm refused a change (other than a missing algorithm).
    pub const XFRM_FAILED: &str = "XfrmFailed";
    /// The configuration cannot be realised (e.g. two peers derive the same wire SPI).
    pub const POLICY_CONFLICT: &str = "PolicyConflict";
    /// This node's Node has no InternalIP to send ESP from.
    pub const ADDRESS_UNAVAILABLE: &str = "AddressUnavailable";
}

/// The `IPsecReady` condition the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecCondition {
    /// True when in force.
    pub status: Status,
    /// CamelCase reason (see [`reason`]).
    pub reason: &'static str,
    /// Human-readable detail; never key bytes.
    pub message: String,
}

/// What the IPsec task reports for the NodeEnrollment status. `None` fields remove
/// `status.ipsec` and the condition (no policy selects the node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpsecReport {
    /// `status.ipsec`.
    pub status: Option<IPsecNodeStatus>,
    /// `IPsecReady`.
    pub condition: Option<IpsecCondition>,
    /// Leave `status.ipsec` as it is (xfrm was not changed or could not be read): the acks
    /// written before, possibly by an earlier agent process, still hold.
    pub keep_status: bool,
}

/// The objects the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// This node's name (and its NodeEnrollment's).
    pub node: &'a str,
    /// Every IPsecPolicy.
    pub policies: &'a [&'a IPsecPolicy],
    /// Every NodeEnrollment.
    pub enrollments: &'a [&'a NodeEnrollment],
    /// Every Node.
    pub nodes: &'a [&'a Node],
    /// Data of the published key Secret (`None`: it does not exist).
    pub secret: Option<&'a BTreeMap<String, ByteString>>,
}

/// What to do with xfrm (pure outcome of [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not enrolled, draining, or no policy selects the node: remove exactly the own objects.
    Remove,
    /// The view is inconsistent (activeSPI not published yet): keep everything as it is.
    Hold {
        /// Policy of the node.
        policy: String,
        /// Why.
        why: String,
    },
    /// The configuration cannot be used: keep xfrm as it is, report the condition.
    Refuse {
        /// Policy of the node.
        policy: String,
        /// Condition reason.
        reason: &'static str,
        /// Condition message.
        message: String,
    },
    /// Reconcile to this configuration.
    Apply {
        /// Policy of the node.
        policy: String,
        /// Desired state.
        cfg: IpsecConfig,
        /// Peers left out, with the reason.
        skipped: Vec<String>,
    },
}

fn usable(ne: &NodeEnrollment) -> bool {
    ne.metadata.deletion_timestamp.is_none() && !ne.spec.drain
}

fn internal_ip(node: &Node) -> Option<Result<IpAddr, String>> {
    let addr = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?;
    Some(
        addr.address
            .parse()
            .map_err(|_| format!("InternalIP {:?} is not an IP address", addr.address)),
    )
}

fn find_node<'a>(nodes: &[&'a Node], name: &str) -> Option<&'a Node> {
    nodes.iter().copied().find(|n| n.name_any() == name)
}

/// Decide the desired xfrm state of this node from the view (pure; see the module header).
pub fn decide(v: &View<'_>) -> Decision {
    let Some(own) = v
        .enrollments
        .iter()
        .find(|ne| ne.name_any() == v.node)
        .filter(|ne| usable(ne))
    else {
        return Decision::Remove;
    };
    let own_node = find_node(v.nodes, &own.spec.node_name);
    let labels = own_node.map(|n| n.labels().clone()).unwrap_or_default();
    let Some(policy) = policy_for_node(v.policies.iter().copied(), &labels) else {
        return Decision::Remove;
    };
    let pname = policy.name_any();
    let refuse = |reason, message: String| Decision::Refuse {
        policy: pname.clone(),
        reason,
        message,
    };
    let local = match own_node.and_then(internal_ip) {
        Some(Ok(ip)) => ip,
        Some(Err(e)) => {
            return refuse(
                reason::ADDRESS_UNAVAILABLE,
                format!("Node {}: {e}", own.spec.node_name),
            );
        }
        None => {
            return refuse(
                reason::ADDRESS_UNAVAILABLE,
                format!(
                    "Node {} has no InternalIP in status.addresses",
                    own.spec.node_name
                ),
            );
        }
    };
    let empty = BTreeMap::new();
    let generations = match published(v.secret.unwrap_or(&empty), &pname) {
        Ok(g) => g,
        Err(e) => {
            return refuse(
                reason::KEY_UNAVAILABLE,
                format!("Secret {NAMESPACE}/{IPSEC_KEY_SECRET}: {e}"),
            );
        }
    };
    let active = policy
        .status
        .as_ref()
        .and_then(|s| s.active_spi)
        .map(|a| u32::try_from(a).unwrap_or(0));
    if let Some(a) = active
        && !generations.contains_key(&a)
    {
        let why = format!(
            "IPsecPolicy {pname} status.activeSPI {a} is not published in Secret \
             {NAMESPACE}/{IPSEC_KEY_SECRET} yet"
        );
        return Decision::Hold { policy: pname, why };
    }
    let mut keys = Vec::with_capacity(generations.len());
    for (spi, m) in &generations {
        let Some(algorithm) = Algorithm::parse(algorithm_name(m.algorithm)) else {
            return refuse(
                reason::ALGORITHM_UNAVAILABLE,
                format!(
                    "generation {spi}: this agent does not implement {:?}",
                    m.algorithm
                ),
            );
        };
        keys.push(KeyGeneration {
            spi: *spi,
            psk: m.key.clone(),
            salt: m.salt.clone(),
            algorithm,
        });
    }
    let (peers, skipped) = peers_of(v, own, &pname, local);
    Decision::Apply {
        policy: pname,
        cfg: IpsecConfig {
            node_name: own.spec.node_name.clone(),
            local_address: local,
            keys,
            active_spi: active,
            peers,
        },
        skipped,
    }
}

/// Peers of this node under `policy`: the other usable enrollments whose Node the same policy
/// owns, at their first InternalIP of this node's address family.
fn peers_of(
    v: &View<'_>,
    own: &NodeEnrollment,
    policy: &str,
    local: IpAddr,
) -> (Vec<Peer>, Vec<String>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = BTreeSet::new();
    for ne in v.enrollments.iter().filter(|ne| usable(ne)) {
        let name = &ne.spec.node_name;
        if ne.name_any() == own.name_any() || name == &own.spec.node_name {
            continue;
        }
        let Some(node) = find_node(v.nodes, name) else {
            skipped.push(format!("peer {name}: no Node object"));
            continue;
        };
        if policy_for_node(v.policies.iter().copied(), node.labels()).map(|p| p.name_any())
            != Some(policy.to_string())
        {
            continue;
        }
        match internal_ip(node) {
            Some(Ok(ip)) if ip.is_ipv4() == local.is_ipv4() && ip != local => {
                if seen.insert(ip) {
                    peers.push(Peer {
                        name: name.clone(),
                        address: ip,
                    });
                } else {
                    skipped.push(format!("peer {name}: InternalIP {ip} is used by another peer"));
                }
            }
            Some(Ok(ip)) => skipped.push(format!(
                "peer {name}: InternalIP {ip} is this node's address or of another family than {local}"
            )),
            Some(Err(e)) => skipped.push(format!("peer {name}: {e}")),
            None => skipped.push(format!("peer {name}: no InternalIP in status.addresses")),
        }
    }
    peers.sort();
    (peers, skipped)
}

/// The xfrm handle and the unenroll fence, shared by the IPsec task and the unenroll path.
#[derive(Debug, Default)]
pub struct XfrmSlot {
    /// The backend, opened on first use.
    pub backend: Option<Backend>,
    /// Set by the unenroll path (drain or deletion) once it removed the own objects: the task
    /// then installs nothing, even from a view that has not seen the unenrollment yet.
    pub unenrolled: bool,
}

/// The xfrm slot shared by the IPsec task and the unenroll path (which must remove the own
/// objects before the finalizer is released).
pub type SharedXfrm = Arc<Mutex<XfrmSlot>>;

/// Allow installing again (the node is enrolled and not draining).
pub async fn enrolled(shared: &SharedXfrm) {
    shared.lock().await.unenrolled = false;
}

/// Open the xfrm backend into `slot` unless it is open.
async fn ensure(slot: &mut Option<Backend>) -> Result<&mut Backend, XfrmError> {
    if slot.is_none() {
        let mut x = Backend::from_env()?;
        let obs = x.list_own().await?;
        info!(
            backend = x.kind(),
            states = obs.states.len(),
            policies = obs.policies.len(),
            "IPsec: adopted the own xfrm states and policies found (nothing flushed)"
        );
        *slot = Some(x);
    }
    slot.as_mut()
        .ok_or_else(|| XfrmError::Connect("xfrm backend not open".into()))
}

/// Remove exactly the agent's own xfrm objects (unenroll). Succeeds when nothing is left, and
/// when xfrm cannot be reached although this process never opened it (nothing was written).
pub async fn remove_all(shared: &SharedXfrm) -> Result<(), PassError> {
    let mut guard = shared.lock().await;
    guard.unenrolled = true;
    let slot = &mut guard.backend;
    let opened_before = slot.is_some();
    let x = match ensure(slot).await {
        Ok(x) => x,
        Err(e) if !opened_before => {
            warn!(error = %e, "IPsec: xfrm unavailable on unenroll; nothing of ours to remove");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let stats = reconcile_once(x, None).await?;
    if stats.states_deleted + stats.policies_deleted > 0 {
        info!(
            states_deleted = stats.states_deleted,
            policies_deleted = stats.policies_deleted,
            "IPsec: own xfrm states and policies removed"
        );
    }
    Ok(())
}

fn condition_of(e: &PassError) -> IpsecCondition {
    let reason = match e {
        PassError::Wanted(reconcile::WantedError::SpiCollision { .. }) => reason::POLICY_CONFLICT,
        PassError::Apply(
            reconcile::ApplyError::RolledBack { source, .. }
            | reconcile::ApplyError::ReplaceFailed { source, .. },
        ) if source.unavailable_algorithm().is_some() => reason::ALGORITHM_UNAVAILABLE,
        _ => reason::XFRM_FAILED,
    };
    IpsecCondition {
        status: Status::False,
        reason,
        message: e.to_string(),
    }
}

/// `status.ipsec` from what xfrm holds (pure): generations count as installed when every
/// peer has an inbound SA of it; with no peers, every generation of the applied `cfg`.
pub fn node_status(
    policy: &str,
    cfg: &IpsecConfig,
    observed: &super::xfrm::Observed,
    applied: bool,
) -> IPsecNodeStatus {
    let st = reconcile::status(Some(cfg), observed, None);
    let (installed, active) = if cfg.peers.is_empty() {
        if applied {
            (cfg.keys.iter().map(|k| k.spi).collect(), cfg.active_spi)
        } else {
            (Vec::new(), None)
        }
    } else {
        (st.installed_spis, st.active_spi)
    };
    IPsecNodeStatus {
        installed_spis: installed.into_iter().map(i64::from).collect(),
        active_spi: active.map(i64::from),
        policy: Some(policy.to_string()),
        peers: Some(i64::try_from(cfg.peers.len()).unwrap_or(i64::MAX)),
    }
}

fn applied_condition(cfg: &IpsecConfig, st: &IPsecNodeStatus) -> IpsecCondition {
    IpsecCondition {
        status: Status::True,
        reason: reason::APPLIED,
        message: format!(
            "{} peers; inbound SAs for generations {:?}; sending with {}",
            cfg.peers.len(),
            st.installed_spis,
            st.active_spi
                .map_or_else(|| "none yet".to_string(), |a| a.to_string())
        ),
    }
}

/// Remove the own xfrm objects (no policy, not enrolled, or fenced by the unenroll path).
async fn act_remove(
    slot: &mut Option<Backend>,
    last: Option<&Decision>,
) -> (Option<IpsecReport>, bool) {
    let first = last.is_none();
    let had_policy = last.is_some_and(|l| !matches!(l, Decision::Remove));
    match ensure(slot).await {
        Ok(x) => match reconcile_once(x, None).await {
            Ok(stats) => {
                if stats.states_deleted + stats.policies_deleted > 0 {
                    info!(
                        states_deleted = stats.states_deleted,
                        policies_deleted = stats.policies_deleted,
                        "IPsec: no policy for this node; own xfrm objects removed"
                    );
                }
                (Some(IpsecReport::default()), false)
            }
            Err(e) => {
                error!(error = %e, "IPsec: removing the own xfrm objects failed");
                (Some(IpsecReport::default()), true)
            }
        },
        Err(e) if first || !had_policy => {
            debug!(error = %e, "IPsec: xfrm unavailable; no policy selects this node");
            (Some(IpsecReport::default()), false)
        }
        Err(e) => {
            error!(error = %e, "IPsec: xfrm unavailable; cannot remove own objects");
            (Some(IpsecReport::default()), true)
        }
    }
}

/// Reconcile to `cfg` and read the acks back from xfrm.
async fn act_apply(
    slot: &mut Option<Backend>,
    policy: &str,
    cfg: &IpsecConfig,
    last_error: &mut Option<String>,
) -> (Option<IpsecReport>, bool) {
    let x = match ensure(slot).await {
        Ok(x) => x,
        Err(e) => {
            error!(error = %e, "IPsec unavailable");
            let report = IpsecReport {
                status: None,
                condition: Some(IpsecCondition {
                    status: Status::False,
                    reason: reason::XFRM_FAILED,
                    message: e.to_string(),
                }),
                keep_status: true,
            };
            return (Some(report), true);
        }
    };
    let result = reconcile_once(x, Some(cfg)).await;
    let observed = x.list_own().await;
    match (result, observed) {
        (Ok(stats), Ok(obs)) => {
            *last_error = None;
            if stats.states_added
                + stats.states_deleted
                + stats.policies_set
                + stats.policies_deleted
                > 0
            {
                info!(
                    policy = %policy,
                    states_added = stats.states_added,
                    states_deleted = stats.states_deleted,
                    policies_set = stats.policies_set,
                    policies_deleted = stats.policies_deleted,
                    duration_us = stats.duration.as_micros() as u64,
                    "IPsec synced"
                );
            }
            let st = node_status(policy, cfg, &obs, true);
            let cond = applied_condition(cfg, &st);
            (
                Some(IpsecReport {
                    status: Some(st),
                    condition: Some(cond),
                    keep_status: false,
                }),
                false,
            )
        }
        (Err(e), obs) => {
            let msg = e.to_string();
            if last_error.as_deref() == Some(msg.as_str()) {
                debug!(policy = %policy, error = %msg, "IPsec apply failed again; retrying");
            } else {
                error!(policy = %policy, error = %msg, "IPsec apply failed; retrying every 5 s");
                *last_error = Some(msg);
            }
            let st = obs.ok().map(|o| node_status(policy, cfg, &o, false));
            (
                Some(IpsecReport {
                    keep_status: st.is_none(),
                    status: st,
                    condition: Some(condition_of(&e)),
                }),
                true,
            )
        }
        (Ok(_), Err(e)) => {
            error!(error = %e, "IPsec: listing xfrm after the apply failed; retrying");
            (None, true)
        }
    }
}

/// Inputs of the task.
pub struct KubeIpsec {
    /// API client (the agent's ServiceAccount).
    pub client: Client,
    /// This node's name.
    pub node: String,
    /// Debounce of watch-event bursts.
    pub debounce: Duration,
    /// Watch restarts, by resource.
    pub watch_restarts: Family<KindLabel, Counter>,
    /// Shared xfrm handle.
    pub xfrm: SharedXfrm,
}

enum Watched {
    Policy(Box<Result<Event<IPsecPolicy>, watcher::Error>>),
    Enrollment(Box<Result<Event<NodeEnrollment>, watcher::Error>>),
    Node(Box<Result<Event<Node>, watcher::Error>>),
    Secret(Box<Result<Event<Secret>, watcher::Error>>),
}

/// The caches of the task.
#[derive(Default)]
struct Caches {
    policies: Cache<IPsecPolicy>,
    enrollments: Cache<NodeEnrollment>,
    nodes: Cache<Node>,
    secret: Cache<Secret>,
}

impl Caches {
    fn listed(&self) -> bool {
        self.policies.listed() && self.enrollments.listed() && self.nodes.listed()
    }
}

impl KubeIpsec {
    /// Spawn the task; the receiver carries the latest report (`None` until the first one).
    pub fn spawn(self) -> (watch::Receiver<Option<IpsecReport>>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.run(tx));
        (rx, task)
    }

    fn watch_error(&self, resource: &str, e: &watcher::Error) {
        warn!(resource, error = %e, "IPsec watch failed; retrying with backoff, the last listed objects stay in force");
        self.watch_restarts
            .get_or_create(&KindLabel {
                kind: resource.to_string(),
            })
            .inc();
    }

    async fn run(self, tx: watch::Sender<Option<IpsecReport>>) {
        let c = &self.client;
        let policies = watcher::watcher(
            Api::<IPsecPolicy>::all(c.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|e| Watched::Policy(Box::new(e)));
        let enrollments = watcher::watcher(
            Api::<NodeEnrollment>::all(c.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|e| Watched::Enrollment(Box::new(e)));
        let nodes = watcher::watcher(Api::<Node>::all(c.clone()), watcher::Config::default())
            .default_backoff()
            .map(|e| Watched::Node(Box::new(e)));
        let secret = watcher::watcher(
            Api::<Secret>::namespaced(c.clone(), NAMESPACE),
            watcher::Config::default().fields(&format!("metadata.name={IPSEC_KEY_SECRET}")),
        )
        .default_backoff()
        .map(|e| Watched::Secret(Box::new(e)));
        let mut events = futures::stream::select_all([
            policies.boxed(),
            enrollments.boxed(),
            nodes.boxed(),
            secret.boxed(),
        ]);
        let mut caches = Caches::default();
        let mut due: Option<tokio::time::Instant> = None;
        let mut last_decision: Option<Decision> = None;
        let mut last_error: Option<String> = None;
        let mut reported_skips: BTreeSet<String> = BTreeSet::new();
        loop {
            tokio::select! {
                ev = events.next() => {
                    let changed = match ev {
                        None => return,
                        Some(w) => self.fold(&mut caches, w),
                    };
                    if changed && due.is_none() {
                        due = Some(tokio::time::Instant::now() + self.debounce);
                    }
                }
                _ = async { if let Some(at) = due { tokio::time::sleep_until(at).await } }, if due.is_some() => {
                    due = None;
                    if !caches.listed() {
                        continue;
                    }
                    let decision = {
                        let policies: Vec<&IPsecPolicy> = caches.policies.values().collect();
                        let enrollments: Vec<&NodeEnrollment> = caches.enrollments.values().collect();
                        let nodes: Vec<&Node> = caches.nodes.values().collect();
                        let secret = caches.secret.values().find(|s| s.name_any() == IPSEC_KEY_SECRET);
                        decide(&View {
                            node: &self.node,
                            policies: &policies,
                            enrollments: &enrollments,
                            nodes: &nodes,
                            secret: secret.and_then(|s| s.data.as_ref()),
                        })
                    };
                    if let Decision::Apply { skipped, .. } = &decision {
                        let now: BTreeSet<String> = skipped.iter().cloned().collect();
                        for s in now.difference(&reported_skips) {
                            warn!(reason = %s, "IPsec: peer skipped");
                        }
                        reported_skips = now;
                    }
                    let (report, retry) = self.act(&decision, last_decision.as_ref(), &mut last_error).await;
                    last_decision = Some(decision);
                    if let Some(report) = report {
                        tx.send_if_modified(|cur| {
                            let changed = cur.as_ref() != Some(&report);
                            *cur = Some(report);
                            changed
                        });
                    }
                    if retry {
                        due = Some(tokio::time::Instant::now() + RETRY);
                    }
                }
            }
        }
    }

    fn fold(&self, caches: &mut Caches, w: Watched) -> bool {
        match w {
            Watched::Policy(e) => match *e {
                Ok(e) => caches.policies.apply(e),
                Err(e) => {
                    self.watch_error("ipsecpolicies", &e);
                    false
                }
            },
            Watched::Enrollment(e) => match *e {
                Ok(e) => caches.enrollments.apply(e),
                Err(e) => {
                    self.watch_error("nodeenrollments", &e);
                    false
                }
            },
            Watched::Node(e) => match *e {
                Ok(e) => caches.nodes.apply(e),
                Err(e) => {
                    self.watch_error("nodes", &e);
                    false
                }
            },
            Watched::Secret(e) => match *e {
                Ok(e) => caches.secret.apply(e),
                Err(e) => {
                    self.watch_error("secrets", &e);
                    false
                }
            },
        }
    }

    /// Carry out a decision; returns the report (`None`: leave the last one) and whether to
    /// try again after [`RETRY`].
    async fn act(
        &self,
        d: &Decision,
        last: Option<&Decision>,
        last_error: &mut Option<String>,
    ) -> (Option<IpsecReport>, bool) {
        let mut guard = self.xfrm.lock().await;
        let fenced = guard.unenrolled;
        let slot = &mut guard.backend;
        if fenced && matches!(d, Decision::Apply { .. }) {
            // The unenroll path removed everything and the view has not caught up yet (or
            // the node is enrolled again and the fence is about to be lifted): look again.
            let (report, _) = act_remove(slot, last).await;
            return (report, true);
        }
        match d {
            Decision::Remove => act_remove(slot, last).await,
            Decision::Hold { why, .. } => {
                if last != Some(d) {
                    info!(reason = %why, "IPsec: view inconsistent; xfrm kept as it is");
                }
                (None, false)
            }
            Decision::Refuse {
                policy,
                reason,
                message,
            } => {
                if last != Some(d) {
                    error!(policy = %policy, reason = %reason, error = %message, "IPsec: configuration refused; xfrm kept as it is");
                }
                // The acks stay what they were: nothing changed in xfrm.
                (
                    Some(IpsecReport {
                        status: None,
                        keep_status: true,
                        condition: Some(IpsecCondition {
                            status: Status::False,
                            reason,
                            message: message.clone(),
                        }),
                    }),
                    false,
                )
            }
            Decision::Apply { policy, cfg, .. } => act_apply(slot, policy, cfg, last_error).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
    use meshlet_crds::ipsec::{KeyMaterial, publish};
    use meshlet_crds::v1alpha1::{IPsecAlgorithm, IPsecPolicyStatus};

    fn node(name: &str, ip: Option<&str>) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.status = Some(NodeStatus {
            addresses: ip.map(|ip| {
                vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]
            }),
            ..NodeStatus::default()
        });
        n
    }

    fn policy(active: Option<i64>) -> IPsecPolicy {
        let mut p = IPsecPolicy::test("mesh");
        p.status = Some(IPsecPolicyStatus {
            active_spi: active,
            ..IPsecPolicyStatus::default()
        });
        p
    }

    fn secret(spis: &[u32]) -> BTreeMap<String, ByteString> {
        let gens = spis
            .iter()
            .map(|s| {
                (
                    *s,
                    KeyMaterial {
                        key: vec![1; 32],
                        salt: vec![2; 8],
                        algorithm: IPsecAlgorithm::Rfc4106GcmAes,
                    },
                )
            })
            .collect();
        publish("mesh", &gens)
    }

    struct Fixture {
        policies: Vec<IPsecPolicy>,
        enrollments: Vec<NodeEnrollment>,
        nodes: Vec<Node>,
        secret: Option<BTreeMap<String, ByteString>>,
    }

    impl Fixture {
        fn new(active: Option<i64>, spis: &[u32]) -> Self {
            Self {
                policies: vec![policy(active)],
                enrollments: ["a", "b", "c"].map(NodeEnrollment::test).to_vec(),
                nodes: vec![
                    node("a", Some("10.0.0.1")),
                    node("b", Some("10.0.0.2")),
                    node("c", None),
                ],
                secret: Some(secret(spis)),
            }
        }

        fn decide(&self) -> Decision {
            let policies: Vec<_> = self.policies.iter().collect();
            let enrollments: Vec<_> = self.enrollments.iter().collect();
            let nodes: Vec<_> = self.nodes.iter().collect();
            decide(&View {
                node: "a",
                policies: &policies,
                enrollments: &enrollments,
                nodes: &nodes,
                secret: self.secret.as_ref(),
            })
        }
    }

    #[test]
    fn published_generations_and_peers_with_an_internal_ip_are_wanted() {
        let Decision::Apply { cfg, skipped, .. } = Fixture::new(Some(256), &[256, 257]).decide()
        else {
            panic!("expected Apply");
        };
        assert_eq!(
            cfg.keys.iter().map(|k| k.spi).collect::<Vec<_>>(),
            [256, 257]
        );
        assert_eq!(cfg.active_spi, Some(256));
        assert_eq!(cfg.local_address.to_string(), "10.0.0.1");
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.peers[0].name, "b");
        assert_eq!(skipped, ["peer c: no InternalIP in status.addresses"]);
    }

    #[test]
    fn an_unpublished_active_spi_holds_and_a_bad_secret_is_refused() {
        assert!(matches!(
            Fixture::new(Some(258), &[256, 257]).decide(),
            Decision::Hold { .. }
        ));
        let mut f = Fixture::new(Some(256), &[256]);
        if let Some(s) = f.secret.as_mut() {
            s.insert("mesh.256.key".into(), ByteString(vec![1; 4]));
        }
        match f.decide() {
            Decision::Refuse {
                reason, message, ..
            } => {
                assert_eq!(reason, reason::KEY_UNAVAILABLE);
                assert!(message.contains("mesh.256.key holds 4 bytes"), "{message}");
            }
            other => panic!("expected Refuse, got {other:?}"),
        }
    }

    #[test]
    fn draining_unenrolled_or_unselected_nodes_remove_everything() {
        let mut f = Fixture::new(Some(256), &[256]);
        f.enrollments[0].spec.drain = true;
        assert_eq!(f.decide(), Decision::Remove);
        let mut f = Fixture::new(Some(256), &[256]);
        f.enrollments.remove(0);
        assert_eq!(f.decide(), Decision::Remove);
        let mut f = Fixture::new(Some(256), &[256]);
        f.policies.clear();
        assert_eq!(f.decide(), Decision::Remove);
    }

    #[test]
    fn a_draining_peer_is_no_peer_and_no_own_address_is_refused() {
        let mut f = Fixture::new(Some(256), &[256]);
        f.enrollments[1].spec.drain = true;
        let Decision::Apply { cfg, .. } = f.decide() else {
            panic!("expected Apply");
        };
        assert!(cfg.peers.is_empty());
        let mut f = Fixture::new(Some(256), &[256]);
        f.nodes[0] = node("a", None);
        assert!(matches!(
            f.decide(),
            Decision::Refuse {
                reason: reason::ADDRESS_UNAVAILABLE,
                ..
            }
        ));
    }

    #[test]
    fn with_no_peers_every_applied_generation_is_acknowledged() {
        let Decision::Apply { cfg, .. } = Fixture::new(Some(256), &[256, 257]).decide() else {
            panic!("expected Apply");
        };
        let lonely = IpsecConfig {
            peers: vec![],
            ..cfg
        };
        let st = node_status(
            "mesh",
            &lonely,
            &super::super::xfrm::Observed::default(),
            true,
        );
        assert_eq!(st.installed_spis, [256, 257]);
        assert_eq!(st.active_spi, Some(256));
        let st = node_status(
            "mesh",
            &lonely,
            &super::super::xfrm::Observed::default(),
            false,
        );
        assert!(st.installed_spis.is_empty());
    }
}
