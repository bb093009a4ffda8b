//! Protobuf request bodies of the review kinds, turned into the JSON the handlers work on.
//!
//! kubectl's typed clients (`kubectl auth can-i`, `auth can-i --list`, `auth whoami`) send
//! `application/vnd.kubernetes.protobuf`: the `k8s\0` magic, then a `runtime.Unknown`
//! envelope whose `raw` field holds the object. Only the review kinds are decoded here
//! (`SelfSubjectAccessReview`, `LocalSubjectAccessReview`, `SubjectAccessReview`,
//! `SelfSubjectRulesReview`, `SelfSubjectReview`, `TokenReview`); every other protobuf body
//! is still refused with 415. Responses are JSON, which those clients also accept.
//!
//! ```text
//!  body ──strip "k8s\0"──► Unknown{typeMeta, raw} ──kind──► prost message ──► serde_json Value
//! ```
//!
//! Field numbers are those of `k8s.io/api/{authorization,authentication}/v1/generated.proto`.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Value, json};

/// The magic prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\0";

/// Failures of decoding a protobuf body.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The body does not start with the `k8s\0` magic.
    #[error("the protobuf body does not start with the Kubernetes magic number")]
    FindMagic,
    /// The envelope or the object is not valid protobuf.
    #[error("failed to decode the protobuf {what}")]
    DecodeMessage {
        /// Which message.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: prost::DecodeError,
    },
    /// The kind is not one this server reads from protobuf.
    #[error("{api_version} {kind} in protobuf is not supported by this test server; send JSON")]
    DecodeKind {
        /// `apiVersion` of the envelope.
        api_version: String,
        /// `kind` of the envelope.
        kind: String,
    },
}

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ResourceAttributes {
    #[prost(string, optional, tag = "1")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
    #[prost(string, optional, tag = "3")]
    group: Option<String>,
    #[prost(string, optional, tag = "4")]
    version: Option<String>,
    #[prost(string, optional, tag = "5")]
    resource: Option<String>,
    #[prost(string, optional, tag = "6")]
    subresource: Option<String>,
    #[prost(string, optional, tag = "7")]
    name: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct NonResourceAttributes {
    #[prost(string, optional, tag = "1")]
    path: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ExtraValue {
    #[prost(string, repeated, tag = "1")]
    items: Vec<String>,
}

/// `SubjectAccessReviewSpec`; the self review's spec is its first two fields.
#[derive(Clone, PartialEq, Message)]
struct AccessReviewSpec {
    #[prost(message, optional, tag = "1")]
    resource_attributes: Option<ResourceAttributes>,
    #[prost(message, optional, tag = "2")]
    non_resource_attributes: Option<NonResourceAttributes>,
    #[prost(string, optional, tag = "3")]
    user: Option<String>,
    #[prost(string, repeated, tag = "4")]
    groups: Vec<String>,
    #[prost(btree_map = "string, message", tag = "5")]
    extra: BTreeMap<String, ExtraValue>,
    #[prost(string, optional, tag = "6")]
    uid: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct AccessReview {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<AccessReviewSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct RulesReviewSpec {
    #[prost(string, optional, tag = "1")]
    namespace: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct RulesReview {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<RulesReviewSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct TokenReviewSpec {
    #[prost(string, optional, tag = "1")]
    token: Option<String>,
    #[prost(string, repeated, tag = "2")]
    audiences: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct TokenReview {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<TokenReviewSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct SelfSubjectReview {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, ProtoError> {
    M::decode(bytes).map_err(|source| ProtoError::DecodeMessage { what, source })
}

/// Inserts `value` under `key` when it is a non-empty string.
fn put(obj: &mut Value, key: &str, value: Option<String>) {
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        obj[key] = json!(v);
    }
}

fn metadata(meta: Option<ObjectMeta>) -> Value {
    let mut out = json!({});
    if let Some(m) = meta {
        put(&mut out, "name", m.name);
        put(&mut out, "namespace", m.namespace);
    }
    out
}

fn access_review_spec(spec: AccessReviewSpec) -> Value {
    let mut out = json!({});
    if let Some(r) = spec.resource_attributes {
        let mut attrs = json!({});
        put(&mut attrs, "namespace", r.namespace);
        put(&mut attrs, "verb", r.verb);
        put(&mut attrs, "group", r.group);
        put(&mut attrs, "version", r.version);
        put(&mut attrs, "resource", r.resource);
        put(&mut attrs, "subresource", r.subresource);
        put(&mut attrs, "name", r.name);
        out["resourceAttributes"] = attrs;
    }
    if let Some(n) = spec.non_resource_attributes {
        let mut attrs = json!({});
        put(&mut attrs, "path", n.path);
        put(&mut attrs, "verb", n.verb);
        out["nonResourceAttributes"] = attrs;
    }
    put(&mut out, "user", spec.user);
    put(&mut out, "uid", spec.uid);
    if !spec.groups.is_empty() {
        out["groups"] = json!(spec.groups);
    }
    if !spec.extra.is_empty() {
        let extra: BTreeMap<String, Vec<String>> =
            spec.extra.into_iter().map(|(k, v)| (k, v.items)).collect();
        out["extra"] = json!(extra);
    }
    out
}

/// Decodes a protobuf review body into its JSON form (`apiVersion`, `kind`, `metadata`,
/// `spec`).
pub fn decode_review(body: &[u8]) -> Result<Value, ProtoError> {
    let body = body.strip_prefix(MAGIC).ok_or(ProtoError::FindMagic)?;
    let envelope: Unknown = decode("envelope", body)?;
    let type_meta = envelope.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = envelope.raw.unwrap_or_default();
    let (meta, spec) = match (api_version.as_str(), kind.as_str()) {
        (
            "authorization.k8s.io/v1",
            "SelfSubjectAccessReview" | "SubjectAccessReview" | "LocalSubjectAccessReview",
        ) => {
            let r: AccessReview = decode("access review", &raw)?;
            (r.metadata, access_review_spec(r.spec.unwrap_or_default()))
        }
        ("authorization.k8s.io/v1", "SelfSubjectRulesReview") => {
            let r: RulesReview = decode("rules review", &raw)?;
            let mut spec = json!({});
            put(&mut spec, "namespace", r.spec.unwrap_or_default().namespace);
            (r.metadata, spec)
        }
        ("authentication.k8s.io/v1", "TokenReview") => {
            let r: TokenReview = decode("token review", &raw)?;
            let s = r.spec.unwrap_or_default();
            let mut spec = json!({});
            put(&mut spec, "token", s.token);
            if !s.audiences.is_empty() {
                spec["audiences"] = json!(s.audiences);
            }
            (r.metadata, spec)
        }
        ("authentication.k8s.io/v1", "SelfSubjectReview") => {
            let r: SelfSubjectReview = decode("self subject review", &raw)?;
            (r.metadata, json!({}))
        }
        _ => return Err(ProtoError::DecodeKind { api_version, kind }),
    };
    Ok(json!({"apiVersion": api_version, "kind": kind, "metadata": metadata(meta), "spec": spec}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kubectl auth can-i patch nodeenrollments.meshlet.io/n1 --subresource=status -n myns`
    /// as kubectl 1.37 sends it.
    const CAN_I: &[u8] = b"k8s\x00\x0a2\x0a\x17authorization.k8s.io/v1\x12\x17SelfSubjectAccessReview\x12Y\x0a\x10\x0a\x00\x12\x00\x1a\x00\"\x00*\x002\x008\x00B\x00\x12;\x0a9\x0a\x04myns\x12\x05patch\x1a\x00\"\x00*\x1anodeenrollments.meshlet.io2\x06status:\x02n1\x1a\x08\x08\x00\x12\x00\x1a\x00 \x00\x1a\x00\"\x00";

    #[test]
    fn kubectl_can_i_is_read_from_protobuf() {
        let review = decode_review(CAN_I).expect("decode");
        assert_eq!(review["kind"], "SelfSubjectAccessReview");
        assert_eq!(
            review["spec"]["resourceAttributes"],
            json!({"namespace": "myns", "verb": "patch", "resource": "nodeenrollments.meshlet.io",
                   "subresource": "status", "name": "n1"})
        );
    }

    #[test]
    fn other_kinds_in_protobuf_are_refused_with_a_message() {
        let envelope = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
            }),
            raw: Some(Vec::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(envelope.encode_to_vec());
        let err = decode_review(&body).expect_err("refused");
        assert!(err.to_string().contains("v1 Secret"), "{err}");
    }
}
