//! Authentication (bearer tokens) and RBAC authorization from the stored Roles and Bindings.
//!
//! ```text
//!  Authorization: Bearer <token> ──► Identities ──► User{name, groups}
//!  User + (verb, group, resource/subresource, namespace, name)
//!      ──► ClusterRoleBindings → ClusterRoles, RoleBindings(ns) → Roles/ClusterRoles
//!      ──► allowed, or 403 with the real server's message
//! ```
//!
//! `system:masters` bypasses RBAC, like the real server. A ServiceAccount token stops
//! working once its ServiceAccount is deleted.

use std::collections::HashMap;
use std::sync::RwLock;

use serde_json::Value;

use crate::store::Store;

/// Failures of authentication.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// The token is not known or its ServiceAccount is gone.
    #[error("unknown bearer token")]
    AuthenticateToken,
}

/// An authenticated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User name, e.g. `system:serviceaccount:ns:sa`.
    pub name: String,
    /// Groups, e.g. `system:serviceaccounts`.
    pub groups: Vec<String>,
    /// The ServiceAccount (namespace, name) behind this identity, if any.
    pub service_account: Option<(String, String)>,
}

impl User {
    /// The cluster administrator (`system:masters`).
    pub fn admin() -> Self {
        Self {
            name: "meshlet-test-admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            service_account: None,
        }
    }

    /// The identity of a ServiceAccount.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            service_account: Some((namespace.into(), name.into())),
        }
    }

    /// Whether RBAC is bypassed.
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// Token → identity table.
#[derive(Default)]
pub struct Identities {
    tokens: RwLock<HashMap<String, User>>,
}

impl Identities {
    /// Registers `token` for `user`.
    pub fn insert(&self, token: &str, user: User) {
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.into(), user);
    }

    /// Resolves a bearer token; ServiceAccount tokens require the ServiceAccount to exist.
    pub fn authenticate(&self, token: &str, store: &Store) -> Result<User, RbacError> {
        let user = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
            .ok_or(RbacError::AuthenticateToken)?;
        if let Some((ns, name)) = &user.service_account
            && store.get("serviceaccounts", ns, name).is_none()
        {
            return Err(RbacError::AuthenticateToken);
        }
        Ok(user)
    }
}

/// What a request wants to do.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`).
    pub verb: &'a str,
    /// API group.
    pub group: &'a str,
    /// Plural resource.
    pub resource: &'a str,
    /// Subresource, empty if none.
    pub subresource: &'a str,
    /// Namespace, empty for cluster scope.
    pub namespace: &'a str,
    /// Object name, empty for collections and creates.
    pub name: &'a str,
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
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
            || (a.subresource.is_empty() && *r == a.resource)
            || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource))
    });
    let name_ok = names.is_empty() || (!a.name.is_empty() && names.contains(&a.name));
    verb_ok && group_ok && res_ok && name_ok
}

fn subject_matches(subject: &Value, user: &User, binding_ns: &str) -> bool {
    let kind = subject
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = subject
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match kind {
        "User" => name == user.name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = subject
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.service_account
                .as_ref()
                .is_some_and(|(sns, sname)| sns == ns && sname == name)
        }
        _ => false,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";

fn role_rules(store: &Store, role_ref: &Value, binding_ns: &str) -> Vec<Value> {
    let kind = role_ref
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = role_ref
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let role = match kind {
        "ClusterRole" => store.get(&format!("clusterroles.{RBAC}"), "", name),
        "Role" => store.get(&format!("roles.{RBAC}"), binding_ns, name),
        _ => None,
    };
    role.and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Whether `user` may perform `a`, per the stored RBAC objects.
pub fn allowed(store: &Store, user: &User, a: &Attributes<'_>) -> bool {
    if user.is_master() {
        return true;
    }
    let bindings = store
        .list(&format!("clusterrolebindings.{RBAC}"), None)
        .0
        .into_iter()
        .chain(if a.namespace.is_empty() {
            Vec::new()
        } else {
            store
                .list(&format!("rolebindings.{RBAC}"), Some(a.namespace))
                .0
        });
    for b in bindings {
        let binding_ns = b
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let subjects = b.get("subjects").and_then(Value::as_array);
        if !subjects
            .into_iter()
            .flatten()
            .any(|s| subject_matches(s, user, binding_ns))
        {
            continue;
        }
        let Some(role_ref) = b.get("roleRef") else {
            continue;
        };
        if role_rules(store, role_ref, binding_ns)
            .iter()
            .any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    false
}

/// The real server's 403 message for a refused request.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Precondition;
    use serde_json::json;

    #[test]
    fn a_service_account_gets_exactly_what_its_binding_grants() {
        let store = Store::new(100);
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
        assert!(allowed(
            &store,
            &user,
            &attrs("patch", "meshlet.io", "nodeenrollments", "status", "n1")
        ));
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
}
