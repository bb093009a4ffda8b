//! Decision tests: triggers, Secret resync and write order, selection, status and events.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use meshlet_crds::{
    conditions::find_condition,
    v1alpha1::{IPsecNodeStatus, NodeEnrollmentStatus},
};

use super::*;

const A: u32 = 0x100;
const B: u32 = 0x101;
const USER_KEY: &[u8] = b"user-supplied-key-0123456789abcdef";

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("time")
}

fn material(byte: u8) -> KeyMaterial {
    KeyMaterial {
        key: vec![byte; 32],
        salt: vec![byte ^ 0xff; 16],
        algorithm: IPsecAlgorithm::Rfc4106GcmAes,
    }
}

/// A generator that hands out recognisable, never-repeating material.
fn counter() -> impl FnMut(IPsecAlgorithm, Option<&[u8]>) -> KeyMaterial {
    let mut n = 0xa0u8;
    move |algorithm, key| {
        n += 1;
        KeyMaterial {
            key: key.map_or_else(|| vec![n; 32], <[u8]>::to_vec),
            salt: vec![n; 16],
            algorithm,
        }
    }
}

fn policy(name: &str, state: RotationState) -> IPsecPolicy {
    let mut p = IPsecPolicy::test(name);
    p.metadata.generation = Some(1);
    p.metadata.creation_timestamp = Some(Time(at(0)));
    if state != RotationState::Unkeyed {
        p.status = Some(IPsecPolicyStatus {
            phase: phase_of(state),
            active_spi: state.active_spi().map(i64::from),
            pending_spi: state.pending_spi().map(i64::from),
            last_rotation_time: Some(Time(at(0))),
            ..IPsecPolicyStatus::default()
        });
    }
    p
}

fn published(policy: &str, spis: &[u32]) -> BTreeMap<String, ByteString> {
    let gens: BTreeMap<u32, KeyMaterial> = spis
        .iter()
        .map(|s| (*s, material(u8::try_from(*s & 0xff).expect("byte"))))
        .collect();
    contract::publish(policy, &gens)
}

fn enrollment(node: &str, installed: &[u32], active: Option<u32>) -> NodeEnrollment {
    let mut ne = NodeEnrollment::test(node);
    ne.status = Some(NodeEnrollmentStatus {
        ipsec: Some(IPsecNodeStatus {
            installed_spis: installed.iter().map(|s| i64::from(*s)).collect(),
            active_spi: active.map(i64::from),
            policy: Some("p".into()),
            peers: Some(2),
        }),
        ..NodeEnrollmentStatus::default()
    });
    ne
}

fn failing(mut ne: NodeEnrollment, reason: &str, message: &str) -> NodeEnrollment {
    if let Some(st) = ne.status.as_mut() {
        st.conditions.push(Condition {
            type_: IPSEC_READY.into(),
            status: "False".into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(at(0)),
        });
    }
    ne
}

fn nodes(names: &[&str]) -> BTreeMap<String, NodeView> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                (*n).to_owned(),
                NodeView {
                    labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
                    internal_ip: Some(format!("10.0.0.{}", i + 1)),
                },
            )
        })
        .collect()
}

struct World {
    policies: Vec<IPsecPolicy>,
    nodes: BTreeMap<String, NodeView>,
    enrollments: Vec<NodeEnrollment>,
    published: BTreeMap<String, ByteString>,
    user_key: Result<Option<Vec<u8>>, Stall>,
    now: Timestamp,
}

impl World {
    fn new(state: RotationState, enrollments: Vec<NodeEnrollment>) -> Self {
        let names: Vec<String> = enrollments
            .iter()
            .map(|e| e.spec.node_name.clone())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Self {
            policies: vec![policy("p", state)],
            nodes: nodes(&names),
            enrollments,
            published: published("p", &state.published_spis()),
            user_key: Ok(None),
            now: at(60),
        }
    }

    fn decide(&self) -> Decision {
        let refs: Vec<&NodeEnrollment> = self.enrollments.iter().collect();
        let selection = select(&self.policies[0], &self.policies, &self.nodes, &refs);
        let inputs = Inputs {
            policy: &self.policies[0],
            selection: &selection,
            published: &self.published,
            user_key: &self.user_key,
            now: self.now,
        };
        decide(&inputs, &mut counter())
    }
}

