//! The `ipsec:` section of the standalone file: a valid section becomes the node's IPsec
//! configuration, every mistake is refused with `file:line: field: message`, and files
//! without the section keep working as before.

use std::io::Write;

use meshlet_agent::ipsec::Algorithm;
use meshlet_agent::source::standalone::{Limits, parse, parse_ipsec};

const KEYS: &str =
    "# spi psk salt\n1 000102030405060708090a0b0c0d0e0f 0a0b\n2 101112131415161718191a1b1c1d1e1f\n";

fn dir_with_keys(keys: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = std::fs::File::create(dir.path().join("ipsec.keys")).expect("key file");
    f.write_all(keys.as_bytes()).expect("write");
    dir
}

fn doc(ipsec: &str) -> String {
    format!("services: []\nipsec:\n{ipsec}")
}

const GOOD: &str = "  nodeName: node-a
  localAddress: 10.77.0.1
  algorithm: cbc(aes)+hmac(sha256)
  keyFile: ipsec.keys
  spis: [1, 2]
  activeSpi: 2
  peers:
    - name: node-b
      address: 10.77.0.2
    - name: node-c
      address: 10.77.0.3
";

#[test]
fn a_valid_section_becomes_the_nodes_ipsec_configuration() {
    let dir = dir_with_keys(KEYS);
    let cfg = parse_ipsec("n.yaml", &doc(GOOD), dir.path())
        .expect("valid")
        .expect("section present");
    assert_eq!(cfg.node_name, "node-a");
    assert!(
        cfg.keys
            .iter()
            .all(|k| k.algorithm == Algorithm::AesCbcHmacSha256)
    );
    assert_eq!(cfg.active_spi, Some(2));
    assert_eq!(
        cfg.keys.iter().map(|k| k.spi).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(cfg.keys[0].salt, vec![0x0a, 0x0b]);
    assert_eq!(cfg.peers.len(), 2);
    // The services part ignores the section.
    let limits = Limits {
        max_services: 10,
        max_endpoints: 10,
    };
    assert!(
        parse("n.yaml", &doc(GOOD), limits)
            .expect("services")
            .services
            .is_empty()
    );
}

#[test]
fn a_file_without_the_section_has_no_ipsec() {
    let dir = dir_with_keys(KEYS);
    assert!(
        parse_ipsec("n.yaml", "services: []\n", dir.path())
            .expect("valid")
            .is_none()
    );
}

fn refusal(ipsec: &str, keys: &str) -> String {
    let dir = dir_with_keys(keys);
    parse_ipsec("n.yaml", &doc(ipsec), dir.path())
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn mistakes_are_refused_naming_the_line_and_field() {
    let bad_alg = GOOD.replace("cbc(aes)+hmac(sha256)", "des");
    let msg = refusal(&bad_alg, KEYS);
    assert!(
        msg.contains("n.yaml:5: ipsec.algorithm: must be one of rfc4106(gcm(aes))"),
        "{msg}"
    );

    let bad_active = GOOD.replace("activeSpi: 2", "activeSpi: 3");
    let msg = refusal(&bad_active, KEYS);
    assert!(
        msg.contains("n.yaml:8: ipsec.activeSpi: must be one of ipsec.spis [1, 2]"),
        "{msg}"
    );

    let dup_peer = GOOD.replace("10.77.0.3", "10.77.0.2");
    let msg = refusal(&dup_peer, KEYS);
    assert!(
        msg.contains("ipsec.peers[1].address: duplicate address 10.77.0.2"),
        "{msg}"
    );

    let self_peer = GOOD.replace("name: node-b", "name: node-a");
    let msg = refusal(&self_peer, KEYS);
    assert!(msg.contains("n.yaml:10: ipsec.peers[0].name"), "{msg}");

    let v6_peer = GOOD.replace("10.77.0.3", "fd00::3");
    let msg = refusal(&v6_peer, KEYS);
    assert!(
        msg.contains("ipsec.peers[1].address: address family IPv6"),
        "{msg}"
    );

    let big_spi = GOOD.replace("spis: [1, 2]", "spis: [1, 70000]");
    let msg = refusal(&big_spi, KEYS);
    assert!(
        msg.contains("ipsec.spis[1]: must be 1..65535, got 70000"),
        "{msg}"
    );
}

#[test]
fn key_file_problems_name_the_key_file_and_its_line() {
    let msg = refusal(GOOD, "1 000102030405060708090a0b0c0d0e0f\n");
    assert!(
        msg.contains("ipsec.keyFile") && msg.contains("has no key for spi 2"),
        "{msg}"
    );

    let msg = refusal(GOOD, "1 0001\n2 101112131415161718191a1b1c1d1e1f\n");
    assert!(
        msg.contains("ipsec.keys:1: the pre-shared key has 2 bytes; at least 16"),
        "{msg}"
    );

    let msg = refusal(GOOD, "1 zz\n");
    assert!(
        msg.contains("ipsec.keys:1: the pre-shared key must be hex digits"),
        "{msg}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let msg = parse_ipsec("n.yaml", &doc(GOOD), dir.path())
        .expect_err("no key file")
        .to_string();
    assert!(
        msg.contains("n.yaml:6: ipsec.keyFile: cannot read"),
        "{msg}"
    );
}

#[test]
fn unknown_keys_in_the_section_are_refused() {
    let msg = refusal(&format!("{GOOD}  mode: tunnel\n"), KEYS);
    assert!(msg.contains("mode"), "{msg}");
}
