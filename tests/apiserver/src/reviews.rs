//! Access and token reviews: create-only resources the server answers and never stores.
//!
//! ```text
//!  POST authorization.k8s.io/v1 selfsubjectaccessreviews   (requester)      ─┐
//!       authorization.k8s.io/v1 subjectaccessreviews       (spec.user, ...)  ├─► rbac::decide
//!       authorization.k8s.io/v1 namespaces/{ns}/localsubjectaccessreviews   ─┘   (the evaluator
//!       authorization.k8s.io/v1 selfsubjectrulesreviews ──► rbac::rules_for     every request
//!  POST authentication.k8s.io/v1 selfsubjectreviews ──► the requester's UserInfo  goes through)
//!       authentication.k8s.io/v1 tokenreviews ──► authn::Identities::authenticate
//! ```
//!
//! Creating a review needs RBAC `create` on it like any other request: the default policy
//! grants the self reviews to every authenticated user; `subjectaccessreviews`,
//! `localsubjectaccessreviews` and `tokenreviews` need a grant (the administrator has it).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::authn::{Identities, User};
use crate::rbac::{self, Attributes, Request};
use crate::store::Store;

/// The audience of every token this server mints (kube-apiserver's default).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The review resources: (group, resource, kind, namespaced).
pub const REVIEWS: &[(&str, &str, &str, bool)] = &[
    (
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "subjectaccessreviews",
        "SubjectAccessReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "localsubjectaccessreviews",
        "LocalSubjectAccessReview",
        true,
    ),
    (
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        "SelfSubjectRulesReview",
        false,
    ),
    (
        "authentication.k8s.io",
        "selfsubjectreviews",
        "SelfSubjectReview",
        false,
    ),
    (
        "authentication.k8s.io",
        "tokenreviews",
        "TokenReview",
        false,
    ),
];

/// A review the server refuses to answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// A field of the review is missing or wrong (422 Invalid).
    #[error("{kind} is invalid: {field}: {message}")]
    ValidateReview {
        /// Kind of the review.
        kind: String,
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The namespace of a LocalSubjectAccessReview's attributes differs from its URL's.
    #[error("spec.resourceAttributes.namespace must match namespace: {namespace}")]
    MatchNamespace {
        /// Namespace of the URL.
        namespace: String,
    },
}

fn invalid(kind: &str, field: &str, message: &str) -> ReviewError {
    ReviewError::ValidateReview {
        kind: kind.into(),
        field: field.into(),
        message: message.into(),
    }
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// What the server knows to answer a review.
pub struct Reviewer<'a> {
    /// Stored objects (RBAC, ServiceAccounts, Pods).
    pub store: &'a Store,
    /// Tokens.
    pub identities: &'a Identities,
    /// Who asks.
    pub requester: &'a User,
}

impl Reviewer<'_> {
    /// Answers a review of `kind` (`namespace` from the URL, for the local review); returns
    /// the review with its `status` filled in.
    pub fn answer(&self, kind: &str, namespace: &str, review: Value) -> Result<Value, ReviewError> {
        let status = match kind {
            "SelfSubjectAccessReview" => {
                let request = access_request(kind, &review["spec"])?;
                access_status(self.store, self.requester, &request)
            }
            "SubjectAccessReview" | "LocalSubjectAccessReview" => {
                let spec = &review["spec"];
                if kind == "LocalSubjectAccessReview" {
                    if spec.get("nonResourceAttributes").is_some() {
                        return Err(invalid(
                            kind,
                            "spec.nonResourceAttributes",
                            "disallowed on this kind of request",
                        ));
                    }
                    if text(spec, "/resourceAttributes/namespace") != namespace {
                        return Err(ReviewError::MatchNamespace {
                            namespace: namespace.into(),
                        });
                    }
                }
                let request = access_request(kind, spec)?;
                let subject = subject_of(kind, spec)?;
                access_status(self.store, &subject, &request)
            }
            "SelfSubjectRulesReview" => {
                let ns = text(&review, "/spec/namespace");
                if ns.is_empty() {
                    return Err(invalid(kind, "spec.namespace", "Required value"));
                }
                let (resource_rules, non_resource_rules, errors) =
                    rbac::rules_for(self.store, self.requester, ns);
                let mut status = json!({"resourceRules": resource_rules,
                    "nonResourceRules": non_resource_rules, "incomplete": !errors.is_empty()});
                if !errors.is_empty() {
                    status["evaluationError"] = json!(errors.join(", "));
                }
                status
            }
            "SelfSubjectReview" => json!({"userInfo": self.requester.to_user_info()}),
            "TokenReview" => self.token_status(kind, &review["spec"])?,
            other => return Err(invalid(other, "kind", "not a review this server answers")),
        };
        let mut out = review;
        if !out.get("metadata").is_some_and(Value::is_object) {
            out["metadata"] = json!({});
        }
        out["metadata"]["creationTimestamp"] = Value::Null;
        if kind == "LocalSubjectAccessReview" {
            out["metadata"]["namespace"] = json!(namespace);
        }
        if kind == "SelfSubjectReview"
            && let Some(o) = out.as_object_mut()
        {
            o.remove("spec");
        }
        out["status"] = status;
        Ok(out)
    }

    fn token_status(&self, kind: &str, spec: &Value) -> Result<Value, ReviewError> {
        let token = text(spec, "/token");
        if token.is_empty() {
            return Err(invalid(kind, "spec.token", "Required value"));
        }
        let wanted: Vec<&str> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !wanted.is_empty() && !wanted.contains(&API_AUDIENCE) {
            return Ok(json!({"authenticated": false, "user": {},
                "error": format!("token audiences [\"{API_AUDIENCE}\"] is invalid for the target audiences {wanted:?}")}));
        }
        Ok(match self.identities.authenticate(token, self.store) {
            Ok(user) => json!({"authenticated": true, "user": user.to_user_info(),
                "audiences": [API_AUDIENCE]}),
            Err(e) => json!({"authenticated": false, "user": {}, "error": e.to_string()}),
        })
    }
}

