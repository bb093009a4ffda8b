//! `meshlet-test-apiserver`: a Kubernetes API TEST server. Not for production.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshlet_test_apiserver::{ServerOptions, TestApiServer};

/// A Kubernetes API TEST server for Meshlet's end-to-end tests: in-memory, HTTPS on
/// 127.0.0.1 with a CA made at start (in the kubeconfigs it writes), no persistence. NOT a
/// real cluster and not for production.
#[derive(Debug, Parser)]
#[command(name = "meshlet-test-apiserver", version, about, long_about = None)]
struct Args {
    /// TCP port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Directory for the kubeconfig files (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Install Meshlet's CRDs at start.
    #[arg(long)]
    with_meshlet_crds: bool,
    /// Watch events kept; watches from older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 20_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
    /// Write ServiceAccount kubeconfigs, e.g. `--service-account meshlet-system/meshlet-operator`.
    #[arg(long = "service-account")]
    service_accounts: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let keep_dir = args.dir.clone();
    let server = TestApiServer::start(ServerOptions {
        port: args.port,
        dir: args.dir,
        history_limit: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)),
        install_meshlet_crds: args.with_meshlet_crds,
        ..ServerOptions::default()
    })
    .await?;
    println!(
        "meshlet TEST API server (not a real cluster) listening on {}",
        server.url()
    );
    println!("kubeconfig: {}", server.kubeconfig_path.display());
    for sa in &args.service_accounts {
        let (ns, name) = sa
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("--service-account must be NAMESPACE/NAME, got {sa}"))?;
        println!(
            "kubeconfig for {sa}: {}",
            server.kubeconfig_for(ns, name)?.display()
        );
    }
    if keep_dir.is_none() {
        println!("(temporary directory; removed on exit — pass --dir to keep it)");
    }
    tokio::signal::ctrl_c().await?;
    server.shutdown();
    Ok(())
}
