//! Phase-machine tests: acknowledgements in every order, nodes joining and leaving,
//! operator restarts.

use super::*;

const A: u32 = 0x100;
const B: u32 = 0x101;

fn stable_node(name: &str) -> NodeAck {
    NodeAck {
        node: name.into(),
        installed_spis: vec![A],
        active_spi: Some(A),
        error: None,
    }
}

fn fleet(n: usize) -> Vec<NodeAck> {
    (0..n).map(|i| stable_node(&format!("node-{i}"))).collect()
}

/// What a well-behaved agent does on seeing `state` (the published keys and active SPI):
/// inbound SAs for exactly the published generations, outbound on the active one.
fn agent_reacts(state: RotationState, node: &mut NodeAck) {
    node.installed_spis = state.published_spis();
    // Outbound moves only to an SPI whose inbound every peer has: the published active one.
    node.active_spi = state.active_spi();
}

/// At every instant, every node must be able to receive what every other node sends.
fn assert_no_drop(nodes: &[NodeAck]) {
    for sender in nodes {
        let Some(spi) = sender.active_spi else {
            continue;
        };
        for receiver in nodes {
            assert!(
                receiver.installed_spis.contains(&spi),
                "{} sends SPI {spi:#x} but {} only has {:?}",
                sender.node,
                receiver.node,
                receiver.installed_spis
            );
        }
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn first_key_is_published_stable_without_a_rotation() {
    let s = step(RotationState::Unkeyed, &fleet(3), false);
    assert_eq!(s.next, RotationState::Stable { active: FIRST_SPI });
}

#[test]
fn rotation_request_starts_installing_the_next_spi_and_keeps_sending_the_old() {
    let s = step(RotationState::Stable { active: A }, &fleet(3), true);
    assert_eq!(s.next, RotationState::Installing { old: A, new: B });
    assert_eq!(s.next.active_spi(), Some(A));
    assert_eq!(s.next.published_spis(), vec![A, B]);
    assert_eq!(
        s.acks,
        Acks {
            selected: 3,
            acknowledged: 0
        }
    );
}

#[test]
fn rotation_request_mid_rotation_is_ignored() {
    let st = RotationState::Switching { old: A, new: B };
    assert_eq!(step(st, &fleet(2), true).next, st);
}

#[test]
fn every_order_of_acks_completes_and_never_drops_a_packet() {
    for order in permutations(4) {
        let mut nodes = fleet(4);
        let mut state = step(RotationState::Stable { active: A }, &nodes, true).next;
        // Nodes react one at a time in `order`, the operator steps after each reaction.
        for _round in 0..3 {
            for &i in &order {
                agent_reacts(state, &mut nodes[i]);
                assert_no_drop(&nodes);
                state = step(state, &nodes, false).next;
            }
        }
        assert_eq!(
            state,
            RotationState::Stable { active: B },
            "order {order:?}"
        );
        assert!(
            nodes.iter().all(|n| n.installed_spis == vec![B]),
            "order {order:?}: {nodes:?}"
        );
    }
}

#[test]
fn phase_waits_for_the_last_node() {
    let mut nodes = fleet(3);
    let state = RotationState::Installing { old: A, new: B };
    agent_reacts(state, &mut nodes[0]);
    agent_reacts(state, &mut nodes[1]);
    let s = step(state, &nodes, false);
    assert_eq!(s.next, state);
    assert_eq!(
        s.acks,
        Acks {
            selected: 3,
            acknowledged: 2
        }
    );
}

#[test]
fn node_leaving_mid_phase_no_longer_blocks_it() {
    let mut nodes = fleet(3);
    let state = RotationState::Installing { old: A, new: B };
    agent_reacts(state, &mut nodes[0]);
    agent_reacts(state, &mut nodes[1]);
    nodes.pop(); // node-2 unenrolled before acknowledging
    assert_eq!(
        step(state, &nodes, false).next,
        RotationState::Switching { old: A, new: B }
    );
}

#[test]
fn node_joining_mid_rotation_gets_both_keys_and_is_waited_for() {
    for joined_in in [
        RotationState::Installing { old: A, new: B },
        RotationState::Switching { old: A, new: B },
        RotationState::Retiring { old: A, new: B },
    ] {
        let mut nodes = fleet(3);
        for n in &mut nodes {
            n.installed_spis = vec![A, B];
            n.active_spi = joined_in.active_spi();
        }
        let newcomer = NodeAck {
            node: "late".into(),
            ..Default::default()
        };
        nodes.push(newcomer);
        let expected = if matches!(joined_in, RotationState::Retiring { .. }) {
            vec![B]
        } else {
            vec![A, B]
        };
        assert_eq!(joined_in.published_spis(), expected, "{joined_in:?}");
        // Until the newcomer acknowledges, the phase holds (except Retiring, which waits
        // only for SPIs to be removed and the newcomer has none yet).
        let s = step(joined_in, &nodes, false);
        if !matches!(joined_in, RotationState::Retiring { .. }) {
            assert_eq!(
                s.next, joined_in,
                "must wait for the newcomer in {joined_in:?}"
            );
        }
        let mut state = s.next;
        for _ in 0..4 {
            for n in &mut nodes {
                agent_reacts(state, n);
            }
            assert_no_drop(&nodes);
            state = step(state, &nodes, false).next;
        }
        assert_eq!(
            state,
            RotationState::Stable { active: B },
            "joined in {joined_in:?}"
        );
    }
}

#[test]
fn operator_restart_resumes_from_persisted_state_even_if_acks_ran_ahead() {
    // The operator persisted Installing, then died; meanwhile everyone installed B.
    let mut nodes = fleet(3);
    for n in &mut nodes {
        n.installed_spis = vec![A, B];
    }
    let s = step(RotationState::Installing { old: A, new: B }, &nodes, false);
    assert_eq!(
        s.next,
        RotationState::Switching { old: A, new: B },
        "switching waits for outbound acks"
    );
    // Nothing is skipped: Switching needs every node sending on B first.
    for n in &mut nodes {
        n.active_spi = Some(B);
    }
    assert_eq!(
        step(s.next, &nodes, false).next,
        RotationState::Retiring { old: A, new: B }
    );
}

#[test]
fn node_error_blocks_the_phase_with_the_reason_and_keeps_the_old_key_active() {
    let mut nodes = fleet(2);
    nodes[1].error = Some("kernel lacks algorithm rfc4106(gcm(aes))".into());
    let state = RotationState::Installing { old: A, new: B };
    agent_reacts(state, &mut nodes[0]);
    let s = step(state, &nodes, false);
    assert_eq!(s.next, state);
    assert_eq!(s.next.active_spi(), Some(A));
    let why = s.blocked.expect("blocked");
    assert!(
        why.contains("node-1") && why.contains("rfc4106") && why.contains("Installing"),
        "{why}"
    );
}

#[test]
fn spi_wraps_around_past_the_reserved_range() {
    assert_eq!(next_spi(u32::MAX), FIRST_SPI);
    assert_eq!(
        next_spi(0xffff),
        FIRST_SPI,
        "the agent accepts only 256..=65535"
    );
    assert_eq!(next_spi(0x100), 0x101);
    assert_eq!(next_spi(5), FIRST_SPI);
}
