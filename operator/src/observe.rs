//! Observe and decide: turns a snapshot of the cluster into what the controller must do and
//! report. Pure — no client, the clock is an argument — so every rule here is unit-tested with
//! plain values.
//!
//! ```text
//!  Snapshot { MeshConfig, Nodes, NodeEnrollments, agent Pods, now }
//!        │
//!        ├─► decide() ─► Decision { create, delete, release finalizer, orphans,
//!        │                          Policy + rollout::Observed, counts }
//!        │                                   │
//!        │                         rollout::plan() ─► Plan
//!        │                                   │
//!        └─► template_version(), status() ◄──┘ ─► DaemonSet version, MeshConfig.status
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::Pod, apimachinery::pkg::util::intstr::IntOrString, jiff::Timestamp,
};
use kube::core::{Selector, SelectorExt};
use meshlet_crds::{
    MeshConfig, NodeEnrollment,
    conditions::{
        self, DATAPLANE_READY, READY, RECONCILING, STALLED, Status, UPGRADING, find_condition,
        is_true,
    },
    names::AGENT_NAME,
    names::NAME_LABEL,
    v1alpha1::meshconfig::{MeshConfigStatus, RolloutPhase, RolloutStatus},
};

use crate::{
    render::{MANAGED_BY_LABEL, UPGRADE_STARTED_ANNOTATION, VERSION_LABEL},
    rollout::{Halt, MaxUnavailable, NodeView, Observed, Phase, Plan, Policy},
};

/// At most this many node names are listed in `status.rollout.nodesInFlight`.
pub const MAX_LISTED_IN_FLIGHT: usize = 100;

/// A `MeshConfig` field the operator cannot act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidSpec {
    /// The node selector does not parse.
    #[error("spec.enrollment.nodeSelector is invalid: {0}")]
    NodeSelector(String),
    /// `maxUnavailable` is neither a count nor a percentage.
    #[error(
        "spec.upgrade.maxUnavailable {0:?} is invalid: use an integer >= 1 or a percentage \"1%\"..\"100%\""
    )]
    MaxUnavailable(String),
}

/// A Node as the operator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
}

/// Everything one reconcile looks at.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    /// The `default` MeshConfig.
    pub mesh: &'a MeshConfig,
    /// Nodes that exist (and are not being deleted).
    pub nodes: Vec<NodeInfo>,
    /// Every NodeEnrollment.
    pub enrollments: Vec<&'a NodeEnrollment>,
    /// Agent pods in the operator's namespace.
    pub pods: Vec<&'a Pod>,
    /// Observation time.
    pub now: Timestamp,
}

/// The agent pod of one node (contract C1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    /// Pod name.
    pub name: String,
    /// Pod uid (delete precondition).
    pub uid: Option<String>,
    /// Its `meshlet.io/version` label.
    pub version: Option<String>,
    /// The preflight init container's failure message, if it exited non-zero.
    pub preflight_failure: Option<String>,
}

/// What the operator must do about enrollments, and the rollout input.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Rollout settings.
    pub policy: Policy,
    /// Rollout engine input (nodes of the fleet).
    pub observed: Observed,
    /// Selected nodes without a NodeEnrollment: create one.
    pub create: Vec<String>,
    /// Operator-managed NodeEnrollments whose node is gone or no longer selected: delete.
    pub delete: Vec<String>,
    /// Operator-managed NodeEnrollments being deleted whose Node and agent pod are gone:
    /// no agent is left to release the finalizer, so the operator does.
    pub release: Vec<String>,
    /// NodeEnrollments naming a Node that does not exist (reported as `Stalled`).
    pub orphans: Vec<String>,
    /// Which NodeEnrollments the operator created (by name).
    pub managed: BTreeSet<String>,
    /// The agent pod of each node.
    pub pods: BTreeMap<String, AgentPod>,
    /// Nodes chosen by the selector (plus user-enrolled existing nodes).
    pub selected: usize,
    /// Of those, nodes with a NodeEnrollment.
    pub enrolled: usize,
    /// Enrolled nodes reporting `Ready`.
    pub ready: usize,
    /// Enrolled nodes reporting `Stalled`, a data-plane gap or a failed preflight.
    pub failed: usize,
}

