//! The `xtask` binary's exit codes, as CI sees them.

use std::process::Command;

fn xtask(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn olm_validate_exits_zero_on_the_reference_bundle_and_non_zero_on_a_broken_one() {
    let reference = xtask::reference_dir().join("olm/testdata/valid_bundle");
    let (ok, out) = xtask(&["olm-validate", reference.to_str().expect("utf-8 path")]);
    assert!(ok, "{out}");
    assert!(out.contains("is valid"), "{out}");

    let temp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&reference).expect("list") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().contains("etcdclusters") {
            std::fs::copy(&path, temp.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let (ok, out) = xtask(&["olm-validate", temp.path().to_str().expect("utf-8 path")]);
    assert!(!ok, "broken bundle accepted: {out}");
    assert!(out.contains("problem: "), "{out}");
    assert!(
        out.contains("etcdclusters.etcd.database.coreos.com"),
        "{out}"
    );
}

#[test]
fn olm_validate_of_a_missing_directory_fails_with_its_path() {
    let (ok, out) = xtask(&["olm-validate", "/nonexistent/bundle"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("/nonexistent/bundle is not a directory"),
        "{out}"
    );
}

#[test]
fn olm_validate_prints_warnings_and_still_exits_zero() {
    let reference = xtask::reference_dir().join("olm/testdata/valid_bundle");
    let (ok, out) = xtask(&["olm-validate", reference.to_str().expect("utf-8 path")]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "warning: etcdoperator.v0.9.4.clusterserviceversion.yaml: spec.minKubeVersion is \
             not set"
        ),
        "{out}"
    );
    assert!(out.contains("is valid with 1 warning(s)"), "{out}");
}

#[test]
fn olm_validate_exits_non_zero_on_a_service_account_the_csv_creates() {
    let reference = xtask::reference_dir().join("olm/testdata/valid_bundle");
    let temp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&reference).expect("list") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, temp.path().join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(
        temp.path().join("sa.yaml"),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: etcd-operator\n",
    )
    .expect("write");
    let (ok, out) = xtask(&["olm-validate", temp.path().to_str().expect("utf-8 path")]);
    assert!(!ok, "bundle accepted: {out}");
    assert!(
        out.contains("problem: sa.yaml: bundle ships ServiceAccount etcd-operator"),
        "{out}"
    );
}
