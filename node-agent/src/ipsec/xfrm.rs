//! The kernel boundary of IPsec: what the reconciler asks of xfrm, and an in-memory recording
//! implementation for tests and for hosts whose kernel has no ESP.
//!
//! ```text
//!  reconcile::apply ──► Xfrm ──┬─► NetlinkXfrm (netlink, the running kernel's netns)
//!                              ├─► RecordingXfrm (memory; records every call in order)
//!                              └─► backend::FileRecording (RecordingXfrm persisted as JSON,
//!                                   the MESHLET_IPSEC_XFRM=recording:<path> test hook)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;

use super::Algorithm;

/// Identity of an SA in the kernel: (source, destination, wire SPI), protocol ESP.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SaId {
    /// Sending node address.
    pub src: IpAddr,
    /// Receiving node address.
    pub dst: IpAddr,
    /// SPI on the wire.
    pub spi: u32,
}

/// An SA to install.
#[derive(Clone, PartialEq, Eq)]
pub struct SaSpec {
    /// Identity.
    pub id: SaId,
    /// Request id; carries the owner mark and the key generation.
    pub reqid: u32,
    /// ESP algorithm.
    pub algorithm: Algorithm,
    /// Key material (`algorithm.key_len()` bytes).
    pub key: Vec<u8>,
}

impl fmt::Debug for SaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaSpec")
            .field("id", &self.id)
            .field("reqid", &format_args!("{:#x}", self.reqid))
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Identity of an outbound policy: traffic from `src` to `dst` (host prefixes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PolicyId {
    /// Local address.
    pub src: IpAddr,
    /// Peer address.
    pub dst: IpAddr,
}

/// An outbound policy: ESP transport mode through the SA with `reqid`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PolicySpec {
    /// Identity.
    pub id: PolicyId,
    /// reqid of the template; selects the key generation's outbound SA.
    pub reqid: u32,
}

/// An own SA as found in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedSa {
    /// reqid found.
    pub reqid: u32,
    /// Packets processed.
    pub packets: u64,
    /// Bytes processed.
    pub bytes: u64,
    /// [`material_digest`] of the SA's algorithm and key, when the kernel reports them.
    pub material: Option<u64>,
}

/// A one-way digest of an SA's algorithm and key material: lets the reconciler notice a
/// changed key without keeping or comparing key bytes. Never reversible to the key.
pub fn material_digest(algorithm: Algorithm, key: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"meshlet-ipsec-material");
    h.update(algorithm.name().as_bytes());
    h.update([0]);
    h.update(key);
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Own states and policies present in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Own SAs.
    pub states: BTreeMap<SaId, ObservedSa>,
    /// Own outbound policies, with their template reqid.
    pub policies: BTreeMap<PolicyId, u32>,
}

/// Errors of xfrm operations, named for the operation that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XfrmError {
    /// The xfrm netlink socket could not be opened.
    #[error("failed to open the xfrm netlink socket: {0}")]
    Connect(String),
    /// An SA could not be installed.
    #[error("failed to install SA {src} -> {dst} spi {spi:#x} ({algorithm}): {reason}")]
    InstallState {
        /// Source.
        src: IpAddr,
        /// Destination.
        dst: IpAddr,
        /// Wire SPI.
        spi: u32,
        /// Algorithm asked for.
        algorithm: Algorithm,
        /// What the kernel said, in words a user can act on.
        reason: String,
    },
    /// An SA could not be installed because the kernel lacks its algorithm (the module is not
    /// loaded or not built).
    #[error("failed to install SA {src} -> {dst} spi {spi:#x} ({algorithm}): {reason}")]
    AlgorithmUnavailable {
        /// Source.
        src: IpAddr,
        /// Destination.
        dst: IpAddr,
        /// Wire SPI.
        spi: u32,
        /// Algorithm the kernel refused.
        algorithm: Algorithm,
        /// What the kernel said and which modules to load.
        reason: String,
    },
    /// An SA could not be deleted.
    #[error("failed to delete SA {src} -> {dst} spi {spi:#x}: {reason}")]
    DeleteState {
        /// Source.
        src: IpAddr,
        /// Destination.
        dst: IpAddr,
        /// Wire SPI.
        spi: u32,
        /// Cause.
        reason: String,
    },
    /// A policy could not be installed or updated.
    #[error("failed to install policy {src} -> {dst} (reqid {reqid:#x}): {reason}")]
    InstallPolicy {
        /// Source.
        src: IpAddr,
        /// Destination.
        dst: IpAddr,
        /// Template reqid.
        reqid: u32,
        /// Cause.
        reason: String,
    },
    /// A policy could not be deleted.
    #[error("failed to delete policy {src} -> {dst}: {reason}")]
    DeletePolicy {
        /// Source.
        src: IpAddr,
        /// Destination.
        dst: IpAddr,
        /// Cause.
        reason: String,
    },
    /// The kernel's states or policies could not be listed.
    #[error("failed to list xfrm {what}: {reason}")]
    List {
        /// `states` or `policies`.
        what: &'static str,
        /// Cause.
        reason: String,
    },
}

