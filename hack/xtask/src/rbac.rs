//! The RBAC table: every permission the operator and the node agent hold, in one place.
//!
//! ```text
//!   OPERATOR_CLUSTER_RULES ─┐                 ┌─► manifests/rbac/*.yaml
//!   OPERATOR_NAMESPACE_RULES├─► rules() ──────┤
//!   AGENT_CLUSTER_RULES     │   (PolicyRule)  └─► olm CSV install strategy
//!   agent_key_secret_rules()┘                      (clusterPermissions / permissions)
//! ```
//!
//! Each row names an API group, resources, exact verbs (never `*`) and why the holder needs
//! them. The operator server-side-applies the agent's RBAC, and Kubernetes only lets it grant
//! what it holds itself, so every agent rule is also covered by an operator rule; the unit
//! tests below check that.

use k8s_openapi::api::rbac::v1::PolicyRule;

pub use meshlet_crds::names::{AGENT_NAME, IPSEC_KEY_SECRET, NAMESPACE, OPERATOR_NAME};

/// One row of the RBAC table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// API group (`""` is the core group).
    pub group: &'static str,
    /// Resources (with `/subresource` where it applies).
    pub resources: &'static [&'static str],
    /// Exact verbs.
    pub verbs: &'static [&'static str],
    /// Why the holder needs this permission.
    pub reason: &'static str,
}

const READ: &[&str] = &["get", "list", "watch"];
const APPLY: &[&str] = &["get", "create", "patch", "update"];

/// Cluster-wide permissions of the operator (its ClusterRole).
pub const OPERATOR_CLUSTER_RULES: &[Rule] = &[
    Rule {
        group: "meshlet.io",
        resources: &["meshconfigs"],
        verbs: &["get", "list", "watch", "patch", "update"],
        reason: "watch the mesh configuration and add or remove its finalizer",
    },
    Rule {
        group: "meshlet.io",
        resources: &["meshconfigs/status"],
        verbs: &["get", "patch", "update"],
        reason: "report aggregated node counts, rollout progress and conditions",
    },
    Rule {
        group: "meshlet.io",
        resources: &["meshconfigs/finalizers"],
        verbs: &["update"],
        reason: "set blockOwnerDeletion on objects owned by a MeshConfig",
    },
    Rule {
        group: "meshlet.io",
        resources: &["nodeenrollments"],
        verbs: &[
            "get", "list", "watch", "create", "patch", "update", "delete",
        ],
        reason: "create one NodeEnrollment per selected node, set desiredVersion, delete on unselection",
    },
    Rule {
        group: "meshlet.io",
        resources: &["nodeenrollments/status"],
        verbs: &["get", "patch", "update"],
        reason: "grant the agent its status write (the operator itself never writes it)",
    },
    Rule {
        group: "meshlet.io",
        resources: &["nodeenrollments/finalizers"],
        verbs: &["patch", "update"],
        reason: "grant the agent the finalizer subresource",
    },
    Rule {
        group: "meshlet.io",
        resources: &["ipsecpolicies"],
        verbs: &["get", "list", "watch", "patch", "update"],
        reason: "watch IPsec policies and add or remove their finalizer",
    },
    Rule {
        group: "meshlet.io",
        resources: &["ipsecpolicies/status"],
        verbs: &["get", "patch", "update"],
        reason: "report the rotation phase, active SPI and acknowledgement counts",
    },
    Rule {
        group: "meshlet.io",
        resources: &["ipsecpolicies/finalizers"],
        verbs: &["update"],
        reason: "set blockOwnerDeletion on key Secrets owned by an IPsecPolicy",
    },
    Rule {
        group: "",
        resources: &["nodes"],
        verbs: READ,
        reason: "match nodes against the enrollment selector",
    },
    Rule {
        group: "",
        resources: &["pods"],
        verbs: &["list", "watch", "delete"],
        reason: "delete one agent pod at a time to drive the OnDelete rollout",
    },
    Rule {
        group: "apps",
        resources: &["daemonsets"],
        verbs: &["get", "list", "watch", "create", "patch", "update"],
        reason: "server-side-apply the agent DaemonSet",
    },
    Rule {
        group: "",
        resources: &["serviceaccounts"],
        verbs: APPLY,
        reason: "server-side-apply the agent ServiceAccount",
    },
    Rule {
        group: "rbac.authorization.k8s.io",
        resources: &["clusterroles", "clusterrolebindings"],
        verbs: APPLY,
        reason: "server-side-apply the agent ClusterRole and its binding",
    },
    Rule {
        group: "",
        resources: &["services"],
        verbs: READ,
        reason: "grant the agent read access to Services",
    },
    Rule {
        group: "discovery.k8s.io",
        resources: &["endpointslices"],
        verbs: READ,
        reason: "grant the agent read access to EndpointSlices",
    },
    Rule {
        group: "",
        resources: &["events"],
        verbs: &["create", "patch"],
        reason: "record events (core API)",
    },
    Rule {
        group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
        reason: "record events (events.k8s.io API)",
    },
];

/// Permissions of the operator inside [`NAMESPACE`] only (its Role).
pub const OPERATOR_NAMESPACE_RULES: &[Rule] = &[
    Rule {
        group: "",
        resources: &["secrets"],
        verbs: &["create", "get", "patch", "list", "watch"],
        reason: "generate and rotate IPsec key Secrets",
    },
    Rule {
        group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "create", "update", "patch"],
        reason: "leader election",
    },
    Rule {
        group: "rbac.authorization.k8s.io",
        resources: &["roles", "rolebindings"],
        verbs: APPLY,
        reason: "server-side-apply the agent Role that reads only the IPsec key Secret",
    },
];

