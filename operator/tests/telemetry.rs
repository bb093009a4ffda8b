//! Observability of a running operator: reconcile spans exported over OTLP/gRPC to a real
//! in-test receiver (tonic, the OTLP protos), and the `/metrics`, `/healthz`, `/readyz`
//! endpoints over HTTP.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use meshlet_crds::MeshConfig;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
};
use support::{Cluster, StandIn, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::codegen::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests
            .lock()
            .expect("receiver lock")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn string_attr(
    attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// A plain HTTP/1.1 GET; returns the status code and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_spans_reach_an_otlp_receiver_and_metrics_are_served() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp_addr = listener.local_addr().expect("addr");
    let svc = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let telemetry = meshlet_operator::telemetry::init("info", Some(&format!("http://{otlp_addr}")))
        .expect("telemetry");

    let cluster = Cluster::start().await;
    cluster.add_nodes(&["node-a", "node-b"], &[]).await;
    let _stand_in = StandIn::start(&cluster).await;
    let op = cluster.start_operator("op-0", 2.0).await;
    let (http_addr, server) = meshlet_operator::http::bind("127.0.0.1:0", op.shared.clone())
        .await
        .expect("bind metrics");
    tokio::spawn(server);
    cluster.apply_meshconfig(&MeshConfig::test()).await;
    cluster.wait_ready("0.1.0", 2, 30).await;

    let telemetry = Arc::new(telemetry);
    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.flush())
        .await
        .expect("flush");
    let span = eventually(20, "a reconcile span at the receiver", || async {
        let requests = receiver.requests.lock().expect("lock").clone();
        requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .find_map(|rs| {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| string_attr(&r.attributes, "service.name"));
                rs.scope_spans
                    .iter()
                    .flat_map(|s| &s.spans)
                    .find(|s| s.name == "reconcile")
                    .filter(|_| service.as_deref() == Some("meshlet-operator"))
                    .cloned()
            })
    })
    .await;
    assert_eq!(
        string_attr(&span.attributes, "meshconfig").as_deref(),
        Some("default")
    );
    assert_eq!(span.trace_id.len(), 16);
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    let (code, _) = get(http_addr, "/healthz").await;
    assert_eq!(code, 200);
    let (code, _) = get(http_addr, "/readyz").await;
    assert_eq!(code, 200);
    let wants = [
        "meshlet_operator_reconciles_total",
        "meshlet_operator_reconcile_duration_seconds_bucket",
        "meshlet_operator_nodes{state=\"updated\"} 2",
        "meshlet_operator_rollout_updated_nodes 2",
        "meshlet_operator_leader 1",
    ];
    // The gauges follow the reconcile after the one that wrote the Ready status.
    let metrics = eventually(20, "the rollout figures in /metrics", || async {
        let (code, metrics) = get(http_addr, "/metrics").await;
        assert_eq!(code, 200);
        wants.iter().all(|w| metrics.contains(w)).then_some(metrics)
    })
    .await;
    for want in wants {
        assert!(metrics.contains(want), "missing {want} in:\n{metrics}");
    }
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .expect("shutdown");
}
