//! The data-plane model shared by the sources, the index and the loader.
//!
//! ```text
//!  standalone file ─┐                      ┌─► Dataplane::apply (maps, batched)
//!  Kubernetes     ──┴─► DesiredState index ─┤
//!                                          └─► status / admin API
//! ```
//!
//! Everything here is plain data: no kernel, no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Transport protocol of a service port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (rewritten at `connect`).
    Tcp,
    /// UDP (rewritten at `connect` and `sendmsg`).
    Udp,
}

/// A service frontend: the virtual IP, port and protocol clients connect to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ServiceKey {
    /// Virtual IP (IPv4 or IPv6).
    pub vip: IpAddr,
    /// Port clients connect to.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// One backend of a service.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Backend {
    /// Backend address; same family as the service VIP.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Relative weight (1..=65535). Layout 1 stores no weight and reads back 1.
    pub weight: u16,
}

/// The complete desired (or observed) data-plane state: every service with its backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DesiredState {
    /// Services, each with its backends in a stable order.
    pub services: BTreeMap<ServiceKey, Vec<Backend>>,
}
