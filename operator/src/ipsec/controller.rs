//! The IPsec key manager loop: one idempotent pass over every `IPsecPolicy`, woken by watches
//! and by the next `rotationInterval` deadline. Runs only while this instance leads.
//!
//! ```text
//!  watch IPsecPolicies ──┐                        ┌─ 1. Secret ∪ (persisted, next) gens (SSA)
//!  watch NodeEnrollments ┤ reflector stores ──►   │  2. IPsecPolicy.status (SSA), Events
//!  watch Nodes ──────────┤  decide (pure) per ──► ├─ 3. Secret = next gens only (SSA)
//!  watch Secrets (ns) ───┘  policy                └─ 4. wait until the caches show 1-3
//! ```
//!
//! The published Secret is applied whole with the operator's one field manager, so entries of
//! policies that no longer exist disappear with the next pass. Waiting for the caches keeps a
//! pass from deciding on state older than its own writes (which could otherwise give one SPI
//! two different keys).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::FutureExt;
use k8s_openapi::{
    ByteString,
    api::core::v1::{Node, NodeStatus, Secret},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use meshlet_crds::{
    IPsecPolicy, NodeEnrollment,
    ipsec::{GENERATED_KEY_LEN, GENERATED_SALT_LEN, KeyMaterial},
    names::{COMPONENT_LABEL, IPSEC_KEY_SECRET, NAME_LABEL, NAMESPACE},
    v1alpha1::{IPsecAlgorithm, IPsecPolicyStatus},
};
use serde_json::json;
use tokio::sync::Notify;

use super::decide::{self, Decision, Inputs, NodeView};
use crate::{
    FIELD_MANAGER,
    controller::Context,
    watch::{AbortOnDrop, caches_filled, failure_backoff, next_pass, spawn_reflector},
};

/// A step of a pass that failed. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum IpsecError {
    /// The system's random source failed; nothing was written.
    #[error("failed to read the system random source for new key material")]
    Random(#[source] getrandom::Error),
    /// Applying the published key Secret failed.
    #[error("failed to apply the key Secret {NAMESPACE}/{IPSEC_KEY_SECRET}")]
    ApplySecret(#[source] kube::Error),
    /// Writing a policy's status failed.
    #[error("failed to write the status of IPsecPolicy {name}")]
    WriteStatus {
        /// Policy.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

impl IpsecError {
    /// Metric label of the failing step.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Random(_) => "ipsec_random",
            Self::ApplySecret(_) => "ipsec_apply_secret",
            Self::WriteStatus { .. } => "ipsec_write_status",
        }
    }
}

struct Stores {
    policies: Store<IPsecPolicy>,
    enrollments: Store<NodeEnrollment>,
    nodes: Store<Node>,
    secrets: Store<Secret>,
}

/// Keeps only a Node's labels and addresses.
fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.spec = None;
    node.status = node.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
}

/// Runs the key manager until the task is aborted.
pub async fn run(ctx: Arc<Context>) {
    let wake = Arc::new(Notify::new());
    let client = ctx.client.clone();
    let wc = watcher::Config::default();
    let (policies, w_pol) = reflector::store();
    let (enrollments, w_enr) = reflector::store();
    let (nodes, w_nodes) = reflector::store();
    let (secrets, w_sec) = reflector::store();
    let _tasks = AbortOnDrop(vec![
        spawn_reflector(
            w_pol,
            watcher(Api::<IPsecPolicy>::all(client.clone()), wc.clone())
                .modify(|p| p.metadata.managed_fields = None),
            wake.clone(),
            "IPsecPolicy",
        ),
        spawn_reflector(
            w_enr,
            watcher(Api::<NodeEnrollment>::all(client.clone()), wc.clone())
                .modify(|ne| ne.metadata.managed_fields = None),
            wake.clone(),
            "NodeEnrollment",
        ),
        spawn_reflector(
            w_nodes,
            watcher(Api::<Node>::all(client.clone()), wc.clone()).modify(trim_node),
            wake.clone(),
            "Node",
        ),
        spawn_reflector(
            w_sec,
            watcher(Api::<Secret>::namespaced(client.clone(), NAMESPACE), wc)
                .modify(|s| s.metadata.managed_fields = None),
            wake.clone(),
            "Secret",
        ),
    ]);
    let stores = Stores {
        policies,
        enrollments,
        nodes,
        secrets,
    };
    if !caches_filled(
        vec![
            stores.policies.wait_until_ready().boxed(),
            stores.enrollments.wait_until_ready().boxed(),
            stores.nodes.wait_until_ready().boxed(),
            stores.secrets.wait_until_ready().boxed(),
        ],
        "ipsec",
    )
    .await
    {
        return;
    }
    let mut failures: u32 = 0;
    loop {
        let started = Instant::now();
        let result = reconcile(&ctx, &stores).await;
        ctx.shared
            .metrics
            .ipsec_reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        let wait = match result {
            Ok(wait) => {
                failures = 0;
                wait
            }
            Err(e) => {
                ctx.shared.metrics.failed(e.reason());
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "IPsec pass failed; retrying");
                failures = failures.saturating_add(1);
                failure_backoff(failures)
            }
        };
        next_pass(&wake, wait).await;
    }
}

