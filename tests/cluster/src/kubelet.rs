//! The simulated kubelet: runs the Pods bound to simulated nodes as real processes.
//!
//! ```text
//!  watch Pods ──► reconcile ──► new Pod on a simulated node ──► worker task
//!                    │                                            │ wait: previous pod of the
//!                    │                                            │ same DaemonSet on this node
//!                    │                                            │ must have exited
//!                    │                                            ▼
//!                    │                          init containers, in order (retry with backoff)
//!                    │                                            ▼
//!                    │                          containers: supervise (restart, restartCount),
//!                    │                          readiness probe (HTTP GET on the allocated port)
//!                    │                                            │ status subresource writes
//!                    └─ Pod gone / deletionTimestamp ──► stop: SIGTERM, grace (≤ 10 s), SIGKILL
//! ```
//!
//! Environment of every process (contract C2): the container env with `fieldRef`s resolved,
//! then the node-local overrides (`MESHLET_BPFFS_ROOT`, `MESHLET_CGROUP`,
//! `MESHLET_ADMIN_SOCKET`, `MESHLET_LOCK_FILE`, `MESHLET_METRICS_ADDR` when the container
//! declares a port or probe, `KUBECONFIG` of the Pod's ServiceAccount, `POD_NAME`,
//! `POD_NAMESPACE`), then the image table's env, then the node's extra env
//! (`ClusterOptions::node_env`, `LocalCluster::set_node_env`; e.g. the xfrm recording hook).
//!
//! Simplifications: probes run at most every 2 s (initial delay capped at 5 s); liveness and
//! startup probes, volumes, resources and security contexts are ignored; `env` from Secrets or
//! ConfigMaps is not resolved (logged).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

use crate::images::ImageCommand;
use crate::process::{self, Launch, Process};
use crate::{Shared, SimNode};

/// Longest grace period honoured when stopping a pod.
const MAX_GRACE: Duration = Duration::from_secs(10);
/// Longest back-off between restarts of a failing container.
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
                tracing::info!(pod = %h.name, node = %h.node, "pod deleted: stopping its processes");
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
    ready: bool,
    started: bool,
    restart_count: i32,
    state: Value,
    last_state: Value,
    pid: Option<u32>,
}

impl ContainerModel {
    fn new(c: &Container, reason: &str) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            ready: false,
            started: false,
            restart_count: 0,
            state: json!({"waiting": {"reason": reason}}),
            last_state: json!({}),
            pid: None,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name, "image": self.image, "imageID": "",
            "containerID": self.pid.map(|p| format!("meshlet-local://{p}")),
            "ready": self.ready, "started": self.started, "restartCount": self.restart_count,
            "state": self.state, "lastState": self.last_state,
        })
    }
}

/// Everything the worker reports in `pod.status`.
struct PodModel {
    host_ip: String,
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
            "podIP": self.host_ip, "podIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "initContainerStatuses": self.init.iter().map(ContainerModel::to_json).collect::<Vec<_>>(),
            "containerStatuses": self.main.iter().map(ContainerModel::to_json).collect::<Vec<_>>(),
        })
    }
}

/// What every container task of one pod shares.
struct PodCtx {
    shared: Arc<Shared>,
    api: Api<Pod>,
    pod: Pod,
    name: String,
    node: SimNode,
    kubeconfig: PathBuf,
    model: tokio::sync::Mutex<PodModel>,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
    restart_policy: String,
    grace: Duration,
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

    fn set_pid(&self, container: &str, pid: Option<u32>) {
        if let Ok(mut p) = self.pids.lock() {
            match pid {
                Some(pid) => p.insert(container.to_string(), pid),
                None => p.remove(container),
            };
        }
    }

    fn log_path(&self, container: &str) -> PathBuf {
        self.node
            .run_dir
            .join(format!("{}_{container}.log", self.name))
    }

