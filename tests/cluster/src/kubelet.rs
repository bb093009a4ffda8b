//! The simulated kubelet: runs the Pods bound to simulated nodes as OCI containers with runc.
//!
//! ```text
//!  watch Pods ──► reconcile ──► new Pod on a simulated node ──► worker task
//!                    │                                            │ wait: previous pod of the
//!                    │                                            │ same DaemonSet on this node
//!                    │                                            │ must have exited
//!                    │                                            ▼
//!                    │               pull images (ErrImagePull / ImagePullBackOff, retried)
//!                    │               volumes (FailedMount: ContainerCreating, retried)
//!                    │               network namespace unless hostNetwork
//!                    │                                            ▼
//!                    │               init containers, in order (retried with back-off)
//!                    │                                            ▼
//!                    │               containers: supervise (restart, restartCount,
//!                    │               CrashLoopBackOff), readiness and liveness probes
//!                    │                                            │ status subresource writes
//!                    └─ Pod gone ──► stop: SIGTERM, grace (≤ 10 s), SIGKILL, remove
//! ```
//!
//! A container sees only what its pod spec and image give it (see [`crate::spec`]), plus
//! the service-account volume and `KUBERNETES_SERVICE_*`, as on a real node.
//!
//! Shortened for tests: restart and pull back-off run from 1 s to 10 s (a real kubelet: 10 s
//! to 5 min); probe periods are capped at 2 s and initial delays at 5 s; grace at 10 s.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

use crate::netns::{self, PodNetwork};
use crate::runtime::{self, Container as Running, UnpackedImage};
use crate::spec::{self, PreparedVolume};
use crate::volumes::{self, ServiceAccountFiles};
use crate::{Shared, SimNode};

/// Longest grace period honoured when stopping a pod.
const MAX_GRACE: Duration = Duration::from_secs(10);
/// Longest back-off between restarts of a failing container or pulls of a missing image.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The current time as RFC 3339 (seconds).
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// A pod the kubelet runs (or is stopping).
pub(crate) struct PodHandle {
    pub(crate) namespace: String,
    pub(crate) name: String,
    node: String,
    /// uid of the owning DaemonSet, if any.
    daemonset: Option<String>,
    stop: watch::Sender<bool>,
    stopping: bool,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl PodHandle {
    pub(crate) fn pid(&self, container: &str) -> Option<u32> {
        self.pids.lock().ok()?.get(container).copied()
    }

    pub(crate) fn all_pids(&self) -> Vec<u32> {
        self.pids
            .lock()
            .map(|p| p.values().copied().collect())
            .unwrap_or_default()
    }
}

/// Runs the kubelet until the cluster stops; then stops every pod.
pub(crate) async fn run(shared: Arc<Shared>) {
    let notify = Arc::new(Notify::new());
    let mut stop = shared.stop.subscribe();
    let watch_task = {
        let api: Api<Pod> = Api::all(shared.client.clone());
        let notify = notify.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = events.next().await {
                if let Err(e) = ev {
                    tracing::debug!(error = %e, "pod watch interrupted; resuming");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                notify.notify_one();
            }
        })
    };
    loop {
        if *stop.borrow() {
            break;
        }
        if let Err(e) = reconcile(&shared).await {
            tracing::warn!(error = %e, "kubelet: failed to list pods; retrying");
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => {}
        }
        // Coalesce bursts of events.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch_task.abort();
    if let Ok(mut pods) = shared.pods.lock() {
        for h in pods.values_mut() {
            h.stopping = true;
            let _ = h.stop.send(true);
        }
    }
}

async fn reconcile(shared: &Arc<Shared>) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let pods = api.list(&ListParams::default()).await?;
    let nodes: HashSet<String> = shared.node_names().into_iter().collect();
    let mut live = HashSet::new();
    let mut start = Vec::new();
    {
        let Ok(mut handles) = shared.pods.lock() else {
            return Ok(());
        };
        for pod in pods.items {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            if !nodes.contains(&node) || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) && !handles.contains_key(pod.metadata.uid.as_deref().unwrap_or_default())
            {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            live.insert(uid.clone());
            if handles.contains_key(&uid) {
                continue;
            }
            let daemonset = pod
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "DaemonSet" && o.controller == Some(true))
                .map(|o| o.uid.clone());
            let (tx, rx) = watch::channel(false);
            let pids = Arc::new(Mutex::new(BTreeMap::new()));
            handles.insert(
                uid.clone(),
                PodHandle {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    node: node.clone(),
                    daemonset,
                    stop: tx,
                    stopping: false,
                    pids: pids.clone(),
                },
            );
            start.push((pod, node, rx, pids));
        }
        for (uid, h) in handles.iter_mut() {
            if !live.contains(uid) && !h.stopping {
                tracing::info!(pod = %h.name, node = %h.node, "pod deleted: stopping its containers");
                h.stopping = true;
                let _ = h.stop.send(true);
            }
        }
    }
    for (pod, node, rx, pids) in start {
        let Some(node) = shared.node(&node) else {
            continue;
        };
        tokio::spawn(run_pod(shared.clone(), pod, node, rx, pids));
    }
    shared.pods_changed.notify_waiters();
    Ok(())
}

