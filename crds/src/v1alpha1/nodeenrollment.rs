//! `NodeEnrollment`: one per mesh node, named after the node. The operator writes the spec
//! (which version the node should run, whether to drain); only that node's agent writes the
//! status (what is loaded in its kernel and whether the data plane stayed up).
#![allow(
    clippy::duplicated_attributes,
    reason = "every printer column repeats `type_ = ...` inside its own printcolumn(...)"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of the data plane on one node.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "meshlet.io",
    version = "v1alpha1",
    kind = "NodeEnrollment",
    plural = "nodeenrollments",
    singular = "nodeenrollment",
    shortname = "ne",
    category = "meshlet",
    status = "NodeEnrollmentStatus",
    derive = "PartialEq",
    doc = "Enrollment of one node in the mesh. Named after the node; its status is written by that node's agent.",
    printcolumn(
        name = "Node",
        type_ = "string",
        description = "Enrolled node",
        json_path = ".spec.nodeName"
    ),
    printcolumn(
        name = "Desired",
        type_ = "string",
        description = "Version the node should run",
        json_path = ".spec.desiredVersion"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        description = "Version the agent reports",
        json_path = ".status.agentVersion"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Data plane ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Restart",
        type_ = "string",
        description = "Kind of the agent's last restart",
        json_path = ".status.continuity.lastRestartKind",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeEnrollmentSpec {
    /// Name of the enrolled Node. Must equal `metadata.name` and cannot change.
    #[schemars(length(min = 1, max = 253), extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "nodeName is immutable; delete and recreate the NodeEnrollment to enroll another node"
    }]))]
    pub node_name: String,
    /// Agent version this node should run; set by the rollout engine. Absent: the version of
    /// `MeshConfig.spec.agent.version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub desired_version: Option<String>,
    /// Detach the data plane from this node but keep the enrollment (and its pinned maps).
    #[serde(default)]
    pub drain: bool,
}

/// Observed state of the data plane on one node, written by its agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEnrollmentStatus {
    /// kstatus conditions: `Enrolled`, `DataplaneReady`, `Upgrading`, `Ready`, `Reconciling`,
    /// `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Version of the running agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Kernel release of the node (`uname -r`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// Whether the kernel exposes BTF (`/sys/kernel/btf/vmlinux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btf: Option<bool>,
    /// eBPF programs attached by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramStatus>,
    /// Pinned eBPF maps and their layouts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<MapStatus>,
    /// Proof that the data plane stayed attached across agent restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuity: Option<Continuity>,
    /// IPsec state installed on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<IPsecNodeStatus>,
}

/// One attached eBPF program.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    /// Program name, e.g. `connect4`.
    pub name: String,
    /// Kernel program id (changes when the program is replaced).
    pub id: i64,
    /// Where it is attached, e.g. `cgroup/connect4:/sys/fs/cgroup`.
    pub attach_point: String,
    /// Kernel id of the pinned link (stays the same across agent restarts and upgrades).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<i64>,
}

/// One pinned eBPF map.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MapStatus {
    /// Map name, e.g. `services`.
    pub name: String,
    /// Number of the layout (schema) of its keys and values.
    pub layout_version: i64,
    /// Entries currently stored.
    pub entries: i64,
    /// Maximum number of entries.
    pub capacity: i64,
}

/// Record of the data plane's continuity across agent restarts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Continuity {
    /// True while every link id is the one recorded at first attach.
    pub link_ids_stable: bool,
    /// When the data plane was first attached on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attach_time: Option<Time>,
    /// How the agent last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_kind: Option<RestartKind>,
    /// Milliseconds from agent start to data plane adopted and index synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_duration_ms: Option<i64>,
    /// Moments without an attached program since first attach; anything but 0 is a failure.
    #[serde(default)]
    pub dataplane_gaps: i64,
}

/// How the agent started.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum RestartKind {
    /// Nothing was pinned: loaded and attached from scratch.
    Fresh,
    /// Same map layouts: maps reused, programs replaced on the pinned links.
    Warm,
    /// Map layouts changed: entries copied into new maps, then programs swapped.
    Migrated,
    /// Pinned state could not be adopted and was rebuilt.
    Cold,
}

/// IPsec state installed on one node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPsecNodeStatus {
    /// SPIs with inbound SAs installed (the acknowledgement of the Installing phase).
    #[serde(
        default,
        rename = "installedSPIs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub installed_spis: Vec<i64>,
    /// SPI used for outbound traffic (the acknowledgement of the Switching phase).
    #[serde(default, rename = "activeSPI", skip_serializing_if = "Option::is_none")]
    pub active_spi: Option<i64>,
    /// The `IPsecPolicy` whose keys these are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Peer nodes with SAs installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<i64>,
}

impl NodeEnrollment {
    /// A valid enrollment of node `node` (name and `spec.nodeName` equal).
    pub fn test(node: &str) -> Self {
        Self::new(
            node,
            NodeEnrollmentSpec {
                node_name: node.to_owned(),
                desired_version: None,
                drain: false,
            },
        )
    }

    /// Sets `spec.desiredVersion`.
    pub fn with_desired_version(mut self, version: &str) -> Self {
        self.spec.desired_version = Some(version.to_owned());
        self
    }
}
