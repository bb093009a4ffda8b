//! The node's own NodeEnrollment: watched by name, turned into what the agent must do with its
//! data plane, and released (finalizer removed) once the data plane is torn down.
//!
//! ```text
//!  watch nodeenrollments (fieldSelector metadata.name=<node>)
//!      ─► Option<NodeEnrollment> (after each full list and each change) ─► run loop
//!      ─► decide(enrollment, data plane running) ─► Wait | Start | Serve | Drain | Release
//!  Release: reset the data plane ─► merge patch of metadata.finalizers (with resourceVersion)
//! ```
//!
//! Absent NodeEnrollment: nothing is loaded (a data plane adopted at start-up keeps serving);
//! the agent waits. `spec.drain: true`: the data plane is torn down and the enrollment kept.
//! `deletionTimestamp` set: torn down, then the `meshlet.io/dataplane` finalizer is released.

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use meshlet_crds::names::DATAPLANE_FINALIZER;
use meshlet_crds::v1alpha1::NodeEnrollment;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::metrics::KindLabel;

/// Errors of releasing the enrollment.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    /// Reading the NodeEnrollment failed.
    #[error("failed to read NodeEnrollment {name}")]
    Get {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Removing the finalizer failed.
    #[error("failed to remove finalizer {DATAPLANE_FINALIZER} from NodeEnrollment {name}")]
    RemoveFinalizer {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// What the agent must do given its NodeEnrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not enrolled: load nothing, wait.
    Wait,
    /// Not enrolled, but a data plane adopted at start-up is serving: keep it, report nothing.
    KeepUnreported,
    /// Enrolled and not draining, no data plane yet: load it.
    Start,
    /// Enrolled and serving: keep in sync and report.
    Serve,
    /// `spec.drain`: tear down (if loaded) and report `Drained`.
    Drain,
    /// Being deleted: tear down (if loaded), then release the finalizer.
    Release,
}

/// Decide what to do (pure).
pub fn decide(enrollment: Option<&NodeEnrollment>, running: bool) -> Action {
    match enrollment {
        None if running => Action::KeepUnreported,
        None => Action::Wait,
        Some(ne) if ne.metadata.deletion_timestamp.is_some() => Action::Release,
        Some(ne) if ne.spec.drain => Action::Drain,
        Some(_) if running => Action::Serve,
        Some(_) => Action::Start,
    }
}

/// Watch the NodeEnrollment named `node`; sends its current state after the first full list
/// and after every change (`None`: there is none). Watch errors are retried with backoff and
/// counted under `watch_restarts{kind="nodeenrollments"}`.
pub fn watch(
    client: Client,
    node: String,
    watch_restarts: Family<KindLabel, Counter>,
) -> (mpsc::Receiver<Option<NodeEnrollment>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let api = Api::<NodeEnrollment>::all(client);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut current: Option<NodeEnrollment> = None;
        let mut relist: Option<Option<NodeEnrollment>> = None;
        let mut listed = false;
        while let Some(ev) = stream.next().await {
            let changed = match ev {
                Err(e) => {
                    warn!(error = %e, "NodeEnrollment watch failed; retrying with backoff");
                    watch_restarts
                        .get_or_create(&KindLabel {
                            kind: "nodeenrollments".into(),
                        })
                        .inc();
                    false
                }
                Ok(Event::Init) => {
                    relist = Some(None);
                    false
                }
                Ok(Event::InitApply(ne)) => {
                    relist = Some(Some(ne));
                    false
                }
                Ok(Event::InitDone) => {
                    current = relist.take().flatten();
                    listed = true;
                    true
                }
                Ok(Event::Apply(ne)) => {
                    current = Some(ne);
                    true
                }
                Ok(Event::Delete(_)) => {
                    current = None;
                    true
                }
            };
            if changed && listed && tx.send(current.clone()).await.is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// Remove [`DATAPLANE_FINALIZER`] from the NodeEnrollment `name` (no-op when absent or gone).
///
/// A merge patch carrying the resourceVersion read, so a concurrent change of the object makes
/// it fail instead of dropping someone else's finalizer; it is then read again and retried.
pub async fn release(api: &Api<NodeEnrollment>, name: &str) -> Result<(), EnrollmentError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Some(ne) = api
            .get_opt(name)
            .await
            .map_err(|source| EnrollmentError::Get {
                name: name.to_string(),
                source,
            })?
        else {
            return Ok(());
        };
        let current = ne.metadata.finalizers.clone().unwrap_or_default();
        if !current.iter().any(|f| f == DATAPLANE_FINALIZER) {
            return Ok(());
        }
        let rest: Vec<&String> = current
            .iter()
            .filter(|f| *f != DATAPLANE_FINALIZER)
            .collect();
        // The resourceVersion makes the server refuse the patch (409) if the object changed
        // since it was read, so someone else's concurrent finalizer change is never dropped.
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": ne.metadata.resource_version,
                "finalizers": rest,
            }
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) if attempts < 5 => {
                warn!(error = %e, "finalizer release raced a change; reading again");
            }
            Err(source) => {
                return Err(EnrollmentError::RemoveFinalizer {
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn the_agent_loads_only_for_a_live_undrained_enrollment() {
        let ne = NodeEnrollment::test("n1");
        assert_eq!(decide(None, false), Action::Wait);
        assert_eq!(decide(None, true), Action::KeepUnreported);
        assert_eq!(decide(Some(&ne), false), Action::Start);
        assert_eq!(decide(Some(&ne), true), Action::Serve);
        let mut drained = ne.clone();
        drained.spec.drain = true;
        assert_eq!(decide(Some(&drained), true), Action::Drain);
        assert_eq!(decide(Some(&drained), false), Action::Drain);
        let mut deleting = drained;
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_eq!(decide(Some(&deleting), true), Action::Release);
    }
}
