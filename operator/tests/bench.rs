//! Scale benchmark of the operator binary (ignored by default; prints figures, asserts no
//! times). Run with a release build:
//!
//! ```sh
//! cargo test --release -p meshlet-operator --test bench -- --ignored --nocapture
//! ```
//!
//! 1. 5,000 Nodes: time from applying the MeshConfig until every NodeEnrollment exists and
//!    the MeshConfig reports 5,000 enrolled, then until all 5,000 stand-in agents are Ready;
//!    the operator's peak resident memory (VmHWM).
//! 2. 1,000 Nodes, `maxUnavailable: 10%`, stand-in answering at once: rollout time per node.

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::Instant,
};

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::util::intstr::IntOrString};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use meshlet_crds::{
    MeshConfig,
    names::{NAMESPACE, OPERATOR_NAME},
    v1alpha1::meshconfig::RolloutPhase,
};
use support::{Cluster, StandIn, eventually};

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Operator {
    fn spawn(cluster: &Cluster, log_name: &str) -> Self {
        let kubeconfig = cluster
            .server
            .kubeconfig_for(NAMESPACE, OPERATOR_NAME)
            .expect("operator kubeconfig");
        let child = Command::new(env!("CARGO_BIN_EXE_meshlet-operator"))
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", NAMESPACE)
            .env("POD_NAME", "bench-operator")
            .env("MESHLET_METRICS_ADDR", "127.0.0.1:0")
            .env(
                "MESHLET_LOG_LEVEL",
                std::env::var("MESHLET_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(std::env::temp_dir().join(log_name))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("start meshlet-operator");
        Self(child)
    }

    /// CPU time (user + system) the operator process used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id()))
            .expect("read /proc/<pid>/stat");
        // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .into_iter()
            .flatten()
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
        // USER_HZ, the unit of /proc accounting, is 100 on Linux.
        ticks / 100.0
    }

    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// `name` from the environment, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn add_many_nodes(cluster: &Cluster, count: usize) {
    let api: Api<Node> = Api::all(cluster.admin.clone());
    let names: Vec<String> = (0..count).map(|i| format!("node-{i:05}")).collect();
    for chunk in names.chunks(64) {
        futures::future::join_all(chunk.iter().map(|name| {
            let api = api.clone();
            async move {
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..ObjectMeta::default()
                    },
                    ..Node::default()
                };
                api.create(&PostParams::default(), &node)
                    .await
                    .expect("create node");
            }
        }))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn enrolling_5000_nodes_and_rolling_out_across_1000() {
    // Smaller fleets for a quick check: MESHLET_BENCH_NODES, MESHLET_BENCH_ROLLOUT_NODES.
    let fleet = env_count("MESHLET_BENCH_NODES", 5_000);
    let rollout_fleet = env_count("MESHLET_BENCH_ROLLOUT_NODES", 1_000);
    if fleet > 0 {
        // 1. 5,000 nodes.
        let cluster = Cluster::start().await;
        add_many_nodes(&cluster, fleet).await;
        let op = Operator::spawn(&cluster, "meshlet-bench-operator-enroll.log");
        let _stand_in = StandIn::start(&cluster).await;
        let mut mc = MeshConfig::test().with_version("v1");
        mc.spec.upgrade.min_ready_seconds = 0;
        let t0 = Instant::now();
        cluster.apply_meshconfig(&mc).await;
        eventually(600, "every node enrolled", || async {
            let st = cluster.meshconfig().await.status?;
            (usize::try_from(st.enrolled_nodes).ok() == Some(fleet)).then_some(())
        })
        .await;
        let enrolled = t0.elapsed();
        let count = cluster.enrollments().await.len();
        let rss_enrolled = op.memory_kib("VmRSS:");
        println!(
            "{fleet} nodes: all {count} NodeEnrollments exist and status shows {fleet} enrolled after {:.2} s (operator VmRSS {:.1} MiB)",
            enrolled.as_secs_f64(),
            rss_enrolled as f64 / 1024.0
        );
        cluster.wait_ready("v1", fleet, 900).await;
        let ready = t0.elapsed();
        println!(
            "{fleet} nodes: MeshConfig Ready (all stand-in agents report v1) after {:.2} s",
            ready.as_secs_f64()
        );
        // Steady state: nothing changes; the operator should be idle apart from its Lease.
        let idle = std::time::Duration::from_secs(10);
        let cpu_before = op.cpu_seconds();
        tokio::time::sleep(idle).await;
        let steady = op.cpu_seconds() - cpu_before;
        println!(
            "{fleet} nodes, steady state: operator CPU {:.3} s over {} s = {:.2}% of one core",
            steady,
            idle.as_secs(),
            steady * 100.0 / idle.as_secs_f64()
        );
        println!(
            "operator memory: VmRSS {:.1} MiB when enrolled, {:.1} MiB at the end, peak VmHWM {:.1} MiB",
            rss_enrolled as f64 / 1024.0,
            op.memory_kib("VmRSS:") as f64 / 1024.0,
            op.memory_kib("VmHWM:") as f64 / 1024.0
        );
        drop(op);
        drop(_stand_in);
        drop(cluster);
    }
    if rollout_fleet > 0 {
        // 2. Rollout over 1,000 nodes, maxUnavailable 10%.
        let cluster = Cluster::start().await;
        add_many_nodes(&cluster, rollout_fleet).await;
        let op = Operator::spawn(&cluster, "meshlet-bench-operator-rollout.log");
        let _stand_in = StandIn::start(&cluster).await;
        let mut mc = MeshConfig::test().with_version("v1");
        mc.spec.upgrade.min_ready_seconds = 0;
        mc.spec.upgrade.max_unavailable = IntOrString::String("10%".into());
        cluster.apply_meshconfig(&mc).await;
        cluster.wait_ready("v1", rollout_fleet, 600).await;
        let t0 = Instant::now();
        let cpu0 = op.cpu_seconds();
        cluster
            .apply_meshconfig(&mc.clone().with_version("v2"))
            .await;
        eventually(900, "rollout of v2 complete", || async {
            let st = cluster.meshconfig().await.status?;
            let r = st.rollout?;
            (r.phase == RolloutPhase::Complete && r.current_version.as_deref() == Some("v2"))
                .then_some(())
        })
        .await;
        let took = t0.elapsed();
        let cpu = op.cpu_seconds() - cpu0;
        println!(
            "operator CPU during the rollout: {:.2} s, {:.2} ms per node",
            cpu,
            cpu * 1000.0 / rollout_fleet as f64
        );
        println!(
            "rollout v1→v2 over {rollout_fleet} nodes, maxUnavailable 10%: {:.2} s, {:.1} ms per node (stand-in polls every 25 ms)",
            took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / rollout_fleet as f64
        );
        println!(
            "operator memory at {rollout_fleet} nodes: peak VmHWM {:.1} MiB",
            op.memory_kib("VmHWM:") as f64 / 1024.0
        );
    }
}
