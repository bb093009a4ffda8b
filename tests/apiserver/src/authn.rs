//! Authentication: who a request is, from its bearer token.
//!
//! ```text
//!  Authorization: Bearer <token> ──► Identities ──► User{name, uid, groups, extra}
//!        (none)                  ──► system:anonymous in system:unauthenticated
//!        (unknown, or its ServiceAccount / bound Pod is gone) ──► AuthnError (401)
//! ```
//!
//! Tokens are opaque random strings the server mints: the administrator's (`system:masters`),
//! ServiceAccount tokens, and ServiceAccount tokens bound to a Pod and its Node. Like the
//! real server's tokens, a ServiceAccount token stops working once its ServiceAccount is
//! deleted, and a bound token once its Pod (that name *and* uid) is gone. A bound token's
//! user carries the Pod and Node as `extra`, as Kubernetes ≥ 1.30 bound tokens do.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use serde_json::{Value, json};

use crate::store::Store;

/// `extra` key of a bound token's Node name.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// `extra` key of a bound token's Pod name.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `extra` key of a bound token's Pod uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// User name of requests without credentials.
pub const ANONYMOUS: &str = "system:anonymous";
/// Group of requests without credentials.
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
/// Group of every authenticated request.
pub const AUTHENTICATED: &str = "system:authenticated";

/// Failures of authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    /// The token is not known, or its ServiceAccount or bound Pod is gone.
    #[error("invalid bearer token")]
    AuthenticateToken,
}

/// An authenticated identity (`authentication.k8s.io/v1` `UserInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User name, e.g. `system:serviceaccount:ns:sa`.
    pub name: String,
    /// Unique id; a ServiceAccount's `metadata.uid`, empty when unknown.
    pub uid: String,
    /// Groups, e.g. `system:serviceaccounts`.
    pub groups: Vec<String>,
    /// Extra attributes, e.g. the Pod and Node of a bound token.
    pub extra: BTreeMap<String, Vec<String>>,
    /// The ServiceAccount (namespace, name) behind this identity, if any.
    pub service_account: Option<(String, String)>,
}

impl User {
    /// The cluster administrator (`system:masters`).
    pub fn admin() -> Self {
        Self {
            name: "meshlet-test-admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into(), AUTHENTICATED.into()],
            extra: BTreeMap::new(),
            service_account: None,
        }
    }

    /// The identity of a ServiceAccount.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            uid: String::new(),
            groups: service_account_groups(namespace),
            extra: BTreeMap::new(),
            service_account: Some((namespace.into(), name.into())),
        }
    }

    /// A request without credentials.
    pub fn anonymous() -> Self {
        Self {
            name: ANONYMOUS.into(),
            uid: String::new(),
            groups: vec![UNAUTHENTICATED.into()],
            extra: BTreeMap::new(),
            service_account: None,
        }
    }

    /// Whether RBAC is bypassed (`system:masters`, as in the real server).
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }

    /// The `UserInfo` object of TokenReview and SelfSubjectReview.
    pub fn to_user_info(&self) -> Value {
        let mut info = json!({"username": self.name, "groups": self.groups});
        if !self.uid.is_empty() {
            info["uid"] = json!(self.uid);
        }
        if !self.extra.is_empty() {
            info["extra"] = json!(self.extra);
        }
        info
    }
}

/// The groups of every ServiceAccount in `namespace`.
pub fn service_account_groups(namespace: &str) -> Vec<String> {
    vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{namespace}"),
        AUTHENTICATED.into(),
    ]
}

/// The Pod (and Node) a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodBinding {
    /// Namespace of the Pod (and its ServiceAccount).
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod uid; a Pod re-created under the same name does not revive the token.
    pub uid: String,
    /// Node the Pod runs on.
    pub node_name: String,
}

#[derive(Debug, Clone)]
struct Credential {
    user: User,
    pod: Option<PodBinding>,
}

/// Token → identity table.
#[derive(Default)]
pub struct Identities {
    tokens: RwLock<HashMap<String, Credential>>,
}

