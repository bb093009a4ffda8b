//! The agent process: start-up (adopt, never flush), the sync loop, and shutdown.
//!
//! ```text
//!  cgroup::resolve (--cgroup or mountinfo), bpffs::require_bpffs ─► refuse early, naming the path
//!  signals installed ─► Dataplane::start (lock, decide, adopt/migrate/load) ─► observed()
//!      ─► Index(observed) ◄── sources (standalone file, Kubernetes) via mpsc<SourceUpdate>
//!      ─► Change::Apply ─► Dataplane::apply (spawn_blocking) ─► metrics, status, ready
//!  --kubernetes: start-up adopts pinned state at once, otherwise loads nothing until this
//!  node's NodeEnrollment exists; KubeNode loads/drains/releases on NodeEnrollment changes and
//!  writes its status after each sync.
//!  admin socket (gRPC) and HTTP (/healthz /readyz /metrics) read the shared Context.
//!  SIGTERM/SIGINT: return, leaving programs attached and maps pinned.
//!  admin Reset: drop the data plane (releases the lock), reset(), return.
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

use crate::bpffs::{self, BpffsError, Mounted};
use crate::cgroup::{self, CgroupError};
use crate::config::{AgentArgs, Cli, Command};
use crate::dataplane::{
    self, Dataplane, DataplaneConfig, DataplaneError, RestartKind, StartReport, StartupDecision,
};
use crate::index::{Change, Index};
use crate::metrics::Metrics;
use crate::model::DesiredState;
use crate::source::kubernetes::node::{KubeError, KubeNode, Next};
use crate::source::standalone::{Limits, StandaloneSource};
use crate::source::{Source, SourceUpdate};

/// Exit code when the pinned state cannot be adopted (preflight or run).
pub const EXIT_UNADOPTABLE: u8 = 3;
/// Exit code when another agent holds the node lock.
pub const EXIT_LOCKED: u8 = 4;

/// Errors of the agent process, named for the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The tokio runtime could not be built.
    #[error("failed to build the async runtime")]
    Runtime(#[source] std::io::Error),
    /// Logging could not be initialised or the filter is invalid.
    #[error("failed to set log filter {filter:?}: {detail}")]
    LogFilter {
        /// Filter asked for.
        filter: String,
        /// Why it was refused.
        detail: String,
    },
    /// A signal handler could not be installed.
    #[error("failed to install the signal handlers")]
    Signals(#[source] std::io::Error),
    /// The cgroup to attach to could not be found or is not cgroup v2.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The bpffs root is not on a bpffs, or bpffs could not be mounted.
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    /// Starting, adopting or resetting the data plane failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A blocking task panicked or was cancelled.
    #[error("data-plane task failed: {0}")]
    Task(String),
    /// The admin API could not be served.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The metrics endpoint could not be served.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The OTLP trace exporter could not be built.
    #[error("failed to set up OTLP traces to {endpoint}: {detail}")]
    Traces {
        /// Endpoint asked for (`--otlp-endpoint`).
        endpoint: String,
        /// Why.
        detail: String,
    },
    /// Kubernetes mode could not start.
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// Run-time control of the log filter, and the trace pipeline when OTLP is configured.
#[derive(Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    current: Mutex<String>,
    traces: Option<SdkTracerProvider>,
}

impl LogControl {
    /// Replace the log filter; returns the previous one.
    pub fn set(&self, filter: &str) -> Result<String, AgentError> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| AgentError::LogFilter {
            filter: filter.to_string(),
            detail: e.to_string(),
        })?;
        self.handle
            .reload(parsed)
            .map_err(|e| AgentError::LogFilter {
                filter: filter.to_string(),
                detail: e.to_string(),
            })?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::replace(&mut *cur, filter.to_string()))
    }

    /// Export the spans still buffered and stop the trace pipeline (blocking).
    pub fn shutdown_traces(&self) {
        if let Some(p) = &self.traces
            && let Err(e) = p.shutdown()
        {
            warn!(error = %e, "failed to flush the traces");
        }
    }
}

