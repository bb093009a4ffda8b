//! A Kubernetes API **test** server for Meshlet's end-to-end tests. Not for production.
//!
//! No kube-apiserver can be installed on our machines, so this crate is the one sanctioned
//! test double: an in-memory server on 127.0.0.1, HTTPS only, implementing the API semantics
//! Meshlet's operator, agents, `kubectl` and GitOps applies use, with a real server's
//! strictness: bearer tokens, 401 for unknown ones, RBAC for everyone else (anonymous too).
//!
//! ```text
//!   kubectl / kube-rs ──HTTPS (tls: CA made at start)──► handlers
//!                                   │
//!                                   ├──► authn (tokens) ──► impersonation ──► rbac
//!                                   ├──► reviews (access reviews, token reviews)
//!                                   ├──► discovery (legacy, aggregated, OpenAPI v3)
//!                                   ├──► resources (built-ins + CRDs → schema validators)
//!                                   ├──► patch / apply (merge, JSON, strategic, SSA)
//!                                   └──► store (objects, resourceVersion, watch history)
//!                                             │
//!                      garbage collector ◄────┘ (ownerReferences, namespace deletion)
//! ```
//!
//! Start one in-process with [`TestApiServer::start`]; it writes a kubeconfig for the
//! administrator (CA + token) and hands out ServiceAccount tokens with
//! [`TestApiServer::token_for`] and Pod-bound ones with [`TestApiServer::token_for_pod`].

pub mod apply;
pub mod authn;
pub mod discovery;
pub mod handlers;
pub mod impersonation;
pub mod kubeconfig;
pub mod patch;
pub mod proto;
pub mod rbac;
pub mod resources;
pub mod reviews;
pub mod selector;
pub mod status;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

use crate::authn::{Identities, PodBinding, User};
use crate::resources::{Registry, ResourceType};
use crate::store::{Precondition, Store, StoreError};

