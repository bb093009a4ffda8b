//! `cargo xtask gen` output: drift detection, determinism and the committed tree.

use std::path::Path;

use xtask::generate::{self, Drift};

/// A throwaway "repository" holding the generated tree and a copy of `examples/`.
fn scratch_repo() -> tempfile::TempDir {
    let root = xtask::workspace_root();
    let temp = tempfile::tempdir().expect("tempdir");
    let tree = generate::generate(&root).expect("generate");
    generate::write(&tree, temp.path()).expect("write");
    let examples = root.join("examples");
    std::fs::create_dir_all(temp.path().join("examples")).expect("mkdir");
    if examples.is_dir() {
        for entry in std::fs::read_dir(&examples).expect("list") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                std::fs::copy(
                    &path,
                    temp.path()
                        .join("examples")
                        .join(path.file_name().expect("name")),
                )
                .expect("copy");
            }
        }
    }
    temp
}

#[test]
fn generation_is_deterministic() {
    let root = xtask::workspace_root();
    let a = generate::generate(&root).expect("generate");
    let b = generate::generate(&root).expect("generate");
    assert_eq!(a, b);
}

#[test]
fn committed_generated_files_are_up_to_date() {
    let drift = generate::verify(&xtask::workspace_root()).expect("verify runs");
    let lines: Vec<String> = drift.iter().map(ToString::to_string).collect();
    assert!(drift.is_empty(), "run `cargo xtask gen`: {lines:#?}");
}

#[test]
fn verify_detects_a_modified_a_missing_and_a_stale_generated_file() {
    let repo = scratch_repo();
    let root = repo.path();
    assert_eq!(generate::verify(root).expect("verify"), Vec::<Drift>::new());

    let deployment = Path::new("manifests/operator/deployment.yaml");
    let text = std::fs::read_to_string(root.join(deployment)).expect("read");
    std::fs::write(
        root.join(deployment),
        text.replace("replicas: 1", "replicas: 3"),
    )
    .expect("write");
    let annotations = Path::new("olm/metadata/annotations.yaml");
    std::fs::remove_file(root.join(annotations)).expect("remove");
    let stale = Path::new("manifests/rbac/old-role.yaml");
    std::fs::write(root.join(stale), "kind: Role\n").expect("write");

    let drift = generate::verify(root).expect("verify");
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, Drift::Changed { path, .. } if path == deployment)),
        "{drift:?}"
    );
    assert!(
        drift.contains(&Drift::Missing(annotations.to_path_buf())),
        "{drift:?}"
    );
    assert!(
        drift.contains(&Drift::Extra(stale.to_path_buf())),
        "{drift:?}"
    );
    assert_eq!(drift.len(), 3, "{drift:?}");
}

#[test]
fn gen_removes_stale_files_and_restores_edited_ones() {
    let repo = scratch_repo();
    let root = repo.path();
    let stale = root.join("olm/manifests/removed.yaml");
    std::fs::write(&stale, "kind: Gone\n").expect("write");
    std::fs::write(root.join("olm/bundle.Dockerfile"), "FROM busybox\n").expect("write");
    let tree = generate::generate(root).expect("generate");
    generate::write(&tree, root).expect("write");
    assert!(!stale.exists());
    assert!(generate::verify(root).expect("verify").is_empty());
}

#[test]
fn every_generated_yaml_file_starts_with_the_generated_header_and_parses() {
    let tree = generate::generate(&xtask::workspace_root()).expect("generate");
    for (path, text) in &tree {
        assert!(
            text.starts_with(xtask::yaml::HEADER),
            "{} lacks the header",
            path.display()
        );
        if path.extension().is_some_and(|e| e == "yaml") {
            let docs = xtask::yaml::parse_all(text).expect("parses");
            assert_eq!(docs.len(), 1, "{}", path.display());
        }
    }
}

#[test]
fn bundle_installs_the_same_deployment_and_rbac_as_the_kustomize_base() {
    let tree = generate::generate(&xtask::workspace_root()).expect("generate");
    let doc = |p: &str| -> serde_json::Value {
        xtask::yaml::parse(&tree[Path::new(p)]).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let csv = doc("olm/manifests/meshlet-operator.clusterserviceversion.yaml");
    let install = &csv["spec"]["install"]["spec"];
    assert_eq!(
        install["deployments"][0]["spec"],
        doc("manifests/operator/deployment.yaml")["spec"]
    );
    assert_eq!(
        install["clusterPermissions"][0]["rules"],
        doc("manifests/rbac/operator-clusterrole.yaml")["rules"]
    );
    assert_eq!(
        install["permissions"][0]["rules"],
        doc("manifests/rbac/operator-role.yaml")["rules"]
    );
    // The bundle ships exactly the CRDs of the kustomize base.
    for (path, text) in &tree {
        if let Ok(rest) = path.strip_prefix("manifests/crds") {
            assert_eq!(&tree[&Path::new("olm/manifests").join(rest)], text);
        }
    }
    let owned = csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .expect("owned");
    assert_eq!(owned.len(), meshlet_crds::all_crds().len());
}

/// Every container of an operator pod spec: non-root, read-only root filesystem, no
/// privilege escalation, no capabilities, and no volume it could write instead.
fn assert_locked_down(source: &str, pod: &serde_json::Value) {
    let pod_non_root = pod["securityContext"]["runAsNonRoot"] == true;
    let uid = pod["securityContext"]["runAsUser"].as_i64();
    assert!(uid.is_some_and(|u| u != 0), "{source}: runAsUser {uid:?}");
    let containers = pod["containers"].as_array().expect("containers");
    assert!(!containers.is_empty(), "{source}: no containers");
    for c in containers {
        let name = &c["name"];
        let sc = &c["securityContext"];
        assert!(
            pod_non_root || sc["runAsNonRoot"] == true,
            "{source}: {name} may run as root"
        );
        assert_ne!(sc["runAsUser"], 0, "{source}: {name} runs as uid 0");
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{source}: {name} has a writable root filesystem"
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{source}: {name}");
        assert_ne!(sc["privileged"], true, "{source}: {name}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{source}: {name}"
        );
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{source}: {name} adds capabilities"
        );
    }
    assert!(
        pod["volumes"].is_null(),
        "{source}: the operator needs no volume, got {}",
        pod["volumes"]
    );
}

#[test]
fn the_operator_runs_as_non_root_on_a_read_only_root_filesystem_in_manifests_and_bundle() {
    let root = xtask::workspace_root();
    let read = |p: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        xtask::yaml::parse(&text).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let deployment = read("manifests/operator/deployment.yaml");
    assert_locked_down(
        "manifests/operator/deployment.yaml",
        &deployment["spec"]["template"]["spec"],
    );
    let csv = read("olm/manifests/meshlet-operator.clusterserviceversion.yaml");
    let deployments = csv["spec"]["install"]["spec"]["deployments"]
        .as_array()
        .expect("CSV install deployments");
    assert!(!deployments.is_empty(), "the CSV installs no deployment");
    for d in deployments {
        assert_locked_down("the CSV", &d["spec"]["template"]["spec"]);
    }
}
