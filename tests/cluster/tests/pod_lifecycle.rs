//! The kubelet's pod lifecycle: failing init containers, unknown images, container restarts.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use meshlet_local_cluster::images::BUSYBOX_IMAGE;
use meshlet_local_cluster::{ClusterOptions, LocalCluster, Signal};
use serde_json::{Value, json};
use support::*;

async fn create(cluster: &LocalCluster, pod: Value) -> String {
    let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod")
        .metadata
        .name
        .unwrap_or_default()
}

async fn status(cluster: &LocalCluster, name: &str) -> Option<Value> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let p = api.get(name).await.ok()?;
    serde_json::to_value(p.status?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_init_container_keeps_the_pod_pending_with_its_exit_code_and_message() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    let name = create(
        &cluster,
        json!({"metadata": {"name": "agent-x", "namespace": "default"}, "spec": {
            "nodeName": "node-1",
            "initContainers": [{"name": "preflight", "image": BUSYBOX_IMAGE, "command": ["/bin/sh", "-c",
                "echo checking >&2; echo 'preflight: cannot adopt map layout 9' >&2; exit 3"]}],
            "containers": [{"name": "agent", "image": BUSYBOX_IMAGE, "command": ["sleep", "1000"]}]}}),
    )
    .await;
    let s = eventually(
        "the init failure retried once",
        Duration::from_secs(30),
        || async {
            let s = status(&cluster, &name).await?;
            (s.pointer("/initContainerStatuses/0/restartCount")?
                .as_i64()?
                >= 1)
                .then_some(s)
        },
    )
    .await;
    assert_eq!(s["phase"], "Pending", "{s:#}");
    let term = &s["initContainerStatuses"][0]["state"]["terminated"];
    assert_eq!(term["exitCode"], 3, "{s:#}");
    assert_eq!(term["reason"], "Error");
    let msg = term["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("preflight: cannot adopt map layout 9"),
        "message carries the stderr: {msg:?}"
    );
    let main = &s["containerStatuses"][0];
    assert_eq!(main["started"], false, "{s:#}");
    assert!(main["state"]["waiting"].is_object(), "{s:#}");
    assert_eq!(cluster.pod_pid("default", &name, "agent"), None);
    let node = cluster.node("node-1").expect("node");
    let logs = node.pod_logs_dir();
    let pod_dir = std::fs::read_dir(&logs)
        .expect("pod logs")
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("default_{name}_"))
        })
        .expect("the pod's log directory")
        .path();
    assert!(
        pod_dir.join("preflight/0.log").is_file(),
        "the init container's log is kept"
    );
    assert!(
        !pod_dir.join("agent").exists(),
        "the main container never started"
    );
    let (_, out, _) = kubectl(&cluster, &["get", "pod", &name]).await;
    assert!(
        out.contains("Init:Error") || out.contains("Init:CrashLoopBackOff"),
        "kubectl get pods shows the init failure: {out}"
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_image_is_err_image_pull_and_a_killed_container_is_restarted() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    let unknown = create(
        &cluster,
        json!({"metadata": {"name": "unknown", "namespace": "default"}, "spec": {
            "nodeName": "node-1",
            "containers": [{"name": "c", "image": "example.com/nothing:1"}]}}),
    )
    .await;
    let s = eventually("ErrImagePull", Duration::from_secs(20), || async {
        let s = status(&cluster, &unknown).await?;
        (s.pointer("/containerStatuses/0/state/waiting/reason")? == "ErrImagePull").then_some(s)
    })
    .await;
    assert_eq!(s["phase"], "Pending");
    let (_, out, _) = kubectl(&cluster, &["get", "pod", &unknown]).await;
    assert!(
        out.contains("ErrImagePull") || out.contains("ImagePullBackOff"),
        "kubectl get pods shows the pull failure: {out}"
    );
    let msg = s["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        msg.contains("example.com/nothing:1") && msg.contains("not found"),
        "{msg}"
    );

    let sleeper = create(
        &cluster,
        json!({"metadata": {"name": "sleeper", "namespace": "default"}, "spec": {
            "nodeName": "node-1",
            "containers": [{"name": "c", "image": BUSYBOX_IMAGE, "command": ["sleep", "1000"]}]}}),
    )
    .await;
    let pid = eventually("sleeper running", Duration::from_secs(20), || async {
        cluster.pod_pid("default", &sleeper, "c")
    })
    .await;
    let killed = cluster
        .kill_container("default", &sleeper, "c", Signal::SIGKILL)
        .expect("kill");
    assert_eq!(killed, pid);
    let s = eventually(
        "restarted after SIGKILL",
        Duration::from_secs(20),
        || async {
            let s = status(&cluster, &sleeper).await?;
            let restarted = s.pointer("/containerStatuses/0/restartCount")?.as_i64()? == 1
                && s.pointer("/containerStatuses/0/state/running").is_some();
            restarted.then_some(s)
        },
    )
    .await;
    assert_eq!(
        s["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        128 + 9,
        "{s:#}"
    );
    let new_pid = cluster.pod_pid("default", &sleeper, "c").expect("new pid");
    assert_ne!(new_pid, pid);
    assert!(!alive(pid));
    cluster.shutdown().await.expect("shutdown");
    assert!(!alive(new_pid), "shutdown stops the container");
}