/// One container's reported status.
#[derive(Debug, Clone)]
struct ContainerModel {
    name: String,
    image: String,
    image_id: String,
    ready: bool,
    started: bool,
    restart_count: i32,
    state: Value,
    last_state: Value,
    container_id: Option<String>,
}

impl ContainerModel {
    fn new(c: &Container, reason: &str) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: String::new(),
            ready: false,
            started: false,
            restart_count: 0,
            state: json!({"waiting": {"reason": reason}}),
            last_state: json!({}),
            container_id: None,
        }
    }

    fn waiting(&mut self, reason: &str, message: &str) {
        self.state = json!({"waiting": {"reason": reason, "message": message}});
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name, "image": self.image, "imageID": self.image_id,
            "containerID": self.container_id,
            "ready": self.ready, "started": self.started, "restartCount": self.restart_count,
            "state": self.state, "lastState": self.last_state,
        })
    }
}

/// Everything the worker reports in `pod.status`.
struct PodModel {
    host_ip: String,
    pod_ip: String,
    start_time: String,
    init: Vec<ContainerModel>,
    main: Vec<ContainerModel>,
    initialized: bool,
    finished: Option<&'static str>,
    /// condition type → (status, lastTransitionTime)
    conditions: BTreeMap<&'static str, (bool, String)>,
}

impl PodModel {
    fn status(&mut self) -> Value {
        let ready = self.initialized && !self.main.is_empty() && self.main.iter().all(|c| c.ready);
        let now = now();
        for (ty, value) in [
            ("PodScheduled", true),
            ("Initialized", self.initialized),
            ("ContainersReady", ready),
            ("Ready", ready),
        ] {
            let entry = self
                .conditions
                .entry(ty)
                .or_insert_with(|| (value, now.clone()));
            if entry.0 != value {
                *entry = (value, now.clone());
            }
        }
        let phase = match self.finished {
            Some(p) => p,
            None if self.initialized && self.main.iter().all(|c| c.started) => "Running",
            None => "Pending",
        };
        let conditions: Vec<Value> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
            .iter()
            .filter_map(|ty| {
                self.conditions.get(ty).map(|(s, t)| {
                    json!({"type": ty, "status": if *s { "True" } else { "False" },
                           "lastProbeTime": null, "lastTransitionTime": t})
                })
            })
            .collect();
        json!({
            "phase": phase,
            "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "initContainerStatuses": self.init.iter().map(ContainerModel::to_json).collect::<Vec<_>>(),
            "containerStatuses": self.main.iter().map(ContainerModel::to_json).collect::<Vec<_>>(),
        })
    }

