//! The IPsec key manager against the API test server: the operator runs as its ServiceAccount
//! under the shipped RBAC; stand-in agents (agent ServiceAccount) follow the agent contract.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use meshlet_crds::{
    IPsecPolicy, NodeEnrollment,
    conditions::{READY, ROTATING, STALLED, find_condition},
    ipsec::{self as contract, KeyMaterial},
    names::{IPSEC_KEY_SECRET, NAMESPACE},
    v1alpha1::{IPsecAlgorithm, IPsecPolicyStatus, RotationPhase},
};
use serde_json::json;
use support::{
    Cluster, OperatorHandle, eventually,
    ipsec::{Behaviour, IpsecAgents, add_ipsec_nodes, captured_logs, leak_forms},
    kubectl,
};
use tokio::task::JoinHandle;

const LEASE_SECS: f64 = 2.0;
const POLICY: &str = "mesh";

async fn create_policy(cluster: &Cluster, policy: &IPsecPolicy) {
    Api::<IPsecPolicy>::all(cluster.admin.clone())
        .create(&PostParams::default(), policy)
        .await
        .expect("create IPsecPolicy");
}

async fn policy(cluster: &Cluster, name: &str) -> IPsecPolicy {
    Api::<IPsecPolicy>::all(cluster.admin.clone())
        .get(name)
        .await
        .expect("get IPsecPolicy")
}

/// Polls the policy's status until `pred` holds.
async fn wait_status(
    cluster: &Cluster,
    secs: u64,
    what: &str,
    pred: impl Fn(&IPsecPolicyStatus) -> bool,
) -> IPsecPolicyStatus {
    eventually(secs, what, || async {
        let st = policy(cluster, POLICY).await.status?;
        pred(&st).then_some(st)
    })
    .await
}

fn is(st: &IPsecPolicyStatus, phase: RotationPhase, active: i64) -> bool {
    st.phase == phase && st.active_spi == Some(active)
}

fn ready(st: &IPsecPolicyStatus) -> bool {
    find_condition(&st.conditions, READY).is_some_and(|c| c.status == "True")
}

async fn published_secret(cluster: &Cluster) -> BTreeMap<String, ByteString> {
    Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE)
        .get_opt(IPSEC_KEY_SECRET)
        .await
        .expect("get Secret")
        .and_then(|s| s.data)
        .unwrap_or_default()
}

async fn generations(cluster: &Cluster) -> BTreeMap<u32, KeyMaterial> {
    contract::published(&published_secret(cluster).await, POLICY).expect("well-formed Secret")
}

async fn enrollment(cluster: &Cluster, node: &str) -> NodeEnrollment {
    Api::<NodeEnrollment>::all(cluster.admin.clone())
        .get(node)
        .await
        .expect("get enrollment")
}

/// Status versions of the policy and generation sets of the Secret, in the API's one global
/// resourceVersion order.
struct History {
    seen: Arc<Mutex<Vec<(u64, Seen)>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Phase, activeSPI and pendingSPI of one status version.
type PhaseSpis = (RotationPhase, Option<i64>, Option<i64>);

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Policy(RotationPhase, Option<i64>, Option<i64>),
    Secret(BTreeSet<u32>),
}

impl Drop for History {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn rv(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

impl History {
    fn start(cluster: &Cluster) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let policies = watcher(
            Api::<IPsecPolicy>::all(cluster.admin.clone()),
            watcher::Config::default().fields(&format!("metadata.name={POLICY}")),
        )
        .default_backoff()
        .applied_objects();
        let p = tokio::spawn(async move {
            let mut policies = std::pin::pin!(policies);
            while let Some(Ok(p)) = policies.next().await {
                let st = p.status.clone().unwrap_or_default();
                s.lock().expect("history").push((
                    rv(&p.metadata),
                    Seen::Policy(st.phase, st.active_spi, st.pending_spi),
                ));
            }
        });
        let s = seen.clone();
        let secrets = watcher(
            Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE),
            watcher::Config::default().fields(&format!("metadata.name={IPSEC_KEY_SECRET}")),
        )
        .default_backoff()
        .applied_objects();
        let q = tokio::spawn(async move {
            let mut secrets = std::pin::pin!(secrets);
            while let Some(Ok(sec)) = secrets.next().await {
                let gens = contract::published(&sec.data.clone().unwrap_or_default(), POLICY)
                    .map(|g| g.keys().copied().collect())
                    .unwrap_or_default();
                s.lock()
                    .expect("history")
                    .push((rv(&sec.metadata), Seen::Secret(gens)));
            }
        });
        Self {
            seen,
            tasks: vec![p, q],
        }
    }

