//! Observation tests: snapshots in, decisions and status out; no API server.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodSpec, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
};
use meshlet_crds::{
    conditions::set_condition_at,
    v1alpha1::nodeenrollment::{Continuity, NodeEnrollmentStatus},
};

use super::*;
use crate::rollout;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).expect("time")
}

fn node(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

fn managed(name: &str) -> NodeEnrollment {
    let mut ne = NodeEnrollment::test(name);
    ne.metadata.labels = Some(BTreeMap::from([(
        MANAGED_BY_LABEL.to_owned(),
        "meshlet-operator".to_owned(),
    )]));
    ne
}

fn running(mut ne: NodeEnrollment, version: &str, ready_since: i64) -> NodeEnrollment {
    let mut conds = Vec::new();
    for t in [READY, DATAPLANE_READY] {
        set_condition_at(&mut conds, t, Status::True, "Ok", "", None, at(ready_since));
    }
    ne.spec.desired_version = Some(version.into());
    ne.status = Some(NodeEnrollmentStatus {
        conditions: conds,
        agent_version: Some(version.into()),
        continuity: Some(Continuity {
            link_ids_stable: true,
            first_attach_time: None,
            last_restart_kind: None,
            last_restart_duration_ms: None,
            dataplane_gaps: 0,
        }),
        ..NodeEnrollmentStatus::default()
    });
    ne
}

fn pod(node: &str, version: &str, preflight_exit: Option<i32>) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some(format!("meshlet-agent-{node}"));
    p.metadata.labels = Some(BTreeMap::from([
        (NAME_LABEL.to_owned(), AGENT_NAME.to_owned()),
        (VERSION_LABEL.to_owned(), version.to_owned()),
    ]));
    p.spec = Some(PodSpec {
        node_name: Some(node.into()),
        ..PodSpec::default()
    });
    if let Some(code) = preflight_exit {
        p.status = Some(PodStatus {
            init_container_statuses: Some(vec![ContainerStatus {
                name: "preflight".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        message: Some("preflight: unknown map layout 9\n".into()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
    }
    p
}

#[test]
fn selected_nodes_without_enrollment_are_created_and_unselected_managed_ones_deleted() {
    let mut mesh = MeshConfig::test();
    mesh.spec.enrollment.node_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([("mesh".to_owned(), "on".to_owned())])),
        ..LabelSelector::default()
    });
    let (a, b) = (managed("a"), managed("b"));
    let user = NodeEnrollment::test("c");
    let snap = Snapshot {
        mesh: &mesh,
        nodes: vec![
            node("a", &[("mesh", "on")]),
            node("b", &[]),
            node("c", &[]),
            node("d", &[("mesh", "on")]),
        ],
        enrollments: vec![&a, &b, &user],
        pods: vec![],
        now: at(0),
    };
    let d = decide(&snap).expect("valid");
    assert_eq!(d.create, vec!["d".to_owned()]);
    assert_eq!(d.delete, vec!["b".to_owned()]);
    assert!(d.orphans.is_empty());
    // a (selected), c (enrolled by the user), d (selected, enrollment on its way).
    assert_eq!(d.selected, 3);
    assert_eq!(d.enrolled, 2);
}

#[test]
fn an_enrollment_for_a_missing_node_stalls_the_meshconfig_naming_the_node() {
    let mesh = MeshConfig::test();
    let ghost = NodeEnrollment::test("ghost");
    let snap = Snapshot {
        mesh: &mesh,
        nodes: vec![],
        enrollments: vec![&ghost],
        pods: vec![],
        now: at(0),
    };
    let d = decide(&snap).expect("valid");
    assert_eq!(d.orphans, vec!["ghost".to_owned()]);
    let plan = rollout::plan(&d.policy, &d.observed);
    let st = status(&mesh, &d, &plan, &MeshConfigStatus::default(), at(0));
    let stalled = find_condition(&st.conditions, STALLED).expect("stalled");
    assert_eq!(stalled.status, "True");
    assert!(stalled.message.contains("ghost"), "{}", stalled.message);
    assert!(!is_true(&st.conditions, READY));
}

#[test]
fn a_managed_enrollment_whose_node_and_pod_are_gone_has_its_finalizer_released() {
    let mesh = MeshConfig::test();
    let mut gone = managed("gone");
    gone.metadata.deletion_timestamp = Some(Time(at(0)));
    let mut busy = managed("busy");
    busy.metadata.deletion_timestamp = Some(Time(at(0)));
    let busy_pod = pod("busy", "0.1.0", None);
    let snap = Snapshot {
        mesh: &mesh,
        nodes: vec![],
        enrollments: vec![&gone, &busy],
        pods: vec![&busy_pod],
        now: at(0),
    };
    let d = decide(&snap).expect("valid");
    assert_eq!(d.release, vec!["gone".to_owned()]);
    assert!(d.delete.is_empty());
}

#[test]
fn a_failed_preflight_of_the_new_pod_reaches_the_engine_and_halts_it() {
    let mesh = MeshConfig::test().with_version("v2");
    let status = MeshConfigStatus {
        rollout: Some(RolloutStatus {
            current_version: Some("v1".into()),
            ..RolloutStatus::default()
        }),
        ..MeshConfigStatus::default()
    };
    let mesh = MeshConfig {
        status: Some(status),
        ..mesh
    };
    let mut a = running(managed("a"), "v1", 0);
    a.spec.desired_version = Some("v2".into());
    let b = running(managed("b"), "v1", 0);
    let pa = pod("a", "v2", Some(3));
    let pb = pod("b", "v1", None);
    let snap = Snapshot {
        mesh: &mesh,
        nodes: vec![node("a", &[]), node("b", &[])],
        enrollments: vec![&a, &b],
        pods: vec![&pa, &pb],
        now: at(100),
    };
    let d = decide(&snap).expect("valid");
    let plan = rollout::plan(&d.policy, &d.observed);
    let Phase::RollingBack(halt) = &plan.phase else {
        panic!("expected a rollback, got {:?}", plan.phase)
    };
    assert!(
        halt.reason.contains("unknown map layout 9"),
        "{}",
        halt.reason
    );
    assert_eq!(template_version(&d.policy, &d.observed, &plan), "v1");
    assert_eq!(d.failed, 1);
}

#[test]
fn min_ready_counts_from_the_upgrade_start_when_the_agent_stayed_ready() {
    let mut mesh = MeshConfig::test().with_version("v2");
    mesh.spec.upgrade.min_ready_seconds = 30;
    let mut a = running(managed("a"), "v2", 0);
    a.metadata.annotations = Some(BTreeMap::from([(
        UPGRADE_STARTED_ANNOTATION.to_owned(),
        at(100).to_string(),
    )]));
    let snap = Snapshot {
        mesh: &mesh,
        nodes: vec![node("a", &[])],
        enrollments: vec![&a],
        pods: vec![],
        now: at(110),
    };
    let d = decide(&snap).expect("valid");
    assert_eq!(d.observed.nodes[0].ready_for, Some(Duration::from_secs(10)));
}

#[test]
fn a_complete_rollout_is_ready_and_records_the_current_version() {
    let mesh = MeshConfig::test().with_version("v2");
    let a = running(managed("a"), "v2", 0);
    let snap = Snapshot {
        mesh: &mesh,
        nodes: vec![node("a", &[])],
        enrollments: vec![&a],
        pods: vec![],
        now: at(1000),
    };
    let d = decide(&snap).expect("valid");
    let plan = rollout::plan(&d.policy, &d.observed);
    let st = status(&mesh, &d, &plan, &MeshConfigStatus::default(), at(1000));
    assert!(is_true(&st.conditions, READY));
    assert!(!is_true(&st.conditions, STALLED));
    let r = st.rollout.expect("rollout");
    assert_eq!(r.current_version.as_deref(), Some("v2"));
    assert_eq!(r.phase, RolloutPhase::Complete);
    assert_eq!((st.ready_nodes, st.updated_nodes), (1, 1));
}

#[test]
fn an_invalid_max_unavailable_names_the_field() {
    let mut mesh = MeshConfig::test();
    mesh.spec.upgrade.max_unavailable = IntOrString::String("lots".into());
    let err = policy(&mesh).expect_err("invalid");
    assert!(err.to_string().contains("spec.upgrade.maxUnavailable"));
    mesh.spec.upgrade.max_unavailable = IntOrString::String("25%".into());
    assert_eq!(
        policy(&mesh).map(|p| p.max_unavailable),
        Ok(MaxUnavailable::Percent(25))
    );
}
