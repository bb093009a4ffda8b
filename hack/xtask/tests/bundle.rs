//! The bundle checker against OLM's own valid bundle, our generated bundle, and deliberately
//! broken copies of both.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Value, json};
use xtask::bundle::{Report, check_bundle, check_bundle_with};
use xtask::{generate, yaml};

/// OLM's own valid bundle, kept in the repository.
fn reference_bundle() -> PathBuf {
    xtask::reference_dir().join("olm/testdata/valid_bundle")
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("list dir") {
        let path = entry.expect("entry").path();
        let dest = to.join(path.file_name().expect("file name"));
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).expect("copy file");
        }
    }
}

/// Our bundle, freshly generated into a temporary directory; returns (tempdir, bundle dir).
fn our_bundle() -> (tempfile::TempDir, PathBuf) {
    let tree = generate::generate(&xtask::workspace_root()).expect("generate");
    let temp = tempfile::tempdir().expect("tempdir");
    generate::write(&tree, temp.path()).expect("write");
    let dir = temp.path().join("olm");
    (temp, dir)
}

/// A copy of OLM's valid flat bundle in a temporary directory.
fn etcd_bundle() -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().join("bundle");
    copy_dir(&reference_bundle(), &dir);
    (temp, dir)
}

fn csv_path(dir: &Path) -> PathBuf {
    let manifests = if dir.join("manifests").is_dir() {
        dir.join("manifests")
    } else {
        dir.to_path_buf()
    };
    std::fs::read_dir(&manifests)
        .expect("list bundle")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().ends_with(".clusterserviceversion.yaml"))
        .expect("bundle has a CSV")
}

fn edit_csv(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = csv_path(dir);
    let mut csv: Value =
        yaml::parse(&std::fs::read_to_string(&path).expect("read CSV")).expect("parse CSV");
    edit(&mut csv);
    std::fs::write(&path, yaml::render(&csv).expect("render CSV")).expect("write CSV");
}

/// OLM's CSV CRD, parsed once for all tests (it is large).
fn csv_crd() -> &'static Value {
    static CSV_CRD: OnceLock<Value> = OnceLock::new();
    CSV_CRD.get_or_init(|| xtask::bundle::load_csv_crd().expect("load the CSV CRD"))
}

fn check(dir: &Path) -> Report {
    check_bundle_with(dir, csv_crd()).expect("the check runs")
}

fn assert_rejected_naming(report: &Report, needles: &[&str]) {
    assert!(
        !report.problems.is_empty(),
        "bundle was accepted: {report:?}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n))),
        "no problem mentions all of {needles:?}: {:#?}",
        report.problems
    );
}

fn our_owned_crds(dir: &Path) -> Vec<Value> {
    let csv: Value =
        yaml::parse(&std::fs::read_to_string(csv_path(dir)).expect("read")).expect("parse");
    let owned = csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !owned.is_empty(),
        "meshlet_crds::all_crds() returned no CRDs, so the CSV owns none"
    );
    owned
}

#[test]
fn olm_reference_bundle_in_the_flat_layout_is_accepted() {
    let report = check_bundle(&reference_bundle()).expect("the check runs");
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(report.summary.contains("flat layout"), "{}", report.summary);
    assert!(
        report.summary.contains("3 owned CRD(s)"),
        "{}",
        report.summary
    );
}

#[test]
fn our_generated_bundle_is_accepted() {
    let (_temp, dir) = our_bundle();
    let report = check(&dir);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    // The only notes allowed are CEL rules the client-side engine cannot evaluate.
    assert!(
        report
            .notes
            .iter()
            .all(|n| n.contains("could not be checked client-side")),
        "{:#?}",
        report.notes
    );
    assert!(report.summary.contains("registry+v1"), "{}", report.summary);
}