    /// argv and env of `c` run as `image`.
    fn launch_of(&self, c: &Container, image: &ImageCommand, port: Option<u16>) -> Launch0 {
        let argv: Vec<String> = match &c.command {
            Some(cmd) if !cmd.is_empty() => {
                cmd.iter().chain(c.args.iter().flatten()).cloned().collect()
            }
            _ => std::iter::once(image.program.display().to_string())
                .chain(image.args_prefix.iter().cloned())
                .chain(c.args.iter().flatten().cloned())
                .collect(),
        };
        let mut env = BTreeMap::new();
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                env.insert(e.name.clone(), v.clone());
            } else if let Some(from) = &e.value_from {
                match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some(path) => match self.field(path) {
                        Some(v) => {
                            env.insert(e.name.clone(), v);
                        }
                        None => {
                            tracing::warn!(pod = %self.name, env = %e.name, path, "unsupported fieldRef; left unset")
                        }
                    },
                    None => tracing::warn!(pod = %self.name, env = %e.name,
                        "env from Secrets/ConfigMaps is not resolved by the local cluster; left unset"),
                }
            } else {
                env.insert(e.name.clone(), String::new());
            }
        }
        let n = &self.node;
        env.insert(
            "MESHLET_BPFFS_ROOT".into(),
            n.bpffs_root.display().to_string(),
        );
        env.insert("MESHLET_CGROUP".into(), n.cgroup.display().to_string());
        env.insert(
            "MESHLET_ADMIN_SOCKET".into(),
            n.run_dir
                .join(format!("{}.sock", c.name))
                .display()
                .to_string(),
        );
        env.insert(
            "MESHLET_LOCK_FILE".into(),
            n.run_dir.join("agent.lock").display().to_string(),
        );
        if let Some(port) = port {
            env.insert("MESHLET_METRICS_ADDR".into(), format!("127.0.0.1:{port}"));
        }
        env.insert("KUBECONFIG".into(), self.kubeconfig.display().to_string());
        env.insert("POD_NAME".into(), self.name.clone());
        env.insert(
            "POD_NAMESPACE".into(),
            self.pod.metadata.namespace.clone().unwrap_or_default(),
        );
        env.extend(image.env.clone());
        env.extend(self.shared.node_env(&n.name));
        Launch0 {
            argv,
            env,
            log: self.log_path(&c.name),
        }
    }

    fn field(&self, path: &str) -> Option<String> {
        let md = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        Some(match path {
            "spec.nodeName" => self.node.name.clone(),
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => md.namespace.clone().unwrap_or_default(),
            "metadata.uid" => md.uid.clone().unwrap_or_default(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.hostIP" | "status.podIP" => self.node.address.to_string(),
            _ => {
                let key = path
                    .strip_prefix("metadata.labels['")
                    .map(|k| (k, true))
                    .or_else(|| {
                        path.strip_prefix("metadata.annotations['")
                            .map(|k| (k, false))
                    })?;
                let name = key.0.strip_suffix("']")?;
                let map = if key.1 { &md.labels } else { &md.annotations };
                map.as_ref()?.get(name)?.clone()
            }
        })
    }
}

/// An owned [`Launch`].
struct Launch0 {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    log: PathBuf,
}

