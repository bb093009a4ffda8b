//! The key manager's decision for one `IPsecPolicy`, from cached state alone (pure).
//!
//! ```text
//!  policy + status ──► state_from_status ──┐
//!  Nodes, NodeEnrollments ──► select ──────┤ NodeAcks
//!  user key Secret ──► user_key ───────────┤            ┌─► before_status  (Secret, 1st)
//!  published Secret ──► materials ─────────┼─► decide ──┼─► status         (2nd)
//!  triggers (interval, annotation, key,    │            ├─► after_status   (Secret, 3rd)
//!            algorithm) ───────────────────┘            └─► notes (Events), stall
//! ```
//!
//! Writes happen in the contract's order: the Secret gains new generations *before* the
//! status names them, and loses old ones only *after* the status stopped naming them. So
//! `before_status` holds the generations of both the persisted and the next state, and
//! `after_status` those of the next state only. Key bytes never leave [`KeyMaterial`], whose
//! `Debug` is redacted; nothing here formats them.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{Node, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use kube::ResourceExt;
use meshlet_crds::{
    IPsecPolicy, NodeEnrollment,
    conditions::{self, IPSEC_READY, READY, RECONCILING, ROTATING, STALLED, Status},
    ipsec::{self as contract, KeyMaterial, MIN_KEY_LEN, USER_KEY_FIELD},
    names::{IPSEC_KEY_SECRET, NAMESPACE, ROTATE_ANNOTATION},
    v1alpha1::{IPsecAcks, IPsecAlgorithm, IPsecPolicyStatus, RotationPhase},
};

use super::{
    interval,
    rotation::{self, NodeAck, RotationState},
};

/// `Stalled` reason: `spec.keySecretRef` names a Secret that does not exist.
pub const KEY_SECRET_NOT_FOUND: &str = "KeySecretNotFound";
/// `Stalled` reason: the user key Secret exists but cannot be used.
pub const KEY_SECRET_INVALID: &str = "KeySecretInvalid";
/// `Stalled` reason: a selected node cannot complete the current phase.
pub const NODE_FAILED: &str = "NodeFailed";
/// `Stalled` reason: the policy selects nodes an older policy owns.
pub const POLICY_CONFLICT: &str = "PolicyConflict";

/// What the key manager keeps of a Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// The Node's labels.
    pub labels: BTreeMap<String, String>,
    /// Its first `InternalIP` address, the peer address agents use.
    pub internal_ip: Option<String>,
}

/// The parts of `node` the key manager reads.
pub fn node_view(node: &Node) -> NodeView {
    NodeView {
        labels: node.labels().clone(),
        internal_ip: node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.clone()),
    }
}

/// Why a policy cannot progress (`Stalled` True). Never carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// UpperCamelCase reason.
    pub reason: &'static str,
    /// What is wrong and what to change.
    pub message: String,
}

/// The pre-shared key of `policy`: `Ok(None)` when the operator generates keys, `Ok(Some)`
/// with the user's key from `spec.keySecretRef`, or the stall naming the Secret and field.
/// `find` looks a Secret up by name in the operator's namespace.
pub fn user_key<'a>(
    policy: &IPsecPolicy,
    find: impl FnOnce(&str) -> Option<&'a Secret>,
) -> Result<Option<Vec<u8>>, Stall> {
    let Some(reference) = &policy.spec.key_secret_ref else {
        return Ok(None);
    };
    let namespace = reference.namespace.as_deref().unwrap_or(NAMESPACE);
    let full = format!("{namespace}/{}", reference.name);
    let invalid = |message: String| Stall {
        reason: KEY_SECRET_INVALID,
        message,
    };
    if namespace != NAMESPACE {
        return Err(invalid(format!(
            "spec.keySecretRef.namespace is {namespace:?}: key Secrets must live in {NAMESPACE}"
        )));
    }
    if reference.name == IPSEC_KEY_SECRET {
        return Err(invalid(format!(
            "spec.keySecretRef.name {IPSEC_KEY_SECRET:?} is the Secret the operator publishes keys in; name a Secret of your own"
        )));
    }
    let Some(secret) = find(&reference.name) else {
        return Err(Stall {
            reason: KEY_SECRET_NOT_FOUND,
            message: format!("Secret {full} named by spec.keySecretRef does not exist"),
        });
    };
    let key = secret.data.as_ref().and_then(|d| d.get(USER_KEY_FIELD));
    match key {
        None => Err(invalid(format!(
            "Secret {full} (spec.keySecretRef) has no data.{USER_KEY_FIELD}"
        ))),
        Some(k) if k.0.len() < MIN_KEY_LEN => Err(invalid(format!(
            "Secret {full} (spec.keySecretRef): data.{USER_KEY_FIELD} holds {} bytes; at least {MIN_KEY_LEN} are required",
            k.0.len()
        ))),
        Some(k) => Ok(Some(k.0.clone())),
    }
}

