//! The test server is as strict as a real cluster: HTTPS with its own CA, bearer tokens,
//! 401 for unknown tokens, RBAC for anonymous requests, and access/token reviews decided by
//! the same RBAC evaluator — checked with kube-rs and the real `kubectl`.

mod support;

use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use meshlet_test_apiserver::TestApiServer;
use meshlet_test_apiserver::kubeconfig::{self, Kubeconfig};
use meshlet_test_apiserver::tls::SERVING_NAMES;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::{file, kubectl_ok, kubectl_with, server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENT_NS: &str = "meshlet-system";
const AGENT: &str = "meshlet-agent";

async fn config_of(path: &std::path::Path) -> kube::Config {
    let kc = kube::config::Kubeconfig::read_from(path).expect("read kubeconfig");
    kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig")
}

/// A kubeconfig for `token` (which may be unknown to the server).
fn kubeconfig_with_token(s: &TestApiServer, name: &str, token: &str) -> std::path::PathBuf {
    let path = s.kubeconfig_path.with_file_name(name);
    kubeconfig::write(
        &path,
        &Kubeconfig {
            server: &s.url(),
            ca_pem: &s.ca_pem(),
            user: name,
            token,
            namespace: "default",
        },
    )
    .expect("write kubeconfig");
    path
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Sends `GET /version` over TLS to 127.0.0.1 with `name` as the TLS server name, offering
/// h2 and http/1.1; returns the negotiated ALPN protocol and the HTTP/1.1 status line.
async fn get_version_as(s: &TestApiServer, name: &str) -> (Option<Vec<u8>>, String) {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(s.ca_pem().as_bytes()).expect("CA PEM");
    roots.add(ca).expect("add CA");
    // The process-wide default provider: ring, the only one compiled in.
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS as {name}: {e}"));
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() == Some(b"h2") {
        return (alpn, String::new());
    }
    tls.write_all(b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    tls.read_to_string(&mut response).await.expect("read");
    (
        alpn,
        response.lines().next().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_speaks_only_https_with_a_certificate_for_every_name_a_client_dials() {
    let s = server().await;
    assert_eq!(s.url(), format!("https://127.0.0.1:{}", s.port()));
    for name in SERVING_NAMES {
        // Offering h2 negotiates h2: the certificate is valid for this name.
        let (alpn, _) = get_version_as(&s, name).await;
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN as {name}");
    }

    // A plain-HTTP request gets no answer an HTTP client could use.
    let mut tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "plain HTTP must not be served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_ca_is_refused_and_kubectl_says_the_authority_is_unknown() {
    let s = server().await;
    let mut cfg = config_of(&s.kubeconfig_path).await;
    cfg.root_cert = None;
    let client = kube::Client::try_from(cfg).expect("client");
    let err = client
        .apiserver_version()
        .await
        .expect_err("a client that does not trust the CA must fail");
    let text = format!("{err:?}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("certificate"),
        "{text}"
    );

    let kc = std::fs::read_to_string(&s.kubeconfig_path).expect("kubeconfig");
    let without_ca: String = kc
        .lines()
        .filter(|l| !l.contains("certificate-authority-data"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = file(&s, "kubeconfig-no-ca", &without_ca);
    let (ok, _, err) = kubectl_with(&s, std::path::Path::new(&path), &["get", "ns"]);
    assert!(!ok);
    assert!(
        err.contains("certificate signed by unknown authority"),
        "{err}"
    );
    // With the CA it works.
    let (ok, out, err) = kubectl_with(&s, &s.kubeconfig_path, &["get", "ns", "-o", "name"]);
    assert!(ok && out.contains("namespace/kube-system"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_gets_401_unauthorized_as_from_kube_apiserver() {
    let s = server().await;
    let path = kubeconfig_with_token(&s, "kubeconfig-wrong", "not-a-token");
    let client = kube::Client::try_from(config_of(&path).await).expect("client");
    let status = api_error(
        Api::<Pod>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(status.code, 401);
    assert_eq!(status.reason, "Unauthorized");
    assert_eq!(status.message, "Unauthorized");
    // Even the otherwise public /version is refused: the credential is wrong, not missing.
    assert!(client.apiserver_version().await.is_err());

    let (ok, _, err) = kubectl_with(&s, &path, &["get", "pods"]);
    assert!(!ok);
    assert!(err.contains("You must be logged in to the server"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_version_and_health_are_open_and_listing_pods_is_forbidden() {
    let s = server().await;
    let mut cfg = config_of(&s.kubeconfig_path).await;
    cfg.auth_info = Default::default();
    let anonymous = kube::Client::try_from(cfg).expect("client");
    let version = anonymous
        .apiserver_version()
        .await
        .expect("/version is public");
    assert_eq!(version.minor, "37");
    for path in ["/healthz", "/readyz", "/livez"] {
        let body = anonymous
            .request_text(http::Request::get(path).body(Vec::new()).expect("request"))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(body, "ok");
    }
    let status = api_error(
        Api::<Pod>::namespaced(anonymous.clone(), "default")
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(status.code, 403);
    assert_eq!(
        status.message,
        "pods is forbidden: User \"system:anonymous\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    let status = api_error(anonymous.list_api_groups().await);
    assert_eq!(status.code, 403);
    assert_eq!(
        status.message,
        "forbidden: User \"system:anonymous\" cannot get path \"/apis\""
    );
}

/// Installs the shipped manifests and returns the agent's kubeconfig.
fn install_manifests_and_agent_kubeconfig(s: &TestApiServer) -> std::path::PathBuf {
    kubectl_ok(s, &["apply", "-k", "manifests/"]);
    s.kubeconfig_for(AGENT_NS, AGENT).expect("agent kubeconfig")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i_as_the_agent_shows_exactly_what_the_shipped_rbac_allows() {
    let s = server().await;
    let agent = install_manifests_and_agent_kubeconfig(&s);
    let cases: &[(&[&str], &str)] = &[
        (&["watch", "nodeenrollments.meshlet.io"], "yes"),
        (&["list", "nodeenrollments.meshlet.io"], "yes"),
        (
            &[
                "patch",
                "nodeenrollments.meshlet.io/worker-1",
                "--subresource=status",
            ],
            "yes",
        ),
        (
            &[
                "update",
                "nodeenrollments.meshlet.io",
                "--subresource=finalizers",
            ],
            "yes",
        ),
        (&["get", "secret/meshlet-ipsec-key", "-n", AGENT_NS], "yes"),
        (&["watch", "meshconfigs.meshlet.io"], "yes"),
        (&["list", "endpointslices.discovery.k8s.io", "-A"], "yes"),
        (&["get", "nodes"], "yes"),
        (&["get", "/version"], "yes"),
        (&["get", "/apis"], "yes"),
        (
            &["create", "selfsubjectaccessreviews.authorization.k8s.io"],
            "yes",
        ),
        (&["delete", "nodeenrollments.meshlet.io"], "no"),
        (&["create", "nodeenrollments.meshlet.io"], "no"),
        (
            &["get", "nodeenrollments.meshlet.io", "--subresource=status"],
            "no",
        ),
        (&["patch", "meshconfigs.meshlet.io"], "no"),
        (&["list", "secrets", "-n", AGENT_NS], "no"),
        (&["get", "secret/some-other-secret", "-n", AGENT_NS], "no"),
        (&["get", "secret/meshlet-ipsec-key", "-n", "default"], "no"),
        (&["delete", "pods", "-n", AGENT_NS], "no"),
        (&["create", "daemonsets.apps", "-n", AGENT_NS], "no"),
        (
            &["create", "subjectaccessreviews.authorization.k8s.io"],
            "no",
        ),
        (&["get", "/metrics"], "no"),
    ];
    for (args, want) in cases {
        let mut full = vec!["auth", "can-i"];
        full.extend_from_slice(args);
        let (ok, out, err) = kubectl_with(&s, &agent, &full);
        // A denial reads `no - RBAC: no rule allows ...` (see the README's deviations).
        assert_eq!(
            out.split_whitespace().next().unwrap_or_default(),
            *want,
            "kubectl auth can-i {}: {err}",
            args.join(" ")
        );
        assert_eq!(ok, *want == "yes", "exit code of can-i {}", args.join(" "));
    }

    // The administrator asks on the agent's behalf: the same answers through impersonation.
    let (ok, out, _) = kubectl_with(
        &s,
        &s.kubeconfig_path,
        &[
            "auth",
            "can-i",
            "list",
            "secrets",
            "-n",
            AGENT_NS,
            "--as",
            "system:serviceaccount:meshlet-system:meshlet-agent",
        ],
    );
    assert!(!ok);
    assert!(
        out.starts_with("no - RBAC: no rule allows User \"system:serviceaccount:meshlet-system:meshlet-agent\" to list resource \"secrets\""),
        "{out}"
    );
    // The agent itself may not impersonate anyone.
    let (ok, _, err) = kubectl_with(&s, &agent, &["get", "nodes", "--as", "meshlet-test-admin"]);
    assert!(!ok);
    assert!(
        err.contains("User \"system:serviceaccount:meshlet-system:meshlet-agent\" cannot impersonate resource \"users\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i_list_shows_the_agents_rules_and_nothing_else() {
    let s = server().await;
    let agent = install_manifests_and_agent_kubeconfig(&s);
    let (ok, out, err) = kubectl_with(&s, &agent, &["auth", "can-i", "--list", "-n", AGENT_NS]);
    assert!(ok, "{err}");
    let row = |resource: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(resource))
            .unwrap_or_else(|| panic!("no row for {resource}:\n{out}"))
            .to_string()
    };
    assert!(
        row("nodeenrollments.meshlet.io").contains("[get list watch patch]"),
        "{out}"
    );
    assert!(
        row("nodeenrollments.meshlet.io/status").contains("[patch update]"),
        "{out}"
    );
    assert!(row("secrets").contains("[meshlet-ipsec-key]"), "{out}");
    assert!(
        row("selfsubjectaccessreviews.authorization.k8s.io").contains("[create]"),
        "{out}"
    );
    assert!(!out.contains("daemonsets"), "{out}");
    assert!(!out.contains("pods"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_whoami_shows_the_service_account_and_a_bound_tokens_node() {
    let s = server().await;
    let agent = install_manifests_and_agent_kubeconfig(&s);
    let (ok, out, err) = kubectl_with(&s, &agent, &["auth", "whoami"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("system:serviceaccount:meshlet-system:meshlet-agent"),
        "{out}"
    );
    assert!(
        out.contains("system:serviceaccounts:meshlet-system"),
        "{out}"
    );

    let admin = s.client().await.expect("admin");
    let pods: Api<Pod> = Api::namespaced(admin, AGENT_NS);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "meshlet-agent-x1"},
        "spec": {"nodeName": "node-1", "serviceAccountName": AGENT,
                 "containers": [{"name": "agent", "image": "meshlet-agent:0.1.0"}]}}))
    .expect("pod");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let uid = pod.metadata.uid.clone().expect("uid");
    let token = s.token_for_pod(AGENT_NS, AGENT, "meshlet-agent-x1", &uid, "node-1");
    let bound = kubeconfig_with_token(&s, "kubeconfig-bound", &token);
    let (ok, out, err) = kubectl_with(&s, &bound, &["auth", "whoami", "-o", "json"]);
    assert!(ok, "{err}");
    let review: Value = serde_json::from_str(&out).expect("json");
    let info = &review["status"]["userInfo"];
    assert_eq!(
        info["username"],
        "system:serviceaccount:meshlet-system:meshlet-agent"
    );
    assert_eq!(
        info["extra"]["authentication.kubernetes.io/node-name"],
        json!(["node-1"])
    );
    assert_eq!(
        info["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["meshlet-agent-x1"])
    );
    assert_eq!(
        info["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([uid])
    );
    let (_, table, _) = kubectl_with(&s, &bound, &["auth", "whoami"]);
    assert!(
        table.lines().any(|l| l.contains("authentication.kubernetes.io/node-name") && l.contains("[node-1]")),
        "{table}"
    );

    // The token dies with its Pod.
    pods.delete("meshlet-agent-x1", &Default::default())
        .await
        .expect("delete pod");
    let (ok, _, err) = kubectl_with(&s, &bound, &["auth", "whoami"]);
    assert!(!ok);
    assert!(err.contains("Unauthorized"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_access_review_for_a_nonexistent_user_is_denied_with_a_reason() {
    let s = server().await;
    let agent = install_manifests_and_agent_kubeconfig(&s);
    let sar = |user: &str| {
        format!(
            "apiVersion: authorization.k8s.io/v1\nkind: SubjectAccessReview\nspec:\n  user: {user}\n  resourceAttributes:\n    verb: watch\n    group: meshlet.io\n    resource: nodeenrollments\n"
        )
    };
    let ghost = file(&s, "sar-ghost.yaml", &sar("ghost"));
    let out = kubectl_ok(&s, &["create", "-f", &ghost, "-o", "json"]);
    let review: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(review["status"]["allowed"], false, "{review}");
    let reason = review["status"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("User \"ghost\""), "{reason}");
    assert!(
        reason.contains("watch resource \"nodeenrollments\""),
        "{reason}"
    );

    let agent_sar = file(
        &s,
        "sar-agent.yaml",
        &sar("system:serviceaccount:meshlet-system:meshlet-agent"),
    );
    let out = kubectl_ok(&s, &["create", "-f", &agent_sar, "-o", "json"]);
    let review: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(review["status"]["allowed"], true, "{review}");
    assert_eq!(
        review["status"]["reason"],
        "RBAC: allowed by ClusterRoleBinding \"meshlet-agent\" of ClusterRole \"meshlet-agent\" to ServiceAccount \"meshlet-agent/meshlet-system\""
    );

    // Asking about others needs RBAC create on subjectaccessreviews, which the agent lacks.
    let (ok, _, err) = kubectl_with(&s, &agent, &["create", "-f", &ghost]);
    assert!(!ok);
    assert!(
        err.contains(
            "cannot create resource \"subjectaccessreviews\" in API group \"authorization.k8s.io\""
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_review_of_a_bound_token_shows_its_pod_and_node() {
    let s = server().await;
    install_manifests_and_agent_kubeconfig(&s);
    let admin = s.client().await.expect("admin");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "agent-1"},
        "spec": {"nodeName": "node-2", "containers": [{"name": "a", "image": "x"}]}}))
    .expect("pod");
    let pod = Api::<Pod>::namespaced(admin.clone(), AGENT_NS)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let uid = pod.metadata.uid.clone().expect("uid");
    let token = s.token_for_pod(AGENT_NS, AGENT, "agent-1", &uid, "node-2");
    let reviews: Api<TokenReview> = Api::all(admin);
    let review = |token: String| TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: None,
        },
        ..Default::default()
    };
    let answer = reviews
        .create(&PostParams::default(), &review(token))
        .await
        .expect("token review");
    let status = answer.status.expect("status");
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.expect("user");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:meshlet-system:meshlet-agent")
    );
    assert!(
        user.uid.is_some_and(|u| !u.is_empty()),
        "the ServiceAccount's uid"
    );
    let extra = user.extra.expect("extra");
    assert_eq!(extra["authentication.kubernetes.io/node-name"], ["node-2"]);
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["agent-1"]);
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], [uid]);

    let answer = reviews
        .create(&PostParams::default(), &review("forged".into()))
        .await
        .expect("token review");
    let status = answer.status.expect("status");
    assert_eq!(status.authenticated, Some(false));
    assert!(status.error.is_some_and(|e| !e.is_empty()));
}
