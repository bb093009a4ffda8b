//! The reconcile loop: enrollment, agent DaemonSet, rollout driver and MeshConfig status, in
//! one idempotent pass over cached state.
//!
//! ```text
//!  watch MeshConfig ─┐                      ┌─ observe::decide ─► rollout::plan (pure)
//!  watch Nodes ──────┤ reflector stores ──► │
//!  watch Enrollments ┤  + wake-up signal    └─ apply: ServiceAccount, DaemonSet (SSA)
//!  watch agent Pods ─┘                         enrollments: create / delete / release
//!                                              plan actions: desiredVersion, delete pod
//!                                              MeshConfig.status (SSA), Events, metrics
//!                                              wait until the caches show these writes
//! ```
//!
//! One pass runs at a time, woken by any watch event, every `requeue_in_flight` while a
//! rollout moves, and every `resync` otherwise. After writing, a pass waits until its own
//! writes are visible in the caches, so the next pass never plans from state older than what
//! it already changed (which would let it move more than `maxUnavailable` nodes).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::FutureExt;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Node, Pod, PodSpec, PodStatus, ServiceAccount},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, PartialObjectMeta, Patch, PatchParams, Preconditions},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use meshlet_crds::{
    MeshConfig, NodeEnrollment,
    conditions::{self, STALLED, Status},
    names::{AGENT_NAME, DATAPLANE_FINALIZER, NAME_LABEL, OPERATOR_NAME},
    v1alpha1::meshconfig::{MESHCONFIG_NAME, MeshConfigStatus, RolloutPhase},
};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{Instrument, field};

use crate::{
    FIELD_MANAGER, Shared,
    observe::{self, Decision, NodeInfo, Snapshot},
    render::{self, EnrollmentIntent},
    rollout::{self, Action, Phase, Plan},
    watch::{AbortOnDrop, caches_filled, failure_backoff, next_pass, spawn_reflector},
};

/// How the loop paces itself.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Interval between passes while nodes are moving.
    pub requeue_in_flight: Duration,
    /// Interval between passes when nothing moves.
    pub resync: Duration,
    /// Longest wait for the caches to show the pass's own writes.
    pub cache_wait: Duration,
    /// Parallel writes when many enrollments change at once.
    pub write_concurrency: usize,
}

impl Default for LoopSettings {
    fn default() -> Self {
        Self {
            requeue_in_flight: Duration::from_secs(1),
            resync: Duration::from_secs(30),
            cache_wait: Duration::from_secs(10),
            write_concurrency: 16,
        }
    }
}

/// What every pass needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Namespace of the agent DaemonSet and pods.
    pub namespace: String,
    /// Metrics and health.
    pub shared: Arc<Shared>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Pacing.
    pub settings: LoopSettings,
}

impl Context {
    /// A context for `client`, recording events as `identity`.
    pub fn new(
        client: Client,
        namespace: String,
        identity: String,
        shared: Arc<Shared>,
        settings: LoopSettings,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: OPERATOR_NAME.to_owned(),
                instance: Some(identity),
            },
        );
        Self {
            client,
            namespace,
            shared,
            recorder,
            settings,
        }
    }
}

