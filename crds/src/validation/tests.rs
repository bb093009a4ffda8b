//! Unit tests of the schema rewrite, pruning, defaulting and error shaping.

use serde_json::json;

use super::*;

fn validator(schema: Value) -> SchemaValidator {
    SchemaValidator::from_schema("widgets.example.io", schema).expect("schema compiles")
}

#[test]
fn nullable_becomes_a_type_union_with_null() {
    let out = rewrite_schema(&json!({"type": "string", "nullable": true}));
    assert_eq!(out, json!({"type": ["string", "null"]}));
}

#[test]
fn a_nullable_enum_also_accepts_null() {
    let out = rewrite_schema(&json!({"type": "string", "enum": ["a"], "nullable": true}));
    assert_eq!(out["enum"], json!(["a", null]));
}

#[test]
fn int_or_string_becomes_any_of_integer_or_string() {
    let out = rewrite_schema(&json!({"x-kubernetes-int-or-string": true, "description": "d"}));
    assert_eq!(
        out,
        json!({"anyOf": [{"type": "integer"}, {"type": "string"}]})
    );
}

#[test]
fn declared_objects_refuse_extra_fields_unless_they_preserve_unknown_fields() {
    let closed =
        rewrite_schema(&json!({"type": "object", "properties": {"a": {"type": "string"}}}));
    assert_eq!(closed["additionalProperties"], json!(false));
    let open = rewrite_schema(&json!({
        "type": "object", "x-kubernetes-preserve-unknown-fields": true,
        "properties": {"a": {"type": "string"}}
    }));
    assert!(open.get("additionalProperties").is_none());
}

#[test]
fn kubernetes_extensions_are_dropped_recursively() {
    let out = rewrite_schema(&json!({
        "type": "object",
        "x-kubernetes-validations": [{"rule": "true"}],
        "properties": {"l": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}
    }));
    let text = out.to_string();
    assert!(!text.contains("x-kubernetes"), "{text}");
    assert_eq!(out["properties"]["l"]["items"], json!({"type": "string"}));
}

#[test]
fn a_schema_node_without_type_is_refused_as_not_structural() {
    let err = SchemaValidator::from_schema(
        "widgets.example.io",
        json!({"type": "object", "properties": {"spec": {"properties": {}}}}),
    )
    .expect_err("not structural");
    let text = err.to_string();
    assert!(text.contains("not structural at spec"), "{text}");
    assert!(text.contains("type must be specified"), "{text}");
}

#[test]
fn a_cel_rule_that_does_not_compile_is_refused_with_its_path() {
    let err = SchemaValidator::from_schema(
        "widgets.example.io",
        json!({"type": "object", "properties": {"spec": {
            "type": "object",
            "x-kubernetes-validations": [{"rule": "self.a >"}],
            "properties": {"a": {"type": "integer"}}
        }}}),
    )
    .expect_err("rule does not compile");
    assert!(
        matches!(&err, SchemaError::CompileRule { path, .. } if path == "spec"),
        "{err}"
    );
}

#[test]
fn pruning_drops_unknown_fields_but_keeps_root_metadata_and_preserved_objects() {
    let v = validator(json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "a": {"type": "string"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "list": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}}
        }}
    }}));
    let mut obj = json!({
        "apiVersion": "example.io/v1", "kind": "Widget",
        "metadata": {"name": "w", "labels": {"a": "b"}, "bogus": 1},
        "spec": {"a": "x", "b": "gone", "free": {"anything": [1]}, "list": [{"x": 1, "y": 2}]},
        "extra": true
    });
    v.prune(&mut obj);
    assert_eq!(
        obj,
        json!({
            "apiVersion": "example.io/v1", "kind": "Widget",
            "metadata": {"name": "w", "labels": {"a": "b"}},
            "spec": {"a": "x", "free": {"anything": [1]}, "list": [{"x": 1}]}
        })
    );
}

