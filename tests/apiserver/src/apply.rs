//! Server-side apply and `managedFields` bookkeeping.
//!
//! A field set is a set of paths in FieldsV1 notation (`f:spec`, `k:{"name":"a"}`,
//! `v:"x"`). Every write records which manager set which leaf fields:
//!
//! ```text
//!  create/update/patch ──► record_update: changed leaves → (manager, Update); others lose them
//!  apply ──► conflicts? (another manager owns a leaf with a different value) ──► 409 / force
//!        └─► merge the applied config, drop leaves this manager applied before and no
//!            longer applies (if nobody else owns them), then (manager, Apply) = applied set
//! ```
//!
//! Lists of objects with a merge key (see [`crate::patch::merge_key`]) are merged item by
//! item; other lists are atomic leaves; `metadata.finalizers` is a set.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::patch::merge_key;

/// Failures of server-side apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Another manager owns fields the request sets to different values.
    #[error("Apply failed with {} conflict{}: {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|c| format!("conflict with \"{}\"{}: {}", c.manager, c.using, c.field)).collect::<Vec<_>>().join("; "))]
    ResolveConflicts(Vec<Conflict>),
    /// The applied configuration is not an object.
    #[error("the applied configuration must be a JSON or YAML object")]
    ParseApplied,
}

/// One field owned by another manager with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// ` using <apiVersion>` for Update managers, empty for appliers.
    pub using: String,
    /// Human path such as `.spec.replicas`.
    pub field: String,
}

type Path = Vec<String>;
type FieldSet = BTreeSet<Path>;

/// Who wrote a request, as recorded in `managedFields`.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    /// Field manager name.
    pub manager: &'a str,
    /// `status` for the status subresource, empty otherwise.
    pub subresource: &'a str,
    /// apiVersion of the request.
    pub api_version: &'a str,
    /// RFC 3339 time of the write.
    pub time: &'a str,
    /// Whether status is a separate subresource of this resource.
    pub has_status: bool,
}

const SYSTEM_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

fn tracked(top: &str, key: &str, w: &Writer<'_>) -> bool {
    if matches!(top, "apiVersion" | "kind") {
        return false;
    }
    if top == "metadata" && SYSTEM_META.contains(&key) {
        return false;
    }
    if !w.has_status {
        return true;
    }
    if w.subresource == "status" {
        top == "status"
    } else {
        top != "status"
    }
}

fn key_segment(item: &Value, key: &str) -> String {
    let mut m = Map::new();
    if let Some(v) = item.get(key) {
        m.insert(key.to_string(), v.clone());
    }
    format!("k:{}", Value::Object(m))
}

fn collect(value: &Value, prefix: &mut Path, out: &mut FieldSet) {
    let Value::Object(map) = value else {
        out.insert(prefix.clone());
        return;
    };
    for (k, v) in map {
        prefix.push(format!("f:{k}"));
        match v {
            Value::Object(inner) if !inner.is_empty() => collect(v, prefix, out),
            Value::Array(items) => {
                if let Some(key) = merge_key(k, items.first())
                    .filter(|key| items.iter().all(|i| i.get(*key).is_some()))
                {
                    for item in items {
                        prefix.push(key_segment(item, key));
                        out.insert(prefix.clone());
                        collect(item, prefix, out);
                        prefix.pop();
                    }
                } else if k == "finalizers" {
                    for item in items {
                        prefix.push(format!("v:{item}"));
                        out.insert(prefix.clone());
                        prefix.pop();
                    }
                } else {
                    out.insert(prefix.clone());
                }
            }
            _ => {
                out.insert(prefix.clone());
            }
        }
        prefix.pop();
    }
}

/// The tracked leaf paths of an object.
fn field_set(obj: &Value, w: &Writer<'_>) -> FieldSet {
    let mut out = FieldSet::new();
    let Value::Object(map) = obj else {
        return out;
    };
    for (top, v) in map {
        if let (Value::Object(inner), "metadata") = (v, top.as_str()) {
            for (k, mv) in inner {
                if tracked(top, k, w) {
                    let mut p = vec!["f:metadata".to_string()];
                    collect(&json!({ k: mv }), &mut p, &mut out);
                }
            }
        } else if tracked(top, "", w) {
            let mut p = Vec::new();
            collect(&json!({ top: v }), &mut p, &mut out);
        }
    }
    out
}

fn step<'v>(cur: &'v Value, seg: &str) -> Option<&'v Value> {
    if let Some(f) = seg.strip_prefix("f:") {
        return cur.get(f);
    }
    let items = cur.as_array()?;
    if let Some(k) = seg.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(k).ok()?;
        return items
            .iter()
            .find(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)));
    }
    if let Some(v) = seg.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        return items.iter().find(|i| **i == want);
    }
    None
}

fn value_at<'v>(obj: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(obj, |cur, seg| step(cur, seg))
}

fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for seg in parent_path {
        let next = if let Some(f) = seg.strip_prefix("f:") {
            cur.get_mut(f)
        } else {
            let idx = step(cur, seg).and_then(|found| {
                cur.as_array()
                    .and_then(|a| a.iter().position(|i| std::ptr::eq(i, found)))
            });
            match (idx, cur.as_array_mut()) {
                (Some(i), Some(a)) => a.get_mut(i),
                _ => None,
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Value::Object(m) = cur {
            m.remove(f);
        }
    } else if let Some(found) = step(cur, last).map(|v| v as *const Value)
        && let Value::Array(a) = cur
    {
        a.retain(|i| !std::ptr::eq(i, found));
    }
}

/// `.spec.containers[name="a"].image` for messages.
fn human(path: &[String]) -> String {
    let mut s = String::new();
    for seg in path {
        if let Some(f) = seg.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = seg.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = seg.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for seg in path {
            let entry = cur
                .entry(seg.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else { break };
            cur = next;
        }
    }
    // Mark owned list items that also have owned children with ".".
    fn mark(node: &mut Map<String, Value>, prefix: &mut Path, set: &FieldSet) {
        for (k, v) in node.iter_mut() {
            prefix.push(k.clone());
            if let Value::Object(child) = v
                && !child.is_empty()
            {
                mark(child, prefix, set);
                if set.contains(prefix) {
                    child.insert(".".into(), json!({}));
                }
            }
            prefix.pop();
        }
    }
    mark(&mut root, &mut Vec::new(), set);
    Value::Object(root)
}

fn from_fields_v1(v: &Value, prefix: &mut Path, out: &mut FieldSet) {
    let Value::Object(m) = v else { return };
    if m.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
        return;
    }
    for (k, child) in m {
        if k == "." {
            out.insert(prefix.clone());
            continue;
        }
        prefix.push(k.clone());
        from_fields_v1(child, prefix, out);
        prefix.pop();
    }
}

#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: String,
    fields: FieldSet,
}

fn read_entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let s = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let mut fields = FieldSet::new();
            if let Some(f) = e.get("fieldsV1") {
                from_fields_v1(f, &mut Vec::new(), &mut fields);
            }
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                subresource: s("subresource"),
                fields,
            }
        })
        .collect()
}

fn write_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Value::Object(meta) = &mut obj["metadata"] {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

fn entry_for<'e>(entries: &'e mut Vec<Entry>, w: &Writer<'_>, operation: &str) -> &'e mut Entry {
    let pos = entries.iter().position(|e| {
        e.manager == w.manager && e.operation == operation && e.subresource == w.subresource
    });
    let i = match pos {
        Some(i) => i,
        None => {
            entries.push(Entry {
                manager: w.manager.to_string(),
                operation: operation.to_string(),
                api_version: w.api_version.to_string(),
                time: w.time.to_string(),
                subresource: w.subresource.to_string(),
                fields: FieldSet::new(),
            });
            entries.len() - 1
        }
    };
    let e = &mut entries[i];
    e.time = w.time.to_string();
    e.api_version = w.api_version.to_string();
    e
}

/// Records a non-apply write (`old` → `new`) in `new`'s managedFields: the leaves it changed
/// now belong to the writer's `Update` entry and no longer to anyone else.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer<'_>) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let new_set = field_set(new, w);
    let old_set = old.map(|o| field_set(o, w)).unwrap_or_default();
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
    for e in entries.iter_mut() {
        e.fields
            .retain(|p| !changed.contains(p) && !removed.iter().any(|r| p.starts_with(r)));
    }
    if !changed.is_empty() {
        entry_for(&mut entries, w, "Update").fields.extend(changed);
    }
    write_entries(new, entries);
}

