//! Benchmark (run with `--ignored`): how long a pod takes to start as a container, against the
//! same program started as a plain process in the node's cgroup (what the local cluster's
//! kubelet did before it ran containers), measured side by side in one run.
//!
//! Container: API create → the container's first output line ("ready"), through the kubelet
//! (image cache warm, overlay root, runc, network namespace, service-account volume).
//! Process: spawn → the same first line, with the binary the image was built from.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use meshlet_local_cluster::images::TRAFFIC_IMAGE;
use meshlet_local_cluster::{ClusterOptions, LocalCluster};
use support::*;

const RUNS: usize = 10;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn pod_start_as_a_container_against_a_plain_process() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .expect("start cluster");
    let node = cluster.node("node-1").expect("node");
    // Warm the image cache once, as a node that ran the image before.
    TrafficPod::start(&cluster, "node-1", "warm", &[])
        .await
        .report(&cluster, true)
        .await;

    let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let mut container = Vec::new();
    for i in 0..RUNS {
        let name = format!("bench-{i}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "node-1", "restartPolicy": "Never",
                "containers": [{"name": "traffic", "image": TRAFFIC_IMAGE}]}}))
        .expect("pod");
        let t = Instant::now();
        api.create(&PostParams::default(), &pod)
            .await
            .expect("create");
        while !container_log(&cluster, "node-1", "default", &name, "traffic")
            .lines()
            .any(|l| l == "ready")
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{name} did not start"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        container.push(t.elapsed());
        api.delete(&name, &Default::default())
            .await
            .expect("delete");
    }

    let bin = meshlet_local_cluster::current_bin_dir()
        .expect("profile dir")
        .join("mesh-traffic");
    let mut process = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let mut child = Command::new("/bin/sh")
            .args([
                "-c",
                r#"echo $$ > "$1/cgroup.procs" && exec "$2""#,
                "sh",
                &node.cgroup.display().to_string(),
                &bin.display().to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mesh-traffic");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready");
        process.push(t.elapsed());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        drop(out);
    }
    let (c, p) = (median(container), median(process));
    println!(
        "pod start, median of {RUNS}: container {:.1} ms (API create to first output), \
         plain process {:.1} ms; ratio {:.0}x",
        c.as_secs_f64() * 1e3,
        p.as_secs_f64() * 1e3,
        c.as_secs_f64() / p.as_secs_f64()
    );
    cluster.shutdown().await.expect("shutdown");
}
