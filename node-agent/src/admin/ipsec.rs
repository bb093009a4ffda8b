//! `meshletctl ipsec rotate|status`: talks to the API server (KUBECONFIG or in-cluster), not to
//! the local agent.
//!
//! ```text
//!  rotate [POLICY] ─► list IPsecPolicies ─► pick (pure) ─► merge patch
//!                     metadata.annotations["meshlet.io/rotate"] = now (RFC 3339) ─► operator
//!  status [NODE]   ─► get/list NodeEnrollments ─► status.ipsec + IPsecReady per node
//! ```

use clap::Subcommand;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use meshlet_crds::conditions::{IPSEC_READY, find_condition};
use meshlet_crds::names::ROTATE_ANNOTATION;
use meshlet_crds::v1alpha1::{IPsecPolicy, NodeEnrollment};

/// `meshletctl ipsec` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum IpsecCommand {
    /// Ask the operator for a key rotation of POLICY now (sets the `meshlet.io/rotate`
    /// annotation). Without POLICY: the only IPsecPolicy, if there is exactly one.
    Rotate {
        /// IPsecPolicy name.
        policy: Option<String>,
    },
    /// IPsec status of NODE's NodeEnrollment (all nodes when omitted).
    Status {
        /// Node name.
        node: Option<String>,
    },
}

/// The policy to rotate (pure): the one asked for if it exists, else the only one.
pub fn pick_policy(requested: Option<&str>, existing: &[String]) -> Result<String, String> {
    let list = || {
        if existing.is_empty() {
            "none exist".to_string()
        } else {
            format!("existing: {}", existing.join(", "))
        }
    };
    match requested {
        Some(p) if existing.iter().any(|e| e == p) => Ok(p.to_string()),
        Some(p) => Err(format!("IPsecPolicy {p:?} not found ({})", list())),
        None if existing.len() == 1 => Ok(existing[0].clone()),
        None => Err(format!(
            "name the IPsecPolicy to rotate: `meshletctl ipsec rotate POLICY` ({})",
            list()
        )),
    }
}

async fn client() -> Result<Client, String> {
    Client::try_default().await.map_err(|e| {
        format!("failed to configure the Kubernetes client (KUBECONFIG or in-cluster): {e}")
    })
}

/// Run an `ipsec` subcommand; prints what it did.
pub async fn run(cmd: IpsecCommand, json: bool) -> Result<(), String> {
    let client = client().await?;
    match cmd {
        IpsecCommand::Rotate { policy } => rotate(client, policy.as_deref(), json).await,
        IpsecCommand::Status { node } => status(client, node.as_deref(), json).await,
    }
}

async fn rotate(client: Client, policy: Option<&str>, json: bool) -> Result<(), String> {
    let api = Api::<IPsecPolicy>::all(client);
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("failed to list IPsecPolicies: {e}"))?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let name = pick_policy(policy, &names)?;
    let value = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({ "metadata": { "annotations": { ROTATE_ANNOTATION: value } } });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("failed to annotate IPsecPolicy {name}: {e}"))?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "policy": name, "annotation": ROTATE_ANNOTATION, "value": value })
        );
    } else {
        println!(
            "IPsecPolicy {name}: key rotation requested ({ROTATE_ANNOTATION}={value}); the \
             operator rotates once the policy is Stable"
        );
    }
    Ok(())
}

async fn status(client: Client, node: Option<&str>, json: bool) -> Result<(), String> {
    let api = Api::<NodeEnrollment>::all(client);
    let items = match node {
        Some(n) => vec![
            api.get(n)
                .await
                .map_err(|e| format!("failed to read NodeEnrollment {n}: {e}"))?,
        ],
        None => {
            api.list(&ListParams::default())
                .await
                .map_err(|e| format!("failed to list NodeEnrollments: {e}"))?
                .items
        }
    };
    for ne in &items {
        let st = ne.status.as_ref();
        let ipsec = st.and_then(|s| s.ipsec.as_ref());
        let cond = st.and_then(|s| find_condition(&s.conditions, IPSEC_READY));
        if json {
            println!(
                "{}",
                serde_json::json!({ "node": ne.name_any(), "ipsec": ipsec, "condition": cond })
            );
            continue;
        }
        match (ipsec, cond) {
            (None, None) => println!("{}: no IPsec policy", ne.name_any()),
            _ => println!(
                "{}: policy {} installed {:?} active {} peers {} — IPsecReady {} {}: {}",
                ne.name_any(),
                ipsec.and_then(|i| i.policy.as_deref()).unwrap_or("-"),
                ipsec.map(|i| i.installed_spis.clone()).unwrap_or_default(),
                ipsec
                    .and_then(|i| i.active_spi)
                    .map_or_else(|| "-".to_string(), |a| a.to_string()),
                ipsec.and_then(|i| i.peers).unwrap_or(0),
                cond.map_or("-", |c| c.status.as_str()),
                cond.map_or("-", |c| c.reason.as_str()),
                cond.map_or("", |c| c.message.as_str()),
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_policy_is_picked_and_otherwise_the_choices_are_listed() {
        let one = vec!["mesh".to_string()];
        let two = vec!["a".to_string(), "b".to_string()];
        assert_eq!(pick_policy(None, &one).as_deref(), Ok("mesh"));
        assert_eq!(pick_policy(Some("b"), &two).as_deref(), Ok("b"));
        let err = pick_policy(None, &two).expect_err("two");
        assert!(err.contains("existing: a, b"), "{err}");
        let err = pick_policy(Some("c"), &two).expect_err("missing");
        assert!(err.contains("\"c\" not found (existing: a, b)"), "{err}");
        assert!(
            pick_policy(None, &[])
                .expect_err("none")
                .contains("none exist")
        );
    }
}
