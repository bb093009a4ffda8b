//! The OperatorHub bundle in `olm/` (registry+v1 layout).
//!
//! ```text
//!  all_crds() ──────┬─► manifests/<name>.yaml           (same CRDs as manifests/crds/)
//!                   └─► CSV owned CRDs + spec/status descriptors (from the CRD schemas)
//!  examples/*.yaml ───► CSV metadata.annotations.alm-examples
//!  manifests:: + rbac ► CSV install strategy (Deployment, clusterPermissions, permissions)
//!  constants ─────────► metadata/annotations.yaml, bundle.Dockerfile
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde_json::{Value, json};

use crate::manifests;
use crate::rbac::{self, AGENT_NAME, NAMESPACE, OPERATOR_NAME};
use crate::yaml;

/// OLM package name.
pub const PACKAGE: &str = "meshlet-operator";
/// The one channel the bundle is published in.
pub const CHANNEL: &str = "alpha";
/// Oldest Kubernetes version the operator supports.
pub const MIN_KUBE_VERSION: &str = "1.30.0";
/// Path of the CSV inside the bundle.
pub const CSV_PATH: &str = "manifests/meshlet-operator.clusterserviceversion.yaml";

/// The keys `metadata/annotations.yaml` must carry, with our values.
pub fn bundle_annotations() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (
            "operators.operatorframework.io.bundle.mediatype.v1",
            "registry+v1".to_owned(),
        ),
        (
            "operators.operatorframework.io.bundle.manifests.v1",
            "manifests/".to_owned(),
        ),
        (
            "operators.operatorframework.io.bundle.metadata.v1",
            "metadata/".to_owned(),
        ),
        (
            "operators.operatorframework.io.bundle.package.v1",
            PACKAGE.to_owned(),
        ),
        (
            "operators.operatorframework.io.bundle.channels.v1",
            CHANNEL.to_owned(),
        ),
        (
            "operators.operatorframework.io.bundle.channel.default.v1",
            CHANNEL.to_owned(),
        ),
    ])
}

const ICON_SVG: &str = include_str!("../assets/meshlet-icon.svg");

