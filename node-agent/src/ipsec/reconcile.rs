//! The IPsec reconciler: desired configuration → wanted xfrm objects → diff against the own
//! objects in the kernel → ordered, all-or-nothing-for-SAs application.
//!
//! ```text
//!  IpsecConfig ─► wanted() ─► Wanted ─┐
//!  Xfrm::list_own ─► Observed ────────┴─► plan() (pure) ─► Plan ─► apply(Xfrm)
//!     order: add inbound SAs ─► add outbound SAs ─► set policies ─► delete policies
//!            ─► delete SAs.  An SA that fails rolls back the SAs added before it; no
//!            policy changes then, so a rotation halts instead of half-applying.
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::keys::{self, derive_key, wire_spi};
use super::xfrm::{
    Observed, ObservedSa, PolicyId, PolicySpec, SaId, SaSpec, Xfrm, XfrmError, material_digest,
};
use super::{IpsecConfig, IpsecStatus, reqid_for, spi_of_reqid};

/// Errors computing the wanted state (the configuration cannot be realised).
#[derive(Debug, thiserror::Error)]
pub enum WantedError {
    /// Key material could not be derived.
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    /// Two SAs towards this node derived the same wire SPI.
    #[error(
        "failed to derive distinct wire SPIs: peers {a:?} and {b:?} map to SPI {spi:#x} \
         towards {dst}; rename a node or change the key generation number"
    )]
    SpiCollision {
        /// First sender.
        a: String,
        /// Second sender.
        b: String,
        /// Colliding wire SPI.
        spi: u32,
        /// Receiving address.
        dst: IpAddr,
    },
}

/// The xfrm objects a configuration asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// SAs by identity.
    pub states: BTreeMap<SaId, SaSpec>,
    /// Outbound policies with their template reqid.
    pub policies: BTreeMap<PolicyId, u32>,
}

/// Wanted xfrm objects of `cfg`; `None` (no IPsec) wants nothing, so every own object goes.
///
/// Inbound SAs for every installed generation and peer; for the active generation the
/// outbound SA and a policy per peer pointing at it.
pub fn wanted(cfg: Option<&IpsecConfig>) -> Result<Wanted, WantedError> {
    let mut w = Wanted::default();
    let Some(cfg) = cfg else { return Ok(w) };
    let local = cfg.local_address;
    let me = cfg.node_name.as_str();
    let mut inbound_owner: BTreeMap<u32, &str> = BTreeMap::new();
    for k in &cfg.keys {
        for p in &cfg.peers {
            let spi = wire_spi(k.spi, &p.name, me);
            if let Some(prev) = inbound_owner.insert(spi, &p.name) {
                return Err(WantedError::SpiCollision {
                    a: prev.to_string(),
                    b: p.name.clone(),
                    spi,
                    dst: local,
                });
            }
            let id = SaId {
                src: p.address,
                dst: local,
                spi,
            };
            let key = derive_key(&k.psk, &k.salt, k.spi, &p.name, me, k.algorithm.key_len())?;
            w.states.insert(
                id,
                SaSpec {
                    id,
                    reqid: reqid_for(k.spi),
                    algorithm: k.algorithm,
                    key,
                },
            );
        }
    }
    if let Some(active) = cfg.active_spi
        && let Some(k) = cfg.keys.iter().find(|k| k.spi == active)
    {
        for p in &cfg.peers {
            let id = SaId {
                src: local,
                dst: p.address,
                spi: wire_spi(active, me, &p.name),
            };
            let key = derive_key(&k.psk, &k.salt, active, me, &p.name, k.algorithm.key_len())?;
            w.states.insert(
                id,
                SaSpec {
                    id,
                    reqid: reqid_for(active),
                    algorithm: k.algorithm,
                    key,
                },
            );
            w.policies.insert(
                PolicyId {
                    src: local,
                    dst: p.address,
                },
                reqid_for(active),
            );
        }
    }
    Ok(w)
}

/// The ordered changes that take the kernel from observed to wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// SAs to add, inbound (towards this node) first.
    pub add_states: Vec<SaSpec>,
    /// Policies to add or repoint.
    pub set_policies: Vec<PolicySpec>,
    /// Policies to delete.
    pub delete_policies: Vec<PolicyId>,
    /// SAs to delete, outbound first.
    pub delete_states: Vec<SaId>,
}

impl Plan {
    /// True when the kernel already matches.
    pub fn is_empty(&self) -> bool {
        self.add_states.is_empty()
            && self.set_policies.is_empty()
            && self.delete_policies.is_empty()
            && self.delete_states.is_empty()
    }
}

/// Whether the SA found in the kernel differs from the wanted one: another reqid, or (when the
/// kernel reports it) other key material or algorithm.
fn differs(o: &ObservedSa, s: &SaSpec) -> bool {
    o.reqid != s.reqid
        || o.material
            .is_some_and(|m| m != material_digest(s.algorithm, &s.key))
}