/// What the IPsec reconciler needs from the kernel.
pub trait Xfrm: Send {
    /// Add an SA (fails if it exists).
    fn install_state(&mut self, sa: &SaSpec) -> impl Future<Output = Result<(), XfrmError>> + Send;
    /// Add many SAs; one result per SA, in order. Implementations may pipeline the requests.
    fn install_states(
        &mut self,
        sas: &[SaSpec],
    ) -> impl Future<Output = Vec<Result<(), XfrmError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(sas.len());
            for sa in sas {
                out.push(self.install_state(sa).await);
            }
            out
        }
    }
    /// Add or replace many policies; one result per policy, in order (may be pipelined).
    fn install_policies(
        &mut self,
        policies: &[PolicySpec],
    ) -> impl Future<Output = Vec<Result<(), XfrmError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(policies.len());
            for p in policies {
                out.push(self.install_policy(p).await);
            }
            out
        }
    }
    /// Delete an SA.
    fn delete_state(&mut self, id: &SaId) -> impl Future<Output = Result<(), XfrmError>> + Send;
    /// Add or replace (atomically) an outbound policy.
    fn install_policy(
        &mut self,
        policy: &PolicySpec,
    ) -> impl Future<Output = Result<(), XfrmError>> + Send;
    /// Delete an outbound policy.
    fn delete_policy(
        &mut self,
        id: &PolicyId,
    ) -> impl Future<Output = Result<(), XfrmError>> + Send;
    /// Own states and policies (those carrying the owner marks); nothing else is returned.
    fn list_own(&mut self) -> impl Future<Output = Result<Observed, XfrmError>> + Send;
}

impl XfrmError {
    /// The algorithm the kernel refused, when that is what failed.
    pub fn unavailable_algorithm(&self) -> Option<Algorithm> {
        match self {
            XfrmError::AlgorithmUnavailable { algorithm, .. } => Some(*algorithm),
            _ => None,
        }
    }
}

/// One call made to a [`RecordingXfrm`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "camelCase")]
pub enum XfrmCall {
    /// `install_state`.
    InstallState(SaId, u32),
    /// `delete_state`.
    DeleteState(SaId),
    /// `install_policy`.
    InstallPolicy(PolicySpec),
    /// `delete_policy`.
    DeletePolicy(PolicyId),
}

/// In-memory xfrm: keeps states and policies (own and foreign), records every mutating call,
/// and can refuse an algorithm the way a kernel without it does.
#[derive(Debug, Default, Clone)]
pub struct RecordingXfrm {
    /// Every SA present, own or not, by identity, with its reqid.
    pub states: BTreeMap<SaId, u32>,
    /// [`material_digest`] of every SA the recorder installed.
    pub materials: BTreeMap<SaId, u64>,
    /// Every outbound policy present, with its template reqid and priority.
    pub policies: BTreeMap<PolicyId, (u32, u32)>,
    /// Mutating calls in order.
    pub calls: Vec<XfrmCall>,
    /// Algorithms this "kernel" lacks.
    pub missing: Vec<Algorithm>,
    /// Fail the n-th (0-based) install_state call, counted over the recorder's lifetime.
    pub fail_install_at: Option<usize>,
    installs: usize,
}

