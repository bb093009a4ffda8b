//! Reading a node's recorded xfrm state: the agent's `MESHLET_IPSEC_XFRM=recording:<path>` test
//! hook keeps the node's SAs, outbound policies and every mutating call in a JSON file instead
//! of the kernel (the host kernel has no ESP). The local cluster points each node's agent at
//! `<run_dir>/xfrm.json`, so the file outlives agent restarts on that node.
//!
//! ```text
//!  meshlet-agent (node-i) ──writes after every call──► <run_dir>/node-i/xfrm.json
//!       {"states":   [{src, dst, spi, reqid, material?}],      SAs present now
//!        "policies": [{src, dst, reqid, priority}],            outbound policies present now
//!        "calls":    [{op, args}]}                             every call, in order, across restarts
//!                                                  │
//!  tests ──► read(path) ──► Recording ──► inbound / outbound / policies per peer and generation
//!                                     └─► check_rotation_order (pure: drop-free order of one node)
//! ```
//!
//! The key generation (the `SPI` of the API) is carried in the low 16 bits of the agent's
//! reqids (high 16 bits `0x6d6c`); the wire SPI of an SA is a different number.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

/// File name of a node's recording inside its run directory.
pub const FILE_NAME: &str = "xfrm.json";
/// File beside the recording listing algorithms the node's simulated kernel lacks (the
/// agent's recording refuses them as a kernel without the module does).
pub const REFUSED_FILE_NAME: &str = "xfrm-refused-algorithms";
/// Environment variable selecting the agent's xfrm implementation (`recording:<path>`).
pub const XFRM_ENV: &str = "MESHLET_IPSEC_XFRM";
/// Environment variable listing the algorithms the recording refuses, comma separated (the
/// way a kernel without the module does).
pub const REFUSE_ENV: &str = "MESHLET_IPSEC_REFUSE_ALGORITHMS";

/// High 16 bits of every reqid the agent writes.
const REQID_BASE: u32 = 0x6d6c_0000;

/// The key generation an agent reqid carries; `None` for a reqid that is not the agent's.
pub fn generation_of(reqid: u32) -> Option<u32> {
    (reqid & 0xffff_0000 == REQID_BASE && reqid & 0xffff != 0).then_some(reqid & 0xffff)
}

/// Failure to read a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The file could not be read.
    #[error("failed to read xfrm recording {path}")]
    Read {
        /// Path.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a recording.
    #[error("xfrm recording {path} is not valid JSON of the expected shape")]
    Parse {
        /// Path.
        path: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Identity of an SA: (source, destination, wire SPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct SaId {
    /// Sending node address.
    pub src: IpAddr,
    /// Receiving node address.
    pub dst: IpAddr,
    /// SPI on the wire.
    pub spi: u32,
}

/// One SA present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct State {
    /// Identity.
    #[serde(flatten)]
    pub id: SaId,
    /// reqid (owner mark and key generation).
    pub reqid: u32,
}

impl State {
    /// Key generation of this SA, if it is the agent's.
    pub fn generation(&self) -> Option<u32> {
        generation_of(self.reqid)
    }
}

/// Identity of an outbound policy: traffic from `src` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct PolicyId {
    /// Local address.
    pub src: IpAddr,
    /// Peer address.
    pub dst: IpAddr,
}

/// One outbound policy present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Policy {
    /// Identity.
    #[serde(flatten)]
    pub id: PolicyId,
    /// Template reqid: the key generation the node sends with to this peer.
    pub reqid: u32,
    /// Priority.
    #[serde(default)]
    pub priority: u32,
}

impl Policy {
    /// Key generation this policy sends with, if it is the agent's.
    pub fn generation(&self) -> Option<u32> {
        generation_of(self.reqid)
    }
}

/// An outbound policy as given to `install_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PolicySpec {
    /// Identity.
    pub id: PolicyId,
    /// Template reqid.
    pub reqid: u32,
}

/// One mutating call the agent made, in the recording's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "camelCase")]
pub enum Call {
    /// An SA was added (identity, reqid).
    InstallState(SaId, u32),
    /// An SA was deleted.
    DeleteState(SaId),
    /// An outbound policy was added or replaced.
    InstallPolicy(PolicySpec),
    /// An outbound policy was deleted.
    DeletePolicy(PolicyId),
}

/// A node's recorded xfrm state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Recording {
    /// SAs present.
    #[serde(default)]
    pub states: Vec<State>,
    /// Outbound policies present.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Every mutating call, in order, across agent restarts.
    #[serde(default)]
    pub calls: Vec<Call>,
}

