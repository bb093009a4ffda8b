//! The Meshlet operator: reconciles `MeshConfig`, `NodeEnrollment` and `IPsecPolicy`.
//!
//! ```text
//!  main.rs (flags, telemetry, HTTP) ─► run()
//!                                        │ leader::LeaderElector (Lease)
//!                                        ▼ leader only
//!                                  controller::run ─► observe (pure) ─► rollout::plan (pure)
//!                                        │                 │
//!                                        ▼                 ▼
//!                               render (SSA bodies)   MeshConfig.status, Events, metrics
//!                                  ipsec::controller::run ─► ipsec::decide (pure)
//!                                        ▼
//!                               key Secret + IPsecPolicy.status, Events, metrics
//! ```
//!
//! `main.rs` only parses flags and starts these; tests run [`run`] in process.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kube::Client;

/// Field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = meshlet_crds::names::OPERATOR_FIELD_MANAGER;

pub mod controller;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod render;
pub mod rollout;
pub mod telemetry;
pub mod watch;

pub mod ipsec;

/// State shared between the controller, the leader election and the HTTP endpoints.
#[derive(Default)]
pub struct Shared {
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// Leader or standby established (`/readyz`).
    pub ready: AtomicBool,
    /// This instance holds the lease.
    pub leader: AtomicBool,
}

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace of the lease, the agent DaemonSet and its pods.
    pub namespace: String,
    /// Identity in the leader election (the pod name).
    pub identity: String,
    /// Lease validity without renewal.
    pub lease_duration: Duration,
    /// Renewal interval of the leader.
    pub renew_interval: Duration,
    /// Retry interval of a standby.
    pub retry_interval: Duration,
    /// Reconcile loop pacing.
    pub loop_settings: controller::LoopSettings,
}

impl Settings {
    /// Defaults: lease 15 s, renew 5 s, retry 2 s.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
            retry_interval: Duration::from_secs(2),
            loop_settings: controller::LoopSettings::default(),
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Another instance holds the lease now, or it could not be renewed in time; the
    /// process must stop reconciling (and is expected to restart clean).
    #[error("lost the leader lease {namespace}/{name} held as {identity}")]
    LeadershipLost {
        /// Namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// This instance.
        identity: String,
    },
    /// The reconcile loop ended on its own.
    #[error("the reconcile loop stopped unexpectedly")]
    ControllerStopped,
}

/// Aborts a spawned task when dropped (so aborting the parent stops it too).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The leader's controllers: MeshConfig/enrollment/rollout and the IPsec key manager, each on
/// its own task; returns when either stops.
async fn run_controllers(ctx: Arc<controller::Context>) {
    let mut mesh = AbortOnDrop(tokio::spawn(controller::run(ctx.clone())));
    let mut keys = AbortOnDrop(tokio::spawn(ipsec::controller::run(ctx)));
    tokio::select! {
        _ = &mut mesh.0 => tracing::error!("the MeshConfig controller stopped"),
        _ = &mut keys.0 => tracing::error!("the IPsec key manager stopped"),
    }
}

/// Runs leader election and, while leader, the controllers, until `shutdown` completes
/// (then the lease is released) or leadership is lost.
pub async fn run(
    client: Client,
    settings: Settings,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let lease = leader::LeaseSettings {
        name: meshlet_crds::names::OPERATOR_NAME.to_owned(),
        namespace: settings.namespace.clone(),
        identity: settings.identity.clone(),
        lease_duration: settings.lease_duration,
        renew_interval: settings.renew_interval,
        retry_interval: settings.retry_interval,
    };
    let mut elector = leader::LeaderElector::new(client.clone(), lease);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {
                if !shared.ready.swap(true, Ordering::Relaxed) {
                    tracing::info!(identity = %settings.identity, "standing by: another instance holds the lease");
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(settings.retry_interval) => {}
        }
    }
    shared.ready.store(true, Ordering::Relaxed);
    shared.leader.store(true, Ordering::Relaxed);
    shared.metrics.leader.set(1);
    tracing::info!(identity = %settings.identity, "acquired the leader lease; starting controllers");
    let ctx = Arc::new(controller::Context::new(
        client,
        settings.namespace.clone(),
        settings.identity.clone(),
        shared.clone(),
        settings.loop_settings.clone(),
    ));
    // Held in a guard: if this future is dropped (the caller's task aborted), the controllers
    // stop with it instead of running on detached.
    let mut task = AbortOnDrop(tokio::spawn(run_controllers(ctx)));
    let mut last_renewal = Instant::now();
    // Stop before the lease could expire under us: two thirds of its duration.
    let renew_deadline = settings.lease_duration * 2 / 3;
    let lost = |shared: &Shared| {
        shared.leader.store(false, Ordering::Relaxed);
        shared.metrics.leader.set(0);
        RunError::LeadershipLost {
            namespace: settings.namespace.clone(),
            name: meshlet_crds::names::OPERATOR_NAME.to_owned(),
            identity: settings.identity.clone(),
        }
    };
    loop {
        tokio::select! {
            () = &mut shutdown => {
                task.0.abort();
                let _ = (&mut task.0).await;
                shared.leader.store(false, Ordering::Relaxed);
                shared.metrics.leader.set(0);
                if let Err(e) = elector.release().await {
                    tracing::warn!(error = %e, "failed to release the leader lease");
                }
                tracing::info!("released the leader lease; stopped");
                return Ok(());
            }
            _ = &mut task.0 => {
                shared.leader.store(false, Ordering::Relaxed);
                return Err(RunError::ControllerStopped);
            }
            () = tokio::time::sleep(settings.renew_interval) => {
                match elector.try_acquire_or_renew().await {
                    Ok(true) => last_renewal = Instant::now(),
                    Ok(false) => {
                        task.0.abort();
                        return Err(lost(&shared));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to renew the leader lease");
                        if last_renewal.elapsed() > renew_deadline {
                            task.0.abort();
                            return Err(lost(&shared));
                        }
                    }
                }
            }
        }
    }
}
