//! IPsec in Kubernetes mode: real agents (as the agent ServiceAccount, with the shipped RBAC)
//! against the API test server, the test playing the operator (it writes the IPsecPolicy
//! status and the published key Secret). xfrm is the file-backed recording
//! (`MESHLET_IPSEC_XFRM=recording:<path>`), so the order of every xfrm call is checked.
//! Needs root, bpffs and cgroup v2 (each agent also loads its data plane).

mod agent_support;
mod kube_support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use meshlet_agent::ipsec::backend::RecordedFile;
use meshlet_agent::ipsec::reqid_for;
use meshlet_agent::ipsec::xfrm::XfrmCall;
use meshlet_crds::ipsec::{KeyMaterial, publish};
use meshlet_crds::names::{AGENT_NAME, IPSEC_KEY_SECRET, NAMESPACE};
use meshlet_crds::v1alpha1::{IPsecAlgorithm, IPsecNodeStatus, IPsecPolicy, NodeEnrollment};
use nix::sys::signal::Signal;
use serde_json::json;

use agent_support::AgentEnv;
use kube_support::{Cluster, condition, start_kube_agent_with};

const POLICY: &str = "mesh";
const A: u32 = 256;
const B: u32 = 257;
/// Marker inside every test key: it must never show up in logs or status.
const MARK: &[u8] = b"K3YMATERIAL";

fn material(spi: u32, algorithm: IPsecAlgorithm) -> KeyMaterial {
    let mut key = MARK.to_vec();
    key.extend_from_slice(format!("-{spi}-0123456789abcdef").as_bytes());
    KeyMaterial {
        key,
        salt: format!("salt-{spi}").into_bytes(),
        algorithm,
    }
}

fn ip(i: usize) -> IpAddr {
    format!("10.77.0.{}", i + 1).parse().expect("ip")
}

/// One simulated node: its environment (agent process, data plane paths) and xfrm recording.
struct TestNode {
    env: AgentEnv,
    xfrm: PathBuf,
    address: IpAddr,
    refuse: Option<&'static str>,
}

impl TestNode {
    fn name(&self) -> String {
        self.env.name.clone()
    }

    fn recording(&self) -> RecordedFile {
        RecordedFile::read(&self.xfrm).expect("read recording")
    }

    fn start(&mut self, cluster: &Cluster) {
        let mut extra = vec![(
            "MESHLET_IPSEC_XFRM",
            format!("recording:{}", self.xfrm.display()),
        )];
        if let Some(r) = self.refuse {
            extra.push(("MESHLET_IPSEC_REFUSE_ALGORITHMS", r.to_string()));
        }
        let name = self.name();
        start_kube_agent_with(&mut self.env, cluster, &name, &extra);
    }
}

async fn create_node(admin: &Client, name: &str, address: IpAddr) {
    let api = Api::<Node>::all(admin.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("meshlet.io/test".to_string(), "yes".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    api.create(&PostParams::default(), &node)
        .await
        .expect("create Node");
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": address.to_string()},
        ]}})),
    )
    .await
    .expect("Node status");
}

async fn publish_secret(admin: &Client, gens: &[(u32, IPsecAlgorithm)]) {
    let gens: BTreeMap<u32, KeyMaterial> = gens
        .iter()
        .map(|(spi, alg)| (*spi, material(*spi, *alg)))
        .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(IPSEC_KEY_SECRET.into()),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        data: Some(publish(POLICY, &gens)),
        ..Secret::default()
    };
    let api = Api::<Secret>::namespaced(admin.clone(), NAMESPACE);
    // Replace the data as a whole (the operator's write removes retired entries).
    match api.get_opt(IPSEC_KEY_SECRET).await.expect("get Secret") {
        Some(mut cur) => {
            cur.data = secret.data;
            api.replace(IPSEC_KEY_SECRET, &PostParams::default(), &cur)
                .await
                .expect("replace Secret");
        }
        None => {
            api.create(&PostParams::default(), &secret)
                .await
                .expect("create Secret");
        }
    }
}

