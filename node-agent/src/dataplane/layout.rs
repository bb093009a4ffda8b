//! Map layouts this binary knows, the meta record that says which layout is pinned, and the
//! pure start-up decision (fresh / same layout / known migration / unknown).
//!
//! ```text
//!  pinned meta + pins ──► PinnedState ──► decide(state, wanted) ──► StartupDecision
//! ```
//!
//! Nothing here touches the kernel; the loader gathers a [`PinnedState`] and acts on the
//! decision.

use super::StartupDecision;

/// Layouts this binary can write and read.
pub const KNOWN_LAYOUTS: [u32; 2] = [1, 2];

/// Magic in meta slot 0 ("MLT1").
pub const META_MAGIC: u32 = 0x4d4c_5431;

/// Number of `u32` slots of the meta map (must equal `MLT_META_SLOTS` in `ebpf/meshlet.h`).
pub const META_SLOTS: usize = 8;

/// Data-plane version recorded in meta (`major * 10000 + minor * 100 + patch`).
pub fn dataplane_version() -> u32 {
    let part = |s: &str| s.parse::<u32>().unwrap_or(0);
    part(env!("CARGO_PKG_VERSION_MAJOR")) * 10_000
        + part(env!("CARGO_PKG_VERSION_MINOR")) * 100
        + part(env!("CARGO_PKG_VERSION_PATCH"))
}

/// One pinned map: its pin name under `maps/`, its name in the eBPF object, and its meta slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    /// Pin name under `maps/` (no dots).
    pub pin: &'static str,
    /// Map symbol in the eBPF object.
    pub symbol: &'static str,
    /// Meta slot recording its layout (`None`: always layout 1, not recorded).
    pub meta_slot: Option<usize>,
    /// Whether its layout follows the data-plane layout (else it is layout 1 forever).
    pub follows_layout: bool,
}

/// Every map the data plane pins under `maps/` (the meta map lives at the root).
pub const MAPS: [MapSpec; 6] = [
    MapSpec {
        pin: "frontend",
        symbol: "mlt_frontend",
        meta_slot: Some(3),
        follows_layout: false,
    },
    MapSpec {
        pin: "service",
        symbol: "mlt_service",
        meta_slot: Some(4),
        follows_layout: false,
    },
    MapSpec {
        pin: "endpoint",
        symbol: "mlt_endpoint",
        meta_slot: Some(5),
        follows_layout: true,
    },
    MapSpec {
        pin: "backend",
        symbol: "mlt_backend",
        meta_slot: Some(6),
        follows_layout: true,
    },
    MapSpec {
        pin: "revnat",
        symbol: "mlt_revnat",
        meta_slot: Some(7),
        follows_layout: false,
    },
    MapSpec {
        pin: "counters",
        symbol: "mlt_counters",
        meta_slot: None,
        follows_layout: false,
    },
];

impl MapSpec {
    /// Layout of this map when the data plane runs `layout`.
    pub fn layout_for(&self, layout: u32) -> u32 {
        if self.follows_layout { layout } else { 1 }
    }
}

/// The decoded meta record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaRecord {
    /// Raw slots as stored.
    pub slots: [u32; META_SLOTS],
}

impl MetaRecord {
    /// The record a data plane running `layout` writes.
    pub fn for_layout(layout: u32) -> Self {
        let mut slots = [0u32; META_SLOTS];
        slots[0] = META_MAGIC;
        slots[1] = layout;
        slots[2] = dataplane_version();
        for map in MAPS {
            if let Some(slot) = map.meta_slot {
                slots[slot] = map.layout_for(layout);
            }
        }
        Self { slots }
    }

    /// Data-plane layout recorded.
    pub fn layout(&self) -> u32 {
        self.slots[1]
    }

    /// Data-plane version recorded.
    pub fn version(&self) -> u32 {
        self.slots[2]
    }

    /// Layout recorded for `map`, if recorded.
    pub fn map_layout(&self, map: &MapSpec) -> Option<u32> {
        map.meta_slot.map(|slot| self.slots[slot])
    }
}

/// What the loader found pinned, gathered without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedState {
    /// The meta record, if the meta map is pinned.
    pub meta: Option<MetaRecord>,
    /// Names of pins found under `maps/` and `links/` (temporary migration pins excluded).
    pub pins: Vec<String>,
}

