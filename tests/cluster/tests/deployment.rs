//! The Deployment controller: replicas spread over the nodes, recreated when deleted or
//! killed, status that `kubectl rollout status` understands.

mod support;

use std::time::Duration;

use meshlet_local_cluster::{ClusterOptions, LocalCluster, Signal};
use support::*;

const MANIFEST: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: meshlet.local/busybox:1
        command: ["/bin/sh", "-c", "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /, port: http}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_replicas_spread_over_nodes_and_come_back_when_deleted() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 2,
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    let file = cluster.dir().join("web.yaml");
    std::fs::write(&file, MANIFEST).expect("write");
    let (ok, out, err) = kubectl(&cluster, &["apply", "-f", &file.display().to_string()]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = kubectl(
        &cluster,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
    )
    .await;
    assert!(ok, "kubectl rollout status: {out}{err}");
    let first = eventually("2 Ready replicas", Duration::from_secs(30), || async {
        let p = pods(&cluster, "default", "app=web").await;
        (p.len() == 2 && p.iter().all(ready)).then_some(p)
    })
    .await;
    let mut nodes: Vec<_> = first.iter().map(node_of).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2"], "one replica per node");

    // kill -9 one replica's process: the kubelet restarts it in place.
    let victim = name_of(&first[0]);
    let pid = cluster
        .kill_container("default", &victim, "web", Signal::SIGKILL)
        .expect("kill");
    eventually(
        "the killed replica running again",
        Duration::from_secs(30),
        || async {
            let p = pods(&cluster, "default", "app=web").await;
            let v = p.iter().find(|p| name_of(p) == victim)?;
            let restarts = v
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .restart_count;
            (restarts == 1 && ready(v) && cluster.pod_pid("default", &victim, "web") != Some(pid))
                .then_some(())
        },
    )
    .await;

    // Deleting a replica brings a new one.
    let (ok, out, err) = kubectl(&cluster, &["delete", "pod", &victim]).await;
    assert!(ok, "{out}{err}");
    eventually("a replacement replica", Duration::from_secs(30), || async {
        let p = pods(&cluster, "default", "app=web").await;
        (p.len() == 2 && p.iter().all(ready) && p.iter().all(|p| name_of(p) != victim))
            .then_some(())
    })
    .await;
    let (_, out, _) = kubectl(&cluster, &["get", "deployment", "web"]).await;
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("2")),
        "{out}"
    );
    cluster.shutdown().await.expect("shutdown");
}