/// A step of a pass that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Server-side apply of an agent object failed.
    #[error("failed to apply the agent {kind} {name}")]
    ApplyAgentObject {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Server-side apply of a NodeEnrollment failed.
    #[error("failed to apply NodeEnrollment {name}")]
    ApplyEnrollment {
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting a NodeEnrollment failed.
    #[error("failed to delete NodeEnrollment {name}")]
    DeleteEnrollment {
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Removing the finalizer of a NodeEnrollment failed.
    #[error("failed to release the finalizer of NodeEnrollment {name}")]
    ReleaseFinalizer {
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting an agent pod failed.
    #[error("failed to delete agent pod {name} of node {node}")]
    DeletePod {
        /// Pod name.
        name: String,
        /// Node name.
        node: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing the MeshConfig status failed.
    #[error("failed to write the status of MeshConfig {name}")]
    WriteStatus {
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// Metric label of the failing step.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ApplyAgentObject { .. } => "apply_agent_object",
            Self::ApplyEnrollment { .. } => "apply_enrollment",
            Self::DeleteEnrollment { .. } => "delete_enrollment",
            Self::ReleaseFinalizer { .. } => "release_finalizer",
            Self::DeletePod { .. } => "delete_pod",
            Self::WriteStatus { .. } => "write_status",
        }
    }
}

/// The caches a pass reads.
struct Stores {
    mesh: Store<MeshConfig>,
    nodes: Store<PartialObjectMeta<Node>>,
    enrollments: Store<NodeEnrollment>,
    pods: Store<Pod>,
}

/// Keeps only what the operator reads of an agent pod (labels, node, init container
/// statuses), so thousands of cached pods stay small.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        *spec = PodSpec {
            node_name: spec.node_name.take(),
            ..PodSpec::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = PodStatus {
            init_container_statuses: status.init_container_statuses.take(),
            ..PodStatus::default()
        };
    }
}

/// Memory kept between passes (never needed for correctness: only to skip redundant writes).
#[derive(Default)]
struct LoopState {
    last_agent_objects: Option<(serde_json::Value, Instant)>,
}

/// Whether a pass left work in motion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Nodes are moving or enrollments are changing: come back soon.
    Busy,
    /// Nothing moves.
    Idle,
}

/// Runs the loop until the task is aborted.
pub async fn run(ctx: Arc<Context>) {
    let wake = Arc::new(Notify::new());
    let client = ctx.client.clone();
    let wc = watcher::Config::default();
    let (mesh, w_mesh) = reflector::store();
    let (nodes, w_nodes) = reflector::store();
    let (enrollments, w_enr) = reflector::store();
    let (pods, w_pods) = reflector::store();
    let _tasks = AbortOnDrop(vec![
        spawn_reflector(
            w_mesh,
            watcher(
                Api::<MeshConfig>::all(client.clone()),
                wc.clone()
                    .fields(&format!("metadata.name={MESHCONFIG_NAME}")),
            ),
            wake.clone(),
            "MeshConfig",
        ),
        spawn_reflector(
            w_nodes,
            watcher(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                wc.clone(),
            )
            .modify(|n| {
                n.metadata.managed_fields = None;
                n.metadata.annotations = None;
            }),
            wake.clone(),
            "Node",
        ),
        spawn_reflector(
            w_enr,
            watcher(Api::<NodeEnrollment>::all(client.clone()), wc.clone())
                .modify(|ne| ne.metadata.managed_fields = None),
            wake.clone(),
            "NodeEnrollment",
        ),
        spawn_reflector(
            w_pods,
            watcher(
                Api::<Pod>::namespaced(client.clone(), &ctx.namespace),
                wc.clone().labels(&format!("{NAME_LABEL}={AGENT_NAME}")),
            )
            .modify(trim_pod),
            wake.clone(),
            "Pod",
        ),
    ]);
    let stores = Stores {
        mesh,
        nodes,
        enrollments,
        pods,
    };
    if !caches_filled(
        vec![
            stores.mesh.wait_until_ready().boxed(),
            stores.nodes.wait_until_ready().boxed(),
            stores.enrollments.wait_until_ready().boxed(),
            stores.pods.wait_until_ready().boxed(),
        ],
        "meshconfig",
    )
    .await
    {
        return;
    }
    let mut state = LoopState::default();
    let mut failures: u32 = 0;
    loop {
        let span = tracing::info_span!(
            "reconcile",
            meshconfig = MESHCONFIG_NAME,
            phase = field::Empty,
            nodes = field::Empty,
            actions = field::Empty,
        );
        let started = Instant::now();
        let result = reconcile(&ctx, &stores, &mut state)
            .instrument(span.clone())
            .await;
        ctx.shared
            .metrics
            .reconciled(started.elapsed().as_secs_f64());
        let wait = match result {
            Ok(Outcome::Busy) => {
                failures = 0;
                ctx.settings.requeue_in_flight
            }
            Ok(Outcome::Idle) => {
                failures = 0;
                ctx.settings.resync
            }
            Err(e) => {
                ctx.shared.metrics.failed(e.reason());
                span.in_scope(|| {
                    tracing::warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "reconcile failed; retrying");
                });
                failures = failures.saturating_add(1);
                failure_backoff(failures)
            }
        };
        next_pass(&wake, wait).await;
    }
}

