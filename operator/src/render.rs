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

/// Where the agent containers see the node's `/sys/fs/cgroup` (a hostPath volume). The agent
/// finds it in its mount table as the widest cgroup2 mount, so the pod spec names no cgroup.
pub const HOST_CGROUP_MOUNT: &str = "/host/sys/fs/cgroup";

/// Capabilities of the `agent` container, added after `drop: [ALL]`; found by running the
/// agent under runc with nothing else (fresh load, warm restart, layout migration, reset,
/// traffic through the VIP from a cgroup below the attach point):
/// - `BPF`: create maps, load programs, pin and open pinned objects (`bpf(2)`);
/// - `NET_ADMIN`: the kernel loads `cgroup/connect*`, `sendmsg*`, `recvmsg*` and
///   `getpeername*` programs only for `CAP_NET_ADMIN`, and IPsec writes xfrm state through
///   netlink.
///
/// Not needed: `SYS_ADMIN` (attaching to a cgroup fd of a read-only host bind works with the
/// two above), `PERFMON` (the programs pass the verifier without it), `SYS_RESOURCE` (since
/// Linux 5.11 BPF memory is charged to the cgroup, not to `RLIMIT_MEMLOCK`).
pub const AGENT_CAPABILITIES: [&str; 2] = ["BPF", "NET_ADMIN"];

/// Capabilities of the `preflight` init container: it only opens pinned maps and reads them.
/// Linux 6.5 and newer need none for that, but older kernels refuse every `bpf(2)` command
/// without `CAP_BPF` when unprivileged BPF is disabled (the distributions' default).
pub const PREFLIGHT_CAPABILITIES: [&str; 1] = ["BPF"];

/// Security context of a container that runs without privilege: `capabilities` added after
/// dropping all, no privilege escalation, a read-only root filesystem (the agent logs to
/// stderr and writes only to its hostPath volumes).
fn unprivileged(capabilities: &[&str]) -> Value {
    json!({
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"], "add": capabilities }
    })
}

