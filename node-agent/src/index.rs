//! The desired-state index: merges the snapshots of every source into the one state the
//! loader applies.
//!
//! ```text
//!  SourceUpdate ─► Index::update ─► (all sources synced?) ─► desired() ─► Dataplane::apply
//!  Dataplane::observed ─► Index::new (what the maps hold after a restart)
//! ```
//!
//! Until every expected source has delivered one good snapshot, [`Index::desired`] returns
//! `None`: nothing is applied, so no entry is removed before its source was read. An invalid
//! update keeps that source's last good snapshot.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::DesiredState;
use crate::source::{SourceEvent, SourceUpdate};

/// What an update changed in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The merged desired state changed (or became known); apply it.
    Apply(DesiredState),
    /// Nothing to apply (same state, or not every source synced yet).
    Unchanged,
    /// The source reported a problem; its last good snapshot stays in force.
    Refused(String),
}

/// Merged desired state over named sources.
#[derive(Debug, Clone)]
pub struct Index {
    expected: BTreeSet<&'static str>,
    snapshots: BTreeMap<&'static str, DesiredState>,
    observed: DesiredState,
    last_applied: Option<DesiredState>,
    last_error: Option<String>,
}

impl Index {
    /// An index waiting for `expected` sources, starting from what the maps hold.
    pub fn new(expected: impl IntoIterator<Item = &'static str>, observed: DesiredState) -> Self {
        Self {
            expected: expected.into_iter().collect(),
            snapshots: BTreeMap::new(),
            observed,
            last_applied: None,
            last_error: None,
        }
    }

    /// True once every expected source delivered a good snapshot.
    pub fn synced(&self) -> bool {
        self.expected.iter().all(|s| self.snapshots.contains_key(s))
    }

    /// The state read back from the maps at start-up.
    pub fn observed(&self) -> &DesiredState {
        &self.observed
    }

    /// Last problem reported by a source, cleared by its next good snapshot.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The merged state, once every source synced. On a frontend defined by several
    /// sources, the source whose name sorts first wins.
    pub fn desired(&self) -> Option<DesiredState> {
        if !self.synced() {
            return None;
        }
        let mut merged = DesiredState::default();
        for snap in self.snapshots.values() {
            for (key, backends) in &snap.services {
                merged
                    .services
                    .entry(*key)
                    .or_insert_with(|| backends.clone());
            }
        }
        Some(merged)
    }

    /// Record an update and say what to do.
    pub fn update(&mut self, update: SourceUpdate) -> Change {
        match update.event {
            SourceEvent::Invalid(msg) => {
                self.last_error = Some(msg.clone());
                Change::Refused(msg)
            }
            SourceEvent::Snapshot(state) => {
                self.last_error = None;
                self.snapshots.insert(update.source, state);
                match self.desired() {
                    None => Change::Unchanged,
                    Some(d) => {
                        let before = self.last_applied.as_ref().unwrap_or(&self.observed);
                        if self.last_applied.is_some() && before == &d {
                            Change::Unchanged
                        } else {
                            Change::Apply(d)
                        }
                    }
                }
            }
        }
    }

    /// Record that `state` is now in the maps.
    pub fn applied(&mut self, state: DesiredState) {
        self.last_applied = Some(state);
    }

    /// Forget the last applied state so the next snapshot is applied again (after a failed apply).
    pub fn apply_failed(&mut self) {
        self.last_applied = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol, ServiceKey};

    fn state(vip: [u8; 4], port: u16, backend_port: u16) -> DesiredState {
        let mut s = DesiredState::default();
        s.services.insert(
            ServiceKey {
                vip: vip.into(),
                port,
                protocol: Protocol::Tcp,
            },
            vec![Backend {
                addr: [127, 0, 0, 1].into(),
                port: backend_port,
                weight: 1,
            }],
        );
        s
    }

    fn snap(source: &'static str, s: DesiredState) -> SourceUpdate {
        SourceUpdate {
            source,
            event: SourceEvent::Snapshot(s),
        }
    }

    #[test]
    fn nothing_is_applied_before_every_source_synced() {
        let mut idx = Index::new(["a", "b"], state([127, 100, 0, 1], 80, 1));
        assert_eq!(
            idx.update(snap("a", DesiredState::default())),
            Change::Unchanged
        );
        assert!(!idx.synced());
        assert_eq!(idx.desired(), None);
        let b = state([127, 100, 0, 2], 80, 2);
        assert_eq!(idx.update(snap("b", b.clone())), Change::Apply(b));
    }

    #[test]
    fn the_first_sync_is_applied_even_when_it_equals_the_maps() {
        let observed = state([127, 100, 0, 1], 80, 1);
        let mut idx = Index::new(["a"], observed.clone());
        assert_eq!(
            idx.update(snap("a", observed.clone())),
            Change::Apply(observed.clone())
        );
        idx.applied(observed.clone());
        assert_eq!(idx.update(snap("a", observed)), Change::Unchanged);
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_snapshot() {
        let good = state([127, 100, 0, 1], 80, 1);
        let mut idx = Index::new(["a"], DesiredState::default());
        assert_eq!(
            idx.update(snap("a", good.clone())),
            Change::Apply(good.clone())
        );
        idx.applied(good.clone());
        let refused = idx.update(SourceUpdate {
            source: "a",
            event: SourceEvent::Invalid("x:1: f: bad".into()),
        });
        assert_eq!(refused, Change::Refused("x:1: f: bad".into()));
        assert_eq!(idx.desired(), Some(good));
        assert_eq!(idx.last_error(), Some("x:1: f: bad"));
    }

    #[test]
    fn sources_are_merged_and_the_first_named_wins_a_shared_frontend() {
        let mut idx = Index::new(["a", "b"], DesiredState::default());
        idx.update(snap("b", state([127, 100, 0, 1], 80, 2)));
        let applied = idx.update(snap("a", state([127, 100, 0, 1], 80, 1)));
        assert_eq!(applied, Change::Apply(state([127, 100, 0, 1], 80, 1)));
    }
}