/// Fresh key material from the system random source; a failure is kept in `failed`.
fn fresh_material(
    failed: &mut Option<getrandom::Error>,
    algorithm: IPsecAlgorithm,
    user_key: Option<&[u8]>,
) -> KeyMaterial {
    let mut random = |len: usize| {
        let mut v = vec![0u8; len];
        if let Err(e) = getrandom::fill(&mut v) {
            *failed = Some(e);
        }
        v
    };
    let key = match user_key {
        Some(k) => k.to_vec(),
        None => random(GENERATED_KEY_LEN),
    };
    KeyMaterial {
        key,
        salt: random(GENERATED_SALT_LEN),
        algorithm,
    }
}

/// Oldest first (creation time, then name), the order ownership of nodes follows.
fn sorted_policies(store: &Store<IPsecPolicy>) -> Vec<IPsecPolicy> {
    let mut all: Vec<IPsecPolicy> = store.state().iter().map(|p| (**p).clone()).collect();
    all.sort_by(|a, b| {
        let at = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let bt = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at.cmp(&bt).then_with(|| a.name_any().cmp(&b.name_any()))
    });
    all
}

/// One pass; returns how long to sleep unless woken.
async fn reconcile(ctx: &Context, stores: &Stores) -> Result<Duration, IpsecError> {
    let now = Timestamp::now();
    let policies = sorted_policies(&stores.policies);
    let nodes: BTreeMap<String, NodeView> = stores
        .nodes
        .state()
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .map(|n| (n.name_any(), decide::node_view(n)))
        .collect();
    let enrollments = stores.enrollments.state();
    let enrollments: Vec<&NodeEnrollment> = enrollments.iter().map(AsRef::as_ref).collect();
    let secrets: BTreeMap<String, Arc<Secret>> = stores
        .secrets
        .state()
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let published_secret = secrets.get(IPSEC_KEY_SECRET);
    let published: BTreeMap<String, ByteString> = published_secret
        .and_then(|s| s.data.clone())
        .unwrap_or_default();

    let mut random_failure = None;
    let mut decisions: Vec<(&IPsecPolicy, Decision)> = Vec::new();
    for policy in policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let selection = decide::select(policy, &policies, &nodes, &enrollments);
        let user_key = decide::user_key(policy, |name| secrets.get(name).map(AsRef::as_ref));
        let inputs = Inputs {
            policy,
            selection: &selection,
            published: &published,
            user_key: &user_key,
            now,
        };
        let d = decide::decide(&inputs, &mut |alg, key| {
            fresh_material(&mut random_failure, alg, key)
        });
        if let Some(why) = &d.published_invalid {
            tracing::warn!(policy = %policy.name_any(), problem = %why, "published key entries are malformed; republishing");
        }
        decisions.push((policy, d));
    }
    if let Some(e) = random_failure {
        return Err(IpsecError::Random(e));
    }

    let names: Vec<String> = decisions.iter().map(|(p, _)| p.name_any()).collect();
    let before = decide::secret_data(
        names
            .iter()
            .zip(&decisions)
            .map(|(n, (_, d))| (n.as_str(), &d.before_status)),
    );
    let after = decide::secret_data(
        names
            .iter()
            .zip(&decisions)
            .map(|(n, (_, d))| (n.as_str(), &d.after_status)),
    );
    let exists = published_secret.is_some();
    let mut secret_written = false;
    if before != published && (exists || !before.is_empty()) {
        apply_secret(ctx, &before).await?;
        secret_written = true;
    }
    let mut statuses: Vec<(String, IPsecPolicyStatus)> = Vec::new();
    for (policy, d) in &decisions {
        report(ctx, policy, d);
        if policy.status.as_ref() != Some(&d.status) {
            write_status(ctx, policy, &d.status).await?;
            statuses.push((policy.name_any(), d.status.clone()));
        }
        for note in &d.notes {
            publish(ctx, policy, note).await;
        }
    }
    if after != before && (exists || secret_written || !after.is_empty()) {
        apply_secret(ctx, &after).await?;
        secret_written = true;
    }
    forget_deleted(ctx, &policies);
    if secret_written || !statuses.is_empty() {
        wait_for_caches(ctx, stores, secret_written.then_some(&after), &statuses).await;
    }
    let next_due = decisions
        .iter()
        .filter_map(|(p, d)| decide::interval_due(p, &d.status))
        .filter(|due| *due > now)
        .min();
    Ok(requeue_after(ctx.settings.resync, next_due, now))
}