/// Diff wanted against observed (pure). `local` (this node's address) tells inbound SAs from
/// outbound ones; with `None` (IPsec being removed) every SA goes in one batch anyway.
///
/// An SA that exists with another reqid, key or algorithm is deleted and added again. For a
/// key or algorithm change of a generation in use this is disruptive (packets in flight under
/// the old key are dropped until both ends are replaced); the operator never takes this path,
/// it rotates to a new generation instead. It exists so a hand-edited standalone key file or
/// a re-published generation converges to what is configured.
pub fn plan(wanted: &Wanted, observed: &Observed, local: Option<IpAddr>) -> Plan {
    let mut p = Plan::default();
    let inbound = |id: &SaId| Some(id.dst) == local;
    let mut adds: Vec<&SaSpec> = wanted
        .states
        .values()
        .filter(|s| observed.states.get(&s.id).is_none_or(|o| differs(o, s)))
        .collect();
    adds.sort_by_key(|s| (!inbound(&s.id), s.id));
    p.add_states = adds.into_iter().cloned().collect();
    for (id, reqid) in &wanted.policies {
        if observed.policies.get(id) != Some(reqid) {
            p.set_policies.push(PolicySpec {
                id: *id,
                reqid: *reqid,
            });
        }
    }
    p.delete_policies = observed
        .policies
        .keys()
        .filter(|id| !wanted.policies.contains_key(id))
        .copied()
        .collect();
    let mut dels: Vec<SaId> = observed
        .states
        .iter()
        .filter(|(id, o)| wanted.states.get(id).is_none_or(|s| differs(o, s)))
        .map(|(id, _)| *id)
        .collect();
    dels.sort_by_key(|id| (inbound(id), *id));
    p.delete_states = dels;
    // An SA whose reqid or material changed is deleted before it is added again.
    let readd: BTreeSet<SaId> = p
        .add_states
        .iter()
        .map(|s| s.id)
        .filter(|id| observed.states.contains_key(id))
        .collect();
    if !readd.is_empty() {
        p.add_states.retain(|s| !readd.contains(&s.id));
        p.delete_states.retain(|id| !readd.contains(id));
        for id in &readd {
            p.delete_states.push(*id);
        }
        for id in readd {
            if let Some(s) = wanted.states.get(&id) {
                p.add_states.push(s.clone());
            }
        }
    }
    p
}

/// What one apply did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// SAs added.
    pub states_added: usize,
    /// SAs deleted.
    pub states_deleted: usize,
    /// Policies added or repointed.
    pub policies_set: usize,
    /// Policies deleted.
    pub policies_deleted: usize,
    /// Wall time.
    pub duration: Duration,
}

/// Errors of an apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An SA could not be added; the SAs added before it were removed again and no policy was
    /// touched, so the previous state is in force.
    #[error("{source}; nothing was changed (rolled back {rolled_back} SAs)")]
    RolledBack {
        /// The failing install.
        #[source]
        source: XfrmError,
        /// SAs removed again.
        rolled_back: usize,
    },
    /// Re-adding an SA of a generation whose key or algorithm changed failed: the SAs deleted
    /// for the replacement and not re-added are gone, the new SAs this apply added were removed
    /// again, no policy was touched. Only the disruptive replace path (see [`plan`]) can end here.
    #[error(
        "{source}; replacing the SAs of a changed generation failed: {lost} of its SAs are \
         removed, {rolled_back} new SAs were rolled back"
    )]
    ReplaceFailed {
        /// The failing install.
        #[source]
        source: XfrmError,
        /// SAs deleted for the replacement and not re-added.
        lost: usize,
        /// SAs removed again.
        rolled_back: usize,
    },
    /// A later step failed; SAs are in place, some policies or deletions may be pending and
    /// are retried by the next apply.
    #[error("{0}; the next apply retries the remaining steps")]
    Partial(#[source] XfrmError),
}

