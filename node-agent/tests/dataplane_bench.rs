//! Data-plane benchmark (not part of CI; run `hack/bench/run.sh`). Prints one run's numbers:
//! connect() rate through a VIP vs direct to the backend, vs an iptables DNAT setup with 5,000
//! services kube-proxy style, cold sync of 5,000 services / 100,000 endpoints, warm restart,
//! migration, and map update throughput.
//!
//! The connect loops run in a child process (this test binary re-run in client mode) placed in
//! the test cgroup and in its own network namespace, with its backends as threads.

mod dataplane_support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use dataplane_support::{TestEnv, svc};
use meshlet_agent::dataplane::{Dataplane, DataplaneConfig, RestartKind};
use meshlet_agent::model::{Backend, DesiredState, Protocol};

const CLIENT_ENV: &str = "MESHLET_BENCH_CLIENT";
const PHASE: Duration = Duration::from_millis(1500);
const BACKEND_PORTS: [u16; 2] = [36000, 36001];

/// Connections per second to `targets` (round robin) for `PHASE`: connect, read one byte,
/// close with RST so no TIME_WAIT piles up.
fn connect_rate(targets: &[SocketAddr]) -> f64 {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < PHASE {
        let target = targets[n as usize % targets.len()];
        let mut stream = TcpStream::connect(target).expect("connect in benchmark");
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .expect("read the backend's byte");
        let _ = nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        );
        drop(stream);
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Client mode: serve the backends, optionally install iptables rules, then measure.
/// Prints `BENCH {json}`. Does nothing unless the parent set `MESHLET_BENCH_CLIENT`.
#[test]
#[ignore = "benchmark client, started by the benchmark itself"]
fn benchmark_client_process() {
    let Ok(mode) = std::env::var(CLIENT_ENV) else {
        return;
    };
    for port in BACKEND_PORTS {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind backend");
        std::thread::spawn(move || {
            // Write one byte, wait for the client's reset: nobody lingers in TIME_WAIT.
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(b"x");
                let _ = conn.read(&mut [0u8; 1]);
            }
        });
    }
    let vip: SocketAddr = std::env::var("MESHLET_BENCH_VIP")
        .expect("vip")
        .parse()
        .expect("vip addr");
    // Direct connects spread over the same two backends the VIP balances over.
    let direct: Vec<SocketAddr> = BACKEND_PORTS
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut result = BTreeMap::new();
    if mode == "iptables" {
        let rules = iptables_rules(5_000);
        let started = Instant::now();
        let mut child = Command::new("iptables-restore")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        assert!(
            child.wait().expect("wait").success(),
            "iptables-restore failed"
        );
        result.insert("iptables_restore_s", started.elapsed().as_secs_f64());
        let mut best = 0f64;
        for _ in 0..3 {
            best = best.max(connect_rate(&[vip]));
        }
        result.insert("iptables_vip", best);
    } else {
        let mut direct_best = 0f64;
        let mut vip_best = 0f64;
        for _ in 0..3 {
            direct_best = direct_best.max(connect_rate(&direct));
            vip_best = vip_best.max(connect_rate(&[vip]));
        }
        result.insert("direct", direct_best);
        result.insert("ebpf_vip", vip_best);
    }
    println!("BENCH {}", serde_json::to_string(&result).expect("json"));
}

/// VIP of service `i` (inside 127.200.0.0/16 so nothing leaves loopback).
fn vip_of(i: u32) -> IpAddr {
    IpAddr::from([127, 200, (i / 250) as u8, (i % 250 + 1) as u8])
}

/// kube-proxy style nat rules: KUBE-SERVICES → KUBE-SVC-n → KUBE-SEP-n-m (statistic random).
fn iptables_rules(services: u32) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..services {
        r.push_str(&format!(
            ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i}-0 - [0:0]\n:KUBE-SEP-{i}-1 - [0:0]\n"
        ));
    }
    r.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..services {
        r.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp --dport 80 -j KUBE-SVC-{i}\n",
            vip_of(i)
        ));
        r.push_str(&format!(
            "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i}-0\n-A KUBE-SVC-{i} -j KUBE-SEP-{i}-1\n"
        ));
        for (m, port) in BACKEND_PORTS.iter().enumerate() {
            r.push_str(&format!(
                "-A KUBE-SEP-{i}-{m} -p tcp -j DNAT --to-destination 127.0.0.1:{port}\n"
            ));
        }
    }
    r.push_str("COMMIT\n");
    r
}

