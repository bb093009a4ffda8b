//! The IPsec reconciler against the in-memory xfrm: install order, rotation phases, peers
//! coming and going, adoption after a restart, removal of exactly the own objects, and a
//! missing algorithm halting a rotation without half-applying it.

use std::net::{IpAddr, Ipv4Addr};

use meshlet_agent::ipsec::keys::wire_spi;
use meshlet_agent::ipsec::reconcile::{self, ApplyError};
use meshlet_agent::ipsec::runner::reconcile_once;
use meshlet_agent::ipsec::xfrm::{PolicyId, RecordingXfrm, SaId, Xfrm, XfrmCall};
use meshlet_agent::ipsec::{
    Algorithm, IpsecConfig, KeyGeneration, POLICY_PRIORITY, Peer, reqid_for,
};

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, last))
}

fn key(spi: u32) -> KeyGeneration {
    KeyGeneration {
        spi,
        psk: vec![spi as u8; 32],
        salt: b"salt".to_vec(),
        algorithm: Algorithm::AesGcm,
    }
}

/// Node 1 with peers 2..=n, generations `spis`, active `active`.
fn cfg(n: u8, spis: &[u32], active: Option<u32>) -> IpsecConfig {
    IpsecConfig {
        node_name: "node-1".into(),
        local_address: ip(1),
        keys: spis.iter().map(|s| key(*s)).collect(),
        active_spi: active,
        peers: (2..=n)
            .map(|i| Peer {
                name: format!("node-{i}"),
                address: ip(i),
            })
            .collect(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn inbound(peer: u8, spi: u32) -> SaId {
    SaId {
        src: ip(peer),
        dst: ip(1),
        spi: wire_spi(spi, &format!("node-{peer}"), "node-1"),
    }
}

fn outbound(peer: u8, spi: u32) -> SaId {
    SaId {
        src: ip(1),
        dst: ip(peer),
        spi: wire_spi(spi, "node-1", &format!("node-{peer}")),
    }
}

fn policy(peer: u8) -> PolicyId {
    PolicyId {
        src: ip(1),
        dst: ip(peer),
    }
}

#[test]
fn enabling_installs_inbound_sas_before_outbound_sas_before_policies() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("apply");
        let kinds: Vec<u8> = x
            .calls
            .iter()
            .map(|c| match c {
                XfrmCall::InstallState(id, _) if id.dst == ip(1) => 0,
                XfrmCall::InstallState(..) => 1,
                XfrmCall::InstallPolicy(_) => 2,
                _ => 3,
            })
            .collect();
        assert_eq!(kinds, vec![0, 0, 1, 1, 2, 2], "calls: {:?}", x.calls);
        assert_eq!(x.states.len(), 4);
        assert_eq!(x.policies.get(&policy(2)).map(|p| p.0), Some(reqid_for(1)));
    });
}

#[test]
fn a_rotation_goes_install_switch_retire_without_a_gap() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("enable");
        // Installing: inbound SAs of generation 2 only; outbound stays on 1.
        x.calls.clear();
        reconcile_once(&mut x, Some(&cfg(3, &[1, 2], Some(1))))
            .await
            .expect("install");
        let mut got = x.calls.clone();
        got.sort_by_key(|c| format!("{c:?}"));
        let mut want = vec![
            XfrmCall::InstallState(inbound(2, 2), reqid_for(2)),
            XfrmCall::InstallState(inbound(3, 2), reqid_for(2)),
        ];
        want.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, want, "installing must add inbound SAs only");
        // Switching: outbound SA of 2 exists before the policy points at it; then the old
        // outbound SA goes. Inbound SAs of 1 stay (peers may still send with 1).
        x.calls.clear();
        reconcile_once(&mut x, Some(&cfg(3, &[1, 2], Some(2))))
            .await
            .expect("switch");
        let pos = |want: &XfrmCall| x.calls.iter().position(|c| c == want).expect("call made");
        let add_out = pos(&XfrmCall::InstallState(outbound(2, 2), reqid_for(2)));
        let repoint = x
            .calls
            .iter()
            .position(|c| matches!(c, XfrmCall::InstallPolicy(p) if p.id == policy(2)))
            .expect("policy repointed");
        let del_old = pos(&XfrmCall::DeleteState(outbound(2, 1)));
        assert!(add_out < repoint && repoint < del_old, "{:?}", x.calls);
        assert!(x.states.contains_key(&inbound(2, 1)));
        assert_eq!(x.policies[&policy(3)].0, reqid_for(2));
        // Retiring: only the inbound SAs of 1 go.
        x.calls.clear();
        reconcile_once(&mut x, Some(&cfg(3, &[2], Some(2))))
            .await
            .expect("retire");
        let mut dels: Vec<_> = x.calls.clone();
        dels.sort_by_key(|c| format!("{c:?}"));
        let mut want = vec![
            XfrmCall::DeleteState(inbound(2, 1)),
            XfrmCall::DeleteState(inbound(3, 1)),
        ];
        want.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(dels, want);
        assert_eq!(x.states.len(), 4);
    });
}

