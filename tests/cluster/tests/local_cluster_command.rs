//! `hack/local-cluster up|status|down`: what a person and the demo use.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn script(args: &[&str], dir: &std::path::Path) -> (i32, String) {
    let out = Command::new(workspace().join("hack/local-cluster"))
        .args(args)
        .args(["--dir", &dir.display().to_string()])
        .env(
            "MESHLET_LOCAL_CLUSTER_BIN",
            env!("CARGO_BIN_EXE_meshlet-local-cluster"),
        )
        .output()
        .expect("run hack/local-cluster");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_a_kubeconfig_with_ready_nodes_and_down_leaves_nothing_behind() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let id = format!("cmdtest-{}", std::process::id());

    let (code, help) = script(&["--help"], &dir);
    assert_eq!(code, 0, "{help}");
    assert!(
        help.contains("TEST cluster") && help.contains("production\nmeans a real"),
        "{help}"
    );

    let (code, out) = script(&["status"], &dir);
    assert_eq!(code, 3, "not running yet: {out}");

    let (code, out) = script(&["up", "--nodes", "2", "--id", &id, "--no-build"], &dir);
    assert_eq!(code, 0, "up failed: {out}");
    let kubeconfig = dir.join("kubeconfig");
    assert!(
        out.contains("record xfrm state in each node's /run/meshlet/xfrm.json"),
        "up says the test agents record xfrm state instead of using the kernel: {out}"
    );
    assert!(
        out.contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
        "up prints the KUBECONFIG to export: {out}"
    );
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let env = std::fs::read_to_string(dir.join("cluster.env")).expect("cluster.env");
    let base = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(std::path::PathBuf::from)
            .expect("base path")
    };
    let cgroup_base = base("CGROUP_BASE=");
    let node_root = dir.join("node-2/root");
    assert!(cgroup_base.join("node-2").is_dir() && node_root.join("sys/fs/bpf").is_dir());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        mounts.contains(&format!(" {} ", node_root.display())),
        "each node's root is a mount of its own (shared, for mountPropagation)"
    );

    let (code, out) = script(&["status"], &dir);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("running"), "{out}");

    let (ok, out, err) = kubectl_with(&kubeconfig, &["get", "nodes"]).await;
    assert!(ok, "{err}");
    let ready: Vec<&str> = out.lines().filter(|l| l.contains(" True ")).collect();
    assert_eq!(ready.len(), 2, "2 Ready nodes:\n{out}");
    assert!(out.contains("node-1") && out.contains("node-2"), "{out}");

    let (code, out) = script(&["down"], &dir);
    assert_eq!(code, 0, "{out}");
    eventually(
        "the cluster process to exit",
        Duration::from_secs(5),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    assert!(
        !cgroup_base.exists(),
        "down removes {}",
        cgroup_base.display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "down unmounts the nodes"
    );
    let (code, out) = script(&["down"], &dir);
    assert_eq!(code, 0, "down is idempotent: {out}");
    let (code, _) = script(&["status"], &dir);
    assert_eq!(code, 3);
}
