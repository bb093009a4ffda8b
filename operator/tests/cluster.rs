//! The operator against the API test server, running as its ServiceAccount under the shipped
//! RBAC, with the stand-in kubelet/agent answering for the nodes.

mod support;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{apps::v1::DaemonSet, core::v1::Node},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use meshlet_crds::{
    MeshConfig, NodeEnrollment,
    conditions::{STALLED, find_condition},
    names::{AGENT_NAME, DATAPLANE_FINALIZER, NAMESPACE, OPERATOR_FIELD_MANAGER},
    v1alpha1::meshconfig::RolloutPhase,
};
use meshlet_operator::render::{MANAGED_BY_LABEL, VERSION_LABEL};
use serde_json::json;
use support::{Cluster, StandIn, eventually, kubectl, unavailable_nodes};

const LEASE_SECS: f64 = 2.0;

fn mesh(version: &str) -> MeshConfig {
    let mut mc = MeshConfig::test().with_version(version);
    mc.spec.upgrade.min_ready_seconds = 1;
    mc.spec.upgrade.progress_deadline_seconds = 30;
    mc
}

fn selecting(mut mc: MeshConfig, key: &str, value: &str) -> MeshConfig {
    mc.spec.enrollment.node_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
        ..LabelSelector::default()
    });
    mc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_follows_the_selector_and_keeps_the_finalizer_until_the_agent_releases_it() {
    let cluster = Cluster::start().await;
    cluster
        .add_nodes(&["node-a", "node-b", "node-c"], &[("mesh", "on")])
        .await;
    cluster.add_nodes(&["node-x"], &[]).await;
    let stand_in = StandIn::start(&cluster).await;
    let _op = cluster.start_operator("op-0", LEASE_SECS).await;
    cluster
        .apply_meshconfig(&selecting(mesh("v1"), "mesh", "on"))
        .await;

    let st = cluster.wait_ready("v1", 3, 30).await;
    assert_eq!(
        (st.selected_nodes, st.enrolled_nodes, st.ready_nodes),
        (3, 3, 3)
    );
    let nes = cluster.enrollments().await;
    assert_eq!(
        nes.keys().cloned().collect::<Vec<_>>(),
        ["node-a", "node-b", "node-c"]
    );
    for ne in nes.values() {
        assert_eq!(
            ne.metadata.finalizers.as_deref(),
            Some(&[DATAPLANE_FINALIZER.to_owned()][..])
        );
        assert!(
            ne.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(MANAGED_BY_LABEL))
        );
    }

    // node-c leaves the selector while its agent has not cleaned up yet.
    stand_in
        .release_finalizers
        .store(false, std::sync::atomic::Ordering::Relaxed);
    Api::<Node>::all(cluster.admin.clone())
        .patch(
            "node-c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mesh": "off"}}})),
        )
        .await
        .expect("relabel node-c");
    let ne_api: Api<NodeEnrollment> = Api::all(cluster.admin.clone());
    eventually(15, "node-c's enrollment marked for deletion", || async {
        let ne = ne_api.get_opt("node-c").await.ok()??;
        ne.metadata.deletion_timestamp.map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = ne_api.get_opt("node-c").await.expect("get");
    assert!(
        held.is_some(),
        "the enrollment must stay until the agent releases the finalizer"
    );
    stand_in
        .release_finalizers
        .store(true, std::sync::atomic::Ordering::Relaxed);
    eventually(15, "node-c's enrollment gone", || async {
        ne_api.get_opt("node-c").await.ok()?.is_none().then_some(())
    })
    .await;
    let st = cluster.wait_ready("v1", 2, 15).await;
    assert_eq!(st.selected_nodes, 2);

    // node-b is deleted outright: no agent is left to clean up, so once its agent pod is gone
    // (pod garbage collection) the operator releases the finalizer itself.
    stand_in
        .release_finalizers
        .store(false, std::sync::atomic::Ordering::Relaxed);
    Api::<Node>::all(cluster.admin.clone())
        .delete("node-b", &Default::default())
        .await
        .expect("delete node-b");
    eventually(15, "node-b's enrollment marked for deletion", || async {
        let ne = ne_api.get_opt("node-b").await.ok()??;
        ne.metadata.deletion_timestamp.map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ne_api.get_opt("node-b").await.expect("get").is_some(),
        "the finalizer must stay while node-b's agent pod exists"
    );
    let pod = cluster.agent_pods().await["node-b"]
        .metadata
        .name
        .clone()
        .expect("pod name");
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.admin.clone(), NAMESPACE)
        .delete(&pod, &Default::default())
        .await
        .expect("delete node-b's agent pod");
    eventually(15, "node-b's enrollment gone", || async {
        ne_api.get_opt("node-b").await.ok()?.is_none().then_some(())
    })
    .await;
    stand_in
        .release_finalizers
        .store(true, std::sync::atomic::Ordering::Relaxed);
    cluster.wait_ready("v1", 1, 15).await;

    // A user enrolls a node that does not exist: Stalled, naming it; nothing else changes.
    ne_api
        .create(&PostParams::default(), &NodeEnrollment::test("ghost-node"))
        .await
        .expect("create user enrollment");
    let msg = eventually(15, "Stalled naming ghost-node", || async {
        let st = cluster.meshconfig().await.status?;
        let c = find_condition(&st.conditions, STALLED)?.clone();
        (c.status == "True" && c.message.contains("ghost-node")).then_some(c.message)
    })
    .await;
    assert!(msg.contains("does not exist"), "{msg}");
    let ghost = ne_api
        .get("ghost-node")
        .await
        .expect("user enrollment kept");
    assert!(ghost.metadata.deletion_timestamp.is_none());
    eventually(10, "a NodeNotFound event", || async {
        cluster
            .event_reasons()
            .await
            .iter()
            .any(|r| r == "NodeNotFound")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_daemonset_follows_the_contract_and_a_second_identical_apply_changes_nothing() {
    let cluster = Cluster::start().await;
    cluster.add_nodes(&["node-a"], &[]).await;
    let _stand_in = StandIn::start(&cluster).await;
    let _op = cluster.start_operator("op-0", LEASE_SECS).await;
    let mc = mesh("1.2.3");
    cluster.apply_meshconfig(&mc).await;
    cluster.wait_ready("1.2.3", 1, 30).await;
    let (ok, out) = kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "meshconfig/default",
            "--timeout=20s",
        ],
    )
    .await;
    assert!(ok, "kubectl wait failed: {out}");

    let ds = Api::<DaemonSet>::namespaced(cluster.admin.clone(), NAMESPACE)
        .get(AGENT_NAME)
        .await
        .expect("agent DaemonSet");
    let v = serde_json::to_value(&ds).expect("json");
    assert_eq!(v["spec"]["updateStrategy"]["type"], "OnDelete");
    let pod = &v["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"][VERSION_LABEL], "1.2.3");
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/name"],
        AGENT_NAME
    );
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/component"],
        "agent"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], AGENT_NAME);
    let agent = &pod["spec"]["containers"][0];
    assert_eq!(agent["image"], "ghcr.io/meshlet-io/meshlet-agent:1.2.3");
    assert_eq!(agent["args"], json!(["run", "--kubernetes"]));
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    // bpffs is mounted on the node first (if missing), then the new version's preflight runs.
    let inits: Vec<&serde_json::Value> = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .map(|c| &c["args"])
        .collect();
    assert_eq!(inits, [&json!(["mount-bpffs"]), &json!(["preflight"])]);
    let names: Vec<&str> = agent["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for want in [
        "NODE_NAME",
        "MESHLET_AGENT_VERSION",
        "MESHLET_BPFFS_ROOT",
        "MESHLET_MAX_SERVICES",
        "MESHLET_MAX_ENDPOINTS",
        "MESHLET_LOG_LEVEL",
        "MESHLET_METRICS_ADDR",
    ] {
        assert!(names.contains(&want), "missing env {want}: {names:?}");
    }
    let managers: Vec<String> = ds
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, [OPERATOR_FIELD_MANAGER]);

    // GitOps: the same MeshConfig applied again by its owner is a no-op without conflict,
    // even though the operator has written status meanwhile.
    let before = cluster.meshconfig().await;
    let after = cluster.apply_meshconfig(&mc).await;
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    let user_fields = after
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.manager.as_deref() == Some(OPERATOR_FIELD_MANAGER))
        .all(|m| m.subresource.as_deref() == Some("status"));
    assert!(
        user_fields,
        "the operator must own no spec field of the MeshConfig"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_max_unavailable_one_never_has_two_nodes_down_and_survives_an_api_restart() {
    let cluster = Cluster::start().await;
    let nodes = ["node-1", "node-2", "node-3", "node-4"];
    cluster.add_nodes(&nodes, &[]).await;
    let stand_in = StandIn::start(&cluster).await;
    let _op = cluster.start_operator("op-0", LEASE_SECS).await;
    cluster.apply_meshconfig(&mesh("v1")).await;
    cluster.wait_ready("v1", 4, 30).await;

    cluster.apply_meshconfig(&mesh("v2")).await;
    let mut worst = 0;
    let mut restarted_api = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let down = unavailable_nodes(&cluster).await;
        worst = worst.max(down.len());
        assert!(
            down.len() <= 1,
            "more than maxUnavailable nodes down: {down:?}"
        );
        let mc = cluster.meshconfig().await;
        let st = mc.status.clone().unwrap_or_default();
        if !restarted_api && st.updated_nodes >= 1 {
            // The API server "restarts": every watch ends and old resourceVersions expire.
            cluster.server.compact();
            cluster.server.end_watches();
            restarted_api = true;
        }
        let done = st.rollout.as_ref().is_some_and(|r| {
            r.phase == RolloutPhase::Complete && r.current_version.as_deref() == Some("v2")
        });
        if done && st.observed_generation == mc.metadata.generation {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout did not finish: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(restarted_api);
    cluster.wait_ready("v2", 4, 10).await;
    let pods = cluster.agent_pods().await;
    for node in nodes {
        let v = pods[node]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL))
            .cloned();
        assert_eq!(v.as_deref(), Some("v2"), "{node}");
    }
    // Each node restarted exactly once for the upgrade (plus its first start).
    let restarts = stand_in.restarts.lock().expect("lock").clone();
    assert!(restarts.values().all(|n| *n == 2), "{restarts:?}");
    println!("worst unavailable during the rollout: {worst}");
    let reasons = cluster.event_reasons().await;
    for want in ["RolloutStarted", "NodeUpgraded", "RolloutCompleted"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "missing event {want}: {reasons:?}"
        );
    }
}

