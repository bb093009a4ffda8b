//! The Kubernetes source: Services and EndpointSlices from the API server, turned into complete
//! [`DesiredState`] snapshots for the index (the same channel the standalone source uses).
//!
//! ```text
//!  watch Services (all namespaces)                     ─┐  caches (listed in full before use;
//!  watch EndpointSlices (label kubernetes.io/service-name)┴► a relist replaces them atomically)
//!        ─► debounce (bursts of events → one snapshot) ─► translate (pure) ─► changed?
//!        ─► SourceEvent::Snapshot ─► mpsc<SourceUpdate> ─► Index
//! ```
//!
//! Nothing is sent before both watches completed their first full list, so an agent that
//! adopted pinned maps never applies an empty or partial snapshot over them. Watch errors are
//! retried with backoff while the caches keep the last good objects, so the data plane keeps
//! serving. An object that cannot be used (e.g. an IPv6 address in an IPv4 slice, a duplicate
//! frontend) is skipped with a logged reason; the others are still applied.
//!
//! The node's own NodeEnrollment is watched by [`enrollment`].

pub mod enrollment;
pub mod node;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Source, SourceEvent, SourceUpdate};
use crate::metrics::KindLabel;
use crate::model::{Backend, DesiredState, Protocol, ServiceKey};

/// Name of this source in the index.
pub const SOURCE_NAME: &str = "kubernetes";
/// Label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Objects of one kind as last listed and watched, keyed by `namespace/name`.
///
/// A (re)list is buffered and swapped in whole at its end, so a relist after a watch error
/// never shows a half-listed set.
#[derive(Debug)]
pub struct Cache<K> {
    items: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
    listed: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<K: kube::Resource> Cache<K> {
    fn key(obj: &K) -> String {
        format!(
            "{}/{}",
            obj.meta().namespace.as_deref().unwrap_or_default(),
            obj.meta().name.as_deref().unwrap_or_default()
        )
    }

    /// Fold one watch event in; returns whether the visible set may have changed.
    pub fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(Self::key(&obj), obj);
                false
            }
            Event::InitDone => {
                self.items = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(obj) => {
                self.items.insert(Self::key(&obj), obj);
                true
            }
            Event::Delete(obj) => {
                self.items.remove(&Self::key(&obj));
                true
            }
        }
    }

    /// True once a first full list completed.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// The objects currently known.
    pub fn values(&self) -> impl Iterator<Item = &K> {
        self.items.values()
    }
}

/// A snapshot computed from Services and EndpointSlices, with what was skipped and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// Frontends and their ready backends.
    pub state: DesiredState,
    /// One line per skipped object or address: which one and why.
    pub skipped: Vec<String>,
}

fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Turn Services and EndpointSlices into the desired state (pure).
///
/// A Service contributes one frontend per ClusterIP (`spec.clusterIPs`, else `spec.clusterIP`)
/// and TCP/UDP port; headless (`None`) and `ExternalName` Services contribute nothing. Its
/// backends are the addresses of the ready endpoints (`conditions.ready` not `false`) of the
/// EndpointSlices labelled with its name in its namespace whose address family matches the
/// ClusterIP; the slice port is matched to the service port by name and protocol. Weight 1.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Translation {
    let mut out = Translation::default();
    // (namespace, service name) → slices.
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let Some(svc) = slice.labels().get(SERVICE_NAME_LABEL) else {
            continue;
        };
        by_service
            .entry((slice.namespace().unwrap_or_default(), svc.clone()))
            .or_default()
            .push(slice);
    }
    let mut owner: BTreeMap<ServiceKey, String> = BTreeMap::new();
    for svc in services {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let id = format!("Service {ns}/{name}");
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.clone(),
            (_, Some(ip)) => vec![ip.clone()],
            _ => Vec::new(),
        };
        let slices = by_service
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for ip in ips.iter().filter(|ip| !ip.is_empty() && *ip != "None") {
            let vip: IpAddr = match ip.parse() {
                Ok(v) => v,
                Err(_) => {
                    out.skipped.push(format!(
                        "{id}: spec.clusterIPs value {ip:?} is not an IP address; skipped"
                    ));
                    continue;
                }
            };
            for (pi, port) in spec.ports.iter().flatten().enumerate() {
                let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
                    out.skipped.push(format!(
                        "{id}: spec.ports[{pi}].protocol {:?} is not supported (TCP or UDP); skipped",
                        port.protocol.as_deref().unwrap_or_default()
                    ));
                    continue;
                };
                let Ok(fport) = u16::try_from(port.port) else {
                    out.skipped.push(format!(
                        "{id}: spec.ports[{pi}].port {} is out of range 1..65535; skipped",
                        port.port
                    ));
                    continue;
                };
                let key = ServiceKey {
                    vip,
                    port: fport,
                    protocol,
                };
                if let Some(first) = owner.get(&key) {
                    out.skipped.push(format!(
                        "{id}: frontend {ip}:{fport}/{protocol:?} is already served by {first}; skipped"
                    ));
                    continue;
                }
                let backends = backends_for(
                    &id,
                    vip,
                    port.name.as_deref().unwrap_or_default(),
                    protocol,
                    slices,
                    &mut out.skipped,
                );
                owner.insert(key, id.clone());
                out.state.services.insert(key, backends);
            }
        }
    }
    out
}

