//! `meshlet-operator` binary: parses flags, sets up logs, traces and the HTTP endpoints, and
//! runs the controllers under leader election.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;

/// Meshlet cluster operator.
#[derive(Parser, Debug)]
#[command(name = "meshlet-operator", version, about)]
struct Args {
    /// Address of the health and metrics HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "MESHLET_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Namespace of the leader lease, the agent DaemonSet and its pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = meshlet_crds::names::NAMESPACE)]
    namespace: String,
    /// This instance's identity in the leader election (the pod name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Default agent image (`image:tag`), logged for reference; the MeshConfig's
    /// `spec.agent.image` and `spec.agent.version` decide what runs.
    #[arg(long, env = "MESHLET_AGENT_IMAGE")]
    agent_image: Option<String>,
    /// OTLP/gRPC endpoint for traces (e.g. `http://otel-collector:4317`); none disables export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MESHLET_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Seconds a lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds between lease renewals of the leader.
    #[arg(long, default_value_t = 5)]
    renew_interval_seconds: u64,
    /// Seconds between attempts of a standby.
    #[arg(long, default_value_t = 2)]
    retry_interval_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(run(args))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let telemetry =
        meshlet_operator::telemetry::init(&args.log_level, args.otlp_endpoint.as_deref())
            .context("failed to set up logs and traces")?;
    let identity = match args.pod_name.clone() {
        Some(p) => p,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| format!("meshlet-operator-{}", std::process::id())),
    };
    tracing::info!(
        metrics_addr = %args.metrics_addr,
        namespace = %args.namespace,
        identity = %identity,
        agent_image = ?args.agent_image,
        otlp_endpoint = ?args.otlp_endpoint,
        field_manager = meshlet_operator::FIELD_MANAGER,
        "meshlet-operator starting"
    );
    let shared = Arc::new(meshlet_operator::Shared::default());
    let (addr, server) = meshlet_operator::http::bind(&args.metrics_addr, shared.clone())
        .await
        .context("failed to start the HTTP endpoints")?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let server = tokio::spawn(server);
    let client = kube::Client::try_default()
        .await
        .context("failed to create a Kubernetes client from KUBECONFIG or the in-cluster config")?;
    let mut settings = meshlet_operator::Settings::new(&args.namespace, &identity);
    settings.lease_duration = Duration::from_secs(args.lease_duration_seconds.max(1));
    settings.renew_interval = Duration::from_secs(args.renew_interval_seconds.max(1));
    settings.retry_interval = Duration::from_secs(args.retry_interval_seconds.max(1));
    let result = meshlet_operator::run(client, settings, shared, shutdown_signal()).await;
    server.abort();
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .context("trace shutdown panicked")?;
    result.context("the operator stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_flag_prints_meshlet_operator_and_the_crate_version() {
        let err = Args::try_parse_from(["meshlet-operator", "--version"]).expect_err("exits");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            err.to_string().trim(),
            format!("meshlet-operator {}", env!("CARGO_PKG_VERSION"))
        );
    }
}
