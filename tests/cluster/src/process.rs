//! Host-side helpers of the local cluster: signals to container processes, removing the
//! nodes' cgroups, and listing pins under a bpffs directory.
//!
//! ```text
//!  LocalCluster::kill_container ─► signal(pid)
//!  shutdown / drop ─► remove_cgroup(<cgroup base>): processes we did not start are moved to
//!                     the hierarchy's root, never killed; then the directories, deepest first
//!  tests ─► pins_under(<node bpffs>)
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Failures of cleaning up the nodes' cgroups.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A cgroup directory could not be removed.
    #[error("failed to remove cgroup {path}: {reason}")]
    RemoveCgroup {
        /// Cgroup directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
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
