//! Rollout engine tests: plain values in, actions out; no API server.

use super::*;

const OLD: &str = "v1";
const NEW: &str = "v2";

fn policy() -> Policy {
    Policy {
        max_unavailable: MaxUnavailable::Count(1),
        canary_nodes: 1,
        min_ready: Duration::from_secs(10),
        progress_deadline: Duration::from_secs(600),
        paused: false,
        auto_rollback: true,
    }
}

/// A node happily running `version` for a long time.
fn node_on(name: &str, version: &str) -> NodeView {
    NodeView {
        name: name.to_string(),
        desired_version: Some(version.to_string()),
        agent_version: Some(version.to_string()),
        pod_version: Some(version.to_string()),
        dataplane_ready: true,
        ready_for: Some(Duration::from_secs(3600)),
        upgrade_age: None,
        preflight_failure: None,
        dataplane_gaps: 0,
        link_ids_stable: true,
    }
}

/// A node whose desiredVersion was set to `NEW` and whose new pod is starting.
fn moving(name: &str, age_secs: u64) -> NodeView {
    NodeView {
        desired_version: Some(NEW.into()),
        pod_version: Some(NEW.into()),
        agent_version: Some(OLD.into()),
        dataplane_ready: true,
        upgrade_age: Some(Duration::from_secs(age_secs)),
        ..node_on(name, OLD)
    }
}

/// A node on `NEW`, ready for `secs`.
fn arrived(name: &str, secs: u64) -> NodeView {
    NodeView {
        ready_for: Some(Duration::from_secs(secs)),
        upgrade_age: Some(Duration::from_secs(secs + 2)),
        ..node_on(name, NEW)
    }
}

fn fleet(nodes: Vec<NodeView>) -> Observed {
    Observed {
        target_version: NEW.into(),
        current_version: Some(OLD.into()),
        halted: None,
        nodes,
    }
}

/// Nodes the plan moves to `version`.
fn moved_to(plan: &Plan, version: &str) -> Vec<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::SetDesiredVersion { node, version: v } if v == version => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn started(plan: &Plan) -> Vec<String> {
    moved_to(plan, NEW)
}

fn rolled_back(plan: &Plan) -> Vec<String> {
    moved_to(plan, OLD)
}

fn restarted(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::RestartAgent { node } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i:02}")).collect()
}

/// Drives the engine the way the controller and the kubelet would, one reconcile a tick:
/// a restarted agent reports the new version after one tick, then stays ready. Returns the
/// largest number of simultaneously unavailable nodes seen.
fn simulate(policy: &Policy, observed: &mut Observed, ticks: usize) -> usize {
    let mut worst = 0;
    for _ in 0..ticks {
        let plan = plan(policy, observed);
        for a in &plan.actions {
            match a {
                Action::SetDesiredVersion { node, version } => {
                    let n = observed
                        .nodes
                        .iter_mut()
                        .find(|n| &n.name == node)
                        .expect("node");
                    n.desired_version = Some(version.clone());
                    n.upgrade_age = Some(Duration::ZERO);
                }
                Action::RestartAgent { node } => {
                    let n = observed
                        .nodes
                        .iter_mut()
                        .find(|n| &n.name == node)
                        .expect("node");
                    n.pod_version = n.desired_version.clone();
                    n.dataplane_ready = false;
                    n.ready_for = None;
                }
            }
        }
        let unavailable = observed
            .nodes
            .iter()
            .filter(|n| {
                !is_updated(policy, n, &observed.target_version)
                    && n.desired_version.as_deref() == Some(observed.target_version.as_str())
            })
            .count();
        worst = worst.max(unavailable);
        // The world moves on: restarted agents come up on their pod's version; time passes.
        for n in &mut observed.nodes {
            if !n.dataplane_ready {
                n.agent_version = n.pod_version.clone();
                n.dataplane_ready = true;
                n.ready_for = Some(Duration::ZERO);
            } else if let Some(r) = n.ready_for.as_mut() {
                *r += Duration::from_secs(5);
            }
            if let Some(age) = n.upgrade_age.as_mut() {
                *age += Duration::from_secs(5);
            }
        }
        if plan.phase == Phase::Complete {
            break;
        }
    }
    worst
}