/// The nodes a policy owns, and the ones it selects but cannot use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// Acknowledgements of every selected node.
    pub acks: Vec<NodeAck>,
    /// Selected nodes left out, with why (e.g. no `InternalIP`).
    pub skipped: Vec<String>,
    /// Nodes this policy selects that an older policy owns: `(node, owner)`.
    pub conflicts: Vec<(String, String)>,
}

/// Selected nodes of `policy`: enrollments not being deleted and not draining, whose Node's
/// labels make [`contract::policy_for_node`] return this policy.
pub fn select(
    policy: &IPsecPolicy,
    policies: &[IPsecPolicy],
    nodes: &BTreeMap<String, NodeView>,
    enrollments: &[&NodeEnrollment],
) -> Selection {
    let name = policy.name_any();
    let mut out = Selection::default();
    let mut enrollments: Vec<&NodeEnrollment> = enrollments.to_vec();
    enrollments.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
    for ne in enrollments {
        if ne.metadata.deletion_timestamp.is_some() || ne.spec.drain {
            continue;
        }
        let node = &ne.spec.node_name;
        let Some(view) = nodes.get(node) else {
            continue;
        };
        let owner = contract::policy_for_node(policies, &view.labels).map(ResourceExt::name_any);
        match owner {
            Some(o) if o == name => match view.internal_ip {
                Some(_) => out.acks.push(node_ack(ne, &name)),
                None => out
                    .skipped
                    .push(format!("{node} has no InternalIP address")),
            },
            Some(o) if contract::selects(policy, &view.labels) => {
                out.conflicts.push((node.clone(), o));
            }
            _ => {}
        }
    }
    out
}

/// What `ne` acknowledges for policy `policy` (acks of another policy do not count).
pub fn node_ack(ne: &NodeEnrollment, policy: &str) -> NodeAck {
    let status = ne.status.as_ref();
    let ipsec = status
        .and_then(|s| s.ipsec.as_ref())
        .filter(|i| i.policy.as_deref() == Some(policy));
    let spi = |s: i64| u32::try_from(s).ok();
    NodeAck {
        node: ne.spec.node_name.clone(),
        installed_spis: ipsec
            .map(|i| i.installed_spis.iter().filter_map(|s| spi(*s)).collect())
            .unwrap_or_default(),
        active_spi: ipsec.and_then(|i| i.active_spi).and_then(spi),
        error: status
            .and_then(|s| conditions::find_condition(&s.conditions, IPSEC_READY))
            .filter(|c| c.status == "False")
            .map(|c| format!("{}: {}", c.reason, c.message)),
    }
}

/// The rotation state persisted in `status` (phase, activeSPI, pendingSPI). A status the
/// operator could not have written (a rotating phase without `pendingSPI`) reads as `Stable`.
pub fn state_from_status(status: Option<&IPsecPolicyStatus>) -> RotationState {
    let spi = |s: Option<i64>| s.and_then(|s| u32::try_from(s).ok());
    let Some(status) = status else {
        return RotationState::Unkeyed;
    };
    let Some(active) = spi(status.active_spi) else {
        return RotationState::Unkeyed;
    };
    match (status.phase, spi(status.pending_spi)) {
        (RotationPhase::Installing, Some(new)) => RotationState::Installing { old: active, new },
        (RotationPhase::Switching, Some(old)) => RotationState::Switching { old, new: active },
        (RotationPhase::Retiring, Some(old)) => RotationState::Retiring { old, new: active },
        _ => RotationState::Stable { active },
    }
}

