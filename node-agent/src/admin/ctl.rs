//! `meshletctl`: the admin CLI. Talks to the local agent over its unix socket; `preflight` and
//! `reset` run directly against bpffs when no agent answers.
//!
//! ```text
//!  meshletctl status|maps|preflight|log-level|reset ─► client::connect ─► agent (gRPC)
//!                                       preflight|reset ─(no agent)─► dataplane::{preflight,reset}
//!  meshletctl ipsec rotate|status ─► API server (admin::ipsec)
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use super::pb;
use super::{AdminError, client};
use crate::agent::{EXIT_UNADOPTABLE, describe_decision};
use crate::config::NodePaths;

/// `meshletctl`: inspect and control the local Meshlet agent.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshletctl", version, about)]
pub struct CtlCli {
    /// The agent's admin socket, bpffs root, cgroup and node lock (the agent's own flags;
    /// all but the socket are used only when no agent runs).
    #[command(flatten)]
    pub paths: NodePaths,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Subcommands of `meshletctl`.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Agent, programs, link ids, sync state and counters.
    Status,
    /// Pinned maps: layout, entries, capacity.
    Maps {
        /// Also print the decoded service table.
        #[arg(long)]
        entries: bool,
    },
    /// Would an agent writing LAYOUT adopt the pinned state? Exits 3 when it would not.
    Preflight {
        /// Layout to check (default: the newest this build writes).
        #[arg(long, default_value_t = crate::config::NEWEST_LAYOUT)]
        layout: u32,
    },
    /// Change the agent's log filter (e.g. `debug`, `info,meshlet_agent=trace`).
    LogLevel {
        /// New filter.
        level: String,
    },
    /// Detach and unpin the whole data plane (asks the agent, which then stops).
    Reset,
    /// IPsec through the API server (KUBECONFIG or in-cluster): request a key rotation, show
    /// the nodes' IPsec status.
    Ipsec {
        /// What to do.
        #[command(subcommand)]
        command: super::ipsec::IpsecCommand,
    },
}

fn print_json(v: &impl serde::Serialize) -> Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    println!("{s}");
    Ok(())
}

fn call_err(call: &'static str) -> impl Fn(tonic::Status) -> String {
    move |s| {
        AdminError::Call {
            call,
            message: s.message().to_string(),
        }
        .to_string()
    }
}

