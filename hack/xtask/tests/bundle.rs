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

/// Asserts the report has exactly this problem.
fn assert_problem(report: &Report, expected: &str) {
    assert!(
        report.problems.iter().any(|p| p == expected),
        "expected problem\n  {expected}\nnot among {:#?}",
        report.problems
    );
}

fn assert_no_problems(report: &Report) {
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

const ETCD_CSV: &str = "etcdoperator.v0.9.4.clusterserviceversion.yaml";
const OUR_CSV: &str = "meshlet-operator.clusterserviceversion.yaml";

fn write_yaml(path: &Path, value: &Value) {
    std::fs::write(path, yaml::render(value).expect("render")).expect("write");
}

fn edit_yaml(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value =
        yaml::parse(&std::fs::read_to_string(path).expect("read")).expect("parse");
    edit(&mut value);
    write_yaml(path, &value);
}

fn service_account(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": name } })
}

#[test]
fn unmutated_bundles_have_no_problems_and_ours_no_warnings() {
    let (_temp, dir) = our_bundle();
    let report = check(&dir);
    assert_no_problems(&report);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
    let (_temp, dir) = etcd_bundle();
    let report = check(&dir);
    assert_no_problems(&report);
    // OLM warns that the etcd CSV sets no minKubeVersion; that is all.
    assert_eq!(
        report.warnings,
        [format!(
            "{ETCD_CSV}: spec.minKubeVersion is not set; OLM installs the operator on any \
             Kubernetes version"
        )]
    );
}

#[test]
fn a_service_account_the_install_strategy_creates_is_rejected_naming_both_files() {
    let (_temp, dir) = our_bundle();
    write_yaml(
        &dir.join("manifests/sa.yaml"),
        &service_account("meshlet-operator"),
    );
    assert_problem(
        &check(&dir),
        &format!(
            "sa.yaml: bundle ships ServiceAccount meshlet-operator, which the CSV's install \
             strategy creates ({OUR_CSV}: spec.install.spec.deployments[0].spec.template.spec.\
             serviceAccountName); remove the manifest or rename one of them"
        ),
    );

    // A name only a permissions entry uses is created by OLM all the same.
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        csv["spec"]["install"]["spec"]["permissions"][0]["serviceAccountName"] =
            json!("etcd-helper")
    });
    write_yaml(&dir.join("helper-sa.yaml"), &service_account("etcd-helper"));
    assert_problem(
        &check(&dir),
        &format!(
            "helper-sa.yaml: bundle ships ServiceAccount etcd-helper, which the CSV's install \
             strategy creates ({ETCD_CSV}: spec.install.spec.permissions[0].serviceAccountName); \
             remove the manifest or rename one of them"
        ),
    );
}

#[test]
fn a_service_account_of_another_name_is_accepted() {
    let (_temp, dir) = our_bundle();
    write_yaml(
        &dir.join("manifests/sa.yaml"),
        &service_account("meshlet-extra"),
    );
    assert_no_problems(&check(&dir));
}

fn conversion_webhook_crd(crd: &mut Value) {
    crd["spec"]["conversion"] = json!({
        "strategy": "Webhook",
        "webhook": {
            "conversionReviewVersions": ["v1"],
            "clientConfig": { "service": { "name": "webhook", "namespace": "default", "path": "/convert" } },
        },
    });
}

#[test]
fn a_conversion_webhook_with_namespaced_install_modes_is_rejected_naming_the_modes() {
    let (_temp, dir) = etcd_bundle();
    edit_yaml(
        &dir.join("etcdclusters.etcd.database.coreos.com.crd.yaml"),
        conversion_webhook_crd,
    );
    assert_problem(
        &check(&dir),
        &format!(
            "{ETCD_CSV}: spec.installModes must support only AllNamespaces when the bundle has \
             a conversion webhook (etcdclusters.etcd.database.coreos.com.crd.yaml sets \
             spec.conversion.strategy: Webhook), but spec.installModes[0] OwnNamespace is \
             supported, spec.installModes[1] SingleNamespace is supported, \
             spec.installModes[3] AllNamespaces is unsupported"
        ),
    );

    // The same from a webhook definition of the CSV, with only OwnNamespace wrong.
    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| {
        csv["spec"]["installModes"][0]["supported"] = json!(true);
        csv["spec"]["webhookdefinitions"] = json!([{
            "type": "ConversionWebhook",
            "generateName": "cmeshconfigs.meshlet.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "deploymentName": "meshlet-operator",
            "containerPort": 443,
            "webhookPath": "/convert",
            "conversionCRDs": ["meshconfigs.meshlet.io"],
        }]);
    });
    let report = check(&dir);
    assert_problem(
        &report,
        &format!(
            "{OUR_CSV}: spec.installModes must support only AllNamespaces when the bundle has a \
             conversion webhook (spec.webhookdefinitions[0] is a conversion webhook), but \
             spec.installModes[0] OwnNamespace is supported"
        ),
    );
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
}