fn spis(gens: &BTreeMap<u32, KeyMaterial>) -> Vec<u32> {
    gens.keys().copied().collect()
}

fn condition<'a>(d: &'a Decision, type_: &str) -> &'a Condition {
    find_condition(&d.status.conditions, type_).expect(type_)
}

#[test]
fn a_new_policy_publishes_its_first_generation_stable_and_ready_once_nodes_apply_it() {
    let w = World::new(RotationState::Unkeyed, vec![enrollment("n1", &[], None)]);
    let d = w.decide();
    assert_eq!(d.next, RotationState::Stable { active: A });
    assert_eq!(d.generated, vec![A]);
    assert_eq!(spis(&d.before_status), vec![A]);
    assert_eq!(d.status.active_spi, Some(256));
    assert_eq!(d.status.pending_spi, None);
    assert!(d.status.last_rotation_time.is_some());
    assert_eq!(condition(&d, READY).status, "False");
    assert_eq!(condition(&d, READY).reason, "AwaitingNodes");
    assert_eq!(d.notes[0].reason, "KeysPublished");

    let w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    let d = w.decide();
    assert!(d.generated.is_empty(), "the published generation is reused");
    assert_eq!(condition(&d, READY).status, "True");
    assert_eq!(condition(&d, READY).reason, "KeysInForce");
    assert_eq!(condition(&d, ROTATING).status, "False");
    assert_eq!(condition(&d, STALLED).status, "False");
}

#[test]
fn a_new_rotate_annotation_starts_installing_and_is_recorded_once() {
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    w.policies[0]
        .annotations_mut()
        .insert(ROTATE_ANNOTATION.into(), "2026-12-01T00:00:00Z".into());
    let d = w.decide();
    assert_eq!(
        d.started,
        Some(Trigger::Requested("2026-12-01T00:00:00Z".into()))
    );
    assert_eq!(d.next, RotationState::Installing { old: A, new: B });
    assert_eq!(d.generated, vec![B]);
    // The Secret gains B before the status names it, and keeps A.
    assert_eq!(spis(&d.before_status), vec![A, B]);
    assert_eq!(spis(&d.after_status), vec![A, B]);
    assert_eq!(
        d.status.observed_rotate_request.as_deref(),
        Some("2026-12-01T00:00:00Z")
    );
    assert_eq!(
        (d.status.active_spi, d.status.pending_spi),
        (Some(256), Some(257))
    );
    assert_eq!(condition(&d, ROTATING).status, "True");
    assert_eq!(condition(&d, ROTATING).reason, "Installing");
    assert_eq!(condition(&d, RECONCILING).status, "True");
    assert_eq!(d.notes[0].reason, "RotationStarted");

    // The same value again asks for nothing.
    w.policies[0]
        .status
        .as_mut()
        .expect("status")
        .observed_rotate_request = Some("2026-12-01T00:00:00Z".into());
    let d = w.decide();
    assert_eq!(d.started, None);
    assert_eq!(d.next, RotationState::Stable { active: A });
}

#[test]
fn the_interval_trigger_fires_only_once_the_interval_has_elapsed() {
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    w.policies[0].spec.rotation_interval = "1h30m".into();
    w.now = at(5_399);
    assert_eq!(w.decide().started, None);
    assert_eq!(
        interval_due(&w.policies[0], w.policies[0].status.as_ref().expect("s")),
        Some(at(5_400))
    );
    w.now = at(5_400);
    let d = w.decide();
    assert_eq!(d.started, Some(Trigger::Interval));
    assert_eq!(d.next, RotationState::Installing { old: A, new: B });
}

#[test]
fn a_changed_user_key_or_algorithm_starts_a_rotation_with_that_key() {
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    w.user_key = Ok(Some(USER_KEY.to_vec()));
    let d = w.decide();
    assert_eq!(d.started, Some(Trigger::KeyChanged));
    assert_eq!(
        d.before_status[&B].key, USER_KEY,
        "B carries the user's key"
    );
    assert_ne!(d.before_status[&B].salt, d.before_status[&A].salt);

    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    w.policies[0].spec.algorithm = IPsecAlgorithm::CbcAesHmacSha256;
    let d = w.decide();
    assert_eq!(d.started, Some(Trigger::AlgorithmChanged));
    assert_eq!(
        d.before_status[&B].algorithm,
        IPsecAlgorithm::CbcAesHmacSha256
    );
    assert_eq!(d.before_status[&A].algorithm, IPsecAlgorithm::Rfc4106GcmAes);
}

