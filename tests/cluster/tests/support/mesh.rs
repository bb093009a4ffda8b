//! Meshlet installed on the local cluster the way a user does it, plus real traffic.
//!
//! ```text
//!  kubectl apply -k manifests/ ──► operator Deployment pod (its ServiceAccount, RBAC enforced)
//!  kubectl apply --server-side MeshConfig ──► NodeEnrollments + agent DaemonSet (real agents)
//!  Service 10.96.0.10:80 + EndpointSlice 127.0.0.1:18081,18082
//!
//!  node-i cgroup2 ─┬─ meshlet-agent pod (attached at node-i's cgroup2 root, pins under its bpffs)
//!                  └─ mesh-traffic pods (own network namespace): backends 18081/18082 on
//!                     their loopback + clients of the VIP
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject};
use meshlet_local_cluster::{ClusterOptions, LocalCluster, SimNode};
use serde_json::Value;

use super::*;

/// Namespace of the operator and agents.
pub const NS: &str = "meshlet-system";
/// The Service VIP the tests reach.
pub const VIP: &str = "10.96.0.10";
/// The Service port.
pub const PORT: u16 = 80;
/// Backend ports on 127.0.0.1 (inside each traffic pod's network namespace).
pub const BACKENDS: [u16; 2] = [18081, 18082];
/// Label that takes a node out of the mesh (the MeshConfig selects nodes without it).
pub const EXCLUDE_LABEL: &str = "meshlet.io/excluded";

/// The MeshConfig `default` of these tests at `version`.
pub fn meshconfig(version: &str, auto_rollback: bool) -> String {
    format!(
        r#"apiVersion: meshlet.io/v1alpha1
kind: MeshConfig
metadata:
  name: default
spec:
  agent:
    image: ghcr.io/meshlet-io/meshlet-agent
    version: {version}
    logLevel: info
  dataplane:
    maxServices: 64
    maxEndpoints: 256
  enrollment:
    nodeSelector:
      matchExpressions:
        - key: {EXCLUDE_LABEL}
          operator: DoesNotExist
  upgrade:
    maxUnavailable: 1
    canaryNodes: 1
    minReadySeconds: 2
    progressDeadlineSeconds: 120
    autoRollback: {auto_rollback}
  telemetry:
    metricsPort: 9090
"#
    )
}

/// The Service and its EndpointSlice (backends on 127.0.0.1).
pub fn service_yaml() -> String {
    let mut slices = String::new();
    for (i, p) in BACKENDS.iter().enumerate() {
        slices.push_str(&format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-{i}
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - {{name: http, port: {p}, protocol: TCP}}
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {{ready: true}}
"#
        ));
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
    - {{name: http, port: {PORT}, protocol: TCP}}
{slices}"#
    )
}

/// Writes `yaml` into the cluster directory and applies it server-side (`kubectl apply
/// --server-side`); returns kubectl's output.
pub async fn apply(cluster: &LocalCluster, name: &str, yaml: &str) -> String {
    let path = cluster.dir().join(name);
    std::fs::write(&path, yaml).expect("write manifest");
    let (ok, out, err) = kubectl(
        cluster,
        &["apply", "--server-side", "-f", &path.display().to_string()],
    )
    .await;
    assert!(ok, "kubectl apply --server-side -f {name}: {out}{err}");
    out
}

/// A local cluster of `nodes` nodes running the built images, Meshlet installed from
/// `manifests/` (`kubectl apply -k`), the MeshConfig at `version`, the Service applied, every
/// NodeEnrollment Ready and the MeshConfig Ready (its first rollout complete).
pub async fn install(nodes: usize, version: &str) -> LocalCluster {
    install_with(
        ClusterOptions {
            nodes,
            ..ClusterOptions::default()
        },
        version,
    )
    .await
}

/// [`install`] with more cluster options.
pub async fn install_with(opts: ClusterOptions, version: &str) -> LocalCluster {
    require_root();
    let nodes = opts.nodes;
    let cluster = LocalCluster::start(opts).await.expect("start cluster");
    let (ok, out, err) = kubectl(&cluster, &["apply", "-k", "manifests/"]).await;
    assert!(ok, "kubectl apply -k manifests/: {out}{err}");
    apply(&cluster, "meshconfig.yaml", &meshconfig(version, true)).await;
    apply(&cluster, "service.yaml", &service_yaml()).await;
    wait_enrolled_ready(&cluster, nodes).await;
    // The first rollout (to `version`) completes before a test changes the version.
    let (ok, out, err) = kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "meshconfig/default",
            "--timeout=120s",
        ],
    )
    .await;
    assert!(
        ok,
        "kubectl wait meshconfig/default after install: {out}{err}"
    );
    cluster
}

/// Waits (`kubectl wait`) until `n` NodeEnrollments exist and are all Ready.
pub async fn wait_enrolled_ready(cluster: &LocalCluster, n: usize) {
    eventually(
        &format!("{n} NodeEnrollments"),
        Duration::from_secs(90),
        || async { (enrollments(cluster).await.len() == n).then_some(()) },
    )
    .await;
    let (ok, out, err) = kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "nodeenrollments",
            "--all",
            "--timeout=120s",
        ],
    )
    .await;
    assert!(
        ok,
        "kubectl wait --for=condition=Ready nodeenrollments --all: {out}{err}\n{}",
        logs(cluster)
    );
}

