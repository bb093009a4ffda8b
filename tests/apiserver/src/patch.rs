//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge
//! patch for the built-in kinds Meshlet uses.
//!
//! Strategic merge patch merges lists of objects by their merge key (containers and env by
//! `name`, conditions by `type`, ...; see [`merge_key`]) and understands the `$patch`,
//! `$setElementOrder`, `$retainKeys` and `$deleteFromPrimitiveList` directives.

use serde_json::{Map, Value};

/// Failures of applying a patch.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The JSON patch document is not a list of operations.
    #[error("invalid JSON patch: {0}")]
    ParseJsonPatch(String),
    /// A JSON patch operation cannot be applied.
    #[error("the JSON patch operation {index} ({op} {path}) failed: {reason}")]
    ApplyJsonPatchOp {
        /// Position of the operation.
        index: usize,
        /// Operation name.
        op: String,
        /// Target pointer.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// A strategic merge patch is malformed.
    #[error("invalid strategic merge patch: {0}")]
    ApplyStrategicPatch(String),
}

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    if path.is_empty() {
        return Err("the root cannot be the target".into());
    }
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("'{path}' is not a JSON pointer"))?;
    Ok((parent.to_string(), unescape(last)))
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let (parent, last) = split_pointer(path)?;
    let container = doc
        .pointer_mut(&parent)
        .ok_or_else(|| format!("missing path '{parent}'"))?;
    match container {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last.parse().map_err(|_| format!("bad index '{last}'"))?;
            if i > a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("'{parent}' is not a container")),
    }
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let container = doc
        .pointer_mut(&parent)
        .ok_or_else(|| format!("missing path '{parent}'"))?;
    match container {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("missing value at '{path}'")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("bad index '{last}'"))?;
            if i >= a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("'{parent}' is not a container")),
    }
}

/// RFC 6902 JSON patch. The document is unchanged if any operation fails.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::ParseJsonPatch("expected a JSON array of operations".into()))?;
    let mut doc = target.clone();
    for (index, op) in ops.iter().enumerate() {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        let fail = |reason: String| PatchError::ApplyJsonPatchOp {
            index,
            op: name.to_string(),
            path: path.to_string(),
            reason,
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| fail("missing value".into()))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| fail("missing from".into()))
        };
        match name {
            "add" => add_at(&mut doc, path, value()?).map_err(fail)?,
            "remove" => {
                remove_at(&mut doc, path).map_err(fail)?;
            }
            "replace" => {
                let v = value()?;
                let slot = doc
                    .pointer_mut(path)
                    .ok_or_else(|| fail(format!("missing value at '{path}'")))?;
                *slot = v;
            }
            "move" => {
                let v = remove_at(&mut doc, from()?).map_err(fail)?;
                add_at(&mut doc, path, v).map_err(fail)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| fail("missing from value".into()))?;
                add_at(&mut doc, path, v).map_err(fail)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(fail("test failed: values differ".into()));
                }
            }
            other => return Err(fail(format!("unknown operation '{other}'"))),
        }
    }
    *target = doc;
    Ok(())
}

/// The key that identifies items of the list field `field` (for strategic merge and
/// server-side apply), given a sample item. `None` means the list is atomic.
pub fn merge_key(field: &str, sample: Option<&Value>) -> Option<&'static str> {
    let has = |k: &str| sample.and_then(|s| s.get(k)).is_some();
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => Some("name"),
        "volumeMounts" | "volumeDevices" => Some("mountPath"),
        "conditions" => Some("type"),
        "ownerReferences" => Some("uid"),
        "ports" if has("containerPort") => Some("containerPort"),
        "ports" if has("port") => Some("port"),
        "hostAliases" => Some("ip"),
        "topologySpreadConstraints" => Some("topologyKey"),
        _ => None,
    }
}

/// Lists of scalars that strategic merge treats as sets.
fn is_primitive_set(field: &str) -> bool {
    matches!(field, "finalizers")
}

/// Strategic merge patch of `patch` into `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        return Err(PatchError::ApplyStrategicPatch(
            "the patch must be a JSON object".into(),
        ));
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = p.clone();
        clean.remove("$patch");
        *target = Value::Object(clean);
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => {
                if v.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                } else {
                    strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v)?;
                }
            }
            Value::Array(items) => {
                let key = merge_key(k, items.first());
                match (key, t.get_mut(k)) {
                    (Some(key), Some(Value::Array(existing))) => {
                        merge_keyed_list(existing, items, key)?;
                    }
                    (None, Some(Value::Array(existing))) if is_primitive_set(k) => {
                        for item in items {
                            if !existing.contains(item) {
                                existing.push(item.clone());
                            }
                        }
                    }
                    _ => {
                        let clean: Vec<Value> = items
                            .iter()
                            .filter(|i| i.get("$patch").is_none())
                            .cloned()
                            .collect();
                        t.insert(k.clone(), Value::Array(clean));
                    }
                }
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    Ok(())
}

fn merge_keyed_list(
    existing: &mut Vec<Value>,
    items: &[Value],
    key: &str,
) -> Result<(), PatchError> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *existing = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        return Ok(());
    }
    for item in items {
        let id = item.get(key).cloned().ok_or_else(|| {
            PatchError::ApplyStrategicPatch(format!("list item lacks its merge key '{key}'"))
        })?;
        let pos = existing.iter().position(|e| e.get(key) == Some(&id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut existing[i], item)?,
            (None, false) => {
                let mut fresh = Value::Null;
                strategic_merge(&mut fresh, item)?;
                existing.push(fresh);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2}, "l": [3]}));
    }

    #[test]
    fn json_patch_is_all_or_nothing() {
        let mut doc = json!({"a": [1]});
        let bad = json!([{"op": "add", "path": "/a/-", "value": 2}, {"op": "test", "path": "/a/0", "value": 9}]);
        assert!(json_patch(&mut doc, &bad).is_err());
        assert_eq!(doc, json!({"a": [1]}));
        json_patch(
            &mut doc,
            &json!([{"op": "add", "path": "/a/-", "value": 2}]),
        )
        .expect("patch");
        assert_eq!(doc, json!({"a": [1, 2]}));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_deletes_by_directive() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "a:2"}, {"name": "b", "$patch": "delete"}, {"name": "c", "image": "c:1"}]}});
        strategic_merge(&mut pod, &patch).expect("patch");
        assert_eq!(
            pod,
            json!({"spec": {"containers": [{"name": "a", "image": "a:2"}, {"name": "c", "image": "c:1"}]}})
        );
    }
}
