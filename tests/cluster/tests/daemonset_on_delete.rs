//! The DaemonSet controller and kubelet with a stand-in container (busybox httpd): OnDelete
//! semantics, containers in each node's cgroup subtree, and what `kubectl` shows.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::Api;
use meshlet_local_cluster::images::BUSYBOX_IMAGE;
use meshlet_local_cluster::{ClusterOptions, LocalCluster};
use support::*;

const NS: &str = "standin";

/// The stand-in DaemonSet at template `version` (an env value: a new template, same image).
fn manifest(version: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: standin
  namespace: {NS}
spec:
  selector:
    matchLabels: {{app: standin}}
  updateStrategy:
    type: OnDelete
  template:
    metadata:
      labels: {{app: standin}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: main
        image: {BUSYBOX_IMAGE}
        command: ["/bin/sh", "-c", "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
        env:
        - name: STANDIN_VERSION
          value: "{version}"
        - name: NODE_NAME
          valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
"#
    )
}

async fn apply(cluster: &LocalCluster, yaml: &str) {
    let file = cluster.dir().join("standin.yaml");
    std::fs::write(&file, yaml).expect("write manifest");
    let (ok, out, err) = kubectl(cluster, &["apply", "-f", &file.display().to_string()]).await;
    assert!(ok, "kubectl apply failed: {out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_pods_are_replaced_only_when_deleted_and_then_from_the_new_template() {
    require_root();
    let t0 = Instant::now();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 3,
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    println!(
        "start() to 3 nodes registered: {} ms",
        t0.elapsed().as_millis()
    );
    let (ok, out, _) = kubectl(&cluster, &["get", "nodes", "-o", "wide"]).await;
    assert!(ok);
    assert_eq!(
        out.lines().filter(|l| l.contains(" True ")).count(),
        3,
        "3 Ready nodes:\n{out}"
    );
    assert!(out.contains("127.0.1.2"), "node addresses shown:\n{out}");

    apply(&cluster, &manifest("1")).await;
    let t1 = Instant::now();
    let first = eventually("3 standin pods Ready", Duration::from_secs(60), || async {
        let p = pods(&cluster, NS, "app=standin").await;
        (p.len() == 3 && p.iter().all(ready)).then_some(p)
    })
    .await;
    println!(
        "3 stand-in pods Ready after {} ms",
        t1.elapsed().as_millis()
    );
    let mut nodes: Vec<_> = first.iter().map(node_of).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2", "node-3"], "one pod per node");

    // Each pod's container runs in its own node's cgroup subtree, in a pod cgroup.
    let mut pids = std::collections::BTreeMap::new();
    for p in &first {
        let pid = cluster
            .pod_pid(NS, &name_of(p), "main")
            .expect("pid of a running pod");
        let node = cluster.node(&node_of(p)).expect("node");
        let cgroup = cgroup_of(pid);
        let uid = p.metadata.uid.clone().expect("uid");
        let node_rel = node
            .cgroup
            .strip_prefix(meshlet_local_cluster::runtime::cgroup2_mount().expect("cgroup2"))
            .expect("node cgroup under the cgroup2 mount")
            .display()
            .to_string();
        assert!(
            cgroup.starts_with(&format!("/{node_rel}/kubepods/pod{uid}/")),
            "/proc/{pid}/cgroup of {} says {cgroup}, not under {node_rel}",
            name_of(p)
        );
        let status = p.status.as_ref().expect("status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(
            status.host_ip.as_deref(),
            Some(node.address.to_string().as_str())
        );
        pids.insert(name_of(p), pid);
    }

    let (ok, out, err) = kubectl(&cluster, &["-n", NS, "get", "pods", "-o", "wide"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out.matches("Running").count(),
        3,
        "kubectl shows 3 Running pods:\n{out}"
    );
    assert_eq!(
        out.matches(" True ").count(),
        3,
        "kubectl shows 3 ready pods:\n{out}"
    );
    for n in ["node-1", "node-2", "node-3"] {
        assert!(out.contains(n), "kubectl shows {n}:\n{out}");
    }
    let ds_api: Api<DaemonSet> = Api::namespaced(cluster.client(), NS);
    eventually(
        "daemonset status numberReady=3",
        Duration::from_secs(20),
        || async {
            let s = ds_api.get("standin").await.ok()?.status?;
            (s.number_ready == 3 && s.desired_number_scheduled == 3).then_some(())
        },
    )
    .await;
    let (_, out, _) = kubectl(&cluster, &["-n", NS, "get", "ds", "standin"]).await;
    println!("{out}");

    // A template change replaces nothing (OnDelete).
    apply(&cluster, &manifest("2")).await;
    eventually(
        "the controller observed generation 2",
        Duration::from_secs(20),
        || async {
            let s = ds_api.get("standin").await.ok()?.status?;
            (s.observed_generation == Some(2) && s.updated_number_scheduled == Some(0))
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // let a wrong replacement show up, if any
    let after = pods(&cluster, NS, "app=standin").await;
    let mut names: Vec<_> = after.iter().map(name_of).collect();
    names.sort();
    assert_eq!(
        names,
        pids.keys().cloned().collect::<Vec<_>>(),
        "no pod replaced"
    );
    for (name, pid) in &pids {
        assert_eq!(
            cluster.pod_pid(NS, name, "main"),
            Some(*pid),
            "{name} kept its process"
        );
    }

    // Deleting node-2's pod stops its process and brings a pod with the new image.
    let victim = first
        .iter()
        .find(|p| node_of(p) == "node-2")
        .expect("pod on node-2");
    let victim_name = name_of(victim);
    let victim_pid = pids[&victim_name];
    let (ok, out, err) = kubectl(&cluster, &["-n", NS, "delete", "pod", &victim_name]).await;
    assert!(ok, "kubectl delete pod: {out}{err}");
    eventually(
        "the deleted pod's process to exit",
        Duration::from_secs(20),
        || async { (!alive(victim_pid)).then_some(()) },
    )
    .await;
    let replaced = eventually(
        "a new Ready pod on node-2",
        Duration::from_secs(60),
        || async {
            let p = pods(&cluster, NS, "app=standin").await;
            let new = p
                .iter()
                .find(|p| node_of(p) == "node-2" && name_of(p) != victim_name && ready(p))?;
            (p.len() == 3).then(|| new.clone())
        },
    )
    .await;
    assert_eq!(image_of(&replaced), BUSYBOX_IMAGE);
    let new_pid = cluster
        .pod_pid(NS, &name_of(&replaced), "main")
        .expect("new pid");
    let environ = std::fs::read(format!("/proc/{new_pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("STANDIN_VERSION=2"),
        "the new pod runs the current template"
    );
    assert!(
        environ.contains("NODE_NAME=node-2"),
        "fieldRef spec.nodeName resolved"
    );
    for (name, pid) in pids.iter().filter(|(n, _)| **n != victim_name) {
        assert_eq!(
            cluster.pod_pid(NS, name, "main"),
            Some(*pid),
            "{name} untouched"
        );
        assert!(alive(*pid));
    }
    eventually(
        "daemonset shows 1 updated pod",
        Duration::from_secs(20),
        || async {
            let s = ds_api.get("standin").await.ok()?.status?;
            (s.updated_number_scheduled == Some(1) && s.number_ready == 3).then_some(())
        },
    )
    .await;

    let cgroup_base = cluster.cgroup_base().to_path_buf();
    let all_pids: Vec<u32> = pids.values().copied().chain([new_pid]).collect();
    cluster.shutdown().await.expect("shutdown");
    assert!(!cgroup_base.exists(), "shutdown removes the node cgroups");
    for pid in all_pids {
        assert!(!alive(pid), "shutdown stops pid {pid}");
    }
}
