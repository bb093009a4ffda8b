//! `hack/validate-manifests.sh` accepts the committed base and rejects a broken copy.

use std::path::Path;
use std::process::Command;

fn run_script(dir: &Path) -> (bool, String) {
    let root = xtask::workspace_root();
    assert!(
        root.join(".venv/bin/kubernetes-validate").is_file(),
        "kubernetes-validate is not installed; run hack/setup.sh"
    );
    let out = Command::new("bash")
        .arg(root.join("hack/validate-manifests.sh"))
        .arg(dir)
        .output()
        .expect("run validate-manifests.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy_of_manifests() -> tempfile::TempDir {
    let temp = tempfile::tempdir().expect("tempdir");
    let tree = xtask::generate::generate(&xtask::workspace_root()).expect("generate");
    xtask::generate::write(&tree, temp.path()).expect("write");
    temp
}

#[test]
fn committed_manifests_pass_kubernetes_validation() {
    let (ok, out) = run_script(&xtask::workspace_root().join("manifests"));
    assert!(ok, "{out}");
    assert!(
        out.contains("passed for resource deployment/meshlet-operator"),
        "{out}"
    );
}

#[test]
fn a_deployment_with_a_wrongly_typed_field_is_rejected() {
    let temp = copy_of_manifests();
    let path = temp.path().join("manifests/operator/deployment.yaml");
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("  replicas: 1\n"));
    std::fs::write(&path, text.replace("  replicas: 1\n", "  replicas: one\n")).expect("write");
    let (ok, out) = run_script(&temp.path().join("manifests"));
    assert!(!ok, "broken manifest accepted:\n{out}");
    assert!(out.contains("spec.replicas"), "{out}");
}

#[test]
fn an_unknown_field_in_a_role_is_rejected_in_strict_mode() {
    let temp = copy_of_manifests();
    let path = temp.path().join("manifests/rbac/agent-role.yaml");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("  resourceNames:", "  resourceName:")).expect("write");
    let (ok, out) = run_script(&temp.path().join("manifests"));
    assert!(!ok, "broken manifest accepted:\n{out}");
    assert!(out.contains("resourceName"), "{out}");
}

#[test]
fn kubectl_kustomize_reads_back_exactly_the_objects_we_generated() {
    let root = xtask::workspace_root();
    let kubectl = root.join(".venv/bin/kubectl");
    assert!(
        kubectl.is_file(),
        "kubectl is not installed; run hack/setup.sh"
    );
    let temp = copy_of_manifests();
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(temp.path().join("manifests"))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = xtask::yaml::parse_all(&String::from_utf8_lossy(&out.stdout)).expect("parse");

    let tree = xtask::generate::generate(&root).expect("generate");
    let generated: Vec<serde_json::Value> = tree
        .iter()
        .filter(|(p, _)| p.starts_with("manifests") && !p.ends_with("kustomization.yaml"))
        .map(|(_, text)| xtask::yaml::parse(text).expect("parse generated"))
        .collect();
    assert_eq!(rendered.len(), generated.len());
    for object in &generated {
        assert!(
            rendered.contains(object),
            "kubectl read {} {} differently",
            object["kind"],
            object["metadata"]["name"]
        );
    }
}