async fn run(cli: CtlCli) -> Result<ExitCode, String> {
    if let CtlCommand::Ipsec { command } = cli.command {
        super::ipsec::run(command, cli.json).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let agent = client::connect(&cli.paths.admin_socket).await;
    match cli.command {
        CtlCommand::Ipsec { .. } => {}
        CtlCommand::Status => {
            let mut c = agent.map_err(|e| e.to_string())?;
            let s = c
                .status(pb::StatusRequest {})
                .await
                .map_err(call_err("Status"))?
                .into_inner();
            if cli.json {
                print_json(&s)?;
            } else {
                println!(
                    "node:        {} (agent pid {}, version {})",
                    s.node_name, s.pid, s.version
                );
                println!("bpffs root:  {}", s.bpffs_root);
                println!("cgroup:      {}", s.cgroup);
                println!("layout:      {}", s.layout);
                println!(
                    "start-up:    {} in {} us, link ids unchanged: {}",
                    s.restart_kind, s.start_duration_micros, s.link_ids_unchanged
                );
                println!("ready:       {} ({} syncs)", s.ready, s.syncs);
                if !s.last_error.is_empty() {
                    println!("last error:  {}", s.last_error);
                }
                println!(
                    "services:    {} frontends, {} backends",
                    s.services, s.backends
                );
                println!(
                    "counters:    handled {}, rewritten {}, no backend {}",
                    s.handled, s.rewritten, s.no_backend
                );
                for p in s.programs {
                    println!(
                        "program:     {} id {} link {} on {}",
                        p.name, p.id, p.link_id, p.attach_point
                    );
                }
            }
        }
        CtlCommand::Maps { entries } => {
            let mut c = agent.map_err(|e| e.to_string())?;
            let m = c
                .maps(pb::MapsRequest {
                    entries: entries || cli.json,
                })
                .await
                .map_err(call_err("Maps"))?
                .into_inner();
            if cli.json {
                print_json(&m)?;
            } else {
                println!(
                    "{:<24} {:>6} {:>10} {:>10}",
                    "MAP", "LAYOUT", "ENTRIES", "CAPACITY"
                );
                for map in &m.maps {
                    println!(
                        "{:<24} {:>6} {:>10} {:>10}",
                        map.name, map.layout, map.entries, map.capacity
                    );
                }
                for s in &m.services {
                    let backends: Vec<String> = s
                        .backends
                        .iter()
                        .map(|b| format!("{}:{} (w{})", b.address, b.port, b.weight))
                        .collect();
                    println!(
                        "{}:{}/{} -> {}",
                        s.vip,
                        s.port,
                        s.protocol,
                        backends.join(", ")
                    );
                }
            }
        }
        CtlCommand::Preflight { layout } => {
            let reply = match agent {
                Ok(mut c) => c
                    .preflight(pb::PreflightRequest { layout })
                    .await
                    .map_err(call_err("Preflight"))?
                    .into_inner(),
                Err(_) => {
                    let cgroup = crate::cgroup::resolve(cli.paths.cgroup.as_deref())
                        .map_err(|e| e.to_string())?;
                    let mut cfg = cli.paths.dataplane(cgroup.path);
                    cfg.layout = layout;
                    let d = crate::dataplane::preflight(&cfg).map_err(|e| e.to_string())?;
                    let (name, adoptable, reason) = describe_decision(&d);
                    pb::PreflightReply {
                        decision: name.into(),
                        adoptable,
                        reason,
                    }
                }
            };
            if cli.json {
                print_json(&reply)?;
            } else {
                println!("{}: {}", reply.decision, reply.reason);
            }
            if !reply.adoptable {
                return Ok(ExitCode::from(EXIT_UNADOPTABLE));
            }
        }
        CtlCommand::LogLevel { level } => {
            let mut c = agent.map_err(|e| e.to_string())?;
            let r = c
                .set_log_level(pb::SetLogLevelRequest {
                    level: level.clone(),
                })
                .await
                .map_err(call_err("SetLogLevel"))?
                .into_inner();
            println!("log filter: {} -> {level}", r.previous);
        }
        CtlCommand::Reset => match agent {
            Ok(mut c) => {
                c.reset(pb::ResetRequest {})
                    .await
                    .map_err(call_err("Reset"))?;
                println!("the agent tore the data plane down and stopped");
            }
            Err(_) => {
                crate::dataplane::reset(&cli.paths.reset_config()).map_err(|e| e.to_string())?;
                println!(
                    "no agent running; tore down {}",
                    cli.paths.bpffs_root.display()
                );
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Entry point of `meshletctl`.
pub fn main(cli: CtlCli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshletctl: failed to build the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshletctl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn meshletctl_shares_the_agent_defaults_and_finds_the_cgroup_itself() {
        let ctl = CtlCli::try_parse_from(["meshletctl", "status"]).expect("parse");
        let agent = crate::config::Cli::try_parse_from(["meshlet-agent"]).expect("parse");
        assert_eq!(ctl.paths, agent.agent.paths);
        assert_eq!(ctl.paths.cgroup, None);
    }

    #[test]
    fn the_socket_flag_still_names_the_admin_socket() {
        let ctl = CtlCli::try_parse_from(["meshletctl", "--socket", "/tmp/a.sock", "status"])
            .expect("parse");
        assert_eq!(ctl.paths.admin_socket, PathBuf::from("/tmp/a.sock"));
    }

    #[test]
    fn the_version_flag_prints_meshletctl_and_the_crate_version() {
        let err = CtlCli::try_parse_from(["meshletctl", "--version"]).expect_err("exits");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            err.to_string().trim(),
            format!("meshletctl {}", env!("CARGO_PKG_VERSION"))
        );
    }
}