/// Something a pass wrote and expects to see in the caches.
enum Expect {
    Enrollment {
        name: String,
        desired: Option<String>,
    },
    EnrollmentGone(String),
    PodGone(String),
    Status(Box<MeshConfigStatus>),
}

fn node_infos(stores: &Stores) -> Vec<NodeInfo> {
    stores
        .nodes
        .state()
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .map(|n| NodeInfo {
            name: n.metadata.name.clone().unwrap_or_default(),
            labels: n.metadata.labels.clone().unwrap_or_default(),
        })
        .collect()
}

async fn reconcile(
    ctx: &Context,
    stores: &Stores,
    state: &mut LoopState,
) -> Result<Outcome, ReconcileError> {
    let Some(mesh) = stores.mesh.get(&ObjectRef::new(MESHCONFIG_NAME)) else {
        tracing::info!("no MeshConfig named {MESHCONFIG_NAME}; nothing to do until one is created");
        return Ok(Outcome::Idle);
    };
    if mesh.metadata.deletion_timestamp.is_some() {
        return Ok(Outcome::Idle);
    }
    let enrollments = stores.enrollments.state();
    let pods = stores.pods.state();
    let snap = Snapshot {
        mesh: &mesh,
        nodes: node_infos(stores),
        enrollments: enrollments.iter().map(AsRef::as_ref).collect(),
        pods: pods.iter().map(AsRef::as_ref).collect(),
        now: Timestamp::now(),
    };
    let decision = match observe::decide(&snap) {
        Ok(d) => d,
        Err(invalid) => {
            tracing::warn!(error = %invalid, "MeshConfig cannot be acted on");
            report_invalid(ctx, &mesh, &invalid.to_string()).await?;
            return Ok(Outcome::Idle);
        }
    };
    let plan = rollout::plan(&decision.policy, &decision.observed);
    let version = observe::template_version(&decision.policy, &decision.observed, &plan);
    let span = tracing::Span::current();
    span.record("phase", field::debug(&plan.phase));
    span.record("nodes", decision.observed.nodes.len());
    span.record("actions", plan.actions.len());

    apply_agent_objects(ctx, &mesh, &version, state).await?;

    let mut expect = Vec::new();
    let mut first_error: Option<ReconcileError> = None;
    enrollments_step(ctx, &decision, &plan, &mut expect, &mut first_error).await;
    actions_step(
        ctx,
        &decision,
        &plan,
        &version,
        &mut expect,
        &mut first_error,
    )
    .await;

    let previous = mesh.status.clone().unwrap_or_default();
    let new_status = observe::status(&mesh, &decision, &plan, &previous, snap.now);
    if mesh.status.as_ref() != Some(&new_status) {
        write_status(ctx, &new_status).await?;
        expect.push(Expect::Status(Box::new(new_status.clone())));
    }
    publish_events(ctx, &mesh, &decision, &previous, &new_status).await;
    record_metrics(ctx, &decision, &plan);
    if let Some(e) = first_error {
        return Err(e);
    }
    let busy = !expect.is_empty()
        || !matches!(plan.phase, Phase::Complete | Phase::Halted(_))
        || !plan.in_flight.is_empty();
    wait_for_caches(ctx, stores, expect).await;
    Ok(if busy { Outcome::Busy } else { Outcome::Idle })
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn apply_agent_objects(
    ctx: &Context,
    mesh: &MeshConfig,
    version: &str,
    state: &mut LoopState,
) -> Result<(), ReconcileError> {
    let sa = render::agent_service_account(&ctx.namespace);
    let ds = render::agent_daemonset(mesh, version, &ctx.namespace);
    let both = json!([sa, ds]);
    // Re-apply when the rendering changed, and every few minutes to repair drift.
    if let Some((last, at)) = &state.last_agent_objects
        && *last == both
        && at.elapsed() < Duration::from_secs(300)
    {
        return Ok(());
    }
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ctx.namespace)
        .patch(AGENT_NAME, &apply_params(), &Patch::Apply(&sa))
        .await
        .map_err(|source| ReconcileError::ApplyAgentObject {
            kind: "ServiceAccount",
            name: AGENT_NAME.to_owned(),
            source,
        })?;
    Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.namespace)
        .patch(AGENT_NAME, &apply_params(), &Patch::Apply(&ds))
        .await
        .map_err(|source| ReconcileError::ApplyAgentObject {
            kind: "DaemonSet",
            name: AGENT_NAME.to_owned(),
            source,
        })?;
    ctx.shared.metrics.writes.inc_by(2);
    tracing::info!(version, "applied the agent DaemonSet");
    state.last_agent_objects = Some((both, Instant::now()));
    Ok(())
}

