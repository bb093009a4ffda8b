//! Admin API: a tonic gRPC service on a unix socket (mode 0600) serving `meshletctl`.
//!
//! ```text
//!  meshletctl ─► client::connect(socket) ─► gRPC ─► AdminService ─► Context (status, data plane)
//!                                                         └─ Reset ─► run loop (tear down, exit)
//! ```
//!
//! The socket is bound only after the node lock is held, so a second agent never replaces the
//! socket of the running one.

pub mod client;
pub mod ctl;
pub mod ipsec;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::agent::{Context, describe_decision, restart_kind_name};
use crate::model::{DesiredState, Protocol};

/// Generated protobuf types and gRPC stubs of `proto/admin.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("meshlet.admin.v1");
}

/// Errors of the admin API, named for the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket's directory or a stale socket could not be prepared.
    #[error("failed to prepare admin socket {path}")]
    PrepareSocket {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be bound.
    #[error("failed to bind admin socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No agent answers on the socket.
    #[error("failed to connect to the agent at {path}: {detail}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        detail: String,
    },
    /// The agent answered with an error.
    #[error("agent refused {call}: {message}")]
    Call {
        /// RPC name.
        call: &'static str,
        /// Server message.
        message: String,
    },
}

/// Convert a desired state into the wire form.
pub fn services_to_pb(state: &DesiredState) -> Vec<pb::ServiceEntry> {
    state
        .services
        .iter()
        .map(|(k, backends)| pb::ServiceEntry {
            vip: k.vip.to_string(),
            port: u32::from(k.port),
            protocol: match k.protocol {
                Protocol::Tcp => "TCP".into(),
                Protocol::Udp => "UDP".into(),
            },
            backends: backends
                .iter()
                .map(|b| pb::BackendEntry {
                    address: b.addr.to_string(),
                    port: u32::from(b.port),
                    weight: u32::from(b.weight),
                })
                .collect(),
        })
        .collect()
}

struct AdminService {
    ctx: Arc<Context>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

async fn with_dataplane<T: Send + 'static>(
    ctx: &Arc<Context>,
    f: impl FnOnce(&crate::dataplane::Dataplane) -> T + Send + 'static,
) -> Result<T, Status> {
    let dp = ctx.dataplane.clone();
    tokio::task::spawn_blocking(move || {
        let guard = dp.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(f)
    })
    .await
    .map_err(internal)?
    .ok_or_else(|| Status::unavailable("the data plane was reset; the agent is stopping"))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let ctx = &self.ctx;
        let (programs, counters) = with_dataplane(ctx, |d| (d.programs(), d.counters())).await?;
        let counters = counters.unwrap_or_default();
        let st = ctx.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Response::new(pb::StatusReply {
            node_name: ctx.args.node_name.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            layout: ctx.args.dataplane_layout,
            restart_kind: restart_kind_name(ctx.report.kind).into(),
            start_duration_micros: ctx.report.duration.as_micros() as u64,
            link_ids_unchanged: ctx.report.link_ids_unchanged,
            programs: programs
                .into_iter()
                .map(|p| pb::Program {
                    name: p.name,
                    id: p.id,
                    attach_point: p.attach_point,
                    link_id: p.link_id,
                })
                .collect(),
            ready: st.ready,
            syncs: st.syncs,
            last_error: st.last_error.unwrap_or_default(),
            services: st.applied.services.len() as u64,
            backends: st.applied.services.values().map(|b| b.len() as u64).sum(),
            handled: counters.handled,
            rewritten: counters.rewritten,
            no_backend: counters.no_backend,
            bpffs_root: ctx.args.paths.bpffs_root.display().to_string(),
            cgroup: ctx.dataplane_config.cgroup.display().to_string(),
        }))
    }

    async fn maps(&self, req: Request<pb::MapsRequest>) -> Result<Response<pb::MapsReply>, Status> {
        let entries = req.into_inner().entries;
        let (maps, observed) = with_dataplane(&self.ctx, move |d| {
            (d.maps(), if entries { Some(d.observed()) } else { None })
        })
        .await?;
        let maps = maps.map_err(internal)?;
        let services = match observed {
            None => Vec::new(),
            Some(o) => services_to_pb(&o.map_err(internal)?),
        };
        Ok(Response::new(pb::MapsReply {
            maps: maps
                .into_iter()
                .map(|m| pb::MapInfo {
                    name: m.name,
                    layout: m.layout,
                    entries: m.entries,
                    capacity: m.capacity,
                })
                .collect(),
            services,
        }))
    }

    async fn preflight(
        &self,
        req: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightReply>, Status> {
        let mut cfg = self.ctx.dataplane_config.clone();
        let layout = req.into_inner().layout;
        if layout != 0 {
            cfg.layout = layout;
        }
        let decision = tokio::task::spawn_blocking(move || crate::dataplane::preflight(&cfg))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let (name, adoptable, reason) = describe_decision(&decision);
        Ok(Response::new(pb::PreflightReply {
            decision: name.into(),
            adoptable,
            reason,
        }))
    }

    async fn set_log_level(
        &self,
        req: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelReply>, Status> {
        let level = req.into_inner().level;
        let previous = self
            .ctx
            .log
            .set(&level)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(previous = %previous, level = %level, "log filter changed");
        Ok(Response::new(pb::SetLogLevelReply { previous }))
    }

    async fn reset(
        &self,
        _: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.ctx
            .reset_tx
            .send(tx)
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?;
        // The run loop stops serving before tearing down; the answer may not reach us.
        match rx.await {
            Ok(Ok(())) | Err(_) => Ok(Response::new(pb::ResetReply {})),
            Ok(Err(e)) => Err(Status::internal(e)),
        }
    }
}

/// Bind the admin socket (mode 0600) and serve until `shutdown` resolves.
pub fn serve(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let path = ctx.args.paths.admin_socket.clone();
    let prepare = |source| AdminError::PrepareSocket {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(prepare)?;
    }
    // We hold the node lock: a socket left here belongs to a dead agent.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(prepare(e)),
    }
    let listener = UnixListener::bind(&path).map_err(|source| AdminError::Bind {
        path: path.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(prepare)?;
    let service = pb::admin_server::AdminServer::new(AdminService { ctx });
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    }))
}
