//! `NodeEnrollment.status`: what this node's data plane is, built from what the agent observed
//! (pure) and written by server-side apply to the status subresource (the agent is its only
//! writer, field manager `meshlet-agent`).
//!
//! ```text
//!  start-up report + previous status ─► continuity_after_start (pure) ─┐
//!  programs, maps (kernel) + Phase (run loop) ────────────────────────┴► build (pure)
//!      ─► equal to the last status written? ─ yes ─► nothing
//!                                            └ no ──► SSA nodeenrollments/<node>/status
//! ```
//!
//! Continuity: `linkIdsStable` holds while every link id is the one recorded at first attach;
//! `dataplaneGaps` counts start-ups that had to load from nothing although the previous status
//! showed attached links (the data plane had vanished: `lastRestartKind: Cold`).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use meshlet_crds::conditions::{
    self, DATAPLANE_READY, ENROLLED, IPSEC_READY, READY, RECONCILING, STALLED, Status,
};
use meshlet_crds::names::AGENT_FIELD_MANAGER;
use meshlet_crds::v1alpha1::{
    Continuity, MapStatus, NodeEnrollment, NodeEnrollmentStatus, ProgramStatus, RestartKind,
};

use crate::dataplane::{self, MapInfo, ProgramInfo, StartReport};

/// Errors of the status writer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The server-side apply of the status failed.
    #[error("failed to apply the status of NodeEnrollment {name}")]
    Apply {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The status could not be serialised.
    #[error("failed to encode the status of NodeEnrollment {name}")]
    Encode {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Where the data plane of an enrolled node stands, as the run loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Loaded or adopted, waiting for the source's first complete snapshot or applying it.
    Syncing,
    /// The last desired state is in the maps.
    Synced,
    /// Applying the desired state failed (retried with backoff).
    ApplyFailed(String),
    /// Loading or adopting the data plane failed.
    StartFailed(String),
    /// `spec.drain`: torn down on purpose.
    Drained,
}

/// Facts of the node that do not change while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Version the agent reports.
    pub agent_version: String,
    /// Kernel release.
    pub kernel_version: String,
    /// Whether `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
}

impl NodeFacts {
    /// Read the kernel facts of this node.
    pub fn read(agent_version: String) -> Self {
        Self {
            agent_version,
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        }
    }
}

/// What the loop observed, input of [`build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Attached programs (empty when torn down).
    pub programs: Vec<ProgramInfo>,
    /// Pinned maps (empty when torn down).
    pub maps: Vec<MapInfo>,
    /// Where the data plane stands.
    pub phase: Phase,
    /// Last problem of the source (invalid snapshot), if any.
    pub source_error: Option<String>,
    /// Latest report of the IPsec task; `None` (no report yet) keeps `status.ipsec` and the
    /// `IPsecReady` condition as they were.
    pub ipsec: Option<crate::ipsec::kube::IpsecReport>,
}

/// The continuity record after a data-plane start-up (pure).
///
/// `previous` is the status the NodeEnrollment carried before this start; `links` the link ids
/// now attached.
pub fn continuity_after_start(
    previous: Option<&NodeEnrollmentStatus>,
    report: &StartReport,
    links: &[ProgramInfo],
    now: Timestamp,
) -> Continuity {
    let prev_links: Vec<(&str, i64)> = previous
        .map(|p| {
            p.programs
                .iter()
                .filter_map(|pr| pr.link_id.map(|l| (pr.name.as_str(), l)))
                .collect()
        })
        .unwrap_or_default();
    let prev = previous.and_then(|p| p.continuity.as_ref());
    let gaps = prev.map(|c| c.dataplane_gaps).unwrap_or(0);
    match report.kind {
        dataplane::RestartKind::Fresh => {
            let cold = !prev_links.is_empty();
            Continuity {
                link_ids_stable: !cold,
                first_attach_time: Some(Time(now)),
                last_restart_kind: Some(if cold {
                    RestartKind::Cold
                } else {
                    RestartKind::Fresh
                }),
                last_restart_duration_ms: None,
                dataplane_gaps: gaps + i64::from(cold),
            }
        }
        kind @ (dataplane::RestartKind::Warm | dataplane::RestartKind::Migrated) => {
            let same_as_reported = prev_links.iter().all(|(name, id)| {
                links
                    .iter()
                    .any(|l| l.name == *name && i64::from(l.link_id) == *id)
            });
            Continuity {
                link_ids_stable: prev.is_none_or(|c| c.link_ids_stable)
                    && report.link_ids_unchanged
                    && same_as_reported,
                first_attach_time: prev
                    .and_then(|c| c.first_attach_time.clone())
                    .or(Some(Time(now))),
                last_restart_kind: Some(if kind == dataplane::RestartKind::Warm {
                    RestartKind::Warm
                } else {
                    RestartKind::Migrated
                }),
                last_restart_duration_ms: None,
                dataplane_gaps: gaps,
            }
        }
    }
}