#[test]
fn peers_added_and_removed_get_and_lose_exactly_their_sas_and_policy() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("two peers");
        reconcile_once(&mut x, Some(&cfg(4, &[1], Some(1))))
            .await
            .expect("three peers");
        assert!(x.states.contains_key(&inbound(4, 1)) && x.states.contains_key(&outbound(4, 1)));
        assert!(x.policies.contains_key(&policy(4)));
        assert_eq!(x.states.len(), 6);
        // Peer 3 leaves.
        let mut c = cfg(4, &[1], Some(1));
        c.peers.retain(|p| p.name != "node-3");
        x.calls.clear();
        reconcile_once(&mut x, Some(&c)).await.expect("peer gone");
        assert!(!x.policies.contains_key(&policy(3)));
        assert!(!x.states.contains_key(&inbound(3, 1)) && !x.states.contains_key(&outbound(3, 1)));
        assert_eq!(x.states.len(), 4);
        assert!(
            x.calls
                .iter()
                .all(|c| !matches!(c, XfrmCall::InstallState(..) | XfrmCall::InstallPolicy(_))),
            "a departing peer must not touch the others: {:?}",
            x.calls
        );
    });
}

#[test]
fn a_restarted_agent_adopts_the_kernel_state_and_changes_nothing() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        let c = cfg(3, &[1, 2], Some(2));
        reconcile_once(&mut x, Some(&c)).await.expect("first agent");
        // A new agent process: same kernel, fresh reconciler.
        x.calls.clear();
        let stats = reconcile_once(&mut x, Some(&c))
            .await
            .expect("second agent");
        assert!(x.calls.is_empty(), "restart changed xfrm: {:?}", x.calls);
        assert_eq!(stats.states_added + stats.states_deleted, 0);
        let obs = x.list_own().await.expect("list");
        let st = reconcile::status(Some(&c), &obs, None);
        assert_eq!(st.installed_spis, vec![1, 2]);
        assert_eq!(st.active_spi, Some(2));
        assert_eq!(st.peers, 2);
    });
}

#[test]
fn removal_deletes_only_the_agents_own_states_and_policies() {
    rt().block_on(async {
        let foreign_sa = SaId {
            src: ip(1),
            dst: ip(99),
            spi: 0x999,
        };
        let foreign_policy = PolicyId {
            src: ip(1),
            dst: ip(99),
        };
        let mut x = RecordingXfrm::new()
            .with_foreign_state(foreign_sa, 7)
            .with_foreign_policy(foreign_policy, 7, 100);
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("enable");
        reconcile_once(&mut x, None).await.expect("remove");
        assert_eq!(
            x.states.keys().copied().collect::<Vec<_>>(),
            vec![foreign_sa]
        );
        assert_eq!(x.policies.len(), 1);
        assert_eq!(x.policies[&foreign_policy], (7, 100));
        assert_ne!(100, POLICY_PRIORITY);
    });
}

#[test]
fn an_algorithm_the_kernel_lacks_halts_the_rotation_and_rolls_back() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(4, &[1], Some(1))))
            .await
            .expect("enable");
        let before = x.clone();
        x.missing = vec![Algorithm::ChaCha20Poly1305];
        // An algorithm change is a rotation: generation 2 carries the new algorithm.
        let mut bad = cfg(4, &[1, 2], Some(1));
        bad.keys[1].algorithm = Algorithm::ChaCha20Poly1305;
        let err = reconcile_once(&mut x, Some(&bad))
            .await
            .expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("does not provide algorithm rfc7539esp(chacha20,poly1305)")
                && msg.contains("nothing was changed"),
            "{msg}"
        );
        assert_eq!(x.states, before.states);
        assert_eq!(x.policies, before.policies);
        match err {
            meshlet_agent::ipsec::runner::PassError::Apply(ApplyError::RolledBack {
                source,
                ..
            }) => assert_eq!(
                source.unavailable_algorithm(),
                Some(Algorithm::ChaCha20Poly1305)
            ),
            other => panic!("unexpected {other}"),
        }
    });
}

#[test]
fn generations_of_different_algorithms_coexist_during_a_rotation() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        let mut c = cfg(3, &[1, 2], Some(1));
        c.keys[1].algorithm = Algorithm::AesCbcHmacSha256;
        reconcile_once(&mut x, Some(&c)).await.expect("both");
        // Inbound for both generations from both peers, outbound on 1.
        assert_eq!(x.states.len(), 2 * 2 + 2);
        c.active_spi = Some(2);
        reconcile_once(&mut x, Some(&c)).await.expect("switch");
        assert!(x.policies.values().all(|p| p.0 == reqid_for(2)));
        let calls_before = x.calls.len();
        reconcile_once(&mut x, Some(&c)).await.expect("again");
        assert_eq!(
            x.calls.len(),
            calls_before,
            "an unchanged config changes nothing"
        );
    });
}

