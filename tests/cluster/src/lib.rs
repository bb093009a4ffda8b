//! A local multi-node **test** cluster for Meshlet's end-to-end tests and demo. Not for
//! production: production means a real Kubernetes cluster.
//!
//! It starts the in-process API test server (`meshlet-test-apiserver`, with Meshlet's CRDs),
//! registers simulated Nodes, and plays the parts of a cluster the operator and the agents
//! need: the DaemonSet and Deployment controllers and, for every Pod bound to a simulated
//! node, the kubelet — running the Pod's containers as real processes in the node's own
//! cgroup, with the node's own bpffs root.
//!
//! ```text
//!   kubectl / operator / agents ──HTTP──► TestApiServer (in process)
//!                                              ▲      │ watch
//!             status (DaemonSet, Deployment)   │      ▼
//!          controllers::run ◄─── watch ────────┤  DaemonSets, Deployments, Nodes, Pods
//!             │ create / delete Pods           │
//!             ▼                                │ status (Pod)
//!          kubelet::run ── per Pod worker ─────┘
//!             │ images::ImageTable (image → program)
//!             ▼
//!          process::spawn ──► real process in <cgroup_base>/<node>, env MESHLET_BPFFS_ROOT=
//!                             <bpffs_base>/<node> (+ the node's extra env), logs in
//!                             <run_dir>/<node>/; with xfrm recording the agent's "kernel"
//!                             xfrm state is <run_dir>/<node>/xfrm.json ──► xfrm::read
//! ```
//!
//! Use [`LocalCluster::start`] from tests, or the `meshlet-local-cluster` binary
//! (`hack/local-cluster up|down|status`) by hand and from the demo.

pub mod controllers;
pub mod images;
pub mod kubelet;
pub mod process;
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

pub use images::{ImageCommand, ImageTable, default_images};
pub use nix::sys::signal::Signal;

/// Default parent of the per-cluster cgroup directories.
pub const DEFAULT_CGROUP_PARENT: &str = "/sys/fs/cgroup/unified/meshlet-local";
/// Default parent of the per-cluster bpffs directories.
pub const DEFAULT_BPFFS_PARENT: &str = "/sys/fs/bpf/meshlet-local";

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
        /// Which directory (cgroup, bpffs, run).
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
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
    /// Image reference → local program.
    pub images: ImageTable,
    /// Directory for kubeconfigs, per-node run directories and logs; a temporary directory
    /// (removed at shutdown) when `None`.
    pub dir: Option<PathBuf>,
    /// Name of this cluster, used in the default cgroup and bpffs paths; unique per process
    /// when `None`.
    pub cluster_id: Option<String>,
    /// Parent of the nodes' cgroups (default `/sys/fs/cgroup/unified/meshlet-local/<id>`).
    pub cgroup_base: Option<PathBuf>,
    /// Parent of the nodes' bpffs roots (default `/sys/fs/bpf/meshlet-local/<id>`).
    pub bpffs_base: Option<PathBuf>,
    /// TCP port of the API server on 127.0.0.1 (0: any free port).
    pub api_port: u16,
    /// Extra environment of every container on every node, including nodes added later
    /// (it wins over the container env, the node-local overrides and the image env).
    /// Per-node changes: [`LocalCluster::set_node_env`].
    pub node_env: BTreeMap<String, String>,
    /// Give every node's containers `MESHLET_IPSEC_XFRM=recording:<run_dir>/xfrm.json`: the
    /// agent keeps its xfrm states and policies in that file instead of the kernel (for hosts
    /// without ESP); it survives agent restarts on that node and [`xfrm::read`] reads it.
    pub xfrm_recording: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            node_labels: BTreeMap::new(),
            images: ImageTable::new(),
            dir: None,
            cluster_id: None,
            cgroup_base: None,
            bpffs_base: None,
            api_port: 0,
            node_env: BTreeMap::new(),
            xfrm_recording: false,
        }
    }
}