    fn container(&mut self, init: bool, idx: usize) -> &mut ContainerModel {
        if init {
            &mut self.init[idx]
        } else {
            &mut self.main[idx]
        }
    }
}

/// What every container task of one pod shares.
struct PodCtx {
    shared: Arc<Shared>,
    api: Api<Pod>,
    pod: Pod,
    name: String,
    namespace: String,
    uid: String,
    node: SimNode,
    /// `<run_dir>/pods/<uid>`: container bundles, volumes, network namespace.
    dir: PathBuf,
    volumes: BTreeMap<String, PreparedVolume>,
    network: Option<PodNetwork>,
    pod_ip: IpAddr,
    model: tokio::sync::Mutex<PodModel>,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
    restart_policy: String,
    grace: Duration,
}

/// Why a container could not start, with the waiting reason the kubelet reports.
struct StartFailure {
    reason: &'static str,
    message: String,
}

impl PodCtx {
    /// Applies `change` to the model and writes the resulting status.
    async fn update(&self, change: impl FnOnce(&mut PodModel)) {
        let mut m = self.model.lock().await;
        change(&mut m);
        let status = m.status();
        let patch = json!({ "status": status });
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(pod = %self.name, error = %e, "failed to write pod status"),
        }
    }

    /// Records an Event on the pod, as the kubelet does for failed mounts and pulls.
    async fn event(&self, reason: &str, message: &str) {
        let api: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.shared.client.clone(), &self.namespace);
        let name = format!(
            "{}.{:x}",
            self.name,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": self.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": self.name,
                               "namespace": self.namespace, "uid": self.uid},
            "reason": reason, "message": message, "type": "Warning",
            "source": {"component": "kubelet", "host": self.node.name},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
        });
        if let Ok(ev) = serde_json::from_value(ev)
            && let Err(e) = api.create(&PostParams::default(), &ev).await
        {
            tracing::debug!(pod = %self.name, error = %e, "failed to record an event");
        }
    }

    fn set_pid(&self, container: &str, pid: Option<u32>) {
        if let Ok(mut p) = self.pids.lock() {
            match pid {
                Some(pid) => p.insert(container.to_string(), pid),
                None => p.remove(container),
            };
        }
    }

    /// `/var/log/pods/<ns>_<pod>_<uid>/<container>/<restart>.log` on the node.
    fn log_path(&self, container: &str, restart: i32) -> PathBuf {
        self.node
            .pod_logs_dir()
            .join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
            .join(container)
            .join(format!("{restart}.log"))
    }

    /// Creates and starts container `c` (attempt `restart`) from `image`.
    async fn start_container(
        &self,
        c: &Container,
        image: &UnpackedImage,
        restart: i32,
    ) -> Result<Running, StartFailure> {
        let id = format!(
            "{}-{}-{}-{restart}",
            self.node.name,
            &self.uid[..self.uid.len().min(8)],
            c.name
        );
        let bundle = self
            .dir
            .join("containers")
            .join(format!("{}-{restart}", c.name));
        let _ = std::fs::remove_dir_all(&bundle);
        let fail = |reason, e: &dyn std::fmt::Display| StartFailure {
            reason,
            message: e.to_string(),
        };
        let rootfs = runtime::mount_rootfs(&image.rootfs, &bundle)
            .map_err(|e| fail("RunContainerError", &e))?;
        let cgroups_path = format!(
            "/{}/kubepods/pod{}/{id}",
            self.node
                .cgroup
                .strip_prefix(&self.shared.cgroup2_mount)
                .unwrap_or(&self.node.cgroup)
                .display(),
            self.uid
        );
        let host_network = self.network.is_none();
        let api = self.shared.server.port();
        let plan = spec::Plan {
            pod: &self.pod,
            container: c,
            image: image.image.config(),
            rootfs,
            volumes: &self.volumes,
            netns: self.network.as_ref().map(|n| n.path.clone()),
            cgroups_path,
            api_service: if host_network {
                ("127.0.0.1".into(), api)
            } else {
                (netns::API_SERVICE_IP.to_string(), netns::API_SERVICE_PORT)
            },
            node_name: &self.node.name,
            host_ip: self.node.address.to_string(),
            pod_ip: self.pod_ip.to_string(),
            etc_hosts: self.dir.join("etc-hosts"),
            etc_hostname: self.dir.join("etc-hostname"),
        };
        let (_, problems) = spec::environment(&plan);
        for p in problems {
            tracing::warn!(pod = %self.name, container = %c.name, "{p}");
        }
        let config = match spec::build(&plan) {
            Ok(s) => s,
            Err(e) => {
                runtime::unmount(&plan.rootfs);
                return Err(fail("CreateContainerConfigError", &e));
            }
        };
        let log = self.log_path(&c.name, restart);
        match Running::start(&id, &self.shared.runc_root, &bundle, &config, &log).await {
            Ok(r) => Ok(r),
            Err(e) => {
                runtime::unmount(&plan.rootfs);
                Err(fail("RunContainerError", &e))
            }
        }
    }

    /// Where a probe of `port` connects: the pod's address, reached from inside its network
    /// namespace when it has one.
    async fn probe_connect(
        &self,
        host: Option<&str>,
        port: u16,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let ip: IpAddr = host.and_then(|h| h.parse().ok()).unwrap_or(self.pod_ip);
        let addr = SocketAddr::new(ip, port);
        match &self.network {
            Some(n) => netns::connect_in(&n.path, addr).await,
            None => tokio::net::TcpStream::connect(addr).await,
        }
    }
}

