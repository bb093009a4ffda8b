//! The agent's admin surfaces against a real agent: `meshletctl status|maps|log-level`,
//! `/healthz`, `/readyz` and the Prometheus `/metrics` text.

mod agent_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use agent_support::{AgentEnv, count, svc, yaml};

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A minimal HTTP/1.0 GET; returns (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn metric(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in:\n{body}"))
}

#[test]
fn metrics_health_readiness_and_the_cli_report_what_the_data_plane_does() {
    let mut env = AgentEnv::new("admin");
    env.write_source(&yaml(&[svc("web", "127.100.0.1", 80, &[18081, 18082])], 3));
    let addr = free_addr();
    let child = env
        .agent_command("run", 2)
        .arg("--metrics-addr")
        .arg(addr.to_string())
        .spawn()
        .expect("spawn agent");
    env.agent = Some(child);
    env.wait_ready();

    assert_eq!(get(addr, "/healthz").0, 200);
    let (code, body) = get(addr, "/readyz");
    assert_eq!(code, 200, "{body}");

    let report = env.run_traffic(
        &[18081, 18082],
        &[("127.100.0.1".into(), 80, vec![18081, 18082])],
        50,
    );
    assert_eq!(count(&report, "ok"), 50, "{report}");

    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric(&body, "meshlet_agent_map_entries{map=\"frontend\"}"),
        4.0,
        "{body}"
    );
    assert!(metric(&body, "meshlet_agent_map_capacity{map=\"frontend\"}") >= 8192.0);
    assert_eq!(
        metric(&body, "meshlet_agent_restarts_total{kind=\"fresh\"}"),
        1.0
    );
    assert_eq!(
        metric(&body, "meshlet_agent_syncs_total{kind=\"applied\"}"),
        1.0
    );
    assert_eq!(
        metric(&body, "meshlet_agent_sync_duration_seconds_count"),
        1.0
    );
    assert_eq!(metric(&body, "meshlet_agent_ready"), 1.0);
    assert!(
        metric(&body, "meshlet_agent_dataplane_events{kind=\"rewritten\"}") >= 50.0,
        "the 50 connections were not counted:\n{body}"
    );

    let (ok, out, err) = env.ctl(&["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ready:       true") && out.contains("program:     connect4"),
        "{out}"
    );
    let (ok, out, err) = env.ctl(&["maps", "--entries"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("127.100.0.1:80/TCP -> 127.0.0.1:18081 (w1), 127.0.0.1:18082 (w1)"),
        "{out}"
    );

    let (ok, out, err) = env.ctl(&["log-level", "debug"]);
    assert!(ok && out.contains("info -> debug"), "{out}{err}");
    let (ok, _, err) = env.ctl(&["log-level", "not a [filter"]);
    assert!(
        !ok && err.contains("log filter"),
        "a bad filter was accepted: {err}"
    );

    // The socket is private to root.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(env.socket())
            .expect("socket")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Without an agent, status says so and preflight answers from bpffs directly.
    assert!(env.stop_agent(nix::sys::signal::Signal::SIGTERM).success());
    let (ok, _, err) = env.ctl(&["status"]);
    assert!(
        !ok && err.contains("failed to connect to the agent"),
        "{err}"
    );
    let (ok, out, _) = env.ctl(&["preflight", "--layout", "1"]);
    assert!(ok && out.starts_with("migrate:"), "{out}");
    let out = Command::new(agent_support::AGENT)
        .arg("--help")
        .output()
        .expect("help");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--dataplane-layout"));
}
