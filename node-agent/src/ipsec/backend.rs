//! Which [`Xfrm`] the agent uses: the kernel over netlink (the default), or — as a test hook
//! for hosts without ESP — a file-backed recording selected by environment.
//!
//! ```text
//!  MESHLET_IPSEC_XFRM unset ────────────► Backend::Netlink (NetlinkXfrm)
//!  MESHLET_IPSEC_XFRM=recording:<path> ─► Backend::Recording (FileRecording)
//!        <path>: {"states":[..], "policies":[..], "calls":[..]}  written after every call,
//!                read at start so a restarted agent adopts what it finds
//!  MESHLET_IPSEC_REFUSE_ALGORITHMS=a,b ─► the recording refuses those algorithms the way a
//!                                         kernel without the module does (ENOENT)
//!  <dir of path>/xfrm-refused-algorithms ─► the same, one name per line: the simulated node's
//!                                         kernel lacks them (a file of the node, not env)
//! ```

use std::path::{Path, PathBuf};

use super::Algorithm;
use super::netlink::NetlinkXfrm;
use super::xfrm::{
    Observed, PolicyId, PolicySpec, RecordingXfrm, SaId, SaSpec, Xfrm, XfrmCall, XfrmError,
};

/// Environment variable selecting the xfrm implementation (`recording:<path>`; unset: netlink).
pub const XFRM_ENV: &str = "MESHLET_IPSEC_XFRM";
/// Environment variable listing algorithm names the recording refuses (comma separated).
pub const REFUSE_ENV: &str = "MESHLET_IPSEC_REFUSE_ALGORITHMS";
const RECORDING_PREFIX: &str = "recording:";
/// File beside a recording listing algorithms that node's simulated kernel lacks.
pub const REFUSED_FILE: &str = "xfrm-refused-algorithms";

/// One SA in a recording file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedState {
    /// Identity.
    #[serde(flatten)]
    pub id: SaId,
    /// reqid (owner mark and key generation).
    pub reqid: u32,
    /// Digest of algorithm and key (`xfrm::material_digest`), never the key itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub material: Option<u64>,
}

/// One outbound policy in a recording file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedPolicy {
    /// Identity.
    #[serde(flatten)]
    pub id: PolicyId,
    /// Template reqid.
    pub reqid: u32,
    /// Priority (the agent's own policies carry `POLICY_PRIORITY`).
    pub priority: u32,
}

/// The JSON document of a recording file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedFile {
    /// SAs present.
    pub states: Vec<RecordedState>,
    /// Policies present.
    pub policies: Vec<RecordedPolicy>,
    /// Every mutating call, in order, across restarts.
    pub calls: Vec<XfrmCall>,
}

impl RecordedFile {
    /// Read a recording file (a missing file is an empty recording).
    pub fn read(path: &Path) -> Result<Self, XfrmError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                XfrmError::Connect(format!("recording file {} is invalid: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(XfrmError::Connect(format!(
                "cannot read recording file {}: {e}",
                path.display()
            ))),
        }
    }
}

/// [`RecordingXfrm`] persisted as JSON at a path after every call.
#[derive(Debug)]
pub struct FileRecording {
    path: PathBuf,
    inner: RecordingXfrm,
}

impl FileRecording {
    /// Open the recording at `path`, adopting what it holds; `refuse` lists the algorithms
    /// this "kernel" lacks.
    pub fn open(path: PathBuf, refuse: Vec<Algorithm>) -> Result<Self, XfrmError> {
        let file = RecordedFile::read(&path)?;
        let mut inner = RecordingXfrm::new();
        for s in file.states {
            inner.states.insert(s.id, s.reqid);
            if let Some(m) = s.material {
                inner.materials.insert(s.id, m);
            }
        }
        for p in file.policies {
            inner.policies.insert(p.id, (p.reqid, p.priority));
        }
        inner.calls = file.calls;
        inner.missing = refuse;
        Ok(Self { path, inner })
    }

    fn persist(&self) -> Result<(), XfrmError> {
        let file = RecordedFile {
            states: self
                .inner
                .states
                .iter()
                .map(|(id, reqid)| RecordedState {
                    id: *id,
                    reqid: *reqid,
                    material: self.inner.materials.get(id).copied(),
                })
                .collect(),
            policies: self
                .inner
                .policies
                .iter()
                .map(|(id, (reqid, priority))| RecordedPolicy {
                    id: *id,
                    reqid: *reqid,
                    priority: *priority,
                })
                .collect(),
            calls: self.inner.calls.clone(),
        };
        let json =
            serde_json::to_vec_pretty(&file).map_err(|e| XfrmError::Connect(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| {
                XfrmError::Connect(format!(
                    "cannot write recording file {}: {e}",
                    self.path.display()
                ))
            })
    }

    fn after<T>(&self, r: Result<T, XfrmError>) -> Result<T, XfrmError> {
        self.persist()?;
        r
    }
}

impl Xfrm for FileRecording {
    async fn install_state(&mut self, sa: &SaSpec) -> Result<(), XfrmError> {
        let r = self.inner.install_state(sa).await;
        self.after(r)
    }

    async fn delete_state(&mut self, id: &SaId) -> Result<(), XfrmError> {
        let r = self.inner.delete_state(id).await;
        self.after(r)
    }

    async fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), XfrmError> {
        let r = self.inner.install_policy(policy).await;
        self.after(r)
    }

    async fn delete_policy(&mut self, id: &PolicyId) -> Result<(), XfrmError> {
        let r = self.inner.delete_policy(id).await;
        self.after(r)
    }

