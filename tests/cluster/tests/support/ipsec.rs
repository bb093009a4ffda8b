//! IPsec on the local cluster: the policy as a user applies it, its status seen through a
//! watch, every node's recorded xfrm state, and the key bytes the operator published (to prove
//! they show up nowhere else). Included by the IPsec tests only (`#[path]`), so its unit tests
//! run once.
//!
//! ```text
//!  kubectl apply / annotate ──► IPsecPolicy ──► operator ──► Secret meshlet-ipsec-key
//!         PhaseLog ◄── watch ────────┘                          │
//!                                                  agents ◄─────┘ ──► node-i's /run/meshlet/xfrm.json
//!  Sampler ── every 5 ms: all recordings twice ──► "X sends to Y on g ⇒ Y receives g from X"
//! ```
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use meshlet_local_cluster::xfrm::{self, Recording};
use meshlet_local_cluster::{LocalCluster, SimNode};
use serde_json::Value;

use crate::support::mesh::{NS, condition, condition_of, enrollments, logs, resource};
use crate::support::*;

/// Name of the policy of these tests.
pub const POLICY: &str = "node-to-node";
/// Name of the Secret the operator publishes keys in.
pub const KEY_SECRET: &str = "meshlet-ipsec-key";
/// Annotation requesting a rotation.
pub const ROTATE: &str = "meshlet.io/rotate";
/// The default algorithm.
pub const GCM: &str = "rfc4106(gcm(aes))";

/// The IPsecPolicy of these tests: every node, generated key, default algorithm.
pub fn policy_yaml() -> String {
    format!(
        r#"apiVersion: meshlet.io/v1alpha1
kind: IPsecPolicy
metadata:
  name: {POLICY}
spec:
  algorithm: {GCM}
  rotationInterval: 24h
  mode: Transport
"#
    )
}

