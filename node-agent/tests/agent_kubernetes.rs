//! The agent in Kubernetes mode against the API test server (with the shipped agent RBAC): it
//! loads only for its NodeEnrollment, serves ClusterIPs from Services and EndpointSlices over
//! real sockets, reports status, keeps every link across a restart, and tears everything down
//! on drain and on deletion. Needs root, bpffs and cgroup v2.

mod agent_support;
mod kube_support;

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use meshlet_crds::v1alpha1::RestartKind;
use nix::sys::signal::Signal;
use serde_json::json;

use agent_support::{AgentEnv, count};
use kube_support::{
    Cluster, SpanReceiver, VERSION, condition, service, slice, start_kube_agent,
    start_kube_agent_with, status, status_links, wait_log,
};

const VIP: &str = "127.100.0.1";

fn free_local_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Value of the sample `name_with_labels` in a Prometheus text exposition (0 when absent).
fn metric(text: &str, name_with_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_with_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn target(vip: &str, port: u16, allowed: &[u16]) -> Vec<(String, u16, Vec<u16>)> {
    vec![(vip.to_string(), port, allowed.to_vec())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_node_serves_cluster_ips_reports_status_and_keeps_its_links_across_a_restart() {
    let mut env = AgentEnv::new("kube-serve");
    let cluster = Cluster::start().await;
    let node = env.name.clone();
    let pp = PostParams::default();
    cluster
        .services()
        .create(&pp, &service("web", VIP, "http", 80))
        .await
        .expect("create Service");
    cluster
        .slices()
        .create(
            &pp,
            &slice(
                "web-a",
                "web",
                "IPv4",
                "http",
                18081,
                &[("127.0.0.1", true)],
            ),
        )
        .await
        .expect("create EndpointSlice");

    // Not enrolled: nothing is loaded.
    start_kube_agent(&mut env, &cluster, &node);
    wait_log(&env, "no NodeEnrollment for this node").await;
    assert!(
        !env.bpffs_root.exists(),
        "nothing may be pinned before the node is enrolled"
    );

    let enrolled_at = std::time::Instant::now();
    cluster.enroll(&node).await;
    let ne = cluster
        .wait_enrollment(&node, "Ready", &env, |ne| {
            condition(ne, "Ready", "True", None) && condition(ne, "DataplaneReady", "True", None)
        })
        .await;
    eprintln!(
        "NodeEnrollment created → status Ready: {} ms",
        enrolled_at.elapsed().as_millis()
    );
    let st = status(ne.as_ref());
    assert_eq!(st.agent_version.as_deref(), Some(VERSION));
    assert!(st.kernel_version.as_deref().is_some_and(|k| !k.is_empty()));
    assert_eq!(
        st.observed_generation,
        ne.as_ref().and_then(|n| n.metadata.generation)
    );
    let links = status_links(ne.as_ref());
    assert!(
        !links.is_empty() && links.iter().all(|(_, id)| *id > 0),
        "{links:?}"
    );
    let frontends = st
        .maps
        .iter()
        .find(|m| m.name == "frontend")
        .expect("frontend map in status");
    assert_eq!(frontends.entries, 1, "{:?}", st.maps);
    let continuity = st.continuity.clone().expect("continuity");
    assert_eq!(continuity.last_restart_kind, Some(RestartKind::Fresh));
    assert_eq!(continuity.dataplane_gaps, 0);
    assert!(condition(ne.as_ref(), "Enrolled", "True", None));
    assert!(condition(ne.as_ref(), "Stalled", "False", None));

    // A client in the agent's cgroup reaches the backend through the ClusterIP.
    let report = env.run_traffic(&[18081], &target(VIP, 80, &[18081]), 20);
    assert_eq!(count(&report, "ok"), 20, "{report}");

    // A new backend, then the old one not ready: connections follow the EndpointSlices.
    cluster
        .slices()
        .create(
            &pp,
            &slice(
                "web-b",
                "web",
                "IPv4",
                "http",
                18082,
                &[("127.0.0.1", true)],
            ),
        )
        .await
        .expect("create second EndpointSlice");
    cluster
        .slices()
        .patch(
            "web-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": false}}]})),
        )
        .await
        .expect("mark backend not ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let services = env.map_services();
        let ports: Vec<u64> = services[0]["backends"]
            .as_array()
            .map(|b| b.iter().filter_map(|e| e["port"].as_u64()).collect())
            .unwrap_or_default();
        if ports == [18082] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the maps never followed the EndpointSlices: {services}\n{}",
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = env.run_traffic(&[18081, 18082], &target(VIP, 80, &[18082]), 20);
    assert_eq!(
        count(&report, "ok"),
        20,
        "only the ready backend may answer: {report}"
    );

    // SIGTERM and restart under traffic: same links, warm, no gap, no failed connection.
    let traffic = env.start_traffic(&[18082], &target(VIP, 80, &[18082]), 2);
    let before = status_links(
        cluster
            .wait_enrollment(&node, "status", &env, |ne| ne.is_some())
            .await
            .as_ref(),
    );
    let exit = env.stop_agent(Signal::SIGTERM);
    assert!(
        exit.success(),
        "agent exit on SIGTERM: {exit}\n{}",
        env.log()
    );
    start_kube_agent(&mut env, &cluster, &node);
    let ne = cluster
        .wait_enrollment(&node, "a warm restart in the status", &env, |ne| {
            ne.and_then(|n| n.status.as_ref())
                .and_then(|s| s.continuity.as_ref())
                .is_some_and(|c| c.last_restart_kind == Some(RestartKind::Warm))
                && condition(ne, "Ready", "True", None)
        })
        .await;
    let report = env.stop_traffic(traffic);
    assert_eq!(count(&report, "fail"), 0, "{report}");
    assert_eq!(count(&report, "wrong"), 0, "{report}");
    assert!(count(&report, "ok") > 0, "{report}");
    assert_eq!(
        status_links(ne.as_ref()),
        before,
        "link ids changed across the restart"
    );
    let continuity = status(ne.as_ref()).continuity.clone().expect("continuity");
    assert!(continuity.link_ids_stable, "{continuity:?}");
    assert_eq!(continuity.dataplane_gaps, 0);
    assert!(
        continuity.last_restart_duration_ms.is_some(),
        "{continuity:?}"
    );
    eprintln!(
        "warm restart: agent start → adopted and synced {} ms; {} connections during the restart, 0 failed",
        continuity.last_restart_duration_ms.unwrap_or_default(),
        count(&report, "ok")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_deletion_detach_everything_and_deletion_releases_the_finalizer() {
    let mut env = AgentEnv::new("kube-drain");
    let cluster = Cluster::start().await;
    let node = env.name.clone();
    let pp = PostParams::default();
    cluster
        .services()
        .create(&pp, &service("web", VIP, "http", 80))
        .await
        .expect("create Service");
    cluster
        .slices()
        .create(
            &pp,
            &slice(
                "web-a",
                "web",
                "IPv4",
                "http",
                18091,
                &[("127.0.0.1", true)],
            ),
        )
        .await
        .expect("create EndpointSlice");
    // A bad slice of another Service: an IPv6 address in an IPv4 slice is skipped with its
    // reason, the good Service keeps working.
    cluster
        .services()
        .create(&pp, &service("odd", "127.100.0.2", "http", 80))
        .await
        .expect("create second Service");
    cluster
        .slices()
        .create(
            &pp,
            &slice("odd-a", "odd", "IPv4", "http", 18092, &[("fd00::1", true)]),
        )
        .await
        .expect("create bad EndpointSlice");

    cluster.enroll(&node).await;
    let (receiver, endpoint) = SpanReceiver::start().await;
    let metrics_addr = free_local_addr();
    start_kube_agent_with(
        &mut env,
        &cluster,
        &node,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("MESHLET_METRICS_ADDR", metrics_addr.to_string()),
        ],
    );
    cluster
        .wait_enrollment(&node, "Ready", &env, |ne| {
            condition(ne, "Ready", "True", None)
        })
        .await;
    wait_log(
        &env,
        "endpoints[0].addresses[0] fd00::1 is IPv6 but the slice's addressType is IPv4; skipped",
    )
    .await;
    let report = env.run_traffic(&[18091], &target(VIP, 80, &[18091]), 10);
    assert_eq!(count(&report, "ok"), 10, "{report}");

    // The API server drops every watch and forgets its history (410 Gone on resume): the
    // agent relists, the data plane keeps serving meanwhile, and later changes still arrive.
    let traffic = env.start_traffic(&[18091, 18093], &target(VIP, 80, &[18091]), 2);
    cluster.server.compact();
    cluster.server.end_watches();
    cluster
        .services()
        .create(&pp, &service("late", "127.100.0.3", "http", 80))
        .await
        .expect("create Service after the watch restart");
    cluster
        .slices()
        .create(
            &pp,
            &slice(
                "late-a",
                "late",
                "IPv4",
                "http",
                18093,
                &[("127.0.0.1", true)],
            ),
        )
        .await
        .expect("create EndpointSlice after the watch restart");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The Service and its backend arrive through two watches: wait for both in the maps.
    while !{
        let maps = env.map_services().to_string();
        maps.contains("127.100.0.3") && maps.contains("18093")
    } {
        assert!(
            std::time::Instant::now() < deadline,
            "a Service created after the watch restart never reached the maps\n{}",
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = env.stop_traffic(traffic);
    assert_eq!(count(&report, "fail"), 0, "{report}");
    assert_eq!(count(&report, "wrong"), 0, "{report}");
    let report = env.run_traffic(&[18093], &target("127.100.0.3", 80, &[18093]), 5);
    assert_eq!(count(&report, "ok"), 5, "{report}");

    // Drain: detached and unpinned, reported as Drained; the ClusterIP is no longer served.
    cluster
        .enrollments()
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"drain": true}})),
        )
        .await
        .expect("drain");
    let ne = cluster
        .wait_enrollment(&node, "Drained", &env, |ne| {
            condition(ne, "DataplaneReady", "False", Some("Drained"))
        })
        .await;
    assert!(
        status(ne.as_ref()).programs.is_empty(),
        "{:?}",
        status(ne.as_ref()).programs
    );
    assert!(!condition(ne.as_ref(), "Ready", "True", None));
    assert!(!env.bpffs_root.exists(), "pins remain after drain");
    let report = env.run_traffic(&[18091], &target(VIP, 80, &[18091]), 5);
    assert_eq!(
        count(&report, "ok"),
        0,
        "the VIP is still served after drain: {report}"
    );

    // Undrain: loaded again (fresh, not counted as a gap) and serving.
    cluster
        .enrollments()
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"drain": false}})),
        )
        .await
        .expect("undrain");
    let ne = cluster
        .wait_enrollment(&node, "Ready again", &env, |ne| {
            condition(ne, "Ready", "True", None)
        })
        .await;
    let continuity = status(ne.as_ref()).continuity.clone().expect("continuity");
    assert_eq!(continuity.dataplane_gaps, 0, "{continuity:?}");
    let report = env.run_traffic(&[18091], &target(VIP, 80, &[18091]), 10);
    assert_eq!(count(&report, "ok"), 10, "{report}");

    // Deletion: torn down, finalizer released, the object is gone; the agent keeps running.
    cluster
        .enrollments()
        .delete(&node, &DeleteParams::default())
        .await
        .expect("delete NodeEnrollment");
    cluster
        .wait_enrollment(&node, "the NodeEnrollment to be gone", &env, |ne| {
            ne.is_none()
        })
        .await;
    assert!(!env.bpffs_root.exists(), "pins remain after unenrollment");
    let report = env.run_traffic(&[18091], &target(VIP, 80, &[18091]), 5);
    assert_eq!(
        count(&report, "ok"),
        0,
        "the VIP is still served after deletion: {report}"
    );
    let running = env
        .agent
        .as_mut()
        .map(|c| c.try_wait().expect("wait agent").is_none());
    assert_eq!(
        running,
        Some(true),
        "the agent must keep running idle\n{}",
        env.log()
    );

    // Enrolled again: loads fresh.
    cluster.enroll(&node).await;
    cluster
        .wait_enrollment(&node, "Ready after re-enrollment", &env, |ne| {
            condition(ne, "Ready", "True", None)
        })
        .await;
    let report = env.run_traffic(&[18091], &target(VIP, 80, &[18091]), 5);
    assert_eq!(count(&report, "ok"), 5, "{report}");

    // Status writes and syncs are counted.
    let metrics = http_get(metrics_addr, "/metrics");
    assert!(
        metric(
            &metrics,
            "meshlet_agent_status_writes_total{kind=\"written\"}"
        ) >= 3.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "meshlet_agent_syncs_total{kind=\"applied\"}") >= 3.0,
        "{metrics}"
    );

    // Logs are JSON lines.
    for line in env.log().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "log line without a level: {line}");
    }

    // Every sync was traced over OTLP (flushed at the latest when the agent stops).
    let exit = env.stop_agent(Signal::SIGTERM);
    assert!(
        exit.success(),
        "agent exit on SIGTERM: {exit}\n{}",
        env.log()
    );
    let syncs = receiver.count("meshlet-agent", "sync");
    assert!(
        syncs >= 3,
        "expected a span per sync (load, undrain, re-enroll), got {syncs}: {:?}",
        receiver.spans
    );
}