/// The status to write (pure): `base` (the last status written or read) updated with the
/// observation; conditions keep their transition times unless their status flips.
pub fn build(
    base: &NodeEnrollmentStatus,
    ne: &NodeEnrollment,
    facts: &NodeFacts,
    continuity: Option<&Continuity>,
    obs: &Observation,
    now: Timestamp,
) -> NodeEnrollmentStatus {
    let generation = ne.metadata.generation;
    let mut st = NodeEnrollmentStatus {
        conditions: base.conditions.clone(),
        observed_generation: generation,
        agent_version: Some(facts.agent_version.clone()),
        kernel_version: Some(facts.kernel_version.clone()),
        btf: Some(facts.btf),
        programs: obs
            .programs
            .iter()
            .map(|p| ProgramStatus {
                name: p.name.clone(),
                id: i64::from(p.id),
                attach_point: p.attach_point.clone(),
                link_id: Some(i64::from(p.link_id)),
            })
            .collect(),
        maps: obs
            .maps
            .iter()
            .map(|m| MapStatus {
                name: m.name.clone(),
                layout_version: i64::from(m.layout),
                entries: i64::try_from(m.entries).unwrap_or(i64::MAX),
                capacity: i64::try_from(m.capacity).unwrap_or(i64::MAX),
            })
            .collect(),
        continuity: continuity.cloned().or_else(|| base.continuity.clone()),
        ipsec: match &obs.ipsec {
            Some(r) if !r.keep_status => r.status.clone(),
            _ => base.ipsec.clone(),
        },
    };
    let c = &mut st.conditions;
    let mut set = |t: &str, s: Status, reason: &str, msg: &str| {
        conditions::set_condition_at(c, t, s, reason, msg, generation, now);
    };
    set(
        ENROLLED,
        Status::True,
        "Enrolled",
        "the node's agent accepted the enrollment",
    );
    let attached = !obs.programs.is_empty();
    let (dp, reason, msg): (bool, &str, String) = match &obs.phase {
        Phase::Synced if attached => (
            true,
            "Synced",
            format!(
                "{} programs attached, maps synced from the source",
                obs.programs.len()
            ),
        ),
        Phase::Synced | Phase::Syncing => (
            false,
            "Syncing",
            "waiting for the source's first complete snapshot".into(),
        ),
        Phase::ApplyFailed(e) => (false, "ApplyFailed", e.clone()),
        Phase::StartFailed(e) => (false, "StartFailed", e.clone()),
        Phase::Drained => (
            false,
            "Drained",
            "spec.drain is true: programs detached and maps unpinned".into(),
        ),
    };
    set(DATAPLANE_READY, Status::from(dp), reason, &msg);
    set(READY, Status::from(dp), reason, &msg);
    let syncing = matches!(obs.phase, Phase::Syncing);
    set(
        RECONCILING,
        Status::from(syncing),
        if syncing { "Syncing" } else { reason },
        if syncing { msg.as_str() } else { "" },
    );
    let stalled = match (&obs.phase, &obs.source_error) {
        (Phase::ApplyFailed(e) | Phase::StartFailed(e), _) => Some(("ApplyFailed", e.clone())),
        (_, Some(e)) => Some(("SourceInvalid", e.clone())),
        _ => None,
    };
    match stalled {
        Some((reason, msg)) => set(STALLED, Status::True, reason, &msg),
        None => set(STALLED, Status::False, "Progressing", ""),
    }
    match obs.ipsec.as_ref().map(|r| &r.condition) {
        Some(Some(ic)) => set(IPSEC_READY, ic.status, ic.reason, &ic.message),
        Some(None) => {
            conditions::remove_condition(c, IPSEC_READY);
        }
        None => {}
    }
    st
}

/// Writes the status of one NodeEnrollment when it changed.
#[derive(Debug)]
pub struct StatusWriter {
    api: Api<NodeEnrollment>,
    name: String,
    last: Option<NodeEnrollmentStatus>,
}

impl StatusWriter {
    /// A writer for the NodeEnrollment `name`.
    pub fn new(api: Api<NodeEnrollment>, name: String) -> Self {
        Self {
            api,
            name,
            last: None,
        }
    }

    /// The last status written, if any.
    pub fn last(&self) -> Option<&NodeEnrollmentStatus> {
        self.last.as_ref()
    }

