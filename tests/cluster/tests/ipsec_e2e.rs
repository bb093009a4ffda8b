//! IPsec end to end on the local cluster: the real operator Deployment and real agents from
//! `manifests/`, 3 nodes whose agents keep xfrm state in a recording file (the host kernel
//! has no ESP), an IPsecPolicy applied and rotated with kubectl.
//!
//! ```text
//!  kubectl apply IPsecPolicy ──► Stable a ── annotate rotate=1 ──► Installing → Switching →
//!      Retiring → Stable b   (clean: phase timings, drop-free order on every node)
//!  node-2 agent SIGSTOP ── annotate rotate=2 ──► Installing (held: node-2 cannot ack)
//!      ├─ node-1 agent SIGKILL ──► restarts, adopts (no state re-added)
//!      ├─ node-4 joins (its agent refuses the algorithm), node-2 resumes
//!      │     ──► Stalled naming node-4, 3 of 4 installed, no phase advance, SAs intact
//!      └─ node-4 fixed ──► Switching (4 of 4 installed) → Retiring → Stable c
//!  finally: no key bytes in kubectl output, Events or pod logs
//! ```

#[path = "support/ipsec.rs"]
mod ipsec;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipsec::*;
use meshlet_local_cluster::xfrm;
use meshlet_local_cluster::{ClusterOptions, Signal};
use support::mesh::*;
use support::*;

/// Longest a phase change may take in these tests.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent pod on `node` and its pid.
async fn agent_on(cluster: &meshlet_local_cluster::LocalCluster, node: &str) -> (String, u32) {
    eventually(
        &format!("a running agent on {node}"),
        Duration::from_secs(60),
        || async {
            let p = pods(cluster, NS, "app.kubernetes.io/name=meshlet-agent")
                .await
                .into_iter()
                .find(|p| node_of(p) == node && p.metadata.deletion_timestamp.is_none())?;
            let name = name_of(&p);
            let pid = cluster.pod_pid(NS, &name, "agent")?;
            Some((name, pid))
        },
    )
    .await
}

/// Calls recorded on each node so far, and its SAs now.
fn marks(all: &[Peer]) -> BTreeMap<String, (usize, Vec<xfrm::State>)> {
    all.iter()
        .map(|p| {
            let r = p.read();
            (p.name.clone(), (r.calls.len(), r.states))
        })
        .collect()
}