/// Server-side-applies the operator's fields of one enrollment.
async fn apply_enrollment(ctx: &Context, intent: &EnrollmentIntent) -> Result<(), ReconcileError> {
    let body = render::enrollment(intent);
    Api::<NodeEnrollment>::all(ctx.client.clone())
        .patch(
            &intent.node,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| ReconcileError::ApplyEnrollment {
            name: intent.node.clone(),
            source,
        })?;
    ctx.shared.metrics.writes.inc();
    Ok(())
}

/// Runs `f` over `items`, at most `conc` at a time, and returns the results in order.
async fn limited<'a, T, Fut>(
    items: &'a [T],
    conc: usize,
    f: impl Fn(&'a T) -> Fut,
) -> Vec<Fut::Output>
where
    Fut: std::future::Future,
{
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(conc.max(1)) {
        out.extend(futures::future::join_all(chunk.iter().map(&f)).await);
    }
    out
}

fn keep_first(first: &mut Option<ReconcileError>, r: Result<(), ReconcileError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "step failed");
        if first.is_none() {
            *first = Some(e);
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Creates missing enrollments, deletes unselected ones, releases finalizers nobody else can.
async fn enrollments_step(
    ctx: &Context,
    d: &Decision,
    plan: &Plan,
    expect: &mut Vec<Expect>,
    first: &mut Option<ReconcileError>,
) {
    let conc = ctx.settings.write_concurrency.max(1);
    // Enrollments the plan gives a version are created by the action step in one write.
    let set_by_plan: BTreeSet<&str> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::SetDesiredVersion { node, .. } => Some(node.as_str()),
            Action::RestartAgent { .. } => None,
        })
        .collect();
    let creates: Vec<EnrollmentIntent> = d
        .create
        .iter()
        .filter(|n| !set_by_plan.contains(n.as_str()))
        .map(|n| EnrollmentIntent {
            node: n.clone(),
            managed: true,
            desired: None,
        })
        .collect();
    let results: Vec<Result<(), ReconcileError>> =
        limited(&creates, conc, |intent| apply_enrollment(ctx, intent)).await;
    for r in results {
        keep_first(first, r);
    }
    for intent in &creates {
        expect.push(Expect::Enrollment {
            name: intent.node.clone(),
            desired: None,
        });
    }
    if !creates.is_empty() {
        tracing::info!(count = creates.len(), "created NodeEnrollments");
    }

    let api = Api::<NodeEnrollment>::all(ctx.client.clone());
    let deletes: Vec<Result<(), ReconcileError>> = limited(&d.delete, conc, |name| {
            let api = api.clone();
            async move {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {
                        ctx.shared.metrics.writes.inc();
                        tracing::info!(enrollment = %name, "deleted NodeEnrollment of an unselected or missing node");
                        Ok(())
                    }
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(source) => Err(ReconcileError::DeleteEnrollment {
                        name: name.clone(),
                        source,
                    }),
                }
            }
        })
        .await;
    for r in deletes {
        keep_first(first, r);
    }
    for name in &d.delete {
        expect.push(Expect::EnrollmentGone(name.clone()));
    }

    for name in &d.release {
        let r = release_finalizer(ctx, &api, name).await;
        if r.is_ok() {
            expect.push(Expect::EnrollmentGone(name.clone()));
        }
        keep_first(first, r);
    }
}

