//! The standalone source: a YAML file of services and endpoints, polled for changes.
//!
//! ```text
//!  file ─► read + hash (every poll interval) ─► changed? ─► parse (located YAML tree)
//!        ─► validate (ranges, families, duplicates, capacities) ─► DesiredState snapshot
//! ```
//!
//! Format (documented with examples in `examples/standalone/README.md`):
//!
//! ```yaml
//! services:
//!   - name: web
//!     vip: 127.100.0.1
//!     ports:
//!       - port: 80            # 1..65535
//!         protocol: TCP       # TCP (default) or UDP
//!         targetPort: 8080    # optional, default: port
//!     endpoints:
//!       - address: 127.0.0.1
//!         port: 8081          # optional; only when the service has a single port
//!         weight: 2           # optional, 1..65535, default 1
//! ```
//!
//! Every refusal names the file, the line and the field, and says what is allowed.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Source, SourceEvent, SourceUpdate};
use crate::model::{Backend, DesiredState, Protocol, ServiceKey};

/// Capacities a file must fit in (the data-plane map sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum number of frontends (VIP:port/protocol).
    pub max_services: u32,
    /// Maximum number of backends summed over all frontends.
    pub max_endpoints: u32,
}

/// One problem found in a file, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// 1-based line (0 when unknown).
    pub line: u64,
    /// Field path, e.g. `services[1].endpoints[0].port`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl Issue {
    fn new(line: u64, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            line,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Issues rendered as `file:line: field: message`, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issues {
    /// File as given on the command line.
    pub file: String,
    /// Every issue found (at least one).
    pub issues: Vec<Issue>,
}

impl fmt::Display for Issues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, issue.line, issue.field, issue.message
            )?;
        }
        Ok(())
    }
}

/// Errors of the standalone source, named for the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// The file could not be read.
    #[error("failed to read standalone source {path}: {source}")]
    ReadFile {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape (syntax, unknown key, wrong type).
    #[error("failed to parse {0}")]
    Parse(Issues),
    /// The file parsed but its content is refused (ranges, families, duplicates, capacity).
    #[error("refused {0}")]
    Validate(Issues),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    services: Spanned<Vec<Spanned<ServiceDoc>>>,
    /// Read by [`parse_ipsec`]; the services part ignores it.
    #[serde(default)]
    #[allow(dead_code)]
    ipsec: Option<Spanned<IpsecDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IpsecDoc {
    node_name: Spanned<String>,
    local_address: Spanned<String>,
    algorithm: Option<Spanned<String>>,
    key_file: Spanned<String>,
    spis: Spanned<Vec<Spanned<i64>>>,
    active_spi: Option<Spanned<i64>>,
    #[serde(default)]
    peers: Vec<Spanned<PeerDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerDoc {
    name: Spanned<String>,
    address: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDoc {
    name: Spanned<String>,
    vip: Spanned<String>,
    ports: Spanned<Vec<Spanned<PortDoc>>>,
    #[serde(default)]
    endpoints: Vec<Spanned<EndpointDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    port: Spanned<i64>,
    protocol: Option<Spanned<String>>,
    target_port: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointDoc {
    address: Spanned<String>,
    port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
}

fn port_in_range(v: &Spanned<i64>, field: String, issues: &mut Vec<Issue>) -> Option<u16> {
    match u16::try_from(v.value) {
        Ok(p) if p >= 1 => Some(p),
        _ => {
            issues.push(Issue::new(
                v.referenced.line(),
                field,
                format!("must be 1..65535, got {}", v.value),
            ));
            None
        }
    }
}

fn parse_ip(v: &Spanned<String>, field: String, issues: &mut Vec<Issue>) -> Option<IpAddr> {
    match v.value.trim().parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            issues.push(Issue::new(
                v.referenced.line(),
                field,
                format!("must be an IPv4 or IPv6 address, got {:?}", v.value),
            ));
            None
        }
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---"
    })
}

/// The mapping key written on `line` (1-based), or `(yaml)` when the line has none.
fn key_on_line(text: &str, line: u64) -> String {
    let Some(src) = usize::try_from(line)
        .ok()
        .and_then(|l| l.checked_sub(1))
        .and_then(|l| text.lines().nth(l))
    else {
        return "(yaml)".into();
    };
    let t = src.trim_start().trim_start_matches("- ").trim_start();
    match t.split_once(':') {
        Some((k, _))
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            k.to_string()
        }
        _ => "(yaml)".into(),
    }
}

