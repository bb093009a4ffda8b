//! RBAC authorization from the stored Roles and Bindings: the one evaluator behind every
//! request, impersonation check and access review.
//!
//! ```text
//!  User + Request::Resource(verb, group, resource/subresource, namespace, name)
//!       | Request::NonResource(verb, path)
//!      ──► decide(): system:masters? ──► ClusterRoleBindings → ClusterRoles,
//!                                        RoleBindings(ns) → Roles/ClusterRoles
//!      ──► Decision{allowed, reason}  (403 with the real server's message when refused)
//!
//!  rules_for(User, ns) ──► SelfSubjectRulesReview (`kubectl auth can-i --list`)
//! ```
//!
//! `system:masters` bypasses RBAC, like the real server. [`bootstrap_policy`] is the part of
//! kube-apiserver's default policy a fresh cluster relies on: discovery for authenticated
//! users, `/version` and health for everyone, self-reviews for authenticated users and
//! `cluster-admin` for `system:masters`.

use serde_json::{Value, json};

use crate::authn::User;
use crate::store::Store;

/// What a resource request wants to do.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `impersonate`, ...).
    pub verb: &'a str,
    /// API group.
    pub group: &'a str,
    /// Plural resource.
    pub resource: &'a str,
    /// Subresource, empty if none.
    pub subresource: &'a str,
    /// Namespace, empty for cluster scope (or "all namespaces" in a review).
    pub namespace: &'a str,
    /// Object name, empty for collections and creates.
    pub name: &'a str,
}

/// A request to authorize.
#[derive(Debug, Clone)]
pub enum Request<'a> {
    /// A request for an API resource.
    Resource(Attributes<'a>),
    /// A request for any other path (`/version`, `/healthz`, `/api`, ...).
    NonResource {
        /// Lower-case HTTP verb (`get`, `post`, ...).
        verb: &'a str,
        /// URL path.
        path: &'a str,
    },
}

/// The authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Why, in the shape of kube-apiserver's RBAC reasons (`RBAC: allowed by ...`).
    pub reason: String,
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows_resource(rule: &Value, a: &Attributes<'_>) -> bool {
    let verbs = strs(rule.get("verbs"));
    let groups = strs(rule.get("apiGroups"));
    let resources = strs(rule.get("resources"));
    let names = strs(rule.get("resourceNames"));
    let full = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let verb_ok = verbs.iter().any(|v| *v == "*" || *v == a.verb);
    let group_ok = groups.iter().any(|g| *g == "*" || *g == a.group);
    let res_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == full
            || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource))
    });
    let name_ok = names.is_empty() || (!a.name.is_empty() && names.contains(&a.name));
    verb_ok && group_ok && res_ok && name_ok
}

fn rule_allows_path(rule: &Value, verb: &str, path: &str) -> bool {
    let verbs = strs(rule.get("verbs"));
    let urls = strs(rule.get("nonResourceURLs"));
    verbs.iter().any(|v| *v == "*" || *v == verb)
        && urls.iter().any(|u| match u.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => *u == path,
        })
}

/// How a binding names its subject in reasons (`ServiceAccount "ns/name"`, as the real one).
fn describe_subject(subject: &Value, binding_ns: &str) -> String {
    let field = |k: &str| subject.get(k).and_then(Value::as_str).unwrap_or_default();
    match field("kind") {
        "ServiceAccount" => {
            let ns = Some(field("namespace"))
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            format!("ServiceAccount \"{}/{ns}\"", field("name"))
        }
        kind => format!("{kind} \"{}\"", field("name")),
    }
}