#[test]
fn committed_bundle_is_accepted() {
    let report = check(&xtask::workspace_root().join("olm"));
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

#[test]
fn removing_an_owned_crd_file_is_rejected_naming_the_crd() {
    let (_temp, dir) = etcd_bundle();
    std::fs::remove_file(dir.join("etcdbackups.etcd.database.coreos.com.crd.yaml"))
        .expect("remove");
    assert_rejected_naming(
        &check(&dir),
        &["etcdbackups.etcd.database.coreos.com", "no CRD file"],
    );

    let (_temp, dir) = our_bundle();
    let owned = our_owned_crds(&dir);
    let name = owned[0]["name"].as_str().expect("owned name").to_owned();
    std::fs::remove_file(dir.join("manifests").join(format!("{name}.yaml"))).expect("remove");
    assert_rejected_naming(&check(&dir), &[&name, "no CRD file"]);
}

#[test]
fn a_crd_file_the_csv_does_not_own_is_rejected() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        let owned = csv["spec"]["customresourcedefinitions"]["owned"]
            .as_array_mut()
            .expect("owned");
        owned.retain(|o| o["kind"] != "EtcdRestore");
    });
    assert_rejected_naming(
        &check(&dir),
        &["etcdrestores.etcd.database.coreos.com", "not listed"],
    );
}

#[test]
fn an_unknown_install_mode_type_is_rejected_naming_the_mode() {
    for (_temp, dir) in [etcd_bundle(), our_bundle()] {
        edit_csv(&dir, |csv| {
            csv["spec"]["installModes"][1]["type"] = json!("EveryNamespace")
        });
        assert_rejected_naming(
            &check(&dir),
            &["installModes[1]", "EveryNamespace", "not an install mode"],
        );
    }
}

#[test]
fn a_csv_field_of_the_wrong_type_or_unknown_name_is_rejected_by_the_csv_schema() {
    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| {
        csv["spec"]["installModes"][0]["supported"] = json!("yes")
    });
    assert_rejected_naming(
        &check(&dir),
        &["OLM's CSV schema", "spec.installModes[0].supported"],
    );

    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| csv["spec"]["minKubeVersoin"] = json!("1.30.0"));
    assert_rejected_naming(&check(&dir), &["OLM's CSV schema", "minKubeVersoin"]);

    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| {
        csv["spec"]["install"]["spec"]["deployments"][0]
            .as_object_mut()
            .expect("deployment")
            .remove("spec");
    });
    assert_rejected_naming(&check(&dir), &["OLM's CSV schema", "spec"]);
}

#[test]
fn alm_examples_that_are_not_a_json_array_are_rejected() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        csv["metadata"]["annotations"]["alm-examples"] = json!("[{\"kind\": ")
    });
    assert_rejected_naming(&check(&dir), &["alm-examples is not valid JSON"]);
}

#[test]
fn an_alm_example_of_a_kind_the_bundle_does_not_own_is_rejected() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        let raw = csv["metadata"]["annotations"]["alm-examples"]
            .as_str()
            .expect("string");
        let mut examples: Vec<Value> = serde_json::from_str(raw).expect("json");
        examples[0]["kind"] = json!("EtcdProxy");
        csv["metadata"]["annotations"]["alm-examples"] =
            json!(serde_json::to_string(&examples).expect("json"));
    });
    assert_rejected_naming(&check(&dir), &["alm-examples[0]", "EtcdProxy", "no CRD"]);
}

#[test]
fn an_alm_example_that_violates_its_crd_schema_is_rejected() {
    let (_temp, dir) = our_bundle();
    let mut examples: Vec<Value> = Vec::new();
    edit_csv(&dir, |csv| {
        let raw = csv["metadata"]["annotations"]["alm-examples"]
            .as_str()
            .expect("string");
        examples = serde_json::from_str(raw).expect("json");
        assert!(
            !examples.is_empty(),
            "examples/ holds no example, so alm-examples is empty"
        );
        examples[0]["spec"] = json!("not an object");
        examples[0]["unexpectedTopLevelField"] = json!(1);
        csv["metadata"]["annotations"]["alm-examples"] =
            json!(serde_json::to_string(&examples).expect("json"));
    });
    let kind = examples[0]["kind"].as_str().expect("kind").to_owned();
    let report = check(&dir);
    assert_rejected_naming(&report, &["alm-examples[0]", &kind, "spec: "]);
    assert_rejected_naming(&report, &["alm-examples[0]", "unexpectedTopLevelField"]);
}

