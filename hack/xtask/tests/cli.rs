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