impl RecordingXfrm {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a state another owner wrote (not recorded as a call).
    pub fn with_foreign_state(mut self, id: SaId, reqid: u32) -> Self {
        self.states.insert(id, reqid);
        self
    }

    /// Add a policy another owner wrote (not recorded as a call).
    pub fn with_foreign_policy(mut self, id: PolicyId, reqid: u32, priority: u32) -> Self {
        self.policies.insert(id, (reqid, priority));
        self
    }
}

impl Xfrm for RecordingXfrm {
    async fn install_state(&mut self, sa: &SaSpec) -> Result<(), XfrmError> {
        let n = self.installs;
        self.installs += 1;
        let fail = |reason: String| XfrmError::InstallState {
            src: sa.id.src,
            dst: sa.id.dst,
            spi: sa.id.spi,
            algorithm: sa.algorithm,
            reason,
        };
        if self.missing.contains(&sa.algorithm) {
            // What the netlink path reports for ENOENT from a kernel without the module.
            return Err(XfrmError::AlgorithmUnavailable {
                src: sa.id.src,
                dst: sa.id.dst,
                spi: sa.id.spi,
                algorithm: sa.algorithm,
                reason: super::netlink::describe_errno(libc::ENOENT, sa.algorithm),
            });
        }
        if self.fail_install_at == Some(n) {
            return Err(fail("injected failure".into()));
        }
        if self.states.contains_key(&sa.id) {
            return Err(fail("the SA exists (EEXIST)".into()));
        }
        self.states.insert(sa.id, sa.reqid);
        self.materials
            .insert(sa.id, material_digest(sa.algorithm, &sa.key));
        self.calls.push(XfrmCall::InstallState(sa.id, sa.reqid));
        Ok(())
    }

    async fn delete_state(&mut self, id: &SaId) -> Result<(), XfrmError> {
        self.calls.push(XfrmCall::DeleteState(*id));
        self.materials.remove(id);
        self.states
            .remove(id)
            .map(|_| ())
            .ok_or(XfrmError::DeleteState {
                src: id.src,
                dst: id.dst,
                spi: id.spi,
                reason: "no such SA (ESRCH)".into(),
            })
    }

    async fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), XfrmError> {
        self.calls.push(XfrmCall::InstallPolicy(*policy));
        self.policies
            .insert(policy.id, (policy.reqid, super::POLICY_PRIORITY));
        Ok(())
    }

    async fn delete_policy(&mut self, id: &PolicyId) -> Result<(), XfrmError> {
        self.calls.push(XfrmCall::DeletePolicy(*id));
        self.policies
            .remove(id)
            .map(|_| ())
            .ok_or(XfrmError::DeletePolicy {
                src: id.src,
                dst: id.dst,
                reason: "no such policy (ENOENT)".into(),
            })
    }

    async fn list_own(&mut self) -> Result<Observed, XfrmError> {
        Ok(Observed {
            states: self
                .states
                .iter()
                .filter(|(_, r)| super::spi_of_reqid(**r).is_some())
                .map(|(id, r)| {
                    (
                        *id,
                        ObservedSa {
                            reqid: *r,
                            packets: 0,
                            bytes: 0,
                            material: self.materials.get(id).copied(),
                        },
                    )
                })
                .collect(),
            policies: self
                .policies
                .iter()
                .filter(|(_, (_, prio))| *prio == super::POLICY_PRIORITY)
                .map(|(id, (r, _))| (*id, *r))
                .collect(),
        })
    }
}