/// The last lines of every container log of the cluster, for failure messages.
pub fn logs(cluster: &LocalCluster) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                out.push_str(&format!("--- {}\n", p.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
    }
    let mut out = String::new();
    for n in cluster.nodes() {
        walk(&n.pod_logs_dir(), &mut out);
    }
    out
}

/// The API resource of a meshlet.io/v1alpha1 kind.
pub fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "meshlet.io".into(),
        version: "v1alpha1".into(),
        api_version: "meshlet.io/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Every NodeEnrollment, as JSON, by node name.
pub async fn enrollments(cluster: &LocalCluster) -> BTreeMap<String, Value> {
    let api: Api<DynamicObject> = Api::all_with(
        cluster.client(),
        &resource("NodeEnrollment", "nodeenrollments"),
    );
    let Ok(list) = api.list(&Default::default()).await else {
        return BTreeMap::new();
    };
    list.items
        .into_iter()
        .map(|o| {
            let name = o.metadata.name.clone().unwrap_or_default();
            (name, serde_json::to_value(&o).unwrap_or(Value::Null))
        })
        .collect()
}

/// The MeshConfig `default`, as JSON.
pub async fn mesh(cluster: &LocalCluster) -> Value {
    let api: Api<DynamicObject> =
        Api::all_with(cluster.client(), &resource("MeshConfig", "meshconfigs"));
    api.get_opt("default")
        .await
        .ok()
        .flatten()
        .map(|o| serde_json::to_value(&o).unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

/// Whether a status condition `type_` is `True` on a JSON object.
pub fn condition(obj: &Value, type_: &str) -> bool {
    condition_of(obj, type_).is_some_and(|c| c["status"] == "True")
}

/// The condition `type_` of a JSON object.
pub fn condition_of<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Link id per program name of a NodeEnrollment.
pub fn link_ids(ne: &Value) -> BTreeMap<String, i64> {
    ne["status"]["programs"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| Some((p["name"].as_str()?.to_string(), p["linkId"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Layout version per map of a NodeEnrollment.
pub fn layouts(ne: &Value) -> BTreeMap<String, i64> {
    ne["status"]["maps"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| {
                    Some((
                        m["name"].as_str()?.to_string(),
                        m["layoutVersion"].as_i64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Nodes without a Ready agent pod or without a Ready NodeEnrollment.
pub async fn unavailable(cluster: &LocalCluster) -> Vec<String> {
    let agents = pods(cluster, NS, "app.kubernetes.io/name=meshlet-agent").await;
    let nes = enrollments(cluster).await;
    let mut out = Vec::new();
    for (node, ne) in &nes {
        let pod_ready = agents
            .iter()
            .any(|p| node_of(p) == *node && ready(p) && p.metadata.deletion_timestamp.is_none());
        if !pod_ready || !condition(ne, "Ready") {
            out.push(node.clone());
        }
    }
    out
}

static NEXT_TRAFFIC: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn traffic_args(extra: &[&str]) -> Vec<String> {
    let backends = BACKENDS.map(|p| p.to_string()).join(",");
    let mut args = vec![
        "--backends".to_string(),
        backends.clone(),
        "--target".into(),
        format!("{VIP}:{PORT}={backends}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn traffic_name(node: &SimNode, what: &str) -> String {
    let n = NEXT_TRAFFIC.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{what}-{}-{n}", node.name)
}

/// Continuous clients of the VIP (plus the backends) in a workload pod on a node.
pub struct Traffic(TrafficPod);

impl Traffic {
    /// Starts `clients` continuous clients of the VIP (plus the backends) in a pod on `node`.
    pub async fn start(cluster: &LocalCluster, node: &SimNode, clients: u32) -> Self {
        let args = traffic_args(&["--clients", &clients.to_string()]);
        Self(TrafficPod::start(cluster, &node.name, &traffic_name(node, "traffic"), &args).await)
    }

    /// Stops the clients (deletes the pod) and returns their report (`ok`, `fail`, `wrong`,
    /// `errors`).
    pub async fn stop(self, cluster: &LocalCluster) -> Value {
        self.0.report(cluster, true).await
    }
}

/// `count` connections to the VIP from a pod on `node`; the report.
pub async fn probe(cluster: &LocalCluster, node: &SimNode, count: u32) -> Value {
    let args = traffic_args(&[
        "--clients",
        "1",
        "--count",
        &count.to_string(),
        "--timeout",
        "2",
    ]);
    let pod = TrafficPod::start(cluster, &node.name, &traffic_name(node, "probe"), &args).await;
    let name = pod.name.clone();
    let report = pod.report(cluster, false).await;
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.client(), "default");
    let _ = api.delete(&name, &Default::default()).await;
    report
}

/// A number of a traffic report.
pub fn count(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or(0)
}