/// Cluster-wide permissions of the node agent (its ClusterRole).
pub const AGENT_CLUSTER_RULES: &[Rule] = &[
    Rule {
        group: "meshlet.io",
        resources: &["nodeenrollments"],
        verbs: &["get", "list", "watch", "patch"],
        reason: "read its own and its peers' enrollments; release its finalizer on unenrollment",
    },
    Rule {
        group: "meshlet.io",
        resources: &["nodeenrollments/status"],
        verbs: &["patch", "update"],
        reason: "publish its own node status (the only writer)",
    },
    Rule {
        group: "meshlet.io",
        resources: &["nodeenrollments/finalizers"],
        verbs: &["patch", "update"],
        reason: "finalizer subresource of its enrollment",
    },
    Rule {
        group: "meshlet.io",
        resources: &["meshconfigs", "ipsecpolicies"],
        verbs: READ,
        reason: "read the data-plane configuration and IPsec policies",
    },
    Rule {
        group: "",
        resources: &["nodes"],
        verbs: READ,
        reason: "learn peer node addresses and labels for IPsec",
    },
    Rule {
        group: "",
        resources: &["services"],
        verbs: READ,
        reason: "program service frontends",
    },
    Rule {
        group: "discovery.k8s.io",
        resources: &["endpointslices"],
        verbs: READ,
        reason: "program service backends",
    },
];

/// The agent's only namespaced permission: reading the one IPsec key Secret named
/// `secret_name` (never Secrets in general).
pub fn agent_key_secret_rules(secret_name: &str) -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["secrets".to_owned()]),
        resource_names: Some(vec![secret_name.to_owned()]),
        verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
        non_resource_urls: None,
    }]
}

/// Converts table rows into Kubernetes `PolicyRule`s, in table order.
pub fn rules(table: &[Rule]) -> Vec<PolicyRule> {
    table
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.group.to_owned()]),
            resources: Some(r.resources.iter().map(|s| (*s).to_owned()).collect()),
            verbs: r.verbs.iter().map(|s| (*s).to_owned()).collect(),
            resource_names: None,
            non_resource_urls: None,
        })
        .collect()
}

/// True when `table` grants `verb` on `group`/`resource`.
pub fn grants(table: &[Rule], group: &str, resource: &str, verb: &str) -> bool {
    table
        .iter()
        .any(|r| r.group == group && r.resources.contains(&resource) && r.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_tables() -> [&'static [Rule]; 3] {
        [
            OPERATOR_CLUSTER_RULES,
            OPERATOR_NAMESPACE_RULES,
            AGENT_CLUSTER_RULES,
        ]
    }

    #[test]
    fn no_rule_uses_a_wildcard() {
        for table in all_tables() {
            for rule in table {
                assert!(!rule.group.contains('*'), "{rule:?}");
                assert!(rule.resources.iter().all(|r| !r.contains('*')), "{rule:?}");
                assert!(rule.verbs.iter().all(|v| !v.contains('*')), "{rule:?}");
                assert!(
                    !rule.verbs.is_empty() && !rule.resources.is_empty(),
                    "{rule:?}"
                );
            }
        }
    }

    #[test]
    fn operator_holds_every_permission_it_grants_to_the_agent() {
        for rule in AGENT_CLUSTER_RULES {
            for resource in rule.resources {
                for verb in rule.verbs {
                    assert!(
                        grants(OPERATOR_CLUSTER_RULES, rule.group, resource, verb),
                        "operator cannot grant {verb} on {}/{resource}",
                        rule.group
                    );
                }
            }
        }
        for rule in agent_key_secret_rules(IPSEC_KEY_SECRET) {
            for verb in &rule.verbs {
                assert!(
                    grants(OPERATOR_NAMESPACE_RULES, "", "secrets", verb),
                    "operator cannot grant {verb} on secrets"
                );
            }
        }
    }

    #[test]
    fn agent_cannot_read_secrets_in_general() {
        assert!(!grants(AGENT_CLUSTER_RULES, "", "secrets", "get"));
        let key_rules = agent_key_secret_rules(IPSEC_KEY_SECRET);
        assert!(
            key_rules
                .iter()
                .all(|r| r.resource_names.as_deref() == Some(&[IPSEC_KEY_SECRET.to_owned()][..]))
        );
    }

    #[test]
    fn agent_never_creates_or_deletes_anything_and_writes_only_node_enrollments() {
        for rule in AGENT_CLUSTER_RULES {
            assert!(
                !rule
                    .verbs
                    .iter()
                    .any(|v| matches!(*v, "create" | "delete" | "deletecollection")),
                "{rule:?}"
            );
            if rule.verbs.iter().any(|v| matches!(*v, "patch" | "update")) {
                assert!(
                    rule.resources
                        .iter()
                        .all(|r| r.starts_with("nodeenrollments")),
                    "{rule:?}"
                );
            }
        }
    }

    #[test]
    fn operator_can_drive_an_on_delete_rollout_but_not_create_pods() {
        assert!(grants(OPERATOR_CLUSTER_RULES, "", "pods", "delete"));
        assert!(!grants(OPERATOR_CLUSTER_RULES, "", "pods", "create"));
        assert!(!grants(OPERATOR_CLUSTER_RULES, "", "secrets", "get"));
    }
}
