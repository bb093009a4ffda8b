//! Byte layouts of the map keys and values (mirrors `ebpf/meshlet.h`), layout conversion for
//! migrations, and the installed-service index that `apply` diffs against.
//!
//! ```text
//!  ServiceKey ─► frontend key ─► service id ─► endpoint {id, idx} ─► backend id ─► Backend
//! ```
//!
//! Byte order: addresses and ports are network order (as the kernel's `bpf_sock_addr` holds
//! them); ids, counts and weights are host order.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Backend, Protocol, ServiceKey};

/// Frontend key size.
pub const FRONTEND_KEY: usize = 20;
/// Endpoint key size.
pub const ENDPOINT_KEY: usize = 8;
/// Revnat key / value sizes.
pub const REVNAT_KEY: usize = 32;
/// Revnat value size.
pub const REVNAT_VALUE: usize = 20;

/// Endpoint value size for `layout`.
pub fn endpoint_value_size(layout: u32) -> usize {
    if layout == 1 { 4 } else { 8 }
}

/// Backend value size for `layout`.
pub fn backend_value_size(layout: u32) -> usize {
    if layout == 1 { 20 } else { 24 }
}

/// Expected (key size, value size) of a map pin name under `layout`.
pub fn map_sizes(pin: &str, layout: u32) -> (usize, usize) {
    match pin {
        "frontend" => (FRONTEND_KEY, 4),
        "service" => (4, 8),
        "endpoint" => (ENDPOINT_KEY, endpoint_value_size(layout)),
        "backend" => (4, backend_value_size(layout)),
        "revnat" => (REVNAT_KEY, REVNAT_VALUE),
        _ => (4, 8),
    }
}

fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (b, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

fn ip_from(bytes: &[u8], family: u8) -> IpAddr {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[..16]);
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(b))
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(x)
}

/// Encodes a frontend key.
pub fn frontend_key(key: &ServiceKey) -> [u8; FRONTEND_KEY] {
    let (ip, family) = ip_bytes(key.vip);
    let mut b = [0u8; FRONTEND_KEY];
    b[..16].copy_from_slice(&ip);
    b[16..18].copy_from_slice(&key.port.to_be_bytes());
    b[18] = match key.protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    };
    b[19] = family;
    b
}

/// Decodes a frontend key; `None` for a protocol or family this binary does not write.
pub fn decode_frontend_key(b: &[u8]) -> Option<ServiceKey> {
    let protocol = match i32::from(b[18]) {
        libc::IPPROTO_TCP => Protocol::Tcp,
        libc::IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    if b[19] != 4 && b[19] != 6 {
        return None;
    }
    Some(ServiceKey {
        vip: ip_from(b, b[19]),
        port: u16::from_be_bytes([b[16], b[17]]),
        protocol,
    })
}

/// Encodes a service value.
pub fn service_value(count: u32, total_weight: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&count.to_ne_bytes());
    b[4..].copy_from_slice(&total_weight.to_ne_bytes());
    b
}

/// Decodes a service value into (count, total weight).
pub fn decode_service_value(b: &[u8]) -> (u32, u32) {
    (u32_at(b, 0), u32_at(b, 4))
}

/// Encodes an endpoint key.
pub fn endpoint_key(service_id: u32, index: u32) -> [u8; ENDPOINT_KEY] {
    let mut b = [0u8; ENDPOINT_KEY];
    b[..4].copy_from_slice(&service_id.to_ne_bytes());
    b[4..].copy_from_slice(&index.to_ne_bytes());
    b
}

/// Decodes an endpoint key into (service id, index).
pub fn decode_endpoint_key(b: &[u8]) -> (u32, u32) {
    (u32_at(b, 0), u32_at(b, 4))
}

/// Encodes an endpoint value for `layout`.
pub fn endpoint_value(layout: u32, backend_id: u32, cum_weight: u32) -> Vec<u8> {
    let mut b = backend_id.to_ne_bytes().to_vec();
    if layout != 1 {
        b.extend_from_slice(&cum_weight.to_ne_bytes());
    }
    b
}

/// Decodes the backend id of an endpoint value (any layout).
pub fn decode_endpoint_backend(b: &[u8]) -> u32 {
    u32_at(b, 0)
}