#[test]
fn a_trigger_during_a_rotation_waits_until_stable() {
    let mut w = World::new(
        RotationState::Switching { old: A, new: B },
        vec![enrollment("n1", &[A, B], Some(A))],
    );
    w.policies[0]
        .annotations_mut()
        .insert(ROTATE_ANNOTATION.into(), "again".into());
    w.now = at(10 * 86_400);
    let d = w.decide();
    assert_eq!(d.started, None);
    assert_eq!(d.next, RotationState::Switching { old: A, new: B });
    assert_eq!(d.status.observed_rotate_request, None);
}

#[test]
fn an_operator_restarted_mid_phase_resumes_from_status_alone_and_resyncs_the_secret() {
    // Crashed after writing Retiring but before dropping A from the Secret.
    let mut w = World::new(
        RotationState::Retiring { old: A, new: B },
        vec![
            enrollment("n1", &[A, B], Some(B)),
            enrollment("n2", &[B], Some(B)),
        ],
    );
    w.published = published("p", &[A, B]);
    let d = w.decide();
    assert_eq!(d.previous, RotationState::Retiring { old: A, new: B });
    assert_eq!(d.next, d.previous, "n1 still holds A");
    assert!(d.generated.is_empty(), "existing material is reused");
    assert_eq!(
        spis(&d.after_status),
        vec![B],
        "A is dropped as Retiring says"
    );
    assert_eq!(d.after_status[&B], w.published_material(B));
    assert_eq!(d.status.acks.retired, 1);

    // Crashed after the Secret gained B but before the status said Installing: B is reused.
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    w.published = published("p", &[A, B]);
    w.policies[0]
        .annotations_mut()
        .insert(ROTATE_ANNOTATION.into(), "r1".into());
    let d = w.decide();
    assert_eq!(d.next, RotationState::Installing { old: A, new: B });
    assert!(d.generated.is_empty());
    assert_eq!(d.before_status[&B], w.published_material(B));
}

impl World {
    fn published_material(&self, spi: u32) -> KeyMaterial {
        contract::published(&self.published, "p").expect("valid")[&spi].clone()
    }
}

#[test]
fn each_phase_advances_only_when_every_selected_node_acknowledged_it() {
    let installing = RotationState::Installing { old: A, new: B };
    let mut w = World::new(
        installing,
        vec![
            enrollment("n1", &[A, B], Some(A)),
            enrollment("n2", &[A], Some(A)),
        ],
    );
    let d = w.decide();
    assert_eq!(d.next, installing);
    assert_eq!((d.status.acks.selected, d.status.acks.installed), (2, 1));
    assert!(d.notes.is_empty());

    w.enrollments[1] = enrollment("n2", &[A, B], Some(A));
    let d = w.decide();
    assert_eq!(d.next, RotationState::Switching { old: A, new: B });
    assert_eq!(d.status.active_spi, Some(257));
    assert_eq!(d.status.pending_spi, Some(256));
    assert_eq!(spis(&d.after_status), vec![A, B]);
    assert_eq!(d.notes[0].reason, "KeysInstalled");

    let mut w = World::new(
        RotationState::Switching { old: A, new: B },
        vec![
            enrollment("n1", &[A, B], Some(B)),
            enrollment("n2", &[A, B], Some(B)),
        ],
    );
    let d = w.decide();
    assert_eq!(d.next, RotationState::Retiring { old: A, new: B });
    // Status first (still both), then the Secret drops A.
    assert_eq!(spis(&d.before_status), vec![A, B]);
    assert_eq!(spis(&d.after_status), vec![B]);
    assert_eq!(d.notes[0].reason, "Retiring");

    w.policies[0] = policy("p", RotationState::Retiring { old: A, new: B });
    w.enrollments = vec![
        enrollment("n1", &[B], Some(B)),
        enrollment("n2", &[B], Some(B)),
    ];
    let d = w.decide();
    assert_eq!(d.next, RotationState::Stable { active: B });
    assert!(d.completed);
    assert_eq!(d.status.last_rotation_time, Some(Time(at(60))));
    assert_eq!(d.status.pending_spi, None);
    assert_eq!(condition(&d, READY).status, "True");
    assert_eq!(d.notes[0].reason, "RotationComplete");
}