async fn release_finalizer(
    ctx: &Context,
    api: &Api<NodeEnrollment>,
    name: &str,
) -> Result<(), ReconcileError> {
    let current = match api.get_opt(name).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(()),
        Err(source) => {
            return Err(ReconcileError::ReleaseFinalizer {
                name: name.to_owned(),
                source,
            });
        }
    };
    let remaining: Vec<String> = current
        .metadata
        .finalizers
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != DATAPLANE_FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "finalizers": remaining,
            "resourceVersion": current.metadata.resource_version,
        }
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            ctx.shared.metrics.writes.inc();
            tracing::info!(enrollment = %name, "released the data-plane finalizer: the node and its agent are gone");
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(ReconcileError::ReleaseFinalizer {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Carries out the plan: set desired versions, then restart the agent pods concerned. A node
/// without a desired version runs what the DaemonSet template (`template`) gives it.
async fn actions_step(
    ctx: &Context,
    d: &Decision,
    plan: &Plan,
    template: &str,
    expect: &mut Vec<Expect>,
    first: &mut Option<ReconcileError>,
) {
    let conc = ctx.settings.write_concurrency.max(1);
    let started = Timestamp::now().to_string();
    let mut desired: BTreeMap<&str, String> = d
        .observed
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.as_str(), n.desired_version.clone()?)))
        .collect();
    let mut intents = Vec::new();
    for a in &plan.actions {
        if let Action::SetDesiredVersion { node, version } = a {
            desired.insert(node.as_str(), version.clone());
            let managed = d.managed.contains(node) || d.create.contains(node);
            intents.push(EnrollmentIntent {
                node: node.clone(),
                managed,
                desired: Some((version.clone(), started.clone())),
            });
        }
    }
    let results: Vec<Result<(), ReconcileError>> =
        limited(&intents, conc, |intent| apply_enrollment(ctx, intent)).await;
    let mut failed_nodes = BTreeSet::new();
    for r in results {
        if let Err(ReconcileError::ApplyEnrollment { name, .. }) = &r {
            failed_nodes.insert(name.clone());
        }
        keep_first(first, r);
    }
    for intent in &intents {
        if failed_nodes.contains(&intent.node) {
            continue;
        }
        tracing::info!(node = %intent.node, version = ?intent.desired.as_ref().map(|d| &d.0), "set desiredVersion");
        expect.push(Expect::Enrollment {
            name: intent.node.clone(),
            desired: intent.desired.as_ref().map(|(v, _)| v.clone()),
        });
    }

    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &ctx.namespace);
    let restarts: Vec<(&str, &observe::AgentPod)> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::RestartAgent { node } => Some(node.as_str()),
            Action::SetDesiredVersion { .. } => None,
        })
        .filter(|node| !failed_nodes.contains(*node))
        .filter_map(|node| Some((node, d.pods.get(node)?)))
        // A pod already on the version its node should run needs no restart: deleting it
        // would only bring the same version back, again and again.
        .filter(|(node, pod)| {
            pod.version.as_deref() != Some(desired.get(node).map_or(template, String::as_str))
        })
        .collect();
    let results: Vec<Result<(), ReconcileError>> = limited(&restarts, conc, |(node, pod)| {
            let api = pods_api.clone();
            async move {
                let params = DeleteParams {
                    preconditions: pod.uid.clone().map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&pod.name, &params).await {
                    Ok(_) => {
                        ctx.shared.metrics.writes.inc();
                        tracing::info!(node = %node, pod = %pod.name, "deleted the agent pod so it restarts on the desired version");
                        Ok(())
                    }
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) if matches!(&e, kube::Error::Api(s) if s.code == 409) => Ok(()),
                    Err(source) => Err(ReconcileError::DeletePod {
                        name: pod.name.clone(),
                        node: (*node).to_owned(),
                        source,
                    }),
                }
            }
        })
        .await;
    for r in results {
        keep_first(first, r);
    }
    for (_, pod) in &restarts {
        if let Some(uid) = &pod.uid {
            expect.push(Expect::PodGone(uid.clone()));
        }
    }
}

