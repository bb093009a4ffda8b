//! Kernel tests: a connect or send to a VIP reaches a backend, for TCP and UDP over IPv4 and
//! IPv6; applications see the VIP as their peer; processes outside the cgroup are untouched.
//!
//! Every exchange runs in a helper process with its own network namespace (loopback only),
//! so a destination that were not rewritten could not leave the machine. VIPs: 127.100.0.0/16
//! for IPv4 and fd00:6d65::/32 (ULA, unrouted in the namespace) for IPv6.

mod dataplane_support;

use dataplane_support::{TestEnv, Traffic, backends, state, svc};
use meshlet_agent::dataplane::{Dataplane, RestartKind};
use meshlet_agent::model::Protocol;

fn rewrites(tag: &str, vip: &str, backend_addr: &str, protocol: Protocol, layout: u32) {
    let env = TestEnv::new(tag, layout);
    let key = svc(vip, 8080, protocol);
    let bes = backends(backend_addr, 31000, 3);
    let (mut dp, report) = Dataplane::start(env.cfg.clone()).expect("start data plane");
    assert_eq!(report.kind, RestartKind::Fresh);
    dp.apply(&state(&[(key, bes.clone())])).expect("apply");
    let mut traffic = Traffic::to(key, &bes);
    traffic.count = 60;
    let seen = env.run_traffic(&traffic);
    assert_eq!(seen.fail, 0, "failed exchanges: {}", seen.errors);
    assert_eq!(seen.ok, 60);
    assert!(
        seen.peer_is_vip,
        "the application saw a backend address instead of the VIP"
    );
    assert!(
        seen.by_backend.len() >= 2,
        "traffic did not spread over the backends: {:?}",
        seen.by_backend
    );
    let counters = dp.counters().expect("counters");
    assert!(counters.rewritten >= 60, "counters {counters:?}");
}

#[test]
fn tcp_over_ipv4_to_a_vip_reaches_several_backends_and_sees_the_vip_as_peer() {
    rewrites("tcp4", "127.100.0.1", "127.0.0.1", Protocol::Tcp, 1);
}

#[test]
fn udp_over_ipv4_to_a_vip_reaches_several_backends_and_replies_come_from_the_vip() {
    rewrites("udp4", "127.100.0.2", "127.0.0.1", Protocol::Udp, 2);
}

#[test]
fn tcp_over_ipv6_to_a_vip_reaches_several_backends_and_sees_the_vip_as_peer() {
    rewrites("tcp6", "fd00:6d65::1", "::1", Protocol::Tcp, 2);
}

#[test]
fn udp_over_ipv6_to_a_vip_reaches_several_backends_and_replies_come_from_the_vip() {
    rewrites("udp6", "fd00:6d65::2", "::1", Protocol::Udp, 1);
}

#[test]
fn a_process_outside_the_agent_cgroup_is_not_rewritten() {
    let env = TestEnv::new("outside", 2);
    let key = svc("127.100.0.3", 8080, Protocol::Tcp);
    let bes = backends("127.0.0.1", 31000, 2);
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start data plane");
    dp.apply(&state(&[(key, bes.clone())])).expect("apply");
    let mut traffic = Traffic::to(key, &bes);
    traffic.in_cgroup = false;
    traffic.count = 5;
    let seen = env.run_traffic(&traffic);
    assert_eq!(
        seen.ok, 0,
        "a process outside the cgroup reached a backend: {seen:?}"
    );
    assert_eq!(seen.fail, 5);
    assert_eq!(dp.counters().expect("counters").handled, 0);
}

#[test]
fn weights_of_layout_two_steer_most_traffic_to_the_heavy_backend() {
    let env = TestEnv::new("weights", 2);
    let key = svc("127.100.0.4", 8080, Protocol::Udp);
    let mut bes = backends("127.0.0.1", 31000, 2);
    bes[0].weight = 9;
    bes[1].weight = 1;
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start data plane");
    dp.apply(&state(&[(key, bes.clone())])).expect("apply");
    let mut traffic = Traffic::to(key, &bes);
    traffic.count = 400;
    let seen = env.run_traffic(&traffic);
    assert_eq!(seen.fail, 0, "{}", seen.errors);
    let heavy = seen.by_backend.get(&31000).copied().unwrap_or(0);
    assert!(
        heavy > 300,
        "weight 9 of 10 got only {heavy} of 400: {:?}",
        seen.by_backend
    );
}

#[test]
fn a_service_without_backends_is_refused_quickly() {
    let env = TestEnv::new("nobackend", 1);
    let key = svc("127.100.0.5", 8080, Protocol::Tcp);
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start data plane");
    dp.apply(&state(&[(key, vec![])])).expect("apply");
    let mut traffic = Traffic::to(key, &[]);
    traffic.count = 3;
    let seen = env.run_traffic(&traffic);
    assert_eq!(seen.fail, 3);
    assert_eq!(dp.counters().expect("counters").no_backend, 3);
}