fn phase_of(state: RotationState) -> RotationPhase {
    match state {
        RotationState::Unkeyed | RotationState::Stable { .. } => RotationPhase::Stable,
        RotationState::Installing { .. } => RotationPhase::Installing,
        RotationState::Switching { .. } => RotationPhase::Switching,
        RotationState::Retiring { .. } => RotationPhase::Retiring,
    }
}

/// Why a rotation starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The `meshlet.io/rotate` annotation has a value not yet acted on.
    Requested(String),
    /// The user key Secret holds a key other than the active generation's.
    KeyChanged,
    /// `spec.algorithm` differs from the active generation's algorithm.
    AlgorithmChanged,
    /// `spec.rotationInterval` elapsed since `status.lastRotationTime`.
    Interval,
}

impl Trigger {
    /// Human-readable cause, for Events and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Requested(v) => format!("requested by annotation {ROTATE_ANNOTATION}={v}"),
            Self::KeyChanged => "the key in spec.keySecretRef changed".to_owned(),
            Self::AlgorithmChanged => "spec.algorithm changed".to_owned(),
            Self::Interval => "spec.rotationInterval elapsed".to_owned(),
        }
    }

    /// Short metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Requested(_) => "requested",
            Self::KeyChanged => "key_changed",
            Self::AlgorithmChanged => "algorithm_changed",
            Self::Interval => "interval",
        }
    }
}

fn rotate_request(policy: &IPsecPolicy) -> Option<&String> {
    policy
        .annotations()
        .get(ROTATE_ANNOTATION)
        .filter(|v| !v.is_empty())
}

/// When `spec.rotationInterval` next elapses, if it parses and a rotation time is known.
pub fn interval_due(policy: &IPsecPolicy, status: &IPsecPolicyStatus) -> Option<Timestamp> {
    let every = interval::parse(&policy.spec.rotation_interval)?;
    let last = status.last_rotation_time.as_ref()?.0;
    last.checked_add(SignedDuration::try_from(every).ok()?).ok()
}

/// Whether a rotation should start now (asked only in `Stable`). `active` is the active
/// generation's published material, `user_key` the key from `spec.keySecretRef`.
pub fn trigger(
    policy: &IPsecPolicy,
    status: &IPsecPolicyStatus,
    active: Option<&KeyMaterial>,
    user_key: Option<&[u8]>,
    now: Timestamp,
) -> Option<Trigger> {
    if let Some(v) = rotate_request(policy)
        && status.observed_rotate_request.as_ref() != Some(v)
    {
        return Some(Trigger::Requested(v.clone()));
    }
    if let (Some(m), Some(k)) = (active, user_key)
        && m.key != k
    {
        return Some(Trigger::KeyChanged);
    }
    if active.is_some_and(|m| m.algorithm != policy.spec.algorithm) {
        return Some(Trigger::AlgorithmChanged);
    }
    interval_due(policy, status)
        .filter(|due| now >= *due)
        .map(|_| Trigger::Interval)
}

/// Everything one policy needs this pass.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The policy (with its persisted status).
    pub policy: &'a IPsecPolicy,
    /// Its selected nodes.
    pub selection: &'a Selection,
    /// `data` of the published key Secret (every policy's entries).
    pub published: &'a BTreeMap<String, ByteString>,
    /// [`user_key`]'s answer.
    pub user_key: &'a Result<Option<Vec<u8>>, Stall>,
    /// Now.
    pub now: Timestamp,
}

/// A user-visible note: one Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// A Warning rather than a Normal event.
    pub warning: bool,
    /// UpperCamelCase reason.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
}

/// What to do for one policy.
#[derive(Debug, Clone)]
pub struct Decision {
    /// State persisted in status before this pass.
    pub previous: RotationState,
    /// State after this pass.
    pub next: RotationState,
    /// The rotation this pass started, and why.
    pub started: Option<Trigger>,
    /// Whether this pass finished a rotation (reached `Stable` from a rotating phase).
    pub completed: bool,
    /// Generations to publish before writing status (persisted ∪ next state's).
    pub before_status: BTreeMap<u32, KeyMaterial>,
    /// Generations to publish once status is written (next state's).
    pub after_status: BTreeMap<u32, KeyMaterial>,
    /// Generations given fresh material this pass.
    pub generated: Vec<u32>,
    /// The published entries of this policy were malformed (repaired by this pass).
    pub published_invalid: Option<String>,
    /// The new status.
    pub status: IPsecPolicyStatus,
    /// Why the policy cannot progress, if it cannot.
    pub stall: Option<Stall>,
    /// Events to record.
    pub notes: Vec<Note>,
}