fn run_client(
    env: &TestEnv,
    mode: &str,
    vip: SocketAddr,
    in_cgroup: bool,
) -> BTreeMap<String, f64> {
    let exe = std::env::current_exe().expect("current exe");
    let mut shell = String::new();
    if in_cgroup {
        shell.push_str(&format!(
            "echo $$ > {}/cgroup.procs || exit 97; ",
            env.cfg.cgroup.display()
        ));
    }
    shell.push_str("exec unshare -n sh -c 'ip link set lo up && exec \"$@\"' sh \"$@\"");
    let out = Command::new("sh")
        .arg("-c")
        .arg(shell)
        .arg("sh")
        .arg(exe)
        .args([
            "--exact",
            "benchmark_client_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_ENV, mode)
        .env("MESHLET_BENCH_VIP", vip.to_string())
        .output()
        .expect("run benchmark client");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("BENCH ").map(|(_, json)| json))
        .unwrap_or_else(|| {
            panic!(
                "client printed no result: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).expect("client json")
}

fn desired(services: u32, per: u16) -> DesiredState {
    let mut out = DesiredState::default();
    for i in 0..services {
        let key = svc(&vip_of(i).to_string(), 80, Protocol::Tcp);
        let backends = (0..per)
            .map(|m| Backend {
                addr: "127.0.0.1".parse().expect("addr"),
                port: BACKEND_PORTS[usize::from(m) % BACKEND_PORTS.len()],
                weight: 1,
            })
            .collect();
        out.services.insert(key, backends);
    }
    out
}

#[test]
#[ignore = "benchmark: run hack/bench/run.sh"]
fn benchmark_dataplane() {
    let env = TestEnv::new("bench", 2);
    let cfg = DataplaneConfig {
        max_services: 5_000,
        max_endpoints: 100_000,
        ..env.cfg.clone()
    };

    // Cold sync: 5,000 services x 20 endpoints.
    let (mut dp, fresh) = Dataplane::start(cfg.clone()).expect("fresh start");
    assert_eq!(fresh.kind, RestartKind::Fresh);
    let big = desired(5_000, 20);
    let stats = dp.apply(&big).expect("cold sync");
    let entries = stats.backends_written * 2 + stats.services_upserted * 2;
    println!(
        "cold sync: {} services / {} endpoints in {:?} ({:.2} M map entries/s over {entries} entries)",
        stats.services_upserted,
        stats.backends_written,
        stats.duration,
        entries as f64 / stats.duration.as_secs_f64() / 1e6
    );
    drop(dp);

    // Warm restart to ready (adopt, replace programs, rebuild the index from the maps).
    let (dp, warm) = Dataplane::start(cfg.clone()).expect("warm start");
    assert_eq!(warm.kind, RestartKind::Warm);
    assert_eq!(dp.observed().expect("observed").services.len(), 5_000);
    println!(
        "warm restart to ready: {:?} (link ids unchanged: {})",
        warm.duration, warm.link_ids_unchanged
    );
    drop(dp);

    // Migration 2 -> 1 and back, 100,000 endpoints.
    let (dp, down) = Dataplane::start(DataplaneConfig {
        layout: 1,
        ..cfg.clone()
    })
    .expect("migrate 2->1");
    assert_eq!(down.kind, RestartKind::Migrated);
    drop(dp);
    let (mut dp, up) = Dataplane::start(cfg.clone()).expect("migrate 1->2");
    assert_eq!(up.kind, RestartKind::Migrated);
    println!(
        "migration 2->1: {:?}, 1->2: {:?} (100,000 endpoints)",
        down.duration, up.duration
    );

    // Connect rate: 5,000 services x 2 endpoints in the maps vs the same in iptables.
    dp.apply(&desired(5_000, 2))
        .expect("apply 2 endpoints each");
    let vip = SocketAddr::new(vip_of(2_500), 80);
    let ebpf = run_client(&env, "ebpf", vip, true);
    let ipt = run_client(&env, "iptables", vip, false);
    let (direct, via_vip, via_ipt) = (ebpf["direct"], ebpf["ebpf_vip"], ipt["iptables_vip"]);
    println!(
        "connect/s direct {direct:.0}, eBPF VIP {via_vip:.0}, iptables VIP {via_ipt:.0} (5,000 services, service #2500)"
    );
    println!(
        "ratio eBPF VIP / direct: {:.3} (target >= 0.95)",
        via_vip / direct
    );
    println!(
        "ratio eBPF VIP / iptables VIP: {:.2} (target >= 1.5)",
        via_vip / via_ipt
    );
    println!(
        "iptables-restore of 5,000 services: {:.2} s",
        ipt["iptables_restore_s"]
    );
    drop(dp);
}
