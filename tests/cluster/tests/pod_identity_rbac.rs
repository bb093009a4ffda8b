//! Pods run with their ServiceAccount's identity, so the shipped RBAC applies to them.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use meshlet_local_cluster::{ClusterOptions, ImageCommand, ImageTable, LocalCluster};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pod_may_list_node_enrollments_but_not_secrets() {
    require_root();
    let kubectl_bin = kubectl_path().display().to_string();
    let script = format!(
        "{kubectl_bin} get nodeenrollments; echo \"nodeenrollments rc=$?\"; \
         {kubectl_bin} get secrets -A; echo \"secrets rc=$?\"; exec sleep 1000"
    );
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 1,
        images: ImageTable::new().with(
            "test/kubectl:1",
            ImageCommand::new("/bin/sh").with_args(["-c", script.as_str()]),
        ),
        ..ClusterOptions::default()
    })
    .await
    .expect("start cluster");
    let (ok, out, err) = kubectl(&cluster, &["apply", "-k", "manifests/"]).await;
    assert!(ok, "kubectl apply -k manifests/: {out}{err}");

    let api: Api<Pod> = Api::namespaced(cluster.client(), "meshlet-system");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "rbac-probe", "namespace": "meshlet-system"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "meshlet-agent",
            "containers": [{"name": "probe", "image": "test/kubectl:1"}]}}))
    .expect("pod");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let log_path = cluster
        .node("node-1")
        .expect("node")
        .run_dir
        .join("rbac-probe_probe.log");
    let log = eventually("both kubectl calls", Duration::from_secs(60), || async {
        let log = std::fs::read_to_string(&log_path).ok()?;
        log.lines()
            .any(|l| l.starts_with("secrets rc="))
            .then_some(log)
    })
    .await;
    assert!(
        log.lines().any(|l| l == "nodeenrollments rc=0"),
        "the agent may list NodeEnrollments:\n{log}"
    );
    assert!(
        log.lines().any(|l| l == "secrets rc=1"),
        "the agent may not list Secrets:\n{log}"
    );
    assert!(
        log.contains("Forbidden")
            && log.contains("system:serviceaccount:meshlet-system:meshlet-agent"),
        "403 names the pod's ServiceAccount:\n{log}"
    );

    // A kube-rs client (the agent's kind) with the same injected kubeconfig gets the same answers.
    let kc_path = cluster
        .node("node-1")
        .expect("node")
        .run_dir
        .join("rbac-probe.kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&kc_path).expect("read pod kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig");
    let client = kube::Client::try_from(cfg).expect("client");
    let ne = ApiResource {
        group: "meshlet.io".into(),
        version: "v1alpha1".into(),
        api_version: "meshlet.io/v1alpha1".into(),
        kind: "NodeEnrollment".into(),
        plural: "nodeenrollments".into(),
    };
    Api::<DynamicObject>::all_with(client.clone(), &ne)
        .list(&ListParams::default())
        .await
        .expect("the agent may list NodeEnrollments through kube-rs");
    match Api::<Secret>::all(client)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("listing Secrets must be forbidden, got {other:?}"),
    }
    cluster.shutdown().await.expect("shutdown");
}
