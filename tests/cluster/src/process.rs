//! Container processes: spawned into a node's cgroup, logged to a file, stopped gracefully.
//!
//! ```text
//!  sh -c 'echo $$ > <cgroup>/cgroup.procs && exec "$@"' <procs> PROGRAM ARGS…
//!   │        (the shell joins the cgroup, then becomes the program: same pid)
//!   ├── stdout ─────────────────────────────► <run_dir>/<pod>_<container>.log
//!   └── stderr ──► tail (last lines kept) ──► <run_dir>/<pod>_<container>.log
//! ```
//!
//! Each process leads its own process group, so stopping it also stops anything it forked.
//! Cgroup and bpffs directories are removed with [`remove_cgroup`] and [`remove_bpffs_dir`].

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Lines of stderr kept for an init container's termination message.
const TAIL_LINES: usize = 10;
/// `PATH` of every container process.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Failures of starting, stopping or cleaning up processes and their directories.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be opened.
    #[error("failed to open the container log {path}")]
    OpenLog {
        /// Log path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be spawned.
    #[error("failed to start {program}")]
    Spawn {
        /// Program.
        program: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("failed to remove cgroup {path}: {reason}")]
    RemoveCgroup {
        /// Cgroup directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A bpffs directory could not be removed.
    #[error("failed to remove bpffs directory {path}")]
    RemoveBpffs {
        /// Directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A running container process.
#[derive(Debug)]
pub struct Process {
    child: tokio::process::Child,
    /// Process id (also its process group id).
    pub pid: u32,
    tail: Arc<Mutex<VecDeque<String>>>,
    tail_task: Option<tokio::task::JoinHandle<()>>,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// cgroup v2 directory to place the process in.
    pub cgroup: &'a Path,
    /// Program and arguments.
    pub argv: &'a [String],
    /// Complete environment (plus `PATH`/`HOME` when absent).
    pub env: &'a BTreeMap<String, String>,
    /// Log file (appended).
    pub log: &'a Path,
}

/// Starts `launch.argv` inside `launch.cgroup`.
pub fn spawn(launch: &Launch<'_>) -> Result<Process, ProcessError> {
    let program = launch.argv.first().cloned().unwrap_or_default();
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(launch.log)
            .map_err(|source| ProcessError::OpenLog {
                path: launch.log.to_path_buf(),
                source,
            })
    };
    let mut stdout = open()?;
    let mut log = open()?;
    let _ = writeln!(
        stdout,
        "--- local-cluster: starting {}",
        launch.argv.join(" ")
    );
    let procs = launch.cgroup.join("cgroup.procs");
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$0\" && exec \"$@\"")
        .arg(&procs)
        .args(launch.argv)
        .env_clear()
        .env("PATH", CONTAINER_PATH)
        .env("HOME", "/root")
        .envs(launch.env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or_default();
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let tail_task = child.stderr.take().map(|stderr| {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
                if let Ok(mut t) = tail.lock() {
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        })
    });
    Ok(Process {
        child,
        pid,
        tail,
        tail_task,
    })
}

impl Process {
    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        // Let the stderr reader drain what the process wrote before it exited.
        if let Some(t) = self.tail_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        status
    }

    /// The last lines the process wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// SIGTERM to the process group, SIGKILL after `grace`; returns once it exited.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pgid = Pid::from_raw(self.pid as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            let _ = killpg(pgid, Signal::SIGKILL);
            return status.ok();
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        self.child.wait().await.ok()
    }
}

/// Sends `signal` to one process.
pub fn signal(pid: u32, signal: Signal) -> Result<(), nix::Error> {
    kill(Pid::from_raw(pid as i32), signal)
}

/// The root of the cgroup v2 hierarchy holding `dir` (the topmost ancestor that is a cgroup).
pub fn cgroup_root(dir: &Path) -> PathBuf {
    let mut root = dir.to_path_buf();
    let mut cur = dir;
    while let Some(parent) = cur.parent() {
        if parent.join("cgroup.procs").exists() {
            root = parent.to_path_buf();
        }
        cur = parent;
    }
    root
}

/// Process ids in a cgroup (not its children).
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Removes a cgroup directory and its children. Processes still inside (not started by us:
/// a test's client, say) are moved to the hierarchy's root first, never killed; cgroups whose
/// processes are still exiting are retried for up to `wait`.
pub fn remove_cgroup(dir: &Path, wait: Duration) -> Result<(), ProcessError> {
    if !dir.exists() {
        return Ok(());
    }
    let root = cgroup_root(dir);
    let deadline = Instant::now() + wait;
    loop {
        match remove_cgroup_once(dir, &root) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(ProcessError::RemoveCgroup {
                    path: dir.to_path_buf(),
                    reason: e.to_string(),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn remove_cgroup_once(dir: &Path, root: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_once(&entry.path(), root)?;
        }
    }
    for pid in cgroup_pids(dir) {
        // The process may exit meanwhile; the next round sees.
        let _ = std::fs::write(root.join("cgroup.procs"), pid.to_string());
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes a bpffs directory with everything pinned under it.
pub fn remove_bpffs_dir(dir: &Path) -> Result<(), ProcessError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ProcessError::RemoveBpffs {
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Files pinned (recursively) under a bpffs directory.
pub fn pins_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}
