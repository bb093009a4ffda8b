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

/// Fails with a clear message when a prerequisite is missing (CI runs as root).
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the local-cluster tests need root (cgroups, bpffs)"
    );
    assert!(
        Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists(),
        "cgroup v2 is not mounted at /sys/fs/cgroup/unified"
    );
    ensure_bpffs();
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