/// Decides what start-up does; pure, so every case is unit-tested without a kernel.
pub fn decide(state: &PinnedState, wanted: u32) -> StartupDecision {
    let Some(meta) = state.meta else {
        if state.pins.is_empty() {
            return StartupDecision::Fresh;
        }
        return StartupDecision::Unknown {
            found: 0,
            reason: format!(
                "pins without a meta record ({}); run `meshletctl reset` to start over",
                state.pins.join(", ")
            ),
        };
    };
    if meta.slots[0] != META_MAGIC {
        return StartupDecision::Unknown {
            found: 0,
            reason: format!(
                "meta record has magic {:#x}, expected {META_MAGIC:#x}",
                meta.slots[0]
            ),
        };
    }
    let found = meta.layout();
    if !KNOWN_LAYOUTS.contains(&found) {
        return StartupDecision::Unknown {
            found,
            reason: format!(
                "pinned layout {found} is not known to this binary (knows {KNOWN_LAYOUTS:?}); \
                 roll forward to a release that knows it"
            ),
        };
    }
    for map in MAPS {
        if let Some(recorded) = meta.map_layout(&map) {
            let expected = map.layout_for(found);
            if recorded != expected {
                return StartupDecision::Unknown {
                    found,
                    reason: format!(
                        "map {} has layout {recorded}, but data-plane layout {found} uses {expected}",
                        map.pin
                    ),
                };
            }
        }
    }
    if found == wanted {
        StartupDecision::SameLayout { layout: found }
    } else if migration_known(found, wanted) {
        StartupDecision::Migrate {
            from: found,
            to: wanted,
        }
    } else {
        StartupDecision::Unknown {
            found,
            reason: format!("no migration from layout {found} to layout {wanted}"),
        }
    }
}

/// Whether this binary converts maps from layout `from` to layout `to`.
pub fn migration_known(from: u32, to: u32) -> bool {
    matches!((from, to), (1, 2) | (2, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(layout: u32) -> PinnedState {
        PinnedState {
            meta: Some(MetaRecord::for_layout(layout)),
            pins: vec!["maps/frontend".into()],
        }
    }

    #[test]
    fn nothing_pinned_means_a_fresh_start() {
        let state = PinnedState {
            meta: None,
            pins: vec![],
        };
        assert_eq!(decide(&state, 1), StartupDecision::Fresh);
        assert_eq!(decide(&state, 2), StartupDecision::Fresh);
    }

    #[test]
    fn the_same_layout_is_adopted() {
        assert_eq!(
            decide(&pinned(2), 2),
            StartupDecision::SameLayout { layout: 2 }
        );
        assert_eq!(
            decide(&pinned(1), 1),
            StartupDecision::SameLayout { layout: 1 }
        );
    }

    #[test]
    fn a_known_layout_change_migrates_in_both_directions() {
        assert_eq!(
            decide(&pinned(1), 2),
            StartupDecision::Migrate { from: 1, to: 2 }
        );
        assert_eq!(
            decide(&pinned(2), 1),
            StartupDecision::Migrate { from: 2, to: 1 }
        );
    }

    #[test]
    fn an_unknown_pinned_layout_is_refused_with_its_number() {
        let mut meta = MetaRecord::for_layout(2);
        meta.slots[1] = 99;
        let state = PinnedState {
            meta: Some(meta),
            pins: vec![],
        };
        match decide(&state, 2) {
            StartupDecision::Unknown { found, reason } => {
                assert_eq!(found, 99);
                assert!(reason.contains("99"), "{reason}");
            }
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn pins_without_meta_are_refused_rather_than_overwritten() {
        let state = PinnedState {
            meta: None,
            pins: vec!["maps/backend".into()],
        };
        assert!(matches!(
            decide(&state, 1),
            StartupDecision::Unknown { found: 0, .. }
        ));
    }

    #[test]
    fn a_map_layout_that_disagrees_with_the_dataplane_layout_is_refused() {
        let mut meta = MetaRecord::for_layout(2);
        meta.slots[6] = 1;
        let state = PinnedState {
            meta: Some(meta),
            pins: vec![],
        };
        match decide(&state, 2) {
            StartupDecision::Unknown { reason, .. } => {
                assert!(reason.contains("backend"), "{reason}")
            }
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn a_wrong_magic_is_refused() {
        let mut meta = MetaRecord::for_layout(1);
        meta.slots[0] = 7;
        let state = PinnedState {
            meta: Some(meta),
            pins: vec![],
        };
        assert!(matches!(decide(&state, 1), StartupDecision::Unknown { .. }));
    }
}
