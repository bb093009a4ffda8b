//! End to end on the local cluster, when things go wrong: a broken agent version halts after
//! the canary with traffic untouched and `autoRollback` restores the canary; a node leaves the
//! mesh with nothing left behind and comes back with traffic.

mod support;

use std::time::{Duration, Instant};

use meshlet_local_cluster::process::pins_under;
use support::mesh::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_version_halts_after_the_canary_and_rolls_back_then_a_node_leaves_and_rejoins() {
    let cluster = install(3, "v2").await;
    for node in cluster.nodes() {
        eventually(
            &format!("the VIP to answer from {}", node.name),
            Duration::from_secs(30),
            || async { (count(&probe(&cluster, &node, 2).await, "ok") == 2).then_some(()) },
        )
        .await;
    }

    // A version whose preflight fails (MESHLET_CGROUP=/nonexistent/meshlet), autoRollback on.
    let mut traffic: Vec<Traffic> = Vec::new();
    for n in cluster.nodes() {
        traffic.push(Traffic::start(&cluster, &n, 2).await);
    }
    let started = Instant::now();
    apply(&cluster, "meshconfig.yaml", &meshconfig("broken", true)).await;
    let (stalled, canary) = eventually(
        "the MeshConfig to report Stalled with the canary's preflight failure",
        Duration::from_secs(120),
        || async {
            let m = mesh(&cluster).await;
            let c = condition_of(&m, "Stalled")?;
            if c["status"] != "True" {
                return None;
            }
            let msg = c["message"].as_str().unwrap_or_default().to_string();
            let node = cluster
                .nodes()
                .into_iter()
                .find(|n| msg.contains(&n.name))?;
            Some((msg, node.name))
        },
    )
    .await;
    println!(
        "halted {} ms after the change: {stalled}",
        started.elapsed().as_millis()
    );
    assert!(
        stalled.to_lowercase().contains("preflight"),
        "Stalled names the reason: {stalled}"
    );
    // The others never moved, and the canary goes back to v2.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let nes = enrollments(&cluster).await;
        let agents = pods(&cluster, NS, "app.kubernetes.io/name=meshlet-agent").await;
        let all_v2 = nes.len() == 3
            && nes
                .values()
                .all(|ne| ne["status"]["agentVersion"] == "v2" && condition(ne, "Ready"));
        let version = |p: &k8s_openapi::api::core::v1::Pod| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("meshlet.io/version"))
                .cloned()
                .unwrap_or_default()
        };
        let pods_v2 = agents.len() == 3 && agents.iter().all(|p| ready(p) && version(p) == "v2");
        if all_v2 && pods_v2 {
            break;
        }
        if Instant::now() > deadline {
            let pods: Vec<_> = agents
                .iter()
                .map(|p| (name_of(p), node_of(p), version(p), ready(p)))
                .collect();
            panic!(
                "the canary did not come back to v2: pods {pods:?}\nMeshConfig {}\nNodeEnrollments {}\n{}",
                mesh(&cluster).await,
                serde_json::to_string(&nes).unwrap_or_default(),
                logs(&cluster)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = mesh(&cluster).await;
    println!(
        "canary {canary} rolled back after {} ms; rollout: {}",
        started.elapsed().as_millis(),
        m["status"]["rollout"]
    );
    for ne in enrollments(&cluster).await.values() {
        assert_eq!(ne["spec"]["desiredVersion"], "v2", "{ne}");
    }
    let mut reports = Vec::new();
    for t in traffic {
        reports.push(t.stop(&cluster).await);
    }
    for r in &reports {
        assert_eq!(
            count(r, "fail"),
            0,
            "failed connections during the halt: {r}"
        );
        assert_eq!(count(r, "wrong"), 0, "{r}");
        assert!(count(r, "ok") > 0, "{r}");
    }
    println!("traffic during the broken rollout: {reports:?}");

    // node-3 leaves the mesh: its NodeEnrollment goes away with every pin and the VIP.
    let node3 = cluster.node("node-3").expect("node-3");
    let (ok, out, err) = kubectl(
        &cluster,
        &["label", "node", "node-3", &format!("{EXCLUDE_LABEL}=true")],
    )
    .await;
    assert!(ok, "{out}{err}");
    eventually(
        "node-3's NodeEnrollment to be gone",
        Duration::from_secs(60),
        || async { (!enrollments(&cluster).await.contains_key("node-3")).then_some(()) },
    )
    .await;
    assert!(
        pins_under(&node3.bpffs_root).is_empty(),
        "pins left under {}: {:?}",
        node3.bpffs_root.display(),
        pins_under(&node3.bpffs_root)
    );
    let r = probe(&cluster, &node3, 2).await;
    assert_eq!(
        count(&r, "ok"),
        0,
        "the VIP is still rewritten in node-3's cgroup: {r}"
    );
    for n in ["node-1", "node-2"] {
        let node = cluster.node(n).expect("node");
        let r = probe(&cluster, &node, 2).await;
        assert_eq!(count(&r, "ok"), 2, "{n} keeps its traffic: {r}");
    }

    // Back in: traffic returns.
    let (ok, out, err) = kubectl(
        &cluster,
        &["label", "node", "node-3", &format!("{EXCLUDE_LABEL}-")],
    )
    .await;
    assert!(ok, "{out}{err}");
    wait_enrolled_ready(&cluster, 3).await;
    eventually(
        "the VIP to answer from node-3 again",
        Duration::from_secs(60),
        || async { (count(&probe(&cluster, &node3, 2).await, "ok") == 2).then_some(()) },
    )
    .await;
    assert!(!pins_under(&node3.bpffs_root).is_empty());
    cluster.shutdown().await.expect("shutdown");
}
