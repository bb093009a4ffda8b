//! Rendering: the objects the operator server-side-applies, as pure functions of the
//! `MeshConfig` (and, for enrollments, of the node and the version it should run).
//!
//! ```text
//!  MeshConfig.spec ─┬─► agent_daemonset(version) ─► apps/v1 DaemonSet  (contract C1)
//!                   ├─► agent_service_account()   ─► v1 ServiceAccount
//!  node, version ───┴─► enrollment(..)            ─► meshlet.io/v1alpha1 NodeEnrollment
//! ```
//!
//! Every rendering carries *all* the fields the operator owns on that object: a server-side
//! apply that leaves a field out gives it up, so a partial rendering would delete labels or
//! finalizers set by an earlier apply.

use meshlet_crds::{
    MeshConfig,
    names::{AGENT_NAME, COMPONENT_LABEL, DATAPLANE_FINALIZER, NAME_LABEL},
    v1alpha1::meshconfig::LogLevel,
};
use serde_json::{Value, json};

/// Label on the agent pods naming the agent version they run (contract C1).
pub const VERSION_LABEL: &str = "meshlet.io/version";
/// Label on the NodeEnrollments the operator created (and may delete).
pub const MANAGED_BY_LABEL: &str = "meshlet.io/managed-by";
/// Annotation on a NodeEnrollment: when the operator last changed its `desiredVersion`
/// (RFC 3339). The rollout engine measures `progressDeadlineSeconds` from it.
pub const UPGRADE_STARTED_ANNOTATION: &str = "meshlet.io/upgrade-started";

/// The value `MESHLET_LOG_LEVEL` takes for a log level.
fn log_level(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

/// Labels that select the agent pods (stable across versions: a DaemonSet selector is
/// immutable).
pub fn agent_selector_labels() -> Value {
    json!({ NAME_LABEL: AGENT_NAME, COMPONENT_LABEL: "agent" })
}

/// The agent DaemonSet (contract C1) running `version` of `spec.agent.image`, in `namespace`,
/// owned by the MeshConfig so that deleting the MeshConfig removes it.
pub fn agent_daemonset(mc: &MeshConfig, version: &str, namespace: &str) -> Value {
    let spec = &mc.spec;
    let port = spec.telemetry.metrics_port;
    let env = json!([
        { "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
        { "name": "MESHLET_AGENT_VERSION", "value": version },
        { "name": "MESHLET_BPFFS_ROOT", "value": spec.agent.bpffs_path },
        { "name": "MESHLET_MAX_SERVICES", "value": spec.dataplane.max_services.to_string() },
        { "name": "MESHLET_MAX_ENDPOINTS", "value": spec.dataplane.max_endpoints.to_string() },
        { "name": "MESHLET_LOG_LEVEL", "value": log_level(spec.agent.log_level) },
        { "name": "MESHLET_METRICS_ADDR", "value": format!("0.0.0.0:{port}") },
    ]);
    let image = format!("{}:{}", spec.agent.image, version);
    let mut labels = agent_selector_labels();
    labels[VERSION_LABEL] = json!(version);
    let mut agent = json!({
        "name": "agent",
        "image": image,
        "args": ["run", "--kubernetes"],
        "env": env,
        "ports": [{ "name": "metrics", "containerPort": port, "protocol": "TCP" }],
        "readinessProbe": {
            "httpGet": { "path": "/readyz", "port": port },
            "periodSeconds": 2,
            "failureThreshold": 3
        },
        "securityContext": { "privileged": true },
        "volumeMounts": [
            { "name": "bpffs", "mountPath": "/sys/fs/bpf" },
            { "name": "run", "mountPath": "/run/meshlet" }
        ]
    });
    if let Some(resources) = &spec.agent.resources {
        agent["resources"] = json!(resources);
    }
    let owner = json!({
        "apiVersion": "meshlet.io/v1alpha1",
        "kind": "MeshConfig",
        "name": mc.metadata.name,
        "uid": mc.metadata.uid,
        "controller": true,
        "blockOwnerDeletion": true
    });
    let mut metadata = json!({
        "name": AGENT_NAME,
        "namespace": namespace,
        "labels": { NAME_LABEL: AGENT_NAME, COMPONENT_LABEL: "agent" }
    });
    if mc.metadata.uid.is_some() {
        metadata["ownerReferences"] = json!([owner]);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata,
        "spec": {
            "selector": { "matchLabels": agent_selector_labels() },
            "updateStrategy": { "type": "OnDelete" },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "serviceAccountName": AGENT_NAME,
                    "hostNetwork": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{ "operator": "Exists" }],
                    "initContainers": [{
                        "name": "preflight",
                        "image": format!("{}:{}", spec.agent.image, version),
                        "args": ["preflight"],
                        "env": agent["env"].clone(),
                        "securityContext": { "privileged": true },
                        "volumeMounts": agent["volumeMounts"].clone()
                    }],
                    "containers": [agent],
                    "volumes": [
                        { "name": "bpffs", "hostPath": { "path": "/sys/fs/bpf", "type": "DirectoryOrCreate" } },
                        { "name": "run", "hostPath": { "path": "/run/meshlet", "type": "DirectoryOrCreate" } }
                    ]
                }
            }
        }
    })
}

