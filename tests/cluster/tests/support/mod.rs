//! Shared helpers of the local-cluster tests: prerequisites, the real `kubectl`, polling.
#![allow(dead_code)]

pub mod mesh;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use meshlet_local_cluster::LocalCluster;

/// Fails with a clear message when a prerequisite is missing (CI runs as root): root, a
/// cgroup2 mount, bpffs, `runc`, and the images `cargo xtask images` builds.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the local-cluster tests need root (cgroups, bpffs, runc)"
    );
    assert!(
        meshlet_local_cluster::runtime::cgroup2_mount().is_some(),
        "no cgroup2 hierarchy is mounted"
    );
    assert!(
        Command::new("runc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "runc is not installed (apt-get install runc, or run hack/setup.sh)"
    );
    let images = meshlet_local_cluster::default_images_dir();
    for image in [
        meshlet_local_cluster::images::BUSYBOX_IMAGE,
        meshlet_local_cluster::images::TRAFFIC_IMAGE,
    ] {
        let archive = meshlet_oci::archive_path(&images, image);
        assert!(
            archive.is_file(),
            "image {image} is not built ({} missing): run `cargo xtask images`",
            archive.display()
        );
    }
    ensure_bpffs();
}

/// The log of a pod's container (its latest run), as the node keeps it under
/// `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<n>.log`.
pub fn container_log(
    cluster: &LocalCluster,
    node: &str,
    ns: &str,
    pod: &str,
    container: &str,
) -> String {
    let dir = cluster.node(node).expect("node").pod_logs_dir();
    let Some(pod_dir) = std::fs::read_dir(&dir).ok().and_then(|rd| {
        rd.filter_map(Result::ok).find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{ns}_{pod}_"))
        })
    }) else {
        return String::new();
    };
    let cdir = pod_dir.path().join(container);
    let latest = std::fs::read_dir(&cdir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let n: u32 = e
                        .file_name()
                        .to_string_lossy()
                        .strip_suffix(".log")?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .max_by_key(|(n, _)| *n)
        })
        .map(|(_, p)| p);
    latest
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted.
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed"
        );
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The real kubectl: `$KUBECTL` or `<workspace>/.venv/bin/kubectl`.
pub fn kubectl_path() -> PathBuf {
    let p = std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/kubectl"));
    assert!(
        p.exists(),
        "kubectl not found at {} (set KUBECTL or run hack/setup.sh)",
        p.display()
    );
    p
}

/// Runs kubectl against the cluster; returns (success, stdout, stderr).
pub async fn kubectl(cluster: &LocalCluster, args: &[&str]) -> (bool, String, String) {
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    kubectl_with(&kubeconfig, args).await
}

/// Runs kubectl with a kubeconfig; returns (success, stdout, stderr).
pub async fn kubectl_with(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(kubectl_path())
        .env("KUBECONFIG", kubeconfig)
        .current_dir(workspace())
        .args(args)
        .output()
        .await
        .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pods in `ns` with label `key=value`.
pub async fn pods(cluster: &LocalCluster, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(cluster.client(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods")
        .items
}

/// Whether a pod has condition Ready=True.
pub fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's node.
pub fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// A pod's name.
pub fn name_of(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// The image of a pod's first container.
pub fn image_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// The cgroup v2 path of a process, relative to the hierarchy root (`/meshlet-local/...`).
pub fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

/// A `mesh-traffic` pod (backends + clients of service VIPs) on `node`, in its own network
/// namespace and its node's cgroup subtree, as a workload pod runs.
pub struct TrafficPod {
    /// Pod name (namespace `default`).
    pub name: String,
    /// Node it runs on.
    pub node: String,
}

impl TrafficPod {
    /// Creates the pod with `args` and waits until its backends and clients run.
    pub async fn start(cluster: &LocalCluster, node: &str, name: &str, args: &[String]) -> Self {
        let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "mesh-traffic"}},
            "spec": {"nodeName": node, "restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
                "automountServiceAccountToken": false,
                "containers": [{"name": "traffic", "image": meshlet_local_cluster::images::TRAFFIC_IMAGE,
                                "args": args}]}}))
        .expect("traffic pod");
        api.create(&kube::api::PostParams::default(), &pod)
            .await
            .expect("create traffic pod");
        eventually(
            &format!("traffic pod {name} on {node} running"),
            Duration::from_secs(60),
            || async {
                let log = container_log(cluster, node, "default", name, "traffic");
                log.lines().any(|l| l == "ready").then_some(())
            },
        )
        .await;
        Self {
            name: name.into(),
            node: node.into(),
        }
    }

    /// Waits for the pod's report (its last JSON line): after `--count` connections, or once
    /// the pod is deleted (SIGTERM) when `delete` is set.
    pub async fn report(self, cluster: &LocalCluster, delete: bool) -> serde_json::Value {
        if delete {
            let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
            api.delete(&self.name, &Default::default())
                .await
                .expect("delete traffic pod");
        }
        let mut v: serde_json::Value = eventually(
            &format!("the report of traffic pod {}", self.name),
            Duration::from_secs(120),
            || async {
                let log = container_log(cluster, &self.node, "default", &self.name, "traffic");
                log.lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v.get("ok").is_some())
            },
        )
        .await;
        v["node"] = serde_json::Value::String(self.node.clone());
        v
    }
}