/// The library's message without its own location prefix and snippet, in our words.
fn yaml_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or("invalid YAML").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let body = match (first.starts_with("line "), first.split_once(": ")) {
        (true, Some((_, rest))) => rest,
        _ => first,
    };
    match body {
        "invalid i64" => "must be an integer".to_string(),
        "expected sequence start" => "must be a list".to_string(),
        "expected mapping start" => "must be a mapping (key: value)".to_string(),
        other => other.to_string(),
    }
}

/// The YAML parser's resource budget, sized to the map capacities: a file that fills the maps
/// must parse (the parser's default of 250,000 nodes refuses 100,000 endpoints), while a file
/// far beyond them is still cut off early instead of exhausting memory.
fn yaml_options(limits: Limits) -> serde_saphyr::Options {
    // An endpoint written in block style with all its keys is a mapping plus six scalars; a
    // service adds its name, VIP and ports. Allow four times that for comments and style.
    let per_endpoint = 8;
    let per_service = 32;
    let nodes = 4
        * (limits.max_endpoints as usize * per_endpoint
            + limits.max_services as usize * per_service)
        + 4096;
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = budget.max_nodes.max(nodes);
    budget.max_events = budget.max_events.max(2 * nodes);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

fn parse_doc(file: &str, text: &str, limits: Limits) -> Result<FileDoc, StandaloneError> {
    let located = |issues| Issues {
        file: file.to_string(),
        issues,
    };
    if is_blank(text) {
        return Err(StandaloneError::Parse(located(vec![Issue::new(
            1,
            "(document)",
            "file is empty; expected a `services:` list (write `services: []` for none)",
        )])));
    }
    serde_saphyr::from_str_with_options(text, yaml_options(limits)).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let rendered = e.to_string();
        let message = yaml_message(&rendered);
        // A missing key is reported where its mapping is; name the key, not a neighbour.
        let field = match message
            .strip_prefix("missing field `")
            .and_then(|r| r.split_once('`'))
        {
            Some((missing, _)) => missing.to_string(),
            None => key_on_line(text, line),
        };
        StandaloneError::Parse(located(vec![Issue::new(
            line,
            field,
            format!("{message} (column {column})"),
        )]))
    })
}

