//! Pods run with their ServiceAccount's identity, so the shipped RBAC applies to them.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use meshlet_local_cluster::images::BUSYBOX_IMAGE;
use meshlet_local_cluster::{ClusterOptions, LocalCluster};
use serde_json::json;
use support::*;

/// A kubeconfig for `server` authenticating with `token`, trusting the CA in `ca_file`.
fn kubeconfig(server: &str, ca_file: &std::path::Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    \
         certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\n\
         contexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
        ca_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projected_token_is_the_pods_service_account_and_rbac_applies_to_it() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: 1,
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
            "containers": [{"name": "probe", "image": BUSYBOX_IMAGE,
                            "command": ["sleep", "1000"]}]}}))
    .expect("pod");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let pid = eventually("the probe container", Duration::from_secs(60), || async {
        cluster.pod_pid("meshlet-system", "rbac-probe", "probe")
    })
    .await;
    // What the container itself sees at the well-known path.
    let sa = std::path::PathBuf::from(format!(
        "/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount"
    ));
    let token = std::fs::read_to_string(sa.join("token")).expect("token in the container");
    let ca = std::fs::read_to_string(sa.join("ca.crt")).expect("ca.crt in the container");
    let ns = std::fs::read_to_string(sa.join("namespace")).expect("namespace in the container");
    assert_eq!(ns, "meshlet-system");
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    assert!(
        std::fs::write(sa.join("token"), "x").is_err(),
        "the service-account volume is read-only"
    );
    let environ =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).expect("environ"))
            .into_owned();
    assert!(
        environ.contains("KUBERNETES_SERVICE_HOST=10.96.0.1")
            && environ.contains("KUBERNETES_SERVICE_PORT=443"),
        "in-cluster env: {environ}"
    );
    assert!(
        !environ.contains("KUBECONFIG"),
        "no kubeconfig injected: {environ}"
    );

    let kc_path = cluster.dir().join("probe.kubeconfig");
    let ca_file = cluster.dir().join("probe-ca.crt");
    std::fs::write(&ca_file, &ca).expect("write ca");
    std::fs::write(
        &kc_path,
        kubeconfig(&cluster.api_server().url(), &ca_file, token.trim()),
    )
    .expect("write kubeconfig");
    let (ok, out, err) = kubectl_with(&kc_path, &["get", "nodeenrollments"]).await;
    assert!(ok, "the agent may list NodeEnrollments: {out}{err}");
    let (ok, out, err) = kubectl_with(&kc_path, &["get", "secrets", "-A"]).await;
    assert!(!ok, "the agent may not list Secrets: {out}");
    assert!(
        err.contains("Forbidden")
            && err.contains("system:serviceaccount:meshlet-system:meshlet-agent"),
        "403 names the pod's ServiceAccount: {err}"
    );
    let (ok, out, err) = kubectl_with(&kc_path, &["auth", "whoami", "-o", "json"]).await;
    assert!(ok, "kubectl auth whoami: {out}{err}");
    assert!(
        out.contains("system:serviceaccount:meshlet-system:meshlet-agent")
            && out.contains("authentication.kubernetes.io/node-name")
            && out.contains("node-1"),
        "the token is bound to the pod's node: {out}"
    );

    // A kube-rs client (the agent's kind) with the same credentials gets the same answers.
    let kc = kube::config::Kubeconfig::read_from(&kc_path).expect("read kubeconfig");
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
