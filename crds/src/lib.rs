//! API types of `meshlet.io/v1alpha1`.
//!
//! Owns the Rust definitions of `MeshConfig`, `NodeEnrollment` and `IPsecPolicy`, the kstatus
//! condition helpers, and [`all_crds`], from which every generated CRD manifest is rendered.
//!
//! ```text
//!  v1alpha1::* (serde + schemars + CEL) ─► Kind::crd() ─► all_crds() (+ root CEL rules)
//!                                                            │
//!            generator (YAML, OLM bundle) ◄──────────────────┤
//!            validation::SchemaValidator (test API server) ◄─┘
//! ```

pub mod conditions;
pub mod ipsec;
pub mod names;
pub mod v1alpha1;
#[cfg(feature = "validation")]
pub mod validation;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, ValidationRule,
};
use kube::CustomResourceExt;

pub use v1alpha1::{IPsecPolicy, MeshConfig, NodeEnrollment};

/// The API group of every Meshlet resource.
pub const GROUP: &str = "meshlet.io";

/// The only served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD Meshlet owns, in a stable order (used by the generator and the test server):
/// meshconfigs, nodeenrollments, ipsecpolicies.
///
/// Each is the derived CRD plus the rules that look at the object's metadata, which can only
/// live on the root schema.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        with_root_rule(
            MeshConfig::crd(),
            "self.metadata.name == 'default'",
            "MeshConfig is a singleton: metadata.name must be 'default'",
            ".metadata.name",
        ),
        with_root_rule(
            NodeEnrollment::crd(),
            "self.metadata.name == self.spec.nodeName",
            "metadata.name must equal spec.nodeName (a NodeEnrollment is named after its node)",
            ".metadata.name",
        ),
        IPsecPolicy::crd(),
    ]
}

/// Adds a CEL rule to the root schema of every version of `crd`, and declares
/// `metadata.name` there so the rule's `fieldPath` points at a field the schema knows (the API
/// server refuses a `fieldPath` it cannot resolve).
fn with_root_rule(
    mut crd: CustomResourceDefinition,
    rule: &str,
    message: &str,
    field_path: &str,
) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let props = root.properties.get_or_insert_with(Default::default);
            props
                .entry("metadata".to_owned())
                .or_insert_with(|| JSONSchemaProps {
                    type_: Some("object".to_owned()),
                    properties: Some(
                        [(
                            "name".to_owned(),
                            JSONSchemaProps {
                                type_: Some("string".to_owned()),
                                ..JSONSchemaProps::default()
                            },
                        )]
                        .into(),
                    ),
                    ..JSONSchemaProps::default()
                });
            root.x_kubernetes_validations
                .get_or_insert_with(Vec::new)
                .push(ValidationRule {
                    rule: rule.to_owned(),
                    message: Some(message.to_owned()),
                    field_path: Some(field_path.to_owned()),
                    reason: Some("FieldValueInvalid".to_owned()),
                    ..ValidationRule::default()
                });
        }
    }
    crd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_crds_lists_the_three_kinds_in_a_stable_order() {
        let names: Vec<String> = all_crds()
            .into_iter()
            .map(|c| c.metadata.name.unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "meshconfigs.meshlet.io",
                "nodeenrollments.meshlet.io",
                "ipsecpolicies.meshlet.io"
            ]
        );
    }

    /// Whether `field_path` (`.a.b`) names a declared property below `schema`.
    fn resolves(schema: &serde_json::Value, field_path: &str) -> bool {
        field_path
            .trim_start_matches('.')
            .split('.')
            .try_fold(schema, |node, key| {
                node.get("properties").and_then(|p| p.get(key))
            })
            .is_some()
    }

    fn check_field_paths(schema: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
        for rule in schema["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(path) = rule["fieldPath"].as_str()
                && !resolves(schema, path)
            {
                bad.push(format!("{at}: fieldPath {path}"));
            }
        }
        for (key, child) in schema["properties"].as_object().into_iter().flatten() {
            check_field_paths(child, &format!("{at}.{key}"), bad);
        }
        if let Some(items) = schema.get("items") {
            check_field_paths(items, &format!("{at}[]"), bad);
        }
    }

    #[test]
    fn every_rule_field_path_names_a_field_declared_in_the_schema() {
        let mut bad = Vec::new();
        for crd in all_crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("serialize");
            check_field_paths(&schema["openAPIV3Schema"], &crd.spec.names.kind, &mut bad);
        }
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn every_crd_is_cluster_scoped_with_a_status_subresource_and_the_meshlet_category() {
        for crd in all_crds() {
            assert_eq!(crd.spec.scope, "Cluster");
            assert_eq!(
                crd.spec.names.categories.as_deref(),
                Some(&["meshlet".to_owned()][..])
            );
            assert!(
                crd.spec
                    .names
                    .short_names
                    .as_ref()
                    .is_some_and(|s| !s.is_empty())
            );
            let version = &crd.spec.versions[0];
            assert!(
                version
                    .subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some()
            );
            assert!(
                version
                    .additional_printer_columns
                    .as_ref()
                    .is_some_and(|c| c.len() >= 3)
            );
        }
    }
}
