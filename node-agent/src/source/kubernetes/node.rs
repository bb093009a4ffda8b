//! The enrolled node in Kubernetes mode: reacts to this node's NodeEnrollment by loading,
//! draining or releasing the data plane, and reports its status.
//!
//! ```text
//!  enrollment::watch ─► KubeNode::on_enrollment ─► decide ─┬─ Start   ─► Dataplane::start ─► sync
//!                                                          ├─ Drain   ─► teardown ─► status Drained
//!                                                          ├─ Release ─► teardown ─► finalizer off
//!                              (teardown: own xfrm objects first, then the data plane)
//!                                                          └─ Serve / Wait / KeepUnreported
//!  run loop sync result ─► KubeNode::after_sync ─► status::build ─► StatusWriter (on change)
//!  IPsec task report ─────► KubeNode::on_ipsec ──┘ (status.ipsec, IPsecReady)
//! ```
//!
//! How the agent starts with `--kubernetes`: when pins exist the data plane is adopted at once
//! (no gap across agent restarts); otherwise nothing is loaded until the NodeEnrollment exists
//! and is not draining.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use meshlet_crds::v1alpha1::{Continuity, NodeEnrollment};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::enrollment::{self, Action};
use super::{KubernetesSource, SourceMetrics};
use crate::agent::{Context, restart_kind_name};
use crate::config::AgentArgs;
use crate::dataplane::{self, Dataplane, StartReport};
use crate::index::Index;
use crate::ipsec::kube::{self as kube_ipsec, IpsecReport, KubeIpsec, SharedXfrm};
use crate::metrics::Metrics;
use crate::status::{self, NodeFacts, Observation, Phase, StatusWriter};

/// Errors of Kubernetes mode.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No kube client could be configured (neither `KUBECONFIG` nor in-cluster).
    #[error("failed to configure the Kubernetes client (KUBECONFIG or in-cluster)")]
    Client(#[source] kube::Error),
}

/// What the run loop must do after an enrollment change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing more.
    Nothing,
    /// The data plane was (re)loaded: apply the index's desired state.
    Sync,
}

/// This node's enrollment, data-plane lifecycle and status reporting.
pub struct KubeNode {
    client: Client,
    api: Api<NodeEnrollment>,
    node: String,
    rx: mpsc::Receiver<Option<NodeEnrollment>>,
    watch: JoinHandle<()>,
    writer: StatusWriter,
    facts: NodeFacts,
    current: Option<NodeEnrollment>,
    /// A start-up not yet folded into the continuity record (needs the previous status).
    pending_start: Option<StartReport>,
    continuity: Option<Continuity>,
    /// When the last start-up began (process start for the first one).
    load_began: Instant,
    /// Time from `load_began` to the first successful sync.
    synced_after: Option<Duration>,
    phase: Phase,
    source_error: Option<String>,
    retry_at: Option<tokio::time::Instant>,
    /// xfrm slot shared with the IPsec task (removed on unenroll before the release).
    ipsec_xfrm: SharedXfrm,
    /// Latest report of the IPsec task.
    ipsec: Option<IpsecReport>,
}

impl KubeNode {
    /// Connect (`KUBECONFIG` or in-cluster) and start watching this node's NodeEnrollment.
    pub async fn connect(
        args: &AgentArgs,
        metrics: &Metrics,
        began: Instant,
    ) -> Result<Self, KubeError> {
        let client = Client::try_default().await.map_err(KubeError::Client)?;
        let node = args.node_name.clone();
        let (rx, watch) =
            enrollment::watch(client.clone(), node.clone(), metrics.watch_restarts.clone());
        let api = Api::<NodeEnrollment>::all(client.clone());
        Ok(Self {
            writer: StatusWriter::new(api.clone(), node.clone()),
            client,
            api,
            node,
            rx,
            watch,
            facts: NodeFacts::read(args.agent_version.clone()),
            current: None,
            pending_start: None,
            continuity: None,
            load_began: began,
            synced_after: None,
            phase: Phase::Syncing,
            source_error: None,
            retry_at: None,
            ipsec_xfrm: SharedXfrm::default(),
            ipsec: None,
        })
    }

    /// The Services/EndpointSlices source on the same client.
    pub fn source(&self, metrics: &Metrics, debounce: Duration) -> KubernetesSource {
        KubernetesSource::new(
            self.client.clone(),
            debounce,
            SourceMetrics {
                watch_restarts: metrics.watch_restarts.clone(),
                skipped: metrics.source_skipped.clone(),
            },
        )
    }

