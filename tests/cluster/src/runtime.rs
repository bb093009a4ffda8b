//! The container runtime of the simulated kubelet: images unpacked once, an overlay root per
//! container, and `runc` running the OCI runtime spec that [`crate::spec`] built.
//!
//! ```text
//!  image ref ─► ImageStore::get ─► <images dir>/<ref>.tar ─► unpacked once per digest
//!                                                              │ lowerdir
//!  Container::start ─► overlay <ctr dir>/rootfs ◄──────────────┘ upper/work per container
//!        │            config.json (spec::build) ─► runc --root <state> run --bundle <ctr dir>
//!        │            stdout+stderr ─► the container's log file (append)
//!        ▼
//!  Container { pid (runc --pid-file) } ── wait() ◄─ runc exits with the container
//!                                     ── stop(grace): runc kill TERM … KILL, unmount overlay
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshlet_oci::Image;
use serde_json::Value;

/// Failures of the runtime; the kubelet turns them into container waiting reasons.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image is not in the images directory (`ErrImagePull`).
    #[error(
        "failed to pull image {reference:?}: not found: no archive {path} (build the images with `cargo xtask images`)"
    )]
    ImageNotFound {
        /// Image reference.
        reference: String,
        /// Where its archive was looked for.
        path: PathBuf,
    },
    /// The archive exists but cannot be read or unpacked (`ErrImagePull`).
    #[error("failed to pull image {reference:?}: {source}")]
    ImageUnreadable {
        /// Image reference.
        reference: String,
        /// Underlying error.
        #[source]
        source: meshlet_oci::OciError,
    },
    /// Preparing the container's files failed (`RunContainerError`).
    #[error("failed to prepare {what} {path}: {source}")]
    Prepare {
        /// What was being prepared.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The overlay root could not be mounted.
    #[error("failed to mount the container root at {path}: {source}")]
    Overlay {
        /// Mount point.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
    /// runc could not be started.
    #[error("failed to run runc (is it installed? apt-get install runc): {0}")]
    Runc(#[source] std::io::Error),
    /// runc started but the container never did (`RunContainerError`).
    #[error("runc failed to create container {id}: {message}")]
    Create {
        /// Container id.
        id: String,
        /// runc's own error output.
        message: String,
    },
}

/// Unpacked images, by digest, shared by every container of the cluster.
pub struct ImageStore {
    dir: PathBuf,
    cache: PathBuf,
    unpacked: Mutex<HashMap<String, Arc<UnpackedImage>>>,
}

/// One image, unpacked.
pub struct UnpackedImage {
    /// The image (config, digest).
    pub image: Image,
    /// Its unpacked root filesystem (read-only lower layer of every container).
    pub rootfs: PathBuf,
}

impl ImageStore {
    /// Images from the archives in `dir`, unpacked under `cache`.
    pub fn new(dir: PathBuf, cache: PathBuf) -> Self {
        Self {
            dir,
            cache,
            unpacked: Mutex::new(HashMap::new()),
        }
    }

    /// The directory of image archives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// "Pulls" `reference`: opens its archive and unpacks it once.
    pub fn get(&self, reference: &str) -> Result<Arc<UnpackedImage>, RuntimeError> {
        let path = meshlet_oci::archive_path(&self.dir, reference);
        if !path.is_file() {
            return Err(RuntimeError::ImageNotFound {
                reference: reference.into(),
                path,
            });
        }
        let unreadable = |source| RuntimeError::ImageUnreadable {
            reference: reference.into(),
            source,
        };
        let image = Image::open(&path).map_err(unreadable)?;
        let digest = image.digest().replace(':', "-");
        let mut unpacked = self
            .unpacked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(u) = unpacked.get(&digest) {
            return Ok(u.clone());
        }
        let rootfs = self.cache.join(&digest);
        if !rootfs.join(".complete").exists() {
            let _ = std::fs::remove_dir_all(&rootfs);
            image.unpack(&rootfs).map_err(unreadable)?;
            std::fs::write(rootfs.join(".complete"), b"").map_err(|source| {
                RuntimeError::Prepare {
                    what: "image cache",
                    path: rootfs.clone(),
                    source,
                }
            })?;
        }
        let u = Arc::new(UnpackedImage { image, rootfs });
        unpacked.insert(digest, u.clone());
        Ok(u)
    }
}

/// Mounts an overlay of `lower` at `<dir>/rootfs` with its upper and work directories in
/// `dir`; returns the mount point.
pub fn mount_rootfs(lower: &Path, dir: &Path) -> Result<PathBuf, RuntimeError> {
    let prep = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| RuntimeError::Prepare { what, path, source }
    };
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(prep("container directory", d))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|source| RuntimeError::Overlay {
        path: merged.clone(),
        source,
    })?;
    Ok(merged)
}

