//! In-memory object storage with one global resourceVersion counter.
//!
//! ```text
//!  handlers ──put/remove(precondition)──► Store ──► objects[group-resource][(ns,name)]
//!                                           │
//!                                           ├──► history (bounded window of events)
//!                                           └──► broadcast ──► watch streams
//! ```
//!
//! Every write bumps the counter, stamps `metadata.resourceVersion`, appends an event to the
//! history window and broadcasts it. A watch starting at resourceVersion `R` replays the
//! history after `R`; if events after `R` were already dropped from the window the watch is
//! refused with `410 Gone`, exactly the situation clients must recover from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Failures of storage operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Create of an object that already exists.
    #[error("object already exists")]
    CreateExisting,
    /// Update or delete of an object that does not exist.
    #[error("object not found")]
    FindObject,
    /// The object's resourceVersion differs from the precondition.
    #[error("resourceVersion precondition failed")]
    MatchResourceVersion,
    /// The requested resourceVersion is older than the retained history.
    #[error("too old resource version: {requested} ({oldest})")]
    WatchFromCompacted {
        /// Requested version.
        requested: u64,
        /// Oldest version still servable.
        oldest: u64,
    },
}

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change in the store.
#[derive(Debug)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    /// `resource.group` of the object.
    pub gr: String,
    /// Namespace of the object (empty for cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (for deletes: the last state, with the delete's version).
    pub object: Arc<Value>,
    /// The object before the change (for selector transitions).
    pub prev: Option<Arc<Value>>,
}

/// What a write expects of the stored object.
#[derive(Debug, Clone, Copy)]
pub enum Precondition {
    /// The object must not exist.
    Absent,
    /// The object must exist (any version).
    Exists,
    /// The object must exist with this resourceVersion.
    Version(u64),
}

type Key = (String, String);

/// Events to replay and a receiver for the live ones.
pub type WatchStart = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

struct Inner {
    rv: u64,
    objects: HashMap<String, BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Arc<Event>>,
    /// Watches from a version lower than this get 410.
    compacted: u64,
}

/// The object store.
pub struct Store {
    inner: Mutex<Inner>,
    history_limit: usize,
    tx: broadcast::Sender<Arc<Event>>,
}