/// Asserts the drop-free order of the rotation `old → new` on every node in `all`.
fn assert_order(
    all: &[Peer],
    marks: &BTreeMap<String, (usize, Vec<xfrm::State>)>,
    old: u32,
    new: u32,
) {
    for p in all {
        let r = p.read();
        let (from, states) = marks.get(&p.name).cloned().unwrap_or_default();
        if let Err(e) = xfrm::check_rotation_order(p.ip, &states, &r.calls, from, old, new) {
            panic!(
                "{}: rotation {old} -> {new} not drop-free: {e}\ncalls: {:#?}",
                p.name,
                &r.calls[from..]
            );
        }
        // The order check saw the rotation happen on this node, not an empty log.
        let moves = r.calls[from..]
            .iter()
            .filter(|c| matches!(c, xfrm::Call::InstallPolicy(s) if xfrm::generation_of(s.reqid) == Some(new)))
            .count();
        let deletes = r.calls[from..]
            .iter()
            .filter(
                |c| matches!(c, xfrm::Call::DeleteState(id) if states.iter().any(|s| s.id == *id)),
            )
            .count();
        assert!(
            moves >= 2 && deletes >= 4,
            "{}: rotation {old} -> {new} moved {moves} policies and deleted {deletes} old SAs",
            p.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_moves_phase_by_phase_on_acks_without_a_drop_window() {
    let t0 = Instant::now();
    let mut cluster = install_with(
        ClusterOptions {
            nodes: 3,
            ..ClusterOptions::default()
        },
        // The test image with the xfrm recording: this host kernel has no ESP.
        "v2",
    )
    .await;
    println!(
        "installed, 3 nodes Ready after {} ms",
        t0.elapsed().as_millis()
    );
    let mut keys = PublishedKeys::default();

    // The policy, as a user applies it.
    let applied = Instant::now();
    apply(&cluster, "ipsecpolicy.yaml", &policy_yaml()).await;
    let a = wait_stable(&cluster, None, PHASE_TIMEOUT).await;
    wait_converged(&cluster, &[a], a).await;
    println!(
        "IPsecPolicy Stable on SPI {a}, every node holding SAs to both peers, after {} ms",
        applied.elapsed().as_millis()
    );
    assert_eq!(keys.collect(&cluster).await, BTreeSet::from([a]));
    let (ok, table, err) = kubectl(&cluster, &["get", "ipsecpolicy"]).await;
    assert!(
        ok && table.contains(POLICY) && table.contains("Stable"),
        "{table}{err}"
    );
    println!("{table}");

    // Rotation 1, undisturbed: every phase, in order, through the API.
    let original = peers(&cluster);
    let log = PhaseLog::start(&cluster);
    let sampler = Sampler::start(original.clone());
    let before = marks(&original);
    let start_events = log.events().len();
    let requested = Instant::now();
    request_rotation(&cluster, "1").await;
    let stable = log
        .wait(
            "Stable after rotation 1",
            start_events,
            PHASE_TIMEOUT,
            |e| e.phase == "Stable" && e.active.is_some_and(|s| s != a),
        )
        .await;
    let events = log.events()[start_events..=stable].to_vec();
    let b = events.last().and_then(|e| e.active).expect("new activeSPI");
    let seq = phase_sequence(&events);
    let names: Vec<&str> = seq.iter().map(|(p, _)| p.as_str()).collect();
    let tail: Vec<&str> = names
        .iter()
        .copied()
        .skip_while(|p| *p != "Installing")
        .collect();
    assert_eq!(
        tail,
        ["Installing", "Switching", "Retiring", "Stable"],
        "phases of rotation 1 seen through a watch: {names:?}"
    );
    let installing = events
        .iter()
        .find(|e| e.phase == "Installing")
        .expect("Installing");
    assert_eq!(
        (installing.active, installing.pending),
        (Some(a), Some(b)),
        "Installing keeps sending on the old SPI and installs the new one"
    );
    let switching = events
        .iter()
        .find(|e| e.phase == "Switching")
        .expect("Switching");
    assert_eq!(switching.active, Some(b), "Switching activates the new SPI");
    assert_eq!(
        switching.acks["installed"], switching.acks["selected"],
        "Switching before every node installed: {:?}",
        switching.acks
    );
    let retiring = events
        .iter()
        .find(|e| e.phase == "Retiring")
        .expect("Retiring");
    assert_eq!(
        retiring.acks["switched"], retiring.acks["selected"],
        "Retiring before every node switched: {:?}",
        retiring.acks
    );
    let rotation1 = phase_timings("rotation 1 (3 nodes)", requested, &seq);
    wait_converged(&cluster, &[b], b).await;
    assert_order(&original, &before, a, b);
    let report = sampler.stop().await;
    assert!(
        report.violations.is_empty(),
        "a node sent on a generation its peer could not receive during rotation 1: {:#?}",
        report.violations
    );
    println!(
        "rotation 1: {} samples of every node's xfrm state, no drop window",
        report.samples
    );
    keys.collect(&cluster).await;

    // Rotation 2, disturbed. Node-2's agent is frozen so the rotation cannot leave Installing.
    let sampler = Sampler::start(original.clone());
    let before = marks(&original);
    let (_, node2_pid) = agent_on(&cluster, "node-2").await;
    meshlet_local_cluster::process::signal(node2_pid, Signal::SIGSTOP).expect("SIGSTOP node-2");
    let start_events = log.events().len();
    let requested = Instant::now();
    request_rotation(&cluster, "2").await;
    let held = log
        .wait(
            "Installing with two acks (node-2 frozen)",
            start_events,
            PHASE_TIMEOUT,
            |e| e.phase == "Installing" && e.acks["installed"] == 2,
        )
        .await;
    let c = log.events()[held]
        .pending
        .expect("pendingSPI while Installing");
    assert_ne!(c, b);
    assert_eq!(log.events()[held].active, Some(b));

    // An agent killed mid-rotation comes back and adopts what the node holds.
    let node1 = original[0].clone();
    assert_eq!(node1.name, "node-1");
    let (pod1, pid1) = agent_on(&cluster, "node-1").await;
    let at_kill = node1.read();
    assert_eq!(
        at_kill
            .inbound(node1.ip)
            .values()
            .cloned()
            .collect::<Vec<_>>(),
        vec![BTreeSet::from([b, c]); 2],
        "node-1 installed the new generation before the kill"
    );
    cluster
        .kill_container(NS, &pod1, "agent", Signal::SIGKILL)
        .expect("kill node-1's agent");
    let killed = Instant::now();
    eventually(
        "node-1's agent to restart",
        Duration::from_secs(60),
        || async {
            let (_, pid) = agent_on(&cluster, "node-1").await;
            let p = pods(&cluster, NS, "app.kubernetes.io/name=meshlet-agent")
                .await
                .into_iter()
                .find(|p| name_of(p) == pod1)?;
            (pid != pid1 && ready(&p)).then_some(())
        },
    )
    .await;
    let restarted_ms = killed.elapsed().as_millis();
    // Let the restarted agent reconcile, then compare.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_restart = node1.read();
    let readds: Vec<_> = after_restart.calls[at_kill.calls.len()..]
        .iter()
        .filter(|c| {
            matches!(
                c,
                xfrm::Call::InstallState(..) | xfrm::Call::DeleteState(..)
            )
        })
        .collect();
    assert!(
        readds.is_empty(),
        "node-1's restarted agent changed SAs it should have adopted: {readds:?}"
    );
    assert_eq!(
        after_restart.states, at_kill.states,
        "node-1's SAs across its agent restart"
    );
    assert_eq!(
        after_restart.sending(node1.ip),
        at_kill.sending(node1.ip),
        "node-1's policies across its agent restart"
    );
    println!(
        "node-1's agent killed mid-rotation: back and Ready in {restarted_ms} ms, no SA re-added"
    );

    // A node joins mid-rotation, its agent refuses the algorithm: Stalled, naming it.
    let node4 = cluster
        .add_node_missing_xfrm_algorithms(&[GCM])
        .await
        .expect("add node-4");
    assert_eq!(node4, "node-4");
    log.wait("node-4 counted as selected", held, PHASE_TIMEOUT, |e| {
        e.acks["selected"] == 4
    })
    .await;
    // Node-2 thaws: from now on only node-4 holds the rotation back.
    meshlet_local_cluster::process::signal(node2_pid, Signal::SIGCONT).expect("SIGCONT node-2");
    let stalled = log
        .wait(
            "Stalled naming node-4 with the 3 other nodes installed",
            held,
            PHASE_TIMEOUT,
            |e| {
                e.acks["installed"] == 3
                    && e.stalled.as_deref().is_some_and(|m| m.contains("node-4"))
            },
        )
        .await;
    let stalled_event = log.events()[stalled].clone();
    println!(
        "while node-4 refuses {GCM}: Stalled {:?}",
        stalled_event.stalled
    );
    assert!(
        stalled_event
            .stalled
            .as_deref()
            .is_some_and(|m| m.contains("AlgorithmUnavailable")),
        "the Stalled condition names the reason: {stalled_event:?}"
    );
    assert_eq!(stalled_event.phase, "Installing", "{stalled_event:?}");
    let ne4 = enrollments(&cluster)
        .await
        .get("node-4")
        .cloned()
        .expect("node-4 enrolled");
    let cond = condition_of(&ne4, "IPsecReady")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("AlgorithmUnavailable")),
        "node-4's IPsecReady: {cond}"
    );
    let during_stall = marks(&original);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = policy(&cluster).await;
    assert_eq!(
        phase_of(&p),
        ("Installing".to_string(), Some(b), Some(c)),
        "the phase advanced while node-4 could not install: {}",
        p["status"]
    );
    assert_eq!(
        keys.collect(&cluster).await,
        BTreeSet::from([b, c]),
        "both generations stay published while Stalled"
    );
    for peer in &original {
        let now = peer.read();
        let then = &during_stall[&peer.name].1;
        assert!(
            then.iter().all(|s| now.states.contains(s)),
            "{} lost SAs while the rotation was stalled",
            peer.name
        );
        {
            assert_eq!(
                now.inbound(peer.ip)
                    .iter()
                    .filter(|(ip, _)| original.iter().any(|o| o.ip == **ip))
                    .map(|(_, g)| g.clone())
                    .collect::<Vec<_>>(),
                vec![BTreeSet::from([b, c]); 2],
                "{} keeps both generations from its original peers",
                peer.name
            );
        }
        assert!(
            now.sending(peer.ip).values().all(|g| *g == b),
            "{} still sends on {b}",
            peer.name
        );
    }

    // Node-4 gets a kernel with the algorithm: the rotation completes with 4 nodes.
    cluster
        .set_missing_xfrm_algorithms("node-4", &[])
        .expect("node-4's kernel");
    let (pod4, _) = agent_on(&cluster, "node-4").await;
    cluster
        .kill_container(NS, &pod4, "agent", Signal::SIGKILL)
        .expect("restart node-4's agent");
    let done = log
        .wait(
            "Stable after rotation 2",
            held,
            Duration::from_secs(120),
            |e| e.phase == "Stable" && e.active == Some(c),
        )
        .await;
    let events = log.events()[start_events..=done].to_vec();
    let seq = phase_sequence(&events);
    let names: Vec<&str> = seq.iter().map(|(p, _)| p.as_str()).collect();
    let tail: Vec<&str> = names
        .iter()
        .copied()
        .skip_while(|p| *p != "Installing")
        .collect();
    assert_eq!(
        tail,
        ["Installing", "Switching", "Retiring", "Stable"],
        "phases of rotation 2: {names:?}"
    );
    let switching = events
        .iter()
        .find(|e| e.phase == "Switching")
        .expect("Switching");
    assert_eq!(
        (
            switching.acks["selected"].as_i64(),
            switching.acks["installed"].as_i64()
        ),
        (Some(4), Some(4)),
        "the rotation switched before node-4 installed: {:?}",
        switching.acks
    );
    assert!(
        events[events.len() - 1].stalled.is_none(),
        "still Stalled after node-4 recovered"
    );
    let rotation2 = phase_timings(
        "rotation 2 (node-2 frozen, node-4 joining)",
        requested,
        &seq,
    );
    wait_converged(&cluster, &[c], c).await;
    let report = sampler.stop().await;
    assert!(
        report.violations.is_empty(),
        "a node sent on a generation its peer could not receive during rotation 2: {:#?}",
        report.violations
    );
    assert_order(&original, &before, b, c);
    // Node-4 held both generations from every original peer before the old one retired.
    let all = peers(&cluster);
    let p4 = all
        .iter()
        .find(|p| p.name == "node-4")
        .expect("node-4")
        .clone();
    let r4 = p4.read();
    for o in &original {
        for g in [b, c] {
            assert!(
                r4.calls.iter().any(|call| matches!(call,
                    xfrm::Call::InstallState(id, r) if id.src == o.ip && id.dst == p4.ip
                        && xfrm::generation_of(*r) == Some(g))),
                "node-4 never installed the inbound SA of {g} from {}",
                o.name
            );
        }
    }
    xfrm::check_rotation_order(p4.ip, &[], &r4.calls, 0, b, c)
        .unwrap_or_else(|e| panic!("node-4: {e}\n{:#?}", r4.calls));
    log.stop();

    // No key bytes anywhere a user or a log collector looks.
    assert!(keys.len() >= 3, "keys of a, b and c collected");
    let (ok, secret, err) = kubectl(
        &cluster,
        &["get", "secret", "-n", NS, KEY_SECRET, "-o", "yaml"],
    )
    .await;
    assert!(ok, "kubectl get secret: {err}");
    assert!(
        !keys.leaks(secret.as_bytes()).is_empty(),
        "the leak check does not even find the key in its own Secret"
    );
    let mut leaks = Vec::new();
    for (source, text) in visible_text(&cluster).await {
        for l in keys.leaks(&text) {
            leaks.push(format!("{source}: {l}"));
        }
    }
    assert!(leaks.is_empty(), "key material visible: {leaks:#?}");
    println!("{rotation1}\n{rotation2}");
    println!("whole test {} ms", t0.elapsed().as_millis());
    cluster.shutdown().await.expect("shutdown");
}