/// Unmounts (lazily) whatever is mounted at `path`; missing mounts are fine.
pub fn unmount(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// A running container: `runc run` in the foreground, so its exit is the container's.
pub struct Container {
    /// runc's container id.
    pub id: String,
    /// Host pid of the container's first process.
    pub pid: u32,
    runc_root: PathBuf,
    child: tokio::process::Child,
    bundle: PathBuf,
    log: PathBuf,
}

/// Where runc keeps the state of the cluster's containers.
pub fn runc_command(root: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("runc");
    cmd.arg("--root").arg(root);
    cmd
}

impl Container {
    /// Writes `spec` as `<bundle>/config.json` and starts it with runc; output is appended
    /// to `log`. Returns once the container's process exists.
    pub async fn start(
        id: &str,
        runc_root: &Path,
        bundle: &Path,
        spec: &Value,
        log: &Path,
    ) -> Result<Self, RuntimeError> {
        let prep = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| RuntimeError::Prepare { what, path, source }
        };
        let config = bundle.join("config.json");
        let text = serde_json::to_vec_pretty(spec).map_err(|e| RuntimeError::Prepare {
            what: "runtime spec",
            path: config.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&config, text).map_err(prep("runtime spec", &config))?;
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent).map_err(prep("log directory", parent))?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(prep("log file", log))?;
        let err = out.try_clone().map_err(prep("log file", log))?;
        let pid_file = bundle.join("pid");
        let _ = std::fs::remove_file(&pid_file);
        // A container of this id left over from a crash would make `run` fail.
        let _ = runc_command(runc_root)
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        let mut child = runc_command(runc_root)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(RuntimeError::Runc)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                break pid;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return Err(RuntimeError::Create {
                    id: id.into(),
                    message: tail(log, 6),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.start_kill();
                return Err(RuntimeError::Create {
                    id: id.into(),
                    message: "no container process after 30 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        Ok(Self {
            id: id.into(),
            pid,
            runc_root: runc_root.into(),
            child,
            bundle: bundle.into(),
            log: log.into(),
        })
    }

    /// Waits for the container to exit; its exit code (128 + signal when killed).
    pub async fn wait(&mut self) -> i32 {
        match self.child.wait().await {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code()
                    .or_else(|| s.signal().map(|sig| 128 + sig))
                    .unwrap_or(-1)
            }
            Err(_) => -1,
        }
    }

    /// Sends `signal` (e.g. `TERM`, `KILL`) to the container's first process, as containerd
    /// stops a container (`KILL` to the first process of a pid namespace ends all of it).
    /// Not `runc kill --all`: on cgroup v1 that freezes the container, which interrupts
    /// system calls with timeouts (EINTR) where a real node would not.
    pub async fn kill(&self, signal: &str) {
        let _ = runc_command(&self.runc_root)
            .args(["kill", &self.id, signal])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    /// Stops the container as a kubelet does: SIGTERM, SIGKILL after `grace`; returns the
    /// exit code.
    pub async fn stop(&mut self, grace: Duration) -> i32 {
        self.kill("TERM").await;
        if let Ok(code) = tokio::time::timeout(grace, self.wait()).await {
            return code;
        }
        self.kill("KILL").await;
        match tokio::time::timeout(Duration::from_secs(10), self.wait()).await {
            Ok(code) => code,
            Err(_) => {
                let _ = self.child.start_kill();
                -1
            }
        }
    }

    /// The last lines of the container's log (for `terminated.message`).
    pub fn log_tail(&self) -> String {
        tail(&self.log, 6)
    }

    /// Removes what runc keeps of the container and unmounts its root.
    pub async fn remove(self) {
        let _ = runc_command(&self.runc_root)
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        unmount(&self.bundle.join("rootfs"));
    }
}

/// The last `n` non-empty lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The mount point of the cgroup2 hierarchy in this process's mount namespace (the one whose
/// root covers the whole hierarchy), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fields: Vec<&str> = pre.split(' ').collect();
        (post.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
            .then(|| fields.get(4).map(|p| PathBuf::from(unescape(p))))?
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