/// How long to sleep: until the next interval deadline (plus a little), at most `resync`.
/// A deadline already past is one that could not fire (a rotation is running or the policy
/// is stalled); watches wake the loop when that changes, so it does not shorten the sleep.
fn requeue_after(resync: Duration, next_due: Option<Timestamp>, now: Timestamp) -> Duration {
    match next_due {
        Some(due) if due > now => {
            let left = Duration::from_secs_f64(due.duration_since(now).as_secs_f64().max(0.0));
            resync.min(left + Duration::from_millis(50))
        }
        _ => resync,
    }
}

/// Logs and counts what a decision does (never key bytes: SPIs, phases, counts).
fn report(ctx: &Context, policy: &IPsecPolicy, d: &Decision) {
    let name = policy.name_any();
    let m = &ctx.shared.metrics;
    if !d.generated.is_empty() {
        tracing::info!(policy = %name, spis = ?d.generated, "generated key material for new generations");
    }
    if d.previous != d.next {
        tracing::info!(policy = %name, from = ?d.previous, to = ?d.next, "rotation phase changed");
    }
    if let Some(t) = &d.started {
        tracing::info!(policy = %name, trigger = %t.describe(), "key rotation started");
        m.ipsec_rotation_started(&name, t.label());
    }
    if d.completed {
        m.ipsec_rotation_completed(&name);
    }
    if let Some(st) = &d.stall {
        tracing::warn!(policy = %name, reason = st.reason, message = %st.message, "IPsec policy stalled");
    }
    m.ipsec_set_policy(&name, &format!("{:?}", d.status.phase), &d.status.acks);
}

fn forget_deleted(ctx: &Context, policies: &[IPsecPolicy]) {
    let live: Vec<String> = policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(ResourceExt::name_any)
        .collect();
    ctx.shared.metrics.ipsec_retain_policies(&live);
}