/// The request a (self/local) subject access review asks about, validated like the real
/// server: exactly one of `resourceAttributes` and `nonResourceAttributes`.
fn access_request<'a>(kind: &str, spec: &'a Value) -> Result<Request<'a>, ReviewError> {
    match (
        spec.get("resourceAttributes"),
        spec.get("nonResourceAttributes"),
    ) {
        (Some(_), Some(_)) => Err(invalid(
            kind,
            "spec.resourceAttributes",
            "cannot be specified in combination with nonResourceAttributes",
        )),
        (None, None) => Err(invalid(
            kind,
            "spec.resourceAttributes",
            "exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )),
        (Some(r), None) => Ok(Request::Resource(Attributes {
            verb: text(r, "/verb"),
            group: text(r, "/group"),
            resource: text(r, "/resource"),
            subresource: text(r, "/subresource"),
            namespace: text(r, "/namespace"),
            name: text(r, "/name"),
        })),
        (None, Some(n)) => Ok(Request::NonResource {
            verb: text(n, "/verb"),
            path: text(n, "/path"),
        }),
    }
}

/// The user a SubjectAccessReview asks about: exactly as given (no implicit groups), like
/// the real server.
fn subject_of(kind: &str, spec: &Value) -> Result<User, ReviewError> {
    let name = text(spec, "/user").to_string();
    let groups: Vec<String> = spec
        .get("groups")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if name.is_empty() && groups.is_empty() {
        return Err(invalid(
            kind,
            "spec.user",
            "Invalid value: \"\": at least one of user or group must be specified",
        ));
    }
    let extra: BTreeMap<String, Vec<String>> = spec
        .get("extra")
        .and_then(|e| serde_json::from_value(e.clone()).ok())
        .unwrap_or_default();
    let service_account = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .map(|(ns, n)| (ns.to_string(), n.to_string()));
    Ok(User {
        name,
        uid: text(spec, "/uid").to_string(),
        groups,
        extra,
        service_account,
    })
}

fn access_status(store: &Store, user: &User, request: &Request<'_>) -> Value {
    let decision = rbac::decide(store, user, request);
    let mut status = json!({"allowed": decision.allowed});
    if !decision.reason.is_empty() {
        status["reason"] = json!(decision.reason);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Precondition;

    fn store() -> Store {
        let store = Store::new(100);
        for (gr, o) in rbac::bootstrap_policy() {
            store.put(&gr, o, Precondition::Absent).expect("policy");
        }
        store
    }

    #[test]
    fn a_subject_access_review_for_an_unknown_user_is_refused_with_a_reason() {
        let store = store();
        let ids = Identities::default();
        let admin = User::admin();
        let reviewer = Reviewer {
            store: &store,
            identities: &ids,
            requester: &admin,
        };
        let out = reviewer
            .answer(
                "SubjectAccessReview",
                "",
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                    "spec": {"user": "nobody", "resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "default"}}}),
            )
            .expect("answer");
        assert_eq!(out["status"]["allowed"], false);
        let reason = out["status"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("User \"nobody\""), "{reason}");
        assert!(reason.contains("list resource \"pods\""), "{reason}");

        let err = reviewer
            .answer(
                "SubjectAccessReview",
                "",
                json!({"spec": {"resourceAttributes": {"verb": "get"}}}),
            )
            .expect_err("no user");
        assert!(
            err.to_string().contains("at least one of user or group"),
            "{err}"
        );
    }
}