/// Reads a recording; a missing file is an empty recording (the agent has written nothing).
pub fn read(path: &Path) -> Result<Recording, RecordingError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recording::default()),
        Err(source) => {
            return Err(RecordingError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    serde_json::from_slice(&text).map_err(|source| RecordingError::Parse {
        path: path.display().to_string(),
        source,
    })
}

impl Recording {
    /// Generations of the inbound SAs (`dst == local`) present, by peer.
    pub fn inbound(&self, local: IpAddr) -> BTreeMap<IpAddr, BTreeSet<u32>> {
        let mut out: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
        for s in &self.states {
            if let (true, Some(g)) = (s.id.dst == local, s.generation()) {
                out.entry(s.id.src).or_default().insert(g);
            }
        }
        out
    }

    /// Generations of the outbound SAs (`src == local`) present, by peer.
    pub fn outbound(&self, local: IpAddr) -> BTreeMap<IpAddr, BTreeSet<u32>> {
        let mut out: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
        for s in &self.states {
            if let (true, Some(g)) = (s.id.src == local, s.generation()) {
                out.entry(s.id.dst).or_default().insert(g);
            }
        }
        out
    }

    /// The generation each outbound policy (`src == local`) sends with, by peer.
    pub fn sending(&self, local: IpAddr) -> BTreeMap<IpAddr, u32> {
        self.policies
            .iter()
            .filter(|p| p.id.src == local)
            .filter_map(|p| Some((p.id.dst, p.generation()?)))
            .collect()
    }

    /// Every generation any own SA of this node belongs to.
    pub fn generations(&self) -> BTreeSet<u32> {
        self.states.iter().filter_map(State::generation).collect()
    }
}

/// Checks that the calls of one node (`local`), from `calls[from..]`, moved from generation
/// `old` to `new` without a window that drops packets:
///
/// 1. the inbound SA of `new` from a peer is installed before the policy to that peer moves
///    to `new` (the node can receive on `new` from everyone it sends to on `new`);
/// 2. a policy moves to `new` only after the outbound SA of `new` to that peer exists;
/// 3. no SA of `old` is deleted before the node's last policy moved to `new`;
/// 4. no policy is deleted and nothing moves back to `old`.
///
/// `states_at_from` are the SAs present at `from` (to learn the generation of deleted SAs).
/// Returns the first violation, in words.
pub fn check_rotation_order(
    local: IpAddr,
    states_at_from: &[State],
    calls: &[Call],
    from: usize,
    old: u32,
    new: u32,
) -> Result<(), String> {
    let mut generation: BTreeMap<SaId, u32> = states_at_from
        .iter()
        .filter_map(|s| Some((s.id, s.generation()?)))
        .collect();
    let mut inbound_new: BTreeSet<IpAddr> = BTreeSet::new();
    let mut outbound_new: BTreeSet<IpAddr> = BTreeSet::new();
    let mut moved: BTreeSet<IpAddr> = BTreeSet::new();
    let mut last_move: Option<usize> = None;
    let mut first_old_delete: Option<(usize, SaId)> = None;
    for (i, c) in calls.iter().enumerate().skip(from) {
        match *c {
            Call::InstallState(id, reqid) => {
                let g = generation_of(reqid);
                if let Some(g) = g {
                    generation.insert(id, g);
                }
                if g == Some(new) && id.dst == local {
                    inbound_new.insert(id.src);
                }
                if g == Some(new) && id.src == local {
                    outbound_new.insert(id.dst);
                }
            }
            Call::DeleteState(id) => {
                if generation.get(&id) == Some(&old) && first_old_delete.is_none() {
                    first_old_delete = Some((i, id));
                }
                if generation.get(&id) == Some(&new) {
                    return Err(format!(
                        "call {i}: deleted SA {id:?} of the new generation {new}"
                    ));
                }
            }
            Call::InstallPolicy(p) if p.id.src == local => {
                let g = generation_of(p.reqid);
                if g == Some(old) && moved.contains(&p.id.dst) {
                    return Err(format!(
                        "call {i}: the policy to {} moved back to generation {old}",
                        p.id.dst
                    ));
                }
                if g == Some(new) {
                    if !inbound_new.contains(&p.id.dst) {
                        return Err(format!(
                            "call {i}: outbound to {} moved to generation {new} before the inbound SA from it was installed",
                            p.id.dst
                        ));
                    }
                    if !outbound_new.contains(&p.id.dst) {
                        return Err(format!(
                            "call {i}: outbound policy to {} moved to generation {new} before its outbound SA existed",
                            p.id.dst
                        ));
                    }
                    moved.insert(p.id.dst);
                    last_move = Some(i);
                }
            }
            Call::InstallPolicy(_) => {}
            Call::DeletePolicy(id) => {
                return Err(format!(
                    "call {i}: deleted the policy {} -> {}",
                    id.src, id.dst
                ));
            }
        }
    }
    match (first_old_delete, last_move) {
        (Some((d, id)), Some(m)) if d < m => Err(format!(
            "call {d}: deleted SA {id:?} of the old generation {old} before the last policy moved to {new} (call {m})"
        )),
        (Some((d, id)), None) => Err(format!(
            "call {d}: deleted SA {id:?} of the old generation {old} although no policy ever moved to {new}"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: u32 = 300;
    const B: u32 = 301;

    fn ip(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 1, i))
    }
    fn reqid(g: u32) -> u32 {
        REQID_BASE | g
    }
    fn sa(src: u8, dst: u8, g: u32) -> SaId {
        SaId {
            src: ip(src),
            dst: ip(dst),
            spi: g * 1000 + u32::from(src) * 10 + u32::from(dst),
        }
    }
    fn install(src: u8, dst: u8, g: u32) -> Call {
        Call::InstallState(sa(src, dst, g), reqid(g))
    }
    fn policy(src: u8, dst: u8, g: u32) -> Call {
        Call::InstallPolicy(PolicySpec {
            id: PolicyId {
                src: ip(src),
                dst: ip(dst),
            },
            reqid: reqid(g),
        })
    }
    fn stable_a() -> Vec<State> {
        [(2, 1), (3, 1), (1, 2), (1, 3)]
            .iter()
            .map(|(s, d)| State {
                id: sa(*s, *d, A),
                reqid: reqid(A),
            })
            .collect()
    }

    #[test]
    fn the_agents_file_format_parses() {
        let text = r#"{"states":[{"src":"127.0.1.2","dst":"127.0.1.1","spi":4660,"reqid":1835794732,"material":7}],
            "policies":[{"src":"127.0.1.1","dst":"127.0.1.2","reqid":1835794732,"priority":7171072}],
            "calls":[{"op":"installState","args":[{"src":"127.0.1.2","dst":"127.0.1.1","spi":4660},1835794732]},
                     {"op":"installPolicy","args":{"id":{"src":"127.0.1.1","dst":"127.0.1.2"},"reqid":1835794732}},
                     {"op":"deleteState","args":{"src":"127.0.1.2","dst":"127.0.1.1","spi":1}},
                     {"op":"deletePolicy","args":{"src":"127.0.1.1","dst":"127.0.1.2"}}]}"#;
        let r: Recording = serde_json::from_str(text).expect("parse");
        assert_eq!(r.inbound(ip(1))[&ip(2)], BTreeSet::from([300]));
        assert_eq!(r.sending(ip(1))[&ip(2)], 300);
        assert_eq!(r.calls.len(), 4);
        assert_eq!(generation_of(1_835_794_732), Some(300));
        assert_eq!(generation_of(300), None);
    }

    #[test]
    fn a_drop_free_rotation_passes() {
        let calls = vec![
            install(2, 1, B),
            install(3, 1, B),
            install(1, 2, B),
            install(1, 3, B),
            policy(1, 2, B),
            policy(1, 3, B),
            Call::DeleteState(sa(2, 1, A)),
            Call::DeleteState(sa(1, 2, A)),
        ];
        check_rotation_order(ip(1), &stable_a(), &calls, 0, A, B).expect("drop-free");
    }

    #[test]
    fn outbound_before_the_inbound_sa_is_reported() {
        let calls = vec![install(1, 2, B), policy(1, 2, B), install(2, 1, B)];
        let e = check_rotation_order(ip(1), &stable_a(), &calls, 0, A, B).expect_err("early");
        assert!(e.contains("before the inbound SA"), "{e}");
    }

    #[test]
    fn deleting_the_old_generation_before_the_switch_is_reported() {
        let calls = vec![
            install(2, 1, B),
            install(1, 2, B),
            install(3, 1, B),
            install(1, 3, B),
            policy(1, 2, B),
            Call::DeleteState(sa(3, 1, A)),
            policy(1, 3, B),
        ];
        let e = check_rotation_order(ip(1), &stable_a(), &calls, 0, A, B).expect_err("early");
        assert!(e.contains("old generation"), "{e}");
    }
}
