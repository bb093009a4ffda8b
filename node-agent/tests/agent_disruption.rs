//! Disruption suite: four client processes in the agent's cgroup open short TCP connections to
//! service VIPs without pause while the real `meshlet-agent` is restarted with SIGTERM, killed
//! with SIGKILL at random points (including mid-start and mid-sync), and moved between map
//! layouts 1 and 2 with thousands of entries. Every connection must succeed and reach a
//! backend of its VIP; link ids never change; the maps equal the source afterwards; `reset`
//! leaves no pin behind.

mod agent_support;

use std::path::Path;
use std::time::{Duration, Instant};

use agent_support::{AgentEnv, count, svc, yaml};
use nix::sys::signal::Signal;

const WEB: &str = "127.100.0.1";
const API: &str = "127.100.0.2";
const BACKENDS: [u16; 4] = [18081, 18082, 18083, 18084];

fn services(api_backends: &[u16]) -> Vec<agent_support::Svc> {
    vec![
        svc("web", WEB, 80, &[18081, 18082]),
        svc("api", API, 8080, api_backends),
    ]
}

fn targets() -> Vec<(String, u16, Vec<u16>)> {
    vec![
        (WEB.into(), 80, vec![18081, 18082]),
        (API.into(), 8080, vec![18083, 18084]),
    ]
}

fn assert_no_failures(report: &serde_json::Value, min_ok: u64) {
    assert_eq!(count(report, "fail"), 0, "failed connections: {report}");
    assert_eq!(
        count(report, "wrong"),
        0,
        "connections reached a backend outside their service: {report}"
    );
    assert!(
        count(report, "ok") >= min_ok,
        "too few connections to mean anything: {report}"
    );
}

fn pins_left(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p.display().to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out
}

/// Reset through the running agent; the agent stops and nothing stays pinned.
fn reset_through_agent(env: &mut AgentEnv) {
    let (ok, out, err) = env.ctl(&["reset"]);
    assert!(ok, "meshletctl reset failed: {out}{err}\n{}", env.log());
    let mut child = env.agent.take().expect("agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(
                st.success(),
                "agent exited with {st} after reset\n{}",
                env.log()
            );
            break;
        }
        assert!(Instant::now() < deadline, "agent kept running after reset");
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = pins_left(&env.bpffs_root);
    assert!(left.is_empty(), "pins left after reset: {left:?}");
}

/// A small deterministic generator for kill delays (no randomness crate needed).
struct Lcg(u64);
impl Lcg {
    fn next_ms(&mut self, max: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % max
    }
}

#[test]
fn fifty_sigterm_restarts_keep_every_connection_working_and_link_ids_unchanged() {
    let mut env = AgentEnv::new("sigterm");
    env.write_source(&yaml(&services(&[18083]), 0));
    env.start_agent(2);
    let first = env.wait_ready();
    assert_eq!(first["restart_kind"], "fresh", "{first}");
    let links = env.link_ids();
    assert!(
        !links.is_empty() && links.values().all(|&id| id > 0),
        "no links reported: {links:?}"
    );

    let traffic = env.start_traffic(&BACKENDS, &targets(), 4);
    let started = Instant::now();
    for i in 0..50 {
        let st = env.stop_agent(Signal::SIGTERM);
        assert!(
            st.success(),
            "agent exited with {st} on SIGTERM (restart {i})\n{}",
            env.log()
        );
        env.start_agent(2);
        let s = env.wait_ready();
        assert_eq!(s["restart_kind"], "warm", "restart {i}: {s}");
        assert_eq!(s["link_ids_unchanged"], true, "restart {i}: {s}");
        assert_eq!(env.link_ids(), links, "link ids changed at restart {i}");
    }
    let restarts_took = started.elapsed();
    let report = env.stop_traffic(traffic);
    eprintln!("50 SIGTERM restarts in {restarts_took:?}; traffic: {report}");
    assert_no_failures(&report, 500);
    assert_eq!(
        env.map_services(),
        env.source_services(),
        "maps differ from the source"
    );
    reset_through_agent(&mut env);
}

