//! `MeshConfig`: the cluster-wide singleton (`default`) that says which agent runs where, how big
//! its maps are, and how upgrades roll out.
//!
//! ```text
//!  user / GitOps ─► MeshConfig.spec ─► operator (DaemonSet, rollout engine)
//!                                          │
//!  MeshConfig.status ◄── aggregated NodeEnrollment.status ◄── agents
//! ```
#![allow(
    clippy::duplicated_attributes,
    reason = "every printer column repeats `type_ = ...` inside its own printcolumn(...)"
)]

use k8s_openapi::{
    api::core::v1::ResourceRequirements,
    apimachinery::pkg::{
        apis::meta::v1::{Condition, LabelSelector},
        util::intstr::IntOrString,
    },
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only name a `MeshConfig` may have.
pub const MESHCONFIG_NAME: &str = "default";

/// Desired state of the Meshlet data plane across the cluster.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "meshlet.io",
    version = "v1alpha1",
    kind = "MeshConfig",
    plural = "meshconfigs",
    singular = "meshconfig",
    shortname = "mc",
    category = "meshlet",
    status = "MeshConfigStatus",
    derive = "PartialEq",
    doc = "Cluster-wide configuration of the Meshlet data plane. A singleton: it must be named `default`.",
    printcolumn(
        name = "Version",
        type_ = "string",
        description = "Agent version the cluster is rolling out",
        json_path = ".spec.agent.version"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        description = "Selected nodes whose data plane is ready",
        json_path = ".status.readyNodes"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        description = "Selected nodes running the target version",
        json_path = ".status.updatedNodes"
    ),
    printcolumn(
        name = "Selected",
        type_ = "integer",
        description = "Nodes chosen by spec.enrollment.nodeSelector",
        json_path = ".status.selectedNodes"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "Rollout phase",
        json_path = ".status.rollout.phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// The node agent: image, version, log level, resources and bpffs location.
    pub agent: AgentSpec,
    /// Data-plane sizing and optional features.
    #[serde(default)]
    pub dataplane: DataplaneSpec,
    /// Which nodes join the mesh.
    #[serde(default)]
    pub enrollment: EnrollmentSpec,
    /// How a new agent version rolls out across the nodes.
    #[serde(default)]
    pub upgrade: UpgradeSpec,
    /// Where the agents send traces and expose metrics.
    #[serde(default)]
    pub telemetry: TelemetrySpec,
}

/// The node agent the operator runs on every enrolled node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Container image of the agent without tag, e.g. `ghcr.io/meshlet-io/meshlet-agent`.
    /// The tag is `version`.
    #[schemars(length(min = 1, max = 512), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[^\\\\s:@]+(:[0-9]+)?(/[^\\\\s:@]+)*$')",
        "message": "must be a non-empty image reference without tag or whitespace, e.g. ghcr.io/meshlet-io/meshlet-agent"
    }]))]
    pub image: String,
    /// Agent version to run (the image tag), e.g. `0.4.2`. Changing it starts a rollout.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    )]
    pub version: String,
    /// Verbosity of the agent's logs.
    #[serde(default)]
    pub log_level: LogLevel,
    /// CPU and memory requests and limits of the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Directory in bpffs where the agent pins its maps and links.
    #[serde(default = "default_bpffs_path")]
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-validations" = [{
        "rule": "self.startsWith('/sys/fs/bpf/') && !self.contains('..')",
        "message": "must be an absolute path below /sys/fs/bpf/ without '..', e.g. /sys/fs/bpf/meshlet"
    }]))]
    pub bpffs_path: String,
}

fn default_bpffs_path() -> String {
    "/sys/fs/bpf/meshlet".to_owned()
}

/// Verbosity of the agent's logs.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Normal operation (default).
    #[default]
    Info,
    /// Detailed diagnostics.
    Debug,
    /// Everything, including per-entry map updates.
    Trace,
}

/// Data-plane sizing and optional features.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSpec {
    /// Capacity of the service map (frontends), between 1 and 1000000.
    #[serde(default = "default_max_services")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_services: i32,
    /// Capacity of the endpoint and backend maps, between 1 and 1000000.
    #[serde(default = "default_max_endpoints")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_endpoints: i32,
    /// Optional data-plane programs to attach.
    #[serde(default)]
    pub features: DataplaneFeatures,
}

fn default_max_services() -> i32 {
    5000
}

fn default_max_endpoints() -> i32 {
    100_000
}

impl Default for DataplaneSpec {
    fn default() -> Self {
        Self {
            max_services: default_max_services(),
            max_endpoints: default_max_endpoints(),
            features: DataplaneFeatures::default(),
        }
    }
}

/// Optional data-plane programs. Socket-level TCP load balancing (`connect4/6`) is always on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneFeatures {
    /// Balance UDP traffic to services too (`sendmsg4/6` programs).
    #[serde(default = "default_true")]
    pub udp: bool,
    /// Let applications see the service address as their peer (`getpeername4/6` programs).
    #[serde(default = "default_true")]
    pub peer_name_rewrite: bool,
    /// Per-CPU connection and miss counters, exported as metrics.
    #[serde(default = "default_true")]
    pub counters: bool,
}

