//! Real `meshlet-agent` processes as DaemonSet pods, one per simulated node: each pins under
//! its own bpffs root, attaches to its own node cgroup and serves a VIP for processes there.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshlet_local_cluster::process::pins_under;
use meshlet_local_cluster::{ClusterOptions, ImageCommand, ImageTable, LocalCluster};
use support::*;

const NS: &str = "meshlet-system";
const BACKEND_PORT: u16 = 18_093;

/// A backend on 127.0.0.1 and a client of the VIP, both in a private network namespace
/// (loopback only, so nothing leaves the machine) inside the given cgroup.
const CLIENT: &str = r#"
import socket, sys, threading
port = int(sys.argv[1])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(16)
def serve():
    while True:
        c, _ = srv.accept()
        c.sendall(b"backend-ok\n")
        c.close()
threading.Thread(target=serve, daemon=True).start()
try:
    c = socket.create_connection(("10.96.0.10", 80), timeout=3)
    print(c.recv(64).decode().strip())
except OSError as e:
    print("connect failed:", e)
"#;

/// The agent binary next to this test's profile directory, built when missing.
fn agent_binary() -> PathBuf {
    let dir = meshlet_local_cluster::current_bin_dir().expect("profile directory");
    let bin = dir.join("meshlet-agent");
    if !bin.exists() {
        let target = dir.parent().expect("target dir");
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args(["build", "-p", "meshlet-agent", "--bin", "meshlet-agent"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(workspace())
            .status()
            .expect("run cargo build -p meshlet-agent");
        assert!(status.success(), "cargo build -p meshlet-agent failed");
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

fn connect_from(cgroup: &Path, script: &Path) -> String {
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            r#"echo $$ > "$1" && exec unshare -n /bin/sh -c "ip link set lo up && exec /usr/bin/python3 $2 $3""#,
            "sh",
            &cgroup.join("cgroup.procs").display().to_string(),
            &script.display().to_string(),
            &BACKEND_PORT.to_string(),
        ])
        .output()
        .expect("run client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn daemonset(standalone: &Path) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: meshlet-agent
  namespace: {NS}
spec:
  selector:
    matchLabels: {{app.kubernetes.io/name: meshlet-agent}}
  updateStrategy: {{type: OnDelete}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: meshlet-agent, app.kubernetes.io/component: agent}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: agent
        image: test/meshlet-agent:standalone
        args: ["run"]
        env:
        - name: NODE_NAME
          valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
        - {{name: MESHLET_STANDALONE, value: "{}"}}
        - {{name: MESHLET_MAX_SERVICES, value: "64"}}
        - {{name: MESHLET_MAX_ENDPOINTS, value: "256"}}
        - {{name: MESHLET_METRICS_ADDR, value: "0.0.0.0:9090"}}
        readinessProbe:
          httpGet: {{path: /readyz, port: 9090}}
          periodSeconds: 1
"#,
        standalone.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_agents_each_serve_the_vip_in_their_own_node_cgroup() {
    require_root();
    let agent = agent_binary();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 3,
        images: ImageTable::new().with("test/meshlet-agent:standalone", ImageCommand::new(&agent)),
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    let standalone = cluster.dir().join("services.yaml");
    std::fs::write(
        &standalone,
        format!(
            "services:\n  - name: dns\n    vip: 10.96.0.10\n    ports:\n      - port: 80\n    endpoints:\n      - address: 127.0.0.1\n        port: {BACKEND_PORT}\n"
        ),
    )
    .expect("write standalone file");
    let client = cluster.dir().join("client.py");
    std::fs::write(&client, CLIENT).expect("write client");
    let manifest = cluster.dir().join("agent.yaml");
    std::fs::write(&manifest, daemonset(&standalone)).expect("write manifest");

    let t0 = Instant::now();
    let (ok, out, err) = kubectl(&cluster, &["apply", "-f", &manifest.display().to_string()]).await;
    assert!(ok, "{out}{err}");
    let agents = eventually("3 agent pods Ready", Duration::from_secs(120), || async {
        let p = pods(&cluster, NS, "app.kubernetes.io/name=meshlet-agent").await;
        (p.len() == 3 && p.iter().all(ready)).then_some(p)
    })
    .await;
    println!(
        "3 real agent pods Ready {} ms after the DaemonSet was applied",
        t0.elapsed().as_millis()
    );

    let mut agent_pids = Vec::new();
    for p in &agents {
        let node = cluster.node(&node_of(p)).expect("node");
        let pid = cluster
            .pod_pid(NS, &name_of(p), "agent")
            .expect("agent pid");
        agent_pids.push(pid);
        assert!(
            node.cgroup
                .ends_with(cgroup_of(pid).trim_start_matches('/')),
            "agent of {} runs in its node cgroup",
            node.name
        );
        let pins = pins_under(&node.bpffs_root);
        assert!(
            !pins.is_empty(),
            "the agent of {} pins under {}",
            node.name,
            node.bpffs_root.display()
        );
        let reply = connect_from(&node.cgroup, &client);
        assert_eq!(
            reply, "backend-ok",
            "VIP from {}'s cgroup reaches the backend",
            node.name
        );
    }
    // A cgroup with no agent attached sees no VIP: the programs are per node cgroup.
    let outside = cluster.cgroup_base().join("no-agent");
    std::fs::create_dir_all(&outside).expect("create cgroup");
    let reply = connect_from(&outside, &client);
    assert!(
        reply.starts_with("connect failed"),
        "no rewrite outside the nodes: {reply}"
    );

    let (ok, out, err) = kubectl(
        &cluster,
        &["-n", NS, "delete", "daemonset", "meshlet-agent"],
    )
    .await;
    assert!(ok, "{out}{err}");
    eventually(
        "the agent pods to go away",
        Duration::from_secs(60),
        || async {
            let gone = pods(&cluster, NS, "app.kubernetes.io/name=meshlet-agent")
                .await
                .is_empty()
                && agent_pids.iter().all(|p| !alive(*p));
            gone.then_some(())
        },
    )
    .await;
    let bpffs_base = cluster.bpffs_base().to_path_buf();
    cluster.shutdown().await.expect("shutdown");
    assert!(
        pins_under(&bpffs_base).is_empty() && !bpffs_base.exists(),
        "no pins left under {}",
        bpffs_base.display()
    );
}