    /// Distinct (phase, active, pending) in order, and every moment where the status named a
    /// generation nodes must hold inbound SAs for that the Secret did not publish.
    fn check(&self) -> (Vec<PhaseSpis>, Vec<String>) {
        let mut events = self.seen.lock().expect("history").clone();
        events.sort_by_key(|(rv, _)| *rv);
        let mut phases: Vec<PhaseSpis> = Vec::new();
        let mut violations = Vec::new();
        let (mut status, mut secret) = (None, BTreeSet::new());
        for (rv, e) in events {
            match e {
                Seen::Policy(ph, a, p) => {
                    if phases.last() != Some(&(ph, a, p)) && a.is_some() {
                        phases.push((ph, a, p));
                    }
                    status = Some((ph, a, p));
                }
                Seen::Secret(g) => secret = g,
            }
            let Some((ph, Some(a), p)) = status else {
                continue;
            };
            let spi = |s: i64| u32::try_from(s).unwrap_or_default();
            let mut required = vec![spi(a)];
            if matches!(ph, RotationPhase::Installing | RotationPhase::Switching) {
                required.extend(p.map(spi));
            }
            for r in required {
                if !secret.contains(&r) {
                    violations.push(format!(
                        "at resourceVersion {rv} the status says {ph:?} active {a} pending {p:?} but the Secret publishes only {secret:?}"
                    ));
                }
            }
        }
        (phases, violations)
    }
}

/// Asserts none of the key material appears in `text`.
fn assert_no_key_bytes(what: &str, text: &str, material: &[KeyMaterial]) {
    for m in material {
        for bytes in [&m.key, &m.salt] {
            for form in leak_forms(bytes) {
                assert!(
                    !text.contains(&form),
                    "{what} contains key material ({} chars of it)",
                    form.len()
                );
            }
        }
    }
}

