//! The DaemonSet and Deployment controllers of the local cluster.
//!
//! ```text
//!  watch DaemonSets, Deployments, Nodes, Pods ──► reconcile_all (list everything)
//!     DaemonSet:  nodes matching spec.template.spec.nodeSelector
//!                   no pod on a node        → create one from the template as it is now
//!                   pod on a node not wanted → delete it
//!                   template changed         → nothing (OnDelete; RollingUpdate is simulated
//!                                              as OnDelete and logged)
//!     Deployment: spec.replicas pods, round-robin over the nodes; old-template pods are
//!                 replaced (Recreate semantics)
//!     both:       status (counts, observedGeneration) through the status subresource
//! ```
//!
//! Pods are owned directly by their DaemonSet or Deployment (no ReplicaSets); template
//! revisions are a hash of the template (`controller-revision-hash`, `pod-template-hash`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::Shared;

/// Label carrying a DaemonSet pod's template revision.
pub const DAEMONSET_REVISION_LABEL: &str = "controller-revision-hash";
/// Label carrying a Deployment pod's template revision.
pub const DEPLOYMENT_REVISION_LABEL: &str = "pod-template-hash";

static NAME_SEQ: AtomicU64 = AtomicU64::new(0);

/// Runs both controllers until the cluster stops.
pub(crate) async fn run(shared: Arc<Shared>) {
    let notify = Arc::new(Notify::new());
    let mut stop = shared.stop.subscribe();
    let c = shared.client.clone();
    let watches = vec![
        spawn_watch(Api::<DaemonSet>::all(c.clone()), notify.clone()),
        spawn_watch(Api::<Deployment>::all(c.clone()), notify.clone()),
        spawn_watch(Api::<Node>::all(c.clone()), notify.clone()),
        spawn_watch(Api::<Pod>::all(c), notify.clone()),
    ];
    let mut warned = HashSet::new();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Err(e) = reconcile_all(&shared, &mut warned).await {
            tracing::warn!(error = %e, "controllers: reconcile failed; retrying");
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in watches {
        w.abort();
    }
}

fn spawn_watch<K>(api: Api<K>, notify: Arc<Notify>) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = events.next().await {
            if ev.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            notify.notify_one();
        }
    })
}

/// Everything one pass looks at.
struct World {
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

async fn reconcile_all(
    shared: &Arc<Shared>,
    warned: &mut HashSet<String>,
) -> Result<(), kube::Error> {
    let c = shared.client.clone();
    let lp = ListParams::default();
    let world = World {
        nodes: Api::<Node>::all(c.clone()).list(&lp).await?.items,
        pods: Api::<Pod>::all(c.clone()).list(&lp).await?.items,
    };
    for ds in Api::<DaemonSet>::all(c.clone()).list(&lp).await?.items {
        if ds.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let strategy = ds
            .spec
            .update_strategy
            .as_ref()
            .and_then(|u| u.type_.clone())
            .unwrap_or_else(|| "RollingUpdate".into());
        let key = format!(
            "{}/{}",
            ds.metadata.namespace.as_deref().unwrap_or_default(),
            ds.metadata.name.as_deref().unwrap_or_default()
        );
        if strategy != "OnDelete" && warned.insert(key.clone()) {
            tracing::warn!(daemonset = %key, strategy = %strategy,
                "the local cluster simulates this update strategy as OnDelete: pods are replaced only when deleted");
        }
        if let Err(e) = reconcile_daemonset(shared, &world, &ds).await {
            tracing::warn!(daemonset = %key, error = %e, "daemonset reconcile failed");
        }
    }
    for d in Api::<Deployment>::all(c).list(&lp).await?.items {
        if d.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if let Err(e) = reconcile_deployment(shared, &world, &d).await {
            tracing::warn!(deployment = ?d.metadata.name, error = %e, "deployment reconcile failed");
        }
    }
    Ok(())
}

/// A stable hash of a pod template (its JSON, keys sorted).
pub fn template_hash(template: &Value) -> String {
    let mut h = DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

fn suffix() -> String {
    let mut h = DefaultHasher::new();
    std::time::SystemTime::now().hash(&mut h);
    NAME_SEQ.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    std::process::id().hash(&mut h);
    let mut x = h.finish();
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn owned_by<'a>(pods: &'a [Pod], uid: &str) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .collect()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn label(p: &Pod, key: &str) -> Option<String> {
    p.metadata.labels.as_ref()?.get(key).cloned()
}

/// The pod a controller creates from `template` (as JSON), bound to `node` when given.
fn pod_from_template(
    template: &Value,
    namespace: &str,
    name: &str,
    owner: Value,
    extra_labels: &BTreeMap<String, String>,
    node: Option<&str>,
) -> Value {
    let mut labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}));
    for (k, v) in extra_labels {
        labels[k] = json!(v);
    }
    let mut spec = template.get("spec").cloned().unwrap_or_else(|| json!({}));
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "labels": labels,
            "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or_else(|| json!({})),
            "ownerReferences": [owner],
        },
        "spec": spec,
    })
}