/// The rollout policy of `spec.upgrade`.
pub fn policy(mesh: &MeshConfig) -> Result<Policy, InvalidSpec> {
    let up = &mesh.spec.upgrade;
    let max_unavailable = match &up.max_unavailable {
        IntOrString::Int(n) if *n >= 1 => MaxUnavailable::Count(n.unsigned_abs()),
        IntOrString::String(s) => {
            parse_max_unavailable(s).ok_or_else(|| InvalidSpec::MaxUnavailable(s.clone()))?
        }
        IntOrString::Int(n) => return Err(InvalidSpec::MaxUnavailable(n.to_string())),
    };
    Ok(Policy {
        max_unavailable,
        canary_nodes: up.canary_nodes.max(0).unsigned_abs(),
        min_ready: Duration::from_secs(up.min_ready_seconds.max(0).unsigned_abs().into()),
        progress_deadline: Duration::from_secs(
            up.progress_deadline_seconds.max(1).unsigned_abs().into(),
        ),
        paused: up.paused,
        auto_rollback: up.auto_rollback,
    })
}

fn parse_max_unavailable(s: &str) -> Option<MaxUnavailable> {
    if let Some(p) = s.strip_suffix('%') {
        let p: u32 = p.parse().ok()?;
        (1..=100).contains(&p).then_some(MaxUnavailable::Percent(p))
    } else {
        let n: u32 = s.parse().ok()?;
        (n >= 1).then_some(MaxUnavailable::Count(n))
    }
}

/// The node selector of `spec.enrollment` (absent selects every node).
pub fn node_selector(mesh: &MeshConfig) -> Result<Selector, InvalidSpec> {
    match &mesh.spec.enrollment.node_selector {
        None => Ok(Selector::default()),
        Some(sel) => {
            Selector::try_from(sel.clone()).map_err(|e| InvalidSpec::NodeSelector(e.to_string()))
        }
    }
}

/// The agent pod of each node: label `app.kubernetes.io/name=meshlet-agent`, bound to the
/// node, not being deleted. With several, the newest wins.
pub fn agent_pods(pods: &[&Pod]) -> BTreeMap<String, AgentPod> {
    let mut out: BTreeMap<String, (Option<Timestamp>, AgentPod)> = BTreeMap::new();
    for pod in pods {
        let labels = pod.metadata.labels.as_ref();
        if labels.and_then(|l| l.get(NAME_LABEL)).map(String::as_str) != Some(AGENT_NAME)
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let preflight_failure = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .into_iter()
            .flatten()
            .find_map(|c| {
                let t = c.state.as_ref()?.terminated.as_ref()?;
                (t.exit_code != 0).then(|| {
                    let msg = t.message.clone().unwrap_or_default();
                    let msg = msg.trim();
                    if msg.is_empty() {
                        format!("init container {} exited with code {}", c.name, t.exit_code)
                    } else {
                        msg.to_owned()
                    }
                })
            });
        let entry = AgentPod {
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone(),
            version: labels.and_then(|l| l.get(VERSION_LABEL)).cloned(),
            preflight_failure,
        };
        match out.get(&node) {
            Some((t, _)) if *t > created => {}
            _ => {
                out.insert(node, (created, entry));
            }
        }
    }
    out.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

fn is_managed(ne: &NodeEnrollment) -> bool {
    ne.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(MANAGED_BY_LABEL))
}

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

fn elapsed(now: Timestamp, since: Timestamp) -> Duration {
    let d = now.as_millisecond().saturating_sub(since.as_millisecond());
    Duration::from_millis(d.max(0).unsigned_abs())
}

/// When the operator last set this enrollment's `desiredVersion`.
pub fn upgrade_started(ne: &NodeEnrollment) -> Option<Timestamp> {
    ne.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(UPGRADE_STARTED_ANNOTATION))
        .and_then(|s| parse_time(s))
}

fn node_view(
    ne: Option<&NodeEnrollment>,
    name: &str,
    pod: Option<&AgentPod>,
    now: Timestamp,
) -> NodeView {
    let status = ne.and_then(|n| n.status.as_ref());
    let conds = status.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let dataplane_ready = is_true(conds, DATAPLANE_READY);
    let started = ne.and_then(upgrade_started);
    // Ready since the later of the condition's transition and the upgrade start: an agent
    // that kept `DataplaneReady` through its restart still has to serve the new version for
    // `minReadySeconds`.
    let ready_for = find_condition(conds, DATAPLANE_READY)
        .filter(|_| dataplane_ready)
        .map(|c| {
            let since = match started {
                Some(s) if s > c.last_transition_time.0 => s,
                _ => c.last_transition_time.0,
            };
            elapsed(now, since)
        });
    let continuity = status.and_then(|s| s.continuity.as_ref());
    let desired_version = ne.and_then(|n| n.spec.desired_version.clone());
    NodeView {
        name: name.to_owned(),
        desired_version: desired_version.clone(),
        agent_version: status.and_then(|s| s.agent_version.clone()),
        dataplane_ready,
        ready_for,
        pod_version: pod.and_then(|p| p.version.clone()),
        upgrade_age: started.map(|s| elapsed(now, s)),
        // A failed preflight counts only for the pod of the version the node is moving to.
        preflight_failure: pod
            .filter(|p| p.version.is_some() && p.version == desired_version)
            .and_then(|p| p.preflight_failure.clone()),
        dataplane_gaps: continuity
            .map(|c| u32::try_from(c.dataplane_gaps.max(0)).unwrap_or(u32::MAX))
            .unwrap_or(0),
        link_ids_stable: continuity.is_none_or(|c| c.link_ids_stable),
    }
}

