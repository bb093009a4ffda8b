//! Fixtures of the agent's Kubernetes-mode tests: the API test server with Meshlet's CRDs and
//! the shipped agent RBAC, builders for Services, EndpointSlices and NodeEnrollments, and a
//! real `meshlet-agent run --kubernetes` bound to the agent ServiceAccount (so RBAC applies).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use meshlet_crds::names::{AGENT_NAME, DATAPLANE_FINALIZER, NAMESPACE};
use meshlet_crds::v1alpha1::{NodeEnrollment, NodeEnrollmentStatus};
use meshlet_test_apiserver::{ServerOptions, TestApiServer};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

use crate::agent_support::{AGENT, AgentEnv};

/// Version the agents of these tests report.
pub const VERSION: &str = "9.9.9-test";

/// A test server with CRDs, the agent namespace, ServiceAccount and shipped RBAC.
pub struct Cluster {
    /// The server.
    pub server: TestApiServer,
    /// Administrator client.
    pub admin: Client,
    /// Kubeconfig carrying the agent ServiceAccount's token.
    pub agent_kubeconfig: PathBuf,
}

fn manifest<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/rbac")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read RBAC manifest");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

impl Cluster {
    /// Start the server and install what the agent needs, as the administrator.
    pub async fn start() -> Self {
        let server = TestApiServer::start(ServerOptions {
            install_meshlet_crds: true,
            ..ServerOptions::default()
        })
        .await
        .expect("start API test server");
        let admin = server.client().await.expect("admin client");
        let pp = PostParams::default();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(admin.clone())
            .create(&pp, &ns)
            .await
            .expect("create namespace");
        let sa: ServiceAccount = manifest("agent-serviceaccount.yaml");
        Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE)
            .create(&pp, &sa)
            .await
            .expect("create agent ServiceAccount");
        let cr: ClusterRole = manifest("agent-clusterrole.yaml");
        Api::<ClusterRole>::all(admin.clone())
            .create(&pp, &cr)
            .await
            .expect("create ClusterRole");
        let crb: ClusterRoleBinding = manifest("agent-clusterrolebinding.yaml");
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&pp, &crb)
            .await
            .expect("create ClusterRoleBinding");
        let role: Role = manifest("agent-role.yaml");
        Api::<Role>::namespaced(admin.clone(), NAMESPACE)
            .create(&pp, &role)
            .await
            .expect("create Role");
        let rb: RoleBinding = manifest("agent-rolebinding.yaml");
        Api::<RoleBinding>::namespaced(admin.clone(), NAMESPACE)
            .create(&pp, &rb)
            .await
            .expect("create RoleBinding");
        let agent_kubeconfig = server
            .kubeconfig_for(NAMESPACE, AGENT_NAME)
            .expect("agent kubeconfig");
        Self {
            server,
            admin,
            agent_kubeconfig,
        }
    }

    /// NodeEnrollments.
    pub fn enrollments(&self) -> Api<NodeEnrollment> {
        Api::all(self.admin.clone())
    }

    /// Services of `default`.
    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.admin.clone(), "default")
    }

    /// EndpointSlices of `default`.
    pub fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.admin.clone(), "default")
    }

    /// Enroll `node` the way the operator does (with the data-plane finalizer).
    pub async fn enroll(&self, node: &str) {
        let mut ne = NodeEnrollment::test(node);
        ne.metadata.finalizers = Some(vec![DATAPLANE_FINALIZER.into()]);
        self.enrollments()
            .create(&PostParams::default(), &ne)
            .await
            .expect("create NodeEnrollment");
    }

    /// Poll the NodeEnrollment `node` until `pred` holds on it (or on its absence); 30 s max.
    pub async fn wait_enrollment(
        &self,
        node: &str,
        what: &str,
        env: &AgentEnv,
        pred: impl Fn(Option<&NodeEnrollment>) -> bool,
    ) -> Option<NodeEnrollment> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ne = self
                .enrollments()
                .get_opt(node)
                .await
                .expect("get enrollment");
            if pred(ne.as_ref()) {
                return ne;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; NodeEnrollment: {}\nagent log:\n{}",
                serde_json::to_string_pretty(&ne).unwrap_or_default(),
                env.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A ClusterIP Service in `default` with one named TCP port.
pub fn service(name: &str, cluster_ip: &str, port_name: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(vec![ServicePort {
                name: Some(port_name.into()),
                port,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// An EndpointSlice of `service` with one port and `(address, ready)` endpoints.
pub fn slice(
    name: &str,
    service: &str,
    address_type: &str,
    port_name: &str,
    port: i32,
    endpoints: &[(&str, bool)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(
                [(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![(*a).into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some(port_name.into()),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// Start `meshlet-agent run --kubernetes` for `node` with this test's paths, as the agent
/// ServiceAccount, logging JSON lines.
pub fn start_kube_agent(env: &mut AgentEnv, cluster: &Cluster, node: &str) {
    start_kube_agent_with(env, cluster, node, &[]);
}

/// [`start_kube_agent`] with extra environment variables.
pub fn start_kube_agent_with(
    env: &mut AgentEnv,
    cluster: &Cluster,
    node: &str,
    extra_env: &[(&str, String)],
) {
    assert!(env.agent.is_none(), "an agent is already running");
    // The shared flags minus the standalone source.
    let mut args = Vec::new();
    let mut it = env.agent_args(2).into_iter();
    while let Some(a) = it.next() {
        if a == "--standalone" || a == "--standalone-poll-ms" {
            it.next();
            continue;
        }
        args.push(a);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.log_path())
        .expect("open agent log");
    let child = Command::new(AGENT)
        .arg("run")
        .arg("--kubernetes")
        .arg("--log-json")
        .args(args)
        .env("KUBECONFIG", &cluster.agent_kubeconfig)
        .env("NODE_NAME", node)
        .env("MESHLET_AGENT_VERSION", VERSION)
        .env_remove("MESHLET_STANDALONE")
        // Never the host's xfrm: agents of concurrent tests share its network namespace.
        .env(
            "MESHLET_IPSEC_XFRM",
            format!("recording:{}", env.dir.path().join("xfrm.json").display()),
        )
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn meshlet-agent");
    env.agent = Some(child);
}

/// An OTLP/gRPC trace receiver on 127.0.0.1 collecting the names of the spans it is sent.
#[derive(Clone, Default)]
pub struct SpanReceiver {
    /// `(service.name, span name)` of every span received.
    pub spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::codegen::async_trait]
impl TraceService for SpanReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("receiver lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl SpanReceiver {
    /// Serve on an ephemeral port; returns the receiver and its `http://` endpoint.
    pub async fn start() -> (Self, String) {
        let receiver = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let addr = listener.local_addr().expect("receiver address");
        let svc = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (receiver, format!("http://{addr}"))
    }

    /// Spans received with this span name and service name.
    pub fn count(&self, service: &str, name: &str) -> usize {
        self.spans
            .lock()
            .expect("receiver lock")
            .iter()
            .filter(|(s, n)| s == service && n == name)
            .count()
    }
}

/// Wait until the agent log contains `needle` (20 s max).
pub async fn wait_log(env: &AgentEnv, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "agent never logged {needle:?}\n{}",
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of `ne`, or a panic naming what was expected.
pub fn status(ne: Option<&NodeEnrollment>) -> &NodeEnrollmentStatus {
    ne.and_then(|n| n.status.as_ref())
        .expect("NodeEnrollment with a status")
}

/// Whether condition `type_` of `ne` has `status` (and `reason`, when given).
pub fn condition(
    ne: Option<&NodeEnrollment>,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> bool {
    ne.and_then(|n| n.status.as_ref())
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
}

/// Link ids in the status, by program name.
pub fn status_links(ne: Option<&NodeEnrollment>) -> Vec<(String, i64)> {
    status(ne)
        .programs
        .iter()
        .map(|p| (p.name.clone(), p.link_id.unwrap_or(0)))
        .collect()
}
