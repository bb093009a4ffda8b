//! Benchmark of the IPsec key manager (ignored by default; prints figures, asserts no times).
//! Run with a release build:
//!
//! ```sh
//! cargo test --release -p meshlet-operator --test ipsec_bench -- --ignored --nocapture
//! ```
//!
//! 100 simulated nodes; stand-in agents write every node's acknowledgement of a phase at once.
//! For each phase: the time from the moment the last node's ack is written until the operator
//! has moved the policy to the next phase (its overhead), over several rotations.

mod support;

use std::time::{Duration, Instant};

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use meshlet_crds::{
    IPsecPolicy,
    names::ROTATE_ANNOTATION,
    v1alpha1::{IPsecPolicyStatus, RotationPhase},
};
use serde_json::json;
use support::{
    Cluster,
    ipsec::{add_ipsec_nodes, agent_client, agents_pass},
};

const NODES: usize = 100;
const ROTATIONS: usize = 5;
const POLICY: &str = "bench";

async fn status(api: &Api<IPsecPolicy>) -> IPsecPolicyStatus {
    api.get(POLICY)
        .await
        .expect("get policy")
        .status
        .unwrap_or_default()
}

/// Polls every 2 ms until the policy is in `phase`; returns when it saw it.
async fn wait_phase(api: &Api<IPsecPolicy>, phase: RotationPhase) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(api).await;
        if st.phase == phase && st.active_spi.is_some() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {phase:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn ipsec_rotation_overhead_with_100_nodes() {
    let cluster = Cluster::start().await;
    let names: Vec<String> = (0..NODES).map(|i| format!("node-{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    add_ipsec_nodes(&cluster, &refs, &[]).await;
    let agent = agent_client(&cluster).await;
    let op = cluster.start_operator("bench-op", 4.0).await;
    let api: Api<IPsecPolicy> = Api::all(cluster.admin.clone());
    let created = Instant::now();
    api.create(&PostParams::default(), &IPsecPolicy::test(POLICY))
        .await
        .expect("create policy");
    let keyed = wait_phase(&api, RotationPhase::Stable).await;
    println!(
        "first generation published {:.1} ms after the policy was created",
        ms(keyed - created)
    );
    let writes = agents_pass(&agent, &Default::default())
        .await
        .expect("agents");
    assert_eq!(writes, NODES);

    let phases = [
        (RotationPhase::Installing, RotationPhase::Switching),
        (RotationPhase::Switching, RotationPhase::Retiring),
        (RotationPhase::Retiring, RotationPhase::Stable),
    ];
    let mut per_phase: Vec<Vec<f64>> = vec![Vec::new(); phases.len()];
    let mut ack_writes: Vec<f64> = Vec::new();
    let mut starts: Vec<f64> = Vec::new();
    let mut totals: Vec<f64> = Vec::new();
    for round in 0..ROTATIONS {
        let asked = Instant::now();
        api.patch(
            POLICY,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {ROTATE_ANNOTATION: format!("r{round}")}}}),
            ),
        )
        .await
        .expect("annotate");
        let installing = wait_phase(&api, RotationPhase::Installing).await;
        starts.push(ms(installing - asked));
        let mut total = Duration::ZERO;
        for (i, (from, to)) in phases.iter().enumerate() {
            assert_eq!(status(&api).await.phase, *from);
            let began = Instant::now();
            let writes = agents_pass(&agent, &Default::default())
                .await
                .expect("agents");
            let last_ack = Instant::now();
            assert_eq!(writes, NODES, "every node acknowledges {from:?} at once");
            ack_writes.push(ms(last_ack - began));
            let moved = wait_phase(&api, *to).await;
            per_phase[i].push(ms(moved - last_ack));
            total += moved - last_ack;
        }
        totals.push(ms(total));
    }
    println!(
        "{NODES} nodes, {ROTATIONS} rotations; operator overhead = last ack written → next phase"
    );
    println!(
        "  annotation → Installing:   median {:.1} ms  {:?}",
        median(starts.clone()),
        starts.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>()
    );
    for (i, (from, to)) in phases.iter().enumerate() {
        println!(
            "  {from:?} → {to:?}:   median {:.1} ms  {:?}",
            median(per_phase[i].clone()),
            per_phase[i]
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
        );
    }
    println!(
        "  whole rotation (sum of the three): median {:.1} ms  {:?}",
        median(totals.clone()),
        totals.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>()
    );
    println!(
        "  writing {NODES} acks at once took median {:.1} ms; overhead / ack-write time = {:.2}",
        median(ack_writes.clone()),
        median(totals.clone()) / 3.0 / median(ack_writes)
    );
    println!(
        "  whole-rotation overhead vs the 10 s target: {:.3} of it",
        median(totals) / 10_000.0
    );
    println!(
        "  operator API writes: {}; IPsec passes: {}",
        op.shared.metrics.writes.get(),
        op.shared
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("meshlet_operator_ipsec_reconcile_duration_seconds_count"))
            .unwrap_or_default()
    );
    op.stop().await;
}