async fn apply_secret(
    ctx: &Context,
    data: &BTreeMap<String, ByteString>,
) -> Result<(), IpsecError> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(IPSEC_KEY_SECRET.to_owned()),
            namespace: Some(NAMESPACE.to_owned()),
            labels: Some(BTreeMap::from([
                (COMPONENT_LABEL.to_owned(), "operator".to_owned()),
                (NAME_LABEL.to_owned(), "meshlet".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(data.clone()),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(ctx.client.clone(), NAMESPACE)
        .patch(
            IPSEC_KEY_SECRET,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(IpsecError::ApplySecret)?;
    ctx.shared.metrics.writes.inc();
    tracing::info!(
        entries = data.len(),
        "published IPsec key generations in {NAMESPACE}/{IPSEC_KEY_SECRET}"
    );
    Ok(())
}

async fn write_status(
    ctx: &Context,
    policy: &IPsecPolicy,
    status: &IPsecPolicyStatus,
) -> Result<(), IpsecError> {
    let name = policy.name_any();
    let body = json!({
        "apiVersion": "meshlet.io/v1alpha1",
        "kind": "IPsecPolicy",
        "metadata": { "name": name },
        "status": status,
    });
    Api::<IPsecPolicy>::all(ctx.client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| IpsecError::WriteStatus {
            name: name.clone(),
            source,
        })?;
    ctx.shared.metrics.writes.inc();
    Ok(())
}

async fn publish(ctx: &Context, policy: &IPsecPolicy, note: &decide::Note) {
    let event = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.to_owned(),
        note: Some(note.message.chars().take(1000).collect()),
        action: "RotateKeys".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        tracing::warn!(reason = note.reason, error = %e, "failed to record an IPsec event");
    }
}

/// Waits (bounded) until the caches show the Secret and statuses this pass wrote.
async fn wait_for_caches(
    ctx: &Context,
    stores: &Stores,
    secret: Option<&BTreeMap<String, ByteString>>,
    statuses: &[(String, IPsecPolicyStatus)],
) {
    let deadline = Instant::now() + ctx.settings.cache_wait;
    let secret_ref = ObjectRef::new(IPSEC_KEY_SECRET).within(NAMESPACE);
    loop {
        let secret_seen = secret.is_none_or(|want| {
            stores
                .secrets
                .get(&secret_ref)
                .is_some_and(|s| s.data.clone().unwrap_or_default() == *want)
        });
        let statuses_seen = statuses.iter().all(|(name, want)| {
            stores
                .policies
                .get(&ObjectRef::new(name))
                .is_none_or(|p| p.status.as_ref() == Some(want))
        });
        if secret_seen && statuses_seen {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!("caches did not show this IPsec pass's writes in time; continuing");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_sleeps_until_the_next_interval_deadline_but_never_spins_on_a_past_one() {
        let now = Timestamp::from_second(1_000).expect("time");
        let resync = Duration::from_secs(30);
        let soon = Timestamp::from_second(1_005).expect("time");
        assert_eq!(
            requeue_after(resync, Some(soon), now),
            Duration::from_millis(5_050)
        );
        let past = Timestamp::from_second(900).expect("time");
        assert_eq!(requeue_after(resync, Some(past), now), resync);
        assert_eq!(requeue_after(resync, None, now), resync);
        let late = Timestamp::from_second(9_000).expect("time");
        assert_eq!(requeue_after(resync, Some(late), now), resync);
    }

    #[test]
    fn a_trimmed_node_keeps_only_labels_and_addresses() {
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": {"a": "b"}, "annotations": {"x": "y"}},
            "spec": {"podCIDR": "10.0.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.1.1.1"}],
                        "capacity": {"cpu": "2"}}
        }))
        .expect("node");
        trim_node(&mut node);
        let view = decide::node_view(&node);
        assert_eq!(view.internal_ip.as_deref(), Some("10.1.1.1"));
        assert_eq!(view.labels.get("a").map(String::as_str), Some("b"));
        assert!(node.spec.is_none() && node.metadata.annotations.is_none());
        assert!(node.status.and_then(|s| s.capacity).is_none());
    }
}
