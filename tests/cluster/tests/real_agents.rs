//! Real `meshlet-agent` containers as DaemonSet pods, one per simulated node: each mounts and
//! pins under its own node's bpffs, attaches to its own node's cgroup2 root and serves a VIP
//! for the pods there.

mod support;

use std::time::{Duration, Instant};

use meshlet_local_cluster::images::AGENT_REPO;
use meshlet_local_cluster::process::pins_under;
use meshlet_local_cluster::{ClusterOptions, LocalCluster};
use support::*;

const NS: &str = "meshlet-system";
const BACKEND_PORT: u16 = 18_093;

/// One connection to the VIP from a traffic pod on `node` (its own network namespace, with
/// the backend on its loopback); the report.
async fn connect_from(cluster: &LocalCluster, node: &str, name: &str) -> serde_json::Value {
    let args: Vec<String> = [
        "--backends".to_string(),
        BACKEND_PORT.to_string(),
        "--target".into(),
        format!("10.96.0.10:80={BACKEND_PORT}"),
        "--clients".into(),
        "1".into(),
        "--count".into(),
        "1".into(),
        "--timeout".into(),
        "2".into(),
    ]
    .to_vec();
    TrafficPod::start(cluster, node, name, &args)
        .await
        .report(cluster, false)
        .await
}

fn daemonset() -> String {
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
      hostNetwork: true
      nodeSelector: {{meshlet.io/agent: "yes"}}
      terminationGracePeriodSeconds: 10
      initContainers:
      - name: mount-bpffs
        image: {AGENT_REPO}:v0.1.0
        args: ["mount-bpffs"]
        securityContext: {{privileged: true}}
        volumeMounts:
        - {{name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: Bidirectional}}
      containers:
      - name: agent
        image: {AGENT_REPO}:v0.1.0
        args: ["run", "--standalone", "/etc/meshlet/services.yaml"]
        env:
        - name: NODE_NAME
          valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
        - name: HOST_IP
          valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}
        - {{name: MESHLET_MAX_SERVICES, value: "64"}}
        - {{name: MESHLET_MAX_ENDPOINTS, value: "256"}}
        - {{name: MESHLET_METRICS_ADDR, value: "$(HOST_IP):9090"}}
        readinessProbe:
          httpGet: {{path: /readyz, port: 9090}}
          periodSeconds: 1
        securityContext:
          capabilities: {{drop: [ALL], add: [BPF, NET_ADMIN]}}
        volumeMounts:
        - {{name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: HostToContainer}}
        - {{name: cgroup, mountPath: /host/sys/fs/cgroup, readOnly: true}}
        - {{name: run, mountPath: /run/meshlet}}
        - {{name: config, mountPath: /etc/meshlet, readOnly: true}}
      volumes:
      - {{name: bpffs, hostPath: {{path: /sys/fs/bpf, type: DirectoryOrCreate}}}}
      - {{name: cgroup, hostPath: {{path: /sys/fs/cgroup, type: Directory}}}}
      - {{name: run, hostPath: {{path: /run/meshlet, type: DirectoryOrCreate}}}}
      - {{name: config, hostPath: {{path: /etc/meshlet-test, type: Directory}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_agents_each_serve_the_vip_in_their_own_node_cgroup() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 4,
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    // The same standalone file on every node, at the node's /etc/meshlet-test.
    for n in cluster.nodes() {
        let dir = n.host_path("/etc/meshlet-test");
        std::fs::create_dir_all(&dir).expect("config dir");
        std::fs::write(
            dir.join("services.yaml"),
            format!(
                "services:\n  - name: dns\n    vip: 10.96.0.10\n    ports:\n      - port: 80\n    endpoints:\n      - address: 127.0.0.1\n        port: {BACKEND_PORT}\n"
            ),
        )
        .expect("write standalone file");
    }
    // Agents on node-1..3; node-4 has none.
    let (ok, out, err) = kubectl(
        &cluster,
        &[
            "label",
            "node",
            "node-1",
            "node-2",
            "node-3",
            "meshlet.io/agent=yes",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let manifest = cluster.dir().join("agent.yaml");
    std::fs::write(&manifest, daemonset()).expect("write manifest");

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
            cgroup_of(pid).contains(&format!("/{}/kubepods/", node.name)),
            "agent of {} runs in a pod cgroup of its node: {}",
            node.name,
            cgroup_of(pid)
        );
        let pins = pins_under(&node.bpffs_root);
        assert!(
            !pins.is_empty(),
            "the agent of {} pins under {}",
            node.name,
            node.bpffs_root.display()
        );
        let report = connect_from(&cluster, &node.name, &format!("client-{}", node.name)).await;
        assert_eq!(
            (report["ok"].as_u64(), report["fail"].as_u64()),
            (Some(1), Some(0)),
            "VIP from a pod on {} reaches the backend: {report}",
            node.name
        );
    }
    // A node without an agent sees no VIP: the programs are per node.
    let report = connect_from(&cluster, "node-4", "client-node-4").await;
    assert_eq!(
        report["fail"].as_u64(),
        Some(1),
        "no rewrite on a node without an agent: {report}"
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
    // Deleting the agent pods leaves the data plane in place: pins outlive the containers.
    for n in cluster.nodes().iter().take(3) {
        assert!(
            !pins_under(&n.bpffs_root).is_empty(),
            "pins of {} survive its agent pod",
            n.name
        );
    }
    let dir = cluster.dir().to_path_buf();
    cluster.shutdown().await.expect("shutdown");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "shutdown unmounts the nodes' bpffs"
    );
}