#[test]
fn canary_node_moves_first_and_alone() {
    let obs = fleet(names(5).iter().map(|n| node_on(n, OLD)).collect());
    let p = plan(
        &Policy {
            max_unavailable: MaxUnavailable::Count(3),
            ..policy()
        },
        &obs,
    );
    assert_eq!(p.phase, Phase::Canary);
    assert_eq!(started(&p), vec!["node-00"]);
    assert_eq!(restarted(&p), vec!["node-00"]);
}

#[test]
fn others_wait_until_canary_has_been_ready_for_min_ready_seconds() {
    let mut nodes: Vec<_> = names(4).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 5);
    let p = plan(
        &Policy {
            max_unavailable: MaxUnavailable::Count(3),
            ..policy()
        },
        &fleet(nodes.clone()),
    );
    assert!(
        started(&p).is_empty(),
        "canary ready for only 5s of 10s: {p:?}"
    );
    assert_eq!(p.in_flight, vec!["node-00"]);

    nodes[0] = arrived("node-00", 10);
    let p = plan(
        &Policy {
            max_unavailable: MaxUnavailable::Count(3),
            ..policy()
        },
        &fleet(nodes),
    );
    assert_eq!(p.phase, Phase::Rolling);
    assert_eq!(started(&p), vec!["node-01", "node-02", "node-03"]);
}

#[test]
fn integer_max_unavailable_bounds_nodes_in_flight() {
    let mut nodes: Vec<_> = names(6).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    nodes[1] = moving("node-01", 3);
    let p = plan(
        &Policy {
            max_unavailable: MaxUnavailable::Count(2),
            ..policy()
        },
        &fleet(nodes),
    );
    assert_eq!(started(&p), vec!["node-02"], "one slot left of two");
}

#[test]
fn percent_max_unavailable_rounds_up_and_never_below_one() {
    assert_eq!(MaxUnavailable::Percent(10).resolve(1000), 100);
    assert_eq!(MaxUnavailable::Percent(10).resolve(15), 2);
    assert_eq!(MaxUnavailable::Percent(1).resolve(3), 1);
    assert_eq!(MaxUnavailable::Percent(100).resolve(7), 7);
    assert_eq!(MaxUnavailable::Count(0).resolve(7), 1);

    let mut nodes: Vec<_> = names(20).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    let p = plan(
        &Policy {
            max_unavailable: MaxUnavailable::Percent(25),
            ..policy()
        },
        &fleet(nodes),
    );
    assert_eq!(started(&p).len(), 5);
}

#[test]
fn a_node_down_for_another_reason_uses_up_the_budget() {
    let mut nodes: Vec<_> = names(4).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    nodes[3].dataplane_ready = false;
    let p = plan(&policy(), &fleet(nodes));
    assert!(
        started(&p).is_empty(),
        "maxUnavailable 1 is used by node-03: {p:?}"
    );
}

#[test]
fn paused_starts_nothing_new_but_reports_progress() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    let p = plan(
        &Policy {
            paused: true,
            ..policy()
        },
        &fleet(nodes),
    );
    assert_eq!(p.phase, Phase::Paused);
    assert!(p.actions.is_empty());
    assert_eq!(p.updated, 1);
}

#[test]
fn failed_preflight_on_the_canary_halts_and_rolls_it_back() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = NodeView {
        preflight_failure: Some("unknown map layout 7".into()),
        dataplane_ready: false,
        ..moving("node-00", 4)
    };
    let p = plan(&policy(), &fleet(nodes.clone()));
    match &p.phase {
        Phase::RollingBack(h) => {
            assert_eq!(h.node, "node-00");
            assert!(
                h.reason.contains("preflight") && h.reason.contains("unknown map layout 7"),
                "{h:?}"
            );
        }
        other => panic!("expected RollingBack, got {other:?}"),
    }
    assert_eq!(rolled_back(&p), vec!["node-00"]);
    assert!(started(&p).is_empty(), "nothing else may move after a halt");

    let p = plan(
        &Policy {
            auto_rollback: false,
            ..policy()
        },
        &fleet(nodes),
    );
    assert!(matches!(p.phase, Phase::Halted(_)));
    assert!(
        p.actions.is_empty(),
        "without autoRollback nothing moves: {p:?}"
    );
}