    /// The IPsec task on the same client, sharing this node's xfrm slot.
    pub fn ipsec_task(&self, metrics: &Metrics, debounce: Duration) -> KubeIpsec {
        KubeIpsec {
            client: self.client.clone(),
            node: self.node.clone(),
            debounce,
            watch_restarts: metrics.watch_restarts.clone(),
            xfrm: self.ipsec_xfrm.clone(),
        }
    }

    /// A new report of the IPsec task: fold it into the status (written when it changed).
    pub async fn on_ipsec(&mut self, ctx: &Arc<Context>, report: Option<IpsecReport>) {
        if report.is_some() && report != self.ipsec {
            self.ipsec = report;
            self.report(ctx).await;
        }
    }

    /// Record that the data plane was adopted or loaded at process start.
    pub fn started(&mut self, report: StartReport) {
        self.pending_start = Some(report);
        self.phase = Phase::Syncing;
    }

    /// Next NodeEnrollment state (`None` inside: there is none).
    pub async fn recv(&mut self) -> Option<Option<NodeEnrollment>> {
        self.rx.recv().await
    }

    /// When a failed status write or finalizer release should be tried again.
    pub fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.retry_at
    }

    fn schedule_retry(&mut self) {
        self.retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
    }

    /// Act on the current NodeEnrollment again (after a failed write or release).
    pub async fn retry(&mut self, ctx: &Arc<Context>, index: &mut Index) -> Next {
        self.retry_at = None;
        let ne = self.current.clone();
        self.on_enrollment(ctx, index, ne).await
    }

    /// Act on a new state of this node's NodeEnrollment.
    pub async fn on_enrollment(
        &mut self,
        ctx: &Arc<Context>,
        index: &mut Index,
        ne: Option<NodeEnrollment>,
    ) -> Next {
        let recreated = match (&self.current, &ne) {
            (Some(a), Some(b)) => a.metadata.uid != b.metadata.uid,
            _ => ne.is_none(),
        };
        if recreated {
            self.writer.forget();
        }
        self.current = ne;
        let running = running(ctx);
        match enrollment::decide(self.current.as_ref(), running) {
            Action::Wait => {
                info!(node = %self.node, "no NodeEnrollment for this node: nothing loaded, waiting");
                Next::Nothing
            }
            Action::KeepUnreported => {
                warn!(node = %self.node, "no NodeEnrollment for this node: the adopted data plane keeps serving, status is not reported");
                Next::Nothing
            }
            Action::Serve => {
                kube_ipsec::enrolled(&self.ipsec_xfrm).await;
                self.report(ctx).await;
                Next::Nothing
            }
            Action::Start => {
                kube_ipsec::enrolled(&self.ipsec_xfrm).await;
                self.load(ctx, index).await
            }
            Action::Drain => {
                if self.teardown(ctx, index).await {
                    self.phase = Phase::Drained;
                } else {
                    self.schedule_retry();
                }
                self.report(ctx).await;
                Next::Nothing
            }
            Action::Release => {
                if !self.teardown(ctx, index).await {
                    self.schedule_retry();
                    return Next::Nothing;
                }
                match enrollment::release(&self.api, &self.node).await {
                    Ok(()) => {
                        info!(node = %self.node, "data plane torn down; NodeEnrollment finalizer released")
                    }
                    Err(e) => {
                        error!(error = %e, "finalizer release failed; retrying");
                        self.schedule_retry();
                    }
                }
                Next::Nothing
            }
        }
    }

    async fn load(&mut self, ctx: &Arc<Context>, index: &mut Index) -> Next {
        let cfg = ctx.dataplane_config.clone();
        info!(node = %self.node, bpffs_root = %cfg.bpffs_root.display(), "NodeEnrollment present: loading the data plane");
        self.load_began = Instant::now();
        self.synced_after = None;
        let result = tokio::task::spawn_blocking(move || Dataplane::start(cfg)).await;
        match result {
            Ok(Ok((dp, report))) => {
                info!(
                    kind = restart_kind_name(report.kind),
                    duration_us = report.duration.as_micros() as u64,
                    "data plane serving"
                );
                Metrics::inc(&ctx.metrics.restarts, restart_kind_name(report.kind));
                ctx.metrics
                    .start_duration
                    .set(report.duration.as_secs_f64());
                *ctx.dataplane.lock().unwrap_or_else(|p| p.into_inner()) = Some(dp);
                self.started(report);
                // The maps are new: the next desired state must be written in full.
                index.apply_failed();
                self.report(ctx).await;
                Next::Sync
            }
            Ok(Err(e)) => {
                error!(error = %e, "loading the data plane failed");
                self.phase = Phase::StartFailed(e.to_string());
                self.report(ctx).await;
                Next::Nothing
            }
            Err(e) => {
                error!(error = %e, "loading the data plane failed");
                self.phase = Phase::StartFailed(e.to_string());
                Next::Nothing
            }
        }
    }

    /// Remove the own xfrm objects, then detach and unpin everything; true when nothing is
    /// left.
    async fn teardown(&mut self, ctx: &Arc<Context>, index: &mut Index) -> bool {
        if let Err(e) = kube_ipsec::remove_all(&self.ipsec_xfrm).await {
            error!(error = %e, "removing the own IPsec xfrm objects failed; retrying");
            return false;
        }
        let dp = ctx.dataplane.clone();
        let cfg = ctx.dataplane_config.clone();
        let result = tokio::task::spawn_blocking(move || {
            let taken = dp.lock().unwrap_or_else(|p| p.into_inner()).take();
            match taken {
                Some(d) => d.teardown(),
                None => dataplane::reset(&cfg),
            }
        })
        .await;
        ctx.metrics.ready.set(0);
        {
            let mut st = ctx.status.lock().unwrap_or_else(|p| p.into_inner());
            st.ready = false;
        }
        index.apply_failed();
        self.pending_start = None;
        self.continuity = None;
        self.synced_after = None;
        match result {
            Ok(Ok(())) => {
                info!(node = %self.node, "data plane detached and unpinned");
                true
            }
            Ok(Err(e)) => {
                error!(error = %e, "tearing the data plane down failed");
                false
            }
            Err(e) => {
                error!(error = %e, "tearing the data plane down failed");
                false
            }
        }
    }

    /// Record the outcome of a sync and report it.
    pub async fn after_sync(&mut self, ctx: &Arc<Context>, ok: bool) {
        if !running(ctx) {
            return;
        }
        if ok {
            self.phase = Phase::Synced;
            self.source_error = None;
            if self.synced_after.is_none() {
                self.synced_after = Some(self.load_began.elapsed());
            }
        } else {
            self.phase = Phase::ApplyFailed(ctx.last_error().unwrap_or_default());
        }
        self.report(ctx).await;
    }

    /// Record that a source was refused (its last good snapshot stays in force) and report it.
    pub async fn source_refused(&mut self, ctx: &Arc<Context>, msg: String) {
        self.source_error = Some(msg);
        self.report(ctx).await;
    }

    /// Write the status if this node is enrolled (not being deleted) and it changed.
    pub async fn report(&mut self, ctx: &Arc<Context>) {
        let Some(ne) = self.current.clone() else {
            return;
        };
        if ne.metadata.deletion_timestamp.is_some() {
            return;
        }
        let dp = ctx.dataplane.clone();
        let observed = tokio::task::spawn_blocking(move || {
            let guard = dp.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(d) => (d.programs(), d.maps()),
                None => (Vec::new(), Ok(Vec::new())),
            }
        })
        .await;
        let (programs, maps) = match observed {
            Ok((p, Ok(m))) => (p, m),
            Ok((p, Err(e))) => {
                warn!(error = %e, "reading the maps for the status failed");
                (p, Vec::new())
            }
            Err(e) => {
                warn!(error = %e, "reading the data plane for the status failed");
                return;
            }
        };
        let now = Timestamp::now();
        if let Some(report) = self.pending_start.take() {
            let previous = self.writer.last().or(ne.status.as_ref());
            self.continuity = Some(status::continuity_after_start(
                previous, &report, &programs, now,
            ));
        }
        if let (Some(c), Some(d)) = (self.continuity.as_mut(), self.synced_after) {
            c.last_restart_duration_ms = Some(status::millis(d));
        }
        let phase = if programs.is_empty() && self.phase != Phase::Drained {
            match &self.phase {
                Phase::StartFailed(_) => self.phase.clone(),
                _ => Phase::Syncing,
            }
        } else {
            self.phase.clone()
        };
        let obs = Observation {
            programs,
            maps,
            phase,
            source_error: self.source_error.clone(),
            ipsec: self.ipsec.clone(),
        };
        let base = self
            .writer
            .last()
            .cloned()
            .or_else(|| ne.status.clone())
            .unwrap_or_default();
        let new = status::build(&base, &ne, &self.facts, self.continuity.as_ref(), &obs, now);
        match self.writer.write(new).await {
            Ok(true) => Metrics::inc(&ctx.metrics.status_writes, "written"),
            Ok(false) => {}
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                warn!(error = %e, cause = %cause, "status write failed; retrying");
                Metrics::inc(&ctx.metrics.status_writes, "failed");
                self.schedule_retry();
            }
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

fn running(ctx: &Context) -> bool {
    ctx.dataplane
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
}