/// Parse and validate the text of a standalone file. `file` names it in messages.
pub fn parse(file: &str, text: &str, limits: Limits) -> Result<DesiredState, StandaloneError> {
    let located = |issues| Issues {
        file: file.to_string(),
        issues,
    };
    let doc = parse_doc(file, text, limits)?;

    let mut issues = Vec::new();
    let mut state = DesiredState::default();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut frontends: HashMap<ServiceKey, (usize, u64)> = HashMap::new();
    let mut endpoint_total: u64 = 0;

    for (si, svc) in doc.services.value.iter().enumerate() {
        let at = format!("services[{si}]");
        let s = &svc.value;
        let name = s.name.value.trim();
        if name.is_empty() {
            issues.push(Issue::new(
                s.name.referenced.line(),
                format!("{at}.name"),
                "must not be empty",
            ));
        } else if let Some(prev) = names.insert(name, si) {
            issues.push(Issue::new(
                s.name.referenced.line(),
                format!("{at}.name"),
                format!("duplicate service name {name:?}, already used by services[{prev}]"),
            ));
        }
        let vip = parse_ip(&s.vip, format!("{at}.vip"), &mut issues);
        if s.ports.value.is_empty() {
            issues.push(Issue::new(
                s.ports.referenced.line(),
                format!("{at}.ports"),
                "must list at least one port",
            ));
        }
        // Resolve ports: (frontend port, protocol, target port).
        let mut ports = Vec::new();
        for (pi, p) in s.ports.value.iter().enumerate() {
            let pat = format!("{at}.ports[{pi}]");
            let port = port_in_range(&p.value.port, format!("{pat}.port"), &mut issues);
            let protocol = match &p.value.protocol {
                None => Some(Protocol::Tcp),
                Some(v) => match v.value.to_ascii_uppercase().as_str() {
                    "TCP" => Some(Protocol::Tcp),
                    "UDP" => Some(Protocol::Udp),
                    _ => {
                        issues.push(Issue::new(
                            v.referenced.line(),
                            format!("{pat}.protocol"),
                            format!("must be TCP or UDP, got {:?}", v.value),
                        ));
                        None
                    }
                },
            };
            let target = match &p.value.target_port {
                None => port,
                Some(t) => port_in_range(t, format!("{pat}.targetPort"), &mut issues),
            };
            if let (Some(vip), Some(port), Some(protocol)) = (vip, port, protocol) {
                let key = ServiceKey {
                    vip,
                    port,
                    protocol,
                };
                let line = p.referenced.line();
                if let Some((prev, prev_line)) = frontends.insert(key, (si, line)) {
                    let proto = if protocol == Protocol::Tcp {
                        "TCP"
                    } else {
                        "UDP"
                    };
                    issues.push(Issue::new(
                        line,
                        pat.clone(),
                        format!(
                            "duplicate frontend {vip}:{port}/{proto}, already defined by \
                             services[{prev}] at line {prev_line}"
                        ),
                    ));
                }
                ports.push((key, target));
            }
        }
        let many_ports = s.ports.value.len() > 1;
        let mut backends_by_target: Vec<(Option<u16>, IpAddr, u16)> = Vec::new();
        let mut seen: HashMap<(IpAddr, Option<u16>), usize> = HashMap::new();
        for (ei, ep) in s.endpoints.iter().enumerate() {
            let eat = format!("{at}.endpoints[{ei}]");
            let e = &ep.value;
            let addr = parse_ip(&e.address, format!("{eat}.address"), &mut issues);
            if let (Some(addr), Some(vip)) = (addr, vip)
                && addr.is_ipv4() != vip.is_ipv4()
            {
                issues.push(Issue::new(
                    e.address.referenced.line(),
                    format!("{eat}.address"),
                    format!(
                        "address family {} of {addr} does not match the service VIP {vip} ({})",
                        family(addr),
                        family(vip)
                    ),
                ));
            }
            let port = match &e.port {
                None => None,
                Some(p) => {
                    if many_ports {
                        issues.push(Issue::new(
                            p.referenced.line(),
                            format!("{eat}.port"),
                            "is ambiguous for a service with several ports; set ports[].targetPort instead",
                        ));
                    }
                    port_in_range(p, format!("{eat}.port"), &mut issues)
                }
            };
            let weight = match &e.weight {
                None => Some(1),
                Some(w) => match u16::try_from(w.value) {
                    Ok(w16) if w16 >= 1 => Some(w16),
                    _ => {
                        issues.push(Issue::new(
                            w.referenced.line(),
                            format!("{eat}.weight"),
                            format!("must be 1..65535, got {}", w.value),
                        ));
                        None
                    }
                },
            };
            if let (Some(addr), Some(weight)) = (addr, weight) {
                if let Some(prev) = seen.insert((addr, port), ei) {
                    issues.push(Issue::new(
                        ep.referenced.line(),
                        eat.clone(),
                        format!("duplicate endpoint {addr}, already listed as endpoints[{prev}]"),
                    ));
                }
                backends_by_target.push((port, addr, weight));
            }
        }
        for (key, target) in ports {
            let Some(target) = target else { continue };
            let mut backends: Vec<Backend> = backends_by_target
                .iter()
                .map(|&(port, addr, weight)| Backend {
                    addr,
                    port: port.unwrap_or(target),
                    weight,
                })
                .collect();
            backends.sort();
            endpoint_total += backends.len() as u64;
            state.services.insert(key, backends);
        }
    }

    if state.services.len() as u64 > u64::from(limits.max_services) {
        issues.push(Issue::new(
            doc.services.referenced.line(),
            "services",
            format!(
                "{} frontends (VIP:port/protocol) exceed the capacity of {}; raise --max-services",
                state.services.len(),
                limits.max_services
            ),
        ));
    }
    if endpoint_total > u64::from(limits.max_endpoints) {
        issues.push(Issue::new(
            doc.services.referenced.line(),
            "services",
            format!(
                "{endpoint_total} endpoints (summed over frontends) exceed the capacity of {}; \
                 raise --max-endpoints",
                limits.max_endpoints
            ),
        ));
    }
    if issues.is_empty() {
        Ok(state)
    } else {
        issues.sort_by_key(|i| i.line);
        Err(StandaloneError::Validate(located(issues)))
    }
}

