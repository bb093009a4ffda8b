//! A local multi-node **test** cluster for Meshlet's end-to-end tests and demo. Not for
//! production: production means a real Kubernetes cluster.
//!
//! It starts the in-process API test server (`meshlet-test-apiserver`, HTTPS with a CA of its
//! own), registers simulated Nodes, and plays the parts of a cluster Meshlet needs: the
//! DaemonSet and Deployment controllers and, for every Pod bound to a simulated node, the
//! kubelet. The kubelet runs each container from its OCI image with `runc`, translating the
//! PodSpec the way containerd's CRI plugin does; a pod sees what a real kubelet gives it and
//! nothing more.
//!
//! ```text
//!   kubectl / operator / agents ──HTTPS──► TestApiServer (in process)
//!                                              ▲      │ watch
//!             status (DaemonSet, Deployment)   │      ▼
//!          controllers::run ◄─── watch ────────┤  DaemonSets, Deployments, Nodes, Pods
//!             │ create / delete Pods           │
//!             ▼                                │ status (Pod)
//!          kubelet::run ── per Pod worker ─────┘
//!             │ runtime::ImageStore (<images dir>/<ref>.tar, unpacked once)
//!             │ volumes::prepare (hostPath on the node's root, emptyDir, SA token)
//!             │ netns::PodNetwork (pods without hostNetwork)
//!             ▼ spec::build (OCI runtime spec)
//!          runtime::Container ──► runc run: namespaces, cgroup <node cgroup>/kubepods/…,
//!                                 logs in <node root>/var/log/pods/…
//! ```
//!
//! Each node has a "host" root of its own (a shared mount): a hostPath `/sys/fs/bpf` of a pod
//! on node-2 is `<dir>/node-2/root/sys/fs/bpf`, and `/sys/fs/cgroup` is node-2's cgroup2
//! subtree. All nodes share this machine's network namespace, each with its own loopback
//! address.
//!
//! Use [`LocalCluster::start`] from tests, or the `meshlet-local-cluster` binary
//! (`hack/local-cluster up|down|status`) by hand and from the demo.

pub mod controllers;
pub mod images;
pub mod kubelet;
pub mod netns;
pub mod process;
pub mod runtime;
pub mod spec;
pub mod volumes;
pub mod xfrm;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use meshlet_test_apiserver::{ServerError, ServerOptions, TestApiServer};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use images::default_images_dir;
pub use nix::sys::signal::Signal;