/// Install the global subscriber (stderr, text or JSON) with a reloadable filter, plus an
/// OTLP/gRPC span exporter to `otlp_endpoint` when given (call inside a tokio runtime).
pub fn init_logging(
    filter: &str,
    json: bool,
    otlp_endpoint: Option<&str>,
) -> Result<LogControl, AgentError> {
    let parsed = EnvFilter::try_new(filter).map_err(|e| AgentError::LogFilter {
        filter: filter.to_string(),
        detail: e.to_string(),
    })?;
    let (layer, handle) = reload::Layer::new(parsed);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let traces = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| AgentError::Traces {
                    endpoint: endpoint.to_string(),
                    detail: e.to_string(),
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name("meshlet-agent")
                            .build(),
                    )
                    .build(),
            )
        }
    };
    let otel = traces
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("meshlet-agent")));
    let registry = tracing_subscriber::registry().with(layer).with(otel);
    let res = if json {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
    res.map_err(|e| AgentError::LogFilter {
        filter: filter.to_string(),
        detail: e.to_string(),
    })?;
    Ok(LogControl {
        handle,
        current: Mutex::new(filter.to_string()),
        traces,
    })
}

/// Sync status shown by the admin API and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    /// True after the first successful sync.
    pub ready: bool,
    /// Successful applies.
    pub syncs: u64,
    /// Last source or apply problem, cleared by the next successful sync.
    pub last_error: Option<String>,
    /// The state last applied.
    pub applied: DesiredState,
}

/// Everything the tasks of a running agent share.
#[derive(Debug)]
pub struct Context {
    /// Flags the agent runs with.
    pub args: AgentArgs,
    /// The data-plane configuration, with the cgroup resolved at start-up.
    pub dataplane_config: DataplaneConfig,
    /// The data plane; `None` once reset.
    pub dataplane: Arc<Mutex<Option<Dataplane>>>,
    /// How start-up went.
    pub report: StartReport,
    /// Exported metrics.
    pub metrics: Metrics,
    /// Log filter control.
    pub log: LogControl,
    /// Sync status.
    pub status: Mutex<SyncStatus>,
    /// Requests to tear down and stop, answered once done.
    pub reset_tx: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

impl Context {
    /// True after the first successful sync.
    pub fn is_ready(&self) -> bool {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).ready
    }