/// Fresh material for a generation: the user key (or a generated one) and a new salt.
pub type Fresh<'f> = dyn FnMut(IPsecAlgorithm, Option<&[u8]>) -> KeyMaterial + 'f;

/// Decides one pass for one policy. `fresh` makes new key material (random in production).
pub fn decide(inputs: &Inputs<'_>, fresh: &mut Fresh<'_>) -> Decision {
    let policy = inputs.policy;
    let name = policy.name_any();
    let prior = policy.status.clone().unwrap_or_default();
    let previous = state_from_status(policy.status.as_ref());
    let (mut materials, published_invalid) = match contract::published(inputs.published, &name) {
        Ok(m) => (m, None),
        Err(e) => (BTreeMap::new(), Some(e.to_string())),
    };
    let acks = &inputs.selection.acks;
    let (next, started, mut stall) = match inputs.user_key {
        Err(stall) => (previous, None, Some(stall.clone())),
        Ok(key) => {
            let wanted = match previous {
                RotationState::Stable { active } => trigger(
                    policy,
                    &prior,
                    materials.get(&active),
                    key.as_deref(),
                    inputs.now,
                ),
                _ => None,
            };
            let step = rotation::step(previous, acks, wanted.is_some());
            let stall = step.blocked.map(|message| Stall {
                reason: NODE_FAILED,
                message,
            });
            (step.next, wanted, stall)
        }
    };

    let mut generated = Vec::new();
    let frozen = inputs.user_key.is_err();
    let mut needed = previous.published_spis();
    needed.extend(next.published_spis());
    for spi in &needed {
        if !materials.contains_key(spi) && !frozen {
            let key = inputs.user_key.as_ref().ok().and_then(Option::as_deref);
            materials.insert(*spi, fresh(policy.spec.algorithm, key));
            generated.push(*spi);
        }
    }
    let restrict = |spis: &[u32]| -> BTreeMap<u32, KeyMaterial> {
        materials
            .iter()
            .filter(|(s, _)| spis.contains(s))
            .map(|(s, m)| (*s, m.clone()))
            .collect()
    };
    let before_status = restrict(&needed);
    let after_status = restrict(&next.published_spis());

    if stall.is_none() {
        stall = stable_node_failure(next, acks).or_else(|| conflict(&inputs.selection.conflicts));
    }
    let completed = previous != next
        && matches!(next, RotationState::Stable { .. })
        && previous != RotationState::Unkeyed;
    let status = build_status(
        inputs,
        &prior,
        previous,
        next,
        started.as_ref(),
        stall.as_ref(),
    );
    let notes = notes(
        &prior,
        previous,
        next,
        started.as_ref(),
        stall.as_ref(),
        acks,
    );
    Decision {
        previous,
        next,
        started,
        completed,
        before_status,
        after_status,
        generated,
        published_invalid,
        status,
        stall,
        notes,
    }
}

/// In `Stable`, a node that has not taken the key and reports why.
fn stable_node_failure(state: RotationState, acks: &[NodeAck]) -> Option<Stall> {
    let RotationState::Stable { active } = state else {
        return None;
    };
    acks.iter().filter(|n| !in_force(active, n)).find_map(|n| {
        n.error.as_ref().map(|e| Stall {
            reason: NODE_FAILED,
            message: format!("node {} cannot apply SPI {active}: {e}", n.node),
        })
    })
}

fn conflict(conflicts: &[(String, String)]) -> Option<Stall> {
    let (_, owner) = conflicts.first()?;
    let nodes: Vec<&str> = conflicts.iter().map(|(n, _)| n.as_str()).take(10).collect();
    Some(Stall {
        reason: POLICY_CONFLICT,
        message: format!(
            "spec.nodeSelector also selects {} node(s) owned by the older policy {owner} ({}{}); they stay with it: narrow spec.nodeSelector",
            conflicts.len(),
            nodes.join(", "),
            if conflicts.len() > nodes.len() {
                ", …"
            } else {
                ""
            }
        ),
    })
}