/// The halt recorded in `status`, if it concerns the current target.
fn recorded_halt(mesh: &MeshConfig) -> Option<Halt> {
    let rollout = mesh.status.as_ref()?.rollout.as_ref()?;
    if rollout.target_version.as_deref() != Some(mesh.spec.agent.version.as_str()) {
        return None;
    }
    match rollout.phase {
        RolloutPhase::Halted | RolloutPhase::RollingBack => Some(Halt {
            node: String::new(),
            reason: rollout.halted_reason.clone()?,
        }),
        _ => None,
    }
}

/// Decide enrollment changes and build the rollout input from `snap`.
pub fn decide(snap: &Snapshot<'_>) -> Result<Decision, InvalidSpec> {
    let mesh = snap.mesh;
    let policy = policy(mesh)?;
    let selector = node_selector(mesh)?;
    let existing: BTreeMap<&str, &NodeInfo> =
        snap.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let selected: BTreeSet<&str> = snap
        .nodes
        .iter()
        .filter(|n| selector.matches(&n.labels))
        .map(|n| n.name.as_str())
        .collect();
    let by_name: BTreeMap<&str, &NodeEnrollment> = snap
        .enrollments
        .iter()
        .map(|ne| (ne.metadata.name.as_deref().unwrap_or_default(), *ne))
        .collect();
    let pods = agent_pods(&snap.pods);

    let mut d = Decision {
        policy,
        observed: Observed {
            target_version: mesh.spec.agent.version.clone(),
            current_version: mesh
                .status
                .as_ref()
                .and_then(|s| s.rollout.as_ref())
                .and_then(|r| r.current_version.clone()),
            halted: recorded_halt(mesh),
            nodes: Vec::new(),
        },
        create: Vec::new(),
        delete: Vec::new(),
        release: Vec::new(),
        orphans: Vec::new(),
        managed: BTreeSet::new(),
        pods: BTreeMap::new(),
        selected: 0,
        enrolled: 0,
        ready: 0,
        failed: 0,
    };

    // The fleet: selected nodes, and nodes a user enrolled explicitly.
    let mut fleet: BTreeSet<&str> = selected.clone();
    for (name, ne) in &by_name {
        let node = ne.spec.node_name.as_str();
        let deleting = ne.metadata.deletion_timestamp.is_some();
        let managed = is_managed(ne);
        if managed {
            d.managed.insert((*name).to_owned());
        }
        if !existing.contains_key(node) {
            if managed && deleting && !pods.contains_key(node) {
                d.release.push((*name).to_owned());
            } else if managed && !deleting {
                d.delete.push((*name).to_owned());
            } else if !managed && !deleting {
                d.orphans.push((*name).to_owned());
            }
            continue;
        }
        if deleting {
            continue;
        }
        if managed && !selected.contains(node) {
            d.delete.push((*name).to_owned());
        } else if !managed {
            fleet.insert(node);
        }
    }
    for node in &fleet {
        let ne = by_name
            .get(node)
            .copied()
            .filter(|ne| ne.metadata.deletion_timestamp.is_none());
        if ne.is_none() && !by_name.contains_key(node) {
            d.create.push((*node).to_owned());
        }
        let pod = pods.get(*node);
        let view = node_view(ne, node, pod, snap.now);
        if let Some(ne) = ne {
            d.enrolled += 1;
            let conds = ne
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or(&[]);
            if is_true(conds, READY) {
                d.ready += 1;
            }
            if is_true(conds, STALLED)
                || view.dataplane_gaps > 0
                || !view.link_ids_stable
                || view.preflight_failure.is_some()
            {
                d.failed += 1;
            }
        }
        d.observed.nodes.push(view);
    }
    d.selected = fleet.len();
    d.pods = pods;
    Ok(d)
}

/// The version the DaemonSet template runs: the version nodes are being moved to.
pub fn template_version(policy: &Policy, observed: &Observed, plan: &Plan) -> String {
    let previous = observed
        .current_version
        .clone()
        .filter(|p| *p != observed.target_version);
    match (&plan.phase, previous) {
        (Phase::RollingBack(_), Some(prev)) => prev,
        (Phase::Halted(_), Some(prev)) if policy.auto_rollback => prev,
        _ => observed.target_version.clone(),
    }
}