#[test]
fn a_node_joining_mid_installing_is_awaited() {
    let installing = RotationState::Installing { old: A, new: B };
    let mut w = World::new(
        installing,
        vec![
            enrollment("n1", &[A, B], Some(A)),
            enrollment("n2", &[A, B], Some(A)),
            NodeEnrollment::test("late"),
        ],
    );
    let d = w.decide();
    assert_eq!(d.next, installing, "the newcomer has not installed B");
    assert_eq!((d.status.acks.selected, d.status.acks.installed), (3, 2));
    w.enrollments[2] = enrollment("late", &[A, B], Some(A));
    assert_eq!(w.decide().next, RotationState::Switching { old: A, new: B });
}

#[test]
fn a_node_leaving_mid_phase_no_longer_counts() {
    let installing = RotationState::Installing { old: A, new: B };
    let mut w = World::new(
        installing,
        vec![
            enrollment("n1", &[A, B], Some(A)),
            enrollment("n2", &[A], Some(A)),
        ],
    );
    assert_eq!(w.decide().next, installing);
    w.enrollments[1].spec.drain = true;
    assert_eq!(
        w.decide().next,
        RotationState::Switching { old: A, new: B },
        "a draining node is not selected"
    );
    w.enrollments[1].spec.drain = false;
    w.nodes.remove("n2");
    assert_eq!(
        w.decide().next,
        RotationState::Switching { old: A, new: B },
        "a node whose Node is gone is not selected"
    );
}

#[test]
fn acks_of_another_policy_do_not_count() {
    let installing = RotationState::Installing { old: A, new: B };
    let mut w = World::new(installing, vec![enrollment("n1", &[A, B], Some(A))]);
    if let Some(i) = w.enrollments[0]
        .status
        .as_mut()
        .and_then(|s| s.ipsec.as_mut())
    {
        i.policy = Some("other".into());
    }
    assert_eq!(w.decide().next, installing);
}

#[test]
fn a_node_without_an_internal_ip_is_skipped_with_the_reason() {
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![
            enrollment("n1", &[A], Some(A)),
            NodeEnrollment::test("bare"),
        ],
    );
    if let Some(v) = w.nodes.get_mut("bare") {
        v.internal_ip = None;
    }
    let d = w.decide();
    assert_eq!(d.status.acks.selected, 1);
    let ready = condition(&d, READY);
    assert_eq!(ready.status, "True");
    assert!(
        ready.message.contains("bare has no InternalIP address"),
        "{}",
        ready.message
    );
}

#[test]
fn a_failing_node_stalls_the_phase_naming_node_and_reason_and_nothing_moves() {
    let installing = RotationState::Installing { old: A, new: B };
    let w = World::new(
        installing,
        vec![
            enrollment("n1", &[A, B], Some(A)),
            failing(
                enrollment("n2", &[A], Some(A)),
                "AlgorithmUnavailable",
                "the kernel has no rfc4106(gcm(aes))",
            ),
        ],
    );
    let d = w.decide();
    assert_eq!(d.next, installing);
    assert_eq!(spis(&d.after_status), vec![A, B]);
    let stalled = condition(&d, STALLED);
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", NODE_FAILED)
    );
    assert!(
        stalled.message.contains("n2") && stalled.message.contains("AlgorithmUnavailable"),
        "{}",
        stalled.message
    );
    assert_eq!(condition(&d, READY).status, "False");
    assert_eq!(condition(&d, RECONCILING).status, "False");
    assert!(d.notes.iter().any(|n| n.warning && n.reason == "Stalled"));
}