/// The agent DaemonSet (contract C1) running `version` of `spec.agent.image`, in `namespace`,
/// owned by the MeshConfig so that deleting the MeshConfig removes it.
///
/// ```text
///  init mount-bpffs (privileged): mount bpffs at /sys/fs/bpf ──Bidirectional──► node's /sys/fs/bpf
///  init preflight  (CAP_BPF):     can this version adopt the pinned state? ◄─HostToContainer─┘
///  agent      (BPF, NET_ADMIN):   pins under spec.agent.bpffsPath, attaches at the node's
///                                 cgroup2 root (hostPath /sys/fs/cgroup at /host/sys/fs/cgroup),
///                                 admin socket + node lock in /run/meshlet (hostPath)
/// ```
pub fn agent_daemonset(mc: &MeshConfig, version: &str, namespace: &str) -> Value {
    let spec = &mc.spec;
    let port = spec.telemetry.metrics_port;
    // The kubelet expands `$(HOST_IP)` from the variable defined before it: with host
    // networking every agent of a node shares the node's addresses, and several simulated or
    // real nodes may share one network namespace, so each binds its own node address.
    let env = json!([
        { "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
        { "name": "HOST_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.hostIP" } } },
        { "name": "MESHLET_AGENT_VERSION", "value": version },
        { "name": "MESHLET_BPFFS_ROOT", "value": spec.agent.bpffs_path },
        { "name": "MESHLET_MAX_SERVICES", "value": spec.dataplane.max_services.to_string() },
        { "name": "MESHLET_MAX_ENDPOINTS", "value": spec.dataplane.max_endpoints.to_string() },
        { "name": "MESHLET_LOG_LEVEL", "value": log_level(spec.agent.log_level) },
        { "name": "MESHLET_METRICS_ADDR", "value": format!("$(HOST_IP):{port}") },
    ]);
    let image = format!("{}:{}", spec.agent.image, version);
    let mut labels = agent_selector_labels();
    labels[VERSION_LABEL] = json!(version);
    let mounts = json!([
        { "name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer" },
        { "name": "host-cgroup", "mountPath": HOST_CGROUP_MOUNT, "readOnly": true },
        { "name": "run", "mountPath": "/run/meshlet" }
    ]);
    let mut agent_security = unprivileged(&AGENT_CAPABILITIES);
    // The runtimes' default AppArmor profile denies writes and links under /sys/fs/* except
    // cgroup, which covers creating pins in bpffs; the container keeps its capability limits.
    agent_security["appArmorProfile"] = json!({ "type": "Unconfined" });
    let mut agent = json!({
        "name": "agent",
        "image": image,
        "args": ["run", "--kubernetes"],
        "env": env,
        "ports": [{ "name": "metrics", "containerPort": port, "protocol": "TCP" }],
        // No `host`: the kubelet probes the pod IP, which is the node's IP with host networking.
        "readinessProbe": {
            "httpGet": { "path": "/readyz", "port": port },
            "periodSeconds": 2,
            "failureThreshold": 3
        },
        "livenessProbe": {
            "httpGet": { "path": "/healthz", "port": port },
            "initialDelaySeconds": 15,
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3
        },
        "securityContext": agent_security,
        "volumeMounts": mounts
    });
    if let Some(resources) = &spec.agent.resources {
        agent["resources"] = json!(resources);
    }
    // As Cilium's `mount-bpf-fs`: a bpffs mounted here propagates to the node and outlives
    // the pod. Kubernetes allows `Bidirectional` only in a privileged container, and mount(2)
    // needs CAP_SYS_ADMIN; this container runs nothing else.
    let mount_bpffs = json!({
        "name": "mount-bpffs",
        "image": image,
        "args": ["mount-bpffs"],
        "securityContext": { "privileged": true, "readOnlyRootFilesystem": true },
        "volumeMounts": [
            { "name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional" }
        ]
    });
    let preflight = json!({
        "name": "preflight",
        "image": image,
        "args": ["preflight"],
        "env": agent["env"].clone(),
        "securityContext": unprivileged(&PREFLIGHT_CAPABILITIES),
        "volumeMounts": agent["volumeMounts"].clone()
    });
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
                    "initContainers": [mount_bpffs, preflight],
                    "containers": [agent],
                    "volumes": [
                        { "name": "bpffs", "hostPath": { "path": "/sys/fs/bpf", "type": "DirectoryOrCreate" } },
                        { "name": "host-cgroup", "hostPath": { "path": "/sys/fs/cgroup", "type": "Directory" } },
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
        // Each hostNetwork agent binds its own node's address, expanded by the kubelet.
        assert_eq!(
            value("MESHLET_METRICS_ADDR"),
            Some(json!("$(HOST_IP):9090"))
        );
        let position = |name: &str| {
            env.iter()
                .position(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("no {name} in the env"))
        };
        // `$(HOST_IP)` expands only from a variable defined earlier in the list.
        assert!(position("HOST_IP") < position("MESHLET_METRICS_ADDR"));
        let field = |name: &str| env[position(name)]["valueFrom"]["fieldRef"]["fieldPath"].clone();
        assert_eq!(field("HOST_IP"), "status.hostIP");
        assert_eq!(field("NODE_NAME"), "spec.nodeName");
        let inits = pod["spec"]["initContainers"]
            .as_array()
            .expect("init containers");
        let names: Vec<_> = inits.iter().map(|c| c["name"].clone()).collect();
        assert_eq!(names, [json!("mount-bpffs"), json!("preflight")]);
        let init = &inits[1];
        assert_eq!(init["args"], json!(["preflight"]));
        assert_eq!(init["env"], agent["env"]);
        assert_eq!(init["volumeMounts"], agent["volumeMounts"]);
        assert_eq!(inits[0]["args"], json!(["mount-bpffs"]));
        assert_eq!(inits[0]["image"], agent["image"]);
    }

    fn containers(ds: &Value) -> Vec<Value> {
        let spec = &ds["spec"]["template"]["spec"];
        let mut all = spec["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        all.extend(spec["containers"].as_array().cloned().unwrap_or_default());
        all
    }

    fn container(ds: &Value, name: &str) -> Value {
        containers(ds)
            .into_iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    fn mount<'a>(c: &'a Value, volume: &str) -> &'a Value {
        c["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == volume))
            .unwrap_or_else(|| panic!("{} does not mount {volume}", c["name"]))
    }

    #[test]
    fn only_the_bpffs_mount_init_container_is_privileged() {
        let ds = agent_daemonset(&MeshConfig::test(), "9.9.9", "meshlet-system");
        assert_eq!(
            container(&ds, "mount-bpffs")["securityContext"]["privileged"],
            true
        );
        for name in ["preflight", "agent"] {
            let sc = &container(&ds, name)["securityContext"];
            assert_ne!(sc["privileged"], true, "{name} is privileged");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        }
        assert_eq!(
            container(&ds, "agent")["securityContext"]["capabilities"]["add"],
            json!(["BPF", "NET_ADMIN"])
        );
        assert_eq!(
            container(&ds, "preflight")["securityContext"]["capabilities"]["add"],
            json!(["BPF"])
        );
        for c in containers(&ds) {
            assert_eq!(
                c["securityContext"]["readOnlyRootFilesystem"], true,
                "{} may write its root filesystem",
                c["name"]
            );
        }
    }

    #[test]
    fn bpffs_propagates_from_the_privileged_init_container_only() {
        let ds = agent_daemonset(&MeshConfig::test(), "9.9.9", "meshlet-system");
        for c in containers(&ds) {
            let bpffs = mount(&c, "bpffs");
            assert_eq!(bpffs["mountPath"], "/sys/fs/bpf");
            let want = if c["name"] == "mount-bpffs" {
                "Bidirectional"
            } else {
                "HostToContainer"
            };
            assert_eq!(bpffs["mountPropagation"], want, "{}", c["name"]);
            let bidirectional = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["mountPropagation"] == "Bidirectional")
                .count();
            assert!(
                bidirectional == 0 || c["securityContext"]["privileged"] == true,
                "{} has a Bidirectional mount without being privileged",
                c["name"]
            );
        }
        let volumes = &ds["spec"]["template"]["spec"]["volumes"];
        let bpffs = volumes
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "bpffs"))
            .expect("bpffs volume");
        assert_eq!(
            bpffs["hostPath"],
            json!({ "path": "/sys/fs/bpf", "type": "DirectoryOrCreate" })
        );
    }

    #[test]
    fn the_agent_sees_the_node_cgroup_root_and_its_run_directory_without_flags() {
        let ds = agent_daemonset(&MeshConfig::test(), "9.9.9", "meshlet-system");
        let volume = |name: &str| {
            ds["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == name))
                .map(|v| v["hostPath"].clone())
                .unwrap_or_else(|| panic!("no volume {name}"))
        };
        assert_eq!(
            volume("host-cgroup"),
            json!({ "path": "/sys/fs/cgroup", "type": "Directory" })
        );
        assert_eq!(
            volume("run"),
            json!({ "path": "/run/meshlet", "type": "DirectoryOrCreate" })
        );
        for name in ["preflight", "agent"] {
            let c = container(&ds, name);
            assert_eq!(mount(&c, "host-cgroup")["mountPath"], "/host/sys/fs/cgroup");
            assert_eq!(mount(&c, "run")["mountPath"], "/run/meshlet");
        }
        let text = ds.to_string();
        assert!(!text.contains("--cgroup"), "{text}");
        assert!(!text.contains("MESHLET_CGROUP"), "{text}");
        assert!(!text.contains("/sys/fs/cgroup/unified"), "{text}");
        assert!(!text.contains("unified"), "{text}");
    }

    #[test]
    fn the_agent_is_probed_for_readiness_and_liveness_on_its_metrics_port() {
        let ds = agent_daemonset(&MeshConfig::test(), "9.9.9", "meshlet-system");
        let agent = container(&ds, "agent");
        assert_eq!(
            agent["readinessProbe"]["httpGet"],
            json!({ "path": "/readyz", "port": 9090 })
        );
        assert_eq!(
            agent["livenessProbe"]["httpGet"],
            json!({ "path": "/healthz", "port": 9090 })
        );
        assert!(agent["livenessProbe"]["initialDelaySeconds"].as_i64() >= Some(10));
        assert!(agent["livenessProbe"]["failureThreshold"].as_i64() >= Some(3));
    }

    #[test]
    fn the_daemonset_uses_only_fields_of_the_kubernetes_api() {
        let mut mc = MeshConfig::test();
        mc.metadata.uid = Some("u-1".into());
        let ds = agent_daemonset(&mc, "9.9.9", "meshlet-system");
        // A misspelled or unknown field is dropped by the typed round trip.
        let typed: k8s_openapi::api::apps::v1::DaemonSet =
            serde_json::from_value(ds.clone()).expect("a DaemonSet");
        assert_eq!(serde_json::to_value(&typed).expect("serialize"), ds);
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
