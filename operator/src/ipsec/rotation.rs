//! The key-rotation phase machine: acknowledgements in, next phase out.
//!
//! ```text
//!   Stable(a) ──rotate──► Installing(a→b) ──all installed b──► Switching(a→b)
//!       ▲                                                          │ all sending on b
//!       └────────────── all removed a ◄── Retiring(a→b) ◄──────────┘
//! ```
//!
//! - **Installing**: the new key (SPI `b`) is published; every agent installs *inbound* SAs
//!   for `b` and lists `b` in `NodeEnrollment.status.ipsec.installedSPIs`. Outbound stays `a`.
//! - **Switching**: every selected node acknowledged `b`, so any node may now receive it; the
//!   operator makes `b` active and agents move *outbound* to `b` (they report `activeSPI`).
//! - **Retiring**: every node sends on `b`, so nobody sends `a` any more; agents delete the
//!   `a` SAs. When no node lists `a`, the rotation is over.
//!
//! Only acknowledgements move the machine; no timer does. The state lives in
//! `IPsecPolicy.status`, so an operator restart resumes from the same point. A node that joins
//! mid-rotation is simply one more node whose acknowledgement is awaited (it gets both keys);
//! a node that leaves no longer counts.

pub use meshlet_crds::ipsec::{FIRST_SPI, next_spi};

/// Where a policy's rotation stands; persisted in `IPsecPolicy.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationState {
    /// No policy key has been published yet.
    Unkeyed,
    /// One key, everyone on it.
    Stable {
        /// The SPI in use.
        active: u32,
    },
    /// Waiting for every node to install inbound SAs for `new`.
    Installing {
        /// SPI everyone sends on.
        old: u32,
        /// SPI being installed.
        new: u32,
    },
    /// Waiting for every node to send on `new`.
    Switching {
        /// SPI being left.
        old: u32,
        /// SPI now active.
        new: u32,
    },
    /// Waiting for every node to delete `old`.
    Retiring {
        /// SPI being deleted.
        old: u32,
        /// SPI in use.
        new: u32,
    },
}

impl RotationState {
    /// The SPI nodes must send on in this state.
    pub fn active_spi(self) -> Option<u32> {
        match self {
            Self::Unkeyed => None,
            Self::Stable { active } => Some(active),
            Self::Installing { old, .. } => Some(old),
            Self::Switching { new, .. } | Self::Retiring { new, .. } => Some(new),
        }
    }

    /// Every SPI whose key must be published to nodes, i.e. the generations nodes hold
    /// inbound SAs for (a node joining mid-rotation gets both while both are in use):
    /// `Stable {a}`, `Installing {a, b}`, `Switching {a, b}`, `Retiring {b}`.
    pub fn published_spis(self) -> Vec<u32> {
        match self {
            Self::Unkeyed => vec![],
            Self::Stable { active } => vec![active],
            Self::Installing { old, new } | Self::Switching { old, new } => vec![old, new],
            Self::Retiring { new, .. } => vec![new],
        }
    }

    /// The SPI of the rotation in progress other than the active one (`status.pendingSPI`):
    /// the one being installed (`Installing`) or left (`Switching`, `Retiring`).
    pub fn pending_spi(self) -> Option<u32> {
        match self {
            Self::Unkeyed | Self::Stable { .. } => None,
            Self::Installing { new, .. } => Some(new),
            Self::Switching { old, .. } | Self::Retiring { old, .. } => Some(old),
        }
    }

    /// The phase name shown in `IPsecPolicy.status.phase`.
    pub fn phase_name(self) -> &'static str {
        match self {
            Self::Unkeyed | Self::Stable { .. } => "Stable",
            Self::Installing { .. } => "Installing",
            Self::Switching { .. } => "Switching",
            Self::Retiring { .. } => "Retiring",
        }
    }
}

/// What one selected node acknowledges in `NodeEnrollment.status.ipsec`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeAck {
    /// Node name.
    pub node: String,
    /// SPIs with inbound SAs installed.
    pub installed_spis: Vec<u32>,
    /// SPI the node sends on.
    pub active_spi: Option<u32>,
    /// The node could not install a key (e.g. the kernel lacks the algorithm).
    pub error: Option<String>,
}

/// Acknowledgement counts for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Acks {
    /// Nodes selected by the policy.
    pub selected: usize,
    /// Nodes that acknowledged what the current phase waits for.
    pub acknowledged: usize,
}

/// The machine's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// State to persist and publish.
    pub next: RotationState,
    /// Progress of the phase `next` is in.
    pub acks: Acks,
    /// A node reported an error that blocks the rotation (`Stalled`), with the reason.
    pub blocked: Option<String>,
}

/// Advance the rotation as far as the acknowledgements allow. `rotate` asks for a new key
/// (interval elapsed or on demand); it is honoured only from `Stable` or `Unkeyed`.
pub fn step(state: RotationState, nodes: &[NodeAck], rotate: bool) -> Step {
    let mut state = state;
    if rotate || state == RotationState::Unkeyed {
        state = match state {
            RotationState::Unkeyed => RotationState::Stable { active: FIRST_SPI },
            RotationState::Stable { active } if rotate => RotationState::Installing {
                old: active,
                new: next_spi(active),
            },
            other => other,
        };
    }
    // Advance through every phase whose condition already holds (e.g. after an operator
    // restart the acks may be several phases ahead of the persisted state).
    loop {
        if let Some(blocked) = blocking_error(state, nodes) {
            let acks = acks(state, nodes);
            return Step {
                next: state,
                acks,
                blocked: Some(blocked),
            };
        }
        let done = nodes.iter().all(|n| acked(state, n));
        let next = match state {
            RotationState::Installing { old, new } if done => RotationState::Switching { old, new },
            RotationState::Switching { old, new } if done => RotationState::Retiring { old, new },
            RotationState::Retiring { new, .. } if done => RotationState::Stable { active: new },
            _ => break,
        };
        state = next;
    }
    Step {
        next: state,
        acks: acks(state, nodes),
        blocked: None,
    }
}

fn acked(state: RotationState, n: &NodeAck) -> bool {
    match state {
        RotationState::Unkeyed | RotationState::Stable { .. } => true,
        RotationState::Installing { new, .. } => n.installed_spis.contains(&new),
        RotationState::Switching { new, .. } => n.active_spi == Some(new),
        RotationState::Retiring { old, .. } => !n.installed_spis.contains(&old),
    }
}

fn acks(state: RotationState, nodes: &[NodeAck]) -> Acks {
    Acks {
        selected: nodes.len(),
        acknowledged: nodes.iter().filter(|n| acked(state, n)).count(),
    }
}

/// A node error halts a rotation that waits on that node; it never un-does a phase.
fn blocking_error(state: RotationState, nodes: &[NodeAck]) -> Option<String> {
    nodes.iter().filter(|n| !acked(state, n)).find_map(|n| {
        n.error.as_ref().map(|e| {
            format!(
                "node {} cannot complete phase {}: {e}",
                n.node,
                state.phase_name()
            )
        })
    })
}

#[cfg(test)]
mod tests;
