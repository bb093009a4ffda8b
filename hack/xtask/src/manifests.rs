//! The kustomize base in `manifests/`: CRDs, namespace, ServiceAccounts, RBAC, and the
//! operator Deployment.
//!
//! ```text
//!  all_crds() ─► crds/<name>.yaml
//!  rbac table ─► rbac/{operator,agent}-*.yaml
//!  constants  ─► namespace.yaml, operator/deployment.yaml
//!                          └──► kustomization.yaml lists them all
//! ```
//!
//! The objects are built with the typed `k8s-openapi` structs, so the compiler catches
//! misspelled fields; the same builders feed the OLM bundle ([`crate::olm`]).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Namespace,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use crate::rbac::{self, AGENT_NAME, IPSEC_KEY_SECRET, NAMESPACE, OPERATOR_NAME};
use crate::yaml;

/// Port of the operator's HTTP server: `/healthz`, `/readyz` and Prometheus `/metrics`
/// (the operator's `--metrics-addr`, set through `MESHLET_METRICS_ADDR`).
pub const OPERATOR_HTTP_PORT: i32 = 8080;

/// Labels every Meshlet object carries.
pub fn common_labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "meshlet".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), "meshlet".to_owned()),
        (
            "app.kubernetes.io/version".to_owned(),
            crate::VERSION.to_owned(),
        ),
    ])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(common_labels(component)),
        ..ObjectMeta::default()
    }
}

fn sa_subject(name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: name.to_owned(),
        namespace: Some(NAMESPACE.to_owned()),
        api_group: None,
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: Some("rbac.authorization.k8s.io".to_owned()),
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

/// The operator's ClusterRole, from [`rbac::OPERATOR_CLUSTER_RULES`].
pub fn operator_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(OPERATOR_NAME, None, "operator"),
        rules: Some(rbac::rules(rbac::OPERATOR_CLUSTER_RULES)),
        aggregation_rule: None,
    }
}

/// The operator's Role in [`NAMESPACE`], from [`rbac::OPERATOR_NAMESPACE_RULES`].
pub fn operator_role() -> Role {
    Role {
        metadata: meta(OPERATOR_NAME, Some(NAMESPACE), "operator"),
        rules: Some(rbac::rules(rbac::OPERATOR_NAMESPACE_RULES)),
    }
}

/// The agent's ClusterRole, from [`rbac::AGENT_CLUSTER_RULES`].
pub fn agent_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(AGENT_NAME, None, "agent"),
        rules: Some(rbac::rules(rbac::AGENT_CLUSTER_RULES)),
        aggregation_rule: None,
    }
}

/// The agent's Role that reads only the IPsec key Secret.
pub fn agent_role() -> Role {
    Role {
        metadata: meta(AGENT_NAME, Some(NAMESPACE), "agent"),
        rules: Some(rbac::agent_key_secret_rules(IPSEC_KEY_SECRET)),
    }
}

fn cluster_role_binding(name: &str, component: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(name, None, component),
        role_ref: role_ref("ClusterRole", name),
        subjects: Some(vec![sa_subject(name)]),
    }
}

fn role_binding(name: &str, component: &str) -> RoleBinding {
    RoleBinding {
        metadata: meta(name, Some(NAMESPACE), component),
        role_ref: role_ref("Role", name),
        subjects: Some(vec![sa_subject(name)]),
    }
}

fn service_account(name: &str, component: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(name, Some(NAMESPACE), component),
        ..ServiceAccount::default()
    }
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "meshlet".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "operator".to_owned(),
        ),
    ])
}

fn probe(path: &str, initial_delay: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

/// The operator Deployment's spec (shared with the CSV install strategy).
pub fn operator_deployment_spec() -> DeploymentSpec {
    let container = Container {
        name: "operator".to_owned(),
        image: Some(crate::operator_image()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        env: Some(vec![
            env_field("POD_NAMESPACE", "metadata.namespace"),
            env_field("POD_NAME", "metadata.name"),
            EnvVar {
                name: "MESHLET_METRICS_ADDR".to_owned(),
                value: Some(format!("0.0.0.0:{OPERATOR_HTTP_PORT}")),
                value_from: None,
            },
            EnvVar {
                name: "MESHLET_AGENT_IMAGE".to_owned(),
                value: Some(crate::agent_image()),
                value_from: None,
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: OPERATOR_HTTP_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", 15)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".to_owned())),
                ("memory".to_owned(), Quantity("128Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("512Mi".to_owned()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };
    let mut pod_labels = common_labels("operator");
    pod_labels.extend(selector_labels());
    DeploymentSpec {
        replicas: Some(1),
        selector: LabelSelector {
            match_labels: Some(selector_labels()),
            match_expressions: None,
        },
        strategy: Some(DeploymentStrategy {
            type_: Some("Recreate".to_owned()),
            rolling_update: None,
        }),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(pod_labels),
                annotations: Some(BTreeMap::from([(
                    "kubectl.kubernetes.io/default-container".to_owned(),
                    "operator".to_owned(),
                )])),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                service_account_name: Some(OPERATOR_NAME.to_owned()),
                containers: vec![container],
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(65532),
                    run_as_group: Some(65532),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".to_owned(),
                        localhost_profile: None,
                    }),
                    ..PodSecurityContext::default()
                }),
                termination_grace_period_seconds: Some(30),
                ..PodSpec::default()
            }),
        },
        ..DeploymentSpec::default()
    }
}