#[test]
fn missed_progress_deadline_halts_naming_node_and_deadline() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = NodeView {
        dataplane_ready: false,
        ..moving("node-00", 601)
    };
    let p = plan(
        &Policy {
            auto_rollback: false,
            ..policy()
        },
        &fleet(nodes),
    );
    let Phase::Halted(h) = p.phase else {
        panic!("expected Halted, got {:?}", p.phase)
    };
    assert_eq!(h.node, "node-00");
    assert!(
        h.reason.contains("progressDeadlineSeconds (600s)"),
        "{}",
        h.reason
    );
}

#[test]
fn a_node_that_is_slow_but_within_its_deadline_does_not_halt() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = NodeView {
        dataplane_ready: false,
        ..moving("node-00", 599)
    };
    let p = plan(&policy(), &fleet(nodes));
    assert_eq!(p.phase, Phase::Canary);
}

#[test]
fn reported_dataplane_gap_halts_even_when_the_node_is_ready() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = NodeView {
        dataplane_gaps: 1,
        ..arrived("node-00", 60)
    };
    nodes[1] = NodeView {
        link_ids_stable: false,
        ..nodes[1].clone()
    };
    let p = plan(
        &Policy {
            auto_rollback: false,
            ..policy()
        },
        &fleet(nodes),
    );
    let Phase::Halted(h) = p.phase else {
        panic!("expected Halted, got {:?}", p.phase)
    };
    assert_eq!(h.node, "node-00");
    assert!(h.reason.contains("data-plane gap"));
}

#[test]
fn rollback_of_ready_nodes_respects_max_unavailable() {
    let mut nodes: Vec<_> = names(5).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    nodes[1] = arrived("node-01", 60);
    nodes[2] = arrived("node-02", 60);
    nodes[3] = NodeView {
        dataplane_gaps: 2,
        dataplane_ready: false,
        ..moving("node-03", 30)
    };
    let p = plan(&policy(), &fleet(nodes));
    // node-03 is down already and goes back at once; the ready ones wait their turn
    // (maxUnavailable 1 is used up by node-03).
    assert_eq!(rolled_back(&p), vec!["node-03"]);
}

#[test]
fn recorded_halt_persists_until_the_target_changes() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0].desired_version = Some(OLD.into()); // already rolled back
    let mut obs = fleet(nodes);
    obs.halted = Some(Halt {
        node: "node-00".into(),
        reason: "preflight failed".into(),
    });
    let p = plan(&policy(), &obs);
    assert!(matches!(p.phase, Phase::Halted(_)));
    assert!(
        p.actions.is_empty(),
        "a halted rollout must not start nodes: {p:?}"
    );
}

#[test]
fn node_added_mid_rollout_is_upgraded_too() {
    let mut nodes = vec![arrived("node-00", 60), arrived("node-01", 60)];
    nodes.push(node_on("node-02", OLD));
    let p = plan(&policy(), &fleet(nodes));
    assert_eq!(started(&p), vec!["node-02"]);
}

#[test]
fn node_removed_mid_rollout_frees_its_slot() {
    // node-01 was in flight and then removed from the fleet: it is no longer observed.
    let nodes = vec![arrived("node-00", 60), node_on("node-02", OLD)];
    let p = plan(&policy(), &fleet(nodes));
    assert_eq!(started(&p), vec!["node-02"]);
}

