//! What the API server does with a custom resource on create and update: prune unknown fields,
//! apply schema defaults, then validate against the OpenAPI schema and the CEL rules.
//!
//! ```text
//!  CRD openAPIV3Schema ──► check_structural ──┬─► rewrite_schema ─► jsonschema (OpenAPI checks)
//!                                             └─► kube_cel::compile_schema  (x-kubernetes-validations)
//!
//!  admit(obj, old):  prune(obj) ─► apply_defaults(obj) ─► validate(obj, old)
//!                                                          ├─ OpenAPI errors (jsonschema)
//!                                                          ├─ list-type duplicates (set / map)
//!                                                          └─ CEL errors (rules skip null values)
//! ```
//!
//! `jsonschema` has no OpenAPI dialect, so [`rewrite_schema`] turns the Kubernetes flavour into
//! plain JSON Schema (draft 4): `nullable` becomes a type union with `null`, int-or-string an
//! `anyOf`, and `x-kubernetes-*` keys are dropped. Errors are reported like a Kubernetes
//! `StatusCause`: a dotted field path, a `FieldValue*` reason and the apiserver's wording.

use std::{collections::BTreeSet, fmt};

use jsonschema::{Draft, error::ValidationErrorKind};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_cel::CompiledSchema;
use serde_json::{Map, Value, json};

/// The `metadata` fields the API server keeps on a custom resource (`ObjectMeta`).
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Why a CRD schema cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The CRD has no version of that name.
    #[error("failed to find version {version} in CRD {crd}")]
    FindVersion {
        /// CRD name.
        crd: String,
        /// Requested version.
        version: String,
    },
    /// The version has no `schema.openAPIV3Schema`.
    #[error("failed to read the schema of CRD {crd} version {version}: no openAPIV3Schema")]
    ReadSchema {
        /// CRD name.
        crd: String,
        /// Version.
        version: String,
    },
    /// The schema is not structural.
    #[error("schema of CRD {crd} is not structural at {path}: {reason}")]
    CheckStructural {
        /// CRD name.
        crd: String,
        /// Dotted path of the offending schema node (`<root>` for the root).
        path: String,
        /// What is wrong there.
        reason: String,
    },
    /// A CEL rule does not compile.
    #[error("failed to compile CEL rule at {path} of CRD {crd}: {message}")]
    CompileRule {
        /// CRD name.
        crd: String,
        /// Dotted path of the schema node holding the rule.
        path: String,
        /// Compiler message (includes the rule).
        message: String,
    },
    /// The rewritten schema is rejected by the JSON Schema compiler.
    #[error("failed to compile the OpenAPI schema of CRD {crd}: {message}")]
    CompileSchema {
        /// CRD name.
        crd: String,
        /// Compiler message.
        message: String,
    },
}