#[test]
fn a_conversion_webhook_with_only_all_namespaces_is_accepted() {
    let (_temp, dir) = our_bundle();
    let owned = our_owned_crds(&dir);
    let name = owned[0]["name"].as_str().expect("owned name").to_owned();
    edit_yaml(
        &dir.join("manifests").join(format!("{name}.yaml")),
        conversion_webhook_crd,
    );
    assert_no_problems(&check(&dir));
}

#[test]
fn annotations_in_the_wrong_case_are_rejected_naming_the_right_spelling() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        let a = &mut csv["metadata"]["annotations"];
        a["olm.skiprange"] = json!(">=0.9.0 <0.9.4");
        a["olm.operatorgroup"] = json!("global-operators");
        a["OLM.OperatorNamespace"] = json!("operators");
    });
    let report = check(&dir);
    for (wrong, right) in [
        ("olm.skiprange", "olm.skipRange"),
        ("olm.operatorgroup", "olm.operatorGroup"),
        ("OLM.OperatorNamespace", "olm.operatorNamespace"),
    ] {
        assert_problem(
            &report,
            &format!(
                "{ETCD_CSV}: metadata.annotations.{wrong} uses the wrong case; OLM reads only \
                 {right}"
            ),
        );
    }
    assert_eq!(report.problems.len(), 3, "{:#?}", report.problems);
}

#[test]
fn annotations_in_olms_case_are_accepted() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        let a = &mut csv["metadata"]["annotations"];
        a["olm.skipRange"] = json!(">=0.9.0 <0.9.4");
        a["olm.operatorGroup"] = json!("global-operators");
        a["olm.operatorNamespace"] = json!("operators");
    });
    assert_no_problems(&check(&dir));
}

#[test]
fn a_csv_name_longer_than_63_characters_is_rejected_and_63_is_accepted() {
    // 56 + ".v0.1.0" (7) = 63 characters.
    let name63 = format!("{}.v0.1.0", "a".repeat(56));
    assert_eq!(name63.len(), 63);
    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| csv["metadata"]["name"] = json!(name63));
    assert_no_problems(&check(&dir));

    let name64 = format!("{}.v0.1.0", "a".repeat(57));
    let (_temp, dir) = our_bundle();
    edit_csv(&dir, |csv| csv["metadata"]["name"] = json!(name64));
    let report = check(&dir);
    assert_problem(
        &report,
        &format!(
            "{OUR_CSV}: metadata.name \"{name64}\" is 64 characters long; OLM uses it as a label \
             value, which must be no more than 63 characters"
        ),
    );
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
}

#[test]
fn an_owned_crd_whose_group_no_crd_file_defines_is_rejected_naming_the_gvk() {
    // The file keeps the owned name and kind but moves to another group: matching by name
    // and kind alone would accept it; OLM matches group, version and kind.
    let (_temp, dir) = etcd_bundle();
    edit_yaml(
        &dir.join("etcdclusters.etcd.database.coreos.com.crd.yaml"),
        |crd| crd["spec"]["group"] = json!("etcd.example.com"),
    );
    let report = check(&dir);
    assert_problem(
        &report,
        &format!(
            "{ETCD_CSV}: owned CRD etcdclusters.etcd.database.coreos.com \
             (spec.customresourcedefinitions.owned[0]: group etcd.database.coreos.com, version \
             v1beta2, kind EtcdCluster) has no CRD file in the bundle defining \
             \"etcd.database.coreos.com/v1beta2, Kind=EtcdCluster\" \
             (etcdclusters.etcd.database.coreos.com.crd.yaml defines \
             etcd.example.com/v1beta2, Kind=EtcdCluster)"
        ),
    );
    assert_problem(
        &report,
        "etcdclusters.etcd.database.coreos.com.crd.yaml: CRD \
         etcdclusters.etcd.database.coreos.com (etcd.example.com, Kind=EtcdCluster) is in the \
         bundle but not listed in the CSV's owned CRDs",
    );
}

#[test]
fn an_owned_crd_version_no_crd_file_defines_is_rejected_naming_the_gvk() {
    let (_temp, dir) = our_bundle();
    let owned = our_owned_crds(&dir);
    let (name, kind) = (
        owned[1]["name"].as_str().expect("name").to_owned(),
        owned[1]["kind"].as_str().expect("kind").to_owned(),
    );
    edit_csv(&dir, |csv| {
        csv["spec"]["customresourcedefinitions"]["owned"][1]["version"] = json!("v9")
    });
    let report = check(&dir);
    let problem = report
        .problems
        .iter()
        .find(|p| p.contains("owned[1]"))
        .unwrap_or_else(|| panic!("no problem names owned[1]: {:#?}", report.problems));
    assert!(
        problem.starts_with(&format!(
            "{OUR_CSV}: owned CRD {name} (spec.customresourcedefinitions.owned[1]: group \
             meshlet.io, version v9, kind {kind}) has no CRD file in the bundle defining \
             \"meshlet.io/v9, Kind={kind}\" ({name}.yaml defines meshlet.io/"
        )),
        "{problem}"
    );
}