    async fn list_own(&mut self) -> Result<Observed, XfrmError> {
        self.inner.list_own().await
    }
}

/// The xfrm implementation the agent runs with.
#[derive(Debug)]
pub enum Backend {
    /// The kernel, over netlink.
    Netlink(NetlinkXfrm),
    /// The file-backed recording test hook.
    Recording(FileRecording),
}

/// Parse `MESHLET_IPSEC_REFUSE_ALGORITHMS` (pure).
pub fn parse_refused(value: &str) -> Result<Vec<Algorithm>, XfrmError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            Algorithm::parse(n)
                .ok_or_else(|| XfrmError::Connect(format!("{REFUSE_ENV}: unknown algorithm {n:?}")))
        })
        .collect()
}

impl Backend {
    /// The implementation the environment selects (netlink unless [`XFRM_ENV`] says
    /// otherwise). Netlink needs a tokio runtime.
    pub fn from_env() -> Result<Self, XfrmError> {
        let Some(sel) = std::env::var_os(XFRM_ENV) else {
            return NetlinkXfrm::connect().map(Backend::Netlink);
        };
        let sel = sel.to_string_lossy();
        let Some(path) = sel.strip_prefix(RECORDING_PREFIX).filter(|p| !p.is_empty()) else {
            return Err(XfrmError::Connect(format!(
                "{XFRM_ENV} must be `recording:<path>`, got {sel:?}"
            )));
        };
        let path = PathBuf::from(path);
        let mut refuse = parse_refused(&std::env::var(REFUSE_ENV).unwrap_or_default())?;
        if let Some(file) = path.parent().map(|d| d.join(REFUSED_FILE))
            && let Ok(text) = std::fs::read_to_string(&file)
        {
            refuse.extend(parse_refused(&text.lines().collect::<Vec<_>>().join(","))?);
        }
        FileRecording::open(path, refuse).map(Backend::Recording)
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Netlink(_) => "netlink",
            Backend::Recording(_) => "recording",
        }
    }
}

impl Xfrm for Backend {
    async fn install_state(&mut self, sa: &SaSpec) -> Result<(), XfrmError> {
        match self {
            Backend::Netlink(x) => x.install_state(sa).await,
            Backend::Recording(x) => x.install_state(sa).await,
        }
    }

    async fn install_states(&mut self, sas: &[SaSpec]) -> Vec<Result<(), XfrmError>> {
        match self {
            Backend::Netlink(x) => x.install_states(sas).await,
            Backend::Recording(x) => x.install_states(sas).await,
        }
    }

    async fn install_policies(&mut self, policies: &[PolicySpec]) -> Vec<Result<(), XfrmError>> {
        match self {
            Backend::Netlink(x) => x.install_policies(policies).await,
            Backend::Recording(x) => x.install_policies(policies).await,
        }
    }

    async fn delete_state(&mut self, id: &SaId) -> Result<(), XfrmError> {
        match self {
            Backend::Netlink(x) => x.delete_state(id).await,
            Backend::Recording(x) => x.delete_state(id).await,
        }
    }

    async fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), XfrmError> {
        match self {
            Backend::Netlink(x) => x.install_policy(policy).await,
            Backend::Recording(x) => x.install_policy(policy).await,
        }
    }

    async fn delete_policy(&mut self, id: &PolicyId) -> Result<(), XfrmError> {
        match self {
            Backend::Netlink(x) => x.delete_policy(id).await,
            Backend::Recording(x) => x.delete_policy(id).await,
        }
    }

    async fn list_own(&mut self) -> Result<Observed, XfrmError> {
        match self {
            Backend::Netlink(x) => x.list_own().await,
            Backend::Recording(x) => x.list_own().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn sa(spi: u32) -> SaSpec {
        SaSpec {
            id: SaId {
                src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                spi,
            },
            reqid: super::super::reqid_for(300),
            algorithm: Algorithm::AesGcm,
            key: vec![7; 36],
        }
    }

    #[tokio::test]
    async fn a_reopened_recording_holds_what_the_last_one_wrote() {
        let dir = std::env::temp_dir().join(format!("meshlet-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("xfrm.json");
        let _ = std::fs::remove_file(&path);
        let mut a = FileRecording::open(path.clone(), vec![]).expect("open");
        a.install_state(&sa(0x1000)).await.expect("install");
        let before = a.list_own().await.expect("list");
        let mut b = FileRecording::open(path.clone(), vec![]).expect("reopen");
        assert_eq!(b.list_own().await.expect("list"), before);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            !text.contains("7,7,7"),
            "key bytes in the recording: {text}"
        );
        assert_eq!(RecordedFile::read(&path).expect("parse").calls.len(), 1);
    }

    #[tokio::test]
    async fn a_refused_algorithm_fails_like_a_kernel_without_the_module() {
        let path = std::env::temp_dir().join(format!("meshlet-rec-r-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let refuse = parse_refused("rfc4106(gcm(aes)), ").expect("parse");
        let mut x = FileRecording::open(path, refuse).expect("open");
        let err = x.install_state(&sa(0x1001)).await.expect_err("refused");
        assert_eq!(err.unavailable_algorithm(), Some(Algorithm::AesGcm));
        assert!(
            err.to_string()
                .contains("does not provide algorithm rfc4106(gcm(aes)) (errno 2)"),
            "{err}"
        );
        assert!(parse_refused("des").is_err());
    }
}