/// One rejected field, shaped like a Kubernetes `StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.upgrade.maxUnavailable` or `status.maps[0].name`.
    pub field: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`,
    /// `FieldValueTypeInvalid`, `FieldValueTooLong`, ...
    pub reason: String,
    /// Human text, e.g. `Invalid value: "0": must be an integer >= 1 or a percentage ...`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// The schema of one CRD version, compiled for admission.
pub struct SchemaValidator {
    /// The OpenAPI schema as the CRD carries it (drives pruning and defaulting).
    schema: Value,
    /// The same schema rewritten to plain JSON Schema.
    json_schema: jsonschema::Validator,
    /// The CEL rules, compiled once.
    cel: CompiledSchema,
}

impl fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaValidator")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl SchemaValidator {
    /// Compile the schema of `version` of `crd`. Errors if the schema is not structural
    /// (e.g. missing `type`), or a CEL rule does not compile — with a clear message.
    pub fn for_crd(crd: &CustomResourceDefinition, version: &str) -> Result<Self, SchemaError> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let served = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .ok_or_else(|| SchemaError::FindVersion {
                crd: name.clone(),
                version: version.to_owned(),
            })?;
        let schema = served
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| SchemaError::ReadSchema {
                crd: name.clone(),
                version: version.to_owned(),
            })?;
        let schema = serde_json::to_value(schema).map_err(|e| SchemaError::CompileSchema {
            crd: name.clone(),
            message: e.to_string(),
        })?;
        Self::from_schema(&name, schema)
    }

    /// Compile a bare `openAPIV3Schema` (as found in a CRD version); `crd` names it in errors.
    pub fn from_schema(crd: &str, schema: Value) -> Result<Self, SchemaError> {
        check_structural(&schema, "", true).map_err(|(path, reason)| {
            SchemaError::CheckStructural {
                crd: crd.to_owned(),
                path: display_path(&path),
                reason,
            }
        })?;
        let schema = with_implicit_root_fields(schema);
        let cel = kube_cel::compile_schema(&schema);
        if let Some((path, message)) = first_compile_error(&cel, "") {
            return Err(SchemaError::CompileRule {
                crd: crd.to_owned(),
                path: display_path(&path),
                message,
            });
        }
        let json_schema = jsonschema::options()
            .with_draft(Draft::Draft4)
            .should_validate_formats(true)
            .build(&rewrite_schema(&schema))
            .map_err(|e| SchemaError::CompileSchema {
                crd: crd.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Self {
            schema,
            json_schema,
            cel,
        })
    }

    /// The OpenAPI schema this validator was compiled from, with the implicit root fields
    /// (`apiVersion`, `kind`, `metadata`) made explicit.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Static analysis of every CEL rule: strings or lists without bounds, and estimated costs
    /// over the API server's budget. One line per warning.
    pub fn rule_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        collect_rule_warnings(&self.cel, "", &mut warnings);
        warnings
    }

    /// What the API server does on create/update: prune unknown fields, apply defaults, then
    /// validate (OpenAPI + CEL; transition rules use `old` when given).
    pub fn admit(&self, obj: &mut Value, old: Option<&Value>) -> Result<(), Vec<FieldError>> {
        self.prune(obj);
        self.apply_defaults(obj);
        self.validate(obj, old)
    }

    /// Drops every field the schema does not declare (except where it preserves unknown fields).
    /// `apiVersion`, `kind` and the `ObjectMeta` fields of `metadata` are always kept at the root.
    pub fn prune(&self, obj: &mut Value) {
        prune_node(&self.schema, obj, Position::Root);
    }

    /// Fills in schema defaults for absent fields (and for `null` in non-nullable ones),
    /// recursively, including inside objects that were themselves just defaulted.
    pub fn apply_defaults(&self, obj: &mut Value) {
        default_node(&self.schema, obj);
    }

    /// Validate against the OpenAPI schema and the CEL rules, reporting every failure. Transition
    /// rules (`oldSelf`) run only when `old` is given, as on an update.
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Result<(), Vec<FieldError>> {
        let mut errors: Vec<FieldError> = self
            .json_schema
            .iter_errors(obj)
            .flat_map(|e| openapi_errors(&e))
            .collect();
        list_type_errors(&self.schema, obj, "", &mut errors);
        // Like the API server, CEL rules run even when the OpenAPI checks failed. A rule that
        // cannot be evaluated then is usually looking at a value of the wrong type, which the
        // OpenAPI errors already report.
        let schema_valid = errors.is_empty();
        // The API server does not run rules on null values; CEL sees such fields as absent.
        let cel_obj = without_nulls(obj);
        let cel_old = old.map(without_nulls);
        if let Err(failures) = kube_cel::validate_compiled(&self.cel, &cel_obj, cel_old.as_ref()) {
            errors.extend(
                failures
                    .iter()
                    .filter(|f| schema_valid || f.kind == kube_cel::ErrorKind::ValidationFailure)
                    .map(|failure| cel_error(failure, obj)),
            );
        }
        dedup(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Where a schema node sits, for the special cases of the object root and embedded resources.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    /// The object itself: `apiVersion`, `kind`, `metadata` are implicit.
    Root,
    /// Anything below.
    Nested,
}

/// Declares what every object has at its root, as the API server does implicitly: string
/// `apiVersion` and `kind`, and `metadata` whose `name` and `generateName` CEL rules may read.
fn with_implicit_root_fields(mut schema: Value) -> Value {
    if let Some(root) = schema.as_object_mut() {
        let props = root.entry("properties").or_insert_with(|| json!({}));
        if let Some(props) = props.as_object_mut() {
            props
                .entry("apiVersion")
                .or_insert_with(|| json!({"type": "string"}));
            props
                .entry("kind")
                .or_insert_with(|| json!({"type": "string"}));
            // Keep what the CRD declares about metadata (e.g. a pattern on `name`); the other
            // ObjectMeta fields pass through untouched.
            let meta = props
                .entry("metadata")
                .or_insert_with(|| json!({"type": "object"}));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert(
                    "x-kubernetes-preserve-unknown-fields".to_owned(),
                    Value::Bool(true),
                );
                let fields = meta.entry("properties").or_insert_with(|| json!({}));
                if let Some(fields) = fields.as_object_mut() {
                    for key in ["name", "generateName"] {
                        fields
                            .entry(key)
                            .or_insert_with(|| json!({"type": "string"}));
                    }
                }
            }
        }
    }
    schema
}

// ── Structural check ───────────────────────────────────────────────────────────────────────

/// Checks the rules of a structural schema that matter for pruning and defaulting: every node
/// has a `type` (unless int-or-string or preserve-unknown-fields), objects declare their fields
/// with `properties`/`additionalProperties` but not both, arrays declare `items`, and a
/// `default` is not placed at the root. Returns the offending path and reason.
fn check_structural(schema: &Value, path: &str, root: bool) -> Result<(), (String, String)> {
    let Some(node) = schema.as_object() else {
        return Err((path.to_owned(), "schema node must be an object".to_owned()));
    };
    let int_or_string = flag(node, "x-kubernetes-int-or-string");
    let preserve = flag(node, "x-kubernetes-preserve-unknown-fields");
    let ty = node.get("type").and_then(Value::as_str);
    if ty.is_none() && !int_or_string && !preserve {
        return Err((path.to_owned(), "type must be specified".to_owned()));
    }
    if int_or_string && ty.is_some_and(|t| t != "integer" && t != "string") {
        return Err((
            path.to_owned(),
            "x-kubernetes-int-or-string needs no type".to_owned(),
        ));
    }
    if root && ty != Some("object") {
        return Err((
            path.to_owned(),
            "the root must be of type object".to_owned(),
        ));
    }
    if root && node.contains_key("default") {
        return Err((path.to_owned(), "the root cannot have a default".to_owned()));
    }
    for forbidden in ["$ref", "definitions", "dependencies", "patternProperties"] {
        if node.contains_key(forbidden) {
            return Err((path.to_owned(), format!("{forbidden} is not allowed")));
        }
    }
    if node.contains_key("properties") && node.contains_key("additionalProperties") {
        return Err((
            path.to_owned(),
            "properties and additionalProperties are mutually exclusive".to_owned(),
        ));
    }
    if ty == Some("array") && !node.contains_key("items") {
        return Err((path.to_owned(), "arrays must have items".to_owned()));
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (key, child) in props {
            check_structural(child, &join(path, key), false)?;
        }
    }
    if let Some(items) = node.get("items") {
        check_structural(items, &format!("{path}[*]"), false)?;
    }
    if let Some(extra) = node.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(extra, &format!("{path}[*]"), false)?;
    }
    Ok(())
}

/// The first CEL rule in `compiled` that failed to compile, with its dotted path.
fn first_compile_error(compiled: &CompiledSchema, path: &str) -> Option<(String, String)> {
    if let Some(error) = compiled.compilation_errors().first() {
        return Some((path.to_owned(), error.to_string()));
    }
    let mut children: Vec<(&String, &CompiledSchema)> = compiled.properties.iter().collect();
    children.sort_by_key(|(k, _)| k.as_str());
    for (key, child) in children {
        if let Some(found) = first_compile_error(child, &join(path, key)) {
            return Some(found);
        }
    }
    let nested = compiled
        .items
        .iter()
        .chain(compiled.additional_properties.iter());
    for child in nested {
        if let Some(found) = first_compile_error(child, &format!("{path}[*]")) {
            return Some(found);
        }
    }
    let alternatives = compiled
        .all_of
        .iter()
        .chain(&compiled.any_of)
        .chain(&compiled.one_of);
    alternatives
        .into_iter()
        .find_map(|child| first_compile_error(child, path))
}

fn collect_rule_warnings(compiled: &CompiledSchema, path: &str, out: &mut Vec<String>) {
    for rule in compiled.validations.iter().flatten() {
        // Scope analysis is left out: it mistakes comprehension variables for free ones.
        let found = kube_cel::estimate_rule_cost(&rule.rule.rule, compiled);
        out.extend(
            found
                .into_iter()
                .map(|w| format!("{}: {}", display_path(path), w.message)),
        );
    }
    let mut children: Vec<(&String, &CompiledSchema)> = compiled.properties.iter().collect();
    children.sort_by_key(|(k, _)| k.as_str());
    for (key, child) in children {
        collect_rule_warnings(child, &join(path, key), out);
    }
    for child in compiled
        .items
        .iter()
        .chain(compiled.additional_properties.iter())
    {
        collect_rule_warnings(child, &format!("{path}[*]"), out);
    }
}

// ── Rewrite to plain JSON Schema ───────────────────────────────────────────────────────────

/// Rewrites a Kubernetes OpenAPI v3 schema into plain JSON Schema (draft 4) that `jsonschema`
/// understands:
/// - `nullable: true` → `type: [t, "null"]` (and `null` added to an `enum`);
/// - `x-kubernetes-int-or-string: true` → `anyOf: [{type: integer}, {type: string}]`;
/// - an object with `properties` and without `x-kubernetes-preserve-unknown-fields` →
///   `additionalProperties: false`; with it, additional properties stay allowed;
/// - every other `x-kubernetes-*` key and `nullable` are dropped; `description` too.
pub fn rewrite_schema(schema: &Value) -> Value {
    let Some(node) = schema.as_object() else {
        return schema.clone();
    };
    let nullable = flag(node, "nullable");
    let int_or_string = flag(node, "x-kubernetes-int-or-string");
    let preserve = flag(node, "x-kubernetes-preserve-unknown-fields");
    let mut out = Map::new();
    for (key, value) in node {
        match key.as_str() {
            "nullable" | "description" | "title" | "example" | "externalDocs" => {}
            k if k.starts_with("x-kubernetes-") => {}
            "properties" => {
                let props = value
                    .as_object()
                    .map(|p| {
                        p.iter()
                            .map(|(k, v)| (k.clone(), rewrite_schema(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.insert(key.clone(), Value::Object(props));
            }
            "items" | "additionalProperties" | "not" if value.is_object() => {
                out.insert(key.clone(), rewrite_schema(value));
            }
            "allOf" | "anyOf" | "oneOf" => {
                let list = value
                    .as_array()
                    .map(|a| a.iter().map(rewrite_schema).collect());
                out.insert(key.clone(), Value::Array(list.unwrap_or_default()));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if int_or_string {
        out.remove("type");
        let mut choices = vec![json!({"type": "integer"}), json!({"type": "string"})];
        if nullable {
            choices.push(json!({"type": "null"}));
        }
        let alternatives = match out.remove("anyOf") {
            // Keep an existing anyOf (usually a pattern per branch) alongside the type check.
            Some(existing) => {
                let all_of = out
                    .entry("allOf")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(list) = all_of.as_array_mut() {
                    list.push(json!({"anyOf": existing}));
                }
                choices
            }
            None => choices,
        };
        out.insert("anyOf".to_owned(), Value::Array(alternatives));
    } else if nullable {
        if let Some(Value::String(t)) = out.get("type").cloned() {
            out.insert("type".to_owned(), json!([t, "null"]));
        }
        if let Some(Value::Array(options)) = out.get_mut("enum")
            && !options.contains(&Value::Null)
        {
            options.push(Value::Null);
        }
    }
    if node.contains_key("properties") && !preserve && !node.contains_key("additionalProperties") {
        out.insert("additionalProperties".to_owned(), Value::Bool(false));
    }
    Value::Object(out)
}

// ── Pruning ────────────────────────────────────────────────────────────────────────────────

fn prune_node(schema: &Value, value: &mut Value, position: Position) {
    let Some(node) = schema.as_object() else {
        return;
    };
    match value {
        Value::Object(fields) => {
            let preserve = flag(node, "x-kubernetes-preserve-unknown-fields");
            let embedded = flag(node, "x-kubernetes-embedded-resource");
            let props = node.get("properties").and_then(Value::as_object);
            let extra = node.get("additionalProperties");
            let implicit_meta = position == Position::Root || embedded;
            fields.retain(|key, _| {
                preserve
                    || props.is_some_and(|p| p.contains_key(key))
                    || extra.is_some_and(|e| e.is_object() || e == &Value::Bool(true))
                    || (implicit_meta && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
            });
            for (key, child) in fields.iter_mut() {
                if implicit_meta && key == "metadata" {
                    if let Value::Object(meta) = child {
                        meta.retain(|k, _| OBJECT_META_FIELDS.contains(&k.as_str()));
                    }
                    continue;
                }
                if let Some(child_schema) = props.and_then(|p| p.get(key)) {
                    prune_node(child_schema, child, Position::Nested);
                } else if let Some(extra) = extra.filter(|e| e.is_object()) {
                    prune_node(extra, child, Position::Nested);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = node.get("items") {
                for item in items {
                    prune_node(item_schema, item, Position::Nested);
                }
            }
        }
        _ => {}
    }
}

// ── Defaulting ─────────────────────────────────────────────────────────────────────────────

fn default_node(schema: &Value, value: &mut Value) {
    let Some(node) = schema.as_object() else {
        return;
    };
    match value {
        Value::Object(fields) => {
            if let Some(props) = node.get("properties").and_then(Value::as_object) {
                for (key, child_schema) in props {
                    let Some(default) = child_schema.get("default") else {
                        continue;
                    };
                    let nullable = child_schema.get("nullable") == Some(&Value::Bool(true));
                    match fields.get(key) {
                        None => {
                            fields.insert(key.clone(), default.clone());
                        }
                        Some(Value::Null) if !nullable => {
                            fields.insert(key.clone(), default.clone());
                        }
                        Some(_) => {}
                    }
                }
                for (key, child) in fields.iter_mut() {
                    if let Some(child_schema) = props.get(key) {
                        default_node(child_schema, child);
                    }
                }
            } else if let Some(extra) = node.get("additionalProperties").filter(|e| e.is_object()) {
                for child in fields.values_mut() {
                    default_node(extra, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = node.get("items") {
                for item in items {
                    default_node(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

// ── Error shaping ──────────────────────────────────────────────────────────────────────────

fn openapi_errors(error: &jsonschema::ValidationError<'_>) -> Vec<FieldError> {
    let field = pointer_to_field(error.instance_path().as_str());
    let instance = error.instance();
    let shown = show_value(instance);
    let invalid = |message: String| FieldError {
        field: field.clone(),
        reason: "FieldValueInvalid".to_owned(),
        message: format!("Invalid value: {shown}: {field} in body {message}"),
    };
    let error = match error.kind() {
        ValidationErrorKind::Required { property } => {
            let property = property.as_str().unwrap_or_default();
            FieldError {
                field: join(&field, property),
                reason: "FieldValueRequired".to_owned(),
                message: "Required value".to_owned(),
            }
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                jsonschema::error::TypeKind::Single(t) => t.to_string(),
                jsonschema::error::TypeKind::Multiple(ts) => {
                    let names: Vec<String> = (*ts)
                        .into_iter()
                        .map(|t| t.to_string())
                        .filter(|t| t != "null")
                        .collect();
                    names.join(" or ")
                }
            };
            let actual = json_type(instance);
            FieldError {
                field: field.clone(),
                reason: "FieldValueTypeInvalid".to_owned(),
                message: format!(
                    "Invalid value: \"{actual}\": {field} in body must be of type {expected}: \"{actual}\""
                ),
            }
        }
        ValidationErrorKind::AnyOf { .. } => {
            let actual = json_type(instance);
            if matches!(instance.as_ref(), Value::Number(_) | Value::String(_)) {
                invalid("must match one of the allowed forms".to_owned())
            } else {
                FieldError {
                    field: field.clone(),
                    reason: "FieldValueTypeInvalid".to_owned(),
                    message: format!(
                        "Invalid value: \"{actual}\": {field} in body must be of type integer or string: \"{actual}\""
                    ),
                }
            }
        }
        ValidationErrorKind::Enum { options } => {
            let supported: Vec<String> = options
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|v| !v.is_null())
                        .map(|v| v.to_string())
                        .collect()
                })
                .unwrap_or_default();
            FieldError {
                field: field.clone(),
                reason: "FieldValueNotSupported".to_owned(),
                message: format!(
                    "Unsupported value: {}: supported values: {}",
                    instance,
                    supported.join(", ")
                ),
            }
        }
        ValidationErrorKind::Minimum { limit } => invalid(format!(
            "should be greater than or equal to {}",
            number(limit)
        )),
        ValidationErrorKind::Maximum { limit } => {
            invalid(format!("should be less than or equal to {}", number(limit)))
        }
        ValidationErrorKind::ExclusiveMinimum { limit } => {
            invalid(format!("should be greater than {}", number(limit)))
        }
        ValidationErrorKind::ExclusiveMaximum { limit } => {
            invalid(format!("should be less than {}", number(limit)))
        }
        ValidationErrorKind::MinLength { limit } => {
            invalid(format!("should be at least {limit} chars long"))
        }
        ValidationErrorKind::MaxLength { limit } => FieldError {
            field: field.clone(),
            reason: "FieldValueTooLong".to_owned(),
            message: format!("Too long: may not be more than {limit} bytes"),
        },
        ValidationErrorKind::MinItems { limit } => {
            invalid(format!("should have at least {limit} items"))
        }
        ValidationErrorKind::MaxItems { limit } => FieldError {
            field: field.clone(),
            reason: "FieldValueTooMany".to_owned(),
            message: format!("Too many: must have at most {limit} items"),
        },
        ValidationErrorKind::Pattern { pattern } => invalid(format!("should match '{pattern}'")),
        ValidationErrorKind::Format { format } => {
            invalid(format!("must be of type {format}: {shown}"))
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            return unexpected
                .iter()
                .map(|key| FieldError {
                    field: join(&field, key),
                    reason: "FieldValueForbidden".to_owned(),
                    message: "Forbidden: unknown field".to_owned(),
                })
                .collect();
        }
        ValidationErrorKind::UniqueItems => FieldError {
            field: field.clone(),
            reason: "FieldValueDuplicate".to_owned(),
            message: format!("Duplicate value: {shown}"),
        },
        _ => invalid(error.to_string()),
    };
    vec![error]
}

fn cel_error(failure: &kube_cel::ValidationError, obj: &Value) -> FieldError {
    let field = failure.field_path.trim_start_matches('.').to_owned();
    let reason = failure
        .reason
        .clone()
        .unwrap_or_else(|| "FieldValueInvalid".to_owned());
    let value = lookup(obj, &field);
    let shown = value.map_or_else(|| "\"null\"".to_owned(), show_value);
    let message = match failure.kind {
        kube_cel::ErrorKind::ValidationFailure => {
            format!("Invalid value: {shown}: {}", failure.message)
        }
        _ => format!(
            "Internal error: rule {:?} could not be evaluated: {}",
            failure.rule, failure.message
        ),
    };
    FieldError {
        field,
        reason,
        message,
    }
}

/// Checks `x-kubernetes-list-type`: items of a `set` are unique, and items of a `map` are unique
/// by their `x-kubernetes-list-map-keys` (e.g. one condition per `type`).
fn list_type_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(node) = schema.as_object() else {
        return;
    };
    match value {
        Value::Object(fields) => {
            let props = node.get("properties").and_then(Value::as_object);
            let extra = node.get("additionalProperties").filter(|e| e.is_object());
            for (key, child) in fields {
                if let Some(child_schema) = props.and_then(|p| p.get(key)).or(extra) {
                    list_type_errors(child_schema, child, &join(path, key), errors);
                }
            }
        }
        Value::Array(items) => {
            let list_type = node.get("x-kubernetes-list-type").and_then(Value::as_str);
            let keys: Vec<&str> = node
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = Vec::new();
            for (index, item) in items.iter().enumerate() {
                let identity = match list_type {
                    Some("set") => item.clone(),
                    Some("map") => Value::Object(
                        keys.iter()
                            .filter_map(|k| item.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                            .collect(),
                    ),
                    _ => break,
                };
                if seen.contains(&identity) {
                    errors.push(FieldError {
                        field: format!("{path}[{index}]"),
                        reason: "FieldValueDuplicate".to_owned(),
                        message: format!("Duplicate value: {identity}"),
                    });
                } else {
                    seen.push(identity);
                }
            }
            if let Some(item_schema) = node.get("items") {
                for (index, item) in items.iter().enumerate() {
                    list_type_errors(item_schema, item, &format!("{path}[{index}]"), errors);
                }
            }
        }
        _ => {}
    }
}

/// A copy of `value` without object fields whose value is `null`, at any depth.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn dedup(errors: &mut Vec<FieldError>) {
    let mut seen = BTreeSet::new();
    errors.retain(|e| seen.insert((e.field.clone(), e.message.clone())));
}

/// `/spec/maps/0/name` → `spec.maps[0].name`.
fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            out = join(&out, &segment);
        }
    }
    out
}

/// Follows a dotted field path (`a.b[0].c`) into `value`.
fn lookup<'a>(value: &'a Value, field: &str) -> Option<&'a Value> {
    let mut current = value;
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let (name, indices) = part
            .split_once('[')
            .map_or((part, ""), |(n, rest)| (n, rest));
        if !name.is_empty() {
            current = current.get(name)?;
        }
        for index in indices.split('[').filter(|s| !s.is_empty()) {
            current = current.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(current)
}

/// How the API server shows a rejected value: scalars in quotes, containers by type.
fn show_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => format!("\"{n}\""),
        Value::Bool(b) => format!("\"{b}\""),
        Value::Null => "\"null\"".to_owned(),
        Value::Array(_) => "\"array\"".to_owned(),
        Value::Object(_) => "\"object\"".to_owned(),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `1.0` → `1`, so limits read like the schema author wrote them.
fn number(limit: &Value) -> String {
    match limit.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => limit.to_string(),
    }
}

fn flag(node: &Map<String, Value>, key: &str) -> bool {
    node.get(key) == Some(&Value::Bool(true))
}

fn join(base: &str, segment: &str) -> String {
    if base.is_empty() {
        segment.to_owned()
    } else {
        format!("{base}.{segment}")
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "<root>".to_owned()
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests;