fn merge_applied(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                match (t.get_mut(k), v) {
                    (_, Value::Null) => {
                        t.remove(k);
                    }
                    (Some(tv @ Value::Object(_)), Value::Object(_)) => merge_applied(tv, v),
                    (Some(Value::Array(existing)), Value::Array(items)) => {
                        let key = merge_key(k, items.first())
                            .filter(|key| items.iter().all(|i| i.get(*key).is_some()));
                        if let Some(key) = key {
                            for item in items {
                                match existing.iter_mut().find(|e| e.get(key) == item.get(key)) {
                                    Some(e) => merge_applied(e, item),
                                    None => existing.push(item.clone()),
                                }
                            }
                        } else if k == "finalizers" {
                            for item in items {
                                if !existing.contains(item) {
                                    existing.push(item.clone());
                                }
                            }
                        } else {
                            *existing = items.clone();
                        }
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// Server-side apply of `applied` by `w` onto `existing` (or a new object). Returns the
/// merged object with updated managedFields, or the conflicts when `force` is false.
pub fn apply(
    existing: Option<&Value>,
    applied: &Value,
    w: &Writer<'_>,
    force: bool,
) -> Result<Value, ApplyError> {
    if !applied.is_object() {
        return Err(ApplyError::ParseApplied);
    }
    let applied_set = field_set(applied, w);
    let mut entries = existing.map(read_entries).unwrap_or_default();
    let mut conflicts = Vec::new();
    let mut conflicting = FieldSet::new();
    if let Some(old) = existing {
        for e in entries.iter().filter(|e| {
            !(e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource)
        }) {
            for p in applied_set.intersection(&e.fields) {
                if p.last().is_some_and(|s| s.starts_with("k:")) {
                    continue;
                }
                if value_at(old, p) != value_at(applied, p) {
                    conflicting.insert(p.clone());
                    conflicts.push(Conflict {
                        manager: e.manager.clone(),
                        using: if e.operation == "Update" {
                            format!(" using {}", e.api_version)
                        } else {
                            String::new()
                        },
                        field: human(p),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(ApplyError::ResolveConflicts(conflicts));
    }
    let mut result = existing.cloned().unwrap_or_else(|| json!({}));
    // Leaves this manager applied before, no longer applies, and nobody else owns: remove.
    let previous: FieldSet = entries
        .iter()
        .find(|e| {
            e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource
        })
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: FieldSet = entries
        .iter()
        .filter(|e| {
            !(e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource)
        })
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut dropped: Vec<&Path> = previous
        .iter()
        .filter(|p| !applied_set.contains(*p) && !others.contains(*p))
        .collect();
    // Shortest first: a list item nobody owns any more goes whole (its key fields included),
    // instead of field by field, which would lose the key that finds the item.
    dropped.sort_by_key(|p| p.len());
    let mut gone: Vec<&Path> = Vec::new();
    for p in dropped {
        if gone.iter().any(|g| p.starts_with(g)) {
            continue;
        }
        remove_path(&mut result, p);
        gone.push(p);
    }
    let mut to_merge = applied.clone();
    if let Value::Object(m) = &mut to_merge {
        if w.has_status {
            if w.subresource == "status" {
                m.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind");
            } else {
                m.remove("status");
            }
        }
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
        }
    }
    merge_applied(&mut result, &to_merge);
    for e in entries.iter_mut() {
        e.fields.retain(|p| !conflicting.contains(p));
    }
    entry_for(&mut entries, w, "Apply").fields = applied_set;
    write_entries(&mut result, entries);
    Ok(result)
}

/// The managers recorded in an object's managedFields, with their operation.
pub fn managers(obj: &Value) -> BTreeMap<String, String> {
    read_entries(obj)
        .into_iter()
        .map(|e| (e.manager, e.operation))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            subresource: "",
            api_version: "apps/v1",
            time: "2026-01-01T00:00:00Z",
            has_status: true,
        }
    }

    #[test]
    fn a_second_manager_setting_a_different_value_conflicts_unless_forced() {
        let a = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}});
        let first = apply(None, &a, &writer("alice"), false).expect("first apply");
        let b = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 3}});
        let err = apply(Some(&first), &b, &writer("bob"), false).expect_err("conflict");
        assert!(
            err.to_string()
                .contains("conflict with \"alice\": .spec.replicas"),
            "{err}"
        );
        let forced = apply(Some(&first), &b, &writer("bob"), true).expect("forced");
        assert_eq!(forced["spec"]["replicas"], 3);
        assert_eq!(
            managers(&forced).get("bob").map(String::as_str),
            Some("Apply")
        );
        assert!(!managers(&forced).contains_key("alice"));
    }

    #[test]
    fn fields_a_manager_stops_applying_are_removed_but_shared_ones_stay() {
        let a = json!({"metadata": {"name": "d", "labels": {"x": "1", "y": "2"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let first = apply(None, &a, &writer("alice"), false).expect("apply");
        let fv1 = &first["metadata"]["managedFields"][0]["fieldsV1"];
        assert!(
            fv1["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["."].is_object(),
            "{fv1}"
        );
        let second = json!({"metadata": {"name": "d", "labels": {"x": "1"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let out = apply(Some(&first), &second, &writer("alice"), false).expect("apply");
        assert_eq!(out["metadata"]["labels"], json!({"x": "1"}));
    }

    #[test]
    fn a_list_item_a_manager_stops_applying_is_removed_whole() {
        let cond = |t: &str| json!({"type": t, "status": "True", "reason": "R"});
        let a = json!({"metadata": {"name": "d"}, "spec": {"conditions": [cond("A"), cond("B")]}});
        let first = apply(None, &a, &writer("alice"), false).expect("apply");
        let second = json!({"metadata": {"name": "d"}, "spec": {"conditions": [cond("A")]}});
        let out = apply(Some(&first), &second, &writer("alice"), false).expect("apply");
        assert_eq!(out["spec"]["conditions"], json!([cond("A")]));
    }
}