/// Install `sas` (inbound first, then outbound; the first SA alone, so a kernel lacking the
/// algorithm refuses before anything else is sent). Every SA installed is pushed to `added`;
/// the first failure is returned after the batch it belongs to.
async fn install_batches<X: Xfrm>(
    x: &mut X,
    sas: &[SaSpec],
    added: &mut Vec<SaId>,
) -> Result<(), XfrmError> {
    let split = sas
        .iter()
        .position(|s| Some(s.id.src) == sas.first().map(|f| f.id.dst))
        .unwrap_or(sas.len());
    let (inb, outb) = sas.split_at(split);
    let first = inb.len().min(1);
    for batch in [&inb[..first], &inb[first..], outb] {
        let results = x.install_states(batch).await;
        let mut failure = None;
        for (sa, r) in batch.iter().zip(results) {
            match r {
                Ok(()) => added.push(sa.id),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }
    Ok(())
}

/// Remove the SAs in `added` again (newest first); returns how many went.
async fn roll_back<X: Xfrm>(x: &mut X, added: &[SaId]) -> usize {
    let mut rolled_back = 0;
    for id in added.iter().rev() {
        if x.delete_state(id).await.is_ok() {
            rolled_back += 1;
        }
    }
    rolled_back
}

/// Apply `plan` through `x` in the safe order (see the module header).
///
/// New SAs go first and are rolled back together if one fails, so nothing changes. SAs that
/// exist with another reqid, key or algorithm are replaced after that (delete, then add: the
/// disruptive path, see [`plan`]); the first replacement is done alone, so a refused algorithm
/// costs at most that one SA, and a failure rolls back every SA added by this apply.
pub async fn apply<X: Xfrm>(x: &mut X, plan: &Plan) -> Result<ApplyStats, ApplyError> {
    let started = Instant::now();
    let mut stats = ApplyStats::default();
    let add_ids: BTreeSet<SaId> = plan.add_states.iter().map(|s| s.id).collect();
    let readd: BTreeSet<SaId> = plan
        .delete_states
        .iter()
        .filter(|id| add_ids.contains(id))
        .copied()
        .collect();
    let (again, fresh): (Vec<SaSpec>, Vec<SaSpec>) = plan
        .add_states
        .iter()
        .cloned()
        .partition(|s| readd.contains(&s.id));
    let mut added: Vec<SaId> = Vec::with_capacity(plan.add_states.len());
    if let Err(source) = install_batches(x, &fresh, &mut added).await {
        let rolled_back = roll_back(x, &added).await;
        return Err(ApplyError::RolledBack {
            source,
            rolled_back,
        });
    }
    let first = again.len().min(1);
    let mut readded: Vec<SaId> = Vec::with_capacity(again.len());
    for batch in [&again[..first], &again[first..]] {
        for sa in batch {
            x.delete_state(&sa.id).await.map_err(ApplyError::Partial)?;
            stats.states_deleted += 1;
        }
        if let Err(source) = install_batches(x, batch, &mut readded).await {
            let rolled_back = roll_back(x, &added).await;
            return Err(ApplyError::ReplaceFailed {
                source,
                lost: stats.states_deleted - readded.len(),
                rolled_back,
            });
        }
    }
    added.extend(readded);
    stats.states_added = added.len();
    for r in x.install_policies(&plan.set_policies).await {
        r.map_err(ApplyError::Partial)?;
        stats.policies_set += 1;
    }
    for id in &plan.delete_policies {
        x.delete_policy(id).await.map_err(ApplyError::Partial)?;
        stats.policies_deleted += 1;
    }
    for id in plan.delete_states.iter().filter(|id| !readd.contains(id)) {
        x.delete_state(id).await.map_err(ApplyError::Partial)?;
        stats.states_deleted += 1;
    }
    stats.duration = started.elapsed();
    Ok(stats)
}

/// Status of this node from the own objects in the kernel.
///
/// A generation counts as installed when every peer has an inbound SA of it; the active
/// generation is the one every own policy points at.
pub fn status(
    cfg: Option<&IpsecConfig>,
    observed: &Observed,
    error: Option<String>,
) -> IpsecStatus {
    let mut st = IpsecStatus {
        states: observed.states.len(),
        policies: observed.policies.len(),
        error,
        ..IpsecStatus::default()
    };
    let local = cfg.map(|c| c.local_address);
    let peers: BTreeSet<_> = cfg
        .map(|c| c.peers.iter().map(|p| p.address).collect())
        .unwrap_or_default();
    st.peers = observed
        .policies
        .keys()
        .map(|p| p.dst)
        .chain(
            observed
                .states
                .keys()
                .filter(|id| Some(id.dst) == local)
                .map(|id| id.src),
        )
        .collect::<BTreeSet<_>>()
        .len();
    let mut per_gen: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
    for (id, o) in &observed.states {
        if Some(id.dst) == local {
            st.rx_packets += o.packets;
            if let Some(g) = spi_of_reqid(o.reqid) {
                per_gen.entry(g).or_default().insert(id.src);
            }
        } else {
            st.tx_packets += o.packets;
        }
    }
    st.installed_spis = per_gen
        .into_iter()
        .filter(|(_, srcs)| !peers.is_empty() && peers.is_subset(srcs))
        .map(|(g, _)| g)
        .collect();
    let gens: BTreeSet<_> = observed
        .policies
        .values()
        .filter_map(|r| spi_of_reqid(*r))
        .collect();
    if gens.len() == 1 && observed.policies.len() == peers.len() {
        st.active_spi = gens.into_iter().next();
    }
    st
}