/// The IPsecPolicy as JSON (Null when absent).
pub async fn policy(cluster: &LocalCluster) -> Value {
    let api: Api<DynamicObject> =
        Api::all_with(cluster.client(), &resource("IPsecPolicy", "ipsecpolicies"));
    api.get_opt(POLICY)
        .await
        .ok()
        .flatten()
        .map(|o| serde_json::to_value(&o).unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

/// `status.phase`, `activeSPI`, `pendingSPI` of a policy JSON.
pub fn phase_of(p: &Value) -> (String, Option<u32>, Option<u32>) {
    let s = &p["status"];
    (
        s["phase"].as_str().unwrap_or("").to_string(),
        s["activeSPI"].as_u64().map(|v| v as u32),
        s["pendingSPI"].as_u64().map(|v| v as u32),
    )
}

/// Requests a rotation the way a user does: `kubectl annotate --overwrite`.
pub async fn request_rotation(cluster: &LocalCluster, value: &str) {
    let (ok, out, err) = kubectl(
        cluster,
        &[
            "annotate",
            "--overwrite",
            &format!("ipsecpolicy/{POLICY}"),
            &format!("{ROTATE}={value}"),
        ],
    )
    .await;
    assert!(ok, "kubectl annotate {ROTATE}={value}: {out}{err}");
}

/// Waits until the policy is `Stable` with an activeSPI different from `not` and Ready; the
/// activeSPI.
pub async fn wait_stable(cluster: &LocalCluster, not: Option<u32>, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        let p = policy(cluster).await;
        let (phase, active, _) = phase_of(&p);
        if phase == "Stable" && active.is_some() && active != not && condition(&p, "Ready") {
            return active.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "IPsecPolicy did not become Stable (activeSPI != {not:?}): {p}\n{}",
            logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One node as the IPsec checks see it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// InternalIP.
    pub ip: IpAddr,
    /// Its xfrm recording.
    pub path: PathBuf,
}

impl Peer {
    /// From a simulated node.
    pub fn of(n: &SimNode) -> Self {
        Self {
            name: n.name.clone(),
            ip: IpAddr::V4(n.address),
            path: n.xfrm_path(),
        }
    }

    /// Its recording now.
    pub fn read(&self) -> Recording {
        xfrm::read(&self.path).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

/// Every node of the cluster, as [`Peer`]s.
pub fn peers(cluster: &LocalCluster) -> Vec<Peer> {
    cluster.nodes().iter().map(Peer::of).collect()
}

/// What is missing for `node` to hold exactly: inbound SAs of `inbound` from every other
/// peer, an outbound SA of `sending` to every other peer, and its policy to every other peer
/// on `sending`. `None` when it holds.
pub fn missing(node: &Peer, all: &[Peer], inbound: &BTreeSet<u32>, sending: u32) -> Option<String> {
    let r = node.read();
    let (inb, outb, pol) = (r.inbound(node.ip), r.outbound(node.ip), r.sending(node.ip));
    let mut gaps = Vec::new();
    for p in all.iter().filter(|p| p.name != node.name) {
        let have = inb.get(&p.ip).cloned().unwrap_or_default();
        if &have != inbound {
            gaps.push(format!("inbound from {} {have:?} != {inbound:?}", p.name));
        }
        if !outb.get(&p.ip).is_some_and(|g| g.contains(&sending)) {
            gaps.push(format!("no outbound SA {sending} to {}", p.name));
        }
        if pol.get(&p.ip) != Some(&sending) {
            gaps.push(format!(
                "policy to {} on {:?}, not {sending}",
                p.name,
                pol.get(&p.ip)
            ));
        }
    }
    (!gaps.is_empty()).then(|| format!("{}: {}", node.name, gaps.join("; ")))
}

/// Waits until every node holds inbound `inbound` from every peer and sends on `sending`, and
/// its NodeEnrollment acknowledges it (`installedSPIs`, `activeSPI`, `IPsecReady` True).
pub async fn wait_converged(cluster: &LocalCluster, inbound: &[u32], sending: u32) {
    let all = peers(cluster);
    let want: BTreeSet<u32> = inbound.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut gaps: Vec<String> = all
            .iter()
            .filter_map(|n| missing(n, &all, &want, sending))
            .collect();
        let nes = enrollments(cluster).await;
        for n in &all {
            let ne = nes.get(&n.name).cloned().unwrap_or(Value::Null);
            let acked = installed_spis(&ne);
            if acked != want
                || ne["status"]["ipsec"]["activeSPI"].as_u64() != Some(u64::from(sending))
                || !condition(&ne, "IPsecReady")
            {
                gaps.push(format!(
                    "{}: status.ipsec {} IPsecReady {:?}",
                    n.name,
                    ne["status"]["ipsec"],
                    condition_of(&ne, "IPsecReady")
                ));
            }
        }
        if gaps.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not converge on inbound {want:?} sending {sending}: {gaps:#?}\n{}",
            logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `status.ipsec.installedSPIs` of a NodeEnrollment JSON.
pub fn installed_spis(ne: &Value) -> BTreeSet<u32> {
    ne["status"]["ipsec"]["installedSPIs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// One status write of the policy, as seen by a watch.
#[derive(Debug, Clone)]
pub struct PhaseEvent {
    /// When the test saw it.
    pub at: Instant,
    /// `status.phase`.
    pub phase: String,
    /// `status.activeSPI`.
    pub active: Option<u32>,
    /// `status.pendingSPI`.
    pub pending: Option<u32>,
    /// `status.acks`.
    pub acks: Value,
    /// The `Stalled` condition when it is True.
    pub stalled: Option<String>,
}

/// Every status change of the policy, recorded by a watch in the background.
pub struct PhaseLog {
    events: Arc<Mutex<Vec<PhaseEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PhaseLog {
    /// Starts watching the policy.
    pub fn start(cluster: &LocalCluster) -> Self {
        let api: Api<DynamicObject> =
            Api::all_with(cluster.client(), &resource("IPsecPolicy", "ipsecpolicies"));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher::watch_object(api, POLICY).boxed();
            while let Some(ev) = stream.next().await {
                let Ok(Some(obj)) = ev else { continue };
                let v = serde_json::to_value(&obj).unwrap_or(Value::Null);
                let (phase, active, pending) = phase_of(&v);
                let stalled = condition_of(&v, "Stalled")
                    .filter(|c| c["status"] == "True")
                    .map(|c| format!("{}: {}", c["reason"], c["message"]));
                let e = PhaseEvent {
                    at: Instant::now(),
                    phase,
                    active,
                    pending,
                    acks: v["status"]["acks"].clone(),
                    stalled,
                };
                if let Ok(mut all) = sink.lock() {
                    let changed = all.last().is_none_or(|l: &PhaseEvent| {
                        (&l.phase, l.active, l.pending, &l.acks, &l.stalled)
                            != (&e.phase, e.active, e.pending, &e.acks, &e.stalled)
                    });
                    if changed {
                        all.push(e);
                    }
                }
            }
        });
        Self { events, task }
    }

    /// The events seen so far.
    pub fn events(&self) -> Vec<PhaseEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Waits until an event after index `from` satisfies `pred`; its index.
    pub async fn wait(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&PhaseEvent) -> bool,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events().iter().skip(from).position(&pred) {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the IPsecPolicy to reach {what}; status changes seen: {:#?}",
                self.events().iter().skip(from).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the watch.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// The distinct phases of `events`, in order (consecutive duplicates merged), with when each
/// was first seen.
pub fn phase_sequence(events: &[PhaseEvent]) -> Vec<(String, Instant)> {
    let mut out: Vec<(String, Instant)> = Vec::new();
    for e in events {
        if out.last().is_none_or(|(p, _)| *p != e.phase) {
            out.push((e.phase.clone(), e.at));
        }
    }
    out
}

/// Prints how long each phase of a rotation took, from the request at `start` (status writes
/// before `Installing` are skipped); returns the line.
pub fn phase_timings(label: &str, start: Instant, seq: &[(String, Instant)]) -> String {
    let seq: Vec<(String, Instant)> = seq
        .iter()
        .skip_while(|(p, _)| p != "Installing")
        .cloned()
        .collect();
    let mut parts = Vec::new();
    let mut prev = start;
    let mut prev_name = "request".to_string();
    for (p, at) in &seq {
        parts.push(format!(
            "{prev_name}→{p} {} ms",
            at.duration_since(prev).as_millis()
        ));
        prev = *at;
        prev_name = p.clone();
    }
    let line = format!(
        "{label}: {} (total {} ms)",
        parts.join(", "),
        seq.last()
            .map(|(_, at)| at.duration_since(start).as_millis())
            .unwrap_or_default()
    );
    println!("{line}");
    line
}

/// Samples every node's recording continuously and checks, at every sample, that no node
/// sends to a peer on a generation that peer cannot receive: for sender X and receiver Y, X's
/// file is read before Y's (X's policy moves only after Y installed, Y deletes only after X
/// moved away), so a violation seen is a real window.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<SamplerReport>,
}

/// What a [`Sampler`] saw.
#[derive(Debug, Default)]
pub struct SamplerReport {
    /// Samples taken.
    pub samples: usize,
    /// Distinct violations, with the first sample each was seen in.
    pub violations: BTreeMap<String, usize>,
}

impl Sampler {
    /// Starts sampling the recordings of `checked`.
    pub fn start(checked: Vec<Peer>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut report = SamplerReport::default();
            while !flag.load(Ordering::SeqCst) {
                let first: Vec<Recording> = checked.iter().map(Peer::read).collect();
                let second: Vec<Recording> = checked.iter().map(Peer::read).collect();
                for v in window_violations(&checked, &first, &second) {
                    report.violations.entry(v).or_insert(report.samples);
                }
                report.samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            report
        });
        Self { stop, task }
    }

    /// Stops sampling; the report.
    pub async fn stop(self) -> SamplerReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sampler")
    }
}

/// Pairs where the sender (`first`) sends on a generation the receiver (`second`, read later)
/// has no inbound SA for, or the sender has no outbound SA for its policy.
pub fn window_violations(peers: &[Peer], first: &[Recording], second: &[Recording]) -> Vec<String> {
    let mut out = Vec::new();
    for (x, rx) in peers.iter().zip(first) {
        let sending = rx.sending(x.ip);
        let outbound = rx.outbound(x.ip);
        for (y, ry) in peers.iter().zip(second) {
            if x.name == y.name {
                continue;
            }
            let Some(g) = sending.get(&y.ip) else {
                continue;
            };
            if !outbound.get(&y.ip).is_some_and(|s| s.contains(g)) {
                out.push(format!(
                    "{} sends to {} on {g} without an outbound SA of {g}",
                    x.name, y.name
                ));
            }
            if !ry.inbound(y.ip).get(&x.ip).is_some_and(|s| s.contains(g)) {
                out.push(format!(
                    "{} sends to {} on {g} while {} has no inbound SA of {g} from {}",
                    x.name, y.name, y.name, x.name
                ));
            }
        }
    }
    out
}

/// Key bytes the operator published, collected over a test.
#[derive(Default)]
pub struct PublishedKeys {
    keys: BTreeMap<String, Vec<u8>>,
}

impl PublishedKeys {
    /// Adds the keys the Secret publishes now; the generations it publishes.
    pub async fn collect(&mut self, cluster: &LocalCluster) -> BTreeSet<u32> {
        let api: Api<Secret> = Api::namespaced(cluster.client(), NS);
        let s = api
            .get(KEY_SECRET)
            .await
            .expect("get the published key Secret");
        let mut gens = BTreeSet::new();
        for (name, v) in s.data.unwrap_or_default() {
            let mut parts = name.rsplitn(3, '.');
            let (field, spi) = (parts.next(), parts.next());
            if let Some(spi) = spi.and_then(|s| s.parse::<u32>().ok()) {
                gens.insert(spi);
            }
            if field == Some("key") {
                assert!(v.0.len() >= 16, "{name} holds {} bytes", v.0.len());
                self.keys.insert(name, v.0);
            }
        }
        gens
    }

    /// How many distinct keys were seen.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The encodings of a key found in `text` (raw, hex, base64, a Debug byte list), by entry.
    pub fn leaks(&self, text: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for (name, key) in &self.keys {
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let list = key[..8]
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let b64 = base64(key);
            let forms: [(&str, Vec<u8>); 5] = [
                ("raw", key.clone()),
                ("hex", hex.clone().into_bytes()),
                ("HEX", hex.to_uppercase().into_bytes()),
                ("base64", b64.trim_end_matches('=').as_bytes().to_vec()),
                ("byte list", list.into_bytes()),
            ];
            for (form, needle) in forms {
                if contains(text, &needle) {
                    out.push(format!("{name} ({form})"));
                }
            }
        }
        out
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Everything a user or a log collector sees: `kubectl get ipsecpolicy,nodeenrollments -o
/// yaml`, every Event, and every pod log of the cluster.
pub async fn visible_text(cluster: &LocalCluster) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for args in [
        &["get", "ipsecpolicy,nodeenrollments", "-o", "yaml"][..],
        &["get", "events", "-A", "-o", "yaml"][..],
        &["get", "meshconfig", "-o", "yaml"][..],
    ] {
        let (ok, stdout, err) = kubectl(cluster, args).await;
        assert!(ok, "kubectl {args:?}: {err}");
        out.push((format!("kubectl {}", args.join(" ")), stdout.into_bytes()));
    }
    fn walk(dir: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, files);
                } else {
                    files.push(p);
                }
            }
        }
    }
    let mut files = Vec::new();
    for n in cluster.nodes() {
        walk(&n.pod_logs_dir(), &mut files);
    }
    if let Ok(rd) = std::fs::read_dir(cluster.dir()) {
        files.extend(rd.flatten().map(|e| e.path()));
    }
    for p in files {
        if p.extension().is_some_and(|x| x == "log") {
            out.push((
                p.display().to_string(),
                std::fs::read(&p).unwrap_or_default(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_local_cluster::xfrm::{Policy, PolicyId, SaId, State};

    #[test]
    fn base64_matches_the_rfc_vectors() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    fn peer(i: u8) -> Peer {
        Peer {
            name: format!("node-{i}"),
            ip: IpAddr::from([127, 0, 1, i]),
            path: PathBuf::new(),
        }
    }

    /// A node holding inbound `inbound` from, and sending on `sending` to, peer `other`.
    fn node(me: u8, other: u8, inbound: &[u32], sending: u32) -> Recording {
        let (a, b) = (peer(me).ip, peer(other).ip);
        let reqid = |g: u32| 0x6d6c_0000 | g;
        let mut states: Vec<State> = inbound
            .iter()
            .map(|g| State {
                id: SaId {
                    src: b,
                    dst: a,
                    spi: *g,
                },
                reqid: reqid(*g),
            })
            .collect();
        states.push(State {
            id: SaId {
                src: a,
                dst: b,
                spi: sending + 1000,
            },
            reqid: reqid(sending),
        });
        Recording {
            states,
            policies: vec![Policy {
                id: PolicyId { src: a, dst: b },
                reqid: reqid(sending),
                priority: 0,
            }],
            calls: Vec::new(),
        }
    }

    #[test]
    fn a_sender_ahead_of_its_receiver_is_a_window() {
        let peers = [peer(1), peer(2)];
        let ok = [node(1, 2, &[256, 257], 257), node(2, 1, &[256, 257], 256)];
        assert!(window_violations(&peers, &ok, &ok).is_empty());
        let early = [node(1, 2, &[256, 257], 257), node(2, 1, &[256], 256)];
        let v = window_violations(&peers, &early, &early);
        assert_eq!(
            v,
            ["node-1 sends to node-2 on 257 while node-2 has no inbound SA of 257 from node-1"]
        );
    }

    #[test]
    fn the_leak_check_finds_every_encoding() {
        let mut k = PublishedKeys::default();
        let key: Vec<u8> = (1..=32).collect();
        k.keys.insert("p.256.key".into(), key.clone());
        assert!(k.leaks(b"nothing here").is_empty());
        assert_eq!(k.leaks(base64(&key).as_bytes()), ["p.256.key (base64)"]);
        assert_eq!(
            k.leaks(b"[1, 2, 3, 4, 5, 6, 7, 8, 9]"),
            ["p.256.key (byte list)"]
        );
    }
}