#[test]
fn an_owned_crd_matched_by_group_version_kind_under_another_name_is_accepted_with_a_warning() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        csv["spec"]["customresourcedefinitions"]["owned"][0]["name"] =
            json!("clusters.etcd.database.coreos.com")
    });
    let report = check(&dir);
    assert_no_problems(&report);
    assert!(
        report.warnings.contains(&format!(
            "{ETCD_CSV}: spec.customresourcedefinitions.owned[0].name is \
             clusters.etcd.database.coreos.com, but \
             etcdclusters.etcd.database.coreos.com.crd.yaml, which defines \
             \"etcd.database.coreos.com/v1beta2, Kind=EtcdCluster\", is named \
             \"etcdclusters.etcd.database.coreos.com\""
        )),
        "{:#?}",
        report.warnings
    );
}

#[test]
fn min_kube_version_is_parsed_as_strict_semver() {
    for good in ["1.25.0", "1.30.0-rc.1", "1.30.0+k3s1"] {
        let (_temp, dir) = etcd_bundle();
        edit_csv(&dir, |csv| csv["spec"]["minKubeVersion"] = json!(good));
        let report = check(&dir);
        assert_no_problems(&report);
        assert!(report.warnings.is_empty(), "{good}: {:#?}", report.warnings);
    }
    for bad in ["1.25", "v1.25.0", "1.025.0", "1.25.0-", "latest"] {
        let (_temp, dir) = etcd_bundle();
        edit_csv(&dir, |csv| csv["spec"]["minKubeVersion"] = json!(bad));
        assert_problem(
            &check(&dir),
            &format!(
                "{ETCD_CSV}: spec.minKubeVersion \"{bad}\" is not a semantic version \
                 (MAJOR.MINOR.PATCH)"
            ),
        );
    }
}

#[test]
fn two_files_defining_the_same_crd_are_rejected_naming_both() {
    let (_temp, dir) = etcd_bundle();
    std::fs::copy(
        dir.join("etcdclusters.etcd.database.coreos.com.crd.yaml"),
        dir.join("zz-copy.crd.yaml"),
    )
    .expect("copy");
    assert_problem(
        &check(&dir),
        "zz-copy.crd.yaml: duplicate CRD etcdclusters.etcd.database.coreos.com \
         (metadata.name), already defined in etcdclusters.etcd.database.coreos.com.crd.yaml",
    );

    // Another name for the same group/version/kind is OLM's duplicate key.
    let (_temp, dir) = etcd_bundle();
    let copy = dir.join("zz-copy.crd.yaml");
    std::fs::copy(
        dir.join("etcdbackups.etcd.database.coreos.com.crd.yaml"),
        &copy,
    )
    .expect("copy");
    edit_yaml(&copy, |crd| {
        crd["metadata"]["name"] = json!("backups.etcd.database.coreos.com")
    });
    assert_problem(
        &check(&dir),
        "zz-copy.crd.yaml: duplicate CRD \"etcd.database.coreos.com/v1beta2, Kind=EtcdBackup\" \
         (spec.group, spec.versions, spec.names.kind), already defined in \
         etcdbackups.etcd.database.coreos.com.crd.yaml",
    );
}

#[test]
fn distinct_crds_in_one_file_are_accepted() {
    let (_temp, dir) = etcd_bundle();
    let mut text = String::new();
    for name in ["etcdbackups", "etcdrestores"] {
        let file = dir.join(format!("{name}.etcd.database.coreos.com.crd.yaml"));
        text.push_str("---\n");
        text.push_str(&std::fs::read_to_string(&file).expect("read"));
        std::fs::remove_file(file).expect("remove");
    }
    std::fs::write(dir.join("crds.yaml"), text).expect("write");
    let report = check(&dir);
    assert_no_problems(&report);
    assert!(
        report.summary.contains("3 CRD file(s)"),
        "{}",
        report.summary
    );
}

#[test]
fn a_crd_file_the_csv_only_requires_is_rejected_as_olm_does() {
    let (_temp, dir) = etcd_bundle();
    edit_csv(&dir, |csv| {
        let crds = &mut csv["spec"]["customresourcedefinitions"];
        let owned = crds["owned"].as_array_mut().expect("owned");
        let restore = owned.remove(2);
        assert_eq!(restore["kind"], "EtcdRestore");
        crds["required"] = json!([restore]);
    });
    assert_problem(
        &check(&dir),
        "etcdrestores.etcd.database.coreos.com.crd.yaml: CRD \
         etcdrestores.etcd.database.coreos.com (etcd.database.coreos.com, Kind=EtcdRestore) is \
         in the bundle but not listed in the CSV's owned CRDs (it is listed as required; a \
         bundle ships only CRDs it owns)",
    );
}
