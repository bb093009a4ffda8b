//! Command-line flags of `meshlet-agent` (and the node paths `meshletctl` shares) and their
//! translation into a [`DataplaneConfig`].
//!
//! ```text
//!  argv ─► clap (Cli) ─► AgentArgs ─┬─► NodePaths (bpffs root, cgroup?, socket, lock; also meshletctl)
//!                                   │     cgroup::resolve(cgroup?) ─► DataplaneConfig (loader)
//!                                   ├─► sources (standalone file path, --kubernetes)
//!                                   └─► metrics address, logs, traces
//! ```

use std::net::{IpAddr, SocketAddr};
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
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
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
    /// Mount a bpffs at PATH unless one is there already (needs CAP_SYS_ADMIN; the DaemonSet
    /// runs it in a privileged init container so the mount reaches the node).
    MountBpffs {
        /// Where bpffs must be mounted.
        #[arg(long, default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
}

/// Where an agent keeps its node-local state: one definition shared by `meshlet-agent` and
/// `meshletctl`, with defaults that are right inside the agent's container.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct NodePaths {
    /// bpffs directory holding the pinned maps, links and meta of this agent.
    #[arg(
        long,
        env = "MESHLET_BPFFS_ROOT",
        default_value = "/sys/fs/bpf/meshlet",
        global = true
    )]
    pub bpffs_root: PathBuf,
    /// cgroup v2 directory the socket programs attach to; when absent, the widest cgroup2
    /// mount of the node's hierarchy found in /proc/self/mountinfo (in a container: the
    /// host's /sys/fs/cgroup mounted as a hostPath volume).
    #[arg(long, env = "MESHLET_CGROUP", global = true)]
    pub cgroup: Option<PathBuf>,
    /// Unix socket of the agent's admin gRPC API (created with mode 0600).
    #[arg(
        long,
        visible_alias = "socket",
        env = "MESHLET_ADMIN_SOCKET",
        default_value = "/run/meshlet/agent.sock",
        global = true
    )]
    pub admin_socket: PathBuf,
    /// Node lock file: one agent per bpffs root.
    #[arg(
        long,
        env = "MESHLET_LOCK_FILE",
        default_value = "/run/meshlet/agent.lock",
        global = true
    )]
    pub lock_file: PathBuf,
}

impl NodePaths {
    /// The loader configuration for these paths, attaching at `cgroup`, with the newest
    /// layout and no capacity (enough for preflight and reset).
    pub fn dataplane(&self, cgroup: PathBuf) -> DataplaneConfig {
        DataplaneConfig {
            bpffs_root: self.bpffs_root.clone(),
            cgroup,
            layout: NEWEST_LAYOUT,
            max_services: 0,
            max_endpoints: 0,
            lock_path: self.lock_file.clone(),
        }
    }

    /// The configuration of a reset: it detaches through the pinned links and never opens
    /// the cgroup, so it works where the cgroup cannot be found.
    pub fn reset_config(&self) -> DataplaneConfig {
        self.dataplane(self.cgroup.clone().unwrap_or_default())
    }
}

/// Flags of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AgentArgs {
    /// bpffs root, cgroup, admin socket and node lock.
    #[command(flatten)]
    pub paths: NodePaths,
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
    /// Address of the HTTP server for /healthz, /readyz and /metrics; none when absent. With
    /// host networking give the node's own address (`$(HOST_IP):9090`), so agents sharing a
    /// network namespace do not collide.
    #[arg(long, env = "MESHLET_METRICS_ADDR", value_parser = parse_listen_addr, global = true)]
    pub metrics_addr: Option<SocketAddr>,
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

/// A listen address that is neither `IPv4:PORT` nor `[IPv6]:PORT` nor `IPv6:PORT`.
#[derive(Debug, thiserror::Error)]
#[error(
    "failed to parse listen address {given:?}: expected ADDRESS:PORT, e.g. 10.0.0.5:9090, [fd00::5]:9090 or fd00::5:9090"
)]
pub struct ParseListenAddrError {
    /// The value given.
    pub given: String,
}

