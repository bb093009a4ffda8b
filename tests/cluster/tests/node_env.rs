//! Per-node container environment: the xfrm recording hook every node's agent gets, extra
//! variables on one node, and changes applied from the next container start.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use meshlet_local_cluster::xfrm::{REFUSE_ENV, XFRM_ENV};
use meshlet_local_cluster::{ClusterOptions, ImageCommand, ImageTable, LocalCluster, Signal};
use serde_json::json;
use support::*;

/// A container that writes its environment to `<run_dir>/env-<pod>` and sleeps.
fn images() -> ImageTable {
    ImageTable::new().with(
        "test/env:1",
        ImageCommand::new("/bin/sh").with_args([
            "-c",
            r#"env > "$(dirname "$MESHLET_LOCK_FILE")/env-$POD_NAME.tmp" && mv "$(dirname "$MESHLET_LOCK_FILE")/env-$POD_NAME.tmp" "$(dirname "$MESHLET_LOCK_FILE")/env-$POD_NAME" && exec sleep 1000"#,
        ]),
    )
}

async fn run_on(cluster: &LocalCluster, node: &str) -> String {
    let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let name = format!("env-{node}");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "test/env:1"}]}}))
    .expect("pod");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    name
}

/// The environment the container of `pod` on `node` started with, once it wrote it.
async fn env_of(cluster: &LocalCluster, node: &str, pod: &str) -> BTreeMap<String, String> {
    let path = cluster
        .node(node)
        .expect("node")
        .run_dir
        .join(format!("env-{pod}"));
    eventually(
        &format!("{} to be written", path.display()),
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&path).ok()?;
            Some(
                text.lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gets_its_own_xfrm_recording_and_env_changes_apply_on_restart() {
    require_root();
    let mut cluster = LocalCluster::start(ClusterOptions {
        nodes: 2,
        images: images(),
        xfrm_recording: true,
        node_env: BTreeMap::from([("MESHLET_TEST_ALL".to_string(), "1".to_string())]),
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    let refuse = BTreeMap::from([(REFUSE_ENV.to_string(), "cbc(aes)+hmac(sha256)".to_string())]);
    let node3 = cluster.add_node_with_env(refuse).await.expect("add node-3");

    let mut pods = BTreeMap::new();
    for n in ["node-1", "node-2", &node3] {
        pods.insert(n.to_string(), run_on(&cluster, n).await);
    }
    for (node, pod) in &pods {
        let env = env_of(&cluster, node, pod).await;
        let path = cluster.node(node).expect("node").xfrm_path();
        assert_eq!(
            env.get(XFRM_ENV),
            Some(&format!("recording:{}", path.display())),
            "{node}: {env:?}"
        );
        assert_eq!(env.get("MESHLET_TEST_ALL").map(String::as_str), Some("1"));
        assert_eq!(
            env.get(REFUSE_ENV).map(String::as_str),
            (node == "node-3").then_some("cbc(aes)+hmac(sha256)"),
            "{node}: only node-3 refuses"
        );
    }

    // Node-3 loses the refusal and gains a variable; its next container start sees both.
    cluster
        .set_node_env("node-3", REFUSE_ENV, None)
        .expect("unset");
    cluster
        .set_node_env("node-3", "MESHLET_TEST_ONE", Some("x"))
        .expect("set");
    assert!(cluster.set_node_env("node-9", "A", Some("b")).is_err());
    let pod = &pods["node-3"];
    let path = cluster
        .node("node-3")
        .expect("node")
        .run_dir
        .join(format!("env-{pod}"));
    std::fs::remove_file(&path).expect("remove the first env dump");
    cluster
        .kill_container("default", pod, "c", Signal::SIGKILL)
        .expect("kill");
    let env = env_of(&cluster, "node-3", pod).await;
    assert_eq!(env.get(REFUSE_ENV), None, "{env:?}");
    assert_eq!(env.get("MESHLET_TEST_ONE").map(String::as_str), Some("x"));
    assert!(env.contains_key(XFRM_ENV));
    cluster.shutdown().await.expect("shutdown");
}
