//! Table-driven tests of the standalone source format: good files become the expected state,
//! bad files are refused with file, line and field.

use std::net::IpAddr;

use meshlet_agent::model::{Backend, Protocol, ServiceKey};
use meshlet_agent::source::standalone::{Limits, StandaloneError, parse};

const LIMITS: Limits = Limits {
    max_services: 100,
    max_endpoints: 1000,
};

fn key(vip: &str, port: u16, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        vip: vip.parse().expect("vip"),
        port,
        protocol,
    }
}

fn backend(addr: &str, port: u16, weight: u16) -> Backend {
    Backend {
        addr: addr.parse::<IpAddr>().expect("addr"),
        port,
        weight,
    }
}

#[test]
fn a_documented_example_file_becomes_the_expected_services() {
    let text = "\
# two services
services:
  - name: web
    vip: 127.100.0.1
    ports:
      - port: 80
        targetPort: 8080
      - port: 53
        protocol: UDP
        targetPort: 5353
    endpoints:
      - address: 127.0.0.1
      - address: 127.0.0.2
        weight: 3
  - name: api-v6
    vip: fd00::10
    ports: [{ port: 443 }]
    endpoints:
      - { address: '::1', port: 9443 }
";
    let state = parse("services.yaml", text, LIMITS).expect("valid file");
    assert_eq!(state.services.len(), 3);
    assert_eq!(
        state.services[&key("127.100.0.1", 80, Protocol::Tcp)],
        vec![backend("127.0.0.1", 8080, 1), backend("127.0.0.2", 8080, 3)]
    );
    assert_eq!(
        state.services[&key("127.100.0.1", 53, Protocol::Udp)],
        vec![backend("127.0.0.1", 5353, 1), backend("127.0.0.2", 5353, 3)]
    );
    assert_eq!(
        state.services[&key("fd00::10", 443, Protocol::Tcp)],
        vec![backend("::1", 9443, 1)]
    );
}

#[test]
fn an_explicitly_empty_service_list_is_valid_and_means_no_services() {
    let state = parse("s.yaml", "services: []\n", LIMITS).expect("valid");
    assert!(state.services.is_empty());
}

#[test]
fn a_service_without_endpoints_is_kept_with_no_backends() {
    let text = "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n";
    let state = parse("s.yaml", text, LIMITS).expect("valid");
    assert_eq!(
        state.services[&key("127.100.0.1", 80, Protocol::Tcp)],
        vec![]
    );
}

const GOOD_HEAD: &str = "services:\n  - name: a\n    vip: 127.100.0.1\n    ports:\n      - port: 80\n    endpoints:\n      - address: 127.0.0.1\n        port: 8080\n";