async fn policy_status(admin: &Client, phase: &str, active: u32, pending: Option<u32>) {
    Api::<IPsecPolicy>::all(admin.clone())
        .patch_status(
            POLICY,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": phase, "activeSPI": active, "pendingSPI": pending}}),
            ),
        )
        .await
        .expect("IPsecPolicy status");
}

/// The cluster, the policy (Stable on A) and `n` enrolled nodes with their agents running.
async fn setup(tag: &str, n: usize, refuse: &[(usize, &'static str)]) -> (Cluster, Vec<TestNode>) {
    let cluster = Cluster::start().await;
    let admin = cluster.admin.clone();
    Api::<IPsecPolicy>::all(admin.clone())
        .create(&PostParams::default(), &IPsecPolicy::test(POLICY))
        .await
        .expect("create IPsecPolicy");
    publish_secret(&admin, &[(A, IPsecAlgorithm::Rfc4106GcmAes)]).await;
    policy_status(&admin, "Stable", A, None).await;
    let mut nodes = Vec::new();
    for i in 0..n {
        let env = AgentEnv::new(&format!("{tag}{i}"));
        let xfrm = env.dir.path().join("xfrm.json");
        let node = TestNode {
            env,
            xfrm,
            address: ip(i),
            refuse: refuse.iter().find(|(j, _)| *j == i).map(|(_, r)| *r),
        };
        create_node(&admin, &node.name(), node.address).await;
        cluster.enroll(&node.name()).await;
        nodes.push(node);
    }
    for node in &mut nodes {
        node.start(&cluster);
    }
    (cluster, nodes)
}

fn ipsec_of(ne: Option<&NodeEnrollment>) -> Option<&IPsecNodeStatus> {
    ne.and_then(|n| n.status.as_ref())
        .and_then(|s| s.ipsec.as_ref())
}

fn acked(ne: Option<&NodeEnrollment>, installed: &[u32], active: u32, peers: usize) -> bool {
    ipsec_of(ne).is_some_and(|s| {
        s.installed_spis == installed.iter().map(|x| i64::from(*x)).collect::<Vec<_>>()
            && s.active_spi == Some(i64::from(active))
            && s.policy.as_deref() == Some(POLICY)
            && s.peers == Some(peers as i64)
    })
}

async fn wait_all(
    cluster: &Cluster,
    nodes: &[TestNode],
    what: &str,
    pred: impl Fn(&TestNode, Option<&NodeEnrollment>) -> bool,
) {
    for node in nodes {
        cluster
            .wait_enrollment(&node.name(), what, &node.env, |ne| pred(node, ne))
            .await;
    }
}

fn position(calls: &[XfrmCall], pred: impl Fn(&XfrmCall) -> bool) -> Option<usize> {
    calls.iter().position(pred)
}

fn assert_no_key_bytes(text: &str, what: &str) {
    let mark = String::from_utf8_lossy(MARK);
    assert!(!text.contains(mark.as_ref()), "key bytes in {what}");
    for spi in [A, B] {
        let m = material(spi, IPsecAlgorithm::Rfc4106GcmAes);
        let b64 = serde_json::to_string(&k8s_openapi::ByteString(m.key)).expect("b64");
        assert!(
            !text.contains(b64.trim_matches('"')),
            "base64 key in {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_installs_inbound_first_switches_on_active_spi_and_retires_after_unpublish() {
    let (cluster, nodes) = setup("ipsec-rot", 3, &[]).await;
    let admin = cluster.admin.clone();
    let began = Instant::now();
    wait_all(&cluster, &nodes, "Stable on A acked", |_, ne| {
        acked(ne, &[A], A, 2) && condition(ne, "IPsecReady", "True", Some("Applied"))
    })
    .await;
    eprintln!(
        "3 agents acked generation A: {} ms",
        began.elapsed().as_millis()
    );
    for node in &nodes {
        let rec = node.recording();
        let inbound: Vec<_> = rec
            .states
            .iter()
            .filter(|s| s.id.dst == node.address)
            .collect();
        let outbound: Vec<_> = rec
            .states
            .iter()
            .filter(|s| s.id.src == node.address)
            .collect();
        assert_eq!(inbound.len(), 2, "inbound SAs per peer: {rec:?}");
        assert_eq!(outbound.len(), 2, "outbound SAs per peer: {rec:?}");
        assert!(rec.states.iter().all(|s| s.reqid == reqid_for(A)));
        assert_eq!(rec.policies.len(), 2);
        assert!(rec.policies.iter().all(|p| p.reqid == reqid_for(A)));
    }

    // Installing: the Secret gains B (another algorithm: an algorithm change is a rotation).
    publish_secret(
        &admin,
        &[
            (A, IPsecAlgorithm::Rfc4106GcmAes),
            (B, IPsecAlgorithm::CbcAesHmacSha256),
        ],
    )
    .await;
    policy_status(&admin, "Installing", A, Some(B)).await;
    let t = Instant::now();
    wait_all(&cluster, &nodes, "B installed, A active", |_, ne| {
        acked(ne, &[A, B], A, 2)
    })
    .await;
    eprintln!(
        "Installing: Secret + status written → 3 acks: {} ms",
        t.elapsed().as_millis()
    );

    // activeSPI on a generation that is not published: nothing changes.
    // Nor is the status written again (writes happen only on change).
    let before: Vec<usize> = nodes.iter().map(|n| n.recording().calls.len()).collect();
    let mut versions = Vec::new();
    for node in &nodes {
        let ne = cluster.enrollments().get(&node.name()).await.expect("get");
        versions.push(ne.metadata.resource_version);
    }
    policy_status(&admin, "Switching", 999, Some(A)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for ((node, n), version) in nodes.iter().zip(&before).zip(&versions) {
        assert_eq!(
            node.recording().calls.len(),
            *n,
            "an unpublished activeSPI changed xfrm"
        );
        let ne = cluster.enrollments().get(&node.name()).await.expect("get");
        assert_eq!(&ne.metadata.resource_version, version, "status rewritten");
        assert!(
            acked(Some(&ne), &[A, B], A, 2),
            "status moved: {:?}",
            ipsec_of(Some(&ne))
        );
    }

    // Switching: activeSPI = B.
    let switch_at: Vec<usize> = nodes.iter().map(|n| n.recording().calls.len()).collect();
    policy_status(&admin, "Switching", B, Some(A)).await;
    let t = Instant::now();
    wait_all(&cluster, &nodes, "switched to B", |_, ne| {
        acked(ne, &[A, B], B, 2)
    })
    .await;
    eprintln!(
        "Switching: activeSPI written → 3 acks: {} ms",
        t.elapsed().as_millis()
    );

    // Retiring: the Secret drops A.
    let retire_at: Vec<usize> = nodes.iter().map(|n| n.recording().calls.len()).collect();
    publish_secret(&admin, &[(B, IPsecAlgorithm::CbcAesHmacSha256)]).await;
    policy_status(&admin, "Retiring", B, Some(A)).await;
    let t = Instant::now();
    wait_all(&cluster, &nodes, "A retired", |_, ne| acked(ne, &[B], B, 2)).await;
    eprintln!(
        "Retiring: Secret + status written → 3 acks: {} ms",
        t.elapsed().as_millis()
    );
    policy_status(&admin, "Stable", B, None).await;

    for (i, node) in nodes.iter().enumerate() {
        let rec = node.recording();
        let calls = &rec.calls;
        let me = node.address;
        let first_in_b = position(
            calls,
            |c| matches!(c, XfrmCall::InstallState(id, r) if id.dst == me && *r == reqid_for(B)),
        )
        .expect("inbound B installed");
        let first_out_b = position(calls, |c| match c {
            XfrmCall::InstallState(id, r) => id.src == me && *r == reqid_for(B),
            XfrmCall::InstallPolicy(p) => p.reqid == reqid_for(B),
            _ => false,
        })
        .expect("outbound B");
        assert!(
            first_in_b < first_out_b,
            "outbound moved before inbound B: {calls:?}"
        );
        assert!(
            first_in_b < switch_at[i] && first_out_b >= switch_at[i],
            "outbound moved to B before activeSPI=B ({first_out_b} < {}): {calls:?}",
            switch_at[i]
        );
        // Inbound A (what peers still send with until they switched) goes only once the
        // Secret dropped A; outbound A goes after the policies left it, at the switch.
        let first_in_delete = position(
            calls,
            |c| matches!(c, XfrmCall::DeleteState(id) if id.dst == me),
        )
        .expect("inbound A deleted");
        assert!(
            first_in_delete >= retire_at[i],
            "an inbound A SA was deleted before the Secret dropped A: {calls:?}"
        );
        let first_out_delete = position(
            calls,
            |c| matches!(c, XfrmCall::DeleteState(id) if id.src == me),
        )
        .expect("outbound A deleted");
        let last_policy_b = calls
            .iter()
            .rposition(|c| matches!(c, XfrmCall::InstallPolicy(p) if p.reqid == reqid_for(B)))
            .expect("policies on B");
        assert!(
            first_out_delete > last_policy_b && first_out_delete >= switch_at[i],
            "outbound A deleted while a policy used it: {calls:?}"
        );
        assert!(
            rec.states.iter().all(|s| s.reqid == reqid_for(B)),
            "{rec:?}"
        );
        assert_eq!(rec.states.len(), 4);
        assert!(rec.policies.iter().all(|p| p.reqid == reqid_for(B)));
        assert_no_key_bytes(&node.env.log(), "the agent log");
        let ne = cluster.enrollments().get(&node.name()).await.expect("get");
        assert_no_key_bytes(&serde_json::to_string(&ne).expect("json"), "the status");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_restart_peer_removal_unenroll_and_name_scoped_rbac() {
    let cbc = "cbc(aes)+hmac(sha256)";
    let (cluster, mut nodes) = setup("ipsec-ops", 2, &[(1, cbc)]).await;
    let admin = cluster.admin.clone();
    wait_all(&cluster, &nodes, "A acked", |_, ne| acked(ne, &[A], A, 1)).await;
    let b_before = nodes[1].recording();

    // B's algorithm is missing on node 1: AlgorithmUnavailable, no ack of B, A untouched.
    publish_secret(
        &admin,
        &[
            (A, IPsecAlgorithm::Rfc4106GcmAes),
            (B, IPsecAlgorithm::CbcAesHmacSha256),
        ],
    )
    .await;
    policy_status(&admin, "Installing", A, Some(B)).await;
    cluster
        .wait_enrollment(
            &nodes[0].name(),
            "B installed on node 0",
            &nodes[0].env,
            |ne| acked(ne, &[A, B], A, 1),
        )
        .await;
    let ne = cluster
        .wait_enrollment(
            &nodes[1].name(),
            "AlgorithmUnavailable",
            &nodes[1].env,
            |ne| condition(ne, "IPsecReady", "False", Some("AlgorithmUnavailable")),
        )
        .await;
    assert!(
        acked(ne.as_ref(), &[A], A, 1),
        "{:?}",
        ipsec_of(ne.as_ref())
    );
    let msg = ne
        .as_ref()
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "IPsecReady"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("does not provide algorithm cbc(aes)+hmac(sha256)"),
        "{msg}"
    );
    let b_after = nodes[1].recording();
    assert_eq!(
        b_after.states, b_before.states,
        "the refused rotation changed SAs"
    );
    assert_eq!(b_after.policies, b_before.policies);

    // Restart node 0's agent: it adopts the recorded state, no delete or re-add.
    let calls = nodes[0].recording().calls.len();
    nodes[0].env.stop_agent(Signal::SIGTERM);
    let log_len = nodes[0].env.log().len();
    nodes[0].start(&cluster);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes[0].env.log()[log_len..].contains("IPsec: adopted") {
        assert!(
            Instant::now() < deadline,
            "no adoption logged\n{}",
            nodes[0].env.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        nodes[0].recording().calls.len(),
        calls,
        "the restart changed xfrm"
    );
    let ne = cluster
        .enrollments()
        .get(&nodes[0].name())
        .await
        .expect("get");
    assert!(acked(Some(&ne), &[A, B], A, 1));

    // Node 1 unenrolls: its own objects go before the finalizer is released, and node 0
    // removes the SAs towards it.
    let gone = nodes[1].address;
    cluster
        .enrollments()
        .delete(&nodes[1].name(), &DeleteParams::default())
        .await
        .expect("delete NodeEnrollment");
    cluster
        .wait_enrollment(
            &nodes[1].name(),
            "finalizer released",
            &nodes[1].env,
            |ne| ne.is_none(),
        )
        .await;
    let rec = nodes[1].recording();
    assert!(
        rec.states.is_empty() && rec.policies.is_empty(),
        "own xfrm objects left after unenroll: {rec:?}"
    );
    cluster
        .wait_enrollment(&nodes[0].name(), "peer removed", &nodes[0].env, |ne| {
            ipsec_of(ne).is_some_and(|s| s.peers == Some(0))
        })
        .await;
    let rec = nodes[0].recording();
    assert!(
        rec.states
            .iter()
            .all(|s| s.id.src != gone && s.id.dst != gone)
            && rec.policies.iter().all(|p| p.id.dst != gone),
        "SAs towards the removed peer remain: {rec:?}"
    );

    // A malformed published Secret: KeyUnavailable, xfrm and the acks stay as they were.
    let calls = nodes[0].recording().calls.len();
    let secrets_admin = Api::<Secret>::namespaced(admin.clone(), NAMESPACE);
    let mut cur = secrets_admin
        .get(IPSEC_KEY_SECRET)
        .await
        .expect("get Secret");
    if let Some(d) = cur.data.as_mut() {
        d.insert(
            format!("{POLICY}.{B}.key"),
            k8s_openapi::ByteString(b"short".to_vec()),
        );
    }
    secrets_admin
        .replace(IPSEC_KEY_SECRET, &PostParams::default(), &cur)
        .await
        .expect("replace Secret");
    let ne = cluster
        .wait_enrollment(&nodes[0].name(), "KeyUnavailable", &nodes[0].env, |ne| {
            condition(ne, "IPsecReady", "False", Some("KeyUnavailable"))
        })
        .await;
    assert!(
        acked(ne.as_ref(), &[A, B], A, 0),
        "{:?}",
        ipsec_of(ne.as_ref())
    );
    assert_eq!(
        nodes[0].recording().calls.len(),
        calls,
        "a bad Secret changed xfrm"
    );
    let text = serde_json::to_string(&ne).expect("json");
    assert!(text.contains("mesh.257.key holds 5 bytes"), "{text}");
    assert!(
        !text.contains("short") && !text.contains("c2hvcnQ"),
        "key bytes in the status"
    );

    // The agent's RBAC on Secrets is scoped to the key Secret's name.
    let other = Secret {
        metadata: ObjectMeta {
            name: Some("other".into()),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &other)
        .await
        .expect("create other Secret");
    let agent = cluster
        .server
        .client_for(NAMESPACE, AGENT_NAME)
        .await
        .expect("agent client");
    let secrets = Api::<Secret>::namespaced(agent, NAMESPACE);
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403);
    assert!(forbidden(secrets.get("other").await.map(|_| ())));
    assert!(forbidden(
        secrets.list(&ListParams::default()).await.map(|_| ())
    ));
    let own = secrets
        .list(&ListParams::default().fields(&format!("metadata.name={IPSEC_KEY_SECRET}")))
        .await
        .expect("list the key Secret by name");
    assert_eq!(own.items.len(), 1);
    for node in &nodes {
        assert_no_key_bytes(&node.env.log(), "the agent log");
    }
}

fn meshletctl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshletctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run meshletctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = std::process::Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshletctl_ipsec_rotate_sets_the_rotate_annotation() {
    let server =
        meshlet_test_apiserver::TestApiServer::start(meshlet_test_apiserver::ServerOptions {
            install_meshlet_crds: true,
            ..Default::default()
        })
        .await
        .expect("server");
    let admin = server.client().await.expect("client");
    let kubeconfig = server.kubeconfig_path.clone();
    let policies = Api::<IPsecPolicy>::all(admin);
    policies
        .create(&PostParams::default(), &IPsecPolicy::test(POLICY))
        .await
        .expect("create");
    let (ok, out, err) = meshletctl(&kubeconfig, &["ipsec", "rotate"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("IPsecPolicy mesh: key rotation requested"),
        "{out}"
    );
    let value = kubectl(
        &kubeconfig,
        &[
            "get",
            "ipsecpolicy",
            POLICY,
            "-o",
            r"jsonpath={.metadata.annotations.meshlet\.io/rotate}",
        ],
    );
    let ts: k8s_openapi::jiff::Timestamp = value.trim().parse().expect("RFC 3339 annotation");
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(ts);
    assert!(
        age.as_secs() < 60,
        "annotation {value} is not the current time"
    );
    assert!(out.contains(value.trim()), "{out}");

    // Two policies and no name: a clear error listing them, nothing annotated.
    policies
        .create(&PostParams::default(), &IPsecPolicy::test("second"))
        .await
        .expect("create second");
    let (ok, _, err) = meshletctl(&kubeconfig, &["ipsec", "rotate"]);
    assert!(!ok);
    assert!(err.contains("existing: mesh, second"), "{err}");
    let (ok, _, err) = meshletctl(&kubeconfig, &["ipsec", "rotate", "nope"]);
    assert!(!ok && err.contains("\"nope\" not found"), "{err}");
    let second = kubectl(
        &kubeconfig,
        &[
            "get",
            "ipsecpolicy",
            "second",
            "-o",
            r"jsonpath={.metadata.annotations}",
        ],
    );
    assert!(!second.contains("meshlet.io/rotate"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_removes_the_nodes_xfrm_objects_and_undrain_installs_them_again() {
    let (cluster, nodes) = setup("ipsec-drain", 2, &[]).await;
    wait_all(&cluster, &nodes, "A acked", |_, ne| acked(ne, &[A], A, 1)).await;
    let drain = |on: bool| {
        let api = cluster.enrollments();
        let name = nodes[1].name();
        async move {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"drain": on}})),
            )
            .await
            .expect("patch drain");
        }
    };
    drain(true).await;
    cluster
        .wait_enrollment(
            &nodes[1].name(),
            "IPsec dropped on drain",
            &nodes[1].env,
            |ne| {
                ne.and_then(|n| n.status.as_ref()).is_some_and(|s| {
                    // Server-side apply may leave the emptied `ipsec` map behind.
                    s.ipsec
                        .as_ref()
                        .is_none_or(|i| *i == IPsecNodeStatus::default())
                        && !s.conditions.iter().any(|c| c.type_ == "IPsecReady")
                })
            },
        )
        .await;
    let rec = nodes[1].recording();
    assert!(
        rec.states.is_empty() && rec.policies.is_empty(),
        "own xfrm objects left after drain: {rec:?}"
    );
    cluster
        .wait_enrollment(
            &nodes[0].name(),
            "drained peer dropped",
            &nodes[0].env,
            |ne| acked(ne, &[A], A, 0),
        )
        .await;
    let gone = nodes[1].address;
    assert!(
        nodes[0]
            .recording()
            .states
            .iter()
            .all(|s| s.id.src != gone && s.id.dst != gone)
    );

    drain(false).await;
    wait_all(&cluster, &nodes, "A acked again after undrain", |_, ne| {
        acked(ne, &[A], A, 1) && condition(ne, "IPsecReady", "True", Some("Applied"))
    })
    .await;
    assert_eq!(nodes[1].recording().states.len(), 2);
}