/// Encodes a backend value for `layout` (layout 1 drops the weight).
pub fn backend_value(layout: u32, backend: &Backend) -> Vec<u8> {
    let (ip, _) = ip_bytes(backend.addr);
    let mut b = ip.to_vec();
    b.extend_from_slice(&backend.port.to_be_bytes());
    if layout == 1 {
        b.extend_from_slice(&[0, 0]);
    } else {
        b.extend_from_slice(&backend.weight.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
    }
    b
}

/// Decodes a backend value of `layout`; the family comes from the frontend.
pub fn decode_backend_value(layout: u32, b: &[u8], family: u8) -> Backend {
    let weight = if layout == 1 {
        1
    } else {
        u16::from_ne_bytes([b[18], b[19]])
    };
    Backend {
        addr: ip_from(b, family),
        port: u16::from_be_bytes([b[16], b[17]]),
        weight,
    }
}

/// Converts one endpoint value from layout `from` to `to`. `cum_weight` is the cumulative
/// weight to record when going to layout 2.
pub fn convert_endpoint(from: u32, to: u32, value: &[u8], cum_weight: u32) -> Vec<u8> {
    let _ = from;
    endpoint_value(to, decode_endpoint_backend(value), cum_weight)
}

/// Converts one backend value from layout `from` to `to` (1→2 sets weight 1; 2→1 drops it).
pub fn convert_backend(from: u32, to: u32, value: &[u8]) -> Vec<u8> {
    let mut out = value[..18].to_vec();
    match (from, to) {
        (1, 2) => {
            out.extend_from_slice(&1u16.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
        }
        (2, 1) => out.extend_from_slice(&[0, 0]),
        _ => out = value.to_vec(),
    }
    out
}

/// Family byte of a service key.
pub fn family(key: &ServiceKey) -> u8 {
    if key.vip.is_ipv4() { 4 } else { 6 }
}

/// A service as written in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Service id.
    pub service_id: u32,
    /// Backend ids, endpoint index order.
    pub backend_ids: Vec<u32>,
    /// Backends as stored (layout 1 reads weight 1).
    pub backends: Vec<Backend>,
}

/// Allocator of ids in `1..=u32::MAX` not currently used.
#[derive(Debug, Default)]
pub struct Ids {
    used: HashSet<u32>,
    next: u32,
}

impl Ids {
    /// Marks `id` used (rebuilding from the maps).
    pub fn mark(&mut self, id: u32) {
        self.used.insert(id);
    }

    /// Returns a free id and marks it used.
    pub fn alloc(&mut self) -> u32 {
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if self.used.insert(self.next) {
                return self.next;
            }
        }
    }

    /// Frees `id`.
    pub fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }

    /// Ids in use.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// True when no id is in use.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// The services installed in the maps, with id allocators.
#[derive(Debug, Default)]
pub struct Index {
    /// Installed services.
    pub services: HashMap<ServiceKey, Installed>,
    /// Service ids in use.
    pub service_ids: Ids,
    /// Backend ids in use.
    pub backend_ids: Ids,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_keys_round_trip_for_both_families_and_protocols() {
        for key in [
            ServiceKey {
                vip: "127.100.0.1".parse().expect("literal address"),
                port: 8080,
                protocol: Protocol::Tcp,
            },
            ServiceKey {
                vip: "fd00:6d65::1".parse().expect("literal address"),
                port: 53,
                protocol: Protocol::Udp,
            },
        ] {
            let b = frontend_key(&key);
            assert_eq!(decode_frontend_key(&b), Some(key));
        }
    }

    #[test]
    fn ports_and_addresses_are_stored_in_network_order() {
        let key = ServiceKey {
            vip: "10.1.2.3".parse().expect("literal address"),
            port: 0x1234,
            protocol: Protocol::Tcp,
        };
        let b = frontend_key(&key);
        assert_eq!(&b[..4], &[10, 1, 2, 3]);
        assert_eq!(&b[16..18], &[0x12, 0x34]);
    }

    #[test]
    fn backend_conversion_sets_weight_one_going_up_and_drops_it_going_down() {
        let be = Backend {
            addr: "127.0.0.2".parse().expect("literal address"),
            port: 9000,
            weight: 7,
        };
        let v1 = backend_value(1, &be);
        let v2 = convert_backend(1, 2, &v1);
        assert_eq!(v2.len(), backend_value_size(2));
        assert_eq!(decode_backend_value(2, &v2, 4), Backend { weight: 1, ..be });
        let back = convert_backend(2, 1, &backend_value(2, &be));
        assert_eq!(back, v1);
    }

    #[test]
    fn an_id_in_use_is_never_handed_out_twice() {
        let mut ids = Ids::default();
        ids.mark(2);
        let a = ids.alloc();
        let b = ids.alloc();
        assert_eq!((a, b), (1, 3));
        ids.free(1);
        assert_eq!(ids.len(), 2);
    }
}