/// Waits until `stop` is set; true if it was.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        r = stop.changed() => r.is_err() || *stop.borrow(),
    }
}

/// A receiver that fires on the pod's own stop or the cluster's.
fn merged_stop(shared: &Shared, own: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*own.borrow());
    let mut own = own;
    let mut global = shared.stop.subscribe();
    tokio::spawn(async move {
        loop {
            if *own.borrow() || *global.borrow() {
                let _ = tx.send(true);
                return;
            }
            tokio::select! {
                r = own.changed() => if r.is_err() { let _ = tx.send(true); return; },
                r = global.changed() => if r.is_err() { let _ = tx.send(true); return; },
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

async fn run_pod(
    shared: Arc<Shared>,
    pod: Pod,
    node: SimNode,
    own_stop: watch::Receiver<bool>,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut stop = merged_stop(&shared, own_stop);
    let dir = node.run_dir.join("pods").join(&uid);
    run_pod_inner(&shared, pod, node, &dir, &mut stop, pids).await;
    crate::unmount_under(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(mut handles) = shared.pods.lock() {
        handles.remove(&uid);
    }
    shared.pods_changed.notify_waiters();
}

/// Waits until no other pod of the same DaemonSet runs on this node (OnDelete: the new agent
/// starts only after the old one exited). True if stopped meanwhile.
async fn wait_for_predecessor(
    shared: &Shared,
    uid: &str,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        let notified = shared.pods_changed.notified();
        let busy = shared.pods.lock().is_ok_and(|h| {
            let Some(me) = h.get(uid) else { return false };
            me.daemonset.is_some()
                && h.iter().any(|(other, o)| {
                    other != uid && o.node == me.node && o.daemonset == me.daemonset
                })
        });
        if !busy {
            return false;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return true; },
        }
    }
}

/// Pulls every image of the pod, retrying with back-off while one is missing. `None` if the
/// pod was stopped meanwhile.
async fn pull_images(
    ctx: &PodCtx,
    specs: &[(bool, usize, Container)],
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<Arc<UnpackedImage>>> {
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    loop {
        let mut images = Vec::new();
        let mut errors = Vec::new();
        for (init, i, c) in specs {
            match ctx
                .shared
                .images
                .get(c.image.as_deref().unwrap_or_default())
            {
                Ok(img) => images.push(img),
                Err(e) => errors.push((*init, *i, e.to_string())),
            }
        }
        if errors.is_empty() {
            return Some(images);
        }
        let reason = if first {
            "ErrImagePull"
        } else {
            "ImagePullBackOff"
        };
        tracing::warn!(pod = %ctx.name, "{reason}: {}", errors[0].2);
        ctx.event("Failed", &errors[0].2).await;
        ctx.update(|m| {
            for (init, i, msg) in &errors {
                m.container(*init, *i).waiting(reason, msg);
            }
        })
        .await;
        first = false;
        if sleep_or_stop(backoff, stop).await {
            return None;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The pod's service-account files (unless `automountServiceAccountToken: false`).
fn service_account(shared: &Shared, pod: &Pod, node: &SimNode) -> Option<ServiceAccountFiles> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    Some(ServiceAccountFiles {
        token: shared.server.token_for_pod(
            &namespace,
            &sa,
            pod.metadata.name.as_deref().unwrap_or_default(),
            pod.metadata.uid.as_deref().unwrap_or_default(),
            &node.name,
        ),
        ca_pem: shared.server.ca_pem(),
        namespace,
    })
}

/// Writes the pod's `/etc/hosts` and `/etc/hostname`.
fn write_etc(dir: &std::path::Path, hostname: &str, ip: IpAddr) -> std::io::Result<()> {
    std::fs::write(
        dir.join("etc-hosts"),
        format!(
            "# Kubernetes-managed hosts file (local test cluster).\n127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{hostname}\n"
        ),
    )?;
    std::fs::write(dir.join("etc-hostname"), format!("{hostname}\n"))
}

async fn run_pod_inner(
    shared: &Arc<Shared>,
    pod: Pod,
    node: SimNode,
    dir: &std::path::Path,
    stop: &mut watch::Receiver<bool>,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let init_specs = spec.init_containers.clone().unwrap_or_default();
    let main_specs = spec.containers.clone();
    let host_network = spec.host_network.unwrap_or(false);
    let pod_ip: IpAddr = if host_network {
        IpAddr::V4(node.address)
    } else {
        let n = shared.next_pod_ip.fetch_add(1, Ordering::SeqCst);
        IpAddr::V4(Ipv4Addr::new(10, 244, (n >> 8) as u8, n as u8))
    };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
    let grace = spec
        .termination_grace_period_seconds
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(MAX_GRACE)
        .min(MAX_GRACE);
    let mut ctx = PodCtx {
        shared: shared.clone(),
        api,
        name: name.clone(),
        namespace,
        uid: uid.clone(),
        node: node.clone(),
        dir: dir.to_path_buf(),
        volumes: BTreeMap::new(),
        network: None,
        pod_ip,
        model: tokio::sync::Mutex::new(PodModel {
            host_ip: node.address.to_string(),
            pod_ip: pod_ip.to_string(),
            start_time: now(),
            init: init_specs
                .iter()
                .map(|c| ContainerModel::new(c, "PodInitializing"))
                .collect(),
            main: main_specs
                .iter()
                .map(|c| {
                    ContainerModel::new(
                        c,
                        if init_specs.is_empty() {
                            "ContainerCreating"
                        } else {
                            "PodInitializing"
                        },
                    )
                })
                .collect(),
            initialized: init_specs.is_empty(),
            finished: None,
            conditions: BTreeMap::new(),
        }),
        pids,
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
        grace,
        pod,
    };
    ctx.update(|_| {}).await;
    if wait_for_predecessor(shared, &uid, stop).await {
        return;
    }

    let specs: Vec<(bool, usize, Container)> = init_specs
        .iter()
        .enumerate()
        .map(|(i, c)| (true, i, c.clone()))
        .chain(
            main_specs
                .iter()
                .enumerate()
                .map(|(i, c)| (false, i, c.clone())),
        )
        .collect();
    let Some(images) = pull_images(&ctx, &specs, stop).await else {
        return;
    };
    let image_ids: Vec<String> = images
        .iter()
        .map(|i| i.image.digest().to_string())
        .collect();
    ctx.update(|m| {
        for ((init, i, _), id) in specs.iter().zip(&image_ids) {
            m.container(*init, *i).image_id = id.clone();
        }
    })
    .await;

    // Volumes, retried while they fail (FailedMount), as a real kubelet does.
    let sa = service_account(shared, &ctx.pod, &node);
    let mut backoff = Duration::from_secs(1);
    loop {
        let prepared = std::fs::create_dir_all(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                volumes::prepare(&ctx.pod, &node, dir, sa.as_ref()).map_err(|e| e.to_string())
            });
        match prepared {
            Ok(v) => {
                ctx.volumes = v;
                break;
            }
            Err(msg) => {
                tracing::warn!(pod = %name, "FailedMount: {msg}");
                ctx.event("FailedMount", &msg).await;
                ctx.update(|m| {
                    for c in m.init.iter_mut().chain(m.main.iter_mut()) {
                        c.waiting("ContainerCreating", &msg);
                    }
                })
                .await;
                if sleep_or_stop(backoff, stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let hostname = if host_network {
        node.name.clone()
    } else {
        name.clone()
    };
    if let Err(e) = write_etc(dir, &hostname, pod_ip) {
        tracing::warn!(pod = %name, error = %e, "failed to write the pod's /etc files");
    }
    if !host_network {
        let api_addr = SocketAddr::from(([127, 0, 0, 1], shared.server.port()));
        let IpAddr::V4(v4) = pod_ip else { return };
        match PodNetwork::create(&dir.join("netns"), v4, api_addr).await {
            Ok(n) => ctx.network = Some(n),
            Err(e) => {
                let msg = format!("failed to create the pod sandbox: {e}");
                tracing::warn!(pod = %name, "{msg}");
                ctx.update(|m| {
                    for c in m.init.iter_mut().chain(m.main.iter_mut()) {
                        c.waiting("CreatePodSandboxError", &msg);
                    }
                })
                .await;
                let _ = wait_stop(stop).await;
                return;
            }
        }
    }
    let ctx = Arc::new(ctx);
    let (init_images, main_images) = images.split_at(init_specs.len());

    // Init containers, in order; a failure is retried with back-off, the pod stays Pending.
    let mut backoff = Duration::from_secs(1);
    let mut i = 0;
    while i < init_specs.len() {
        let c = &init_specs[i];
        let restart = ctx.model.lock().await.init[i].restart_count;
        let started = now();
        let mut run = match ctx.start_container(c, &init_images[i], restart).await {
            Ok(r) => r,
            Err(f) => {
                ctx.update(|m| m.init[i].waiting(f.reason, &f.message))
                    .await;
                if sleep_or_stop(backoff, stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        ctx.set_pid(&c.name, Some(run.pid));
        let cid = format!("runc://{}", run.id);
        ctx.update(|m| {
            m.init[i].container_id = Some(cid);
            m.init[i].state = json!({"running": {"startedAt": started}});
        })
        .await;
        let code = tokio::select! {
            code = run.wait() => code,
            _ = wait_stop(stop) => {
                run.stop(ctx.grace).await;
                ctx.set_pid(&c.name, None);
                run.remove().await;
                return;
            }
        };
        ctx.set_pid(&c.name, None);
        let tail = run.log_tail();
        run.remove().await;
        let finished = now();
        if code == 0 {
            ctx.update(|m| {
                m.init[i].state = json!({"terminated": {"exitCode": 0, "reason": "Completed",
                    "startedAt": started, "finishedAt": finished}});
                m.init[i].ready = true;
                if i + 1 == m.init.len() {
                    m.initialized = true;
                    for c in &mut m.main {
                        c.state = json!({"waiting": {"reason": "ContainerCreating"}});
                    }
                }
            })
            .await;
            i += 1;
            continue;
        }
        tracing::info!(pod = %name, container = %c.name, code, "init container failed; retrying with back-off");
        let never = ctx.restart_policy == "Never";
        ctx.update(|m| {
            m.init[i].state = json!({"terminated": {"exitCode": code, "reason": "Error",
                "message": tail, "startedAt": started, "finishedAt": finished}});
            if never {
                m.finished = Some("Failed");
            } else {
                m.init[i].restart_count += 1;
            }
        })
        .await;
        if never || sleep_or_stop(backoff, stop).await {
            if never {
                let _ = wait_stop(stop).await;
            }
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }

    // Containers: one supervisor each.
    let tasks: Vec<_> = main_specs
        .iter()
        .zip(main_images.iter())
        .enumerate()
        .map(|(idx, (c, image))| {
            tokio::spawn(supervise(
                ctx.clone(),
                idx,
                c.clone(),
                image.clone(),
                stop.clone(),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    if ctx.restart_policy != "Always" && !*stop.borrow() {
        // All containers finished for good: report the phase and wait for deletion.
        ctx.update(|m| {
            let failed = m.main.iter().any(|c| {
                c.state
                    .pointer("/terminated/exitCode")
                    .and_then(Value::as_i64)
                    .is_some_and(|x| x != 0)
            });
            m.finished = Some(if failed { "Failed" } else { "Succeeded" });
        })
        .await;
        let _ = wait_stop(stop).await;
    }
}

async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// What a probe loop tells its container's supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Readiness,
    Liveness,
}

/// Runs one container: start, report, restart on exit (per restartPolicy), stop on request.
async fn supervise(
    ctx: Arc<PodCtx>,
    idx: usize,
    c: Container,
    image: Arc<UnpackedImage>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let restart = ctx.model.lock().await.main[idx].restart_count;
        let started = now();
        let t0 = Instant::now();
        let mut run = match ctx.start_container(&c, &image, restart).await {
            Ok(r) => r,
            Err(f) => {
                tracing::warn!(pod = %ctx.name, container = %c.name, "{}: {}", f.reason, f.message);
                ctx.update(|m| m.main[idx].waiting(f.reason, &f.message))
                    .await;
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        ctx.set_pid(&c.name, Some(run.pid));
        let cid = format!("runc://{}", run.id);
        let probed = c.readiness_probe.is_some();
        ctx.update(|m| {
            let s = &mut m.main[idx];
            s.container_id = Some(cid);
            s.started = true;
            s.ready = !probed;
            s.state = json!({"running": {"startedAt": started}});
        })
        .await;
        let (probe_stop, probe_rx) = watch::channel(false);
        let (liveness_tx, mut liveness_failed) = tokio::sync::mpsc::channel::<String>(1);
        let mut probes = Vec::new();
        for (kind, p) in [
            (ProbeKind::Readiness, &c.readiness_probe),
            (ProbeKind::Liveness, &c.liveness_probe),
        ] {
            if let Some(p) = p {
                probes.push(tokio::spawn(probe_loop(
                    ctx.clone(),
                    idx,
                    c.clone(),
                    run.id.clone(),
                    kind,
                    p.clone(),
                    liveness_tx.clone(),
                    probe_rx.clone(),
                )));
            }
        }
        let code = tokio::select! {
            code = run.wait() => code,
            Some(why) = liveness_failed.recv() => {
                tracing::info!(pod = %ctx.name, container = %c.name, "liveness probe failed ({why}); restarting");
                ctx.event("Unhealthy", &format!("Liveness probe failed: {why}")).await;
                run.stop(ctx.grace).await
            }
            _ = wait_stop(&mut stop) => {
                let _ = probe_stop.send(true);
                for p in probes { let _ = p.await; }
                run.stop(ctx.grace).await;
                ctx.set_pid(&c.name, None);
                run.remove().await;
                return;
            }
        };
        let _ = probe_stop.send(true);
        for p in probes {
            let _ = p.await;
        }
        ctx.set_pid(&c.name, None);
        let tail = run.log_tail();
        run.remove().await;
        let finished = now();
        let restart = match ctx.restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        tracing::info!(pod = %ctx.name, container = %c.name, code, restart, "container exited");
        let mut terminated = json!({"terminated": {"exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": started, "finishedAt": finished}});
        if code != 0 && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError") {
            terminated["terminated"]["message"] = json!(tail);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_secs(1);
        }
        ctx.update(|m| {
            let s = &mut m.main[idx];
            s.ready = false;
            if restart {
                s.restart_count += 1;
                s.last_state = terminated.clone();
                s.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off {}s restarting failed container={} pod={}_{}({})",
                        backoff.as_secs(), c.name, ctx.name, ctx.namespace, ctx.uid)}});
            } else {
                s.state = terminated.clone();
            }
        })
        .await;
        if !restart || sleep_or_stop(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The port a probe names: a number, or the name of one of the container's ports.
fn probe_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// One probe attempt; `Err` says why it failed.
async fn probe_once(ctx: &PodCtx, c: &Container, id: &str, probe: &Probe) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).clamp(1, 10) as u64);
    let attempt = async {
        if let Some(h) = &probe.http_get {
            let port = probe_port(c, &h.port).ok_or("unknown probe port")?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            let mut s = ctx
                .probe_connect(h.host.as_deref(), port)
                .await
                .map_err(|e| format!("Get \"http://{}:{port}{path}\": {e}", ctx.pod_ip))?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {}:{port}\r\nUser-Agent: kube-probe/1.37\r\nConnection: close\r\n\r\n", ctx.pod_ip)
                    .as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                let r = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0);
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(t) = &probe.tcp_socket {
            let port = probe_port(c, &t.port).ok_or("unknown probe port")?;
            ctx.probe_connect(t.host.as_deref(), port)
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {}:{port}: {e}", ctx.pod_ip))
        } else if let Some(e) = &probe.exec {
            let out = runtime::runc_command(&ctx.shared.runc_root)
                .arg("exec")
                .arg(id)
                .args(e.command.iter().flatten())
                .output()
                .await
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "command exited with {}: {}",
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).trim()
                ))
            }
        } else {
            Err("probe has no handler".into())
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err("probe timed out".into()))
}

/// A readiness or liveness probe loop of one container run.
#[allow(clippy::too_many_arguments)]
async fn probe_loop(
    ctx: Arc<PodCtx>,
    idx: usize,
    c: Container,
    id: String,
    kind: ProbeKind,
    probe: Probe,
    liveness_failed: tokio::sync::mpsc::Sender<String>,
    mut stop: watch::Receiver<bool>,
) {
    let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).clamp(0, 5) as u64);
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).clamp(1, 2) as u64);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    if sleep_or_stop(delay, &mut stop).await {
        return;
    }
    let mut ready = false;
    let mut failures = 0;
    loop {
        let result = probe_once(&ctx, &c, &id, &probe).await;
        match kind {
            ProbeKind::Readiness => {
                let now_ready = match &result {
                    Ok(()) => {
                        failures = 0;
                        true
                    }
                    Err(_) => {
                        failures += 1;
                        ready && failures < failure_threshold
                    }
                };
                if now_ready != ready {
                    ready = now_ready;
                    ctx.update(|m| m.main[idx].ready = now_ready).await;
                }
            }
            ProbeKind::Liveness => match result {
                Ok(()) => failures = 0,
                Err(why) => {
                    failures += 1;
                    if failures >= failure_threshold {
                        let _ = liveness_failed.send(why).await;
                        return;
                    }
                }
            },
        }
        // Readiness probes quickly until first ready, then at the (capped) period.
        let wait = if kind == ProbeKind::Readiness && !ready {
            Duration::from_millis(250)
        } else {
            period
        };
        if sleep_or_stop(wait, &mut stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_083_200), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 86_399), "2000-02-29T23:59:59Z");
    }
}