fn subject_matches(subject: &Value, user: &User, binding_ns: &str) -> bool {
    let field = |k: &str| subject.get(k).and_then(Value::as_str).unwrap_or_default();
    let name = field("name");
    match field("kind") {
        "User" => name == user.name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = Some(field("namespace"))
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";

/// The rules a binding grants, or the real server's "not found" text for a missing role.
fn role_rules(store: &Store, role_ref: &Value, binding_ns: &str) -> Result<Vec<Value>, String> {
    let field = |k: &str| role_ref.get(k).and_then(Value::as_str).unwrap_or_default();
    let (kind, name) = (field("kind"), field("name"));
    let role = match kind {
        "ClusterRole" => store.get(&format!("clusterroles.{RBAC}"), "", name),
        "Role" => store.get(&format!("roles.{RBAC}"), binding_ns, name),
        _ => None,
    };
    match role {
        Some(r) => Ok(r
            .get("rules")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()),
        None => Err(format!(
            "{}.{RBAC} \"{name}\" not found",
            kind.to_ascii_lowercase()
        )),
    }
}

/// One binding that applies to a user, with what it grants.
struct Grant {
    /// `ClusterRoleBinding "b" of ClusterRole "r" to Group "g"`.
    source: String,
    rules: Result<Vec<Value>, String>,
}

/// Every binding of `user` that applies in `namespace` (cluster bindings always; role
/// bindings of `namespace` when it is not empty).
fn grants(store: &Store, user: &User, namespace: &str) -> Vec<Grant> {
    let cluster = store.list(&format!("clusterrolebindings.{RBAC}"), None).0;
    let local = if namespace.is_empty() {
        Vec::new()
    } else {
        store
            .list(&format!("rolebindings.{RBAC}"), Some(namespace))
            .0
    };
    let mut out = Vec::new();
    for (kind, bindings) in [("ClusterRoleBinding", cluster), ("RoleBinding", local)] {
        for b in bindings {
            let binding_ns = b
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(subject) = b
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|s| subject_matches(s, user, binding_ns))
            else {
                continue;
            };
            let Some(role_ref) = b.get("roleRef") else {
                continue;
            };
            let field = |v: &Value, k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let name = field(&b["metadata"], "name");
            let at = if binding_ns.is_empty() {
                format!("{kind} \"{name}\"")
            } else {
                format!("{kind} \"{name}/{binding_ns}\"")
            };
            out.push(Grant {
                source: format!(
                    "{at} of {} \"{}\" to {}",
                    field(role_ref, "kind"),
                    field(role_ref, "name"),
                    describe_subject(subject, binding_ns)
                ),
                rules: role_rules(store, role_ref, binding_ns),
            });
        }
    }
    out
}

/// Decides `request` for `user` from the stored RBAC objects.
pub fn decide(store: &Store, user: &User, request: &Request<'_>) -> Decision {
    if user.is_master() {
        return Decision {
            allowed: true,
            reason: String::new(),
        };
    }
    let namespace = match request {
        Request::Resource(a) => a.namespace,
        Request::NonResource { .. } => "",
    };
    let mut errors = Vec::new();
    for grant in grants(store, user, namespace) {
        let rules = match grant.rules {
            Ok(r) => r,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let allows = |r: &Value| match request {
            Request::Resource(a) => rule_allows_resource(r, a),
            Request::NonResource { verb, path } => rule_allows_path(r, verb, path),
        };
        if rules.iter().any(allows) {
            return Decision {
                allowed: true,
                reason: format!("RBAC: allowed by {}", grant.source),
            };
        }
    }
    // kube-apiserver leaves the reason empty unless a binding points at a missing role; say
    // what was refused to whom, so a denied review explains itself.
    let reason = if errors.is_empty() {
        let what = match request {
            Request::Resource(a) => describe_resource(a),
            Request::NonResource { verb, path } => format!("{verb} path \"{path}\""),
        };
        format!("RBAC: no rule allows User \"{}\" to {what}", user.name)
    } else {
        format!("RBAC: [{}]", errors.join(", "))
    };
    Decision {
        allowed: false,
        reason,
    }
}

fn describe_resource(a: &Attributes<'_>) -> String {
    let res = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let name = if a.name.is_empty() {
        String::new()
    } else {
        format!(" \"{}\"", a.name)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{} resource \"{res}\"{name} in API group \"{}\" {scope}",
        a.verb, a.group
    )
}

/// Whether `user` may perform `a`, per the stored RBAC objects.
pub fn allowed(store: &Store, user: &User, a: &Attributes<'_>) -> bool {
    decide(store, user, &Request::Resource(a.clone())).allowed
}

/// The rules that apply to `user` in `namespace`: (resource rules, non-resource rules), as
/// `SelfSubjectRulesReview` reports them, plus the errors of bindings to missing roles.
pub fn rules_for(
    store: &Store,
    user: &User,
    namespace: &str,
) -> (Vec<Value>, Vec<Value>, Vec<String>) {
    let (mut resource_rules, mut non_resource_rules, mut errors) =
        (Vec::new(), Vec::new(), Vec::new());
    for grant in grants(store, user, namespace) {
        match grant.rules {
            Ok(rules) => {
                for r in rules {
                    if r.get("nonResourceURLs")
                        .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
                    {
                        non_resource_rules.push(
                            json!({"verbs": r["verbs"], "nonResourceURLs": r["nonResourceURLs"]}),
                        );
                    } else {
                        let mut rule = json!({"verbs": r["verbs"], "apiGroups": r.get("apiGroups").cloned().unwrap_or(json!([])),
                            "resources": r.get("resources").cloned().unwrap_or(json!([]))});
                        if let Some(names) = r
                            .get("resourceNames")
                            .filter(|n| n.as_array().is_some_and(|a| !a.is_empty()))
                        {
                            rule["resourceNames"] = names.clone();
                        }
                        resource_rules.push(rule);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (resource_rules, non_resource_rules, errors)
}

/// The real server's 403 message for a refused resource request.
pub fn forbidden_message(user: &User, a: &Attributes<'_>, group_resource: &str) -> String {
    let what = if a.name.is_empty() {
        group_resource.to_string()
    } else {
        format!("{group_resource} \"{}\"", a.name)
    };
    let res = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}",
        user.name, a.verb, a.group
    )
}

/// The real server's 403 message for a refused non-resource request.
pub fn forbidden_path_message(user: &User, verb: &str, path: &str) -> String {
    format!(
        "forbidden: User \"{}\" cannot {verb} path \"{path}\"",
        user.name
    )
}

/// kube-apiserver's default ClusterRoles and ClusterRoleBindings that a fresh cluster's
/// clients rely on, as (group-resource, object).
pub fn bootstrap_policy() -> Vec<(String, Value)> {
    let role = |name: &str, rules: Value| {
        (
            format!("clusterroles.{RBAC}"),
            json!({"apiVersion": format!("{RBAC}/v1"), "kind": "ClusterRole",
                "metadata": {"name": name,
                    "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                    "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
                "rules": rules}),
        )
    };
    let binding = |name: &str, groups: &[&str]| {
        let subjects: Vec<Value> = groups
            .iter()
            .map(|g| json!({"apiGroup": RBAC, "kind": "Group", "name": g}))
            .collect();
        (
            format!("clusterrolebindings.{RBAC}"),
            json!({"apiVersion": format!("{RBAC}/v1"), "kind": "ClusterRoleBinding",
                "metadata": {"name": name,
                    "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                    "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
                "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name},
                "subjects": subjects}),
        )
    };
    let public_urls = json!(["/healthz", "/livez", "/readyz", "/version", "/version/"]);
    vec![
        role(
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                   {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ),
        role(
            "system:discovery",
            json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
        ),
        role(
            "system:public-info-viewer",
            json!([{"nonResourceURLs": public_urls, "verbs": ["get"]}]),
        ),
        role(
            "system:basic-user",
            json!([{"apiGroups": ["authorization.k8s.io"],
                    "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                   {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
        ),
        binding("cluster-admin", &["system:masters"]),
        binding("system:discovery", &["system:authenticated"]),
        binding(
            "system:public-info-viewer",
            &["system:authenticated", "system:unauthenticated"],
        ),
        binding("system:basic-user", &["system:authenticated"]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::User;
    use crate::store::Precondition;

    fn store_with_policy() -> Store {
        let store = Store::new(100);
        for (gr, o) in bootstrap_policy() {
            store.put(&gr, o, Precondition::Absent).expect("policy");
        }
        store
    }

    #[test]
    fn a_service_account_gets_exactly_what_its_binding_grants() {
        let store = store_with_policy();
        store
            .put(&format!("clusterroles.{RBAC}"), json!({"metadata": {"name": "r"}, "rules": [
                {"apiGroups": ["meshlet.io"], "resources": ["nodeenrollments/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["k"]}]}), Precondition::Absent)
            .expect("role");
        store
            .put(
                &format!("clusterrolebindings.{RBAC}"),
                json!({"metadata": {"name": "b"},
                "roleRef": {"kind": "ClusterRole", "name": "r", "apiGroup": RBAC},
                "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": "sys"}]}),
                Precondition::Absent,
            )
            .expect("binding");
        let user = User::service_account("sys", "agent");
        let attrs = |verb, group, resource, sub, name| Attributes {
            verb,
            group,
            resource,
            subresource: sub,
            namespace: "",
            name,
        };
        let status = attrs("patch", "meshlet.io", "nodeenrollments", "status", "n1");
        assert!(allowed(&store, &user, &status));
        assert_eq!(
            decide(&store, &user, &Request::Resource(status)).reason,
            "RBAC: allowed by ClusterRoleBinding \"b\" of ClusterRole \"r\" to ServiceAccount \"agent/sys\""
        );
        assert!(!allowed(
            &store,
            &user,
            &attrs("patch", "meshlet.io", "nodeenrollments", "", "n1")
        ));
        assert!(allowed(
            &store,
            &user,
            &attrs("get", "", "secrets", "", "k")
        ));
        assert!(!allowed(
            &store,
            &user,
            &attrs("list", "", "secrets", "", "")
        ));
        assert!(!allowed(
            &store,
            &User::service_account("sys", "other"),
            &attrs("get", "", "secrets", "", "k")
        ));
        let msg = forbidden_message(&user, &attrs("list", "", "secrets", "", ""), "secrets");
        assert_eq!(
            msg,
            "secrets is forbidden: User \"system:serviceaccount:sys:agent\" cannot list resource \"secrets\" in API group \"\" at the cluster scope"
        );
    }

    #[test]
    fn the_default_policy_lets_anyone_read_the_version_but_only_users_discover_the_api() {
        let store = store_with_policy();
        let get = |user: &User, path| {
            decide(&store, user, &Request::NonResource { verb: "get", path }).allowed
        };
        let anonymous = User::anonymous();
        let sa = User::service_account("default", "default");
        assert!(get(&anonymous, "/version"));
        assert!(get(&anonymous, "/healthz"));
        assert!(!get(&anonymous, "/apis"));
        assert!(!get(&anonymous, "/api/v1"));
        assert!(get(&sa, "/apis/meshlet.io/v1alpha1"));
        assert!(get(&sa, "/openapi/v3"));
        assert!(!get(&sa, "/metrics"));
        assert!(
            !decide(
                &store,
                &sa,
                &Request::NonResource {
                    verb: "post",
                    path: "/version"
                }
            )
            .allowed
        );
    }

    #[test]
    fn a_binding_to_a_missing_role_is_named_in_the_reason() {
        let store = Store::new(100);
        store
            .put(
                &format!("rolebindings.{RBAC}"),
                json!({"metadata": {"name": "b", "namespace": "team"},
                "roleRef": {"kind": "Role", "name": "gone", "apiGroup": RBAC},
                "subjects": [{"kind": "User", "name": "alice"}]}),
                Precondition::Absent,
            )
            .expect("binding");
        let alice = User {
            name: "alice".into(),
            ..User::anonymous()
        };
        let d = decide(
            &store,
            &alice,
            &Request::Resource(Attributes {
                verb: "get",
                group: "",
                resource: "pods",
                subresource: "",
                namespace: "team",
                name: "",
            }),
        );
        assert!(!d.allowed);
        assert_eq!(
            d.reason,
            "RBAC: [role.rbac.authorization.k8s.io \"gone\" not found]"
        );
    }
}