/// Failures of starting or driving the test server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("failed to bind 127.0.0.1:{port}")]
    BindSocket {
        /// Requested port (0 = any).
        port: u16,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The kubeconfig directory could not be created.
    #[error("failed to create the kubeconfig directory")]
    CreateDir(#[source] std::io::Error),
    /// A kubeconfig could not be written.
    #[error(transparent)]
    WriteKubeconfig(#[from] kubeconfig::KubeconfigError),
    /// A built-in object or CRD could not be installed at start.
    #[error("failed to install {what}: {message}")]
    InstallObject {
        /// What was installed.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// A kube client could not be built from the kubeconfig.
    #[error("failed to build a kube client")]
    BuildClient(#[source] kube::Error),
    /// The kubeconfig could not be read back by kube.
    #[error("failed to load the kubeconfig")]
    LoadKubeconfig(#[source] kube::config::KubeconfigError),
    /// The CA or serving certificate could not be made.
    #[error(transparent)]
    MakeCertificates(#[from] tls::TlsError),
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Where to write kubeconfigs; a fresh temporary directory if `None`.
    pub dir: Option<PathBuf>,
    /// Events kept for watches; older resourceVersions get `410 Gone`.
    pub history_limit: usize,
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Bearer token of the administrator (`system:masters`).
    pub admin_token: String,
    /// Install `meshlet_crds::all_crds()` at start.
    pub install_meshlet_crds: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            port: 0,
            dir: None,
            history_limit: 20_000,
            bookmark_interval: Duration::from_secs(5),
            admin_token: "meshlet-test-admin-token".into(),
            install_meshlet_crds: false,
        }
    }
}

/// Shared state of a running server.
pub struct Server {
    /// Objects and watch history.
    pub store: Store,
    /// Served resources.
    pub registry: Registry,
    /// Bearer tokens.
    pub identities: Identities,
    /// Options the server was started with.
    pub opts: ServerOptions,
    seed: AtomicU64,
    /// Watches refused with 410 Gone so far.
    pub(crate) expired_watches: AtomicU64,
    /// Bumped to end every open watch (as a server restart would).
    pub(crate) watch_epoch: tokio::sync::watch::Sender<u64>,
    gc: Arc<Notify>,
    me: std::sync::Weak<Server>,
}

impl Server {
    fn new(opts: ServerOptions) -> Arc<Self> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(42);
        Arc::new_cyclic(|me| Self {
            store: Store::new(opts.history_limit),
            registry: Registry::with_builtins(),
            identities: Identities::default(),
            opts,
            seed: AtomicU64::new(seed),
            expired_watches: AtomicU64::new(0),
            watch_epoch: tokio::sync::watch::channel(0).0,
            gc: Arc::new(Notify::new()),
            me: me.clone(),
        })
    }

    /// A strong reference to this server.
    pub(crate) fn shared(&self) -> Arc<Server> {
        self.me.upgrade().unwrap_or_else(|| {
            // Only reachable while the server is being dropped; hand out a fresh empty one.
            Server::new(self.opts.clone())
        })
    }

    pub(crate) fn next_random(&self) -> u64 {
        handlers::next_seed(&self.seed)
    }

    /// Hook after a create or update (CRD registration).
    pub(crate) fn after_write(&self, rt: &ResourceType, _old: Option<&Value>, new: &Value) {
        if rt.kind == "CustomResourceDefinition"
            && let (Ok(types), Some(name)) = (
                resources::from_crd(new),
                new.pointer("/metadata/name").and_then(Value::as_str),
            )
        {
            self.registry.register_crd(name, types);
        }
    }

    /// Hook after an object is gone for good (CRD cleanup, garbage collection).
    pub(crate) fn after_delete(&self, rt: &ResourceType, gone: &Value) {
        if rt.kind == "CustomResourceDefinition"
            && let Some(name) = gone.pointer("/metadata/name").and_then(Value::as_str)
        {
            let types: Vec<_> = self
                .registry
                .all()
                .into_iter()
                .filter(|t| t.crd_name.as_deref() == Some(name))
                .collect();
            self.registry.unregister_crd(name);
            if let Some(t) = types.first() {
                let gr = t.group_resource();
                for o in self.store.list(&gr, None).0 {
                    let ns = o
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let n = o
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let _ = self.store.remove(&gr, ns, n, Precondition::Exists);
                }
            }
        }
        self.gc.notify_one();
    }

    /// Deletes an object the way the API does: objects with finalizers (and namespaces) get
    /// a `deletionTimestamp`, others are removed at once.
    pub fn delete_object(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Value, StoreError> {
        let gr = rt.group_resource();
        for _ in 0..16 {
            let old = self
                .store
                .get(&gr, namespace, name)
                .ok_or(StoreError::FindObject)?;
            let has_finalizers = old
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            let is_namespace = rt.kind == "Namespace" && rt.group.is_empty();
            if has_finalizers || is_namespace {
                if old.pointer("/metadata/deletionTimestamp").is_some() {
                    return Ok((*old).clone());
                }
                let mut next = (*old).clone();
                next["metadata"]["deletionTimestamp"] = json!(handlers::now_rfc3339());
                next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                if is_namespace {
                    next["status"]["phase"] = json!("Terminating");
                }
                match self
                    .store
                    .put(&gr, next, Precondition::Version(store::rv_of(&old)))
                {
                    Ok(v) => {
                        self.gc.notify_one();
                        return Ok((*v).clone());
                    }
                    Err(StoreError::MatchResourceVersion) => continue,
                    Err(e) => return Err(e),
                }
            }
            match self.store.remove(
                &gr,
                namespace,
                name,
                Precondition::Version(store::rv_of(&old)),
            ) {
                Ok(v) => {
                    self.after_delete(rt, &v);
                    return Ok((*v).clone());
                }
                Err(StoreError::MatchResourceVersion) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::MatchResourceVersion)
    }

    /// One garbage-collection pass: deletes objects whose owners are all gone, empties
    /// terminating namespaces and removes them once empty. Returns whether it did anything.
    fn collect_garbage(&self) -> bool {
        let mut did = false;
        let types = self.registry.all();
        let mut uids = std::collections::HashSet::new();
        let mut all = Vec::new();
        for t in &types {
            for o in self.store.list(&t.group_resource(), None).0 {
                if let Some(uid) = o.pointer("/metadata/uid").and_then(Value::as_str) {
                    uids.insert(uid.to_string());
                }
                all.push((t.clone(), o));
            }
        }
        let terminating: Vec<String> = self
            .store
            .list("namespaces", None)
            .0
            .iter()
            .filter(|n| n.pointer("/metadata/deletionTimestamp").is_some())
            .filter_map(|n| {
                n.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        let mut remaining: std::collections::HashMap<String, usize> = Default::default();
        for (t, o) in &all {
            let ns = o
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let owners = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array);
            let orphaned = owners.is_some_and(|owners| {
                !owners.is_empty()
                    && owners.iter().all(|r| {
                        r.get("uid")
                            .and_then(Value::as_str)
                            .is_none_or(|u| !uids.contains(u))
                    })
            });
            let in_terminating = t.namespaced && terminating.iter().any(|n| n == ns);
            if in_terminating {
                *remaining.entry(ns.to_string()).or_default() += 1;
            }
            if (orphaned || in_terminating) && o.pointer("/metadata/deletionTimestamp").is_none() {
                did |= self.delete_object(t, ns, name).is_ok();
            }
        }
        for ns in terminating {
            if remaining.get(&ns).copied().unwrap_or(0) == 0
                && let Ok(v) = self
                    .store
                    .remove("namespaces", "", &ns, Precondition::Exists)
            {
                did = true;
                self.gc.notify_one();
                let _ = v;
            }
        }
        did
    }

    fn install(&self, gr: &str, obj: Value) -> Result<(), ServerError> {
        let what = format!("{gr} {}", obj["metadata"]["name"]);
        match self.store.put(gr, obj, Precondition::Absent) {
            Ok(_) | Err(StoreError::CreateExisting) => Ok(()),
            Err(e) => Err(ServerError::InstallObject {
                what,
                message: e.to_string(),
            }),
        }
    }
}

/// A running test server.
pub struct TestApiServer {
    /// Address it listens on (127.0.0.1).
    pub addr: SocketAddr,
    /// Administrator kubeconfig.
    pub kubeconfig_path: PathBuf,
    ca_pem: String,
    state: Arc<Server>,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestApiServer {
    /// Makes the CA and serving certificate, binds, installs the default namespaces, the
    /// default RBAC policy (and optionally Meshlet's CRDs), writes the administrator
    /// kubeconfig and starts serving HTTPS.
    pub async fn start(opts: ServerOptions) -> Result<Self, ServerError> {
        let certificates = tls::generate()?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .map_err(|source| ServerError::BindSocket {
                port: opts.port,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::BindSocket {
                port: opts.port,
                source,
            })?;
        let (dir, tempdir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(ServerError::CreateDir)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("meshlet-test-apiserver-")
                    .tempdir()
                    .map_err(ServerError::CreateDir)?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let state = Server::new(opts.clone());
        state.identities.insert(&opts.admin_token, User::admin());
        let now = handlers::now_rfc3339();
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let uid = format!(
                "00000000-0000-4000-8000-{:012x}",
                state.next_random() & 0xffff_ffff_ffff
            );
            state.install(
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": uid, "creationTimestamp": now, "generation": 1,
                        "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
            )?;
            state.install(
                "serviceaccounts",
                json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": ns, "uid": format!("{uid}-sa"), "creationTimestamp": now}}),
            )?;
        }
        for (gr, obj) in rbac::bootstrap_policy() {
            let mut obj = obj;
            obj["metadata"]["uid"] = json!(format!(
                "00000000-0000-4000-a000-{:012x}",
                state.next_random() & 0xffff_ffff_ffff
            ));
            obj["metadata"]["creationTimestamp"] = json!(now);
            state.install(&gr, obj)?;
        }
        if opts.install_meshlet_crds {
            for crd in meshlet_crds::all_crds() {
                let mut v = serde_json::to_value(&crd).map_err(|e| ServerError::InstallObject {
                    what: "CRD".into(),
                    message: e.to_string(),
                })?;
                let name = crd.metadata.name.clone().unwrap_or_default();
                let types = resources::from_crd(&v).map_err(|e| ServerError::InstallObject {
                    what: name.clone(),
                    message: e.to_string(),
                })?;
                v["apiVersion"] = json!("apiextensions.k8s.io/v1");
                v["kind"] = json!("CustomResourceDefinition");
                v["metadata"]["uid"] = json!(format!(
                    "00000000-0000-4000-9000-{:012x}",
                    state.next_random() & 0xffff_ffff_ffff
                ));
                v["metadata"]["creationTimestamp"] = json!(now);
                v["status"] = json!({"acceptedNames": v["spec"]["names"].clone(), "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now}]});
                state.install("customresourcedefinitions.apiextensions.k8s.io", v)?;
                state.registry.register_crd(&name, types);
            }
        }
        let kubeconfig_path = dir.join("kubeconfig");
        kubeconfig::write(
            &kubeconfig_path,
            &kubeconfig::Kubeconfig {
                server: &format!("https://{addr}"),
                ca_pem: &certificates.ca_pem,
                user: "admin",
                token: &opts.admin_token,
                namespace: "default",
            },
        )?;

        let app = axum::Router::new()
            .fallback(handlers::handle)
            .with_state(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(tls::serve(
            listener,
            certificates.server_config.clone(),
            app,
            rx,
        ));
        let gc_state = Arc::downgrade(&state);
        let gc_notify = state.gc.clone();
        tokio::spawn(async move {
            loop {
                let notified = gc_notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let Some(s) = gc_state.upgrade() else { return };
                while s.collect_garbage() {}
                drop(s);
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(Self {
            addr,
            kubeconfig_path,
            ca_pem: certificates.ca_pem,
            state,
            dir,
            _tempdir: tempdir,
            shutdown: Some(tx),
        })
    }

    /// Base URL, e.g. `https://127.0.0.1:34567`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// PEM of the CA that signed the serving certificate (what clients must trust).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// A bearer token authenticating as ServiceAccount `namespace/name` (valid while that
    /// ServiceAccount exists).
    pub fn token_for(&self, namespace: &str, name: &str) -> String {
        let token = authn::mint_token(&format!("meshlet-test-sa.{namespace}.{name}"));
        self.state
            .identities
            .insert(&token, User::service_account(namespace, name));
        token
    }

    /// A bearer token of ServiceAccount `namespace/sa` bound to Pod `pod_name` (uid
    /// `pod_uid`) on Node `node_name`, as the kubelet projects into a Pod: valid while the
    /// ServiceAccount and that Pod (same uid) exist; its user's `extra` carries
    /// `authentication.kubernetes.io/{node-name,pod-name,pod-uid}`.
    pub fn token_for_pod(
        &self,
        namespace: &str,
        sa: &str,
        pod_name: &str,
        pod_uid: &str,
        node_name: &str,
    ) -> String {
        let token = authn::mint_token(&format!("meshlet-test-pod.{namespace}.{pod_name}"));
        self.state.identities.insert_bound(
            &token,
            User::service_account(namespace, sa),
            PodBinding {
                namespace: namespace.into(),
                name: pod_name.into(),
                uid: pod_uid.into(),
                node_name: node_name.into(),
            },
        );
        token
    }

    /// Writes a kubeconfig (CA + bearer token) for ServiceAccount `namespace/name` and
    /// returns its path.
    pub fn kubeconfig_for(&self, namespace: &str, name: &str) -> Result<PathBuf, ServerError> {
        let token = self.token_for(namespace, name);
        let path = self.dir.join(format!("kubeconfig-{namespace}-{name}"));
        kubeconfig::write(
            &path,
            &kubeconfig::Kubeconfig {
                server: &self.url(),
                ca_pem: &self.ca_pem,
                user: &format!("{namespace}-{name}"),
                token: &token,
                namespace: "default",
            },
        )?;
        Ok(path)
    }

    /// A kube client authenticated as the administrator.
    pub async fn client(&self) -> Result<kube::Client, ServerError> {
        client_from(&self.kubeconfig_path).await
    }

    /// A kube client authenticated as ServiceAccount `namespace/name`.
    pub async fn client_for(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Client, ServerError> {
        client_from(&self.kubeconfig_for(namespace, name)?).await
    }

    /// Forgets the watch history, so every older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        self.state.store.compact();
    }

    /// Ends every open watch, as a restart of the real server would; clients must resume
    /// from their last resourceVersion (and relist after `410 Gone` if it was compacted).
    pub fn end_watches(&self) {
        self.state.watch_epoch.send_modify(|e| *e += 1);
    }

    /// How many watches were refused with `410 Gone` so far.
    pub fn expired_watches(&self) -> u64 {
        self.state
            .expired_watches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Number of stored objects.
    pub fn object_count(&self) -> usize {
        self.state.store.len()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.store.current_rv()
    }

    /// Stops serving.
    pub fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn client_from(path: &Path) -> Result<kube::Client, ServerError> {
    let kc = kube::config::Kubeconfig::read_from(path).map_err(ServerError::LoadKubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(ServerError::LoadKubeconfig)?;
    kube::Client::try_from(cfg).map_err(ServerError::BuildClient)
}