fn in_force(active: u32, n: &NodeAck) -> bool {
    n.active_spi == Some(active) && n.installed_spis.contains(&active)
}

/// Acknowledgement counts of `state`'s new generation (the active one when `Stable`).
pub fn ack_counts(state: RotationState, nodes: &[NodeAck]) -> IPsecAcks {
    let count = |f: &dyn Fn(&NodeAck) -> bool| {
        i64::try_from(nodes.iter().filter(|n| f(n)).count()).unwrap_or(i64::MAX)
    };
    let (new, old) = match state {
        RotationState::Unkeyed => return IPsecAcks::default(),
        RotationState::Stable { active } => (active, None),
        RotationState::Installing { old, new }
        | RotationState::Switching { old, new }
        | RotationState::Retiring { old, new } => (new, Some(old)),
    };
    IPsecAcks {
        selected: count(&|_| true),
        installed: count(&|n| n.installed_spis.contains(&new)),
        switched: count(&|n| n.active_spi == Some(new)),
        retired: count(&|n| match old {
            Some(old) => !n.installed_spis.contains(&old),
            None => n.installed_spis.iter().all(|s| *s == new),
        }),
    }
}

fn spi_i64(spi: Option<u32>) -> Option<i64> {
    spi.map(i64::from)
}

/// The status after this pass; conditions keep their transition times unless they flip.
fn build_status(
    inputs: &Inputs<'_>,
    prior: &IPsecPolicyStatus,
    previous: RotationState,
    next: RotationState,
    started: Option<&Trigger>,
    stall: Option<&Stall>,
) -> IPsecPolicyStatus {
    let policy = inputs.policy;
    let generation = policy.metadata.generation;
    let acks = &inputs.selection.acks;
    let mut s = prior.clone();
    s.phase = phase_of(next);
    s.active_spi = spi_i64(next.active_spi());
    s.pending_spi = spi_i64(next.pending_spi());
    s.acks = ack_counts(next, acks);
    s.observed_generation = generation;
    let request = rotate_request(policy).cloned();
    if started.is_some() || (previous == RotationState::Unkeyed && next != previous) {
        // A request made before the first key or during this rotation is served by it.
        s.observed_rotate_request = request.or(s.observed_rotate_request.take());
    }
    let reached_stable = matches!(next, RotationState::Stable { .. }) && previous != next;
    if reached_stable
        || (matches!(next, RotationState::Stable { .. }) && s.last_rotation_time.is_none())
    {
        // metav1.Time carries whole seconds; keep that precision so a read-back compares equal.
        let second = Timestamp::from_second(inputs.now.as_second()).unwrap_or(inputs.now);
        s.last_rotation_time = Some(Time(second));
    }

    let rotating = !matches!(next, RotationState::Stable { .. } | RotationState::Unkeyed);
    let selected = acks.len();
    let phase = s.phase;
    let c = &mut s.conditions;
    let set = |c: &mut Vec<_>, t: &str, st: Status, reason: &str, msg: &str| {
        conditions::set_condition_at(c, t, st, reason, msg, generation, inputs.now);
    };
    let skipped = if inputs.selection.skipped.is_empty() {
        String::new()
    } else {
        format!("; skipped: {}", inputs.selection.skipped.join(", "))
    };
    let progress = match next {
        RotationState::Unkeyed => "no key published yet".to_owned(),
        RotationState::Stable { active } => {
            let n = acks.iter().filter(|n| in_force(active, n)).count();
            format!("SPI {active} in force on {n}/{selected} selected nodes{skipped}")
        }
        RotationState::Installing { old, new } => format!(
            "Installing SPI {new} (sending on {old}): {}/{selected} nodes installed it{skipped}",
            s.acks.installed
        ),
        RotationState::Switching { old, new } => format!(
            "Switching from SPI {old} to {new}: {}/{selected} nodes send on {new}{skipped}",
            s.acks.switched
        ),
        RotationState::Retiring { old, new } => format!(
            "Retiring SPI {old} (sending on {new}): {}/{selected} nodes removed it{skipped}",
            s.acks.retired
        ),
    };
    let all_in_force = match next {
        RotationState::Stable { active } => acks.iter().all(|n| in_force(active, n)),
        _ => false,
    };
    match stall {
        Some(st) => {
            set(c, STALLED, Status::True, st.reason, &st.message);
            set(c, READY, Status::False, st.reason, &st.message);
            set(c, RECONCILING, Status::False, st.reason, &progress);
        }
        None => {
            set(c, STALLED, Status::False, "Progressing", "");
            if all_in_force {
                set(c, READY, Status::True, "KeysInForce", &progress);
                set(c, RECONCILING, Status::False, "KeysInForce", &progress);
            } else {
                let reason = if rotating {
                    "Rotating"
                } else {
                    "AwaitingNodes"
                };
                set(c, READY, Status::False, reason, &progress);
                set(c, RECONCILING, Status::True, reason, &progress);
            }
        }
    }
    if rotating {
        let reason = format!("{phase:?}");
        set(c, ROTATING, Status::True, &reason, &progress);
    } else {
        set(c, ROTATING, Status::False, "Stable", "");
    }
    s
}

