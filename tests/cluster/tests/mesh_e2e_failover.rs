//! End to end on the local cluster: the operator Deployment scaled to 2 replicas, its leader
//! killed with SIGKILL in the middle of a rollout; the rollout resumes under the Lease holder
//! and never exceeds `maxUnavailable`, with clients connecting on every node.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use nix::sys::signal::Signal;
use support::mesh::*;
use support::*;

const OPERATOR_PODS: &str = "app.kubernetes.io/component=operator";

async fn holder(cluster: &meshlet_local_cluster::LocalCluster) -> Option<String> {
    Api::<Lease>::namespaced(cluster.client(), NS)
        .get_opt("meshlet-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leading_operator_mid_rollout_resumes_under_the_lease_within_max_unavailable() {
    let cluster = install(3, "v1").await;
    let (ok, out, err) = kubectl(
        &cluster,
        &[
            "-n",
            NS,
            "patch",
            "deployment/meshlet-operator",
            "--type=merge",
            "-p",
            r#"{"spec":{"replicas":2}}"#,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let operators = eventually("2 operator pods Ready", Duration::from_secs(60), || async {
        let p = pods(&cluster, NS, OPERATOR_PODS).await;
        (p.len() == 2 && p.iter().all(ready)).then_some(p)
    })
    .await;
    let leader = eventually("a Lease holder", Duration::from_secs(30), || {
        holder(&cluster)
    })
    .await;
    assert!(
        operators.iter().any(|p| name_of(p) == leader),
        "the Lease holder {leader} is one of the operator pods"
    );

    let mut traffic: Vec<Traffic> = Vec::new();
    for n in cluster.nodes() {
        traffic.push(Traffic::start(&cluster, &n, 1).await);
    }
    let started = Instant::now();
    apply(&cluster, "meshconfig.yaml", &meshconfig("v2", true)).await;
    eventually(
        "the rollout to have a node in flight",
        Duration::from_secs(60),
        || async {
            let m = mesh(&cluster).await;
            let moving = m["status"]["rollout"]["nodesInFlight"]
                .as_array()
                .is_some_and(|a| !a.is_empty());
            moving.then_some(())
        },
    )
    .await;
    let pid = cluster
        .pod_pid(NS, &leader, "operator")
        .expect("leader pid");
    cluster
        .kill_container(NS, &leader, "operator", Signal::SIGKILL)
        .expect("kill -9 the leader");
    // The leader's pod goes away with it (as when its node dies), so its Lease is never
    // released and the leader cannot come back under the same identity: the other replica
    // must wait out the Lease and take over.
    let (ok, out, err) = kubectl(
        &cluster,
        &["-n", NS, "delete", "pod", &leader, "--wait=false"],
    )
    .await;
    assert!(ok, "delete the killed leader's pod: {out}{err}");
    println!(
        "killed leader {leader} (pid {pid}) {} ms into the rollout",
        started.elapsed().as_millis()
    );

    let mut holders = BTreeSet::new();
    let mut max_unavailable = 0;
    loop {
        let down = unavailable(&cluster).await;
        assert!(
            down.len() <= 1,
            "maxUnavailable 1 exceeded after the failover: {down:?}"
        );
        max_unavailable = max_unavailable.max(down.len());
        if let Some(h) = holder(&cluster).await {
            holders.insert(h);
        }
        let m = mesh(&cluster).await;
        if condition(&m, "Ready")
            && m["status"]["updatedNodes"] == 3
            && m["status"]["rollout"]["targetVersion"] == "v2"
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the rollout did not resume after the failover: {m}\n{}",
            logs(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = holder(&cluster).await.unwrap_or_default();
    println!(
        "rollout finished {} ms after it started; Lease holders seen after the kill {holders:?}, now {after}; max unavailable {max_unavailable}",
        started.elapsed().as_millis()
    );
    assert!(!alive(pid), "the killed operator process is gone");
    assert!(
        !after.is_empty() && after != leader,
        "another operator took the Lease from the killed leader {leader}: holder now {after:?}"
    );
    for ne in enrollments(&cluster).await.values() {
        assert_eq!(ne["status"]["agentVersion"], "v2", "{ne}");
    }
    let mut reports = Vec::new();
    for t in traffic {
        reports.push(t.stop(&cluster).await);
    }
    for r in &reports {
        assert_eq!(count(r, "fail"), 0, "failed connections: {r}");
        assert!(count(r, "ok") > 0, "{r}");
    }
    cluster.shutdown().await.expect("shutdown");
}