fn backends_for(
    id: &str,
    vip: IpAddr,
    port_name: &str,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    skipped: &mut Vec<String>,
) -> Vec<Backend> {
    let mut set = BTreeSet::new();
    for slice in slices {
        let slice_id = format!(
            "EndpointSlice {}/{}",
            slice.namespace().unwrap_or_default(),
            slice.name_any()
        );
        let slice_family = match slice.address_type.as_str() {
            "IPv4" => "IPv4",
            "IPv6" => "IPv6",
            // FQDN slices carry names, not addresses.
            _ => continue,
        };
        if slice_family != family(vip) {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && parse_protocol(p.protocol.as_deref()) == Some(protocol)
        }) else {
            continue;
        };
        let Some(bport) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            skipped.push(format!(
                "{slice_id}: port {port_name:?} has no usable number for {id}; skipped"
            ));
            continue;
        };
        for (ei, ep) in slice.endpoints.iter().flatten().enumerate() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for (ai, addr) in ep.addresses.iter().enumerate() {
                match addr.parse::<IpAddr>() {
                    Ok(a) if family(a) == slice_family => {
                        set.insert(Backend {
                            addr: a,
                            port: bport,
                            weight: 1,
                        });
                    }
                    Ok(a) => skipped.push(format!(
                        "{slice_id}: endpoints[{ei}].addresses[{ai}] {a} is {} but the slice's addressType is {slice_family}; skipped",
                        family(a)
                    )),
                    Err(_) => skipped.push(format!(
                        "{slice_id}: endpoints[{ei}].addresses[{ai}] {addr:?} is not an IP address; skipped"
                    )),
                }
            }
        }
    }
    set.into_iter().collect()
}

/// Counters the source updates (clones of the agent's metric families).
#[derive(Debug, Clone, Default)]
pub struct SourceMetrics {
    /// Watch errors (each followed by a backed-off restart), by resource.
    pub watch_restarts: Family<KindLabel, Counter>,
    /// Objects or addresses skipped in the last snapshot, counted once per new reason.
    pub skipped: Counter,
}

/// Watches Services and EndpointSlices and produces snapshots.
pub struct KubernetesSource {
    client: Client,
    debounce: Duration,
    metrics: SourceMetrics,
}

impl KubernetesSource {
    /// A source reading through `client`, coalescing event bursts over `debounce`.
    pub fn new(client: Client, debounce: Duration, metrics: SourceMetrics) -> Self {
        Self {
            client,
            debounce,
            metrics,
        }
    }
}