async fn broken_rollout(auto_rollback: bool) -> (Cluster, StandIn, support::OperatorHandle) {
    let cluster = Cluster::start().await;
    cluster
        .add_nodes(&["node-1", "node-2", "node-3"], &[])
        .await;
    let stand_in = StandIn::start(&cluster).await;
    let op = cluster.start_operator("op-0", LEASE_SECS).await;
    let mut mc = mesh("v1");
    mc.spec.upgrade.auto_rollback = auto_rollback;
    cluster.apply_meshconfig(&mc).await;
    cluster.wait_ready("v1", 3, 30).await;
    let mut mc = mesh("v2-broken");
    mc.spec.upgrade.auto_rollback = auto_rollback;
    cluster.apply_meshconfig(&mc).await;
    (cluster, stand_in, op)
}

async fn wait_phase(cluster: &Cluster, phase: RolloutPhase) -> String {
    eventually(30, &format!("rollout phase {phase:?}"), || async {
        let st = cluster.meshconfig().await.status?;
        let r = st.rollout?;
        let stalled = find_condition(&st.conditions, STALLED)?;
        (r.phase == phase && stalled.status == "True").then(|| stalled.message.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_preflight_halts_after_the_canary_and_leaves_the_other_nodes_alone() {
    let (cluster, _stand_in, _op) = broken_rollout(false).await;
    let msg = wait_phase(&cluster, RolloutPhase::Halted).await;
    assert!(msg.contains("node-1") && msg.contains("preflight"), "{msg}");
    // Give the operator time to (wrongly) move on, then check nothing else moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nes = cluster.enrollments().await;
    assert_eq!(
        nes["node-1"].spec.desired_version.as_deref(),
        Some("v2-broken")
    );
    let pods = cluster.agent_pods().await;
    for node in ["node-2", "node-3"] {
        assert_eq!(
            nes[node].spec.desired_version.as_deref(),
            Some("v1"),
            "{node}"
        );
        let v = pods[node]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL))
            .cloned();
        assert_eq!(v.as_deref(), Some("v1"), "{node}");
    }
    let st = cluster.meshconfig().await.status.expect("status");
    assert_eq!(st.rollout.and_then(|r| r.halted_reason), Some(msg));
    assert!(
        cluster
            .event_reasons()
            .await
            .iter()
            .any(|r| r == "RolloutHalted")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_rollback_a_failed_canary_goes_back_to_the_previous_version() {
    let (cluster, _stand_in, _op) = broken_rollout(true).await;
    wait_phase(&cluster, RolloutPhase::Halted).await;
    eventually(30, "node-1 back on v1 and ready", || async {
        let nes = cluster.enrollments().await;
        let ne = nes.get("node-1")?;
        let st = ne.status.as_ref()?;
        (ne.spec.desired_version.as_deref() == Some("v1")
            && st.agent_version.as_deref() == Some("v1"))
        .then_some(())
    })
    .await;
    let pods = cluster.agent_pods().await;
    for node in ["node-1", "node-2", "node-3"] {
        let v = pods[node]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL))
            .cloned();
        assert_eq!(v.as_deref(), Some("v1"), "{node}");
    }
    let ds = Api::<DaemonSet>::namespaced(cluster.admin.clone(), NAMESPACE)
        .get(AGENT_NAME)
        .await
        .expect("DaemonSet");
    let v = serde_json::to_value(&ds).expect("json");
    assert_eq!(
        v["spec"]["template"]["metadata"]["labels"][VERSION_LABEL],
        "v1"
    );
    let reasons = cluster.event_reasons().await;
    assert!(reasons.iter().any(|r| r == "RollingBack"), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_standby_finishes_the_rollout_when_it_stops() {
    let cluster = Cluster::start().await;
    cluster
        .add_nodes(&["node-1", "node-2", "node-3"], &[])
        .await;
    let _stand_in = StandIn::start(&cluster).await;
    let first = cluster.start_operator("op-first", LEASE_SECS).await;
    eventually(10, "op-first leads", || async {
        first
            .shared
            .leader
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(())
    })
    .await;
    let second = cluster.start_operator("op-second", LEASE_SECS).await;
    eventually(10, "op-second stands by", || async {
        second
            .shared
            .ready
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(())
    })
    .await;
    cluster.apply_meshconfig(&mesh("v1")).await;
    cluster.wait_ready("v1", 3, 30).await;
    assert!(first.reconciles() > 0);
    assert_eq!(second.reconciles(), 0, "a standby must not reconcile");

    // The leader dies without releasing its lease, in the middle of a rollout.
    cluster.apply_meshconfig(&mesh("v2")).await;
    eventually(20, "the rollout under way", || async {
        let st = cluster.meshconfig().await.status?;
        (st.rollout?.target_version.as_deref() == Some("v2")).then_some(())
    })
    .await;
    first.task.abort();
    drop(first);
    cluster.wait_ready("v2", 3, 40).await;
    assert!(second.reconciles() > 0);
    assert!(
        second
            .shared
            .leader
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        cluster.admin.clone(),
        NAMESPACE,
    )
    .get("meshlet-operator")
    .await
    .expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("op-second")
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_never_becomes_ready_halts_at_the_progress_deadline() {
    let cluster = Cluster::start().await;
    cluster.add_nodes(&["node-1", "node-2"], &[]).await;
    let _stand_in = StandIn::start(&cluster).await;
    let _op = cluster.start_operator("op-0", LEASE_SECS).await;
    let mut mc = mesh("v1");
    mc.spec.upgrade.progress_deadline_seconds = 2;
    mc.spec.upgrade.auto_rollback = false;
    cluster.apply_meshconfig(&mc).await;
    cluster.wait_ready("v1", 2, 30).await;
    cluster
        .apply_meshconfig(&mc.clone().with_version("v2-stuck"))
        .await;
    let msg = wait_phase(&cluster, RolloutPhase::Halted).await;
    assert!(
        msg.contains("node-1") && msg.contains("progressDeadlineSeconds"),
        "{msg}"
    );
    let nes = cluster.enrollments().await;
    assert_eq!(nes["node-2"].spec.desired_version.as_deref(), Some("v1"));
    let pods = cluster.agent_pods().await;
    let v = pods["node-2"]
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(VERSION_LABEL))
        .cloned();
    assert_eq!(v.as_deref(), Some("v1"));
}