/// The wire name of a phase.
pub fn phase_of(phase: &Phase) -> RolloutPhase {
    match phase {
        Phase::Complete => RolloutPhase::Complete,
        Phase::Canary => RolloutPhase::Canary,
        Phase::Rolling => RolloutPhase::Rolling,
        Phase::Paused => RolloutPhase::Paused,
        Phase::Halted(_) => RolloutPhase::Halted,
        Phase::RollingBack(_) => RolloutPhase::RollingBack,
    }
}

/// The MeshConfig status for this observation (conditions keep their transition times from
/// `previous`).
pub fn status(
    mesh: &MeshConfig,
    d: &Decision,
    plan: &Plan,
    previous: &MeshConfigStatus,
    now: Timestamp,
) -> MeshConfigStatus {
    let generation = mesh.metadata.generation;
    let target = &d.observed.target_version;
    let total = d.observed.nodes.len();
    let current_version = if plan.phase == Phase::Complete {
        Some(target.clone())
    } else {
        d.observed.current_version.clone()
    };
    let halt = match &plan.phase {
        Phase::Halted(h) | Phase::RollingBack(h) => Some(h.clone()),
        _ => None,
    };
    let mut in_flight = plan.in_flight.clone();
    in_flight.sort();
    in_flight.dedup();
    in_flight.truncate(MAX_LISTED_IN_FLIGHT);
    let mut conds = previous.conditions.clone();
    let set = |conds: &mut Vec<_>, t: &str, s: Status, reason: &str, msg: &str| {
        conditions::set_condition_at(conds, t, s, reason, msg, generation, now);
    };
    let orphan_msg = (!d.orphans.is_empty()).then(|| {
        format!(
            "NodeEnrollment {} names a node that does not exist; delete it or create the node",
            d.orphans.join(", ")
        )
    });
    // Stalled: a halted rollout, or an enrollment for a missing node.
    match (&halt, &orphan_msg) {
        (Some(h), _) => set(
            &mut conds,
            STALLED,
            Status::True,
            "RolloutHalted",
            &h.reason,
        ),
        (None, Some(m)) => set(&mut conds, STALLED, Status::True, "NodeNotFound", m),
        (None, None) => set(&mut conds, STALLED, Status::False, "Progressing", ""),
    }
    let moving = matches!(
        plan.phase,
        Phase::Canary | Phase::Rolling | Phase::RollingBack(_) | Phase::Paused
    );
    let (reason, msg) = match &plan.phase {
        Phase::Complete => ("RolloutComplete", String::new()),
        Phase::Canary => ("Canary", format!("canary nodes moving to {target}")),
        Phase::Rolling => (
            "Rolling",
            format!("{}/{total} nodes updated to {target}", plan.updated),
        ),
        Phase::Paused => ("Paused", "spec.upgrade.paused holds new nodes back".into()),
        Phase::Halted(_) => ("RolloutHalted", String::new()),
        Phase::RollingBack(_) => ("RollingBack", "moving upgraded nodes back".into()),
    };
    set(&mut conds, RECONCILING, moving.into(), reason, &msg);
    set(&mut conds, UPGRADING, moving.into(), reason, &msg);
    let ready = plan.phase == Phase::Complete && orphan_msg.is_none();
    let ready_msg = if ready {
        format!("{total}/{total} nodes run {target}")
    } else if let Some(h) = &halt {
        format!("rollout to {target} halted: {}", h.reason)
    } else if let Some(m) = &orphan_msg {
        m.clone()
    } else {
        format!("{}/{total} nodes updated to {target}", plan.updated)
    };
    let ready_reason = if ready {
        "AllNodesUpdated"
    } else if halt.is_some() {
        "RolloutHalted"
    } else if orphan_msg.is_some() {
        "NodeNotFound"
    } else {
        "RolloutInProgress"
    };
    set(&mut conds, READY, ready.into(), ready_reason, &ready_msg);
    let to_i32 = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    MeshConfigStatus {
        conditions: conds,
        observed_generation: generation,
        selected_nodes: to_i32(d.selected),
        enrolled_nodes: to_i32(d.enrolled),
        ready_nodes: to_i32(d.ready),
        updated_nodes: to_i32(plan.updated),
        failed_nodes: to_i32(d.failed),
        rollout: Some(RolloutStatus {
            current_version,
            target_version: Some(target.clone()),
            phase: phase_of(&plan.phase),
            halted_reason: halt.map(|h| h.reason),
            nodes_in_flight: in_flight,
        }),
    }
}

#[cfg(test)]
mod tests;