/// Name of the directory, under the cgroup2 mount, holding the local clusters' node cgroups.
pub const CGROUP_PARENT: &str = "meshlet-local";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Failures of starting, driving or stopping the local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API test server did not start.
    #[error("failed to start the API test server")]
    StartApiServer(#[source] ServerError),
    /// A kube client could not be built.
    #[error("failed to build a kube client")]
    BuildClient(#[source] ServerError),
    /// A directory of the cluster could not be created.
    #[error("failed to create {what} directory {path}")]
    CreateDir {
        /// Which directory (cgroup, node root, run).
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No cgroup2 hierarchy is mounted on this machine.
    #[error("no cgroup2 mount found in /proc/self/mountinfo: the local cluster needs cgroup v2")]
    NoCgroup2,
    /// A node's root could not be made a shared mount.
    #[error("failed to make the node root {path} a shared mount (mountPropagation needs it)")]
    SharedRoot {
        /// The node root.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
    /// A Node object could not be registered or removed.
    #[error("failed to register node {node}")]
    RegisterNode {
        /// Node name.
        node: String,
        /// Underlying error.
        #[source]
        source: kube::Error,
    },
    /// No such simulated node.
    #[error("no simulated node named {0:?}")]
    UnknownNode(String),
    /// No running process for that pod container.
    #[error("no running process for container {container:?} of pod {namespace}/{pod}")]
    NoProcess {
        /// Namespace.
        namespace: String,
        /// Pod.
        pod: String,
        /// Container.
        container: String,
    },
    /// A signal could not be sent.
    #[error("failed to send {signal:?} to pid {pid}")]
    Signal {
        /// Target pid.
        pid: u32,
        /// Signal.
        signal: Signal,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
    /// A file of a node could not be written.
    #[error("failed to write {path}")]
    WriteFile {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Cleaning up a directory failed.
    #[error(transparent)]
    Cleanup(#[from] process::ProcessError),
}

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of simulated nodes, named `node-1`, `node-2`, ….
    pub nodes: usize,
    /// Extra labels put on every node.
    pub node_labels: BTreeMap<String, String>,
    /// Directory of image archives (`cargo xtask images`); [`default_images_dir`] when `None`.
    pub images_dir: Option<PathBuf>,
    /// Directory for kubeconfigs, the nodes' roots and state; a temporary directory (removed
    /// at shutdown) when `None`.
    pub dir: Option<PathBuf>,
    /// Name of this cluster, used in the default cgroup path; unique per process when `None`.
    pub cluster_id: Option<String>,
    /// Parent of the nodes' cgroups (default `<cgroup2 mount>/meshlet-local/<id>`).
    pub cgroup_base: Option<PathBuf>,
    /// TCP port of the API server on 127.0.0.1 (0: any free port).
    pub api_port: u16,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            node_labels: BTreeMap::new(),
            images_dir: None,
            dir: None,
            cluster_id: None,
            cgroup_base: None,
            api_port: 0,
        }
    }
}

/// One simulated node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    /// Node name (`node-<i>`).
    pub name: String,
    /// The node's cgroup2 subtree: what `/sys/fs/cgroup` is on this node. Its pods' cgroups
    /// are below it (`kubepods/pod<uid>/<container>`).
    pub cgroup: PathBuf,
    /// The node's "host" root: a hostPath `/x` of a pod on this node is `<root>/x` (except
    /// `/sys/fs/cgroup`, which is [`SimNode::cgroup`]). A shared mount, so
    /// `mountPropagation` works as on a real node.
    pub root: PathBuf,
    /// Where the agent pins on this node: `<root>/sys/fs/bpf/meshlet` (the MeshConfig's
    /// default `spec.agent.bpffsPath`).
    pub bpffs_root: PathBuf,
    /// The kubelet's state for this node (pod directories, container roots).
    pub run_dir: PathBuf,
    /// InternalIP (`127.0.1.<i>`), also hostIP/podIP of its hostNetwork pods.
    pub address: Ipv4Addr,
}

impl SimNode {
    /// The path on this machine of the node's host path `path` (absolute).
    pub fn host_path(&self, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        match rel.strip_prefix("sys/fs/cgroup") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                self.cgroup.join(rest.trim_start_matches('/'))
            }
            _ => self.root.join(rel),
        }
    }

    /// Where this node's agent keeps its recorded xfrm state when it runs an image with
    /// `MESHLET_IPSEC_XFRM=recording:/run/meshlet/xfrm.json` (the `v1`/`v2` test images):
    /// the node's `/run/meshlet/xfrm.json`.
    pub fn xfrm_path(&self) -> PathBuf {
        self.host_path("/run/meshlet").join(xfrm::FILE_NAME)
    }

    /// The node's `/var/log/pods` directory (`<namespace>_<pod>_<uid>/<container>/<n>.log`).
    pub fn pod_logs_dir(&self) -> PathBuf {
        self.host_path("/var/log/pods")
    }

    /// The agent's admin socket on this node (`/run/meshlet/agent.sock`).
    pub fn admin_socket(&self) -> PathBuf {
        self.host_path("/run/meshlet/agent.sock")
    }
}

