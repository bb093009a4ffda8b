//! The IPsec task of the agent for the standalone source: polls the file, reconciles xfrm on
//! every change, and reports status (log lines and, optionally, a JSON status file).
//!
//! ```text
//!  start: connect (netlink, or the recording test hook: backend.rs) ─► list_own (adopt:
//!         nothing is flushed)
//!  every poll: file changed? ─► parse `ipsec:` ─► wanted ─► list_own ─► plan ─► apply
//!                                  │ invalid: report, keep the kernel as it is
//!                                  └ no `ipsec:` section: remove exactly the own objects
//!  a failed apply is retried every RETRY; the status carries the error meanwhile.
//! ```

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::backend::Backend;
use super::reconcile::{self, apply, plan, wanted};
use super::xfrm::Xfrm;
use super::{IpsecConfig, IpsecStatus};
use crate::source::standalone::parse_ipsec;

/// Environment variable naming a file the task writes its [`IpsecStatus`] to (JSON).
pub const STATUS_FILE_ENV: &str = "MESHLET_IPSEC_STATUS";
/// Delay before a failed apply of an unchanged file is tried again.
pub const RETRY: Duration = Duration::from_secs(5);
/// How often the status (counters) is refreshed without a change.
pub const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// Errors of one reconcile pass, named for the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The kernel could not be reached or listed.
    #[error(transparent)]
    Xfrm(#[from] super::xfrm::XfrmError),
    /// The configuration cannot be turned into SAs.
    #[error(transparent)]
    Wanted(#[from] reconcile::WantedError),
    /// Applying failed.
    #[error(transparent)]
    Apply(#[from] reconcile::ApplyError),
}

/// One reconcile pass: list the own objects, diff, apply. Returns the stats of the apply.
pub async fn reconcile_once<X: Xfrm>(
    x: &mut X,
    cfg: Option<&IpsecConfig>,
) -> Result<reconcile::ApplyStats, PassError> {
    let want = wanted(cfg)?;
    let observed = x.list_own().await?;
    let p = plan(&want, &observed, cfg.map(|c| c.local_address));
    Ok(apply(x, &p).await?)
}

fn write_status(path: &Option<PathBuf>, st: &IpsecStatus) {
    let Some(path) = path else { return };
    let Ok(json) = serde_json::to_vec(st) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path)) {
        warn!(path = %path.display(), error = %e, "failed to write the IPsec status file");
    }
}

async fn refresh_status<X: Xfrm>(
    x: &mut X,
    cfg: Option<&IpsecConfig>,
    error: Option<String>,
) -> IpsecStatus {
    match x.list_own().await {
        Ok(obs) => reconcile::status(cfg, &obs, error),
        Err(e) => IpsecStatus {
            error: Some(error.unwrap_or_else(|| e.to_string())),
            ..IpsecStatus::default()
        },
    }
}