#[test]
fn a_missing_or_short_user_key_stalls_and_leaves_the_published_keys_untouched() {
    let mut p = IPsecPolicy::test("p").with_key_secret(NAMESPACE, "my-key");
    p.metadata.generation = Some(1);
    let err = user_key(&p, |_| None).expect_err("missing");
    assert_eq!(err.reason, KEY_SECRET_NOT_FOUND);
    assert!(
        err.message.contains("meshlet-system/my-key"),
        "{}",
        err.message
    );

    let short = Secret {
        data: Some(BTreeMap::from([(
            USER_KEY_FIELD.to_owned(),
            ByteString(vec![1; 8]),
        )])),
        ..Secret::default()
    };
    let err = user_key(&p, |_| Some(&short)).expect_err("short");
    assert_eq!(err.reason, KEY_SECRET_INVALID);
    assert!(
        err.message.contains("data.key holds 8 bytes") && err.message.contains("my-key"),
        "{}",
        err.message
    );
    let empty = Secret::default();
    let err = user_key(&p, |_| Some(&empty)).expect_err("no key");
    assert!(err.message.contains("no data.key"), "{}", err.message);
    let elsewhere = IPsecPolicy::test("p").with_key_secret("default", "my-key");
    let err = user_key(&elsewhere, |_| None).expect_err("namespace");
    assert!(
        err.message.contains("spec.keySecretRef.namespace"),
        "{}",
        err.message
    );

    // A stalled policy mid-rotation keeps every published generation and its phase.
    let installing = RotationState::Installing { old: A, new: B };
    let mut w = World::new(installing, vec![enrollment("n1", &[A, B], Some(A))]);
    w.user_key = Err(user_key(&p, |_| None).expect_err("missing"));
    let d = w.decide();
    assert_eq!(d.next, installing);
    assert!(d.generated.is_empty());
    assert_eq!(
        secret_data([("p", &d.after_status)]),
        w.published,
        "published keys untouched"
    );
    assert_eq!(condition(&d, STALLED).reason, KEY_SECRET_NOT_FOUND);
}

#[test]
fn an_older_policy_keeps_its_nodes_and_the_younger_reports_the_conflict() {
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    let mut older = policy("old", RotationState::Stable { active: A });
    older.metadata.creation_timestamp = Some(Time(at(-100)));
    older.spec.node_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([("zone".to_owned(), "a".to_owned())])),
        ..LabelSelector::default()
    });
    w.policies.push(older);
    let d = w.decide();
    assert_eq!(d.status.acks.selected, 0);
    let stalled = condition(&d, STALLED);
    assert_eq!(stalled.reason, POLICY_CONFLICT);
    assert!(
        stalled.message.contains("old") && stalled.message.contains("n1"),
        "{}",
        stalled.message
    );
}

#[test]
fn the_secret_holds_every_policy_and_nothing_of_deleted_ones() {
    let p = BTreeMap::from([(A, material(1))]);
    let q = BTreeMap::from([(A, material(2)), (B, material(3))]);
    let data = secret_data([("p", &p), ("q", &q)]);
    assert_eq!(contract::published(&data, "p").expect("p"), p);
    assert_eq!(contract::published(&data, "q").expect("q"), q);
    assert_eq!(data.len(), 9);
}

#[test]
fn no_key_bytes_reach_status_events_or_debug_output() {
    let mut w = World::new(
        RotationState::Stable { active: A },
        vec![enrollment("n1", &[A], Some(A))],
    );
    w.user_key = Ok(Some(USER_KEY.to_vec()));
    let d = w.decide();
    let text = format!(
        "{}{:?}{:?}",
        serde_json::to_string(&d.status).expect("json"),
        d.notes,
        d
    );
    let key = String::from_utf8_lossy(USER_KEY).into_owned();
    let hex: String = USER_KEY.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!text.contains(&key) && !text.contains(&hex), "{text}");
    assert!(!text.contains("user-supplied"), "{text}");
}

#[test]
fn a_persisted_rotating_phase_without_its_other_spi_reads_as_stable() {
    let mut p = policy("p", RotationState::Installing { old: A, new: B });
    assert_eq!(
        state_from_status(p.status.as_ref()),
        RotationState::Installing { old: A, new: B }
    );
    p.status.as_mut().expect("status").pending_spi = None;
    assert_eq!(
        state_from_status(p.status.as_ref()),
        RotationState::Stable { active: A }
    );
    assert_eq!(state_from_status(None), RotationState::Unkeyed);
}
