//! Names every Meshlet component agrees on: where the operator and the agents live, what
//! their objects are called, and the labels, annotations and finalizer they share.
//!
//! ```text
//!  operator (renders, selects) ─┐
//!  node agent (reads, releases) ├─► names::* ◄─ generator (manifests/, olm/)
//!  local cluster (runs pods)   ─┘
//! ```

/// Namespace the operator, the agents and the IPsec key Secret live in.
pub const NAMESPACE: &str = "meshlet-system";
/// ServiceAccount (and Deployment) name of the operator.
pub const OPERATOR_NAME: &str = "meshlet-operator";
/// ServiceAccount, DaemonSet and container name of the node agent.
pub const AGENT_NAME: &str = "meshlet-agent";
/// Name of the Secret holding the IPsec pre-shared key the operator generates.
pub const IPSEC_KEY_SECRET: &str = "meshlet-ipsec-key";
/// Label key naming the component of every object Meshlet creates.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label key naming the application of every object Meshlet creates (`meshlet-agent`, …).
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Finalizer on a NodeEnrollment: the node's agent detaches, unpins and removes its xfrm
/// state, then removes this finalizer.
pub const DATAPLANE_FINALIZER: &str = "meshlet.io/dataplane";
/// Field manager of the operator for every server-side apply it sends.
pub const OPERATOR_FIELD_MANAGER: &str = "meshlet-operator";
/// Field manager of the node agent (the only writer of `NodeEnrollment.status`).
pub const AGENT_FIELD_MANAGER: &str = "meshlet-agent";
/// Annotation on an `IPsecPolicy` asking for a key rotation now: any new value (by convention
/// an RFC 3339 time, as `meshletctl ipsec rotate` writes) starts one rotation.
pub const ROTATE_ANNOTATION: &str = "meshlet.io/rotate";