/// Read and parse a standalone file from disk.
pub fn load(path: &Path, limits: Limits) -> Result<DesiredState, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&path.display().to_string(), &text, limits)
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    if !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| t.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

/// Key generations of an IPsec key file: one line per generation, `<spi> <psk-hex>
/// [<salt-hex>]`; `#` starts a comment. Problems are reported as `keyfile:line: message`.
/// The generations carry the default algorithm; the `ipsec:` section's `algorithm` replaces it.
pub fn parse_key_file(path: &Path, text: &str) -> Result<Vec<crate::ipsec::KeyGeneration>, String> {
    let mut out: Vec<crate::ipsec::KeyGeneration> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let mut parts = line.split_whitespace();
        let spi = parts.next().and_then(|v| v.parse::<u32>().ok());
        let Some(spi) = spi.filter(|s| (1..=crate::ipsec::MAX_SPI).contains(s)) else {
            return Err(format!(
                "{at}: expected `<spi 1..65535> <psk hex> [<salt hex>]`"
            ));
        };
        let Some(psk) = parts.next().and_then(parse_hex) else {
            return Err(format!("{at}: the pre-shared key must be hex digits"));
        };
        if psk.len() < 16 {
            return Err(format!(
                "{at}: the pre-shared key has {} bytes; at least 16 are required",
                psk.len()
            ));
        }
        let salt = match parts.next() {
            None => Vec::new(),
            Some(v) => parse_hex(v).ok_or_else(|| format!("{at}: the salt must be hex digits"))?,
        };
        if parts.next().is_some() {
            return Err(format!(
                "{at}: too many fields; expected `<spi> <psk hex> [<salt hex>]`"
            ));
        }
        if out.iter().any(|k| k.spi == spi) {
            return Err(format!("{at}: spi {spi} is listed twice"));
        }
        out.push(crate::ipsec::KeyGeneration {
            spi,
            psk,
            salt,
            algorithm: crate::ipsec::Algorithm::AesGcm,
        });
    }
    Ok(out)
}

