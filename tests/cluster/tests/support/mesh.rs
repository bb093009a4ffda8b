//! Meshlet installed on the local cluster the way a user does it, plus real traffic.
//!
//! ```text
//!  kubectl apply -k manifests/ ──► operator Deployment pod (its ServiceAccount, RBAC enforced)
//!  kubectl apply --server-side MeshConfig ──► NodeEnrollments + agent DaemonSet (real agents)
//!  Service 10.96.0.10:80 + EndpointSlice 127.0.0.1:18081,18082
//!
//!  node-i cgroup ─┬─ meshlet-agent (attached to the node cgroup, pins under node-i's bpffs)
//!                 └─ traffic.py in a private netns: backends 18081/18082 + clients of the VIP
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject};
use meshlet_local_cluster::images::default_images;
use meshlet_local_cluster::{ClusterOptions, LocalCluster, SimNode};
use serde_json::Value;

use super::*;

/// Namespace of the operator and agents.
pub const NS: &str = "meshlet-system";
/// The Service VIP the tests reach.
pub const VIP: &str = "10.96.0.10";
/// The Service port.
pub const PORT: u16 = 80;
/// Backend ports on 127.0.0.1 (inside each traffic helper's network namespace).
pub const BACKENDS: [u16; 2] = [18081, 18082];
/// Label that takes a node out of the mesh (the MeshConfig selects nodes without it).
pub const EXCLUDE_LABEL: &str = "meshlet.io/excluded";

const TRAFFIC: &str = include_str!("../../../../node-agent/tests/agent_support/traffic.py");

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

/// A local cluster of 3 nodes with the default image table, Meshlet installed from
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

/// [`install`] with more cluster options (`opts.images` is replaced by the default table).
pub async fn install_with(opts: ClusterOptions, version: &str) -> LocalCluster {
    require_root();
    let bin = binaries();
    let nodes = opts.nodes;
    let cluster = LocalCluster::start(ClusterOptions {
        images: default_images(&bin),
        ..opts
    })
    .await
    .expect("start cluster");
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

/// The last lines of every pod log of the cluster, for failure messages.
pub fn logs(cluster: &LocalCluster) -> String {
    let mut out = String::new();
    for n in cluster.nodes() {
        if let Ok(rd) = std::fs::read_dir(&n.run_dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
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
    }
    out
}

/// The profile directory holding `meshlet-agent` and `meshlet-operator`, built when missing.
pub fn binaries() -> PathBuf {
    let dir = meshlet_local_cluster::current_bin_dir().expect("profile directory");
    if !dir.join("meshlet-agent").exists() || !dir.join("meshlet-operator").exists() {
        let target = dir.parent().expect("target dir");
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args([
                "build",
                "-p",
                "meshlet-agent",
                "--bin",
                "meshlet-agent",
                "-p",
                "meshlet-operator",
                "--bin",
                "meshlet-operator",
            ])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(workspace())
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the agent and operator failed"
        );
    }
    for b in ["meshlet-agent", "meshlet-operator"] {
        assert!(dir.join(b).exists(), "{} is missing", dir.join(b).display());
    }
    dir
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

/// A traffic helper (backends + clients of the VIP) in a node's cgroup and a private
/// network namespace.
pub struct Traffic {
    child: Child,
    until: PathBuf,
    node: String,
}

impl Traffic {
    /// Starts `clients` continuous clients of the VIP (plus the backends) in `node`'s cgroup.
    pub fn start(dir: &Path, node: &SimNode, clients: u32) -> Self {
        let until = dir.join(format!("stop-{}", node.name));
        let _ = std::fs::remove_file(&until);
        let ready = dir.join(format!("ready-{}", node.name));
        let _ = std::fs::remove_file(&ready);
        let child = spawn(
            dir,
            node,
            &[
                "--clients",
                &clients.to_string(),
                "--until",
                &until.display().to_string(),
                "--ready",
                &ready.display().to_string(),
            ],
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "traffic helper in {} did not start",
                node.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            until,
            node: node.name.clone(),
        }
    }

    /// Stops the clients and returns their report (`ok`, `fail`, `wrong`, `errors`).
    pub fn stop(self) -> Value {
        std::fs::write(&self.until, b"").expect("write stop file");
        let out = self.child.wait_with_output().expect("wait traffic helper");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
            panic!(
                "traffic helper of {} printed no report: {text}{}",
                self.node,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        v["node"] = Value::String(self.node);
        v
    }
}

fn spawn(dir: &Path, node: &SimNode, extra: &[&str]) -> Child {
    let script = dir.join("traffic.py");
    if !script.exists() {
        std::fs::write(&script, TRAFFIC).expect("write traffic.py");
    }
    let backends = BACKENDS.map(|p| p.to_string()).join(",");
    let target = format!("{VIP}:{PORT}={backends}");
    let mut args = vec![
        script.display().to_string(),
        "--backends".into(),
        backends.clone(),
        "--target".into(),
        target,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new("/bin/sh")
        .args([
            "-c",
            r#"echo $$ > "$1" && shift && exec unshare -n /bin/sh -c 'ip link set lo up && exec /usr/bin/python3 "$@"' sh "$@""#,
            "sh",
            &node.cgroup.join("cgroup.procs").display().to_string(),
        ])
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start traffic helper")
}

/// `count` connections to the VIP from `node`'s cgroup; the report.
pub fn probe(dir: &Path, node: &SimNode, count: u32) -> Value {
    let child = spawn(
        dir,
        node,
        &[
            "--clients",
            "1",
            "--count",
            &count.to_string(),
            "--timeout",
            "2",
        ],
    );
    let out = child.wait_with_output().expect("wait probe");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "probe from {} printed no report: {text}{}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A number of a traffic report.
pub fn count(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or(0)
}
