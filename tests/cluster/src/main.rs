//! `meshlet-local-cluster`: runs a local multi-node TEST cluster in the foreground.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshlet_local_cluster::{ClusterOptions, LocalCluster, default_images_dir};

/// A local multi-node TEST cluster for Meshlet on this machine: an in-memory API test server
/// (HTTPS), simulated nodes, and a simulated kubelet running pods from OCI images with runc
/// (the agent, the operator). It is for tests, demos and development only. Production means a
/// real Kubernetes cluster.
#[derive(Debug, Parser)]
#[command(name = "meshlet-local-cluster", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the cluster and run until SIGTERM/SIGINT; writes DIR/kubeconfig, then DIR/ready.
    Up(UpArgs),
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Number of simulated nodes (node-1 … node-N).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Directory for the kubeconfig, the ready marker, node run directories and logs.
    #[arg(long, default_value = "/tmp/meshlet-local")]
    dir: PathBuf,
    /// Directory of image archives built by `cargo xtask images` (default: target/images).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Label put on every node, `KEY=VALUE`; repeatable.
    #[arg(long = "node-label")]
    node_labels: Vec<String>,
    /// API server port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Cluster name used in the cgroup path.
    #[arg(long, default_value = "default")]
    id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cmd::Up(args) = Cli::parse().command;
    let images_dir = args.images_dir.clone().unwrap_or_else(default_images_dir);
    let mut node_labels = BTreeMap::new();
    for l in &args.node_labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--node-label must be KEY=VALUE, got {l:?}"))?;
        node_labels.insert(k.to_string(), v.to_string());
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("failed to create --dir {}", args.dir.display()))?;
    let ready = args.dir.join("ready");
    let _ = std::fs::remove_file(&ready);
    let t0 = std::time::Instant::now();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: args.nodes,
        node_labels,
        images_dir: Some(images_dir.clone()),
        dir: Some(args.dir.clone()),
        cluster_id: Some(args.id.clone()),
        api_port: args.port,
        ..ClusterOptions::default()
    })
    .await?;
    let state = format!(
        "CGROUP_BASE={}\nAPI={}\n",
        cluster.cgroup_base().display(),
        cluster.api_server().url()
    );
    std::fs::write(args.dir.join("cluster.env"), state).context("failed to write cluster.env")?;
    println!(
        "meshlet local TEST cluster (not a real cluster): {} nodes, API {} (started in {} ms)",
        args.nodes,
        cluster.api_server().url(),
        t0.elapsed().as_millis()
    );
    for n in cluster.nodes() {
        println!(
            "  {}  {}  root {}  cgroup {}",
            n.name,
            n.address,
            n.root.display(),
            n.cgroup.display()
        );
    }
    println!("  images from {}", images_dir.display());
    println!(
        "  IPsec: the v1/v2 agent images record xfrm state in each node's /run/meshlet/{} \
         (this host kernel has no ESP)",
        meshlet_local_cluster::xfrm::FILE_NAME
    );
    println!("export KUBECONFIG={}", cluster.kubeconfig_path().display());
    std::fs::write(&ready, "").context("failed to write the ready marker")?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(&ready);
    println!("stopping the local cluster");
    cluster.shutdown().await?;
    let _ = std::fs::remove_file(args.dir.join("cluster.env"));
    Ok(())
}