/// Parse the `ipsec:` section of a standalone file (`None` when there is none). A relative
/// `keyFile` is resolved against `base_dir`. Every refusal names the file, line and field.
///
/// ```yaml
/// ipsec:
///   nodeName: node-a            # this node's name (enters the key derivation)
///   localAddress: 10.77.0.1     # this node's address
///   algorithm: rfc4106(gcm(aes))  # or cbc(aes)+hmac(sha256), rfc7539esp(chacha20,poly1305)
///   keyFile: ipsec.keys         # lines `<spi> <psk hex> [<salt hex>]`
///   spis: [1, 2]                # generations to accept inbound (1..65535)
///   activeSpi: 2                # generation outbound traffic uses; omit for inbound only
///   peers:
///     - name: node-b
///       address: 10.77.0.2
/// ```
pub fn parse_ipsec(
    file: &str,
    text: &str,
    base_dir: &Path,
) -> Result<Option<crate::ipsec::IpsecConfig>, StandaloneError> {
    use crate::ipsec::{Algorithm, IpsecConfig, MAX_SPI, Peer};
    let limits = Limits {
        max_services: 5_000,
        max_endpoints: 100_000,
    };
    let doc = parse_doc(file, text, limits)?;
    let Some(sec) = doc.ipsec else {
        return Ok(None);
    };
    let d = &sec.value;
    let mut issues = Vec::new();
    let node_name = d.node_name.value.trim().to_string();
    if node_name.is_empty() {
        issues.push(Issue::new(
            d.node_name.referenced.line(),
            "ipsec.nodeName",
            "must not be empty",
        ));
    }
    let local = parse_ip(&d.local_address, "ipsec.localAddress".into(), &mut issues);
    let algorithm = match &d.algorithm {
        None => Some(Algorithm::AesGcm),
        Some(a) => {
            let parsed = Algorithm::parse(&a.value);
            if parsed.is_none() {
                let allowed: Vec<_> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                issues.push(Issue::new(
                    a.referenced.line(),
                    "ipsec.algorithm",
                    format!("must be one of {}, got {:?}", allowed.join(", "), a.value),
                ));
            }
            parsed
        }
    };
    let mut spis = Vec::new();
    if d.spis.value.is_empty() {
        issues.push(Issue::new(
            d.spis.referenced.line(),
            "ipsec.spis",
            "must list at least one key generation",
        ));
    }
    for (i, v) in d.spis.value.iter().enumerate() {
        match u32::try_from(v.value) {
            Ok(spi) if (1..=MAX_SPI).contains(&spi) => {
                if spis.contains(&spi) {
                    issues.push(Issue::new(
                        v.referenced.line(),
                        format!("ipsec.spis[{i}]"),
                        format!("spi {spi} is listed twice"),
                    ));
                }
                spis.push(spi);
            }
            _ => issues.push(Issue::new(
                v.referenced.line(),
                format!("ipsec.spis[{i}]"),
                format!("must be 1..65535, got {}", v.value),
            )),
        }
    }
    let active_spi = match &d.active_spi {
        None => None,
        Some(v) => match u32::try_from(v.value) {
            Ok(spi) if spis.contains(&spi) => Some(spi),
            _ => {
                issues.push(Issue::new(
                    v.referenced.line(),
                    "ipsec.activeSpi",
                    format!("must be one of ipsec.spis {spis:?}, got {}", v.value),
                ));
                None
            }
        },
    };
    let mut peers: Vec<Peer> = Vec::new();
    let mut names_seen: HashMap<String, usize> = HashMap::new();
    let mut addrs_seen: HashMap<IpAddr, usize> = HashMap::new();
    for (i, p) in d.peers.iter().enumerate() {
        let at = format!("ipsec.peers[{i}]");
        let name = p.value.name.value.trim().to_string();
        if name.is_empty() || name == node_name {
            issues.push(Issue::new(
                p.value.name.referenced.line(),
                format!("{at}.name"),
                "must be a non-empty node name other than ipsec.nodeName",
            ));
        } else if let Some(prev) = names_seen.insert(name.clone(), i) {
            issues.push(Issue::new(
                p.value.name.referenced.line(),
                format!("{at}.name"),
                format!("duplicate peer {name:?}, already ipsec.peers[{prev}]"),
            ));
        }
        let Some(address) = parse_ip(&p.value.address, format!("{at}.address"), &mut issues) else {
            continue;
        };
        if let Some(local) = local {
            if local.is_ipv4() != address.is_ipv4() {
                issues.push(Issue::new(
                    p.value.address.referenced.line(),
                    format!("{at}.address"),
                    format!(
                        "address family {} of {address} does not match ipsec.localAddress {local}",
                        family(address)
                    ),
                ));
            } else if address == local {
                issues.push(Issue::new(
                    p.value.address.referenced.line(),
                    format!("{at}.address"),
                    "is this node's own address",
                ));
            }
        }
        if let Some(prev) = addrs_seen.insert(address, i) {
            issues.push(Issue::new(
                p.value.address.referenced.line(),
                format!("{at}.address"),
                format!("duplicate address {address}, already ipsec.peers[{prev}]"),
            ));
        }
        peers.push(Peer { name, address });
    }
    let key_path = base_dir.join(d.key_file.value.trim());
    let mut keys = Vec::new();
    match std::fs::read_to_string(&key_path) {
        Err(e) => issues.push(Issue::new(
            d.key_file.referenced.line(),
            "ipsec.keyFile",
            format!("cannot read {}: {e}", key_path.display()),
        )),
        Ok(text) => match parse_key_file(&key_path, &text) {
            Err(m) => issues.push(Issue::new(d.key_file.referenced.line(), "ipsec.keyFile", m)),
            Ok(all) => {
                for spi in &spis {
                    match all.iter().find(|k| k.spi == *spi) {
                        Some(k) => keys.push(k.clone()),
                        None => issues.push(Issue::new(
                            d.key_file.referenced.line(),
                            "ipsec.keyFile",
                            format!("{} has no key for spi {spi}", key_path.display()),
                        )),
                    }
                }
            }
        },
    }
    match (issues.is_empty(), local, algorithm) {
        (true, Some(local_address), Some(algorithm)) => Ok(Some(IpsecConfig {
            node_name,
            local_address,
            // The file's single algorithm applies to every generation it lists.
            keys: keys
                .into_iter()
                .map(|k| crate::ipsec::KeyGeneration { algorithm, ..k })
                .collect(),
            active_spi,
            peers,
        })),
        _ => {
            issues.sort_by_key(|i| i.line);
            Err(StandaloneError::Validate(Issues {
                file: file.to_string(),
                issues,
            }))
        }
    }
}