impl Default for DataplaneFeatures {
    fn default() -> Self {
        Self {
            udp: true,
            peer_name_rewrite: true,
            counters: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Which nodes join the mesh.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSpec {
    /// Label selector over Nodes. Every selected node gets a NodeEnrollment and an agent.
    /// Absent or empty selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// How a new agent version rolls out.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.progressDeadlineSeconds > self.minReadySeconds",
    "message": "progressDeadlineSeconds must be greater than minReadySeconds",
    "fieldPath": ".progressDeadlineSeconds",
    "reason": "FieldValueInvalid"
}]))]
pub struct UpgradeSpec {
    /// Most nodes upgrading at once after the canaries: an integer >= 1 or a percentage of the
    /// selected nodes from "1%" to "100%" (rounded up, at least one node).
    #[serde(default = "default_max_unavailable")]
    #[schemars(extend(
        "nullable" = false,
        "pattern" = "^(100|[1-9][0-9]?)%$",
        "x-kubernetes-validations" = [{
            "rule": "string(self).matches('^([1-9][0-9]*|(100|[1-9][0-9]?)%)$')",
            "message": "must be an integer >= 1 or a percentage \"1%\"..\"100%\""
        }]
    ))]
    pub max_unavailable: IntOrString,
    /// Nodes upgraded first, one at a time, before any other node moves. 0 skips the canary step.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 1000))]
    pub canary_nodes: i32,
    /// Seconds a node must stay ready on the new version before it counts as updated.
    #[serde(default = "default_min_ready_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,
    /// Seconds a node may take to report ready on the new version before the rollout halts.
    /// Must be greater than `minReadySeconds`.
    #[serde(default = "default_progress_deadline_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub progress_deadline_seconds: i32,
    /// Hold the rollout: nodes already moving finish, no new node starts.
    #[serde(default)]
    pub paused: bool,
    /// When the rollout halts, move the nodes already upgraded back to the previous version.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

fn default_one() -> i32 {
    1
}

fn default_min_ready_seconds() -> i32 {
    10
}

fn default_progress_deadline_seconds() -> i32 {
    600
}

impl Default for UpgradeSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            canary_nodes: default_one(),
            min_ready_seconds: default_min_ready_seconds(),
            progress_deadline_seconds: default_progress_deadline_seconds(),
            paused: false,
            auto_rollback: true,
        }
    }
}

/// Where the agents send traces and expose metrics.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector.observability:4317`.
    /// Absent disables trace export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^https?://[^\\\\s/]+(/\\\\S*)?$')",
        "message": "must be an http:// or https:// URL, e.g. http://otel-collector.observability:4317"
    }]))]
    pub otlp_endpoint: Option<String>,
    /// Port of the agent's Prometheus metrics endpoint (host network), 1..65535.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub metrics_port: i32,
}

fn default_metrics_port() -> i32 {
    9090
}

impl Default for TelemetrySpec {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            metrics_port: default_metrics_port(),
        }
    }
}

/// Observed state of the mesh, aggregated by the operator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigStatus {
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`, `Upgrading`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes chosen by `spec.enrollment.nodeSelector`.
    #[serde(default)]
    pub selected_nodes: i32,
    /// Selected nodes with a NodeEnrollment.
    #[serde(default)]
    pub enrolled_nodes: i32,
    /// Enrolled nodes whose data plane reports `Ready`.
    #[serde(default)]
    pub ready_nodes: i32,
    /// Enrolled nodes running the target version and ready for `minReadySeconds`.
    #[serde(default)]
    pub updated_nodes: i32,
    /// Enrolled nodes reporting `Stalled` or a data-plane gap.
    #[serde(default)]
    pub failed_nodes: i32,
    /// Progress of the current rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Progress of a rollout.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Version every updated node ran before this rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Version being rolled out (`spec.agent.version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Where the rollout stands.
    #[serde(default)]
    pub phase: RolloutPhase,
    /// Why the rollout halted: the node and the failed check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted_reason: Option<String>,
    /// Nodes currently moving to the target version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub nodes_in_flight: Vec<String>,
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum RolloutPhase {
    /// Every selected node runs the target version.
    #[default]
    Complete,
    /// Canary nodes are moving.
    Canary,
    /// Nodes beyond the canaries are moving.
    Rolling,
    /// `spec.upgrade.paused` holds new nodes back.
    Paused,
    /// A node failed its health gate; nothing moves forward.
    Halted,
    /// Halted, and the nodes already moved are going back.
    RollingBack,
}

impl MeshConfig {
    /// A valid `MeshConfig` named `default` running `image:version`, everything else defaulted.
    pub fn test() -> Self {
        Self::new(
            MESHCONFIG_NAME,
            MeshConfigSpec {
                agent: AgentSpec {
                    image: "ghcr.io/meshlet-io/meshlet-agent".to_owned(),
                    version: "0.1.0".to_owned(),
                    log_level: LogLevel::Info,
                    resources: None,
                    bpffs_path: default_bpffs_path(),
                },
                dataplane: DataplaneSpec::default(),
                enrollment: EnrollmentSpec::default(),
                upgrade: UpgradeSpec::default(),
                telemetry: TelemetrySpec::default(),
            },
        )
    }

    /// Sets `spec.agent.version`.
    pub fn with_version(mut self, version: &str) -> Self {
        version.clone_into(&mut self.spec.agent.version);
        self
    }

    /// Sets `spec.upgrade.maxUnavailable` to a node count.
    pub fn with_max_unavailable(mut self, nodes: i32) -> Self {
        self.spec.upgrade.max_unavailable = IntOrString::Int(nodes);
        self
    }

    /// Sets `spec.upgrade.canaryNodes`.
    pub fn with_canary_nodes(mut self, nodes: i32) -> Self {
        self.spec.upgrade.canary_nodes = nodes;
        self
    }

    /// Sets `spec.enrollment.nodeSelector` to match one label.
    pub fn with_node_label(mut self, key: &str, value: &str) -> Self {
        self.spec.enrollment.node_selector = Some(LabelSelector {
            match_labels: Some([(key.to_owned(), value.to_owned())].into()),
            match_expressions: None,
        });
        self
    }
}