#[test]
fn fifty_sigkills_at_random_points_including_mid_sync_keep_every_connection_working() {
    let mut env = AgentEnv::new("sigkill");
    env.write_source(&yaml(&services(&[18083]), 0));
    env.start_agent(2);
    env.wait_ready();
    let links = env.link_ids();

    let traffic = env.start_traffic(&BACKENDS, &targets(), 4);
    let mut rng = Lcg(0x6d65_7368_6c65_7401);
    let started = Instant::now();
    for i in 0..50 {
        // Change the source every round so many kills land while a sync is being applied.
        let (api, filler) = if i % 2 == 0 {
            (&[18083, 18084][..], 300)
        } else {
            (&[18084][..], 0)
        };
        env.write_source(&yaml(&services(api), filler));
        let delay = rng.next_ms(150);
        std::thread::sleep(Duration::from_millis(delay));
        let _ = env.stop_agent(Signal::SIGKILL);
        env.start_agent(2);
        // Give it a random time to get anywhere between exec and a finished sync.
        std::thread::sleep(Duration::from_millis(rng.next_ms(120)));
    }
    env.write_source(&yaml(&services(&[18083, 18084]), 300));
    let s = env.wait_ready();
    let kills_took = started.elapsed();
    assert_eq!(s["link_ids_unchanged"], true, "{s}");
    assert_eq!(env.link_ids(), links, "link ids changed across kills");
    // The final agent has synced the file it saw; wait until it saw the last write.
    let want = env.source_services();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.map_services() != want {
        assert!(
            Instant::now() < deadline,
            "maps never matched the source\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = env.stop_traffic(traffic);
    eprintln!("50 SIGKILLs in {kills_took:?}; traffic: {report}");
    assert_no_failures(&report, 500);
    reset_through_agent(&mut env);
}

#[test]
fn twenty_upgrades_and_rollbacks_between_layouts_with_thousands_of_entries_drop_nothing() {
    let mut env = AgentEnv::new("layouts");
    // 1,000 filler services with two backends each, plus the two services under traffic.
    env.write_source(&yaml(&services(&[18083, 18084]), 1000));
    env.start_agent(1);
    env.wait_ready();
    let links = env.link_ids();
    let entries = env.ctl_json(&["maps"]).expect("maps");
    let total: u64 = entries["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| m["entries"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        total >= 4000,
        "expected thousands of map entries, got {total}: {entries}"
    );

    let traffic = env.start_traffic(&BACKENDS, &targets(), 4);
    let started = Instant::now();
    let mut migrate_us = Vec::new();
    for i in 0..20 {
        for layout in [2, 1] {
            let st = env.stop_agent(Signal::SIGTERM);
            assert!(st.success(), "agent exited with {st}\n{}", env.log());
            env.start_agent(layout);
            let s = env.wait_ready();
            assert_eq!(
                s["restart_kind"], "migrated",
                "round {i} to layout {layout}: {s}"
            );
            assert_eq!(s["layout"], layout, "{s}");
            assert_eq!(s["link_ids_unchanged"], true, "round {i}: {s}");
            migrate_us.push(s["start_duration_micros"].as_u64().unwrap_or(0));
        }
        assert_eq!(env.link_ids(), links, "link ids changed in round {i}");
        if i % 5 == 4 {
            assert_eq!(
                env.map_services(),
                env.source_services(),
                "maps differ after round {i}"
            );
        }
    }
    let took = started.elapsed();
    let report = env.stop_traffic(traffic);
    migrate_us.sort_unstable();
    eprintln!(
        "40 migrations of {total} entries in {took:?}; start-up median {} us, max {} us; traffic: {report}",
        migrate_us[migrate_us.len() / 2],
        migrate_us[migrate_us.len() - 1]
    );
    assert_no_failures(&report, 500);
    assert_eq!(
        env.map_services(),
        env.source_services(),
        "maps differ from the source"
    );
    reset_through_agent(&mut env);
}