#[test]
fn a_changed_key_or_algorithm_of_an_installed_generation_replaces_its_sas() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        let c = cfg(3, &[1, 2], Some(2));
        reconcile_once(&mut x, Some(&c)).await.expect("enable");
        let mut rekeyed = c.clone();
        rekeyed.keys[1].psk = vec![0xee; 32];
        x.calls.clear();
        reconcile_once(&mut x, Some(&rekeyed)).await.expect("rekey");
        // Generation 2: 2 inbound + 2 outbound SAs deleted and added again; generation 1 and
        // the policies untouched.
        let deleted: Vec<_> = x
            .calls
            .iter()
            .filter_map(|c| match c {
                XfrmCall::DeleteState(id) => Some(*id),
                _ => None,
            })
            .collect();
        let added: Vec<_> = x
            .calls
            .iter()
            .filter_map(|c| match c {
                XfrmCall::InstallState(id, r) => Some((*id, *r)),
                _ => None,
            })
            .collect();
        assert_eq!(deleted.len(), 4, "{:?}", x.calls);
        assert_eq!(added.len(), 4, "{:?}", x.calls);
        assert!(added.iter().all(|(_, r)| *r == reqid_for(2)));
        assert!(
            !x.calls
                .iter()
                .any(|c| matches!(c, XfrmCall::InstallPolicy(_))),
            "{:?}",
            x.calls
        );
        let mut realg = rekeyed.clone();
        realg.keys[0].algorithm = Algorithm::AesCbcHmacSha256;
        x.calls.clear();
        reconcile_once(&mut x, Some(&realg))
            .await
            .expect("algorithm");
        assert_eq!(
            x.calls
                .iter()
                .filter(|c| matches!(c, XfrmCall::InstallState(..)))
                .count(),
            2,
            "only generation 1's inbound SAs: {:?}",
            x.calls
        );
    });
}

#[test]
fn a_failure_midway_removes_the_sas_added_before_it() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("enable");
        let before = x.states.clone();
        // 4 installs so far; the second install of the next apply fails.
        x.fail_install_at = Some(5);
        let err = reconcile_once(&mut x, Some(&cfg(5, &[1, 2], Some(2))))
            .await
            .expect_err("injected");
        match err {
            meshlet_agent::ipsec::runner::PassError::Apply(ApplyError::RolledBack {
                rolled_back,
                ..
            }) => assert!(rolled_back >= 1, "the SA added before the failure must go"),
            other => panic!("unexpected {other}"),
        }
        assert_eq!(x.states, before);
        assert!(x.policies.values().all(|p| p.0 == reqid_for(1)));
    });
}

#[test]
fn one_thousand_peers_plan_into_two_thousand_sas_and_one_thousand_policies() {
    let mut c = cfg(2, &[1], Some(1));
    c.peers = (0..1000u32)
        .map(|i| Peer {
            name: format!("peer-{i}"),
            address: IpAddr::V4(Ipv4Addr::new(10, 91, (i / 250) as u8, (i % 250 + 1) as u8)),
        })
        .collect();
    let started = std::time::Instant::now();
    let w = reconcile::wanted(Some(&c)).expect("wanted");
    let p = reconcile::plan(&w, &Default::default(), Some(c.local_address));
    println!(
        "derived and planned 1000 peers in {:?} ({} SAs, {} policies)",
        started.elapsed(),
        p.add_states.len(),
        p.set_policies.len()
    );
    assert_eq!(p.add_states.len(), 2000);
    assert_eq!(p.set_policies.len(), 1000);
    assert!(
        p.add_states[..1000]
            .iter()
            .all(|s| s.id.dst == c.local_address)
    );
}

#[test]
fn a_refused_algorithm_on_a_new_generation_leaves_a_changed_old_one_untouched() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("enable");
        let before = x.clone();
        x.missing = vec![Algorithm::ChaCha20Poly1305];
        // A file switching every generation to a missing algorithm: generation 2 is new and
        // goes first, so the refusal comes before any SA of generation 1 is replaced.
        let mut bad = cfg(3, &[1, 2], Some(1));
        for k in &mut bad.keys {
            k.algorithm = Algorithm::ChaCha20Poly1305;
        }
        let err = reconcile_once(&mut x, Some(&bad))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        assert_eq!(x.states, before.states);
        assert_eq!(x.policies, before.policies);
    });
}

#[test]
fn a_refused_replacement_costs_one_sa_and_says_so() {
    rt().block_on(async {
        let mut x = RecordingXfrm::new();
        reconcile_once(&mut x, Some(&cfg(3, &[1], Some(1))))
            .await
            .expect("enable");
        x.missing = vec![Algorithm::ChaCha20Poly1305];
        let mut bad = cfg(3, &[1], Some(1));
        bad.keys[0].algorithm = Algorithm::ChaCha20Poly1305;
        let err = reconcile_once(&mut x, Some(&bad))
            .await
            .expect_err("refused");
        match &err {
            meshlet_agent::ipsec::runner::PassError::Apply(ApplyError::ReplaceFailed {
                lost,
                ..
            }) => assert_eq!(*lost, 1),
            other => panic!("unexpected {other}"),
        }
        assert!(
            err.to_string().contains("1 of its SAs are removed"),
            "{err}"
        );
        assert_eq!(x.states.len(), 3, "only the first replaced SA is gone");
    });
}