/// Standard base64 (RFC 4648, padded).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Human-readable name of a camelCase field: `maxUnavailable` → `Max Unavailable`,
/// `activeSPI` → `Active SPI`.
pub fn display_name(field: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for c in field.chars() {
        if c.is_uppercase() && prev_lower {
            out.push(' ');
        }
        if out.is_empty() {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
    }
    out
}

fn kind_display_name(kind: &str) -> String {
    match kind {
        "IPsecPolicy" => "IPsec Policy".to_owned(),
        other => display_name(other),
    }
}

/// First paragraph of a schema description, on one line.
fn summary(description: Option<&str>) -> String {
    description
        .unwrap_or("")
        .split("\n\n")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn x_descriptors(
    field: &str,
    schema: &JSONSchemaProps,
    group: Option<&str>,
    status: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(group) = group {
        out.push(format!(
            "urn:alm:descriptor:com.tectonic.ui:fieldGroup:{group}"
        ));
    }
    if status {
        if field == "conditions" {
            out.push("urn:alm:descriptor:io.kubernetes.conditions".to_owned());
        } else if field == "phase" {
            out.push("urn:alm:descriptor:io.kubernetes.phase".to_owned());
        } else {
            out.push("urn:alm:descriptor:text".to_owned());
        }
        return out;
    }
    let ui = match (field, schema.type_.as_deref()) {
        ("resources", _) => Some("resourceRequirements"),
        ("nodeSelector", _) => Some("selector:core:v1:Node"),
        (_, Some("boolean")) => Some("booleanSwitch"),
        (_, Some("integer")) => Some("number"),
        (_, Some("string")) if schema.enum_.is_some() => None,
        (_, Some("string")) => Some("text"),
        _ => None,
    };
    if let Some(ui) = ui {
        out.push(format!("urn:alm:descriptor:com.tectonic.ui:{ui}"));
    }
    out
}

/// Descriptors for the leaves of `root` down to two levels (`agent.image`), with
/// `conditions`, selectors and resource requirements kept whole.
fn descriptors(root: Option<&JSONSchemaProps>, status: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let Some(props) = root.and_then(|r| r.properties.as_ref()) else {
        return out;
    };
    for (name, schema) in props {
        let nested = schema.properties.as_ref().filter(|p| {
            !p.is_empty() && !matches!(name.as_str(), "resources" | "nodeSelector" | "conditions")
        });
        match nested {
            Some(children) => {
                for (child, child_schema) in children {
                    out.push(json!({
                        "path": format!("{name}.{child}"),
                        "displayName": display_name(child),
                        "description": summary(child_schema.description.as_deref()),
                        "x-descriptors": x_descriptors(child, child_schema, Some(name), status),
                    }));
                }
            }
            None => out.push(json!({
                "path": name,
                "displayName": display_name(name),
                "description": summary(schema.description.as_deref()),
                "x-descriptors": x_descriptors(name, schema, None, status),
            })),
        }
    }
    out
}

/// Kubernetes objects the operator creates on behalf of each kind (shown by the console).
fn owned_resources(kind: &str) -> Vec<Value> {
    let list: &[(&str, &str, &str)] = match kind {
        "MeshConfig" => &[
            ("DaemonSet", "v1", AGENT_NAME),
            ("ServiceAccount", "v1", AGENT_NAME),
            ("ClusterRole", "v1", AGENT_NAME),
            ("ClusterRoleBinding", "v1", AGENT_NAME),
        ],
        "IPsecPolicy" => &[("Secret", "v1", rbac::IPSEC_KEY_SECRET)],
        _ => &[],
    };
    list.iter()
        .map(|(kind, version, name)| json!({ "kind": kind, "version": version, "name": name }))
        .collect()
}

/// The CSV entry for one owned CRD, from its storage version's schema.
pub fn owned_crd(crd: &CustomResourceDefinition) -> Value {
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.storage)
        .or_else(|| crd.spec.versions.first());
    let schema = version
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref());
    let prop = |name: &str| {
        schema
            .and_then(|s| s.properties.as_ref())
            .and_then(|p| p.get(name))
    };
    let kind = &crd.spec.names.kind;
    json!({
        "name": crd.metadata.name,
        "kind": kind,
        "version": version.map(|v| v.name.clone()).unwrap_or_default(),
        "displayName": kind_display_name(kind),
        "description": summary(schema.and_then(|s| s.description.as_deref())),
        "resources": owned_resources(kind),
        "specDescriptors": descriptors(prop("spec"), false),
        "statusDescriptors": descriptors(prop("status"), true),
    })
}

/// The `alm-examples` JSON: every `meshlet.io` object in `examples/*.yaml`, in file-name
/// order.
pub fn alm_examples(examples_dir: &Path) -> anyhow::Result<String> {
    let mut paths = Vec::new();
    if examples_dir.is_dir() {
        for entry in std::fs::read_dir(examples_dir)
            .with_context(|| format!("failed to list {}", examples_dir.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                paths.push(path);
            }
        }
    }
    paths.sort();
    let mut examples = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let docs = yaml::parse_all(&text)
            .with_context(|| format!("failed to parse {}", path.display()))?;
        // Only Meshlet resources are examples of owned CRDs (other files, such as the
        // agent's standalone source, are not).
        examples.extend(docs.into_iter().filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with(&format!("{}/", meshlet_crds::GROUP)))
        }));
    }
    Ok(serde_json::to_string_pretty(&examples)?)
}

const DESCRIPTION: &str = "\
Meshlet runs a per-node eBPF service-mesh data plane and manages its whole lifecycle.

* **Socket-level load balancing** — connects to a Service VIP are rewritten to a backend in \
the kernel (cgroup connect/sendmsg/getpeername hooks).
* **Restarts and upgrades without dropping a connection** — programs and maps stay pinned in \
bpffs; new programs replace old ones atomically on their pinned links; map layouts are \
migrated entry by entry, never emptied.
* **Operator-driven rollouts** — canary nodes first, then at most `maxUnavailable` nodes at a \
time, each gated on its own health; halt and optional rollback on failure.
* **IPsec between nodes** — transport-mode ESP with key rotation in acknowledged phases.

Create one `MeshConfig` named `default` to choose the nodes and the data-plane version; each \
selected node gets a `NodeEnrollment` that reports its programs, maps and continuity record.
";