/// One simulated node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    /// Node name (`node-<i>`).
    pub name: String,
    /// The node's cgroup: every process of its pods runs here.
    pub cgroup: PathBuf,
    /// The node's bpffs root (`MESHLET_BPFFS_ROOT` of its pods).
    pub bpffs_root: PathBuf,
    /// Logs, admin sockets and the agent lock of this node.
    pub run_dir: PathBuf,
    /// InternalIP (`127.0.1.<i>`), also hostIP/podIP of its pods.
    pub address: Ipv4Addr,
}

impl SimNode {
    /// Where this node's agent keeps its recorded xfrm state when the cluster runs with
    /// [`ClusterOptions::xfrm_recording`]: `<run_dir>/xfrm.json`.
    pub fn xfrm_path(&self) -> PathBuf {
        self.run_dir.join(xfrm::FILE_NAME)
    }
}

/// State shared by the controllers and the kubelet.
pub(crate) struct Shared {
    pub(crate) client: kube::Client,
    pub(crate) server: Arc<TestApiServer>,
    pub(crate) nodes: RwLock<BTreeMap<String, SimNode>>,
    pub(crate) images: ImageTable,
    pub(crate) pods: Mutex<HashMap<String, kubelet::PodHandle>>,
    /// Extra environment of the containers on each node, by node name.
    pub(crate) node_env: RwLock<BTreeMap<String, BTreeMap<String, String>>>,
    /// Signalled whenever a pod worker starts, stops or finishes.
    pub(crate) pods_changed: Notify,
    pub(crate) stop: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn node(&self, name: &str) -> Option<SimNode> {
        self.nodes.read().ok()?.get(name).cloned()
    }
    /// The extra environment of containers on `name` (empty for an unknown node).
    pub(crate) fn node_env(&self, name: &str) -> BTreeMap<String, String> {
        self.node_env
            .read()
            .ok()
            .and_then(|e| e.get(name).cloned())
            .unwrap_or_default()
    }
    pub(crate) fn node_names(&self) -> Vec<String> {
        self.nodes
            .read()
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A running local test cluster. Call [`LocalCluster::shutdown`] to stop it cleanly;
/// dropping it kills its processes but leaves cgroup and bpffs directories behind.
pub struct LocalCluster {
    shared: Arc<Shared>,
    cgroup_base: PathBuf,
    bpffs_base: PathBuf,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    tasks: Vec<JoinHandle<()>>,
    next_node: usize,
    node_labels: BTreeMap<String, String>,
    node_env: BTreeMap<String, String>,
    xfrm_recording: bool,
    cleaned: bool,
}

impl LocalCluster {
    /// Starts the API server, registers the nodes (creating their cgroup, bpffs and run
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
        let cgroup_base = opts
            .cgroup_base
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_CGROUP_PARENT).join(&id));
        let bpffs_base = opts
            .bpffs_base
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_BPFFS_PARENT).join(&id));
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
        let shared = Arc::new(Shared {
            client,
            server: Arc::new(server),
            nodes: RwLock::new(BTreeMap::new()),
            images: opts.images.clone(),
            pods: Mutex::new(HashMap::new()),
            node_env: RwLock::new(BTreeMap::new()),
            pods_changed: Notify::new(),
            stop,
        });
        let mut cluster = Self {
            shared: shared.clone(),
            cgroup_base,
            bpffs_base,
            dir,
            _tempdir: tempdir,
            tasks: Vec::new(),
            next_node: 0,
            node_labels: opts.node_labels.clone(),
            node_env: opts.node_env.clone(),
            xfrm_recording: opts.xfrm_recording,
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
        self.add_node_with_env(BTreeMap::new()).await
    }

    /// Registers one more node whose containers get `env` on top of the cluster-wide
    /// [`ClusterOptions::node_env`] from their very first start (e.g. an agent that refuses
    /// an algorithm), and returns its name.
    pub async fn add_node_with_env(
        &mut self,
        extra_env: BTreeMap<String, String>,
    ) -> Result<String, ClusterError> {
        self.next_node += 1;
        let i = self.next_node;
        let name = format!("node-{i}");
        let address = Ipv4Addr::new(127, 0, 1, (i % 250) as u8 + u8::from(i >= 250));
        let node = SimNode {
            cgroup: self.cgroup_base.join(&name),
            bpffs_root: self.bpffs_base.join(&name),
            run_dir: self.dir.join(&name),
            address,
            name: name.clone(),
        };
        create_dir("cgroup", &node.cgroup)?;
        create_dir("bpffs", &node.bpffs_root)?;
        create_dir("run", &node.run_dir)?;
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
                "containerRuntimeVersion": "meshlet-local://process", "osImage": "local",
                "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""},
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(reg)?;
        let mut env = self.node_env.clone();
        if self.xfrm_recording {
            env.insert(
                xfrm::XFRM_ENV.into(),
                format!("recording:{}", node.xfrm_path().display()),
            );
        }
        env.extend(extra_env);
        if let Ok(mut all) = self.shared.node_env.write() {
            all.entry(name.clone()).or_default().extend(env);
        }
        if let Ok(mut nodes) = self.shared.nodes.write() {
            nodes.insert(name.clone(), node);
        }
        Ok(name)
    }

    /// Sets (`Some`) or removes (`None`) one extra environment variable of the containers
    /// on `node`. It applies from the next start of a container there: delete the agent pod
    /// or kill its container (e.g. [`LocalCluster::kill_container`]) to apply it now.
    pub fn set_node_env(
        &self,
        node: &str,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), ClusterError> {
        if self.shared.node(node).is_none() {
            return Err(ClusterError::UnknownNode(node.into()));
        }
        if let Ok(mut all) = self.shared.node_env.write() {
            let env = all.entry(node.to_string()).or_default();
            match value {
                Some(v) => env.insert(name.to_string(), v.to_string()),
                None => env.remove(name),
            };
        }
        Ok(())
    }

    /// The extra environment of the containers on `node` (see [`ClusterOptions::node_env`]).
    pub fn node_env(&self, node: &str) -> Result<BTreeMap<String, String>, ClusterError> {
        if self.shared.node(node).is_none() {
            return Err(ClusterError::UnknownNode(node.into()));
        }
        Ok(self.shared.node_env(node))
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

    /// Parent of the nodes' bpffs roots.
    pub fn bpffs_base(&self) -> &Path {
        &self.bpffs_base
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

    /// Stops every process this cluster started (SIGTERM, then SIGKILL after the pod's grace
    /// period, at most 10 s), stops the API server, removes the nodes' cgroups (moving
    /// processes it did not start to the cgroup root first) and their bpffs directories with
    /// everything pinned under them.
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
        let bpffs_base = self.bpffs_base.clone();
        let cleanup = tokio::task::spawn_blocking(move || -> Result<(), ClusterError> {
            process::remove_cgroup(&cgroup_base, Duration::from_secs(10))?;
            if let Some(parent) = cgroup_base.parent()
                && parent == Path::new(DEFAULT_CGROUP_PARENT)
            {
                let _ = std::fs::remove_dir(parent);
            }
            process::remove_bpffs_dir(&bpffs_base)?;
            if let Some(parent) = bpffs_base.parent()
                && parent == Path::new(DEFAULT_BPFFS_PARENT)
            {
                let _ = std::fs::remove_dir(parent);
            }
            Ok(())
        });
        self.cleaned = true;
        // The API server stops when the last reference to it is dropped, with `self`.
        cleanup.await.unwrap_or(Ok(()))
    }
}

impl Drop for LocalCluster {
    /// Best effort when [`LocalCluster::shutdown`] was not called (a failed test): kill every
    /// process this cluster started and remove its cgroup and bpffs directories.
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
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Err(e) = process::remove_cgroup(&self.cgroup_base, Duration::from_secs(3)) {
            tracing::warn!(error = %e, "cleanup after an unfinished local cluster");
        }
        let _ = process::remove_bpffs_dir(&self.bpffs_base);
    }
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