enum Watched {
    Service(Box<Result<Event<Service>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

impl Source for KubernetesSource {
    fn name(&self) -> &'static str {
        SOURCE_NAME
    }

    fn spawn(self: Box<Self>, tx: mpsc::Sender<SourceUpdate>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let services = watcher::watcher(
                Api::<Service>::all(self.client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .map(|e| Watched::Service(Box::new(e)))
            .boxed();
            let slices = watcher::watcher(
                Api::<EndpointSlice>::all(self.client.clone()),
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
            )
            .default_backoff()
            .map(|e| Watched::Slice(Box::new(e)))
            .boxed();
            let mut events = futures::stream::select(services, slices);
            let mut svc_cache = Cache::<Service>::default();
            let mut slice_cache = Cache::<EndpointSlice>::default();
            let mut due: Option<tokio::time::Instant> = None;
            let mut last_sent: Option<DesiredState> = None;
            let mut reported: BTreeSet<String> = BTreeSet::new();
            loop {
                tokio::select! {
                    ev = events.next() => {
                        let changed = match ev {
                            None => return,
                            Some(Watched::Service(e)) => match *e {
                                Ok(e) => svc_cache.apply(e),
                                Err(e) => {
                                    self.watch_error("services", &e);
                                    false
                                }
                            },
                            Some(Watched::Slice(e)) => match *e {
                                Ok(e) => slice_cache.apply(e),
                                Err(e) => {
                                    self.watch_error("endpointslices", &e);
                                    false
                                }
                            },
                        };
                        if changed && due.is_none() {
                            due = Some(tokio::time::Instant::now() + self.debounce);
                        }
                    }
                    _ = async { if let Some(at) = due { tokio::time::sleep_until(at).await } }, if due.is_some() => {
                        due = None;
                        if !(svc_cache.listed() && slice_cache.listed()) {
                            continue;
                        }
                        let t = translate(svc_cache.values(), slice_cache.values());
                        let now: BTreeSet<String> = t.skipped.iter().cloned().collect();
                        for reason in now.difference(&reported) {
                            warn!(reason = %reason, "kubernetes source skipped an object");
                            self.metrics.skipped.inc();
                        }
                        reported = now;
                        if last_sent.as_ref() == Some(&t.state) {
                            continue;
                        }
                        info!(frontends = t.state.services.len(), "kubernetes source snapshot");
                        last_sent = Some(t.state.clone());
                        let update = SourceUpdate { source: SOURCE_NAME, event: SourceEvent::Snapshot(t.state) };
                        if tx.send(update).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }
}

impl KubernetesSource {
    fn watch_error(&self, resource: &str, e: &watcher::Error) {
        warn!(resource, error = %e, "watch failed; retrying with backoff, the last listed objects stay in force");
        self.metrics
            .watch_restarts
            .get_or_create(&KindLabel {
                kind: resource.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn service(name: &str, ip: &str, ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                cluster_ips: Some(vec![ip.into()]),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, proto)| ServicePort {
                            name: Some((*n).into()),
                            port: *p,
                            protocol: Some((*proto).into()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn slice(
        svc: &str,
        family: &str,
        port: (&str, i32),
        eps: &[(&str, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc}-x")),
                namespace: Some("default".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..ObjectMeta::default()
            },
            address_type: family.into(),
            endpoints: Some(
                eps.iter()
                    .map(|(a, ready)| Endpoint {
                        addresses: vec![(*a).into()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some(port.0.into()),
                port: Some(port.1),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        }
    }

    fn key(ip: &str, port: u16) -> ServiceKey {
        ServiceKey {
            vip: ip.parse().expect("ip"),
            port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn ready_endpoints_become_backends_matched_by_port_name() {
        let svcs = [service(
            "web",
            "127.100.0.1",
            &[("http", 80, "TCP"), ("admin", 81, "TCP")],
        )];
        let slices = [slice(
            "web",
            "IPv4",
            ("http", 8080),
            &[
                ("127.0.0.1", Some(true)),
                ("127.0.0.2", None),
                ("127.0.0.3", Some(false)),
            ],
        )];
        let t = translate(&svcs, &slices);
        let web = &t.state.services[&key("127.100.0.1", 80)];
        let addrs: Vec<String> = web
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect();
        assert_eq!(addrs, ["127.0.0.1:8080", "127.0.0.2:8080"]);
        assert!(t.state.services[&key("127.100.0.1", 81)].is_empty());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    }

    #[test]
    fn headless_and_external_name_services_are_not_frontends() {
        let mut ext = service("ext", "", &[("", 80, "TCP")]);
        if let Some(s) = ext.spec.as_mut() {
            s.type_ = Some("ExternalName".into());
        }
        let svcs = [service("headless", "None", &[("", 80, "TCP")]), ext];
        assert!(translate(&svcs, &[]).state.services.is_empty());
    }

    #[test]
    fn an_address_of_the_wrong_family_is_skipped_with_its_reason_and_others_stay() {
        let svcs = [service("web", "127.100.0.1", &[("", 80, "TCP")])];
        let slices = [slice(
            "web",
            "IPv4",
            ("", 8080),
            &[("fd00::1", None), ("127.0.0.1", None)],
        )];
        let t = translate(&svcs, &slices);
        assert_eq!(t.state.services[&key("127.100.0.1", 80)].len(), 1);
        assert_eq!(t.skipped.len(), 1);
        assert!(t.skipped[0].contains("fd00::1 is IPv6"), "{:?}", t.skipped);
        assert!(
            t.skipped[0].contains("EndpointSlice default/web-x"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn a_second_service_on_the_same_frontend_is_skipped() {
        let svcs = [
            service("a", "127.100.0.1", &[("", 80, "TCP")]),
            service("b", "127.100.0.1", &[("", 80, "TCP")]),
        ];
        let t = translate(&svcs, &[]);
        assert_eq!(t.state.services.len(), 1);
        assert!(
            t.skipped[0].contains("Service default/b"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn a_relist_replaces_the_cache_only_when_complete() {
        let mut c = Cache::<Service>::default();
        assert!(!c.listed());
        c.apply(Event::Init);
        c.apply(Event::InitApply(service("a", "127.100.0.1", &[])));
        assert_eq!(c.values().count(), 0);
        assert!(c.apply(Event::InitDone));
        assert_eq!(c.values().count(), 1);
        c.apply(Event::Init);
        c.apply(Event::InitApply(service("b", "127.100.0.2", &[])));
        assert_eq!(c.values().next().map(|s| s.name_any()), Some("a".into()));
        c.apply(Event::InitDone);
        assert_eq!(c.values().next().map(|s| s.name_any()), Some("b".into()));
    }
}