async fn write_status(ctx: &Context, status: &MeshConfigStatus) -> Result<(), ReconcileError> {
    let body = json!({
        "apiVersion": "meshlet.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": { "name": MESHCONFIG_NAME },
        "status": status,
    });
    Api::<MeshConfig>::all(ctx.client.clone())
        .patch_status(MESHCONFIG_NAME, &apply_params(), &Patch::Apply(&body))
        .await
        .map_err(|source| ReconcileError::WriteStatus {
            name: MESHCONFIG_NAME.to_owned(),
            source,
        })?;
    ctx.shared.metrics.writes.inc();
    Ok(())
}

/// Reports a spec the operator cannot act on as `Stalled`, naming the field.
async fn report_invalid(
    ctx: &Context,
    mesh: &MeshConfig,
    message: &str,
) -> Result<(), ReconcileError> {
    let mut status = mesh.status.clone().unwrap_or_default();
    let changed = conditions::set_condition(
        &mut status.conditions,
        STALLED,
        Status::True,
        "InvalidSpec",
        message,
        mesh.metadata.generation,
    ) | conditions::set_condition(
        &mut status.conditions,
        conditions::READY,
        Status::False,
        "InvalidSpec",
        message,
        mesh.metadata.generation,
    );
    status.observed_generation = mesh.metadata.generation;
    if changed {
        write_status(ctx, &status).await?;
        publish(ctx, mesh, EventType::Warning, "InvalidSpec", message).await;
    }
    Ok(())
}

async fn publish(ctx: &Context, mesh: &MeshConfig, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &mesh.object_ref(&())).await {
        tracing::warn!(reason, error = %e, "failed to record an event");
    }
}

fn phase_halted(p: RolloutPhase) -> bool {
    matches!(p, RolloutPhase::Halted | RolloutPhase::RollingBack)
}