/// The operator Deployment.
pub fn operator_deployment() -> Deployment {
    Deployment {
        metadata: meta(OPERATOR_NAME, Some(NAMESPACE), "operator"),
        spec: operator_deployment_spec(),
        status: None,
    }
}

/// File name of a CRD manifest: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Renders every file of the kustomize base, keyed by path relative to `manifests/`.
pub fn render(crds: &[CustomResourceDefinition]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for crd in crds {
        files.insert(format!("crds/{}", crd_file_name(crd)), yaml::render(crd)?);
    }
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.to_owned()),
            labels: Some({
                let mut l = common_labels("namespace");
                // The agent pods use host networking, hostPath volumes and a privileged init
                // container that mounts bpffs: only the `privileged` level admits them.
                l.insert(
                    "pod-security.kubernetes.io/enforce".to_owned(),
                    "privileged".to_owned(),
                );
                l
            }),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    files.insert("namespace.yaml".to_owned(), yaml::render(&namespace)?);
    files.insert(
        "rbac/operator-serviceaccount.yaml".to_owned(),
        yaml::render(&service_account(OPERATOR_NAME, "operator"))?,
    );
    files.insert(
        "rbac/operator-clusterrole.yaml".to_owned(),
        yaml::render(&operator_cluster_role())?,
    );
    files.insert(
        "rbac/operator-clusterrolebinding.yaml".to_owned(),
        yaml::render(&cluster_role_binding(OPERATOR_NAME, "operator"))?,
    );
    files.insert(
        "rbac/operator-role.yaml".to_owned(),
        yaml::render(&operator_role())?,
    );
    files.insert(
        "rbac/operator-rolebinding.yaml".to_owned(),
        yaml::render(&role_binding(OPERATOR_NAME, "operator"))?,
    );
    files.insert(
        "rbac/agent-serviceaccount.yaml".to_owned(),
        yaml::render(&service_account(AGENT_NAME, "agent"))?,
    );
    files.insert(
        "rbac/agent-clusterrole.yaml".to_owned(),
        yaml::render(&agent_cluster_role())?,
    );
    files.insert(
        "rbac/agent-clusterrolebinding.yaml".to_owned(),
        yaml::render(&cluster_role_binding(AGENT_NAME, "agent"))?,
    );
    files.insert(
        "rbac/agent-role.yaml".to_owned(),
        yaml::render(&agent_role())?,
    );
    files.insert(
        "rbac/agent-rolebinding.yaml".to_owned(),
        yaml::render(&role_binding(AGENT_NAME, "agent"))?,
    );
    files.insert(
        "operator/deployment.yaml".to_owned(),
        yaml::render(&operator_deployment())?,
    );
    // Namespace first so `kubectl apply -k` creates it before namespaced objects.
    let mut resources = vec!["namespace.yaml".to_owned()];
    resources.extend(
        files
            .keys()
            .filter(|k| k.as_str() != "namespace.yaml")
            .cloned(),
    );
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    });
    files.insert(
        "kustomization.yaml".to_owned(),
        yaml::render(&kustomization)?,
    );
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_pod_is_probed_locked_down_and_requests_resources() {
        let spec = operator_deployment_spec();
        let pod = spec.template.spec.expect("pod spec");
        let c = &pod.containers[0];
        let port_names: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.as_deref())
            .collect();
        for probe in [&c.liveness_probe, &c.readiness_probe] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("http probe");
            let IntOrString::String(port) = &get.port else {
                panic!("probe port should be named");
            };
            assert!(
                port_names.contains(&port.as_str()),
                "probe port {port} not declared"
            );
        }
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        let requests = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
        assert_eq!(pod.service_account_name.as_deref(), Some(OPERATOR_NAME));
        assert_eq!(c.image.as_deref(), Some(crate::operator_image().as_str()));
    }

    #[test]
    fn deployment_selector_matches_its_pod_labels() {
        let spec = operator_deployment_spec();
        let labels = spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .expect("labels");
        for (k, v) in spec.selector.match_labels.expect("match labels") {
            assert_eq!(
                labels.get(&k),
                Some(&v),
                "selector {k}={v} does not match the pod"
            );
        }
    }

    #[test]
    fn kustomization_lists_every_generated_manifest_with_the_namespace_first() {
        let files = render(&[]).expect("render");
        let k: serde_json::Value =
            crate::yaml::parse(&files["kustomization.yaml"]).expect("parse kustomization");
        let listed: Vec<&str> = k["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(listed.first(), Some(&"namespace.yaml"));
        for path in files.keys().filter(|p| p.as_str() != "kustomization.yaml") {
            assert!(
                listed.contains(&path.as_str()),
                "{path} is not in kustomization.yaml"
            );
        }
    }
}
