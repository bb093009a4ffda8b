//! IPsec fixtures: nodes with addresses and enrollments, and **stand-in agents** that follow
//! the agent side of the IPsec contract through the API only (as the agent ServiceAccount).
//!
//! ```text
//!  operator ──► Secret meshlet-ipsec-key + IPsecPolicy.status
//!                    │ read (agent SA)
//!                    ▼
//!  stand-in agent per node: policy_for_node, inbound = published generations it can
//!  install, outbound = activeSPI if published ──► NodeEnrollment.status.ipsec + IPsecReady
//! ```

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use meshlet_crds::{
    IPsecPolicy, NodeEnrollment,
    conditions::{self, IPSEC_READY, Status},
    ipsec::{self as contract, algorithm_name},
    names::{AGENT_FIELD_MANAGER, AGENT_NAME, IPSEC_KEY_SECRET, NAMESPACE},
    v1alpha1::{IPsecAlgorithm, IPsecNodeStatus},
};
use serde_json::json;
use tokio::task::JoinHandle;

use super::Cluster;

/// How one stand-in agent behaves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Follows the contract promptly.
    #[default]
    Normal,
    /// Writes nothing (an agent that is slow or not running yet).
    Withhold,
    /// Its kernel lacks these algorithms: generations using them are not installed and
    /// `IPsecReady` is False with reason `AlgorithmUnavailable`.
    Refuse(Vec<IPsecAlgorithm>),
}

/// Creates Nodes with `labels` and an `InternalIP` each, and their NodeEnrollments.
pub async fn add_ipsec_nodes(cluster: &Cluster, names: &[&str], labels: &[(&str, &str)]) {
    let nodes: Api<Node> = Api::all(cluster.admin.clone());
    let enrollments: Api<NodeEnrollment> = Api::all(cluster.admin.clone());
    for (i, name) in names.iter().enumerate() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some((*name).to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        let ip = format!(
            "10.{}.{}.{}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            (i & 0xff) + 1
        );
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": [
                    {"type": "Hostname", "address": name},
                    {"type": "InternalIP", "address": ip},
                ]}})),
            )
            .await
            .expect("node addresses");
        enrollments
            .create(&PostParams::default(), &NodeEnrollment::test(name))
            .await
            .expect("create enrollment");
    }
}

/// Stand-in agents for every enrolled node, one pass every 25 ms.
pub struct IpsecAgents {
    /// Behaviour by node (absent: [`Behaviour::Normal`]).
    pub behaviours: Arc<Mutex<BTreeMap<String, Behaviour>>>,
    task: JoinHandle<()>,
}