/// Events for the transitions a user cares about, derived from the old and new status.
async fn publish_events(
    ctx: &Context,
    mesh: &MeshConfig,
    d: &Decision,
    previous: &MeshConfigStatus,
    new: &MeshConfigStatus,
) {
    let (Some(new_r), old_r) = (new.rollout.as_ref(), previous.rollout.as_ref()) else {
        return;
    };
    let target = new_r.target_version.clone().unwrap_or_default();
    let old_phase = old_r.map(|r| r.phase);
    let old_target = old_r.and_then(|r| r.target_version.clone());
    if old_target.as_deref() != Some(target.as_str()) && new_r.phase != RolloutPhase::Complete {
        let from = new_r
            .current_version
            .clone()
            .unwrap_or_else(|| "nothing".into());
        publish(
            ctx,
            mesh,
            EventType::Normal,
            "RolloutStarted",
            &format!("rolling out agent version {target} (from {from})"),
        )
        .await;
    }
    if let Some(old) = old_r {
        for node in &old.nodes_in_flight {
            let done = !new_r.nodes_in_flight.contains(node)
                && d.observed.nodes.iter().any(|n| {
                    n.name == *node && n.agent_version.as_deref() == Some(target.as_str())
                });
            if done {
                publish(
                    ctx,
                    mesh,
                    EventType::Normal,
                    "NodeUpgraded",
                    &format!("node {node} runs agent version {target}"),
                )
                .await;
            }
        }
    }
    let reason = new_r.halted_reason.clone().unwrap_or_default();
    if phase_halted(new_r.phase) && !old_phase.is_some_and(phase_halted) {
        publish(ctx, mesh, EventType::Warning, "RolloutHalted", &reason).await;
    }
    if new_r.phase == RolloutPhase::RollingBack && old_phase != Some(RolloutPhase::RollingBack) {
        let back = new_r.current_version.clone().unwrap_or_default();
        publish(
            ctx,
            mesh,
            EventType::Warning,
            "RollingBack",
            &format!("moving upgraded nodes back to {back}: {reason}"),
        )
        .await;
    }
    if new_r.phase == RolloutPhase::Complete
        && (old_phase != Some(RolloutPhase::Complete)
            || old_r.and_then(|r| r.current_version.clone()) != new_r.current_version)
    {
        publish(
            ctx,
            mesh,
            EventType::Normal,
            "RolloutCompleted",
            &format!("every node runs agent version {target}"),
        )
        .await;
    }
    let stalled = |s: &MeshConfigStatus| {
        conditions::find_condition(&s.conditions, STALLED)
            .filter(|c| c.status == "True" && c.reason == "NodeNotFound")
            .map(|c| c.message.clone())
    };
    if let Some(msg) = stalled(new)
        && stalled(previous) != Some(msg.clone())
    {
        publish(ctx, mesh, EventType::Warning, "NodeNotFound", &msg).await;
    }
}

fn record_metrics(ctx: &Context, d: &Decision, plan: &Plan) {
    let m = &ctx.shared.metrics;
    m.set_nodes("selected", d.selected);
    m.set_nodes("enrolled", d.enrolled);
    m.set_nodes("ready", d.ready);
    m.set_nodes("updated", plan.updated);
    m.set_nodes("failed", d.failed);
    let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.rollout_updated.set(to_i64(plan.updated));
    m.rollout_total.set(to_i64(d.observed.nodes.len()));
    m.rollout_in_flight.set(to_i64(plan.in_flight.len()));
}

/// Waits (bounded) until the caches show every write of this pass.
async fn wait_for_caches(ctx: &Context, stores: &Stores, mut expect: Vec<Expect>) {
    let deadline = Instant::now() + ctx.settings.cache_wait;
    loop {
        expect.retain(|e| !seen(stores, e));
        if expect.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                pending = expect.len(),
                "caches did not show this pass's writes in time; continuing"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn seen(stores: &Stores, e: &Expect) -> bool {
    match e {
        Expect::Enrollment { name, desired } => stores
            .enrollments
            .get(&ObjectRef::new(name))
            .is_some_and(|ne| desired.is_none() || ne.spec.desired_version == *desired),
        Expect::EnrollmentGone(name) => stores
            .enrollments
            .get(&ObjectRef::new(name))
            .is_none_or(|ne| ne.metadata.deletion_timestamp.is_some()),
        Expect::PodGone(uid) => stores
            .pods
            .find(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
            .is_none(),
        Expect::Status(status) => stores
            .mesh
            .get(&ObjectRef::new(MESHCONFIG_NAME))
            .is_some_and(|m| m.status.as_deref_eq(status)),
    }
}

trait StatusEq {
    fn as_deref_eq(&self, other: &MeshConfigStatus) -> bool;
}

impl StatusEq for Option<MeshConfigStatus> {
    fn as_deref_eq(&self, other: &MeshConfigStatus) -> bool {
        self.as_ref() == Some(other)
    }
}