impl Launch0 {
    fn spawn(&self, cgroup: &std::path::Path) -> Result<Process, process::ProcessError> {
        process::spawn(&Launch {
            cgroup,
            argv: &self.argv,
            env: &self.env,
            log: &self.log,
        })
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
    run_pod_inner(&shared, pod, node, &mut stop, pids).await;
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

async fn run_pod_inner(
    shared: &Arc<Shared>,
    pod: Pod,
    node: SimNode,
    stop: &mut watch::Receiver<bool>,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let init_specs = spec.init_containers.clone().unwrap_or_default();
    let main_specs = spec.containers.clone();
    let sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
    let kubeconfig = node.run_dir.join(format!("{name}.kubeconfig"));
    let kc_result = write_kubeconfig(shared, &kubeconfig, &namespace, &sa);
    let ctx = Arc::new(PodCtx {
        shared: shared.clone(),
        api,
        name: name.clone(),
        node: node.clone(),
        kubeconfig,
        model: tokio::sync::Mutex::new(PodModel {
            host_ip: node.address.to_string(),
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
        grace: spec
            .termination_grace_period_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(MAX_GRACE)
            .min(MAX_GRACE),
        pod,
    });
    ctx.update(|_| {}).await;
    if wait_for_predecessor(shared, &uid, stop).await {
        return;
    }
    if let Err(e) = kc_result {
        tracing::warn!(pod = %name, error = %e, "failed to write the pod's kubeconfig");
    }

    // Resolve every image first: an unknown one leaves the pod Pending with ErrImagePull.
    let mut images = Vec::new();
    let mut pull_errors = Vec::new();
    for (is_init, i, c) in init_specs
        .iter()
        .enumerate()
        .map(|(i, c)| (true, i, c))
        .chain(main_specs.iter().enumerate().map(|(i, c)| (false, i, c)))
    {
        let image = c.image.clone().unwrap_or_default();
        match shared.images.get(&image) {
            Some(cmd) if cmd.program.is_absolute() && !cmd.program.exists() => {
                pull_errors.push((is_init, i, format!("image {image:?} maps to {}, which does not exist: build it first (cargo build)", cmd.program.display())));
            }
            Some(cmd) => images.push(cmd.clone()),
            None => {
                let known: Vec<_> = shared.images.iter().map(|(k, _)| k.as_str()).collect();
                pull_errors.push((
                    is_init,
                    i,
                    format!(
                        "image {image:?} is not in the local cluster's image table (known: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
    }
    if !pull_errors.is_empty() {
        tracing::warn!(pod = %name, "pod cannot start: {}", pull_errors.iter().map(|e| e.2.as_str()).collect::<Vec<_>>().join("; "));
        ctx.update(|m| {
            for (is_init, i, msg) in pull_errors {
                let c = if is_init {
                    &mut m.init[i]
                } else {
                    &mut m.main[i]
                };
                c.state = json!({"waiting": {"reason": "ErrImagePull", "message": msg}});
            }
        })
        .await;
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
        return;
    }
    let (init_images, main_images) = images.split_at(init_specs.len());

    // Init containers, in order; a failure is retried with back-off, the pod stays Pending.
    let mut backoff = Duration::from_secs(1);
    let mut i = 0;
    while i < init_specs.len() {
        let c = &init_specs[i];
        let port = wants_port(c).then(free_port).flatten();
        let launch = ctx.launch_of(c, &init_images[i], port);
        let started = now();
        let mut proc = match launch.spawn(&node.cgroup) {
            Ok(p) => p,
            Err(e) => {
                let msg = e.to_string();
                ctx.update(|m| {
                    m.init[i].state =
                        json!({"waiting": {"reason": "RunContainerError", "message": msg}});
                })
                .await;
                if sleep_or_stop(backoff, stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        ctx.set_pid(&c.name, Some(proc.pid));
        let pid = proc.pid;
        ctx.update(|m| {
            m.init[i].pid = Some(pid);
            m.init[i].state = json!({"running": {"startedAt": started}});
        })
        .await;
        let status = tokio::select! {
            s = proc.wait() => s.ok(),
            _ = wait_stop(stop) => {
                proc.stop(ctx.grace).await;
                ctx.set_pid(&c.name, None);
                return;
            }
        };
        ctx.set_pid(&c.name, None);
        let code = status.and_then(|s| exit_code(&s)).unwrap_or(-1);
        let tail = proc.stderr_tail();
        let finished = now();
        if code == 0 {
            ctx.update(|m| {
                m.init[i].pid = None;
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
            m.init[i].pid = None;
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
    let _ = &ctx.shared;
}

/// Writes the pod's kubeconfig: the bearer token of its ServiceAccount (kube-rs clients send
/// it) plus `as:` the same ServiceAccount (kubectl sends no token over plain HTTP, so it
/// reaches the server as the administrator impersonating the ServiceAccount). Either way the
/// request runs as the ServiceAccount and the shipped RBAC applies.
fn write_kubeconfig(
    shared: &Shared,
    path: &std::path::Path,
    namespace: &str,
    sa: &str,
) -> std::io::Result<()> {
    let token = shared.server.token_for(namespace, sa);
    let text = format!(
        "# Kubeconfig of pod ServiceAccount {namespace}/{sa} in the local TEST cluster.\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: meshlet-local\n  cluster:\n    server: {server}\n\
         users:\n\
         - name: {namespace}-{sa}\n  user:\n    token: {token}\n    \
           as: system:serviceaccount:{namespace}:{sa}\n\
         contexts:\n\
         - name: meshlet-local\n  context:\n    cluster: meshlet-local\n    \
           user: {namespace}-{sa}\n    namespace: {namespace}\n\
         current-context: meshlet-local\n",
        server = shared.server.url(),
    );
    std::fs::write(path, text)
}

async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

fn exit_code(s: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.code().or_else(|| s.signal().map(|sig| 128 + sig))
}

fn wants_port(c: &Container) -> bool {
    c.ports.as_ref().is_some_and(|p| !p.is_empty())
        || c.readiness_probe.is_some()
        || c.liveness_probe.is_some()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()
}

/// Runs one container: start, report, restart on exit (per restartPolicy), stop on request.
async fn supervise(
    ctx: Arc<PodCtx>,
    idx: usize,
    c: Container,
    image: ImageCommand,
    mut stop: watch::Receiver<bool>,
) {
    let port = wants_port(&c).then(free_port).flatten();
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let launch = ctx.launch_of(&c, &image, port);
        let started = now();
        let t0 = Instant::now();
        let mut proc = match launch.spawn(&ctx.node.cgroup) {
            Ok(p) => p,
            Err(e) => {
                let msg = e.to_string();
                ctx.update(|m| {
                    m.main[idx].state =
                        json!({"waiting": {"reason": "RunContainerError", "message": msg}});
                })
                .await;
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let pid = proc.pid;
        ctx.set_pid(&c.name, Some(pid));
        let probed = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .is_some();
        ctx.update(|m| {
            let s = &mut m.main[idx];
            s.pid = Some(pid);
            s.started = true;
            s.ready = !probed;
            s.state = json!({"running": {"startedAt": started}});
        })
        .await;
        let (probe_stop, probe_rx) = watch::channel(false);
        let probe = match (&c.readiness_probe, port) {
            (Some(p), Some(port)) if p.http_get.is_some() => Some(tokio::spawn(probe_loop(
                ctx.clone(),
                idx,
                p.clone(),
                port,
                probe_rx,
            ))),
            _ => None,
        };
        let status = tokio::select! {
            s = proc.wait() => s.ok(),
            _ = wait_stop(&mut stop) => {
                let _ = probe_stop.send(true);
                if let Some(p) = probe { let _ = p.await; }
                proc.stop(ctx.grace).await;
                ctx.set_pid(&c.name, None);
                return;
            }
        };
        let _ = probe_stop.send(true);
        if let Some(p) = probe {
            let _ = p.await;
        }
        ctx.set_pid(&c.name, None);
        let code = status.as_ref().and_then(exit_code).unwrap_or(-1);
        let finished = now();
        let restart = match ctx.restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        tracing::info!(pod = %ctx.name, container = %c.name, code, restart, "container exited");
        let terminated = json!({"terminated": {"exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": started, "finishedAt": finished}});
        if t0.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_secs(1);
        }
        ctx.update(|m| {
            let s = &mut m.main[idx];
            s.pid = None;
            s.ready = false;
            if restart {
                s.restart_count += 1;
                s.last_state = terminated.clone();
                s.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off {}s restarting failed container {}", backoff.as_secs(), c.name)}});
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

/// Readiness probe: HTTP GET on the container's allocated port.
async fn probe_loop(
    ctx: Arc<PodCtx>,
    idx: usize,
    probe: Probe,
    port: u16,
    mut stop: watch::Receiver<bool>,
) {
    let path = probe
        .http_get
        .as_ref()
        .and_then(|h| h.path.clone())
        .unwrap_or_else(|| "/".into());
    let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).clamp(0, 5) as u64);
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).clamp(1, 2) as u64);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    if sleep_or_stop(delay, &mut stop).await {
        return;
    }
    let mut ready = false;
    let mut failures = 0;
    loop {
        let ok = http_ok(port, &path).await;
        let now_ready = if ok {
            failures = 0;
            true
        } else {
            failures += 1;
            ready && failures < failure_threshold
        };
        if now_ready != ready {
            ready = now_ready;
            ctx.update(|m| m.main[idx].ready = now_ready).await;
        }
        // Probe quickly until first ready, then at the (capped) period.
        let wait = if ready {
            period
        } else {
            Duration::from_millis(250)
        };
        if sleep_or_stop(wait, &mut stop).await {
            return;
        }
    }
}

async fn http_ok(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(head)) => head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (200..400).contains(&c)),
        _ => false,
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