/// (case, file text, expected "line: field" prefix, expected words in the message)
fn bad_cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    vec![
        (
            "endpoint port out of range",
            format!("{GOOD_HEAD}  - name: b\n    vip: 127.100.0.2\n    ports: [{{port: 81}}]\n    endpoints:\n      - address: 127.0.0.1\n        port: 70000\n"),
            "s.yaml:14: services[1].endpoints[0].port",
            "must be 1..65535, got 70000",
        ),
        (
            "service port zero",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports:\n      - port: 0\n".into(),
            "s.yaml:5: services[0].ports[0].port",
            "must be 1..65535, got 0",
        ),
        (
            "negative target port",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports:\n      - port: 80\n        targetPort: -1\n".into(),
            "s.yaml:6: services[0].ports[0].targetPort",
            "got -1",
        ),
        (
            "duplicate VIP and port",
            format!("{GOOD_HEAD}  - name: b\n    vip: 127.100.0.1\n    ports:\n      - port: 80\n"),
            "s.yaml:12: services[1].ports[0]",
            "duplicate frontend 127.100.0.1:80/TCP, already defined by services[0] at line 5",
        ),
        (
            "family mismatch",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n    endpoints:\n      - address: '::1'\n".into(),
            "s.yaml:6: services[0].endpoints[0].address",
            "does not match the service VIP",
        ),
        (
            "bad VIP",
            "services:\n  - name: a\n    vip: 127.100.0.300\n    ports: [{port: 80}]\n".into(),
            "s.yaml:3: services[0].vip",
            "must be an IPv4 or IPv6 address, got \"127.100.0.300\"",
        ),
        (
            "bad endpoint address",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n    endpoints:\n      - address: backend-1\n".into(),
            "s.yaml:6: services[0].endpoints[0].address",
            "got \"backend-1\"",
        ),
        (
            "weight zero",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n    endpoints:\n      - address: 127.0.0.1\n        weight: 0\n".into(),
            "s.yaml:7: services[0].endpoints[0].weight",
            "must be 1..65535, got 0",
        ),
        (
            "weight too large",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n    endpoints:\n      - address: 127.0.0.1\n        weight: 65536\n".into(),
            "s.yaml:7: services[0].endpoints[0].weight",
            "got 65536",
        ),
        (
            "unknown protocol",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports:\n      - port: 80\n        protocol: SCTP\n".into(),
            "s.yaml:6: services[0].ports[0].protocol",
            "must be TCP or UDP, got \"SCTP\"",
        ),
        (
            "no ports",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: []\n".into(),
            "s.yaml:4: services[0].ports",
            "must list at least one port",
        ),
        (
            "duplicate service name",
            format!("{GOOD_HEAD}  - name: a\n    vip: 127.100.0.2\n    ports: [{{port: 80}}]\n"),
            "s.yaml:9: services[1].name",
            "duplicate service name \"a\"",
        ),
        (
            "duplicate endpoint",
            format!("{GOOD_HEAD}      - address: 127.0.0.1\n        port: 8080\n"),
            "s.yaml:9: services[0].endpoints[1]",
            "duplicate endpoint 127.0.0.1",
        ),
        (
            "ambiguous endpoint port with several service ports",
            "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}, {port: 81}]\n    endpoints:\n      - address: 127.0.0.1\n        port: 8080\n".into(),
            "s.yaml:7: services[0].endpoints[0].port",
            "targetPort",
        ),
        (
            "too many services for the capacity",
            {
                let mut t = String::from("services:\n");
                for i in 0..101 {
                    t.push_str(&format!("  - {{ name: s{i}, vip: 127.100.1.{}, ports: [{{port: {}}}] }}\n", i % 200, 1000 + i));
                }
                t
            },
            "s.yaml:2: services",
            "101 frontends (VIP:port/protocol) exceed the capacity of 100",
        ),
        (
            "too many endpoints for the capacity",
            {
                let mut t = String::from("services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n    endpoints:\n");
                for i in 0..1001 {
                    t.push_str(&format!("      - {{ address: 127.0.0.1, port: {} }}\n", 2000 + i));
                }
                t
            },
            "s.yaml:2: services",
            "1001 endpoints",
        ),
        ("unknown key", "services:\n  - name: a\n    vip: 127.100.0.1\n    ports: [{port: 80}]\n    backends: []\n".into(), "s.yaml:5: backends", "unknown field `backends`, expected one of name, vip, ports, endpoints"),
        ("unknown top-level key", "services: []\nendpoints: []\n".into(), "s.yaml:2: endpoints", "unknown field `endpoints`"),
        ("wrong type for port", "services:\n  - name: a\n    vip: 127.100.0.1\n    ports:\n      - port: http\n".into(), "s.yaml:5: port", "must be an integer"),
        ("wrong type for services", "services: web\n".into(), "s.yaml:1: services", "must be a list"),
        ("missing vip", "services:\n  - name: a\n    ports: [{port: 80}]\n".into(), "s.yaml:3: vip", "missing field `vip`"),
        ("empty file", "".into(), "s.yaml:1: (document)", "file is empty"),
        ("only comments", "# nothing yet\n\n".into(), "s.yaml:1: (document)", "file is empty"),
        ("not YAML", "services: [\n  {name: a, vip: 127.100.0.1\n".into(), "s.yaml:2: ", "unclosed bracket"),
        ("a list at the top", "- name: a\n".into(), "s.yaml:1: name", "must be a mapping"),
    ]
}

#[test]
fn every_kind_of_bad_file_is_refused_with_file_line_and_field() {
    let mut failures = Vec::new();
    for (case, text, prefix, words) in bad_cases() {
        match parse("s.yaml", &text, LIMITS) {
            Ok(state) => failures.push(format!(
                "{case}: accepted as {} services",
                state.services.len()
            )),
            Err(e) => {
                let msg = match &e {
                    StandaloneError::Parse(i) | StandaloneError::Validate(i) => i.to_string(),
                    other => other.to_string(),
                };
                if !msg.starts_with(prefix) || !msg.contains(words) {
                    failures.push(format!(
                        "{case}: got {msg:?}, want prefix {prefix:?} containing {words:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_semantic_problems_of_a_file_are_reported_at_once() {
    let text = "services:\n  - name: a\n    vip: nope\n    ports:\n      - port: 0\n";
    let err = parse("s.yaml", text, LIMITS).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("s.yaml:3: services[0].vip"), "{msg}");
    assert!(msg.contains("s.yaml:5: services[0].ports[0].port"), "{msg}");
}

#[test]
fn the_example_files_shipped_in_the_repository_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/standalone");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/standalone exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            meshlet_agent::source::standalone::load(&path, LIMITS)
                .unwrap_or_else(|e| panic!("{} is invalid: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected at least two example files, found {seen}"
    );
}

#[test]
fn a_file_that_fills_the_default_capacities_is_accepted() {
    // 5,000 services with 20 endpoints each: the default map capacities, written in block
    // style with every key, as a person or a generator would.
    let mut text = String::from("services:\n");
    for s in 0..5_000u32 {
        text.push_str(&format!(
            "  - name: svc-{s}\n    vip: 127.100.{}.{}\n    ports:\n      - port: 80\n        protocol: TCP\n        targetPort: 8080\n    endpoints:\n",
            s / 250,
            s % 250 + 1
        ));
        for e in 0..20u32 {
            let i = s * 20 + e;
            text.push_str(&format!(
                "      - address: 127.{}.{}.{}\n        port: 8080\n        weight: 1\n",
                1 + i / 65_536,
                (i / 256) % 256,
                i % 256
            ));
        }
    }
    let limits = Limits {
        max_services: 5_000,
        max_endpoints: 100_000,
    };
    let state = parse("full.yaml", &text, limits).expect("a file at capacity must parse");
    assert_eq!(state.services.len(), 5_000);
    assert_eq!(
        state.services.values().map(Vec::len).sum::<usize>(),
        100_000
    );
}