/// The ClusterServiceVersion.
pub fn csv(crds: &[CustomResourceDefinition], alm_examples: &str) -> Value {
    let deployment_spec = manifests::operator_deployment_spec();
    json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {
            "name": format!("{PACKAGE}.v{}", crate::VERSION),
            "namespace": "placeholder",
            "annotations": {
                "alm-examples": alm_examples,
                "capabilities": "Seamless Upgrades",
                "categories": "Networking,Security",
                "containerImage": crate::operator_image(),
                "description": "Per-node eBPF service-mesh data plane with connection-preserving upgrades",
                "repository": "https://github.com/meshlet-io/meshlet",
                "support": "Meshlet maintainers",
                "operatorframework.io/suggested-namespace": NAMESPACE,
            },
            "labels": {
                "operatorframework.io/arch.amd64": "supported",
                "operatorframework.io/arch.arm64": "supported",
                "operatorframework.io/os.linux": "supported",
            },
        },
        "spec": {
            "displayName": "Meshlet",
            "description": DESCRIPTION,
            "version": crate::VERSION,
            "maturity": "alpha",
            "minKubeVersion": MIN_KUBE_VERSION,
            "keywords": ["ebpf", "service mesh", "load balancing", "ipsec", "networking", "data plane"],
            "maintainers": [{ "name": "Meshlet maintainers", "email": "maintainers@meshlet.io" }],
            "provider": { "name": "Meshlet", "url": "https://meshlet.io" },
            "links": [
                { "name": "Source Code", "url": "https://github.com/meshlet-io/meshlet" },
                { "name": "Documentation", "url": "https://github.com/meshlet-io/meshlet/blob/main/README.md" },
            ],
            "icon": [{ "base64data": base64(ICON_SVG.as_bytes()), "mediatype": "image/svg+xml" }],
            "installModes": [
                { "type": "OwnNamespace", "supported": false },
                { "type": "SingleNamespace", "supported": false },
                { "type": "MultiNamespace", "supported": false },
                { "type": "AllNamespaces", "supported": true },
            ],
            "install": {
                "strategy": "deployment",
                "spec": {
                    "deployments": [{
                        "name": OPERATOR_NAME,
                        "label": manifests::common_labels("operator"),
                        "spec": deployment_spec,
                    }],
                    "clusterPermissions": [{
                        "serviceAccountName": OPERATOR_NAME,
                        "rules": rbac::rules(rbac::OPERATOR_CLUSTER_RULES),
                    }],
                    "permissions": [{
                        "serviceAccountName": OPERATOR_NAME,
                        "rules": rbac::rules(rbac::OPERATOR_NAMESPACE_RULES),
                    }],
                },
            },
            "customresourcedefinitions": {
                "owned": crds.iter().map(owned_crd).collect::<Vec<_>>(),
            },
            "relatedImages": [
                { "name": "operator", "image": crate::operator_image() },
                { "name": AGENT_NAME, "image": crate::agent_image() },
            ],
        },
    })
}

/// Renders every file of the bundle, keyed by path relative to `olm/`.
pub fn render(
    crds: &[CustomResourceDefinition],
    examples_dir: &Path,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for crd in crds {
        files.insert(
            format!("manifests/{}", manifests::crd_file_name(crd)),
            yaml::render(crd)?,
        );
    }
    let examples = alm_examples(examples_dir)?;
    files.insert(CSV_PATH.to_owned(), yaml::render(&csv(crds, &examples))?);
    files.insert(
        "metadata/annotations.yaml".to_owned(),
        yaml::render(&json!({ "annotations": bundle_annotations() }))?,
    );
    let mut dockerfile = yaml::HEADER.to_owned();
    dockerfile.push_str("FROM scratch\n\n");
    for (key, value) in bundle_annotations() {
        dockerfile.push_str(&format!("LABEL {key}={value}\n"));
    }
    dockerfile.push_str("\nCOPY manifests /manifests/\nCOPY metadata /metadata/\n");
    files.insert("bundle.Dockerfile".to_owned(), dockerfile);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_test_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn display_names_split_camel_case_and_keep_acronyms() {
        assert_eq!(display_name("maxUnavailable"), "Max Unavailable");
        assert_eq!(display_name("activeSPI"), "Active SPI");
        assert_eq!(display_name("image"), "Image");
    }
}
