//! Validation of objects against a CRD's OpenAPI v3 schema, for bundle checks.
//!
//! ```text
//!  CRD (v1 `spec.versions[].schema` or v1beta1 `spec.validation`) ─► openapi_to_json_schema()
//!      ─► jsonschema (draft 4) ─► errors as "<json path>: <message>"
//! ```
//!
//! OpenAPI's dialect differs from JSON Schema: `nullable` becomes a `null` type,
//! `x-kubernetes-int-or-string` an `anyOf` of integer and string. In strict mode an object
//! schema that lists `properties` (and neither preserves unknown fields nor declares
//! `additionalProperties`) rejects unknown fields, as `kubectl apply`'s strict field
//! validation does.

use anyhow::Context as _;
use serde_json::{Map, Value, json};

/// A compiled schema.
pub struct Schema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

/// Rewrites an OpenAPI v3 (Kubernetes structural) schema into JSON Schema draft 4.
pub fn openapi_to_json_schema(schema: &Value, strict: bool) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        let converted = match key.as_str() {
            "properties" | "patternProperties" | "definitions" => match value {
                Value::Object(props) => Value::Object(
                    props
                        .iter()
                        .map(|(k, v)| (k.clone(), openapi_to_json_schema(v, strict)))
                        .collect(),
                ),
                other => other.clone(),
            },
            "items" | "additionalProperties" | "not" => match value {
                Value::Bool(b) => Value::Bool(*b),
                Value::Array(a) => Value::Array(
                    a.iter()
                        .map(|v| openapi_to_json_schema(v, strict))
                        .collect(),
                ),
                other => openapi_to_json_schema(other, strict),
            },
            "allOf" | "anyOf" | "oneOf" => match value {
                Value::Array(a) => Value::Array(
                    a.iter()
                        .map(|v| openapi_to_json_schema(v, strict))
                        .collect(),
                ),
                other => other.clone(),
            },
            // Annotations only: never validated.
            "description" | "example" | "externalDocs" | "default" => continue,
            k if k.starts_with("x-kubernetes-") => continue,
            "nullable" => continue,
            _ => value.clone(),
        };
        out.insert(key.clone(), converted);
    }
    let nullable = map.get("nullable") == Some(&Value::Bool(true));
    if nullable && let Some(Value::String(t)) = out.get("type").cloned() {
        out.insert("type".to_owned(), json!([t, "null"]));
    }
    if map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        out.remove("type");
        out.insert(
            "anyOf".to_owned(),
            json!([{ "type": "integer" }, { "type": "string" }]),
        );
    }
    let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || map.get("x-kubernetes-embedded-resource") == Some(&Value::Bool(true));
    if strict
        && !preserves
        && map.contains_key("properties")
        && !map.contains_key("additionalProperties")
    {
        out.insert("additionalProperties".to_owned(), Value::Bool(false));
    }
    Value::Object(out)
}

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

impl Schema {
    /// Compiles an OpenAPI v3 schema.
    pub fn from_openapi(schema: &Value, strict: bool) -> anyhow::Result<Self> {
        let converted = openapi_to_json_schema(schema, strict);
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(&converted)
            .map_err(|e| anyhow::anyhow!("failed to compile the schema: {e}"))?;
        Ok(Self { validator })
    }

    /// The schema of `version` in a CRD given as JSON (apiextensions v1 or v1beta1);
    /// `None` when the CRD declares no schema for it.
    pub fn for_crd(crd: &Value, version: &str, strict: bool) -> anyhow::Result<Option<Self>> {
        openapi_for_crd(crd, version)
            .map(|s| Self::from_openapi(&with_object_root(s), strict))
            .transpose()
            .with_context(|| format!("in version {version}"))
    }

    /// Every violation of the schema by `obj`, as `<json path>: <message>`.
    pub fn errors(&self, obj: &Value) -> Vec<String> {
        self.validator
            .iter_errors(obj)
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                format!("{path}: {e}")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_fields_accept_null_and_int_or_string_accepts_only_those_two() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": { "type": "string", "nullable": true },
                "b": { "x-kubernetes-int-or-string": true },
            },
        });
        let s = Schema::from_openapi(&schema, false).expect("schema compiles");
        assert!(s.errors(&json!({ "a": null, "b": "25%" })).is_empty());
        assert!(s.errors(&json!({ "b": 3 })).is_empty());
        assert_eq!(s.errors(&json!({ "b": [1] })).len(), 1);
    }

    #[test]
    fn strict_mode_rejects_unknown_fields_unless_preserved() {
        let schema = json!({
            "type": "object",
            "properties": {
                "known": { "type": "string" },
                "free": { "type": "object", "x-kubernetes-preserve-unknown-fields": true,
                          "properties": { "x": { "type": "string" } } },
            },
        });
        let strict = Schema::from_openapi(&schema, true).expect("schema compiles");
        let errors = strict.errors(&json!({ "knwon": "typo", "free": { "y": 1 } }));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("knwon"), "{errors:?}");
        let lax = Schema::from_openapi(&schema, false).expect("schema compiles");
        assert!(lax.errors(&json!({ "knwon": "typo" })).is_empty());
    }
}