impl Drop for IpsecAgents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IpsecAgents {
    /// Starts them against `cluster`.
    pub async fn start(cluster: &Cluster) -> Self {
        let agent = agent_client(cluster).await;
        let behaviours = Arc::new(Mutex::new(BTreeMap::new()));
        let b = behaviours.clone();
        let task = tokio::spawn(async move {
            loop {
                let now = b.lock().expect("behaviours").clone();
                if let Err(e) = agents_pass(&agent, &now).await {
                    eprintln!("stand-in IPsec agents failed (retrying): {e}");
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        Self { behaviours, task }
    }

    /// Sets how `node`'s agent behaves from now on.
    pub fn set(&self, node: &str, behaviour: Behaviour) {
        self.behaviours
            .lock()
            .expect("behaviours")
            .insert(node.to_owned(), behaviour);
    }
}

/// A client authenticated as the agent ServiceAccount.
pub async fn agent_client(cluster: &Cluster) -> Client {
    cluster
        .server
        .client_for(NAMESPACE, AGENT_NAME)
        .await
        .expect("agent client")
}

/// The status one node's agent reports: `None` keeps what is there (inconsistent view).
type Report = Option<(Option<IPsecNodeStatus>, Option<(Status, String, String)>)>;

fn report(
    ne: &NodeEnrollment,
    policy: Option<&IPsecPolicy>,
    data: Option<&BTreeMap<String, k8s_openapi::ByteString>>,
    peers: usize,
    behaviour: &Behaviour,
) -> Report {
    let Some(policy) = policy else {
        return Some((None, None));
    };
    let name = policy.name_any();
    let published = contract::published(data?, &name).ok()?;
    let active = policy
        .status
        .as_ref()?
        .active_spi
        .and_then(|s| u32::try_from(s).ok())?;
    if !published.contains_key(&active) {
        return None;
    }
    let refused: &[IPsecAlgorithm] = match behaviour {
        Behaviour::Refuse(r) => r,
        _ => &[],
    };
    let installed: Vec<i64> = published
        .iter()
        .filter(|(_, m)| !refused.contains(&m.algorithm))
        .map(|(s, _)| i64::from(*s))
        .collect();
    let failed: Vec<String> = published
        .iter()
        .filter(|(_, m)| refused.contains(&m.algorithm))
        .map(|(s, m)| format!("SPI {s} uses {}", algorithm_name(m.algorithm)))
        .collect();
    let previous = ne
        .status
        .as_ref()
        .and_then(|s| s.ipsec.as_ref())
        .filter(|i| i.policy.as_deref() == Some(name.as_str()));
    let active_spi = if installed.contains(&i64::from(active)) {
        Some(i64::from(active))
    } else {
        previous.and_then(|p| p.active_spi)
    };
    let condition = if failed.is_empty() {
        (Status::True, "Applied".to_owned(), String::new())
    } else {
        (
            Status::False,
            "AlgorithmUnavailable".to_owned(),
            format!("the kernel lacks the algorithm: {}", failed.join(", ")),
        )
    };
    Some((
        Some(IPsecNodeStatus {
            installed_spis: installed,
            active_spi,
            policy: Some(name),
            peers: Some(i64::try_from(peers).unwrap_or(0)),
        }),
        Some(condition),
    ))
}

/// One pass of every stand-in agent; all changed enrollments are written concurrently.
/// Returns how many status writes it made.
pub async fn agents_pass(
    agent: &Client,
    behaviours: &BTreeMap<String, Behaviour>,
) -> Result<usize, kube::Error> {
    let policies = Api::<IPsecPolicy>::all(agent.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let secret = Api::<Secret>::namespaced(agent.clone(), NAMESPACE)
        .get_opt(IPSEC_KEY_SECRET)
        .await?;
    let labels: BTreeMap<String, BTreeMap<String, String>> = Api::<Node>::all(agent.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    let ne_api: Api<NodeEnrollment> = Api::all(agent.clone());
    let enrollments = ne_api.list(&ListParams::default()).await?.items;
    let data = secret.as_ref().and_then(|s| s.data.as_ref());
    let mut writes = Vec::new();
    for ne in &enrollments {
        let node = ne.spec.node_name.clone();
        let behaviour = behaviours.get(&node).cloned().unwrap_or_default();
        if behaviour == Behaviour::Withhold || ne.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(own) = labels.get(&node) else {
            continue;
        };
        let policy = contract::policy_for_node(&policies, own);
        let peers = policy.map_or(0, |p| {
            labels
                .values()
                .filter(|l| {
                    contract::policy_for_node(&policies, l).map(|q| q.name_any())
                        == Some(p.name_any())
                })
                .count()
                .saturating_sub(1)
        });
        let Some((ipsec, condition)) = report(ne, policy, data, peers, &behaviour) else {
            continue;
        };
        let status = ne.status.clone().unwrap_or_default();
        let mut conds = status.conditions.clone();
        match &condition {
            Some((st, reason, message)) => {
                conditions::set_condition(&mut conds, IPSEC_READY, *st, reason, message, None);
            }
            None => conds.retain(|c| c.type_ != IPSEC_READY),
        }
        if status.ipsec == ipsec && status.conditions == conds {
            continue;
        }
        let patch = if let Some(i) = ipsec {
            Patch::Apply(json!({
                "apiVersion": "meshlet.io/v1alpha1",
                "kind": "NodeEnrollment",
                "metadata": {"name": ne.name_any()},
                "status": {"ipsec": i, "conditions": conds},
            }))
        } else {
            // No policy selects the node: drop status.ipsec and the condition. (A merge patch:
            // the API test server leaves an empty list element behind when an apply gives up
            // the last condition a manager owned.)
            Patch::Merge(json!({"status": {"ipsec": null, "conditions": conds}}))
        };
        writes.push((ne.name_any(), patch));
    }
    let n = writes.len();
    for chunk in writes.chunks(64) {
        let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
        let merge = PatchParams::default();
        let results = futures::future::join_all(chunk.iter().map(|(name, patch)| {
            let params = if matches!(patch, Patch::Apply(_)) {
                &params
            } else {
                &merge
            };
            ne_api.patch_status(name, params, patch)
        }))
        .await;
        for r in results {
            r?;
        }
    }
    Ok(n)
}

/// Everything the operator logs in this test process (set up once, at debug level).
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("meshlet_operator=trace,kube=debug,info")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The textual forms a leaked secret byte string could take: raw, hex, base64.
pub fn leak_forms(bytes: &[u8]) -> Vec<String> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut b64 = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            b64.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    // The first 16 base64 characters (12 bytes) are plenty to recognise a leak.
    let mut out = vec![hex, b64.chars().take(16).collect()];
    if let Ok(raw) = std::str::from_utf8(bytes) {
        out.push(raw.to_owned());
    }
    out.retain(|f| f.len() >= 8);
    out
}
