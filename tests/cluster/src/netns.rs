//! Pod network namespaces: what a pod without `hostNetwork` gets instead of a CNI network.
//!
//! ```text
//!  PodNetwork::create ─► unshare(CLONE_NEWNET) in a thread, bind-mount its ns at <pod>/netns
//!        │               lo up; lo carries the pod IP and 10.96.0.1 (the `kubernetes` VIP)
//!        ▼
//!  api proxy: listener on 10.96.0.1:443 inside the namespace ──► API server on 127.0.0.1
//!             (as kube-proxy makes the `kubernetes` Service reach the API server)
//!  connect_in(ns, addr): probes reach the pod's own ports from inside its namespace
//! ```
//!
//! Every container of the pod joins this namespace (runc `network` namespace path), as they
//! join the pause container's on a real node. The namespace has only loopback: pods reach
//! each other only through host-network pods' addresses, which is all Meshlet's tests need.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use tokio::task::JoinHandle;

/// The address pods reach the API server at (`KUBERNETES_SERVICE_HOST`).
pub const API_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The port of the `kubernetes` Service.
pub const API_SERVICE_PORT: u16 = 443;

/// Failures of setting up a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A step failed.
    #[error("failed to {what} for pod network {path}: {source}")]
    Step {
        /// What was being done.
        what: &'static str,
        /// The namespace file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A pod's network namespace and its API server proxy.
pub struct PodNetwork {
    /// The namespace file (bind mount of the namespace).
    pub path: PathBuf,
    proxy: JoinHandle<()>,
}

fn step(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetnsError {
    let path = path.to_path_buf();
    move |source| NetnsError::Step { what, path, source }
}

/// Runs `f` on a fresh thread inside the network namespace at `ns`.
pub async fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&ns)?;
        // The thread is thrown away afterwards: it never returns to the host namespace.
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
        })
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Connects to `addr` from inside the network namespace at `ns`.
pub async fn connect_in(ns: &Path, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = in_netns(ns, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    tokio::net::TcpStream::from_std(s)
}

impl PodNetwork {
    /// Creates the namespace at `path` with loopback up carrying `pod_ip`, and proxies
    /// `10.96.0.1:443` inside it to `api` on the host.
    pub async fn create(
        path: &Path,
        pod_ip: Ipv4Addr,
        api: SocketAddr,
    ) -> Result<Self, NetnsError> {
        std::fs::File::create(path).map_err(step("create the namespace file", path))?;
        let target = path.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                    nix::mount::mount(
                        Some("/proc/thread-self/ns/net"),
                        &target,
                        None::<&str>,
                        nix::mount::MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(std::io::Error::from)
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
            })
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(step("create the namespace", path))?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{pod_ip}/32"), "dev", "lo"],
            vec!["addr", "add", &format!("{API_SERVICE_IP}/32"), "dev", "lo"],
        ] {
            let out = tokio::process::Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .arg("ip")
                .args(&args)
                .output()
                .await
                .map_err(step("run nsenter ip", path))?;
            if !out.status.success() {
                return Err(NetnsError::Step {
                    what: "configure loopback",
                    path: path.into(),
                    source: std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).into_owned(),
                    ),
                });
            }
        }
        let listener = in_netns(path, || {
            let l = std::net::TcpListener::bind((API_SERVICE_IP, API_SERVICE_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .await
        .map_err(step("listen on the kubernetes Service address", path))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(step("register the proxy", path))?;
        let proxy = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(api).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self {
            path: path.into(),
            proxy,
        })
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.proxy.abort();
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.path);
    }
}
