//! The `meshlet-test-apiserver` binary: says what it is, starts fast, serves kubectl.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn help_says_plainly_that_it_is_a_test_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshlet-test-apiserver"))
        .arg("--help")
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("TEST server"), "{help}");
    assert!(help.contains("not for production"), "{help}");
}

#[test]
fn the_binary_starts_in_well_under_a_second_and_kubectl_can_use_its_kubeconfig() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshlet-test-apiserver"))
        .args(["--port", "0", "--with-meshlet-crds", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let second = lines.next().expect("a line").expect("utf-8");
    let elapsed = started.elapsed();
    assert!(first.contains("TEST API server"), "{first}");
    assert!(second.starts_with("kubeconfig: "), "{second}");
    assert!(elapsed < Duration::from_secs(1), "startup took {elapsed:?}");
    let out = Command::new(support::kubectl_path())
        .args(["get", "meshconfigs"])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .output()
        .expect("kubectl");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("No resources found"));
}
