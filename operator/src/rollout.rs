//! The rollout engine: a pure function from the observed fleet to the next actions.
//!
//! ```text
//!  MeshConfig.spec.upgrade ─┐
//!  MeshConfig.status ───────┼─► Observed ──► plan() ──► Plan { actions, summary }
//!  NodeEnrollments ─────────┘                               │
//!                                  controller applies ◄─────┘ (set desiredVersion, delete pod)
//! ```
//!
//! The engine keeps no memory of its own: everything it needs is in the observed state
//! (each node's `desiredVersion`, the version its agent reports, its readiness and
//! continuity, when its upgrade started, and the halt recorded in `MeshConfig.status`). So an
//! operator that restarts, or a new leader, resumes exactly where the last one stopped.
//!
//! Rules:
//! - Canary nodes (the first `canary_nodes` by name) are upgraded first; no other node starts
//!   until every canary is updated.
//! - At most `max_unavailable` nodes are unavailable at once: nodes in flight plus nodes that
//!   are not ready for any other reason.
//! - A node is *updated* when its agent reports the target version, `DataplaneReady`, an
//!   unbroken continuity record, and has stayed ready for `min_ready`.
//! - A node in flight that fails preflight, misses `progress_deadline`, or reports a
//!   data-plane gap halts the rollout. With `auto_rollback`, nodes already moved go back to
//!   the version the fleet was on.
//! - `paused` starts no new node; nodes in flight finish.
//! - A new target supersedes an unfinished rollout: nodes are moved to the newest target.

use std::time::Duration;

/// `maxUnavailable`: an absolute number of nodes or a percentage of the selected nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnavailable {
    /// At most this many nodes (≥ 1).
    Count(u32),
    /// At most this percentage (1–100) of the selected nodes, rounded up, at least one node.
    Percent(u32),
}

impl MaxUnavailable {
    /// The number of nodes this allows for a fleet of `total` nodes (never below 1).
    pub fn resolve(self, total: usize) -> usize {
        let n = match self {
            Self::Count(c) => c as usize,
            Self::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.max(1)
    }
}

/// The rollout settings of `MeshConfig.spec.upgrade`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Upper bound on unavailable nodes.
    pub max_unavailable: MaxUnavailable,
    /// How many nodes to upgrade (and see healthy) before the rest.
    pub canary_nodes: u32,
    /// How long a node must stay ready on the new version to count as updated.
    pub min_ready: Duration,
    /// How long a node may take from `desiredVersion` set to updated.
    pub progress_deadline: Duration,
    /// Start no new node.
    pub paused: bool,
    /// On a halt, move the nodes already upgraded back to the previous version.
    pub auto_rollback: bool,
}

/// What the operator observes of one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// Node (and NodeEnrollment) name.
    pub name: String,
    /// `NodeEnrollment.spec.desiredVersion`.
    pub desired_version: Option<String>,
    /// The version the node's agent reports running.
    pub agent_version: Option<String>,
    /// `DataplaneReady` is true.
    pub dataplane_ready: bool,
    /// Seconds (on the observation clock) since `DataplaneReady` last became true.
    pub ready_for: Option<Duration>,
    /// The version of the node's current agent pod (its image tag), `None` when no pod exists.
    pub pod_version: Option<String>,
    /// Time since `desiredVersion` was last changed (recorded by the operator on the node).
    pub upgrade_age: Option<Duration>,
    /// The agent's preflight refused the desired version, with its reason.
    pub preflight_failure: Option<String>,
    /// Data-plane gaps reported by the continuity record (0 when unbroken).
    pub dataplane_gaps: u32,
    /// Link ids have stayed the same since first attach.
    pub link_ids_stable: bool,
}

/// Why a rollout halted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    /// The node that failed.
    pub node: String,
    /// What a user reads in the `Stalled` condition.
    pub reason: String,
}

/// Everything the engine decides from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `MeshConfig.spec.agent.version`: where the fleet should go.
    pub target_version: String,
    /// `MeshConfig.status.rollout.currentVersion`: the version the whole fleet last reached.
    /// `None` on a fresh install.
    pub current_version: Option<String>,
    /// The halt recorded in status, if the rollout to `target_version` halted.
    pub halted: Option<Halt>,
    /// Every selected node.
    pub nodes: Vec<NodeView>,
}