#[test]
fn newer_target_supersedes_an_unfinished_rollout() {
    let mut nodes: Vec<_> = names(3).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60); // on v2
    let mut obs = fleet(nodes);
    obs.target_version = "v3".into();
    let p = plan(&policy(), &obs);
    // node-00 is the canary again: it must reach v3 first.
    assert_eq!(
        p.actions.first(),
        Some(&Action::SetDesiredVersion {
            node: "node-00".into(),
            version: "v3".into()
        })
    );
}

#[test]
fn resumes_from_observed_state_alone_after_operator_restart() {
    // The previous leader set node-01's desiredVersion but died before deleting its pod.
    let mut nodes: Vec<_> = names(4).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    nodes[1] = NodeView {
        pod_version: Some(OLD.into()),
        ..moving("node-01", 1)
    };
    let p = plan(
        &Policy {
            max_unavailable: MaxUnavailable::Count(1),
            ..policy()
        },
        &fleet(nodes),
    );
    assert_eq!(
        restarted(&p),
        vec!["node-01"],
        "the pending restart is finished"
    );
    assert!(started(&p).is_empty(), "the slot is taken by node-01");
}

#[test]
fn fresh_install_enrolls_every_node_at_once() {
    let nodes: Vec<_> = names(4)
        .iter()
        .map(|n| NodeView {
            name: n.clone(),
            dataplane_ready: false,
            ..Default::default()
        })
        .collect();
    let mut obs = fleet(nodes);
    obs.current_version = None;
    let p = plan(&policy(), &obs);
    assert_eq!(started(&p).len(), 4);
}

#[test]
fn a_new_target_during_the_first_install_moves_serving_nodes_one_canary_at_a_time() {
    // Installed at v1 moments ago: two agents already serve, one has not started yet. The
    // fleet never reached a version, and the user now asks for v2.
    let mut obs = fleet(vec![
        arrived("node-1", 1),
        arrived("node-2", 1),
        NodeView {
            name: "node-3".into(),
            desired_version: Some(OLD.into()),
            ..Default::default()
        },
    ]);
    for n in &mut obs.nodes[..2] {
        n.agent_version = Some(OLD.into());
        n.desired_version = Some(OLD.into());
        n.pod_version = Some(OLD.into());
    }
    obs.current_version = None;
    let p = plan(&policy(), &obs);
    // node-3 has nothing to protect and takes the target at once; the serving canary node-1
    // would exceed maxUnavailable 1 while node-3 is down, so it waits; node-2 waits for it.
    assert_eq!(started(&p), vec!["node-3".to_string()]);

    // Once node-3 is up on v2, the canary moves, alone.
    obs.nodes[2] = arrived("node-3", 60);
    let p = plan(&policy(), &obs);
    assert_eq!(started(&p), vec!["node-1".to_string()]);
}

#[test]
fn whole_rollout_completes_without_exceeding_max_unavailable() {
    for (mu, total) in [
        (MaxUnavailable::Count(1), 5),
        (MaxUnavailable::Count(3), 10),
        (MaxUnavailable::Percent(10), 100),
    ] {
        let pol = Policy {
            max_unavailable: mu,
            ..policy()
        };
        let mut obs = fleet(names(total).iter().map(|n| node_on(n, OLD)).collect());
        let worst = simulate(&pol, &mut obs, 1000);
        assert!(
            worst <= mu.resolve(total),
            "{mu:?}: {worst} unavailable at once"
        );
        assert!(
            obs.nodes
                .iter()
                .all(|n| n.agent_version.as_deref() == Some(NEW)),
            "{mu:?}: not all moved"
        );
        assert_eq!(plan(&pol, &obs).phase, Phase::Complete);
    }
}

#[test]
fn same_observation_gives_the_same_plan() {
    let mut nodes: Vec<_> = names(6).iter().map(|n| node_on(n, OLD)).collect();
    nodes[0] = arrived("node-00", 60);
    let obs = fleet(nodes);
    let mut shuffled = obs.clone();
    shuffled.nodes.reverse();
    assert_eq!(plan(&policy(), &obs), plan(&policy(), &shuffled));
}
