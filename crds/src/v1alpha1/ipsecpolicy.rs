//! `IPsecPolicy`: transport-mode ESP between the addresses of selected nodes, with key rotation
//! driven by acknowledgements (Installing → Switching → Retiring → Stable).
#![allow(
    clippy::duplicated_attributes,
    reason = "every printer column repeats `type_ = ...` inside its own printcolumn(...)"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired IPsec encryption between mesh nodes.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "meshlet.io",
    version = "v1alpha1",
    kind = "IPsecPolicy",
    plural = "ipsecpolicies",
    singular = "ipsecpolicy",
    shortname = "ipsp",
    category = "meshlet",
    status = "IPsecPolicyStatus",
    derive = "PartialEq",
    doc = "Encrypts node-to-node traffic of the selected nodes with ESP and rotates its keys.",
    printcolumn(
        name = "Algorithm",
        type_ = "string",
        description = "ESP algorithm",
        json_path = ".spec.algorithm"
    ),
    printcolumn(
        name = "SPI",
        type_ = "integer",
        description = "Active SPI",
        json_path = ".status.activeSPI"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "Key rotation phase",
        json_path = ".status.phase"
    ),
    printcolumn(
        name = "Last Rotation",
        type_ = "date",
        json_path = ".status.lastRotationTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPsecPolicySpec {
    /// Label selector over Nodes whose traffic between each other is encrypted. Absent or empty
    /// selects every enrolled node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// ESP algorithm.
    #[serde(default)]
    pub algorithm: IPsecAlgorithm,
    /// Secret in `meshlet-system` holding the pre-shared key under `key` (at least 16 bytes).
    /// Absent: the operator generates a 256-bit key for every rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.__namespace__) || self.__namespace__ == 'meshlet-system'",
        "message": "namespace must be meshlet-system: the operator reads key Secrets only in its own namespace"
    }, {
        "rule": "self.name != 'meshlet-ipsec-key'",
        "message": "must not be meshlet-ipsec-key: the operator publishes the derived keys there; put the pre-shared key in a Secret of its own"
    }]))]
    pub key_secret_ref: Option<SecretReference>,
    /// How often keys rotate, as a duration such as `24h`, `90m` or `1h30m`; at least `1h`.
    #[serde(default = "default_rotation_interval")]
    #[schemars(length(min = 2, max = 32), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') && duration(self) >= duration('1h')",
        "message": "must be a duration of at least 1h, e.g. 24h or 1h30m"
    }]))]
    pub rotation_interval: String,
    /// IPsec mode. Only `Transport` (between node addresses) is supported.
    #[serde(default)]
    pub mode: IPsecMode,
}

fn default_rotation_interval() -> String {
    "24h".to_owned()
}

/// ESP algorithm.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum IPsecAlgorithm {
    /// AES-GCM with a 128-bit ICV (AEAD).
    #[default]
    #[serde(rename = "rfc4106(gcm(aes))")]
    Rfc4106GcmAes,
    /// AES-CBC encryption with HMAC-SHA256 authentication.
    #[serde(rename = "cbc(aes)+hmac(sha256)")]
    CbcAesHmacSha256,
}

/// IPsec mode.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum IPsecMode {
    /// ESP transport mode between node addresses.
    #[default]
    Transport,
}

/// Reference to a Secret by name and namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret (a DNS-1123 subdomain).
    #[schemars(length(min = 1, max = 253), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
        "message": "must be a lowercase DNS-1123 subdomain: a-z, 0-9, '-' and '.', starting and ending with an alphanumeric character"
    }]))]
    pub name: String,
    /// Namespace of the Secret (a DNS-1123 label). Absent: the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": "must be a lowercase DNS-1123 label: a-z, 0-9 and '-', starting and ending with an alphanumeric character"
    }]))]
    pub namespace: Option<String>,
}

/// Observed state of key rotation.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPsecPolicyStatus {
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`, `Rotating`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// SPI of the key every node sends with.
    #[serde(default, rename = "activeSPI", skip_serializing_if = "Option::is_none")]
    pub active_spi: Option<i64>,
    /// The other SPI of a rotation in progress: the one being installed (`Installing`), or the
    /// one being left and retired (`Switching`, `Retiring`). Absent when `Stable`.
    #[serde(
        default,
        rename = "pendingSPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub pending_spi: Option<i64>,
    /// Rotation phase.
    #[serde(default)]
    pub phase: RotationPhase,
    /// The last value of the `meshlet.io/rotate` annotation a rotation was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_rotate_request: Option<String>,
    /// Acknowledgements collected for the current phase.
    #[serde(default)]
    pub acks: IPsecAcks,
    /// When the last rotation finished retiring the old key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
}

/// Rotation phase.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum RotationPhase {
    /// One key in use; nothing pending.
    #[default]
    Stable,
    /// Nodes install inbound SAs for the new SPI.
    Installing,
    /// Nodes move outbound traffic to the new SPI.
    Switching,
    /// Nodes delete the SAs of the old SPI.
    Retiring,
}

/// Acknowledgement counts per phase.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPsecAcks {
    /// Selected nodes taking part in the rotation.
    #[serde(default)]
    pub selected: i64,
    /// Nodes that installed inbound SAs for the new SPI.
    #[serde(default)]
    pub installed: i64,
    /// Nodes that send with the new SPI.
    #[serde(default)]
    pub switched: i64,
    /// Nodes that deleted the old SPI's SAs.
    #[serde(default)]
    pub retired: i64,
}

impl IPsecPolicy {
    /// A valid policy named `name` with every default.
    pub fn test(name: &str) -> Self {
        Self::new(
            name,
            IPsecPolicySpec {
                node_selector: None,
                algorithm: IPsecAlgorithm::default(),
                key_secret_ref: None,
                rotation_interval: default_rotation_interval(),
                mode: IPsecMode::Transport,
            },
        )
    }

    /// Sets `spec.keySecretRef`.
    pub fn with_key_secret(mut self, namespace: &str, name: &str) -> Self {
        self.spec.key_secret_ref = Some(SecretReference {
            name: name.to_owned(),
            namespace: Some(namespace.to_owned()),
        });
        self
    }
}
