//! kstatus conditions shared by every kind.
//!
//! Argo CD and Flux read `Ready`, `Reconciling` and `Stalled`; the kind-specific types
//! (`Enrolled`, `DataplaneReady`, `Upgrading`, `Rotating`) say which part is not there yet.
//! [`set_condition`] is the one way controllers and agents write a condition: it keeps
//! `lastTransitionTime` unless the status really flips, so watchers see real transitions only.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// The resource is fully reconciled and working (kstatus).
pub const READY: &str = "Ready";
/// A controller is working towards the desired state (kstatus).
pub const RECONCILING: &str = "Reconciling";
/// Progress stopped on an error that needs a change of input (kstatus).
pub const STALLED: &str = "Stalled";
/// `NodeEnrollment`: the node is selected and its agent accepted the enrollment.
pub const ENROLLED: &str = "Enrolled";
/// `NodeEnrollment`: programs are attached and maps synced from the source.
pub const DATAPLANE_READY: &str = "DataplaneReady";
/// `MeshConfig` / `NodeEnrollment`: a version change is in progress.
pub const UPGRADING: &str = "Upgrading";
/// `IPsecPolicy`: a key rotation is in progress.
pub const ROTATING: &str = "Rotating";
/// `NodeEnrollment`: the node holds the SAs its IPsec policy asks for (False names why not:
/// `AlgorithmUnavailable`, `KeyUnavailable`, `XfrmFailed`, `PolicyConflict`, …).
pub const IPSEC_READY: &str = "IPsecReady";

/// Status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `"True"`.
    True,
    /// `"False"`.
    False,
    /// `"Unknown"`.
    Unknown,
}

impl Status {
    /// The string Kubernetes stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(value: bool) -> Self {
        if value { Status::True } else { Status::False }
    }
}

/// Inserts or updates the condition `type_` in `conditions` at time `now`.
///
/// `lastTransitionTime` (whole seconds, like `metav1.Time`) moves only when the status changes
/// (or the condition is new);
/// reason, message and observedGeneration are always refreshed. Returns whether anything
/// changed, so callers can skip a status write when nothing did.
pub fn set_condition_at(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let fresh = Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation,
        // metav1.Time carries whole seconds; keep the same precision so a condition read back
        // from the API compares equal to the one written.
        last_transition_time: Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        None => {
            conditions.push(fresh);
            true
        }
        Some(existing) => {
            let transition = existing.status != fresh.status;
            let changed = transition
                || existing.reason != fresh.reason
                || existing.message != fresh.message
                || existing.observed_generation != fresh.observed_generation;
            if transition {
                existing.last_transition_time = fresh.last_transition_time;
            }
            existing.status = fresh.status;
            existing.reason = fresh.reason;
            existing.message = fresh.message;
            existing.observed_generation = fresh.observed_generation;
            changed
        }
    }
}

/// [`set_condition_at`] with the current time.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
) -> bool {
    set_condition_at(
        conditions,
        type_,
        status,
        reason,
        message,
        observed_generation,
        Timestamp::now(),
    )
}

/// The condition `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Removes the condition `type_`; returns whether it was present.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    #[test]
    fn a_new_condition_is_added_with_the_given_time() {
        let mut conds = Vec::new();
        assert!(set_condition_at(
            &mut conds,
            READY,
            Status::False,
            "Starting",
            "m",
            Some(1),
            at(100)
        ));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds[0].last_transition_time, Time(at(100)));
    }

    #[test]
    fn the_transition_time_stays_when_only_the_message_changes() {
        let mut conds = Vec::new();
        set_condition_at(
            &mut conds,
            READY,
            Status::True,
            "Synced",
            "one",
            Some(1),
            at(100),
        );
        let changed = set_condition_at(
            &mut conds,
            READY,
            Status::True,
            "Synced",
            "two",
            Some(2),
            at(200),
        );
        assert!(changed);
        assert_eq!(conds[0].message, "two");
        assert_eq!(conds[0].observed_generation, Some(2));
        assert_eq!(conds[0].last_transition_time, Time(at(100)));
    }

    #[test]
    fn the_transition_time_moves_when_the_status_flips() {
        let mut conds = Vec::new();
        set_condition_at(
            &mut conds,
            READY,
            Status::True,
            "Synced",
            "ok",
            Some(1),
            at(100),
        );
        set_condition_at(
            &mut conds,
            READY,
            Status::False,
            "Gap",
            "lost",
            Some(1),
            at(300),
        );
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds[0].last_transition_time, Time(at(300)));
    }

    #[test]
    fn transition_times_are_whole_seconds_as_the_api_stores_them() {
        let mut conds = Vec::new();
        let now = Timestamp::from_nanosecond(1_700_000_000_987_654_321).expect("valid timestamp");
        set_condition_at(&mut conds, READY, Status::True, "Synced", "", None, now);
        assert_eq!(conds[0].last_transition_time, Time(at(1_700_000_000)));
        let json = serde_json::to_value(&conds[0]).expect("serialize");
        let back: Condition = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, conds[0]);
    }

    #[test]
    fn an_identical_write_reports_no_change() {
        let mut conds = Vec::new();
        set_condition_at(&mut conds, STALLED, Status::False, "Ok", "", None, at(1));
        assert!(!set_condition_at(
            &mut conds,
            STALLED,
            Status::False,
            "Ok",
            "",
            None,
            at(9)
        ));
        assert_eq!(conds[0].last_transition_time, Time(at(1)));
    }

    #[test]
    fn conditions_of_other_types_are_left_alone() {
        let mut conds = Vec::new();
        set_condition_at(&mut conds, READY, Status::True, "A", "", None, at(1));
        set_condition_at(
            &mut conds,
            DATAPLANE_READY,
            Status::False,
            "B",
            "",
            None,
            at(2),
        );
        set_condition_at(
            &mut conds,
            DATAPLANE_READY,
            Status::True,
            "B",
            "",
            None,
            at(3),
        );
        assert_eq!(conds.len(), 2);
        assert_eq!(
            find_condition(&conds, READY).map(|c| c.last_transition_time.clone()),
            Some(Time(at(1)))
        );
        assert!(is_true(&conds, DATAPLANE_READY));
        assert!(remove_condition(&mut conds, READY));
        assert!(!is_true(&conds, READY));
    }
}
