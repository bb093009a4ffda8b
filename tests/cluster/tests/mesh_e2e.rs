//! End to end on the local cluster: Meshlet installed from `manifests/` with the RBAC
//! enforced, 3 nodes with real agents, a Service reached through its VIP from every node, and
//! an upgrade v1 → v2 (map layout migration) with `maxUnavailable: 1` while clients connect
//! continuously on every node.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::mesh::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_v1_to_v2_under_traffic_loses_no_connection_and_stays_within_max_unavailable() {
    let t0 = Instant::now();
    let cluster = install(3, "v1").await;
    println!(
        "installed, 3 NodeEnrollments Ready after {} ms",
        t0.elapsed().as_millis()
    );

    let before = enrollments(&cluster).await;
    let mut links_before = BTreeMap::new();
    for (node, ne) in &before {
        assert_eq!(ne["status"]["agentVersion"], "v1", "{node}: {ne}");
        let l = layouts(ne);
        assert!(
            !l.is_empty() && l.values().all(|v| *v == 1),
            "{node} on layout 1: {l:?}"
        );
        let links = link_ids(ne);
        assert!(!links.is_empty(), "{node} reports its links: {ne}");
        links_before.insert(node.clone(), links);
    }

    // The VIP answers from every node's cgroup.
    for node in cluster.nodes() {
        let r = eventually(
            &format!("the VIP to answer from {}", node.name),
            Duration::from_secs(30),
            || async {
                let r = probe(&cluster, &node, 4).await;
                (count(&r, "ok") == 4).then_some(r)
            },
        )
        .await;
        assert_eq!(count(&r, "wrong"), 0, "{r}");
    }

    // Continuous clients on every node, then the upgrade.
    let mut traffic: Vec<Traffic> = Vec::new();
    for n in cluster.nodes() {
        traffic.push(Traffic::start(&cluster, &n, 2).await);
    }
    let started = Instant::now();
    apply(&cluster, "meshconfig.yaml", &meshconfig("v2", true)).await;

    let mut max_unavailable = 0;
    let mut updated_seen = BTreeSet::new();
    let mut in_flight_seen = BTreeSet::new();
    let mut phases = BTreeSet::new();
    loop {
        let down = unavailable(&cluster).await;
        let m = mesh(&cluster).await;
        let in_flight: Vec<String> = m["status"]["rollout"]["nodesInFlight"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            down.len() <= 1 && in_flight.len() <= 1,
            "maxUnavailable 1 exceeded: unavailable {down:?}, in flight {in_flight:?}"
        );
        max_unavailable = max_unavailable.max(down.len());
        in_flight_seen.extend(in_flight);
        if let Some(u) = m["status"]["updatedNodes"].as_i64() {
            updated_seen.insert(u);
        }
        if let Some(p) = m["status"]["rollout"]["phase"].as_str() {
            phases.insert(p.to_string());
        }
        let done = m["status"]["observedGeneration"] == m["metadata"]["generation"]
            && condition(&m, "Ready")
            && m["status"]["updatedNodes"] == 3
            && m["status"]["rollout"]["targetVersion"] == "v2";
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "rollout to v2 did not finish: {m}\n{}",
            logs(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rollout_ms = started.elapsed().as_millis();
    let (ok, out, err) = kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "meshconfig/default",
            "--timeout=60s",
        ],
    )
    .await;
    assert!(ok, "kubectl wait meshconfig/default: {out}{err}");

    let mut reports = Vec::new();
    for t in traffic {
        reports.push(t.stop(&cluster).await);
    }
    let (mut ok_total, mut fail_total) = (0, 0);
    for r in &reports {
        assert_eq!(
            count(r, "fail"),
            0,
            "failed connections during the upgrade: {r}"
        );
        assert_eq!(count(r, "wrong"), 0, "connection to a wrong backend: {r}");
        assert!(count(r, "ok") > 0, "no connection went through: {r}");
        ok_total += count(r, "ok");
        fail_total += count(r, "fail");
    }
    println!(
        "rollout v1 -> v2 on 3 nodes in {rollout_ms} ms; connections ok {ok_total}, failed {fail_total}; \
         max unavailable {max_unavailable}; updatedNodes seen {updated_seen:?}; in flight seen {in_flight_seen:?}; phases {phases:?}"
    );
    assert!(
        !in_flight_seen.is_empty(),
        "status never showed a node in flight"
    );
    assert!(
        updated_seen.len() >= 2 && updated_seen.contains(&3),
        "updatedNodes did not visibly grow: {updated_seen:?}"
    );

    let after = enrollments(&cluster).await;
    assert_eq!(after.len(), 3);
    for (node, ne) in &after {
        assert_eq!(ne["status"]["agentVersion"], "v2", "{node}: {ne}");
        // The endpoint and backend maps follow the data-plane layout; the others keep layout 1.
        let l = layouts(ne);
        assert!(
            ["endpoint", "backend"]
                .iter()
                .all(|m| l.get(*m) == Some(&2)),
            "{node} migrated its endpoint and backend maps to layout 2: {l:?}"
        );
        assert_eq!(
            link_ids(ne),
            links_before[node],
            "{node}: link ids changed across the upgrade"
        );
        assert_eq!(
            ne["status"]["continuity"]["linkIdsStable"], true,
            "{node}: {ne}"
        );
    }

    // GitOps: re-applying the same manifests and MeshConfig changes nothing and conflicts with nothing.
    let generation = mesh(&cluster).await["metadata"]["generation"].clone();
    let (ok, out, err) = kubectl(&cluster, &["apply", "--server-side", "-k", "manifests/"]).await;
    assert!(ok, "re-apply manifests: {out}{err}");
    apply(&cluster, "meshconfig.yaml", &meshconfig("v2", true)).await;
    let m = mesh(&cluster).await;
    assert_eq!(
        m["metadata"]["generation"], generation,
        "re-apply changed the spec"
    );
    assert!(condition(&m, "Ready"), "{m}");
    for node in cluster.nodes() {
        let r = probe(&cluster, &node, 4).await;
        assert_eq!(
            count(&r, "ok"),
            4,
            "VIP from {} after the upgrade: {r}",
            node.name
        );
    }
    cluster.shutdown().await.expect("shutdown");
}