/// One step for the controller to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set `NodeEnrollment.spec.desiredVersion` (and record the start time).
    SetDesiredVersion {
        /// Node name.
        node: String,
        /// Version to move to.
        version: String,
    },
    /// Delete the node's agent pod so the DaemonSet (OnDelete) recreates it.
    RestartAgent {
        /// Node name.
        node: String,
    },
}

/// Where the rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Every node runs the target and is updated.
    Complete,
    /// Canary nodes are moving.
    Canary,
    /// Nodes beyond the canaries are moving.
    Rolling,
    /// `paused` holds new nodes back.
    Paused,
    /// Halted on a failure; nothing moves forward.
    Halted(Halt),
    /// Halted and moving the upgraded nodes back.
    RollingBack(Halt),
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Steps to carry out now, in order.
    pub actions: Vec<Action>,
    /// Phase to report.
    pub phase: Phase,
    /// Nodes updated to the target.
    pub updated: usize,
    /// Nodes currently moving.
    pub in_flight: Vec<String>,
}

/// Decide the next actions. Pure: same input, same output.
pub fn plan(policy: &Policy, observed: &Observed) -> Plan {
    let target = observed.target_version.as_str();
    let mut nodes: Vec<&NodeView> = observed.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));

    let updated = nodes
        .iter()
        .filter(|n| is_updated(policy, n, target))
        .count();
    let halt = observed
        .halted
        .clone()
        .or_else(|| first_failure(policy, &nodes, target));

    if let Some(halt) = halt {
        return plan_halted(policy, observed, &nodes, target, updated, halt);
    }

    let in_flight: Vec<&NodeView> = nodes
        .iter()
        .copied()
        .filter(|n| n.desired_version.as_deref() == Some(target) && !is_updated(policy, n, target))
        .collect();
    let in_flight_names = in_flight.iter().map(|n| n.name.clone()).collect::<Vec<_>>();

    if updated == nodes.len() {
        return Plan {
            actions: Vec::new(),
            phase: Phase::Complete,
            updated,
            in_flight: in_flight_names,
        };
    }

    let mut actions = Vec::new();
    // Nodes whose agent pod must be restarted onto the desired version they already have
    // (e.g. the operator set desiredVersion, then restarted before deleting the pod).
    for n in &in_flight {
        if needs_restart(n) {
            actions.push(Action::RestartAgent {
                node: n.name.clone(),
            });
        }
    }

    let canary_count = (policy.canary_nodes as usize).min(nodes.len());
    let canaries = &nodes[..canary_count];
    let canaries_done = canaries.iter().all(|n| is_updated(policy, n, target));
    let phase = if policy.paused {
        Phase::Paused
    } else if canaries_done {
        Phase::Rolling
    } else {
        Phase::Canary
    };

    if !policy.paused {
        let waiting = |n: &&&NodeView| {
            n.desired_version.as_deref() != Some(target) && !is_updated(policy, n, target)
        };
        // A node whose agent has never run has nothing to protect (a fresh install, a node
        // that just joined): it gets the target at once, outside the canary and the budget.
        let mut starts: Vec<&NodeView> = nodes
            .iter()
            .filter(|n| !serving(n))
            .filter(waiting)
            .copied()
            .collect();
        // Nodes that serve traffic move canaries first, then within maxUnavailable, even while
        // the fleet has not yet reached its first version.
        let candidates: &[&NodeView] = if canaries_done { &nodes } else { canaries };
        let limit = policy.max_unavailable.resolve(nodes.len());
        let unavailable = nodes
            .iter()
            // (nodes started above are not ready, so they are counted here already)
            .filter(|n| in_flight_names.contains(&n.name) || !n.dataplane_ready)
            .count();
        starts.extend(
            candidates
                .iter()
                .filter(|n| serving(n))
                .filter(waiting)
                // A node that is already down for another reason does not take a slot twice.
                .take(limit.saturating_sub(unavailable)),
        );
        for n in starts {
            actions.push(Action::SetDesiredVersion {
                node: n.name.clone(),
                version: target.to_string(),
            });
            actions.push(Action::RestartAgent {
                node: n.name.clone(),
            });
        }
    }

    let mut in_flight_now = in_flight_names;
    for a in &actions {
        if let Action::SetDesiredVersion { node, .. } = a {
            in_flight_now.push(node.clone());
        }
    }
    Plan {
        actions,
        phase,
        updated,
        in_flight: in_flight_now,
    }
}