/// Run the IPsec task for the standalone file at `path` until the future is dropped.
pub async fn run_standalone(path: PathBuf, poll: Duration) {
    let status_file = std::env::var_os(STATUS_FILE_ENV).map(PathBuf::from);
    let mut xfrm: Option<Backend> = None;
    let mut connect_warned = false;
    let mut last_hash: Option<u64> = None;
    let mut cfg: Option<IpsecConfig> = None;
    let mut parse_error: Option<String> = None;
    let mut apply_error: Option<(String, Instant)> = None;
    let mut last_status = Instant::now() - STATUS_REFRESH;
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => Some(t),
            Err(e) => {
                if last_hash != Some(u64::MAX) {
                    error!(path = %path.display(), error = %e, "cannot read the standalone file; IPsec keeps its current state");
                    last_hash = Some(u64::MAX);
                }
                None
            }
        };
        let mut changed = false;
        if let Some(text) = text {
            let mut h = DefaultHasher::new();
            text.hash(&mut h);
            let hash = h.finish();
            if last_hash != Some(hash) {
                last_hash = Some(hash);
                match parse_ipsec(&path.display().to_string(), &text, base_dir(&path)) {
                    Ok(new) => {
                        parse_error = None;
                        if new != cfg || xfrm.is_none() {
                            cfg = new;
                            changed = true;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "ipsec section refused; IPsec keeps its current state");
                        parse_error = Some(e.to_string());
                    }
                }
            }
        }
        let retry_due = apply_error
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= RETRY);
        if xfrm.is_none() && (changed || retry_due) {
            match Backend::from_env() {
                Ok(mut x) => match x.list_own().await {
                    Ok(obs) => {
                        info!(
                            states = obs.states.len(),
                            policies = obs.policies.len(),
                            "IPsec: adopted the own xfrm states and policies found (nothing flushed)"
                        );
                        xfrm = Some(x);
                    }
                    Err(e) if cfg.is_some() || !connect_warned => {
                        warn!(error = %e, "IPsec unavailable");
                        connect_warned = true;
                        apply_error = Some((e.to_string(), Instant::now()));
                    }
                    Err(_) => {}
                },
                Err(e) => {
                    if cfg.is_some() || !connect_warned {
                        warn!(error = %e, "IPsec unavailable");
                        connect_warned = true;
                    }
                    apply_error = Some((e.to_string(), Instant::now()));
                }
            }
        }
        let Some(x) = xfrm.as_mut() else { continue };
        if changed || retry_due {
            match reconcile_once(x, cfg.as_ref()).await {
                Ok(stats) => {
                    apply_error = None;
                    if stats != reconcile::ApplyStats::default() {
                        info!(
                            states_added = stats.states_added,
                            states_deleted = stats.states_deleted,
                            policies_set = stats.policies_set,
                            policies_deleted = stats.policies_deleted,
                            duration_us = stats.duration.as_micros() as u64,
                            "IPsec synced"
                        );
                    }
                }
                Err(e) => {
                    error!(error = %e, "IPsec apply failed");
                    apply_error = Some((e.to_string(), Instant::now()));
                }
            }
            last_status = Instant::now() - STATUS_REFRESH;
        }
        if status_file.is_some() && last_status.elapsed() >= STATUS_REFRESH {
            let err = parse_error
                .clone()
                .or_else(|| apply_error.as_ref().map(|(m, _)| m.clone()));
            let st = refresh_status(x, cfg.as_ref(), err).await;
            write_status(&status_file, &st);
            last_status = Instant::now();
        }
    }
}

fn base_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Errors of the IPsec-only mode (`meshlet-agent ipsec`).
#[derive(Debug, thiserror::Error)]
pub enum IpsecOnlyError {
    /// No file to read the `ipsec:` section from.
    #[error("`meshlet-agent ipsec` needs --standalone FILE (a file with an `ipsec:` section)")]
    NoStandaloneFile,
    /// The tokio runtime could not be built.
    #[error("failed to build the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A signal handler could not be installed.
    #[error("failed to install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// `meshlet-agent ipsec`: run only the IPsec task (no eBPF data plane) until SIGTERM/SIGINT.
/// The xfrm states and policies stay in place on exit; the next start adopts them.
pub fn main(args: &crate::config::AgentArgs) -> std::process::ExitCode {
    match run_ipsec_only(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-agent ipsec: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_ipsec_only(args: &crate::config::AgentArgs) -> Result<(), IpsecOnlyError> {
    use tokio::signal::unix::{SignalKind, signal};
    let path = args
        .standalone
        .clone()
        .ok_or(IpsecOnlyError::NoStandaloneFile)?;
    let poll = Duration::from_millis(args.standalone_poll_ms.max(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(IpsecOnlyError::Runtime)?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate()).map_err(IpsecOnlyError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(IpsecOnlyError::Signals)?;
        info!(path = %path.display(), "IPsec-only mode: no eBPF data plane is loaded");
        tokio::select! {
            () = run_standalone(path, poll) => {}
            _ = term.recv() => info!("SIGTERM: exiting, xfrm states and policies stay in place"),
            _ = int.recv() => info!("SIGINT: exiting, xfrm states and policies stay in place"),
        }
        Ok(())
    })
}