    /// Last problem, if any.
    pub fn last_error(&self) -> Option<String> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    fn with_status<R>(&self, f: impl FnOnce(&mut SyncStatus) -> R) -> R {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Lower-case name of a restart kind.
pub fn restart_kind_name(kind: RestartKind) -> &'static str {
    match kind {
        RestartKind::Fresh => "fresh",
        RestartKind::Warm => "warm",
        RestartKind::Migrated => "migrated",
    }
}

/// `(name, adoptable, reason)` of a start-up decision.
pub fn describe_decision(d: &StartupDecision) -> (&'static str, bool, String) {
    match d {
        StartupDecision::Fresh => ("fresh", true, "nothing pinned: will load and attach".into()),
        StartupDecision::SameLayout { layout } => (
            "same-layout",
            true,
            format!("layout {layout} pinned: will reuse the maps and replace programs in place"),
        ),
        StartupDecision::Migrate { from, to } => (
            "migrate",
            true,
            format!(
                "will copy the maps from layout {from} to layout {to}, then swap programs in place"
            ),
        ),
        StartupDecision::Unknown { found, reason } => (
            "unknown",
            false,
            format!("cannot adopt pinned layout {found}: {reason}"),
        ),
    }
}

/// Entry point of `meshlet-agent`: dispatch the subcommand and map the outcome to an exit code.
pub fn main(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshlet-agent: {}", AgentError::Runtime(e));
            return ExitCode::FAILURE;
        }
    };
    let log = {
        // The OTLP exporter's channel lives on this runtime.
        let _runtime = rt.enter();
        match init_logging(
            &cli.agent.log_level,
            cli.agent.log_json,
            cli.agent.otlp_endpoint.as_deref(),
        ) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("meshlet-agent: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let args = cli.agent;
    match cli.command.unwrap_or(Command::Run) {
        Command::MountBpffs { path } => match bpffs::mount(&path) {
            Ok(Mounted::AlreadyThere) => {
                println!("{} is already on a bpffs", path.display());
                ExitCode::SUCCESS
            }
            Ok(Mounted::Mounted) => {
                println!("mounted bpffs at {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshlet-agent mount-bpffs: {}", with_causes(&e));
                ExitCode::FAILURE
            }
        },
        Command::Preflight => {
            match resolved_config(&args).and_then(|cfg| Ok(dataplane::preflight(&cfg)?)) {
                Ok(d) => {
                    let (name, ok, reason) = describe_decision(&d);
                    println!("{name}: {reason}");
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_UNADOPTABLE)
                    }
                }
                Err(e) => {
                    eprintln!("meshlet-agent preflight: {}", with_causes(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ipsec => crate::ipsec::runner::main(&args),
        Command::Reset => match dataplane::reset(&args.paths.reset_config()) {
            Ok(()) => {
                println!(
                    "data plane under {} torn down",
                    args.paths.bpffs_root.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshlet-agent reset: {}", with_causes(&e));
                exit_code_for(&AgentError::Dataplane(e))
            }
        },
        Command::Run => match rt.block_on(run(args, log)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let message = with_causes(&e);
                error!(error = %message, "agent stopped");
                eprintln!("meshlet-agent: {message}");
                exit_code_for(&e)
            }
        },
    }
}

/// The data-plane configuration of `args`, attaching at `--cgroup` (checked) or at the
/// node's cgroup2 root found in the mount table; refuses a bpffs root outside a bpffs.
pub fn resolved_config(args: &AgentArgs) -> Result<DataplaneConfig, AgentError> {
    let attach = cgroup::resolve(args.paths.cgroup.as_deref())?;
    info!(
        cgroup = %attach.path.display(),
        chosen_by = attach.origin.name(),
        "socket programs attach to this cgroup"
    );
    let cfg = args.dataplane(attach.path);
    bpffs::require_bpffs(&cfg.bpffs_root)?;
    Ok(cfg)
}

/// `e` followed by its causes (`failed to X: cause: cause`), for the one line a failed
/// command prints.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

fn exit_code_for(e: &AgentError) -> ExitCode {
    match e {
        AgentError::Dataplane(DataplaneError::UnknownLayout { .. }) => {
            ExitCode::from(EXIT_UNADOPTABLE)
        }
        AgentError::Dataplane(DataplaneError::LockHeld { .. }) => ExitCode::from(EXIT_LOCKED),
        _ => ExitCode::FAILURE,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))
}

/// Run the agent until SIGTERM/SIGINT (data plane left attached) or an admin reset.
pub async fn run(args: AgentArgs, log: LogControl) -> Result<(), AgentError> {
    // Install handlers first: a SIGTERM during start-up then waits for start-up to finish.
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let began = Instant::now();
    let cfg = resolved_config(&args)?;
    let dataplane_config = cfg.clone();
    let metrics = Metrics::new();
    let mut kube = match args.kubernetes {
        true => Some(KubeNode::connect(&args, &metrics, began).await?),
        false => None,
    };
    // With --kubernetes, nothing is loaded before the NodeEnrollment says so, but pinned state
    // is adopted at once so an agent restart leaves no gap.
    let start_now =
        kube.is_none() || !matches!(dataplane::preflight(&cfg), Ok(StartupDecision::Fresh));
    let (dp, report) = if start_now {
        info!(bpffs_root = %cfg.bpffs_root.display(), cgroup = %cfg.cgroup.display(), layout = cfg.layout, "starting data plane");
        let (dp, report) = blocking(move || Dataplane::start(cfg)).await??;
        info!(
            kind = restart_kind_name(report.kind),
            duration_us = report.duration.as_micros() as u64,
            link_ids_unchanged = report.link_ids_unchanged,
            "data plane serving"
        );
        Metrics::inc(&metrics.restarts, restart_kind_name(report.kind));
        metrics.start_duration.set(report.duration.as_secs_f64());
        if let Some(k) = kube.as_mut() {
            k.started(report.clone());
        }
        (Some(dp), report)
    } else {
        info!(node = %args.node_name, "nothing pinned: the data plane is loaded once this node's NodeEnrollment exists");
        let idle = StartReport {
            kind: RestartKind::Fresh,
            duration: Duration::ZERO,
            link_ids_unchanged: true,
        };
        (None, idle)
    };
    let dataplane = Arc::new(Mutex::new(dp));
    let observed = {
        let dp = dataplane.clone();
        blocking(move || {
            let guard = dp.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(Dataplane::observed).transpose()
        })
        .await??
        .unwrap_or_default()
    };
    info!(
        services = observed.services.len(),
        "index rebuilt from the maps"
    );

    let (reset_tx, mut reset_rx) = mpsc::channel(1);
    let ctx = Arc::new(Context {
        args: args.clone(),
        dataplane_config,
        dataplane,
        report,
        metrics,
        log,
        status: Mutex::new(SyncStatus {
            applied: observed.clone(),
            ..SyncStatus::default()
        }),
        reset_tx,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = crate::admin::serve(ctx.clone(), wait_stop(stop_rx.clone()))?;
    let http = match args.metrics_addr {
        Some(addr) => {
            Some(crate::metrics::serve(ctx.clone(), addr, wait_stop(stop_rx.clone())).await?)
        }
        None => None,
    };

    let (tx, mut rx) = mpsc::channel::<SourceUpdate>(16);
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    if let Some(path) = &args.standalone {
        let limits = Limits {
            max_services: args.max_services,
            max_endpoints: args.max_endpoints,
        };
        let poll = Duration::from_millis(args.standalone_poll_ms.max(10));
        sources.push(Box::new(StandaloneSource::new(path.clone(), poll, limits)));
    }
    if let Some(k) = &kube {
        let debounce = Duration::from_millis(args.kube_debounce_ms);
        sources.push(Box::new(k.source(&ctx.metrics, debounce)));
    }
    if sources.is_empty() {
        warn!("no source configured (--standalone): keeping the maps as they are");
        ctx.with_status(|s| s.ready = true);
        ctx.metrics.ready.set(1);
    }
    let mut index = Index::new(sources.iter().map(|s| s.name()), observed);
    let mut tasks: Vec<_> = sources.into_iter().map(|s| s.spawn(tx.clone())).collect();
    // IPsec from the standalone file's `ipsec:` section; without one it touches nothing.
    if let Some(path) = &args.standalone {
        let poll = Duration::from_millis(args.standalone_poll_ms.max(10));
        tasks.push(tokio::spawn(crate::ipsec::runner::run_standalone(
            path.clone(),
            poll,
        )));
    }
    // IPsec from IPsecPolicies and the published key Secret; it reports through KubeNode.
    let mut ipsec_rx = match &kube {
        Some(k) => {
            let debounce = Duration::from_millis(args.kube_debounce_ms);
            let (rx, task) = k.ipsec_task(&ctx.metrics, debounce).spawn();
            tasks.push(task);
            Some(rx)
        }
        None => None,
    };
    drop(tx);

    let mut reset_reply = None;
    // After a failed apply the same state is retried with a growing delay.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let retry_at = retry.map(|(at, _)| at);
        let kube_retry_at = kube.as_ref().and_then(KubeNode::retry_at);
        tokio::select! {
            _ = async { if let Some(at) = retry_at { tokio::time::sleep_until(at).await } }, if retry_at.is_some() => {
                let backoff = retry.map(|(_, d)| d).unwrap_or(Duration::from_millis(200));
                retry = None;
                if let Some(desired) = index.desired() {
                    let ok = sync(&ctx, &mut index, desired).await?;
                    if let Some(k) = kube.as_mut() {
                        k.after_sync(&ctx, ok).await;
                    }
                    if !ok {
                        let next = (backoff * 2).min(Duration::from_secs(10));
                        retry = Some((tokio::time::Instant::now() + next, next));
                    }
                }
            }
            Some(ne) = async { match kube.as_mut() { Some(k) => k.recv().await, None => None } }, if kube.is_some() => {
                let next = match kube.as_mut() { Some(k) => k.on_enrollment(&ctx, &mut index, ne).await, None => Next::Nothing };
                retry = kube_sync(&ctx, &mut index, kube.as_mut(), next).await?.or(retry);
            }
            _ = async { if let Some(at) = kube_retry_at { tokio::time::sleep_until(at).await } }, if kube_retry_at.is_some() => {
                let next = match kube.as_mut() { Some(k) => k.retry(&ctx, &mut index).await, None => Next::Nothing };
                retry = kube_sync(&ctx, &mut index, kube.as_mut(), next).await?.or(retry);
            }
            Ok(report) = async { match ipsec_rx.as_mut() { Some(r) => r.changed().await.map(|()| r.borrow_and_update().clone()), None => std::future::pending().await } }, if ipsec_rx.is_some() => {
                if let Some(k) = kube.as_mut() {
                    k.on_ipsec(&ctx, report).await;
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: exiting, data plane stays attached"); break; }
            _ = sigint.recv() => { info!("SIGINT: exiting, data plane stays attached"); break; }
            Some(reply) = reset_rx.recv() => { reset_reply = Some(reply); break; }
            Some(update) = rx.recv() => {
                let source = update.source;
                match index.update(update) {
                    Change::Unchanged => {}
                    Change::Refused(msg) => {
                        error!(source, error = %msg, "source refused; the data plane keeps its last good state");
                        Metrics::inc(&ctx.metrics.syncs, "refused");
                        ctx.with_status(|s| s.last_error = Some(msg.clone()));
                        if let Some(k) = kube.as_mut() {
                            k.source_refused(&ctx, msg).await;
                        }
                    }
                    Change::Apply(desired) => {
                        let ok = sync(&ctx, &mut index, desired).await?;
                        if let Some(k) = kube.as_mut() {
                            k.after_sync(&ctx, ok).await;
                        }
                        retry = if ok {
                            None
                        } else {
                            let first = Duration::from_millis(200);
                            Some((tokio::time::Instant::now() + first, first))
                        };
                    }
                }
            }
        }
    }
    for t in tasks {
        t.abort();
    }
    // Tear down before stopping the admin server: the Reset call waits for this answer, and a
    // graceful shutdown waits for that call.
    let mut outcome = Ok(());
    if let Some(reply) = reset_reply {
        let dp = ctx.dataplane.clone();
        let cfg = ctx.dataplane_config.clone();
        let result = blocking(move || {
            // Dropping the data plane releases the node lock, which reset takes itself.
            drop(dp.lock().unwrap_or_else(|p| p.into_inner()).take());
            dataplane::reset(&cfg)
        })
        .await?;
        let _ = reply.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        match result {
            Ok(()) => info!("data plane torn down on request"),
            Err(e) => outcome = Err(AgentError::Dataplane(e)),
        }
    }
    let _ = stop_tx.send(true);
    let _ = admin.await;
    if let Some(h) = http {
        let _ = h.await;
    }
    let traces = ctx.clone();
    let _ = blocking(move || traces.log.shutdown_traces()).await;
    outcome
}

/// After a Kubernetes enrollment change that (re)loaded the data plane, apply the desired state;
/// returns the retry to schedule when that apply failed.
async fn kube_sync(
    ctx: &Arc<Context>,
    index: &mut Index,
    kube: Option<&mut KubeNode>,
    next: Next,
) -> Result<Option<(tokio::time::Instant, Duration)>, AgentError> {
    let (Next::Sync, Some(k), Some(desired)) = (next, kube, index.desired()) else {
        return Ok(None);
    };
    let ok = sync(ctx, index, desired).await?;
    k.after_sync(ctx, ok).await;
    if ok {
        return Ok(None);
    }
    let first = Duration::from_millis(200);
    Ok(Some((tokio::time::Instant::now() + first, first)))
}

async fn wait_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Apply `desired`; `Ok(false)` when the apply failed and should be retried. One trace span
/// per call.
#[tracing::instrument(name = "sync", skip_all, fields(services = desired.services.len()))]
async fn sync(
    ctx: &Arc<Context>,
    index: &mut Index,
    desired: DesiredState,
) -> Result<bool, AgentError> {
    let dp = ctx.dataplane.clone();
    let want = desired.clone();
    let started = Instant::now();
    let result = blocking(move || {
        let mut guard = dp.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().map(|d| d.apply(&want))
    })
    .await?;
    let elapsed = started.elapsed();
    match result {
        None => Ok(true),
        Some(Ok(stats)) => {
            ctx.metrics.sync_duration.observe(elapsed.as_secs_f64());
            Metrics::inc(&ctx.metrics.syncs, "applied");
            ctx.metrics.ready.set(1);
            info!(
                services = desired.services.len(),
                upserted = stats.services_upserted,
                removed = stats.services_removed,
                backends_written = stats.backends_written,
                duration_us = stats.duration.as_micros() as u64,
                "synced"
            );
            index.applied(desired.clone());
            // The parsed source and the diff of a large sync are freed by now.
            crate::dataplane::sys::release_free_memory();
            ctx.with_status(|s| {
                s.ready = true;
                s.syncs += 1;
                s.last_error = None;
                s.applied = desired;
            });
            Ok(true)
        }
        Some(Err(e)) => {
            error!(error = %e, "apply failed; the maps keep their previous content where not yet written");
            Metrics::inc(&ctx.metrics.syncs, "failed");
            index.apply_failed();
            ctx.with_status(|s| s.last_error = Some(e.to_string()));
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_prints_the_kernel_reason_after_the_action() {
        let e = AgentError::Bpffs(BpffsError::Mount {
            path: "/sys/fs/bpf".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        let text = with_causes(&e);
        assert!(
            text.starts_with("failed to mount bpffs at /sys/fs/bpf"),
            "{text}"
        );
        assert!(
            text.ends_with("Operation not permitted (os error 1)"),
            "{text}"
        );
    }
}