/// The standalone source: polls its file and sends a snapshot whenever the content changes.
#[derive(Debug, Clone)]
pub struct StandaloneSource {
    path: PathBuf,
    poll: Duration,
    limits: Limits,
}

impl StandaloneSource {
    /// A source reading `path` every `poll`.
    pub fn new(path: PathBuf, poll: Duration, limits: Limits) -> Self {
        Self { path, poll, limits }
    }
}

/// Name of the standalone source in the index.
pub const SOURCE_NAME: &str = "standalone";

impl Source for StandaloneSource {
    fn name(&self) -> &'static str {
        SOURCE_NAME
    }

    fn spawn(self: Box<Self>, tx: mpsc::Sender<SourceUpdate>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut last: Option<u64> = None;
            let mut ticker = tokio::time::interval(self.poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let read = tokio::fs::read(&self.path).await;
                let (hash, event) = match read {
                    Err(source) => {
                        let err = StandaloneError::ReadFile {
                            path: self.path.clone(),
                            source,
                        };
                        (u64::MAX, SourceEvent::Invalid(err.to_string()))
                    }
                    Ok(bytes) => {
                        let mut h = DefaultHasher::new();
                        bytes.hash(&mut h);
                        let hash = h.finish();
                        if last == Some(hash) {
                            continue;
                        }
                        let event = match String::from_utf8(bytes) {
                            Err(_) => SourceEvent::Invalid(format!(
                                "{}:0: (document): file is not UTF-8 text",
                                self.path.display()
                            )),
                            Ok(text) => {
                                match parse(&self.path.display().to_string(), &text, self.limits) {
                                    Ok(state) => SourceEvent::Snapshot(state),
                                    Err(e) => SourceEvent::Invalid(e.to_string()),
                                }
                            }
                        };
                        (hash, event)
                    }
                };
                if last == Some(hash) {
                    continue;
                }
                last = Some(hash);
                if tx
                    .send(SourceUpdate {
                        source: SOURCE_NAME,
                        event,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    }
}