    /// Forget the last status written (the object was deleted or recreated).
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// Apply `status` unless it equals the last one written; `Ok(true)` when written.
    pub async fn write(&mut self, status: NodeEnrollmentStatus) -> Result<bool, StatusError> {
        if self.last.as_ref() == Some(&status) {
            return Ok(false);
        }
        let body = serde_json::json!({
            "apiVersion": "meshlet.io/v1alpha1",
            "kind": "NodeEnrollment",
            "metadata": { "name": self.name },
            "status": serde_json::to_value(&status).map_err(|source| StatusError::Encode {
                name: self.name.clone(),
                source,
            })?,
        });
        self.api
            .patch_status(
                &self.name,
                &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|source| StatusError::Apply {
                name: self.name.clone(),
                source,
            })?;
        self.last = Some(status);
        Ok(true)
    }
}

/// Milliseconds of `d`, saturating.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("ts")
    }

    fn link(name: &str, link_id: u32) -> ProgramInfo {
        ProgramInfo {
            name: name.into(),
            id: 7,
            attach_point: "cgroup/connect4 on /x".into(),
            link_id,
        }
    }

    fn report(kind: dataplane::RestartKind, unchanged: bool) -> StartReport {
        StartReport {
            kind,
            duration: Duration::from_millis(3),
            link_ids_unchanged: unchanged,
        }
    }

    fn prior(link_id: i64, gaps: i64) -> NodeEnrollmentStatus {
        NodeEnrollmentStatus {
            programs: vec![ProgramStatus {
                name: "connect4".into(),
                id: 6,
                attach_point: "x".into(),
                link_id: Some(link_id),
            }],
            continuity: Some(Continuity {
                link_ids_stable: true,
                first_attach_time: Some(Time(at(10))),
                last_restart_kind: Some(RestartKind::Fresh),
                last_restart_duration_ms: Some(5),
                dataplane_gaps: gaps,
            }),
            ..NodeEnrollmentStatus::default()
        }
    }

    #[test]
    fn a_warm_restart_on_the_same_links_keeps_the_record() {
        let c = continuity_after_start(
            Some(&prior(42, 0)),
            &report(dataplane::RestartKind::Warm, true),
            &[link("connect4", 42)],
            at(100),
        );
        assert!(c.link_ids_stable);
        assert_eq!(c.last_restart_kind, Some(RestartKind::Warm));
        assert_eq!(c.first_attach_time, Some(Time(at(10))));
        assert_eq!(c.dataplane_gaps, 0);
    }

    #[test]
    fn a_warm_restart_on_other_links_is_not_stable() {
        let c = continuity_after_start(
            Some(&prior(42, 0)),
            &report(dataplane::RestartKind::Warm, true),
            &[link("connect4", 43)],
            at(100),
        );
        assert!(!c.link_ids_stable);
    }

    #[test]
    fn a_fresh_load_while_links_were_reported_is_a_cold_start_and_a_gap() {
        let c = continuity_after_start(
            Some(&prior(42, 1)),
            &report(dataplane::RestartKind::Fresh, true),
            &[link("connect4", 50)],
            at(100),
        );
        assert_eq!(c.last_restart_kind, Some(RestartKind::Cold));
        assert_eq!(c.dataplane_gaps, 2);
        assert!(!c.link_ids_stable);
    }

    #[test]
    fn a_first_load_is_fresh_without_gap() {
        let c = continuity_after_start(
            None,
            &report(dataplane::RestartKind::Fresh, true),
            &[link("connect4", 50)],
            at(100),
        );
        assert_eq!(c.last_restart_kind, Some(RestartKind::Fresh));
        assert_eq!(c.dataplane_gaps, 0);
        assert!(c.link_ids_stable);
    }

    #[test]
    fn drained_reports_not_ready_with_the_reason_and_no_programs() {
        let mut ne = NodeEnrollment::test("n1");
        ne.metadata.generation = Some(3);
        let facts = NodeFacts {
            agent_version: "1.0.0".into(),
            kernel_version: "6.18".into(),
            btf: true,
        };
        let obs = Observation {
            programs: vec![],
            maps: vec![],
            phase: Phase::Drained,
            source_error: None,
            ipsec: None,
        };
        let st = build(
            &NodeEnrollmentStatus::default(),
            &ne,
            &facts,
            None,
            &obs,
            at(5),
        );
        let dp = conditions::find_condition(&st.conditions, DATAPLANE_READY).expect("cond");
        assert_eq!(
            (dp.status.as_str(), dp.reason.as_str()),
            ("False", "Drained")
        );
        assert!(conditions::is_true(&st.conditions, ENROLLED));
        assert!(!conditions::is_true(&st.conditions, READY));
        assert_eq!(st.observed_generation, Some(3));
        // Same input again: nothing changes, so nothing would be written.
        let again = build(&st, &ne, &facts, None, &obs, at(9));
        assert_eq!(again, st);
    }
}