/// Parses `ADDRESS:PORT`, also with an unbracketed IPv6 address: `$(HOST_IP):9090` expands
/// to `fd00::5:9090` on an IPv6 node, where the last colon separates the port.
pub fn parse_listen_addr(given: &str) -> Result<SocketAddr, ParseListenAddrError> {
    if let Ok(addr) = given.parse() {
        return Ok(addr);
    }
    let error = || ParseListenAddrError {
        given: given.to_string(),
    };
    let (ip, port) = given.rsplit_once(':').ok_or_else(error)?;
    let ip: IpAddr = ip.parse().map_err(|_| error())?;
    let port: u16 = port.parse().map_err(|_| error())?;
    Ok(SocketAddr::new(ip, port))
}

impl AgentArgs {
    /// The loader configuration these flags select, attaching at `cgroup` (see
    /// [`crate::cgroup::resolve`]).
    pub fn dataplane(&self, cgroup: PathBuf) -> DataplaneConfig {
        DataplaneConfig {
            layout: self.dataplane_layout,
            max_services: self.max_services,
            max_endpoints: self.max_endpoints,
            ..self.paths.dataplane(cgroup)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_select_the_newest_layout_and_the_paths_of_the_agent_container() {
        let cli = Cli::try_parse_from(["meshlet-agent"]).expect("parse");
        assert_eq!(cli.command, None);
        assert_eq!(
            cli.agent.paths.cgroup, None,
            "the cgroup is found, not assumed"
        );
        let dp = cli.agent.dataplane(PathBuf::from("/host/sys/fs/cgroup"));
        assert_eq!(dp.layout, NEWEST_LAYOUT);
        assert_eq!(dp.bpffs_root, PathBuf::from("/sys/fs/bpf/meshlet"));
        assert_eq!(dp.cgroup, PathBuf::from("/host/sys/fs/cgroup"));
        assert_eq!(dp.lock_path, PathBuf::from("/run/meshlet/agent.lock"));
        assert_eq!(
            cli.agent.paths.admin_socket,
            PathBuf::from("/run/meshlet/agent.sock")
        );
    }

    #[test]
    fn a_given_cgroup_is_kept_and_a_reset_needs_none() {
        let cli = Cli::try_parse_from(["meshlet-agent", "reset", "--cgroup", "/sys/fs/cgroup/x"])
            .expect("parse");
        assert_eq!(cli.command, Some(Command::Reset));
        assert_eq!(
            cli.agent.paths.reset_config().cgroup,
            PathBuf::from("/sys/fs/cgroup/x")
        );
    }

    #[test]
    fn the_metrics_address_takes_the_node_ip_of_either_family() {
        for (given, want) in [
            ("10.0.0.5:9090", "10.0.0.5:9090"),
            ("[fd00::5]:9090", "[fd00::5]:9090"),
            ("fd00::5:9090", "[fd00::5]:9090"),
        ] {
            let cli = Cli::try_parse_from(["meshlet-agent", "--metrics-addr", given])
                .unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(
                cli.agent.metrics_addr,
                Some(want.parse().expect("address")),
                "{given}"
            );
        }
        for bad in ["$(HOST_IP):9090", "10.0.0.5", "10.0.0.5:http", ":9090"] {
            let err = parse_listen_addr(bad).expect_err(bad);
            assert!(err.to_string().contains("ADDRESS:PORT"), "{err}");
        }
    }

    #[test]
    fn mount_bpffs_defaults_to_sys_fs_bpf() {
        let cli = Cli::try_parse_from(["meshlet-agent", "mount-bpffs"]).expect("parse");
        assert_eq!(
            cli.command,
            Some(Command::MountBpffs {
                path: PathBuf::from("/sys/fs/bpf")
            })
        );
        let cli = Cli::try_parse_from(["meshlet-agent", "mount-bpffs", "--path", "/mnt/bpf"])
            .expect("parse");
        assert_eq!(
            cli.command,
            Some(Command::MountBpffs {
                path: PathBuf::from("/mnt/bpf")
            })
        );
    }

    #[test]
    fn the_version_flag_prints_the_binary_name_and_crate_version() {
        let err = Cli::try_parse_from(["meshlet-agent", "--version"]).expect_err("exits");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            err.to_string().trim(),
            format!("meshlet-agent {}", env!("CARGO_PKG_VERSION"))
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