async fn create_pod(api: &Api<Pod>, pod: Value) -> Result<(), kube::Error> {
    let pod: Pod = serde_json::from_value(pod).map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &pod).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn delete_pod(api: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn patch_status_if_changed<K>(
    api: &Api<K>,
    name: &str,
    current: Option<Value>,
    desired: Value,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let unchanged = current.as_ref().is_some_and(|cur| {
        desired
            .as_object()
            .is_some_and(|d| d.iter().all(|(k, v)| cur.get(k) == Some(v)))
    });
    if unchanged {
        return Ok(());
    }
    match api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": desired })),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `node` matches a pod template's `nodeSelector` (tolerations are ignored).
fn selects(template: &Value, node: &Node) -> bool {
    let Some(sel) = template
        .pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
    else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    sel.iter()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

async fn reconcile_daemonset(
    shared: &Arc<Shared>,
    world: &World,
    ds: &DaemonSet,
) -> Result<(), kube::Error> {
    let ns = ds.metadata.namespace.clone().unwrap_or_default();
    let name = ds.metadata.name.clone().unwrap_or_default();
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let template = serde_json::to_value(&ds.spec.template).map_err(kube::Error::SerdeError)?;
    let hash = template_hash(&template);
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let owner = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true});
    let wanted: BTreeSet<String> = world
        .nodes
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none() && selects(&template, n))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let mine = owned_by(&world.pods, &uid);
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in &mine {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        by_node.entry(node).or_default().push(p);
    }
    for (node, pods) in &by_node {
        let keep = usize::from(wanted.contains(node));
        for p in pods.iter().skip(keep) {
            let pn = p.metadata.name.clone().unwrap_or_default();
            tracing::info!(daemonset = %name, pod = %pn, node = %node, "deleting a pod not wanted on this node");
            delete_pod(&api, &pn).await?;
        }
    }
    let mut extra = BTreeMap::new();
    extra.insert(DAEMONSET_REVISION_LABEL.to_string(), hash.clone());
    extra.insert(
        "pod-template-generation".to_string(),
        ds.metadata.generation.unwrap_or(1).to_string(),
    );
    for node in &wanted {
        if by_node.get(node).is_some_and(|p| !p.is_empty()) {
            continue;
        }
        let pod_name = format!("{name}-{}", suffix());
        tracing::info!(daemonset = %name, pod = %pod_name, node = %node, "creating pod from the current template");
        create_pod(
            &api,
            pod_from_template(&template, &ns, &pod_name, owner.clone(), &extra, Some(node)),
        )
        .await?;
    }
    let scheduled: Vec<&&Pod> = mine
        .iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| wanted.contains(n))
        })
        .collect();
    let ready = scheduled.iter().filter(|p| is_ready(p)).count();
    let updated = scheduled
        .iter()
        .filter(|p| label(p, DAEMONSET_REVISION_LABEL).as_deref() == Some(hash.as_str()))
        .count();
    let current_scheduled = scheduled
        .iter()
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect::<BTreeSet<_>>()
        .len();
    let desired = json!({
        "desiredNumberScheduled": wanted.len(),
        "currentNumberScheduled": current_scheduled,
        "numberMisscheduled": 0,
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": ready,
        "numberUnavailable": wanted.len().saturating_sub(ready),
        "observedGeneration": ds.metadata.generation.unwrap_or(1),
    });
    let current = ds
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok());
    let ds_api: Api<DaemonSet> = Api::namespaced(shared.client.clone(), &ns);
    patch_status_if_changed(&ds_api, &name, current, desired).await
}

