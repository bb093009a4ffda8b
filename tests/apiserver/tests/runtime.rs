//! kube-rs clients and kube-runtime's `watcher`, `reflector` and `Controller` against the
//! test server, including recovery from `410 Gone` and RBAC-limited ServiceAccount clients.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use meshlet_crds::NodeEnrollment;
use meshlet_crds::v1alpha1::NodeEnrollmentSpec;
use meshlet_test_apiserver::{ServerOptions, TestApiServer};
use serde_json::json;

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .expect("configmap")
}

async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_creates_updates_and_deletes_in_order() {
    let s = support::server().await;
    let client = s.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    // Wait for the initial list to finish.
    loop {
        if let Some(watcher::Event::InitDone) = events.try_next().await.expect("watch") {
            break;
        }
    }
    api.create(&PostParams::default(), &cm("a", json!({})))
        .await
        .expect("create");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "w"}})),
    )
    .await
    .expect("patch");
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("event in time")
            .expect("watch ok")
            .expect("stream open");
        match ev {
            watcher::Event::Apply(o) => {
                seen.push(format!("apply {}", o.data.unwrap_or_default()["k"]))
            }
            watcher::Event::Delete(_) => seen.push("delete".to_string()),
            _ => {}
        }
    }
    assert_eq!(seen, ["apply v", "apply w", "delete"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_relists_after_410_gone_and_ends_with_exactly_the_current_objects() {
    let s = TestApiServer::start(ServerOptions {
        bookmark_interval: Duration::from_secs(600),
        ..ServerOptions::default()
    })
    .await
    .expect("start");
    let client = s.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for n in ["a", "b"] {
        api.create(&PostParams::default(), &cm(n, json!({})))
            .await
            .expect("create");
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()));
    let driver = tokio::spawn(stream.applied_objects().for_each(|_| async {}));
    reader.wait_until_ready().await.expect("store ready");
    eventually("two objects", || reader.len() == 2).await;

    // Writes elsewhere move the global resourceVersion past what the ConfigMap watch saw;
    // compacting then ending all watches forces the watcher to resume from a version the
    // server no longer has.
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"}})).expect("secret"),
        )
        .await
        .expect("create secret");
    s.compact();
    s.end_watches();
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    api.create(&PostParams::default(), &cm("c", json!({})))
        .await
        .expect("create c");

    eventually("a 410 Gone", || s.expired_watches() >= 1).await;
    eventually("the store to hold b and c", || {
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        names.sort();
        names == ["b", "c"]
    })
    .await;
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_as_the_agent_reconciles_every_enrollment_within_the_shipped_rbac() {
    let s = support::server().await;
    support::kubectl_ok(&s, &["apply", "-k", "manifests/"]);
    let admin = s.client().await.expect("admin client");
    let enrollments: Api<NodeEnrollment> = Api::all(admin);
    for i in 0..5 {
        let name = format!("node-{i}");
        let ne = NodeEnrollment::new(
            &name,
            NodeEnrollmentSpec {
                node_name: name.clone(),
                desired_version: None,
                drain: false,
            },
        );
        enrollments
            .create(&PostParams::default(), &ne)
            .await
            .expect("create enrollment");
    }

    let agent = s
        .client_for("meshlet-system", "meshlet-agent")
        .await
        .expect("agent client");
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), "meshlet-system");
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(
                status.message.contains("cannot list resource \"secrets\""),
                "{}",
                status.message
            );
        }
        other => panic!("the agent must not list secrets: {other:?}"),
    }

    struct Ctx {
        api: Api<NodeEnrollment>,
    }
    async fn reconcile(ne: Arc<NodeEnrollment>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        let name = ne.metadata.name.clone().unwrap_or_default();
        let status = json!({"status": {"agentVersion": "0.1.0", "observedGeneration": ne.metadata.generation}});
        ctx.api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<NodeEnrollment>, e: &kube::Error, _: Arc<Ctx>) -> Action {
        panic!("reconcile failed: {e}");
    }
    let api: Api<NodeEnrollment> = Api::all(agent);
    let ctx = Arc::new(Ctx { api: api.clone() });
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {}),
    );
    for _ in 0..100 {
        let list = enrollments
            .list(&ListParams::default())
            .await
            .expect("list");
        if list
            .items
            .iter()
            .all(|n| n.status.as_ref().and_then(|s| s.agent_version.as_deref()) == Some("0.1.0"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let list = enrollments
        .list(&ListParams::default())
        .await
        .expect("list");
    assert_eq!(list.items.len(), 5);
    for n in &list.items {
        assert_eq!(
            n.status.as_ref().and_then(|s| s.agent_version.as_deref()),
            Some("0.1.0"),
            "{:?}",
            n.metadata.name
        );
        assert_eq!(
            n.metadata.generation,
            Some(1),
            "status writes do not bump generation"
        );
    }
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_updates_conflict_and_pagination_returns_every_object_once() {
    let s = support::server().await;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await.expect("client"), "default");
    for i in 0..25 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        api.create(
            &PostParams::default(),
            &cm(&format!("cm-{i:02}"), json!({"tier": tier})),
        )
        .await
        .expect("create");
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(10);
    loop {
        let page = api.list(&lp).await.expect("page");
        names.extend(page.items.iter().filter_map(|o| o.metadata.name.clone()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(names.len(), 25);
    names.dedup();
    assert_eq!(names.len(), 25);
    let even = api
        .list(&ListParams::default().labels("tier=even"))
        .await
        .expect("labels");
    assert_eq!(even.items.len(), 13);
    let one = api
        .list(&ListParams::default().fields("metadata.name=cm-03"))
        .await
        .expect("fields");
    assert_eq!(one.items.len(), 1);

    let mut stale = api.get("cm-00").await.expect("get");
    api.patch(
        "cm-00",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "new"}})),
    )
    .await
    .expect("patch");
    stale.data = Some([("k".to_string(), "old".to_string())].into());
    match api.replace("cm-00", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"))
        }
        other => panic!("a stale update must conflict: {other:?}"),
    }
    assert_eq!(
        api.get("cm-00")
            .await
            .expect("get")
            .data
            .unwrap_or_default()["k"],
        "new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_owner_or_a_namespace_garbage_collects_what_it_contains() {
    let s = support::server().await;
    let client = s.client().await.expect("client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team"}})).expect("ns"),
        )
        .await
        .expect("create ns");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    let owner = api
        .create(&PostParams::default(), &cm("owner", json!({})))
        .await
        .expect("owner");
    let uid = owner.metadata.uid.clone().expect("uid");
    let mut dependent = cm("dependent", json!({}));
    dependent.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid, "controller": true}))
        .expect("ownerRef"),
    ]);
    api.create(&PostParams::default(), &dependent)
        .await
        .expect("dependent");
    api.delete("owner", &DeleteParams::default())
        .await
        .expect("delete owner");
    for _ in 0..100 {
        if api.get_opt("dependent").await.expect("get").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        api.get_opt("dependent").await.expect("get").is_none(),
        "dependent collected"
    );

    api.create(&PostParams::default(), &cm("leftover", json!({})))
        .await
        .expect("leftover");
    namespaces
        .delete("team", &DeleteParams::default())
        .await
        .expect("delete ns");
    for _ in 0..100 {
        if namespaces.get_opt("team").await.expect("get ns").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        namespaces.get_opt("team").await.expect("get ns").is_none(),
        "namespace removed"
    );
    assert!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_stops_working_when_its_service_account_is_deleted() {
    let s = support::server().await;
    let admin = s.client().await.expect("admin");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(admin, "default");
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "bot"}})).expect("sa"),
    )
    .await
    .expect("create sa");
    let bot: Api<ConfigMap> = Api::namespaced(
        s.client_for("default", "bot").await.expect("bot"),
        "default",
    );
    match bot.list(&ListParams::default()).await {
        Err(kube::Error::Api(st)) => assert_eq!(st.code, 403, "no RBAC yet: {}", st.message),
        other => panic!("expected 403: {other:?}"),
    }
    sas.delete("bot", &DeleteParams::default())
        .await
        .expect("delete sa");
    match bot.list(&ListParams::default()).await {
        Err(kube::Error::Api(st)) => assert_eq!(st.code, 401),
        other => panic!("expected 401: {other:?}"),
    }
}