async fn start_operator(cluster: &Cluster) -> OperatorHandle {
    cluster.start_operator("op-0", LEASE_SECS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_on_annotation_advances_phase_by_phase_only_as_every_node_acknowledges() {
    let logs = captured_logs();
    let cluster = Cluster::start().await;
    add_ipsec_nodes(&cluster, &["n1", "n2", "n3"], &[("mesh", "on")]).await;
    let agents = IpsecAgents::start(&cluster).await;
    let history = History::start(&cluster);
    let op = start_operator(&cluster).await;
    create_policy(&cluster, &IPsecPolicy::test(POLICY)).await;

    // The first generation: generated (no keySecretRef), 32-byte key, 16-byte salt.
    let st = wait_status(&cluster, 20, "Stable on SPI 256 and Ready", |st| {
        is(st, RotationPhase::Stable, 256) && ready(st)
    })
    .await;
    assert_eq!(st.acks.selected, 3);
    assert!(st.last_rotation_time.is_some());
    let first = generations(&cluster).await;
    assert_eq!(first.keys().copied().collect::<Vec<_>>(), [256]);
    assert_eq!(first[&256].key.len(), 32);
    assert_eq!(first[&256].salt.len(), 16);
    assert_eq!(first[&256].algorithm, IPsecAlgorithm::Rfc4106GcmAes);

    let (ok, out) = kubectl(&cluster, &["get", "ipsecpolicy"]).await;
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["NAME", "ALGORITHM", "SPI", "PHASE", "LAST ROTATION", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {out}");
    }
    let row = out.lines().nth(1).unwrap_or_default();
    for cell in [POLICY, "rfc4106(gcm(aes))", "256", "Stable"] {
        assert!(row.contains(cell), "missing {cell}: {out}");
    }

    // n3's agent withholds its acknowledgements; a rotation is requested with kubectl.
    agents.set("n3", Behaviour::Withhold);
    let (ok, out) = kubectl(
        &cluster,
        &["annotate", "ipsecpolicy", POLICY, "meshlet.io/rotate=r1"],
    )
    .await;
    assert!(ok, "{out}");
    let st = wait_status(&cluster, 15, "Installing 257 acked by n1 and n2", |st| {
        is(st, RotationPhase::Installing, 256)
            && st.pending_spi == Some(257)
            && st.acks.installed == 2
    })
    .await;
    assert_eq!(st.observed_rotate_request.as_deref(), Some("r1"));
    assert!(find_condition(&st.conditions, ROTATING).is_some_and(|c| c.status == "True"));
    let both = generations(&cluster).await;
    assert_eq!(both.keys().copied().collect::<Vec<_>>(), [256, 257]);
    assert_eq!(
        both[&256], first[&256],
        "the active generation is untouched"
    );
    assert_ne!(both[&257].key, both[&256].key);

    // A node joins mid-rotation: it gets both generations and is awaited too.
    add_ipsec_nodes(&cluster, &["n4"], &[("mesh", "on")]).await;
    eventually(15, "n4 acknowledges both generations", || async {
        let ne = enrollment(&cluster, "n4").await;
        let ipsec = ne.status?.ipsec?;
        (ipsec.installed_spis == [256, 257] && ipsec.active_spi == Some(256)).then_some(())
    })
    .await;
    wait_status(&cluster, 15, "n4 counted", |st| {
        st.acks.selected == 4 && st.acks.installed == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = policy(&cluster, POLICY).await.status.expect("status");
    assert!(
        is(&held, RotationPhase::Installing, 256),
        "must not advance while n3 withholds its ack: {held:?}"
    );

    // n3 acknowledges: the rotation completes phase by phase.
    agents.set("n3", Behaviour::Normal);
    let st = wait_status(&cluster, 20, "Stable on SPI 257 and Ready", |st| {
        is(st, RotationPhase::Stable, 257) && ready(st)
    })
    .await;
    assert_eq!(st.pending_spi, None);
    assert_eq!(
        (
            st.acks.selected,
            st.acks.installed,
            st.acks.switched,
            st.acks.retired
        ),
        (4, 4, 4, 4)
    );
    let last = generations(&cluster).await;
    assert_eq!(last.keys().copied().collect::<Vec<_>>(), [257]);
    assert_eq!(last[&257], both[&257]);
    for node in ["n1", "n2", "n3", "n4"] {
        let ipsec = enrollment(&cluster, node)
            .await
            .status
            .and_then(|s| s.ipsec);
        assert_eq!(
            ipsec.map(|i| (i.installed_spis, i.active_spi)),
            Some((vec![257], Some(257))),
            "{node}"
        );
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (phases, violations) = history.check();
    assert_eq!(
        phases,
        [
            (RotationPhase::Stable, Some(256), None),
            (RotationPhase::Installing, Some(256), Some(257)),
            (RotationPhase::Switching, Some(257), Some(256)),
            (RotationPhase::Retiring, Some(257), Some(256)),
            (RotationPhase::Stable, Some(257), None),
        ]
    );
    assert!(violations.is_empty(), "{violations:#?}");

    let reasons = event_reasons(&cluster).await;
    for r in [
        "KeysPublished",
        "RotationStarted",
        "KeysInstalled",
        "Retiring",
        "RotationComplete",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "missing event {r}: {reasons:?}"
        );
    }
    let metrics = op.shared.metrics.encode();
    assert!(
        metrics.contains("meshlet_operator_ipsec_rotations_completed_total{policy=\"mesh\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshlet_operator_ipsec_phase{policy=\"mesh\",phase=\"Stable\"} 1"),
        "{metrics}"
    );

    // No key bytes in status, events, logs or metrics.
    let material: Vec<KeyMaterial> = both.values().cloned().collect();
    let (_, status_json) = kubectl(&cluster, &["get", "ipsecpolicy", POLICY, "-o", "json"]).await;
    assert_no_key_bytes("the policy", &status_json, &material);
    assert_no_key_bytes("events", &events_json(&cluster).await, &material);
    assert_no_key_bytes("metrics", &metrics, &material);
    let logged = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    assert!(
        logged.contains("key rotation started"),
        "the log capture must see the operator"
    );
    assert_no_key_bytes("the operator's logs", &logged, &material);

    // Deleting the policy removes its entries; agents drop their IPsec status.
    Api::<IPsecPolicy>::all(cluster.admin.clone())
        .delete(POLICY, &DeleteParams::default())
        .await
        .expect("delete policy");
    eventually(15, "published entries removed", || async {
        published_secret(&cluster).await.is_empty().then_some(())
    })
    .await;
    eventually(15, "agents drop status.ipsec", || async {
        let nes = Api::<NodeEnrollment>::all(cluster.admin.clone())
            .list(&ListParams::default())
            .await
            .ok()?;
        nes.items
            .iter()
            .all(|ne| ne.status.as_ref().is_none_or(|s| s.ipsec.is_none()))
            .then_some(())
    })
    .await;
    op.stop().await;
}

async fn events(cluster: &Cluster) -> Vec<k8s_openapi::api::events::v1::Event> {
    Api::<k8s_openapi::api::events::v1::Event>::all(cluster.admin.clone())
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
}

async fn event_reasons(cluster: &Cluster) -> Vec<String> {
    events(cluster)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

async fn events_json(cluster: &Cluster) -> String {
    serde_json::to_string(&events(cluster).await).expect("events json")
}

async fn put_user_key(cluster: &Cluster, name: &str, key: &[u8]) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "key".to_owned(),
            ByteString(key.to_vec()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE)
        .patch(
            name,
            &PatchParams::apply("user").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("apply user key Secret");
}

fn stalled(st: &IPsecPolicyStatus) -> Option<(String, String)> {
    find_condition(&st.conditions, STALLED)
        .filter(|c| c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_key_is_published_and_a_missing_or_short_one_stalls_with_keys_untouched() {
    let logs = captured_logs();
    let cluster = Cluster::start().await;
    add_ipsec_nodes(&cluster, &["u1", "u2"], &[]).await;
    let _agents = IpsecAgents::start(&cluster).await;
    let op = start_operator(&cluster).await;
    let first_key = b"first-user-key-of-24-byt".to_vec();
    put_user_key(&cluster, "my-key", &first_key).await;
    create_policy(
        &cluster,
        &IPsecPolicy::test(POLICY).with_key_secret(NAMESPACE, "my-key"),
    )
    .await;
    wait_status(&cluster, 20, "Stable on 256 and Ready", |st| {
        is(st, RotationPhase::Stable, 256) && ready(st)
    })
    .await;
    let published = published_secret(&cluster).await;
    let gens = contract::published(&published, POLICY).expect("well-formed");
    assert_eq!(gens[&256].key, first_key, "the user's key is published");
    assert_eq!(gens[&256].salt.len(), 16);

    // The user Secret disappears: Stalled, nothing published changes, no rotation starts.
    Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE)
        .delete("my-key", &DeleteParams::default())
        .await
        .expect("delete user key");
    let st = wait_status(&cluster, 15, "Stalled KeySecretNotFound", |st| {
        stalled(st).is_some_and(|(r, _)| r == "KeySecretNotFound")
    })
    .await;
    let (_, message) = stalled(&st).expect("stalled");
    assert!(message.contains("meshlet-system/my-key"), "{message}");
    assert!(message.contains("spec.keySecretRef"), "{message}");
    assert!(!ready(&st));
    Api::<IPsecPolicy>::all(cluster.admin.clone())
        .patch(
            POLICY,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"meshlet.io/rotate": "now"}}})),
        )
        .await
        .expect("annotate");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let st = policy(&cluster, POLICY).await.status.expect("status");
    assert!(is(&st, RotationPhase::Stable, 256), "{st:?}");
    assert_eq!(
        published_secret(&cluster).await,
        published,
        "published keys untouched"
    );
    assert!(event_reasons(&cluster).await.iter().any(|r| r == "Stalled"));

    // A key that is too short: KeySecretInvalid naming the field.
    put_user_key(&cluster, "my-key", b"short").await;
    let st = wait_status(&cluster, 15, "Stalled KeySecretInvalid", |st| {
        stalled(st).is_some_and(|(r, _)| r == "KeySecretInvalid")
    })
    .await;
    let (_, message) = stalled(&st).expect("stalled");
    assert!(message.contains("data.key holds 5 bytes"), "{message}");
    assert_eq!(published_secret(&cluster).await, published);

    // A good new key: the pending request rotates onto it.
    let second_key = b"second-user-key-is-longer-than-16".to_vec();
    put_user_key(&cluster, "my-key", &second_key).await;
    let st = wait_status(&cluster, 20, "Stable on 257 and Ready", |st| {
        is(st, RotationPhase::Stable, 257) && ready(st)
    })
    .await;
    assert!(stalled(&st).is_none());
    let gens = generations(&cluster).await;
    assert_eq!(gens.keys().copied().collect::<Vec<_>>(), [257]);
    assert_eq!(gens[&257].key, second_key);

    let material = [
        KeyMaterial {
            key: first_key,
            salt: vec![],
            algorithm: IPsecAlgorithm::Rfc4106GcmAes,
        },
        KeyMaterial {
            key: second_key,
            salt: gens[&257].salt.clone(),
            algorithm: IPsecAlgorithm::Rfc4106GcmAes,
        },
    ];
    let (_, status_json) = kubectl(&cluster, &["get", "ipsecpolicy", POLICY, "-o", "json"]).await;
    assert_no_key_bytes("the policy", &status_json, &material);
    assert_no_key_bytes("events", &events_json(&cluster).await, &material);
    assert_no_key_bytes("metrics", &op.shared.metrics.encode(), &material);
    let logged = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    assert_no_key_bytes("the operator's logs", &logged, &material);
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_algorithm_stalls_the_rotation_naming_node_and_reason() {
    let cluster = Cluster::start().await;
    add_ipsec_nodes(&cluster, &["a1", "a2"], &[]).await;
    let agents = IpsecAgents::start(&cluster).await;
    let _op = start_operator(&cluster).await;
    create_policy(&cluster, &IPsecPolicy::test(POLICY)).await;
    wait_status(&cluster, 20, "Stable on 256 and Ready", |st| {
        is(st, RotationPhase::Stable, 256) && ready(st)
    })
    .await;

    // a2's kernel lacks CBC+HMAC; the algorithm changes to it.
    agents.set(
        "a2",
        Behaviour::Refuse(vec![IPsecAlgorithm::CbcAesHmacSha256]),
    );
    Api::<IPsecPolicy>::all(cluster.admin.clone())
        .patch(
            POLICY,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"algorithm": "cbc(aes)+hmac(sha256)"}})),
        )
        .await
        .expect("change algorithm");
    let st = wait_status(&cluster, 15, "Stalled NodeFailed", |st| {
        stalled(st).is_some_and(|(r, _)| r == "NodeFailed")
    })
    .await;
    let (_, message) = stalled(&st).expect("stalled");
    assert!(
        message.contains("a2") && message.contains("AlgorithmUnavailable"),
        "{message}"
    );
    assert!(is(&st, RotationPhase::Installing, 256), "{st:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let st = policy(&cluster, POLICY).await.status.expect("status");
    assert!(
        is(&st, RotationPhase::Installing, 256),
        "no phase advance while a2 fails: {st:?}"
    );
    let gens = generations(&cluster).await;
    assert_eq!(gens.keys().copied().collect::<Vec<_>>(), [256, 257]);
    assert_eq!(gens[&256].algorithm, IPsecAlgorithm::Rfc4106GcmAes);
    assert_eq!(gens[&257].algorithm, IPsecAlgorithm::CbcAesHmacSha256);
    let warning = events(&cluster)
        .await
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("Stalled"))
        .expect("a Stalled event");
    assert!(warning.note.unwrap_or_default().contains("a2"));

    // The module appears: the rotation completes onto the new algorithm.
    agents.set("a2", Behaviour::Normal);
    let st = wait_status(&cluster, 20, "Stable on 257 and Ready", |st| {
        is(st, RotationPhase::Stable, 257) && ready(st)
    })
    .await;
    assert!(stalled(&st).is_none());
    assert_eq!(
        generations(&cluster).await[&257].algorithm,
        IPsecAlgorithm::CbcAesHmacSha256
    );
    assert_eq!(
        policy(&cluster, POLICY)
            .await
            .annotations()
            .get("meshlet.io/rotate"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_crashing_mid_rotation_is_replaced_and_the_new_leader_resumes_from_status() {
    let cluster = Cluster::start().await;
    add_ipsec_nodes(&cluster, &["r1", "r2"], &[]).await;
    let agents = IpsecAgents::start(&cluster).await;
    let first = start_operator(&cluster).await;
    create_policy(&cluster, &IPsecPolicy::test(POLICY)).await;
    wait_status(&cluster, 20, "Stable on 256 and Ready", |st| {
        is(st, RotationPhase::Stable, 256) && ready(st)
    })
    .await;
    agents.set("r2", Behaviour::Withhold);
    Api::<IPsecPolicy>::all(cluster.admin.clone())
        .patch(
            POLICY,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"meshlet.io/rotate": "x"}}})),
        )
        .await
        .expect("annotate");
    wait_status(&cluster, 15, "Installing with r1's ack", |st| {
        is(st, RotationPhase::Installing, 256) && st.acks.installed == 1
    })
    .await;
    let during = generations(&cluster).await;
    assert_eq!(during.keys().copied().collect::<Vec<_>>(), [256, 257]);

    // Crash (no lease release); a new instance takes over once the lease expires.
    first.task.abort();
    drop(first);
    let second = cluster.start_operator("op-1", LEASE_SECS).await;
    eventually(15, "the new instance leads", || async {
        second
            .shared
            .leader
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let st = policy(&cluster, POLICY).await.status.expect("status");
    assert!(is(&st, RotationPhase::Installing, 256), "{st:?}");
    assert_eq!(
        generations(&cluster).await,
        during,
        "the new leader keeps both generations exactly as published"
    );

    agents.set("r2", Behaviour::Normal);
    wait_status(&cluster, 20, "Stable on 257 and Ready", |st| {
        is(st, RotationPhase::Stable, 257) && ready(st)
    })
    .await;
    let after = generations(&cluster).await;
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), [257]);
    assert_eq!(
        after[&257], during[&257],
        "SPI 257 kept the key nodes installed"
    );
    second.stop().await;
}
