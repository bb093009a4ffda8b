//! `meshlet.io/v1alpha1`: one module per kind.
//!
//! Each kind is a `#[derive(CustomResource)]` spec struct whose doc comments become the schema
//! descriptions `kubectl explain` prints. Defaults and OpenAPI bounds come from `schemars`
//! attributes; the CEL rules (`x-kubernetes-validations`) are attached with `schemars(extend)`
//! next to the field they guard, so the message names that field.

pub mod ipsecpolicy;
pub mod meshconfig;
pub mod nodeenrollment;

pub use ipsecpolicy::{
    IPsecAcks, IPsecAlgorithm, IPsecMode, IPsecPolicy, IPsecPolicySpec, IPsecPolicyStatus,
    RotationPhase, SecretReference,
};
pub use meshconfig::{
    AgentSpec, DataplaneFeatures, DataplaneSpec, EnrollmentSpec, LogLevel, MeshConfig,
    MeshConfigSpec, MeshConfigStatus, RolloutPhase, RolloutStatus, TelemetrySpec, UpgradeSpec,
};
pub use nodeenrollment::{
    Continuity, IPsecNodeStatus, MapStatus, NodeEnrollment, NodeEnrollmentSpec,
    NodeEnrollmentStatus, ProgramStatus, RestartKind,
};
