//! Schema helpers for the bundle checks; validation itself is `meshlet_crds::validation`.
//!
//! ```text
//!  CRD (v1 `spec.versions[].schema` or v1beta1 `spec.validation`) ─► openapi_for_crd()
//!      ─► with_object_root() (implicit apiVersion/kind/metadata) ─► SchemaValidator
//!  CSV ─► fill_required_scalars() (read as OLM's Go decoder reads it) ─► SchemaValidator
//! ```

use serde_json::{Value, json};

/// The OpenAPI v3 schema of `version` in a CRD given as JSON (apiextensions v1
/// `spec.versions[].schema` or v1beta1 `spec.validation`).
pub fn openapi_for_crd<'a>(crd: &'a Value, version: &str) -> Option<&'a Value> {
    let spec = &crd["spec"];
    let from_versions = spec["versions"].as_array().and_then(|versions| {
        versions
            .iter()
            .find(|v| v["name"] == version)
            .and_then(|v| v["schema"].get("openAPIV3Schema"))
    });
    from_versions.or_else(|| spec["validation"].get("openAPIV3Schema"))
}

/// Adds the fields every Kubernetes object has (`apiVersion`, `kind`, `metadata`) to a
/// CRD's root schema, where the API server allows them implicitly.
pub fn with_object_root(schema: &Value) -> Value {
    let mut root = schema.clone();
    if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
        for (name, ty) in [
            ("apiVersion", "string"),
            ("kind", "string"),
            ("metadata", "object"),
        ] {
            props.entry(name).or_insert_with(|| json!({ "type": ty }));
        }
    }
    root
}

/// Fills required scalar properties that `obj` lacks with their zero value (`""`, `false`,
/// `0`), recording each as a JSON path in `filled`.
///
/// This mirrors how OLM reads a bundle: it decodes the CSV into its Go types, where a missing
/// required (non-`omitempty`) string or number simply reads as its zero value. Missing
/// required objects and arrays are left alone, so the schema still reports them.
pub fn fill_required_scalars(
    schema: &Value,
    obj: &mut Value,
    path: &str,
    filled: &mut Vec<String>,
) {
    match obj {
        Value::Object(map) => {
            if let Some(required) = schema["required"].as_array() {
                for key in required.iter().filter_map(Value::as_str) {
                    if map.contains_key(key) {
                        continue;
                    }
                    let zero = match schema["properties"][key]["type"].as_str() {
                        Some("string") => Value::String(String::new()),
                        Some("boolean") => Value::Bool(false),
                        Some("integer" | "number") => json!(0),
                        _ => continue,
                    };
                    map.insert(key.to_owned(), zero);
                    filled.push(format!("{path}/{key}"));
                }
            }
            for (key, value) in map.iter_mut() {
                let child = match schema["properties"].get(key) {
                    Some(s) => s,
                    None => &schema["additionalProperties"],
                };
                if child.is_object() {
                    fill_required_scalars(child, value, &format!("{path}/{key}"), filled);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter_mut().enumerate() {
                fill_required_scalars(&schema["items"], item, &format!("{path}/{i}"), filled);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_required_scalars_read_as_zero_values_but_objects_stay_missing() {
        let schema = json!({
            "type": "object",
            "required": ["items", "spec"],
            "properties": {
                "spec": { "type": "object" },
                "items": { "type": "array", "items": {
                    "type": "object",
                    "required": ["name", "count", "on"],
                    "properties": {
                        "name": { "type": "string" },
                        "count": { "type": "integer" },
                        "on": { "type": "boolean" },
                    },
                }},
            },
        });
        let mut obj = json!({ "items": [{ "name": "a" }, {}] });
        let mut filled = Vec::new();
        fill_required_scalars(&schema, &mut obj, "", &mut filled);
        assert_eq!(
            obj,
            json!({ "items": [
                { "name": "a", "count": 0, "on": false },
                { "name": "", "count": 0, "on": false },
            ]})
        );
        assert_eq!(filled.len(), 5, "{filled:?}");
        assert!(filled.contains(&"/items/1/name".to_owned()), "{filled:?}");
    }

    #[test]
    fn object_root_gains_the_implicit_fields_without_losing_its_own() {
        let root = with_object_root(&json!({
            "type": "object",
            "properties": { "spec": { "type": "object" }, "kind": { "type": "string", "enum": ["X"] } },
        }));
        assert_eq!(root["properties"]["kind"]["enum"], json!(["X"]));
        assert_eq!(root["properties"]["metadata"]["type"], "object");
        assert_eq!(root["properties"]["apiVersion"]["type"], "string");
    }
}
