//! [`Xfrm`] over netlink (crate `xfrmnetlink`), in the network namespace of the process.
//!
//! ```text
//!  NetlinkXfrm ── XFRM_MSG_NEWSA / DELSA / UPDPOLICY / DELPOLICY / GETSA+GETPOLICY dumps ──► kernel
//!      └─ connection task (tokio) owns the socket; requests wait for the kernel's ack
//! ```
//!
//! Kernel errors are turned into messages a user can act on: an algorithm or ESP itself
//! missing from the kernel names the modules to load.

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_xfrm::{
    Address, IPPROTO_ESP, Id, UserTemplate, XFRM_MODE_TRANSPORT, XFRM_POLICY_ALLOW,
    XFRM_POLICY_OUT, XfrmAttrs,
};
use tokio::task::JoinHandle;

use super::xfrm::{
    Observed, ObservedSa, PolicyId, PolicySpec, SaId, SaSpec, Xfrm, XfrmError, material_digest,
};
use super::{Algorithm, POLICY_PRIORITY, spi_of_reqid};

/// Requests in flight at once when installing many SAs or policies.
const PIPELINE: usize = 64;
/// Anti-replay window of every SA, in packets.
const REPLAY_WINDOW: u8 = 32;
const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// What an errno returned for an SA install means, in words a user can act on.
pub fn describe_errno(errno: i32, algorithm: Algorithm) -> String {
    match errno {
        libc::ENOSYS | libc::ENOENT => format!(
            "the kernel does not provide algorithm {algorithm} (errno {errno}); load its \
             modules ({}) or choose another ipsec.algorithm",
            algorithm.modules()
        ),
        libc::EPROTONOSUPPORT => format!(
            "the kernel has no ESP support (errno {errno}, EPROTONOSUPPORT); it needs \
             CONFIG_INET_ESP / the esp4 and esp6 modules"
        ),
        libc::EAFNOSUPPORT => {
            format!("the kernel does not support this address family for xfrm (errno {errno})")
        }
        libc::EEXIST => "an SA with this address and SPI exists already (EEXIST)".to_string(),
        libc::EINVAL => format!("the kernel refused the SA as invalid (errno {errno}, EINVAL)"),
        libc::EPERM => "permission denied: managing xfrm needs CAP_NET_ADMIN (EPERM)".to_string(),
        other => std::io::Error::from_raw_os_error(other).to_string(),
    }
}