#[test]
fn annotations_missing_a_required_key_are_rejected_naming_the_key() {
    let (_temp, dir) = our_bundle();
    let path = dir.join("metadata/annotations.yaml");
    let mut doc: Value =
        yaml::parse(&std::fs::read_to_string(&path).expect("read")).expect("parse");
    doc["annotations"]
        .as_object_mut()
        .expect("annotations")
        .remove("operators.operatorframework.io.bundle.package.v1");
    doc["annotations"]["operators.operatorframework.io.bundle.mediatype.v1"] = json!("plain");
    std::fs::write(&path, yaml::render(&doc).expect("render")).expect("write");
    let report = check(&dir);
    assert_rejected_naming(
        &report,
        &[
            "operators.operatorframework.io.bundle.package.v1",
            "missing",
        ],
    );
    assert_rejected_naming(&report, &["mediatype", "registry+v1"]);
}

#[test]
fn a_registry_bundle_without_annotations_is_rejected() {
    let (_temp, dir) = our_bundle();
    std::fs::remove_file(dir.join("metadata/annotations.yaml")).expect("remove");
    assert_rejected_naming(&check(&dir), &["metadata/annotations.yaml"]);
}

#[test]
fn a_dockerfile_label_that_disagrees_with_the_annotations_is_rejected() {
    let (_temp, dir) = our_bundle();
    let path = dir.join("bundle.Dockerfile");
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("package.v1=meshlet-operator"));
    std::fs::write(
        &path,
        text.replace("package.v1=meshlet-operator", "package.v1=other"),
    )
    .expect("write");
    assert_rejected_naming(&check(&dir), &["bundle.Dockerfile", "package.v1"]);
}

#[test]
fn an_alm_example_that_breaks_a_cel_rule_of_its_crd_is_rejected() {
    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| {
        let raw = csv["metadata"]["annotations"]["alm-examples"]
            .as_str()
            .expect("string");
        let mut examples: Vec<Value> = serde_json::from_str(raw).expect("json");
        let mesh = examples
            .iter_mut()
            .find(|e| e["kind"] == "MeshConfig")
            .expect("examples/ holds a MeshConfig");
        mesh["metadata"]["name"] = json!("primary");
        mesh["spec"]["upgrade"]["minReadySeconds"] = json!(900);
        mesh["spec"]["upgrade"]["progressDeadlineSeconds"] = json!(60);
        csv["metadata"]["annotations"]["alm-examples"] =
            json!(serde_json::to_string(&examples).expect("json"));
    });
    let report = check(&dir);
    assert_rejected_naming(&report, &["MeshConfig \"primary\"", "refused", "'default'"]);
    assert_rejected_naming(
        &report,
        &[
            "MeshConfig \"primary\"",
            "progressDeadlineSeconds must be greater than minReadySeconds",
        ],
    );
}

#[test]
fn a_min_kube_version_that_is_not_semver_is_rejected() {
    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| csv["spec"]["minKubeVersion"] = json!("1.30"));
    assert_rejected_naming(
        &check(&dir),
        &["spec.minKubeVersion", "\"1.30\"", "semantic version"],
    );
}

#[test]
fn an_alm_example_is_checked_against_a_v1beta1_crd_schema_when_it_has_one() {
    let (_temp, dir) = etcd_bundle();
    let path = dir.join("etcdclusters.etcd.database.coreos.com.crd.yaml");
    let mut crd: Value =
        yaml::parse(&std::fs::read_to_string(&path).expect("read")).expect("parse");
    crd["spec"]["validation"] = json!({ "openAPIV3Schema": {
        "type": "object",
        "properties": { "spec": {
            "type": "object",
            "properties": { "size": { "type": "integer", "minimum": 1 }, "version": { "type": "string" } },
        }},
    }});
    std::fs::write(&path, yaml::render(&crd).expect("render")).expect("write");
    let report = check(&dir);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);

    edit_csv(&dir, |csv| {
        let raw = csv["metadata"]["annotations"]["alm-examples"]
            .as_str()
            .expect("string");
        let mut examples: Vec<Value> = serde_json::from_str(raw).expect("json");
        examples[0]["spec"]["size"] = json!(0);
        csv["metadata"]["annotations"]["alm-examples"] =
            json!(serde_json::to_string(&examples).expect("json"));
    });
    assert_rejected_naming(
        &check(&dir),
        &["alm-examples[0]", "EtcdCluster", "spec.size"],
    );
}
