//! Figures of the API test server: startup time, create/list/watch throughput with 5,000
//! Nodes, 5,000 NodeEnrollments and 100 watchers, and resident memory at that size.
//! Run with `cargo bench -p meshlet-test-apiserver`. Prints numbers; never asserts on time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use meshlet_crds::NodeEnrollment;
use meshlet_crds::v1alpha1::NodeEnrollmentSpec;
use meshlet_test_apiserver::{ServerOptions, TestApiServer};
use serde_json::json;

const NODES: usize = 5_000;
const WATCHERS: usize = 100;
const UPDATES: usize = 1_000;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut startups = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let s = TestApiServer::start(ServerOptions {
            install_meshlet_crds: true,
            ..Default::default()
        })
        .await?;
        startups.push(t.elapsed());
        s.shutdown();
    }
    startups.sort();
    println!(
        "startup (in-process, with CRDs): median {:?}, max {:?}",
        startups[10], startups[19]
    );

    let rss_before = rss_mib();
    let s = TestApiServer::start(ServerOptions {
        install_meshlet_crds: true,
        ..Default::default()
    })
    .await?;
    let client = s.client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let nes: Api<NodeEnrollment> = Api::all(client.clone());

    let t = Instant::now();
    stream::iter(0..NODES)
        .map(|i| {
            let nodes = nodes.clone();
            async move {
                let node: Node = serde_json::from_value(json!({"metadata": {"name": format!("node-{i:05}"),
                    "labels": {"kubernetes.io/os": "linux", "zone": format!("z{}", i % 3)}},
                    "status": {"addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", i / 250, i % 250)}]}}))?;
                nodes.create(&PostParams::default(), &node).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let node_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    stream::iter(0..NODES)
        .map(|i| {
            let nes = nes.clone();
            async move {
                let name = format!("node-{i:05}");
                let ne = NodeEnrollment::new(
                    &name,
                    NodeEnrollmentSpec {
                        node_name: name.clone(),
                        desired_version: None,
                        drain: false,
                    },
                );
                nes.create(&PostParams::default(), &ne).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let ne_secs = t.elapsed().as_secs_f64();
    println!(
        "create: {NODES} Nodes in {node_secs:.2}s ({:.0}/s); {NODES} NodeEnrollments (schema + CEL) in {ne_secs:.2}s ({:.0}/s)",
        NODES as f64 / node_secs,
        NODES as f64 / ne_secs
    );

    let t = Instant::now();
    let rounds = 10;
    for _ in 0..rounds {
        let l = nes.list(&ListParams::default()).await?;
        assert_eq!(l.items.len(), NODES);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "list: full list of {NODES} NodeEnrollments {:.1} ms each ({:.0} objects/s)",
        secs * 1000.0 / rounds as f64,
        (rounds * NODES) as f64 / secs
    );
    let t = Instant::now();
    let mut pages = 0;
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = nodes.list(&lp).await?;
        pages += 1;
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    println!(
        "list: {NODES} Nodes in {pages} pages of 500 in {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    let rv = nes
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let received = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let nes = nes.clone();
        let rv = rv.clone();
        let received = received.clone();
        watchers.push(tokio::spawn(async move {
            let mut got = 0;
            let mut stream = nes
                .watch(&WatchParams::default().timeout(290), &rv)
                .await?
                .boxed();
            while got < UPDATES {
                if let Some(WatchEvent::Modified(_)) = stream.try_next().await? {
                    got += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    stream::iter(0..UPDATES)
        .map(|i| {
            let nes = nes.clone();
            async move {
                let status = json!({"status": {"agentVersion": "0.1.0", "observedGeneration": 1}});
                nes.patch_status(
                    &format!("node-{i:05}"),
                    &PatchParams::default(),
                    &Patch::Merge(status),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let write_secs = t.elapsed().as_secs_f64();
    for w in watchers {
        w.await??;
    }
    let all_secs = t.elapsed().as_secs_f64();
    println!(
        "watch: {UPDATES} status patches in {write_secs:.2}s ({:.0}/s); {WATCHERS} watchers received all {} events in {all_secs:.2}s ({:.0} events/s delivered)",
        UPDATES as f64 / write_secs,
        received.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed) as f64 / all_secs
    );
    println!(
        "memory: process RSS {:.0} MiB with {} objects stored (before server: {rss_before:.0} MiB)",
        rss_mib(),
        s.object_count()
    );
    Ok(())
}