fn plan_halted(
    policy: &Policy,
    observed: &Observed,
    nodes: &[&NodeView],
    target: &str,
    updated: usize,
    halt: Halt,
) -> Plan {
    let in_flight = nodes
        .iter()
        .filter(|n| n.desired_version.as_deref() == Some(target) && !is_updated(policy, n, target))
        .map(|n| n.name.clone())
        .collect();
    let previous = match (&observed.current_version, policy.auto_rollback) {
        (Some(prev), true) if prev != target => prev.clone(),
        _ => {
            return Plan {
                actions: Vec::new(),
                phase: Phase::Halted(halt),
                updated,
                in_flight,
            };
        }
    };
    // Move back every node that was moved to the failed target. Nodes that are not ready go
    // first and at once (they are unavailable already); ready nodes follow within the
    // maxUnavailable budget.
    let moved: Vec<&&NodeView> = nodes
        .iter()
        .filter(|n| n.desired_version.as_deref() == Some(target))
        .collect();
    let unavailable = nodes.iter().filter(|n| !n.dataplane_ready).count();
    let budget = policy
        .max_unavailable
        .resolve(nodes.len())
        .saturating_sub(unavailable);
    // Nodes already sent back whose pod was not restarted yet (a leader change in between).
    let mut actions: Vec<Action> = nodes
        .iter()
        .filter(|n| n.desired_version.as_deref() != Some(target) && needs_restart(n))
        .map(|n| Action::RestartAgent {
            node: n.name.clone(),
        })
        .collect();
    let (down, up): (Vec<&&NodeView>, Vec<&&NodeView>) =
        moved.into_iter().partition(|n| !n.dataplane_ready);
    for n in down.into_iter().chain(up.into_iter().take(budget)) {
        actions.push(Action::SetDesiredVersion {
            node: n.name.clone(),
            version: previous.clone(),
        });
        actions.push(Action::RestartAgent {
            node: n.name.clone(),
        });
    }
    let phase = if actions.is_empty() {
        Phase::Halted(halt)
    } else {
        Phase::RollingBack(halt)
    };
    Plan {
        actions,
        phase,
        updated,
        in_flight,
    }
}

/// The node's agent runs (or ran) a data plane that traffic may depend on.
fn serving(n: &NodeView) -> bool {
    n.agent_version.is_some() || n.dataplane_ready
}

/// A node counts as updated once it runs `target`, healthy and unbroken, for `min_ready`.
fn is_updated(policy: &Policy, n: &NodeView, target: &str) -> bool {
    n.agent_version.as_deref() == Some(target)
        && n.dataplane_ready
        && n.dataplane_gaps == 0
        && n.link_ids_stable
        && n.ready_for.is_some_and(|d| d >= policy.min_ready)
}

/// The desired version is set but the node's agent pod still runs another version: the pod
/// was never restarted (e.g. the previous leader stopped between the two steps).
fn needs_restart(n: &NodeView) -> bool {
    n.pod_version.is_some() && n.pod_version != n.desired_version
}

/// The first node moving to `target` that failed, in name order.
fn first_failure(policy: &Policy, nodes: &[&NodeView], target: &str) -> Option<Halt> {
    nodes
        .iter()
        .filter(|n| n.desired_version.as_deref() == Some(target))
        .find_map(|n| {
            let reason = if let Some(why) = &n.preflight_failure {
                format!("preflight of version {target} failed on node {}: {why}", n.name)
            } else if n.dataplane_gaps > 0 || !n.link_ids_stable {
                format!(
                    "node {} reported a data-plane gap while moving to {target} (gaps: {}, link ids stable: {})",
                    n.name, n.dataplane_gaps, n.link_ids_stable
                )
            } else if !is_updated(policy, n, target)
                && n.upgrade_age.is_some_and(|age| age > policy.progress_deadline)
            {
                format!(
                    "node {} did not become ready on version {target} within progressDeadlineSeconds ({}s)",
                    n.name,
                    policy.progress_deadline.as_secs()
                )
            } else {
                return None;
            };
            Some(Halt {
                node: n.name.clone(),
                reason,
            })
        })
}

#[cfg(test)]
mod tests;