async fn reconcile_deployment(
    shared: &Arc<Shared>,
    world: &World,
    d: &Deployment,
) -> Result<(), kube::Error> {
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let spec = d.spec.clone();
    let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
    let template = serde_json::to_value(&spec.template).map_err(kube::Error::SerdeError)?;
    let hash = template_hash(&template);
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let owner = json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true});
    let nodes: Vec<String> = world
        .nodes
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none() && node_ready(n))
        .filter(|n| selects(&template, n))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let mine = owned_by(&world.pods, &uid);
    // Pods of an older template, or bound to a node that is gone, are replaced.
    let (current, stale): (Vec<&Pod>, Vec<&Pod>) = mine.iter().partition(|p| {
        label(p, DEPLOYMENT_REVISION_LABEL).as_deref() == Some(hash.as_str())
            && p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| nodes.contains(n))
    });
    for p in &stale {
        delete_pod(&api, p.metadata.name.as_deref().unwrap_or_default()).await?;
    }
    for p in current.iter().skip(replicas) {
        delete_pod(&api, p.metadata.name.as_deref().unwrap_or_default()).await?;
    }
    let mut per_node: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for p in current.iter().take(replicas) {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.as_deref())
            && let Some(c) = per_node.get_mut(n)
        {
            *c += 1;
        }
    }
    let mut extra = BTreeMap::new();
    extra.insert(DEPLOYMENT_REVISION_LABEL.to_string(), hash.clone());
    if !nodes.is_empty() {
        for _ in current.len()..replicas {
            let Some((&node, _)) = per_node.iter().min_by_key(|(n, c)| (**c, *n)) else {
                break;
            };
            if let Some(c) = per_node.get_mut(node) {
                *c += 1;
            }
            let pod_name = format!("{name}-{hash}-{}", suffix());
            tracing::info!(deployment = %name, pod = %pod_name, node = %node, "creating pod");
            create_pod(
                &api,
                pod_from_template(&template, &ns, &pod_name, owner.clone(), &extra, Some(node)),
            )
            .await?;
        }
    }
    let kept: Vec<&&Pod> = current.iter().take(replicas).collect();
    let ready = kept.iter().filter(|p| is_ready(p)).count();
    let now = crate::kubelet::now();
    let available = ready >= replicas;
    let status_json = d.status.as_ref().and_then(|s| serde_json::to_value(s).ok());
    let prev_available = status_json
        .as_ref()
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Available"))
        .map(|c| (c["status"] == "True", c["lastTransitionTime"].clone()));
    let transition = match prev_available {
        Some((was, t)) if was == available && t.is_string() => t,
        _ => json!(now),
    };
    let desired = json!({
        "replicas": kept.len(),
        "updatedReplicas": kept.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": replicas.saturating_sub(ready),
        "observedGeneration": d.metadata.generation.unwrap_or(1),
        "conditions": [{"type": "Available", "status": if available { "True" } else { "False" },
            "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
            "message": format!("{ready} of {replicas} replicas ready"),
            "lastUpdateTime": transition, "lastTransitionTime": transition}],
    });
    let current_status = status_json;
    let d_api: Api<Deployment> = Api::namespaced(shared.client.clone(), &ns);
    patch_status_if_changed(&d_api, &name, current_status, desired).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[(&str, &str)]) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n", "labels":
            labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()}}))
        .expect("node")
    }

    #[test]
    fn node_selector_matches_on_every_label() {
        let t = json!({"spec": {"nodeSelector": {"a": "1", "b": "2"}}});
        assert!(selects(&t, &node(&[("a", "1"), ("b", "2"), ("c", "3")])));
        assert!(!selects(&t, &node(&[("a", "1")])));
        assert!(selects(&json!({"spec": {}}), &node(&[])));
    }

    #[test]
    fn template_hash_changes_with_the_template_only() {
        let a = json!({"spec": {"containers": [{"image": "x:1"}]}});
        let b = json!({"spec": {"containers": [{"image": "x:2"}]}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
    }
}