/// The resourceVersion stored in an object, 0 if absent.
pub fn rv_of(obj: &Value) -> u64 {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn key_of(obj: &Value) -> Key {
    let get = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (get("/metadata/namespace"), get("/metadata/name"))
}

impl Store {
    /// An empty store keeping `history_limit` events for watches.
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(16384);
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                compacted: 1,
            }),
            history_limit,
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current global resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, gr: &str, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.lock()
            .objects
            .get(gr)
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// All objects of a resource (in one namespace if given), sorted by namespace and name,
    /// and the resourceVersion of the snapshot.
    pub fn list(&self, gr: &str, namespace: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let items = match inner.objects.get(gr) {
            None => Vec::new(),
            Some(m) => match namespace {
                None => m.values().cloned().collect(),
                Some(ns) => m
                    .range((ns.to_string(), String::new())..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, v)| v.clone())
                    .collect(),
            },
        };
        (items, inner.rv)
    }

    /// Every resource key holding at least one object.
    pub fn resources(&self) -> Vec<String> {
        self.lock()
            .objects
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Writes `obj` (create or update), stamping a new resourceVersion.
    pub fn put(
        &self,
        gr: &str,
        mut obj: Value,
        pre: Precondition,
    ) -> Result<Arc<Value>, StoreError> {
        let key = key_of(&obj);
        let mut inner = self.lock();
        let prev = inner.objects.get(gr).and_then(|m| m.get(&key)).cloned();
        match (pre, &prev) {
            (Precondition::Absent, Some(_)) => return Err(StoreError::CreateExisting),
            (Precondition::Exists | Precondition::Version(_), None) => {
                return Err(StoreError::FindObject);
            }
            (Precondition::Version(v), Some(p)) if rv_of(p) != v => {
                return Err(StoreError::MatchResourceVersion);
            }
            _ => {}
        }
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = Arc::new(obj);
        inner
            .objects
            .entry(gr.to_string())
            .or_default()
            .insert(key.clone(), obj.clone());
        let kind = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(&mut inner, gr, key.0, kind, obj.clone(), prev);
        Ok(obj)
    }

    /// Removes an object; the returned copy carries the delete's resourceVersion.
    pub fn remove(
        &self,
        gr: &str,
        namespace: &str,
        name: &str,
        pre: Precondition,
    ) -> Result<Arc<Value>, StoreError> {
        self.remove_as(gr, namespace, name, pre, None)
    }

    /// Like [`Store::remove`], but the DELETED event carries `last` (e.g. the object with
    /// its final finalizer removed) instead of the stored state.
    pub fn remove_as(
        &self,
        gr: &str,
        namespace: &str,
        name: &str,
        pre: Precondition,
        last: Option<Value>,
    ) -> Result<Arc<Value>, StoreError> {
        let key = (namespace.to_string(), name.to_string());
        let mut inner = self.lock();
        let prev = inner
            .objects
            .get(gr)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or(StoreError::FindObject)?;
        if let Precondition::Version(v) = pre
            && rv_of(&prev) != v
        {
            return Err(StoreError::MatchResourceVersion);
        }
        if let Some(m) = inner.objects.get_mut(gr) {
            m.remove(&key);
        }
        inner.rv += 1;
        let mut last = last.unwrap_or_else(|| (*prev).clone());
        last["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let last = Arc::new(last);
        self.record(
            &mut inner,
            gr,
            key.0,
            EventType::Deleted,
            last.clone(),
            Some(prev),
        );
        Ok(last)
    }

    fn record(
        &self,
        inner: &mut Inner,
        gr: &str,
        namespace: String,
        kind: EventType,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        let ev = Arc::new(Event {
            rv: inner.rv,
            gr: gr.to_string(),
            namespace,
            kind,
            object,
            prev,
        });
        inner.history.push_back(ev.clone());
        while inner.history.len() > self.history_limit {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(ev);
    }

    /// Starts a watch after resourceVersion `from`: the retained events after it, and a
    /// receiver for everything that follows (no gap, no duplicate below the backlog's end).
    pub fn watch_from(&self, from: u64) -> Result<WatchStart, StoreError> {
        let inner = self.lock();
        if from < inner.compacted {
            return Err(StoreError::WatchFromCompacted {
                requested: from,
                oldest: inner.compacted,
            });
        }
        let backlog = inner
            .history
            .iter()
            .filter(|e| e.rv > from)
            .cloned()
            .collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// Whether a continue token or watch at `rv` is still servable.
    pub fn is_compacted(&self, rv: u64) -> bool {
        rv < self.lock().compacted
    }

    /// Forgets all history: every watch or continue token from an older version now gets
    /// `410 Gone`, as after an etcd compaction.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.compacted = inner.rv;
    }

    /// Number of stored objects.
    pub fn len(&self) -> usize {
        self.lock().objects.values().map(BTreeMap::len).sum()
    }

    /// Whether the store holds no objects.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": ""}})
    }

    #[test]
    fn every_write_gets_a_higher_resource_version_and_stale_writes_are_refused() {
        let s = Store::new(100);
        let a = s
            .put("nodes", obj("a"), Precondition::Absent)
            .expect("create");
        let b = s
            .put("nodes", obj("b"), Precondition::Absent)
            .expect("create");
        assert!(rv_of(&b) > rv_of(&a));
        assert!(matches!(
            s.put("nodes", obj("a"), Precondition::Absent),
            Err(StoreError::CreateExisting)
        ));
        assert!(matches!(
            s.put("nodes", obj("a"), Precondition::Version(rv_of(&a) + 100)),
            Err(StoreError::MatchResourceVersion)
        ));
    }

    #[test]
    fn watch_from_a_compacted_version_is_refused_but_recent_ones_replay() {
        let s = Store::new(2);
        for n in ["a", "b", "c", "d"] {
            s.put("nodes", obj(n), Precondition::Absent)
                .expect("create");
        }
        let now = s.current_rv();
        let (backlog, _) = s.watch_from(now - 1).expect("recent");
        assert_eq!(backlog.len(), 1);
        assert!(matches!(
            s.watch_from(1),
            Err(StoreError::WatchFromCompacted { .. })
        ));
    }
}