impl Identities {
    /// Registers `token` for `user`.
    pub fn insert(&self, token: &str, user: User) {
        self.put(token, Credential { user, pod: None });
    }

    /// Registers `token` for `user`, valid only while the Pod of `pod` exists; the user's
    /// `extra` names the Pod and its Node.
    pub fn insert_bound(&self, token: &str, mut user: User, pod: PodBinding) {
        user.extra
            .insert(EXTRA_NODE_NAME.into(), vec![pod.node_name.clone()]);
        user.extra
            .insert(EXTRA_POD_NAME.into(), vec![pod.name.clone()]);
        user.extra
            .insert(EXTRA_POD_UID.into(), vec![pod.uid.clone()]);
        self.put(
            token,
            Credential {
                user,
                pod: Some(pod),
            },
        );
    }

    fn put(&self, token: &str, credential: Credential) {
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.into(), credential);
    }

    /// Resolves a bearer token. ServiceAccount tokens require the ServiceAccount to exist
    /// (its uid becomes the user's uid); bound tokens also require their Pod, same uid.
    pub fn authenticate(&self, token: &str, store: &Store) -> Result<User, AuthnError> {
        let Credential { mut user, pod } = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
            .ok_or(AuthnError::AuthenticateToken)?;
        if let Some((ns, name)) = &user.service_account {
            let sa = store
                .get("serviceaccounts", ns, name)
                .ok_or(AuthnError::AuthenticateToken)?;
            user.uid = sa
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
        }
        if let Some(pod) = &pod {
            let live = store.get("pods", &pod.namespace, &pod.name);
            let uid = live
                .as_ref()
                .and_then(|p| p.pointer("/metadata/uid"))
                .and_then(Value::as_str);
            if uid != Some(pod.uid.as_str()) {
                return Err(AuthnError::AuthenticateToken);
            }
        }
        Ok(user)
    }
}

/// A fresh unguessable token with a readable prefix (`kind.namespace.name.`).
pub fn mint_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source (never seen on Linux): fall back to the clock, still unique.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes[..16].copy_from_slice(&nanos.to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}.{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Precondition;

    fn store_with(objects: &[(&str, Value)]) -> Store {
        let store = Store::new(100);
        for (gr, o) in objects {
            store.put(gr, o.clone(), Precondition::Absent).expect("put");
        }
        store
    }

    #[test]
    fn a_bound_token_works_only_while_its_pod_with_the_same_uid_exists() {
        let sa = json!({"metadata": {"name": "agent", "namespace": "sys", "uid": "sa-uid"}});
        let pod = json!({"metadata": {"name": "agent-x", "namespace": "sys", "uid": "pod-1"}});
        let store = store_with(&[("serviceaccounts", sa), ("pods", pod)]);
        let ids = Identities::default();
        let binding = PodBinding {
            namespace: "sys".into(),
            name: "agent-x".into(),
            uid: "pod-1".into(),
            node_name: "node-1".into(),
        };
        ids.insert_bound("t", User::service_account("sys", "agent"), binding);
        let user = ids
            .authenticate("t", &store)
            .expect("valid while the pod exists");
        assert_eq!(user.uid, "sa-uid");
        assert_eq!(user.extra[EXTRA_NODE_NAME], ["node-1"]);
        assert_eq!(user.extra[EXTRA_POD_UID], ["pod-1"]);

        store
            .remove("pods", "sys", "agent-x", Precondition::Exists)
            .expect("remove");
        let again = json!({"metadata": {"name": "agent-x", "namespace": "sys", "uid": "pod-2"}});
        store
            .put("pods", again, Precondition::Absent)
            .expect("re-create");
        assert!(
            ids.authenticate("t", &store).is_err(),
            "a pod re-created under the same name must not revive the token"
        );
    }

    #[test]
    fn two_minted_tokens_are_never_the_same() {
        assert_ne!(mint_token("a"), mint_token("a"));
    }
}
