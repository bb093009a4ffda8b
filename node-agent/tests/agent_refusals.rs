//! What the agent refuses, and that refusing changes nothing: an unknown pinned layout, and a
//! second agent on the same bpffs root.

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::{AGENT, AgentEnv, count, svc, yaml};
use meshlet_agent::agent::{EXIT_LOCKED, EXIT_UNADOPTABLE};
use meshlet_agent::dataplane::sys::RawMap;
use nix::sys::signal::Signal;

const VIP: &str = "127.100.0.1";

fn targets() -> Vec<(String, u16, Vec<u16>)> {
    vec![(VIP.into(), 80, vec![18081, 18082])]
}

fn meta_layout(env: &AgentEnv) -> u32 {
    let meta = RawMap::open(&env.bpffs_root.join("meta")).expect("open meta");
    let mut v = [0u8; 4];
    assert!(
        meta.lookup(&1u32.to_ne_bytes(), &mut v).expect("read meta"),
        "meta has no layout"
    );
    u32::from_ne_bytes(v)
}

#[test]
fn an_unknown_pinned_layout_is_refused_with_the_reason_and_traffic_keeps_flowing() {
    let mut env = AgentEnv::new("unknown-layout");
    env.write_source(&yaml(&[svc("web", VIP, 80, &[18081, 18082])], 0));
    env.start_agent(2);
    env.wait_ready();
    let links = env.link_ids();
    let traffic = env.start_traffic(&[18081, 18082], &targets(), 4);
    assert!(env.stop_agent(Signal::SIGTERM).success());

    // A newer release pinned a layout this build does not know.
    RawMap::open(&env.bpffs_root.join("meta"))
        .expect("open meta")
        .update(&1u32.to_ne_bytes(), &99u32.to_ne_bytes())
        .expect("write meta");

    let pre = env
        .agent_command("preflight", 2)
        .stdout(std::process::Stdio::piped())
        .output()
        .expect("preflight");
    let text = String::from_utf8_lossy(&pre.stdout);
    assert_eq!(
        pre.status.code(),
        Some(i32::from(EXIT_UNADOPTABLE)),
        "preflight: {text}"
    );
    assert!(
        text.contains("unknown") && text.contains("99"),
        "preflight gave no reason: {text}"
    );

    let (ok, out, _) = env.ctl(&["preflight", "--layout", "2"]);
    assert!(
        !ok && out.contains("99"),
        "meshletctl preflight without an agent: {out}"
    );

    let started = Instant::now();
    let run = env.agent_command("run", 2).status().expect("run agent");
    assert_eq!(
        run.code(),
        Some(i32::from(EXIT_UNADOPTABLE)),
        "agent did not refuse\n{}",
        env.log()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let log = env.log();
    assert!(
        log.contains("refusing to adopt pinned data plane (layout 99)"),
        "reason not reported:\n{log}"
    );

    assert_eq!(meta_layout(&env), 99, "the refused start-up rewrote meta");
    let report = env.stop_traffic(traffic);
    assert_eq!(count(&report, "fail"), 0, "{report}");
    assert_eq!(count(&report, "wrong"), 0, "{report}");
    assert!(count(&report, "ok") > 100, "{report}");

    // Back to a known layout: the same links are adopted again.
    RawMap::open(&env.bpffs_root.join("meta"))
        .expect("open meta")
        .update(&1u32.to_ne_bytes(), &2u32.to_ne_bytes())
        .expect("write meta");
    env.start_agent(2);
    env.wait_ready();
    assert_eq!(env.link_ids(), links);
}

#[test]
fn a_second_agent_on_the_same_root_exits_with_a_clear_message_and_corrupts_nothing() {
    let mut env = AgentEnv::new("two-agents");
    env.write_source(&yaml(&[svc("web", VIP, 80, &[18081, 18082])], 0));
    env.start_agent(2);
    let first = env.wait_ready();
    let links = env.link_ids();

    let started = Instant::now();
    let second = env
        .agent_command("run", 2)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run second agent");
    let msg = String::from_utf8_lossy(&second.stderr);
    assert_eq!(
        second.status.code(),
        Some(i32::from(EXIT_LOCKED)),
        "second agent: {msg}"
    );
    assert!(
        msg.contains("lock") && msg.contains("held by pid"),
        "unclear message: {msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the second agent waited instead of exiting"
    );

    // The first agent still owns its socket and the data plane still serves.
    let now = env.wait_status("first agent answering", |s| s["pid"] == first["pid"]);
    assert_eq!(now["ready"], true);
    assert_eq!(env.link_ids(), links);
    let report = env.run_traffic(&[18081, 18082], &targets(), 200);
    assert_eq!(count(&report, "fail"), 0, "{report}");
    assert_eq!(count(&report, "ok"), 200, "{report}");
    assert_eq!(env.map_services(), env.source_services());
}

#[test]
fn preflight_refuses_a_cgroup_that_does_not_exist_naming_it_and_pins_nothing() {
    let env = AgentEnv::new("no-cgroup");
    let out = std::process::Command::new(AGENT)
        .arg("preflight")
        .arg("--bpffs-root")
        .arg(&env.bpffs_root)
        .args(["--cgroup", "/nonexistent/meshlet"])
        .output()
        .expect("run preflight");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "preflight accepted a missing cgroup: {text}"
    );
    assert!(
        text.contains("/nonexistent/meshlet") && text.contains("not a cgroup v2 directory"),
        "preflight did not name the cgroup: {text}"
    );
    assert!(
        !env.bpffs_root.join("meta").exists(),
        "preflight pinned something under {}",
        env.bpffs_root.display()
    );
}
