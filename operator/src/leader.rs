//! Leader election on a `coordination.k8s.io/v1` Lease, with optimistic concurrency.
//!
//! ```text
//!   standby ──(lease free, expired or ours)──► try_acquire_or_renew ──ok──► leader
//!      ▲                                            │ 409 / held                 │ renew every
//!      └────────────────────────────────────────────┘                            │ renew_interval
//!                        lost (another holder, or no renewal within the lease) ◄─┘
//! ```
//!
//! Expiry is judged like client-go does: a standby remembers when it last saw the lease
//! *change* (its resourceVersion) on its own clock and takes over once it has not changed for
//! `leaseDurationSeconds`, so clock skew between instances does not matter. Every write
//! carries the resourceVersion it read, so two candidates never both win.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// Lease timing and identity.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This instance (`holderIdentity`), usually the pod name.
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_interval: Duration,
    /// How often a standby retries.
    pub retry_interval: Duration,
}

/// A lease operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading the lease failed.
    #[error("failed to read lease {namespace}/{name}")]
    Read {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing the lease failed (other than a lost race).
    #[error("failed to write lease {namespace}/{name}")]
    Write {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// One candidate in the election.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last resourceVersion seen and when (local clock) it was first seen.
    observed: Option<(String, Instant)>,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// A candidate for `settings.name` in `settings.namespace`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// The settings this candidate runs with.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn lease_secs(&self) -> i32 {
        i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    fn write_err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Write {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            source,
        }
    }

    /// Acquire the lease if it is free, expired or already ours, and renew it. Returns
    /// whether this instance holds the lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let current = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(|source| LeaseError::Read {
                namespace: self.settings.namespace.clone(),
                name: self.settings.name.clone(),
                source,
            })?;
        let me = self.settings.identity.clone();
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.lease_secs()),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(self.write_err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        let changed = self.observed.as_ref().is_none_or(|(seen, _)| *seen != rv);
        if changed {
            self.observed = Some((rv, now));
        }
        let mine = holder.as_deref() == Some(me.as_str());
        if !mine && holder.is_some() {
            let duration = Duration::from_secs(
                spec.lease_duration_seconds
                    .unwrap_or(self.lease_secs())
                    .max(1)
                    .unsigned_abs()
                    .into(),
            );
            let seen_at = self.observed.as_ref().map_or(now, |(_, t)| *t);
            if now.duration_since(seen_at) < duration {
                return Ok(false);
            }
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(me);
        new_spec.lease_duration_seconds = Some(self.lease_secs());
        new_spec.renew_time = Some(now_micro());
        if !mine {
            new_spec.acquire_time = Some(now_micro());
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observed = written
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.write_err(e)),
        }
    }

    /// Give the lease up (if held) so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(|source| LeaseError::Read {
                namespace: self.settings.namespace.clone(),
                name: self.settings.name.clone(),
                source,
            })?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(now_micro());
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(self.write_err(e)),
        }
    }

    /// The current holder of the lease, if any.
    pub async fn holder(&self) -> Result<Option<String>, LeaseError> {
        let lease = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(|source| LeaseError::Read {
                namespace: self.settings.namespace.clone(),
                name: self.settings.name.clone(),
                source,
            })?;
        Ok(lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    }
}
