//! `meshlet-local-cluster`: runs a local multi-node TEST cluster in the foreground.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshlet_local_cluster::{ClusterOptions, ImageTable, LocalCluster, default_images};

/// A local multi-node TEST cluster for Meshlet on this machine: an in-memory API test server,
/// simulated nodes, and a simulated kubelet running pods as real processes (the agent, the
/// operator). It is for tests, demos and development only. Production means a real
/// Kubernetes cluster.
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
    /// Image mapping `REF=[NAME=VALUE ...] PROGRAM [ARGS ...]`; repeatable; added to (and
    /// overriding) the default table.
    #[arg(long = "image")]
    images: Vec<String>,
    /// Do not install the default image table (agent v1/v2/v0.1.0/broken, operator v0.1.0).
    #[arg(long)]
    no_default_images: bool,
    /// Directory holding the meshlet-agent and meshlet-operator binaries of the default
    /// table (default: the directory of this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Label put on every node, `KEY=VALUE`; repeatable.
    #[arg(long = "node-label")]
    node_labels: Vec<String>,
    /// API server port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Cluster name used in the cgroup and bpffs paths.
    #[arg(long, default_value = "default")]
    id: String,
    /// Where the agents keep IPsec xfrm state: `recording` (default; a JSON file per node,
    /// `DIR/node-i/xfrm.json`, because the host kernel has no ESP) or `kernel` (the running
    /// kernel's xfrm, which needs CONFIG_INET_ESP).
    #[arg(long, value_enum, default_value_t = XfrmMode::Recording)]
    xfrm: XfrmMode,
    /// Extra environment of every container on every node, `NAME=VALUE`; repeatable.
    #[arg(long = "node-env")]
    node_env: Vec<String>,
}

/// Where the agents of the local cluster keep IPsec xfrm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum XfrmMode {
    /// A JSON file per node (`MESHLET_IPSEC_XFRM=recording:DIR/node-i/xfrm.json`).
    Recording,
    /// The running kernel.
    Kernel,
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
    let mut images = if args.no_default_images {
        ImageTable::new()
    } else {
        let bin_dir = args
            .bin_dir
            .clone()
            .or_else(meshlet_local_cluster::current_bin_dir)
            .context("cannot tell the directory of this binary; pass --bin-dir")?;
        default_images(&bin_dir)
    };
    for i in &args.images {
        images.insert_arg(i)?;
    }
    let mut node_labels = BTreeMap::new();
    for l in &args.node_labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--node-label must be KEY=VALUE, got {l:?}"))?;
        node_labels.insert(k.to_string(), v.to_string());
    }
    let mut node_env = BTreeMap::new();
    for e in &args.node_env {
        let (k, v) = e
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .with_context(|| format!("--node-env must be NAME=VALUE, got {e:?}"))?;
        node_env.insert(k.to_string(), v.to_string());
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("failed to create --dir {}", args.dir.display()))?;
    let ready = args.dir.join("ready");
    let _ = std::fs::remove_file(&ready);
    let t0 = std::time::Instant::now();
    let cluster = LocalCluster::start(ClusterOptions {
        nodes: args.nodes,
        node_labels,
        images: images.clone(),
        dir: Some(args.dir.clone()),
        cluster_id: Some(args.id.clone()),
        api_port: args.port,
        node_env,
        xfrm_recording: args.xfrm == XfrmMode::Recording,
        ..ClusterOptions::default()
    })
    .await?;
    let state = format!(
        "CGROUP_BASE={}\nBPFFS_BASE={}\nAPI={}\n",
        cluster.cgroup_base().display(),
        cluster.bpffs_base().display(),
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
            "  {}  {}  cgroup {}  bpffs {}",
            n.name,
            n.address,
            n.cgroup.display(),
            n.bpffs_root.display()
        );
    }
    match args.xfrm {
        XfrmMode::Recording => println!(
            "  IPsec: agents record xfrm state in {}/<node>/{} instead of the kernel \
             (this host kernel has no ESP; --xfrm kernel to use the kernel)",
            args.dir.display(),
            meshlet_local_cluster::xfrm::FILE_NAME
        ),
        XfrmMode::Kernel => println!("  IPsec: agents use the running kernel's xfrm"),
    }
    for (image, cmd) in images.iter() {
        println!("  image {image} -> {}", cmd.program.display());
    }
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
