//! bpffs: the check that the agent's pins land on a bpffs, and `meshlet-agent mount-bpffs`,
//! which mounts one where none is (as Cilium's `mount-bpf-fs` init container does).
//!
//! ```text
//!  mount-bpffs --path P ─► statfs(P) == BPF_FS_MAGIC? ─ yes ─► nothing to do
//!                                                   └─ no ──► mkdir -p P, mount -t bpf bpffs P
//!  run / preflight ─► require_bpffs(--bpffs-root) ─► nearest existing ancestor on bpffs, or refuse
//! ```
//!
//! In the DaemonSet the init container mounts with `mountPropagation: Bidirectional`, so the
//! mount reaches the node and outlives the pod; the agent sees it through `HostToContainer`.

use std::path::{Path, PathBuf};

/// `statfs` magic of bpffs (`BPF_FS_MAGIC`).
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of checking or mounting bpffs.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    /// `statfs` failed.
    #[error("failed to statfs {path}")]
    Statfs {
        /// Path examined.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The pins would land on another filesystem and vanish with it (or with the container).
    #[error(
        "refusing to pin under {root}: {dir} is not on a bpffs (filesystem type {found:#x}); mount one with `meshlet-agent mount-bpffs --path {dir}` or `mount -t bpf bpffs {dir}`"
    )]
    NotBpffs {
        /// The bpffs root asked for.
        root: PathBuf,
        /// Its nearest existing ancestor (or itself), which was examined.
        dir: PathBuf,
        /// Filesystem type found.
        found: i64,
    },
    /// The mount point could not be created.
    #[error("failed to create the bpffs mount point {path}")]
    CreateMountPoint {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `mount(2)` failed.
    #[error(
        "failed to mount bpffs at {path} (needs CAP_SYS_ADMIN; in Kubernetes a privileged init container)"
    )]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The mount call succeeded but the path still is not a bpffs.
    #[error("mounted bpffs at {path}, but the path still shows filesystem type {found:#x}")]
    StillNotBpffs {
        /// Mount point.
        path: PathBuf,
        /// Filesystem type found after mounting.
        found: i64,
    },
}

/// What [`mount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// The path already was on a bpffs.
    AlreadyThere,
    /// A bpffs was mounted there.
    Mounted,
}

/// The `statfs` magic number of the filesystem holding `path`.
pub fn filesystem_magic(path: &Path) -> nix::Result<i64> {
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is i64 on x86_64 but i32 or u32 on other targets"
    )]
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 as i64)
}

fn fs_type(path: &Path) -> Result<i64, BpffsError> {
    filesystem_magic(path).map_err(|e| BpffsError::Statfs {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    })
}

/// Checks that `root` (or, while it does not exist yet, its nearest existing ancestor) is on
/// a bpffs, so pins are not silently written into a tmpfs or the container's filesystem.
pub fn require_bpffs(root: &Path) -> Result<(), BpffsError> {
    let mut dir = root;
    while !dir.exists() {
        match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
            _ => break,
        }
    }
    let found = fs_type(dir)?;
    if found != BPF_FS_MAGIC {
        return Err(BpffsError::NotBpffs {
            root: root.to_path_buf(),
            dir: dir.to_path_buf(),
            found,
        });
    }
    Ok(())
}

/// Mounts a bpffs at `path` unless it already is on one (idempotent).
pub fn mount(path: &Path) -> Result<Mounted, BpffsError> {
    std::fs::create_dir_all(path).map_err(|source| BpffsError::CreateMountPoint {
        path: path.to_path_buf(),
        source,
    })?;
    if fs_type(path)? == BPF_FS_MAGIC {
        return Ok(Mounted::AlreadyThere);
    }
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| BpffsError::Mount {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    })?;
    let found = fs_type(path)?;
    if found != BPF_FS_MAGIC {
        return Err(BpffsError::StillNotBpffs {
            path: path.to_path_buf(),
            found,
        });
    }
    Ok(Mounted::Mounted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_outside_a_bpffs_are_refused_naming_the_directory_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("meshlet");
        let err = require_bpffs(&root).expect_err("a temporary directory is no bpffs");
        let text = err.to_string();
        assert!(text.contains(&root.display().to_string()), "{text}");
        assert!(
            text.contains(&format!(
                "meshlet-agent mount-bpffs --path {}",
                dir.path().display()
            )),
            "{text}"
        );
    }
}