/// The agent's ServiceAccount in `namespace`. Its labels are the ones `manifests/` ships on
/// the same object (without the version), so a server-side re-apply of `manifests/` shares
/// them with the operator instead of conflicting.
pub fn agent_service_account(namespace: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": AGENT_NAME,
            "namespace": namespace,
            "labels": {
                NAME_LABEL: "meshlet",
                COMPONENT_LABEL: "agent",
                "app.kubernetes.io/part-of": "meshlet"
            }
        }
    })
}

/// What the operator asks of one node's enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentIntent {
    /// Node (and NodeEnrollment) name.
    pub node: String,
    /// The operator created it (label, finalizer); `false` for a user-created enrollment, of
    /// which the operator only owns `desiredVersion`.
    pub managed: bool,
    /// `desiredVersion` and when it was set (RFC 3339), if the operator set one.
    pub desired: Option<(String, String)>,
}

/// The NodeEnrollment fields the operator owns for `intent`.
pub fn enrollment(intent: &EnrollmentIntent) -> Value {
    let mut metadata = json!({ "name": intent.node });
    if intent.managed {
        metadata["labels"] = json!({ MANAGED_BY_LABEL: meshlet_crds::names::OPERATOR_NAME });
        metadata["finalizers"] = json!([DATAPLANE_FINALIZER]);
    }
    let mut spec = json!({ "nodeName": intent.node });
    if let Some((version, started)) = &intent.desired {
        metadata["annotations"] = json!({ UPGRADE_STARTED_ANNOTATION: started });
        spec["desiredVersion"] = json!(version);
    }
    json!({
        "apiVersion": "meshlet.io/v1alpha1",
        "kind": "NodeEnrollment",
        "metadata": metadata,
        "spec": spec
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemonset_follows_the_agent_contract() {
        let mc = MeshConfig::test();
        let ds = agent_daemonset(&mc, "9.9.9", "meshlet-system");
        assert_eq!(ds["spec"]["updateStrategy"]["type"], "OnDelete");
        let pod = &ds["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"][VERSION_LABEL], "9.9.9");
        assert_eq!(pod["spec"]["serviceAccountName"], AGENT_NAME);
        let agent = &pod["spec"]["containers"][0];
        assert_eq!(agent["image"], "ghcr.io/meshlet-io/meshlet-agent:9.9.9");
        assert_eq!(agent["args"], json!(["run", "--kubernetes"]));
        let env = agent["env"].as_array().expect("env");
        let value = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].clone())
        };
        assert_eq!(value("MESHLET_AGENT_VERSION"), Some(json!("9.9.9")));
        assert_eq!(value("MESHLET_MAX_SERVICES"), Some(json!("5000")));
        assert_eq!(value("MESHLET_METRICS_ADDR"), Some(json!("0.0.0.0:9090")));
        let init = &pod["spec"]["initContainers"][0];
        assert_eq!(init["name"], "preflight");
        assert_eq!(init["args"], json!(["preflight"]));
        assert_eq!(init["env"], agent["env"]);
    }

    #[test]
    fn a_user_enrollment_gets_no_label_or_finalizer_from_the_operator() {
        let e = enrollment(&EnrollmentIntent {
            node: "n1".into(),
            managed: false,
            desired: Some(("v2".into(), "2026-01-01T00:00:00Z".into())),
        });
        assert!(e["metadata"].get("labels").is_none());
        assert!(e["metadata"].get("finalizers").is_none());
        assert_eq!(e["spec"]["desiredVersion"], "v2");
    }
}
