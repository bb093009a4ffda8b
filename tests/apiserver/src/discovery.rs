//! Discovery documents and OpenAPI v3, built from the [`Registry`].
//!
//! Serves legacy discovery (`/api`, `/apis`, `/api/v1`, `/apis/{g}`, `/apis/{g}/{v}`),
//! aggregated discovery (`APIGroupDiscoveryList`, when the client's `Accept` asks for it, as
//! kubectl does), an empty OpenAPI v2 document, and OpenAPI v3 (`/openapi/v3` and one
//! document per group-version). The
//! per-group-version documents list every path with its `x-kubernetes-group-version-kind` and
//! `fieldValidation` parameter (so kubectl uses server-side field validation), and carry the
//! CRD schemas so `kubectl explain` works for custom resources.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::resources::{Registry, ResourceType};

/// Content type of aggregated discovery v2 responses.
pub const AGGREGATED_V2: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Failures of discovery lookups.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No resources are served for this group/version.
    #[error("the server could not find the requested resource")]
    FindGroupVersion,
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The verbs discovery lists for `t`: reviews can only be created.
fn verbs(t: &ResourceType) -> &'static [&'static str] {
    if t.review { &["create"] } else { VERBS }
}

fn groups(reg: &Registry) -> BTreeMap<String, BTreeMap<String, Vec<Arc<ResourceType>>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<Arc<ResourceType>>>> = BTreeMap::new();
    for t in reg.all() {
        out.entry(t.group.clone())
            .or_default()
            .entry(t.version.clone())
            .or_default()
            .push(t);
    }
    out
}

/// `GET /api` (legacy).
pub fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
}

fn group_json(group: &str, versions: &BTreeMap<String, Vec<Arc<ResourceType>>>) -> Value {
    let vs: Vec<Value> = versions
        .keys()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

/// `GET /apis` (legacy).
pub fn api_group_list(reg: &Registry) -> Value {
    let items: Vec<Value> = groups(reg)
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, v)| group_json(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": items})
}

/// `GET /apis/{group}`.
pub fn api_group(reg: &Registry, group: &str) -> Result<Value, DiscoveryError> {
    let all = groups(reg);
    let versions = all.get(group).ok_or(DiscoveryError::FindGroupVersion)?;
    let mut g = group_json(group, versions);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Ok(g)
}

/// `GET /api/v1` or `/apis/{group}/{version}`.
pub fn api_resource_list(
    reg: &Registry,
    group: &str,
    version: &str,
) -> Result<Value, DiscoveryError> {
    let all = groups(reg);
    let types = all
        .get(group)
        .and_then(|g| g.get(version))
        .ok_or(DiscoveryError::FindGroupVersion)?;
    let mut resources = Vec::new();
    for t in types {
        let mut r = json!({
            "name": t.resource, "singularName": t.singular, "namespaced": t.namespaced,
            "kind": t.kind, "verbs": verbs(t),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.has_status {
            resources.push(
                json!({"name": format!("{}/status", t.resource), "singularName": "",
                "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// Aggregated discovery for `/api` (`legacy = true`) or `/apis`.
pub fn aggregated(reg: &Registry, legacy: bool) -> Value {
    let items: Vec<Value> = groups(reg)
        .iter()
        .filter(|(g, _)| g.is_empty() == legacy)
        .map(|(g, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|(v, types)| {
                    let resources: Vec<Value> = types
                        .iter()
                        .map(|t| {
                            let mut r = json!({
                                "resource": t.resource,
                                "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
                                "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": t.singular,
                                "verbs": verbs(t),
                            });
                            if !t.short_names.is_empty() {
                                r["shortNames"] = json!(t.short_names);
                            }
                            if !t.categories.is_empty() {
                                r["categories"] = json!(t.categories);
                            }
                            if t.has_status {
                                r["subresources"] = json!([{"subresource": "status",
                                    "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
                                    "verbs": ["get", "patch", "update"]}]);
                            }
                            r
                        })
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": vs})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
           "metadata": {}, "items": items})
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Content type of OpenAPI v2 in protobuf, the form kubectl asks for.
pub const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// `GET /openapi/v2`: a document without definitions (the empty protobuf message when asked
/// for protobuf). kubectl falls back to v2 for kinds whose v3 paths have no PATCH (the
/// reviews), finds no schema there and leaves validation to the server, as it does for any
/// kind a real server has no schema for.
pub fn openapi_v2() -> Value {
    json!({"swagger": "2.0",
        "info": {"title": "Kubernetes (meshlet test server)", "version": "v1.37.1"},
        "paths": {}, "definitions": {}})
}

/// `GET /openapi/v3`: one entry per group-version.
pub fn openapi_root(reg: &Registry) -> Value {
    let hash = format!("{:016X}", reg.generation());
    let mut paths = Map::new();
    for (g, versions) in groups(reg) {
        for v in versions.keys() {
            let p = gv_path(&g, v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn schema_name(t: &ResourceType) -> String {
    let mut parts: Vec<&str> = t.group.split('.').collect();
    parts.reverse();
    let g = if t.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        parts.join(".")
    };
    format!("{g}.{}.{}", t.version, t.kind)
}

/// `GET /openapi/v3/{api|apis/...}`: paths with GVK extensions and schemas.
pub fn openapi_group_version(reg: &Registry, path: &str) -> Result<Value, DiscoveryError> {
    let all = groups(reg);
    let (group, version) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return Err(DiscoveryError::FindGroupVersion),
    };
    let types = all
        .get(&group)
        .and_then(|g| g.get(&version))
        .ok_or(DiscoveryError::FindGroupVersion)?;
    let params = json!([
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
    ]);
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in types {
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let name = schema_name(t);
        let reference = json!({"$ref": format!("#/components/schemas/{name}")});
        let body = json!({"content": {"application/json": {"schema": reference}}});
        let has_schema = t.schema.is_some();
        let op = |action: &str| {
            let mut o = json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk,
                   "parameters": params, "responses": {"200": {"description": "OK"}}});
            if has_schema {
                o["requestBody"] = body.clone();
                o["responses"]["200"]["content"] =
                    json!({"application/json": {"schema": reference}});
            }
            o
        };
        let base = if t.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}",
                gv_path(&t.group, &t.version),
                t.resource
            )
        } else {
            format!("/{}/{}", gv_path(&t.group, &t.version), t.resource)
        };
        if t.review {
            paths.insert(base, json!({"post": op("post")}));
            continue;
        }
        paths.insert(base.clone(), json!({"get": op("list"), "post": op("post")}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
        if t.has_status {
            paths.insert(
                format!("{base}/{{name}}/status"),
                json!({"get": op("get"), "put": op("put"), "patch": op("patch")}),
            );
        }
        let mut schema = t.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        if let Value::Object(m) = &mut schema {
            m.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
        }
        if t.schema.is_some() {
            schemas.insert(name, schema);
        }
    }
    Ok(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (meshlet test server)", "version": "v1.37.1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