/// State shared by the controllers and the kubelet.
pub(crate) struct Shared {
    pub(crate) client: kube::Client,
    pub(crate) server: Arc<TestApiServer>,
    pub(crate) nodes: RwLock<BTreeMap<String, SimNode>>,
    pub(crate) images: runtime::ImageStore,
    pub(crate) pods: Mutex<HashMap<String, kubelet::PodHandle>>,
    /// runc's state directory for this cluster's containers.
    pub(crate) runc_root: PathBuf,
    /// The cgroup2 mount of this machine (runc's cgroupsPath is relative to it).
    pub(crate) cgroup2_mount: PathBuf,
    /// Next pod IP (10.244.0.0/16) for pods without hostNetwork.
    pub(crate) next_pod_ip: AtomicU32,
    /// Signalled whenever a pod worker starts, stops or finishes.
    pub(crate) pods_changed: Notify,
    pub(crate) stop: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn node(&self, name: &str) -> Option<SimNode> {
        self.nodes.read().ok()?.get(name).cloned()
    }
    pub(crate) fn node_names(&self) -> Vec<String> {
        self.nodes
            .read()
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A running local test cluster. Call [`LocalCluster::shutdown`] to stop it cleanly;
/// dropping it kills its containers and removes what it can.
pub struct LocalCluster {
    shared: Arc<Shared>,
    cgroup_base: PathBuf,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    tasks: Vec<JoinHandle<()>>,
    next_node: usize,
    node_labels: BTreeMap<String, String>,
    cleaned: bool,
}

impl LocalCluster {
    /// Starts the API server, registers the nodes (creating their cgroup and root
    /// directories) and starts the controllers and the kubelet.
    pub async fn start(opts: ClusterOptions) -> Result<Self, ClusterError> {
        let id = opts.cluster_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::process::id(),
                NEXT_ID.fetch_add(1, Ordering::SeqCst)
            )
        });
        let (dir, tempdir) = match &opts.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("meshlet-local-cluster-")
                    .tempdir()
                    .map_err(|source| ClusterError::CreateDir {
                        what: "run",
                        path: std::env::temp_dir(),
                        source,
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        create_dir("run", &dir)?;
        let cgroup2_mount = runtime::cgroup2_mount().ok_or(ClusterError::NoCgroup2)?;
        let cgroup_base = opts
            .cgroup_base
            .clone()
            .unwrap_or_else(|| cgroup2_mount.join(CGROUP_PARENT).join(&id));
        let server = TestApiServer::start(ServerOptions {
            port: opts.api_port,
            dir: Some(dir.clone()),
            install_meshlet_crds: true,
            ..ServerOptions::default()
        })
        .await
        .map_err(ClusterError::StartApiServer)?;
        let client = server.client().await.map_err(ClusterError::BuildClient)?;
        let (stop, _) = watch::channel(false);
        let images_dir = opts.images_dir.clone().unwrap_or_else(default_images_dir);
        let shared = Arc::new(Shared {
            client,
            server: Arc::new(server),
            nodes: RwLock::new(BTreeMap::new()),
            images: runtime::ImageStore::new(images_dir, dir.join("images")),
            pods: Mutex::new(HashMap::new()),
            runc_root: dir.join("runc"),
            cgroup2_mount,
            next_pod_ip: AtomicU32::new(2),
            pods_changed: Notify::new(),
            stop,
        });
        let mut cluster = Self {
            shared: shared.clone(),
            cgroup_base,
            dir,
            _tempdir: tempdir,
            tasks: Vec::new(),
            next_node: 0,
            node_labels: opts.node_labels.clone(),
            cleaned: false,
        };
        for _ in 0..opts.nodes {
            cluster.add_node().await?;
        }
        cluster
            .tasks
            .push(tokio::spawn(controllers::run(shared.clone())));
        cluster.tasks.push(tokio::spawn(kubelet::run(shared)));
        Ok(cluster)
    }

    /// Registers one more node (`node-<n+1>`) and returns its name.
    pub async fn add_node(&mut self) -> Result<String, ClusterError> {
        self.add_node_with(|_| Ok(())).await
    }

    /// Registers one more node whose kernel lacks the IPsec algorithms `missing` from its
    /// first agent on (see [`LocalCluster::set_missing_xfrm_algorithms`]).
    pub async fn add_node_missing_xfrm_algorithms(
        &mut self,
        missing: &[&str],
    ) -> Result<String, ClusterError> {
        let list = missing.join("\n") + "\n";
        self.add_node_with(move |n| {
            let path = n.xfrm_path().with_file_name(xfrm::REFUSED_FILE_NAME);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, list)
        })
        .await
    }

