//! Admission of the generated CRDs: the validators are built from `all_crds()` itself, so these
//! tests judge the schema users install, not a copy of it.
//!
//! Fixtures: `examples/*.yaml` must be admitted; every `tests/fixtures/invalid/*.yaml` must be
//! refused, and starts with `# field: <path>` and `# message: <substring>` lines (plus
//! `# old: <repo-relative file>` when the refusal is a transition rule on update).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use meshlet_crds::{
    IPsecPolicy, MeshConfig, NodeEnrollment, all_crds,
    conditions::{self, Status},
    v1alpha1::{Continuity, MapStatus, NodeEnrollmentStatus, ProgramStatus, RestartKind},
    validation::{FieldError, SchemaValidator},
};
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One validator per kind, compiled from the generated CRDs.
fn validators() -> BTreeMap<String, SchemaValidator> {
    all_crds()
        .iter()
        .map(|crd| {
            let validator =
                SchemaValidator::for_crd(crd, "v1alpha1").expect("generated CRD compiles");
            (crd.spec.names.kind.clone(), validator)
        })
        .collect()
}

fn read_yaml(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn kind_of(obj: &Value) -> String {
    obj["kind"].as_str().expect("object has a kind").to_owned()
}

fn admit(
    validators: &BTreeMap<String, SchemaValidator>,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<(), Vec<FieldError>> {
    validators[&kind_of(obj)].admit(obj, old)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every value in `written` is still in `admitted` (defaults may only add).
fn assert_keeps(admitted: &Value, written: &Value, at: &str) {
    match written {
        Value::Object(fields) => {
            for (key, value) in fields {
                assert_keeps(&admitted[key], value, &format!("{at}.{key}"));
            }
        }
        _ => assert_eq!(admitted, written, "{at} changed by admission"),
    }
}

#[test]
fn every_generated_crd_compiles_into_a_validator() {
    assert_eq!(
        validators().keys().collect::<Vec<_>>(),
        ["IPsecPolicy", "MeshConfig", "NodeEnrollment"]
    );
}

#[test]
fn every_cel_rule_is_in_scope_bounded_and_within_the_cost_budget() {
    for (kind, validator) in validators() {
        let warnings = validator.rule_warnings();
        assert!(warnings.is_empty(), "{kind}: {warnings:#?}");
    }
}

#[test]
fn every_example_is_admitted_and_keeps_what_the_user_wrote() {
    let validators = validators();
    let examples = yaml_files(&repo_root().join("examples"));
    assert_eq!(examples.len(), 3, "one example per kind");
    for path in examples {
        let original = read_yaml(&path);
        let mut obj = original.clone();
        admit(&validators, &mut obj, None)
            .unwrap_or_else(|e| panic!("{} refused: {e:?}", path.display()));
        assert_eq!(
            obj["spec"]["nodeSelector"],
            original["spec"]["nodeSelector"]
        );
        assert_eq!(obj["metadata"], original["metadata"], "{}", path.display());
        assert_keeps(&obj, &original, &path.display().to_string());
    }
}

#[test]
fn examples_deserialize_into_the_rust_types_after_admission() {
    let validators = validators();
    let mut mc = read_yaml(&repo_root().join("examples/meshconfig.yaml"));
    admit(&validators, &mut mc, None).expect("admitted");
    let mc: MeshConfig = serde_json::from_value(mc).expect("MeshConfig");
    assert_eq!(
        mc.spec.upgrade.max_unavailable,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("10%".into())
    );
    let mut ipsp = read_yaml(&repo_root().join("examples/ipsecpolicy.yaml"));
    admit(&validators, &mut ipsp, None).expect("admitted");
    let ipsp: IPsecPolicy = serde_json::from_value(ipsp).expect("IPsecPolicy");
    assert_eq!(ipsp.spec.rotation_interval, "24h");
    let mut ne = read_yaml(&repo_root().join("examples/nodeenrollment.yaml"));
    admit(&validators, &mut ne, None).expect("admitted");
    let ne: NodeEnrollment = serde_json::from_value(ne).expect("NodeEnrollment");
    assert_eq!(ne.spec.node_name, "worker-1");
}

#[test]
fn omitted_fields_are_filled_with_their_schema_defaults() {
    let validators = validators();
    let mut mc = json!({
        "apiVersion": "meshlet.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "default"},
        "spec": {"agent": {"image": "ghcr.io/meshlet-io/meshlet-agent", "version": "0.1.0"}, "upgrade": {"paused": true}}
    });
    admit(&validators, &mut mc, None).expect("minimal MeshConfig admitted");
    let spec = &mc["spec"];
    assert_eq!(spec["dataplane"]["maxServices"], 5000);
    assert_eq!(spec["dataplane"]["maxEndpoints"], 100_000);
    assert_eq!(spec["dataplane"]["features"]["udp"], true);
    assert_eq!(spec["agent"]["logLevel"], "info");
    assert_eq!(spec["agent"]["bpffsPath"], "/sys/fs/bpf/meshlet");
    // A partly written object gets the rest of its defaults, and keeps what was written.
    assert_eq!(
        spec["upgrade"],
        json!({
            "paused": true, "maxUnavailable": 1, "canaryNodes": 1, "minReadySeconds": 10,
            "progressDeadlineSeconds": 600, "autoRollback": true
        })
    );
    assert_eq!(spec["telemetry"]["metricsPort"], 9090);
    assert!(spec["telemetry"].get("otlpEndpoint").is_none());

    let mut ipsp = json!({"apiVersion": "meshlet.io/v1alpha1", "kind": "IPsecPolicy", "metadata": {"name": "p"}, "spec": {}});
    admit(&validators, &mut ipsp, None).expect("empty IPsecPolicy spec admitted");
    assert_eq!(
        ipsp["spec"],
        json!({"algorithm": "rfc4106(gcm(aes))", "rotationInterval": "24h", "mode": "Transport"})
    );

    let mut ne = json!({"apiVersion": "meshlet.io/v1alpha1", "kind": "NodeEnrollment", "metadata": {"name": "n1"}, "spec": {"nodeName": "n1"}});
    admit(&validators, &mut ne, None).expect("NodeEnrollment admitted");
    assert_eq!(ne["spec"]["drain"], false);
}

#[test]
fn every_invalid_fixture_is_refused_naming_the_field_and_what_is_allowed() {
    let validators = validators();
    let files = yaml_files(&repo_root().join("tests/fixtures/invalid"));
    assert!(files.len() >= 25, "only {} invalid fixtures", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("read fixture");
        let header = |key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix('#'))
                .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
        };
        let field =
            header("field:").unwrap_or_else(|| panic!("{} lacks `# field:`", path.display()));
        let message =
            header("message:").unwrap_or_else(|| panic!("{} lacks `# message:`", path.display()));
        let old = header("old:").map(|p| {
            let mut old = read_yaml(&repo_root().join(p));
            admit(&validators, &mut old, None).expect("the old object is valid");
            old
        });
        let mut obj = read_yaml(path);
        match admit(&validators, &mut obj, old.as_ref()) {
            Ok(()) => failures.push(format!("{}: admitted", path.display())),
            Err(errors) => {
                if !errors
                    .iter()
                    .any(|e| e.field == field && e.message.contains(&message))
                {
                    failures.push(format!(
                        "{}: expected {field}: …{message}…, got {errors:#?}",
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn unknown_fields_are_pruned_and_the_object_is_admitted() {
    let validators = validators();
    let mut mc = json!({
        "apiVersion": "meshlet.io/v1alpha1", "kind": "MeshConfig",
        "metadata": {"name": "default", "labels": {"team": "net"}, "bogus": 1},
        "spec": {
            "agent": {"image": "ghcr.io/meshlet-io/meshlet-agent", "version": "0.1.0", "imagePullPolicy": "Always"},
            "dataplane": {"maxServices": 10, "maxSevrices": 20},
            "unknownSection": {"a": 1}
        },
        "extra": true
    });
    admit(&validators, &mut mc, None).expect("admitted after pruning");
    assert!(mc.get("extra").is_none());
    assert!(mc["spec"].get("unknownSection").is_none());
    assert!(mc["spec"]["agent"].get("imagePullPolicy").is_none());
    assert!(mc["spec"]["dataplane"].get("maxSevrices").is_none());
    assert_eq!(mc["spec"]["dataplane"]["maxServices"], 10);
    assert_eq!(
        mc["metadata"],
        json!({"name": "default", "labels": {"team": "net"}})
    );
}

#[test]
fn node_name_cannot_change_on_update_but_an_unchanged_update_is_accepted() {
    let validators = validators();
    let ne = &validators["NodeEnrollment"];
    let mut old = serde_json::to_value(NodeEnrollment::test("worker-1")).expect("serialize");
    ne.admit(&mut old, None).expect("created");

    let mut same = old.clone();
    same["spec"]["desiredVersion"] = json!("0.2.0");
    ne.admit(&mut same, Some(&old))
        .expect("an update that keeps nodeName is accepted");

    let mut moved = old.clone();
    moved["spec"]["nodeName"] = json!("worker-2");
    let errors = ne
        .admit(&mut moved, Some(&old))
        .expect_err("nodeName change refused");
    assert!(
        errors
            .iter()
            .any(|e| e.field == "spec.nodeName" && e.message.contains("immutable")),
        "{errors:#?}"
    );
    // On create there is no old object, so the transition rule does not apply.
    let mut fresh = moved.clone();
    fresh["metadata"]["name"] = json!("worker-2");
    ne.admit(&mut fresh, None)
        .expect("a new enrollment for worker-2 is fine");
}

#[test]
fn objects_built_with_the_rust_builders_are_admitted() {
    let validators = validators();
    let mut objects = vec![
        serde_json::to_value(
            MeshConfig::test()
                .with_version("0.2.0")
                .with_max_unavailable(3)
                .with_canary_nodes(0)
                .with_node_label("mesh", "on"),
        ),
        serde_json::to_value(NodeEnrollment::test("node-a").with_desired_version("0.2.0")),
        serde_json::to_value(
            IPsecPolicy::test("all").with_key_secret("meshlet-system", "ipsec-key"),
        ),
    ];
    for obj in &mut objects {
        let obj = obj.as_mut().expect("serialize");
        admit(&validators, obj, None).unwrap_or_else(|e| panic!("{obj}: {e:?}"));
    }
}

#[test]
fn a_status_written_by_the_agent_is_admitted_and_a_bad_restart_kind_is_not() {
    let validators = validators();
    let mut ne = NodeEnrollment::test("node-a");
    ne.status = Some(NodeEnrollmentStatus {
        agent_version: Some("0.2.0".into()),
        kernel_version: Some("6.18.0".into()),
        btf: Some(true),
        programs: vec![ProgramStatus {
            name: "connect4".into(),
            id: 41,
            attach_point: "cgroup/connect4:/sys/fs/cgroup".into(),
            link_id: Some(7),
        }],
        maps: vec![MapStatus {
            name: "services".into(),
            layout_version: 2,
            entries: 10,
            capacity: 5000,
        }],
        continuity: Some(Continuity {
            link_ids_stable: true,
            first_attach_time: None,
            last_restart_kind: Some(RestartKind::Warm),
            last_restart_duration_ms: Some(38),
            dataplane_gaps: 0,
        }),
        observed_generation: Some(1),
        ..NodeEnrollmentStatus::default()
    });
    if let Some(status) = ne.status.as_mut() {
        let conds = &mut status.conditions;
        conditions::set_condition(
            conds,
            conditions::DATAPLANE_READY,
            Status::True,
            "Attached",
            "5 programs",
            Some(1),
        );
        conditions::set_condition(conds, conditions::READY, Status::True, "Ready", "", Some(1));
    }
    let mut obj = serde_json::to_value(&ne).expect("serialize");
    admit(&validators, &mut obj, None).expect("status admitted");
    assert_eq!(obj["status"]["conditions"][0]["type"], "DataplaneReady");
    let back: NodeEnrollment = serde_json::from_value(obj.clone()).expect("round trip");
    assert_eq!(back.status, ne.status);

    obj["status"]["continuity"]["lastRestartKind"] = json!("Hot");
    let errors = admit(&validators, &mut obj, None).expect_err("unknown restart kind");
    assert_eq!(errors[0].field, "status.continuity.lastRestartKind");
    assert_eq!(errors[0].reason, "FieldValueNotSupported");
}

#[test]
fn percentages_and_counts_are_both_accepted_for_max_unavailable() {
    let validators = validators();
    for value in [
        json!(1),
        json!(250),
        json!("1%"),
        json!("25%"),
        json!("100%"),
    ] {
        let mut mc = serde_json::to_value(MeshConfig::test()).expect("serialize");
        mc["spec"]["upgrade"]["maxUnavailable"] = value.clone();
        admit(&validators, &mut mc, None).unwrap_or_else(|e| panic!("{value} refused: {e:?}"));
    }
}

#[test]
fn explicit_nulls_in_optional_fields_are_accepted_and_defaulted_fields_get_their_default() {
    let validators = validators();
    let mut mc = serde_json::to_value(MeshConfig::test()).expect("serialize");
    mc["spec"]["telemetry"]["otlpEndpoint"] = Value::Null;
    mc["spec"]["agent"]["resources"] = Value::Null;
    mc["spec"]["enrollment"]["nodeSelector"] = Value::Null;
    mc["spec"]["dataplane"]["maxServices"] = Value::Null;
    admit(&validators, &mut mc, None).expect("nulls accepted");
    assert_eq!(
        mc["spec"]["dataplane"]["maxServices"], 5000,
        "null in a non-nullable field is defaulted"
    );

    let mut ipsp = serde_json::to_value(IPsecPolicy::test("p")).expect("serialize");
    ipsp["spec"]["keySecretRef"] = Value::Null;
    admit(&validators, &mut ipsp, None).expect("null keySecretRef accepted");

    let mut ne = serde_json::to_value(NodeEnrollment::test("n")).expect("serialize");
    ne["spec"]["desiredVersion"] = Value::Null;
    let old = ne.clone();
    admit(&validators, &mut ne, Some(&old)).expect("null desiredVersion accepted on update");
}

#[test]
fn a_rotation_status_written_by_the_operator_is_admitted_and_a_bad_phase_is_not() {
    let validators = validators();
    let mut policy = IPsecPolicy::test("all");
    policy.status = Some(meshlet_crds::v1alpha1::IPsecPolicyStatus {
        active_spi: Some(4096),
        phase: meshlet_crds::v1alpha1::RotationPhase::Switching,
        acks: meshlet_crds::v1alpha1::IPsecAcks {
            selected: 3,
            installed: 3,
            switched: 1,
            retired: 0,
        },
        last_rotation_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).expect("timestamp"),
        )),
        observed_generation: Some(2),
        ..Default::default()
    });
    let mut obj = serde_json::to_value(&policy).expect("serialize");
    admit(&validators, &mut obj, None).expect("status admitted");
    assert_eq!(obj["status"]["activeSPI"], 4096);
    obj["status"]["phase"] = json!("Rotating");
    let errors = admit(&validators, &mut obj, None).expect_err("unknown phase");
    assert_eq!(errors[0].field, "status.phase");
    obj["status"]["phase"] = json!("Stable");
    obj["status"]["lastRotationTime"] = json!("yesterday");
    let errors = admit(&validators, &mut obj, None).expect_err("not a timestamp");
    assert_eq!(errors[0].field, "status.lastRotationTime");
}

#[test]
fn two_conditions_of_the_same_type_are_refused_as_duplicates() {
    let validators = validators();
    let mut obj = serde_json::to_value(NodeEnrollment::test("n1")).expect("serialize");
    let ready = json!({"type": "Ready", "status": "True", "reason": "Ok", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
    let stalled = json!({"type": "Stalled", "status": "False", "reason": "Ok", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
    obj["status"] = json!({"conditions": [ready.clone(), stalled]});
    admit(&validators, &mut obj, None).expect("distinct types admitted");
    let mut again = ready.clone();
    again["status"] = json!("False");
    obj["status"]["conditions"]
        .as_array_mut()
        .expect("array")
        .push(again);
    let errors = admit(&validators, &mut obj, None).expect_err("duplicate type refused");
    assert_eq!(errors[0].field, "status.conditions[2]");
    assert_eq!(errors[0].reason, "FieldValueDuplicate");
    assert!(
        errors[0].message.contains(r#"{"type":"Ready"}"#),
        "{}",
        errors[0].message
    );
}