#[test]
fn defaults_apply_inside_objects_that_were_just_defaulted() {
    let v = validator(json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "outer": {"type": "object", "default": {}, "properties": {
                "inner": {"type": "integer", "default": 7},
                "keep": {"type": "string", "default": "k"}
            }},
            "n": {"type": "integer", "default": 3}
        }}
    }}));
    let mut obj = json!({"spec": {"n": null}});
    v.apply_defaults(&mut obj);
    assert_eq!(
        obj,
        json!({"spec": {"n": 3, "outer": {"inner": 7, "keep": "k"}}})
    );
}

#[test]
fn a_missing_required_field_is_reported_at_its_own_path() {
    let v = validator(json!({"type": "object", "properties": {
        "spec": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    }}));
    let errors = v.validate(&json!({"spec": {}}), None).expect_err("invalid");
    assert_eq!(
        errors,
        vec![FieldError {
            field: "spec.name".into(),
            reason: "FieldValueRequired".into(),
            message: "Required value".into()
        }]
    );
}

#[test]
fn array_positions_appear_in_brackets_in_the_field_path() {
    let v = validator(json!({"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}
    }}));
    let errors = v
        .validate(&json!({"items": [{"n": 1}, {"n": 0}]}), None)
        .expect_err("invalid");
    assert_eq!(errors[0].field, "items[1].n");
    assert!(
        errors[0].message.contains("greater than or equal to 1"),
        "{}",
        errors[0].message
    );
}

#[test]
fn a_cel_rule_on_metadata_name_at_the_root_is_evaluated() {
    let v = validator(json!({
        "type": "object",
        "x-kubernetes-validations": [{"rule": "self.metadata.name == 'only'", "message": "name must be only", "fieldPath": ".metadata.name"}],
        "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}
    }));
    assert!(
        v.validate(&json!({"metadata": {"name": "only"}, "spec": {}}), None)
            .is_ok()
    );
    let errors = v
        .validate(&json!({"metadata": {"name": "other"}, "spec": {}}), None)
        .expect_err("invalid");
    assert_eq!(errors[0].field, "metadata.name");
    assert_eq!(
        errors[0].message,
        "Invalid value: \"other\": name must be only"
    );
}

#[test]
fn field_paths_convert_from_json_pointers() {
    assert_eq!(pointer_to_field("/spec/maps/0/name"), "spec.maps[0].name");
    assert_eq!(pointer_to_field(""), "");
    assert_eq!(lookup(&json!({"a": [{"b": 5}]}), "a[0].b"), Some(&json!(5)));
}

#[test]
fn the_validator_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<SchemaValidator>();
}

#[test]
fn a_rule_over_an_unbounded_list_is_reported_by_the_rule_analysis() {
    let unbounded = validator(json!({"type": "object", "properties": {
        "l": {"type": "array", "items": {"type": "string"},
              "x-kubernetes-validations": [{"rule": "self.all(x, self.all(y, x != y || true))"}]}
    }}));
    assert!(
        !unbounded.rule_warnings().is_empty(),
        "an unbounded nested comprehension is flagged"
    );
    let bounded = validator(json!({"type": "object", "properties": {
        "l": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 8},
              "x-kubernetes-validations": [{"rule": "self.all(x, x != '')"}]}
    }}));
    assert_eq!(bounded.rule_warnings(), Vec::<String>::new());
}

#[test]
fn a_set_with_a_repeated_item_is_refused_at_the_repeat() {
    let v = validator(json!({"type": "object", "properties": {
        "s": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}
    }}));
    assert!(v.validate(&json!({"s": ["a", "b"]}), None).is_ok());
    let errors = v
        .validate(&json!({"s": ["a", "b", "a"]}), None)
        .expect_err("duplicate");
    assert_eq!(errors[0].field, "s[2]");
    assert_eq!(errors[0].message, "Duplicate value: \"a\"");
}

#[test]
fn a_pattern_the_crd_declares_on_metadata_name_is_enforced() {
    let v = validator(json!({"type": "object", "properties": {
        "metadata": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^web-"}}}
    }}));
    assert!(
        v.validate(&json!({"metadata": {"name": "web-1", "uid": "u"}}), None)
            .is_ok()
    );
    let errors = v
        .validate(&json!({"metadata": {"name": "db-1"}}), None)
        .expect_err("pattern");
    assert_eq!(errors[0].field, "metadata.name");
}