fn errno_of(e: &xfrmnetlink::Error) -> Option<i32> {
    match e {
        xfrmnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

fn reason(e: &xfrmnetlink::Error) -> String {
    match errno_of(e) {
        Some(errno) => std::io::Error::from_raw_os_error(errno).to_string(),
        None => e.to_string(),
    }
}

fn ip_of(addr: &Address, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(addr.to_ipv4())),
        AF_INET6 => Some(IpAddr::V6(addr.to_ipv6())),
        _ => None,
    }
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Build the request adding `sa`; the returned future sends it and waits for the ack.
fn install_state_request(
    handle: &xfrmnetlink::Handle,
    sa: &SaSpec,
) -> Result<impl std::future::Future<Output = Result<(), XfrmError>> + Send + use<>, XfrmError> {
    let fail = |reason: String| XfrmError::InstallState {
        src: sa.id.src,
        dst: sa.id.dst,
        spi: sa.id.spi,
        algorithm: sa.algorithm,
        reason,
    };
    let mut req = handle
        .state()
        .add(sa.id.src, sa.id.dst)
        .protocol(IPPROTO_ESP)
        .spi(sa.id.spi)
        .mode(XFRM_MODE_TRANSPORT)
        .reqid(sa.reqid);
    req.message_mut().user_sa_info.replay_window = REPLAY_WINDOW;
    let req = match sa.algorithm {
        Algorithm::AesGcm | Algorithm::ChaCha20Poly1305 => req
            .encryption_aead(sa.algorithm.name(), &sa.key, 128)
            .map_err(|e| fail(e.to_string()))?,
        Algorithm::AesCbcHmacSha256 => {
            let (enc, auth) = sa.key.split_at(32);
            let req = req
                .encryption("cbc(aes)", &enc.to_vec())
                .map_err(|e| fail(e.to_string()))?;
            req.authentication_trunc("hmac(sha256)", &auth.to_vec(), 128)
                .map_err(|e| fail(e.to_string()))?
        }
    };
    let (src, dst, spi, algorithm) = (sa.id.src, sa.id.dst, sa.id.spi, sa.algorithm);
    Ok(async move {
        req.execute().await.map_err(|e| match errno_of(&e) {
            Some(errno @ (libc::ENOSYS | libc::ENOENT)) => XfrmError::AlgorithmUnavailable {
                src,
                dst,
                spi,
                algorithm,
                reason: describe_errno(errno, algorithm),
            },
            errno => XfrmError::InstallState {
                src,
                dst,
                spi,
                algorithm,
                reason: match errno {
                    Some(errno) => describe_errno(errno, algorithm),
                    None => e.to_string(),
                },
            },
        })
    })
}

/// Build the request adding or replacing `policy`; the future sends it and waits for the ack.
fn install_policy_request(
    handle: &xfrmnetlink::Handle,
    policy: &PolicySpec,
) -> impl std::future::Future<Output = Result<(), XfrmError>> + Send + use<> {
    let PolicyId { src, dst } = policy.id;
    let tmpl_id = Id {
        proto: IPPROTO_ESP,
        ..Id::default()
    };
    let tmpl = UserTemplate {
        id: tmpl_id,
        family: if src.is_ipv4() { AF_INET } else { AF_INET6 },
        saddr: Address::default(),
        reqid: policy.reqid,
        mode: XFRM_MODE_TRANSPORT,
        share: 0,
        optional: 0,
        aalgos: u32::MAX,
        ealgos: u32::MAX,
        calgos: u32::MAX,
    };
    let req = handle
        .policy()
        .update(src, host_prefix(src), dst, host_prefix(dst))
        .direction(XFRM_POLICY_OUT)
        .action(XFRM_POLICY_ALLOW)
        .priority(POLICY_PRIORITY)
        .add_template(tmpl);
    let reqid = policy.reqid;
    async move {
        req.execute().await.map_err(|e| XfrmError::InstallPolicy {
            src,
            dst,
            reqid,
            reason: reason(&e),
        })
    }
}

fn c_name(raw: &[u8]) -> &[u8] {
    raw.split(|b| *b == 0).next().unwrap_or_default()
}

/// [`material_digest`] of the algorithm and key a state dump reports (`None` when it does not
/// report them or names an algorithm the agent never writes).
fn material_of(nlas: &[XfrmAttrs]) -> Option<u64> {
    let mut enc = None;
    let mut auth = None;
    for a in nlas {
        match a {
            XfrmAttrs::EncryptionAlgAead(a) => {
                let name = c_name(&a.alg_name);
                let alg = Algorithm::ALL
                    .into_iter()
                    .find(|x| x.name().as_bytes() == name)?;
                return Some(material_digest(alg, &a.alg_key));
            }
            XfrmAttrs::EncryptionAlg(a) if c_name(&a.alg_name) == b"cbc(aes)" => {
                enc = Some(a.alg_key.clone());
            }
            XfrmAttrs::AuthenticationAlgTrunc(a) if c_name(&a.alg_name) == b"hmac(sha256)" => {
                auth = Some(a.alg_key.clone());
            }
            _ => {}
        }
    }
    let mut key = enc?;
    key.extend_from_slice(&auth?);
    Some(material_digest(Algorithm::AesCbcHmacSha256, &key))
}

/// Xfrm through a netlink socket of the current network namespace.
#[derive(Debug)]
pub struct NetlinkXfrm {
    handle: xfrmnetlink::Handle,
    conn: JoinHandle<()>,
}

impl Drop for NetlinkXfrm {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl NetlinkXfrm {
    /// Open the socket (needs a tokio runtime and CAP_NET_ADMIN).
    pub fn connect() -> Result<Self, XfrmError> {
        let (conn, handle, _msgs) =
            xfrmnetlink::new_connection().map_err(|e| XfrmError::Connect(e.to_string()))?;
        let conn = tokio::spawn(conn);
        Ok(Self { handle, conn })
    }
}

impl Xfrm for NetlinkXfrm {
    async fn install_state(&mut self, sa: &SaSpec) -> Result<(), XfrmError> {
        install_state_request(&self.handle, sa)?.await
    }

    async fn install_states(&mut self, sas: &[SaSpec]) -> Vec<Result<(), XfrmError>> {
        let mut futs = Vec::with_capacity(sas.len());
        let mut out: Vec<Option<Result<(), XfrmError>>> = Vec::with_capacity(sas.len());
        for (i, sa) in sas.iter().enumerate() {
            match install_state_request(&self.handle, sa) {
                Ok(f) => {
                    futs.push(async move { (i, f.await) });
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let done: Vec<_> = futures::stream::iter(futs)
            .buffer_unordered(PIPELINE)
            .collect()
            .await;
        for (i, r) in done {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(XfrmError::Connect("request lost".into()))))
            .collect()
    }

    async fn install_policies(&mut self, policies: &[PolicySpec]) -> Vec<Result<(), XfrmError>> {
        let futs: Vec<_> = policies
            .iter()
            .map(|p| install_policy_request(&self.handle, p))
            .collect();
        futures::stream::iter(futs)
            .buffered(PIPELINE)
            .collect()
            .await
    }

    async fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), XfrmError> {
        install_policy_request(&self.handle, policy).await
    }

    async fn delete_state(&mut self, id: &SaId) -> Result<(), XfrmError> {
        self.handle
            .state()
            .delete(id.src, id.dst)
            .protocol(IPPROTO_ESP)
            .spi(id.spi)
            .execute()
            .await
            .map_err(|e| XfrmError::DeleteState {
                src: id.src,
                dst: id.dst,
                spi: id.spi,
                reason: reason(&e),
            })
    }

    async fn delete_policy(&mut self, id: &PolicyId) -> Result<(), XfrmError> {
        self.handle
            .policy()
            .delete(id.src, host_prefix(id.src), id.dst, host_prefix(id.dst))
            .direction(XFRM_POLICY_OUT)
            .execute()
            .await
            .map_err(|e| XfrmError::DeletePolicy {
                src: id.src,
                dst: id.dst,
                reason: reason(&e),
            })
    }

    async fn list_own(&mut self) -> Result<Observed, XfrmError> {
        let mut observed = Observed::default();
        let mut states = self.handle.state().get_dump().execute();
        while let Some(msg) = states.try_next().await.map_err(|e| XfrmError::List {
            what: "states",
            reason: reason(&e),
        })? {
            let info = &msg.user_sa_info;
            if info.id.proto != IPPROTO_ESP || spi_of_reqid(info.reqid).is_none() {
                continue;
            }
            let (Some(src), Some(dst)) = (
                ip_of(&info.saddr, info.family),
                ip_of(&info.id.daddr, info.family),
            ) else {
                continue;
            };
            observed.states.insert(
                SaId {
                    src,
                    dst,
                    spi: info.id.spi,
                },
                ObservedSa {
                    reqid: info.reqid,
                    packets: info.lifetime_cur.packets,
                    bytes: info.lifetime_cur.bytes,
                    material: material_of(&msg.nlas),
                },
            );
        }
        let mut policies = self.handle.policy().get_dump().execute();
        while let Some(msg) = policies.try_next().await.map_err(|e| XfrmError::List {
            what: "policies",
            reason: reason(&e),
        })? {
            let info = &msg.user_policy_info;
            if info.priority != POLICY_PRIORITY || info.direction != XFRM_POLICY_OUT {
                continue;
            }
            let Some(reqid) = msg.nlas.iter().find_map(|a| match a {
                XfrmAttrs::Template(t) => t.first().map(|t| t.reqid),
                _ => None,
            }) else {
                continue;
            };
            if spi_of_reqid(reqid).is_none() {
                continue;
            }
            let sel = &info.selector;
            let (Some(src), Some(dst)) =
                (ip_of(&sel.saddr, sel.family), ip_of(&sel.daddr, sel.family))
            else {
                continue;
            };
            observed.policies.insert(PolicyId { src, dst }, reqid);
        }
        Ok(observed)
    }
}