/// Index of a phase along one rotation (Stable after a rotation is 4).
fn phase_index(state: RotationState) -> u8 {
    match state {
        RotationState::Unkeyed | RotationState::Stable { .. } => 0,
        RotationState::Installing { .. } => 1,
        RotationState::Switching { .. } => 2,
        RotationState::Retiring { .. } => 3,
    }
}

/// Events for the phases entered this pass and a new or changed stall.
fn notes(
    prior: &IPsecPolicyStatus,
    previous: RotationState,
    next: RotationState,
    started: Option<&Trigger>,
    stall: Option<&Stall>,
    acks: &[NodeAck],
) -> Vec<Note> {
    let mut out = Vec::new();
    let normal = |reason: &'static str, message: String| Note {
        warning: false,
        reason,
        message,
    };
    if previous == RotationState::Unkeyed {
        if let Some(active) = next.active_spi() {
            out.push(normal(
                "KeysPublished",
                format!("published the first key generation, SPI {active}"),
            ));
        }
    } else if previous != next {
        let from = if started.is_some() {
            1
        } else {
            phase_index(previous) + 1
        };
        let to = match next {
            RotationState::Stable { .. } => 4,
            other => phase_index(other),
        };
        let pair = |st: RotationState| match st {
            RotationState::Installing { old, new }
            | RotationState::Switching { old, new }
            | RotationState::Retiring { old, new } => Some((old, new)),
            _ => None,
        };
        let (old, new) = pair(previous).or_else(|| pair(next)).unwrap_or((
            previous.active_spi().unwrap_or_default(),
            next.active_spi().unwrap_or_default(),
        ));
        let n = acks.len();
        for phase in from..=to {
            out.push(match phase {
                1 => normal(
                    "RotationStarted",
                    format!(
                        "rotating keys from SPI {old} to {new} ({}); installing SPI {new} on {n} node(s)",
                        started.map(Trigger::describe).unwrap_or_default()
                    ),
                ),
                2 => normal(
                    "KeysInstalled",
                    format!("every selected node ({n}) installed SPI {new}; switching outbound traffic to it"),
                ),
                3 => normal(
                    "Retiring",
                    format!("every selected node ({n}) sends on SPI {new}; retiring SPI {old}"),
                ),
                _ => normal(
                    "RotationComplete",
                    format!("SPI {new} in force; SPI {old} retired on every node"),
                ),
            });
        }
    }
    let prior_stall = conditions::find_condition(&prior.conditions, STALLED)
        .filter(|c| c.status == "True")
        .map(|c| c.message.as_str());
    if let Some(st) = stall
        && prior_stall != Some(st.message.as_str())
    {
        out.push(Note {
            warning: true,
            reason: "Stalled",
            message: st.message.clone(),
        });
    }
    out
}

/// The published Secret's `data`: every policy's generations.
pub fn secret_data<'a>(
    parts: impl IntoIterator<Item = (&'a str, &'a BTreeMap<u32, KeyMaterial>)>,
) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::new();
    for (policy, generations) in parts {
        data.extend(contract::publish(policy, generations));
    }
    data
}

#[cfg(test)]
mod tests;