    /// Registers one more node after `prepare` has set up its host files, and returns its
    /// name.
    async fn add_node_with(
        &mut self,
        prepare: impl FnOnce(&SimNode) -> std::io::Result<()>,
    ) -> Result<String, ClusterError> {
        self.next_node += 1;
        let i = self.next_node;
        let name = format!("node-{i}");
        let address = Ipv4Addr::new(127, 0, 1, (i % 250) as u8 + u8::from(i >= 250));
        let node_dir = self.dir.join(&name);
        let root = node_dir.join("root");
        let node = SimNode {
            cgroup: self.cgroup_base.join(&name),
            bpffs_root: root.join("sys/fs/bpf/meshlet"),
            run_dir: node_dir.join("kubelet"),
            root: root.clone(),
            address,
            name: name.clone(),
        };
        create_dir("cgroup", &node.cgroup)?;
        create_dir("run", &node.run_dir)?;
        for d in ["sys/fs/bpf", "run", "var/log/pods", "etc"] {
            create_dir("node root", &root.join(d))?;
        }
        make_shared_mount(&root)?;
        prepare(&node).map_err(|source| ClusterError::WriteFile {
            path: root.clone(),
            source,
        })?;
        let mut labels = self.node_labels.clone();
        labels.insert("kubernetes.io/hostname".into(), name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), std::env::consts::ARCH.into());
        let api: Api<Node> = Api::all(self.shared.client.clone());
        let reg = |source| ClusterError::RegisterNode {
            node: name.clone(),
            source,
        };
        let obj: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {},
        }))
        .map_err(|e| reg(kube::Error::SerdeError(e)))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(reg(e)),
        }
        let now = kubelet::now();
        let status = json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": address.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "simulated node of the local test cluster is ready",
                "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "meshlet-local", "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH, "kernelVersion": kernel_version(),
                "containerRuntimeVersion": "runc://local", "osImage": "local",
                "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""},
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(reg)?;
        if let Ok(mut nodes) = self.shared.nodes.write() {
            nodes.insert(name.clone(), node);
        }
        Ok(name)
    }

    /// Makes the simulated kernel of `node` lack the IPsec algorithms `algorithms` (empty:
    /// none missing), as a kernel without the module would: the node's xfrm recording refuses
    /// them. Applies from the agent's next start on that node.
    pub fn set_missing_xfrm_algorithms(
        &self,
        node: &str,
        algorithms: &[&str],
    ) -> Result<(), ClusterError> {
        let n = self.node(node)?;
        let path = n.xfrm_path().with_file_name(xfrm::REFUSED_FILE_NAME);
        let write = |r: std::io::Result<()>| {
            r.map_err(|source| ClusterError::WriteFile {
                path: path.clone(),
                source,
            })
        };
        if let Some(parent) = path.parent() {
            write(std::fs::create_dir_all(parent))?;
        }
        if algorithms.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => write(Err(e))?,
                _ => {}
            }
            return Ok(());
        }
        write(std::fs::write(&path, algorithms.join("\n") + "\n"))
    }

    /// Deletes a node: its Node object goes away, so its DaemonSet pods are deleted and
    /// their processes stopped. Its directories stay until [`LocalCluster::shutdown`].
    pub async fn remove_node(&self, name: &str) -> Result<(), ClusterError> {
        if self.shared.node(name).is_none() {
            return Err(ClusterError::UnknownNode(name.into()));
        }
        let api: Api<Node> = Api::all(self.shared.client.clone());
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(ClusterError::RegisterNode {
                    node: name.into(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// The administrator kubeconfig.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.shared.server.kubeconfig_path
    }

    /// The API server (for ServiceAccount kubeconfigs and tokens).
    pub fn api_server(&self) -> &TestApiServer {
        &self.shared.server
    }

    /// A kube client as the administrator.
    pub fn client(&self) -> kube::Client {
        self.shared.client.clone()
    }

    /// The directory holding kubeconfigs and the nodes' run directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Parent of the nodes' cgroups.
    pub fn cgroup_base(&self) -> &Path {
        &self.cgroup_base
    }

    /// Directory of the image archives the kubelet runs.
    pub fn images_dir(&self) -> &Path {
        self.shared.images.dir()
    }

    /// A simulated node by name.
    pub fn node(&self, name: &str) -> Result<SimNode, ClusterError> {
        self.shared
            .node(name)
            .ok_or_else(|| ClusterError::UnknownNode(name.into()))
    }

    /// Every simulated node, by name.
    pub fn nodes(&self) -> Vec<SimNode> {
        self.shared
            .nodes
            .read()
            .map(|n| n.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The pid of a pod's running container, if it runs.
    pub fn pod_pid(&self, namespace: &str, pod: &str, container: &str) -> Option<u32> {
        let pods = self.shared.pods.lock().ok()?;
        pods.values()
            .find(|p| p.namespace == namespace && p.name == pod)
            .and_then(|p| p.pid(container))
    }

    /// Sends `signal` to a pod's running container (e.g. `SIGKILL` for crash tests); the
    /// kubelet restarts it as a real one would.
    pub fn kill_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        signal: Signal,
    ) -> Result<u32, ClusterError> {
        let pid =
            self.pod_pid(namespace, pod, container)
                .ok_or_else(|| ClusterError::NoProcess {
                    namespace: namespace.into(),
                    pod: pod.into(),
                    container: container.into(),
                })?;
        process::signal(pid, signal).map_err(|source| ClusterError::Signal {
            pid,
            signal,
            source,
        })?;
        Ok(pid)
    }

    /// Stops every container this cluster started (SIGTERM, then SIGKILL after the pod's
    /// grace period, at most 10 s), stops the API server, unmounts what the nodes mounted
    /// (bpffs included: its pins go with it) and removes the nodes' cgroups.
    pub async fn shutdown(mut self) -> Result<(), ClusterError> {
        let _ = self.shared.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Pod workers stop on the same signal; wait until every one is gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.shared.pods_changed.notified();
            let left = self.shared.pods.lock().map(|p| p.len()).unwrap_or_default();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        let cgroup_base = self.cgroup_base.clone();
        let dir = self.dir.clone();
        let cleanup = tokio::task::spawn_blocking(move || -> Result<(), ClusterError> {
            unmount_under(&dir);
            remove_cgroups(&cgroup_base, Duration::from_secs(10))
        });
        self.cleaned = true;
        // The API server stops when the last reference to it is dropped, with `self`.
        cleanup.await.unwrap_or(Ok(()))
    }
}

impl Drop for LocalCluster {
    /// Best effort when [`LocalCluster::shutdown`] was not called (a failed test): kill every
    /// container this cluster started, unmount what it mounted and remove its cgroups.
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
        if self.cleaned {
            return;
        }
        let pids: Vec<u32> = self
            .shared
            .pods
            .lock()
            .map(|p| p.values().flat_map(|h| h.all_pids()).collect())
            .unwrap_or_default();
        for pid in pids {
            // The first process of a pid namespace: killing it ends the whole container.
            let _ = process::signal(pid, Signal::SIGKILL);
        }
        unmount_under(&self.dir);
        if let Err(e) = remove_cgroups(&self.cgroup_base, Duration::from_secs(3)) {
            tracing::warn!(error = %e, "cleanup after an unfinished local cluster");
        }
    }
}

/// Removes the cluster's cgroups, and the shared parent when it is left empty.
fn remove_cgroups(base: &Path, wait: Duration) -> Result<(), ClusterError> {
    process::remove_cgroup(base, wait)?;
    if let Some(parent) = base.parent()
        && parent.file_name().is_some_and(|n| n == CGROUP_PARENT)
    {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        runtime::unmount(&p);
    }
}

/// Makes `root` a mount point of its own with shared propagation, as `/` is on a systemd
/// node, so hostPath mounts with `HostToContainer` or `Bidirectional` behave as there.
fn make_shared_mount(root: &Path) -> Result<(), ClusterError> {
    use nix::mount::{MsFlags, mount};
    let err = |source| ClusterError::SharedRoot {
        path: root.to_path_buf(),
        source,
    };
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)?;
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)
}

fn create_dir(what: &'static str, path: &Path) -> Result<(), ClusterError> {
    std::fs::create_dir_all(path).map_err(|source| ClusterError::CreateDir {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The cargo profile directory (e.g. `target/debug`) holding the running executable: for a
/// test binary in `target/debug/deps` its parent, for a binary its own directory.
pub fn current_bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}
