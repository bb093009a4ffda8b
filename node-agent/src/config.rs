//! Command-line flags of `meshlet-agent` and their translation into a [`DataplaneConfig`].
//!
//! ```text
//!  argv ─► clap (Cli) ─► AgentConfig ─┬─► DataplaneConfig (loader)
//!                                     ├─► sources (standalone file path, --kubernetes)
//!                                     └─► admin socket / metrics address
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::dataplane::DataplaneConfig;

/// The newest map layout this build writes; the default of `--dataplane-layout`.
pub const NEWEST_LAYOUT: u32 = 2;

/// `meshlet-agent`: the Meshlet per-node data-plane agent.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshlet-agent", version, about)]
pub struct Cli {
    /// What to do (default: `run`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags shared by every subcommand.
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// Subcommands of `meshlet-agent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Load or adopt the data plane and keep it in sync with the sources (the default).
    Run,
    /// Dry run of the start-up decision: exits non-zero with the reason when this binary
    /// cannot adopt the pinned state.
    Preflight,
    /// Detach every program and unpin every map and link (tears the data plane down).
    Reset,
    /// Run only IPsec from the `ipsec:` section of the --standalone file (no eBPF data plane).
    Ipsec,
}

/// Flags of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AgentArgs {
    /// bpffs directory holding the pinned maps, links and meta of this agent.
    #[arg(
        long,
        env = "MESHLET_BPFFS_ROOT",
        default_value = "/sys/fs/bpf/meshlet",
        global = true
    )]
    pub bpffs_root: PathBuf,
    /// cgroup v2 directory the socket programs attach to.
    #[arg(
        long,
        env = "MESHLET_CGROUP",
        default_value = "/sys/fs/cgroup/unified",
        global = true
    )]
    pub cgroup: PathBuf,
    /// Map layout to write (1 or 2). Tests and rollbacks select the older one.
    #[arg(long, env = "MESHLET_DATAPLANE_LAYOUT", default_value_t = NEWEST_LAYOUT,
          value_parser = clap::value_parser!(u32).range(1..=2), global = true)]
    pub dataplane_layout: u32,
    /// Number of services (VIP:port/protocol) the maps hold.
    #[arg(
        long,
        env = "MESHLET_MAX_SERVICES",
        default_value_t = 5_000,
        global = true
    )]
    pub max_services: u32,
    /// Number of endpoints (backends summed over services) the maps hold.
    #[arg(
        long,
        env = "MESHLET_MAX_ENDPOINTS",
        default_value_t = 100_000,
        global = true
    )]
    pub max_endpoints: u32,
    /// Standalone source: a YAML file of services and endpoints (see examples/standalone).
    #[arg(long, env = "MESHLET_STANDALONE", global = true)]
    pub standalone: Option<PathBuf>,
    /// How often the standalone file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 250, global = true)]
    pub standalone_poll_ms: u64,
    /// Unix socket of the admin gRPC API (created with mode 0600).
    #[arg(
        long,
        env = "MESHLET_ADMIN_SOCKET",
        default_value = "/run/meshlet/agent.sock",
        global = true
    )]
    pub admin_socket: PathBuf,
    /// Address of the HTTP server for /healthz, /readyz and /metrics; none when absent.
    #[arg(long, env = "MESHLET_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// Node lock file: one agent per bpffs root.
    #[arg(
        long,
        env = "MESHLET_LOCK_FILE",
        default_value = "/run/meshlet/agent.lock",
        global = true
    )]
    pub lock_file: PathBuf,
    /// Name of this node (reported in status).
    #[arg(long, env = "NODE_NAME", default_value = "local", global = true)]
    pub node_name: String,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace` or a tracing directive).
    #[arg(long, env = "MESHLET_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "MESHLET_LOG_JSON", global = true)]
    pub log_json: bool,
    /// Kubernetes source: watch this node's NodeEnrollment, Services and EndpointSlices (kube
    /// client from `KUBECONFIG` or in-cluster) and write the NodeEnrollment status. The data
    /// plane is loaded only once the NodeEnrollment exists and is not draining; pinned state is
    /// adopted at once.
    #[arg(long, env = "MESHLET_KUBERNETES", global = true)]
    pub kubernetes: bool,
    /// Version this agent reports in `NodeEnrollment.status.agentVersion`.
    #[arg(long, env = "MESHLET_AGENT_VERSION", default_value = env!("CARGO_PKG_VERSION"), global = true)]
    pub agent_version: String,
    /// OTLP/gRPC endpoint (e.g. `http://collector:4317`) receiving one trace span per sync;
    /// no traces when absent.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Kubernetes source: events within this many milliseconds are folded into one snapshot.
    #[arg(long, default_value_t = 50, global = true)]
    pub kube_debounce_ms: u64,
}

impl AgentArgs {
    /// The loader configuration these flags select.
    pub fn dataplane(&self) -> DataplaneConfig {
        DataplaneConfig {
            bpffs_root: self.bpffs_root.clone(),
            cgroup: self.cgroup.clone(),
            layout: self.dataplane_layout,
            max_services: self.max_services,
            max_endpoints: self.max_endpoints,
            lock_path: self.lock_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_select_the_newest_layout_and_documented_paths() {
        let cli = Cli::try_parse_from(["meshlet-agent"]).expect("parse");
        assert_eq!(cli.command, None);
        let dp = cli.agent.dataplane();
        assert_eq!(dp.layout, NEWEST_LAYOUT);
        assert_eq!(dp.bpffs_root, PathBuf::from("/sys/fs/bpf/meshlet"));
        assert_eq!(dp.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(
            cli.agent.admin_socket,
            PathBuf::from("/run/meshlet/agent.sock")
        );
    }

    #[test]
    fn flags_after_a_subcommand_are_accepted() {
        let cli = Cli::try_parse_from(["meshlet-agent", "preflight", "--dataplane-layout", "1"])
            .expect("parse");
        assert_eq!(cli.command, Some(Command::Preflight));
        assert_eq!(cli.agent.dataplane_layout, 1);
    }

    #[test]
    fn kubernetes_mode_reports_the_crate_version_unless_told_otherwise() {
        let cli = Cli::try_parse_from(["meshlet-agent", "run", "--kubernetes"]).expect("parse");
        assert!(cli.agent.kubernetes);
        assert_eq!(cli.agent.agent_version, env!("CARGO_PKG_VERSION"));
        let cli =
            Cli::try_parse_from(["meshlet-agent", "--agent-version", "1.2.3"]).expect("parse");
        assert!(!cli.agent.kubernetes);
        assert_eq!(cli.agent.agent_version, "1.2.3");
    }

    #[test]
    fn a_layout_this_build_does_not_write_is_refused() {
        let err = Cli::try_parse_from(["meshlet-agent", "--dataplane-layout", "3"])
            .expect_err("layout 3 must be refused");
        assert!(err.to_string().contains("3"), "{err}");
    }
}
