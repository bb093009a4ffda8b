//! The kubelet honours the pod spec as a real kubelet + containerd do: hostPath types,
//! read-only roots, runAsNonRoot, capabilities, mount propagation, cgroup namespaces, and the
//! failures a user sees in `kubectl get pods`.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use meshlet_local_cluster::images::BUSYBOX_IMAGE;
use meshlet_local_cluster::{ClusterOptions, LocalCluster};
use serde_json::{Value, json};
use support::*;

const NS: &str = "default";

async fn create(cluster: &LocalCluster, name: &str, spec: Value) {
    let api: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let mut spec = spec;
    spec["nodeName"] = json!("node-1");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS}, "spec": spec}))
    .expect("pod");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
}

async fn status(cluster: &LocalCluster, name: &str) -> Option<Value> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), NS);
    serde_json::to_value(api.get(name).await.ok()?.status?).ok()
}

/// The log of `name`'s container `c` once it contains `marker`.
async fn log_with(cluster: &LocalCluster, name: &str, c: &str, marker: &str) -> String {
    eventually(
        &format!("{marker:?} in the log of {name}"),
        Duration::from_secs(60),
        || async {
            let log = container_log(cluster, "node-1", NS, name, c);
            log.contains(marker).then_some(log)
        },
    )
    .await
}

/// A shell container running `script`.
fn sh(script: &str) -> Value {
    json!({"name": "c", "image": BUSYBOX_IMAGE, "command": ["/bin/sh", "-c", script]})
}

/// The effective capability mask of a process.
fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_enforces_host_path_types_read_only_roots_non_root_and_capabilities() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .expect("start cluster");
    let sleeper = sh("exec sleep 1000");

    // A hostPath of type Directory that is missing: the pod never starts, with the reason.
    let mut missing = sleeper.clone();
    missing["volumeMounts"] = json!([{"name": "v", "mountPath": "/v"}]);
    create(
        &cluster,
        "missing-dir",
        json!({"containers": [missing],
               "volumes": [{"name": "v", "hostPath": {"path": "/no/such/dir", "type": "Directory"}}]}),
    )
    .await;
    // readOnlyRootFilesystem: writes to the root fail, an emptyDir stays writable.
    let probe = "if touch /probe 2>/dev/null; then echo root=writable; else echo root=read-only; fi; \
                 if touch /scratch/probe; then echo scratch=writable; fi; echo done; exec sleep 1000";
    let mut ro = sh(probe);
    ro["securityContext"] = json!({"readOnlyRootFilesystem": true});
    ro["volumeMounts"] = json!([{"name": "scratch", "mountPath": "/scratch"}]);
    create(
        &cluster,
        "read-only",
        json!({"containers": [ro], "volumes": [{"name": "scratch", "emptyDir": {}}]}),
    )
    .await;
    let mut rw = sh(probe);
    rw["volumeMounts"] = json!([{"name": "scratch", "mountPath": "/scratch"}]);
    create(
        &cluster,
        "read-write",
        json!({"containers": [rw], "volumes": [{"name": "scratch", "emptyDir": {}}]}),
    )
    .await;
    // runAsNonRoot with an image that runs as root is refused.
    let mut nonroot = sleeper.clone();
    nonroot["securityContext"] = json!({"runAsNonRoot": true});
    create(&cluster, "non-root", json!({"containers": [nonroot]})).await;
    // Capabilities: the default set, and the same with NET_RAW dropped.
    create(
        &cluster,
        "caps-default",
        json!({"containers": [sleeper.clone()]}),
    )
    .await;
    let mut dropped = sleeper.clone();
    dropped["securityContext"] = json!({"capabilities": {"drop": ["NET_RAW"]}});
    create(&cluster, "caps-dropped", json!({"containers": [dropped]})).await;
    // The container's own cgroup namespace, with cgroup2 mounted at /sys/fs/cgroup.
    create(
        &cluster,
        "cgroupns",
        json!({"containers": [sh("cat /proc/self/cgroup; grep ' /sys/fs/cgroup ' /proc/self/mounts; \
                                  echo done; exec sleep 1000")]}),
    )
    .await;

    let s = eventually(
        "missing-dir reports the failed mount",
        Duration::from_secs(30),
        || async {
            let s = status(&cluster, "missing-dir").await?;
            let msg = s
                .pointer("/containerStatuses/0/state/waiting/message")?
                .as_str()?;
            msg.contains("hostPath type check failed").then_some(s)
        },
    )
    .await;
    assert_eq!(s["phase"], "Pending", "{s:#}");
    let msg = s["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("/no/such/dir is not a directory"), "{msg}");
    let (_, events, _) = kubectl(&cluster, &["get", "events", "-o", "yaml"]).await;
    assert!(
        events.contains("reason: FailedMount") && events.contains("name: missing-dir"),
        "a FailedMount event on the pod: {events}"
    );

    let log = log_with(&cluster, "read-only", "c", "done").await;
    assert!(
        log.contains("root=read-only") && log.contains("scratch=writable"),
        "{log}"
    );
    let log = log_with(&cluster, "read-write", "c", "done").await;
    assert!(
        log.contains("root=writable") && log.contains("scratch=writable"),
        "{log}"
    );

    let s = eventually("non-root refused", Duration::from_secs(30), || async {
        let s = status(&cluster, "non-root").await?;
        (s.pointer("/containerStatuses/0/state/waiting/reason")? == "CreateContainerConfigError")
            .then_some(s)
    })
    .await;
    let msg = s["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        msg.contains("runAsNonRoot and image will run as root"),
        "{msg}"
    );
    assert_eq!(cluster.pod_pid(NS, "non-root", "c"), None, "never started");

    const CAP_NET_RAW: u64 = 1 << 13;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let default_pid = eventually("caps-default running", Duration::from_secs(30), || async {
        cluster.pod_pid(NS, "caps-default", "c")
    })
    .await;
    let dropped_pid = eventually("caps-dropped running", Duration::from_secs(30), || async {
        cluster.pod_pid(NS, "caps-dropped", "c")
    })
    .await;
    assert_ne!(
        cap_eff(default_pid) & CAP_NET_RAW,
        0,
        "NET_RAW is in the default set"
    );
    assert_eq!(cap_eff(default_pid) & CAP_SYS_ADMIN, 0, "SYS_ADMIN is not");
    assert_eq!(
        cap_eff(dropped_pid) & CAP_NET_RAW,
        0,
        "a dropped capability is absent"
    );

    let log = log_with(&cluster, "cgroupns", "c", "done").await;
    assert!(
        log.lines().any(|l| l == "0::/"),
        "the container sees itself at the root of its cgroup namespace: {log}"
    );
    assert!(log.contains("cgroup2"), "cgroup2 at /sys/fs/cgroup: {log}");
    let pid = eventually(
        "cgroupns: the container's pid",
        Duration::from_secs(10),
        || async { cluster.pod_pid(NS, "cgroupns", "c") },
    )
    .await;
    let host_view = cgroup_of(pid);
    assert!(
        host_view.contains("/node-1/kubepods/pod"),
        "from the host it sits under node-1's pods: {host_view}"
    );
    let own = std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).expect("ns");
    let host = std::fs::read_link("/proc/self/ns/cgroup").expect("ns");
    assert_ne!(own, host, "a cgroup namespace of its own");
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_container_backs_off_and_leaves_other_pods_alone() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .expect("start cluster");
    create(
        &cluster,
        "steady",
        json!({"containers": [sh("exec sleep 1000")]}),
    )
    .await;
    let steady = eventually("steady running", Duration::from_secs(30), || async {
        cluster.pod_pid(NS, "steady", "c")
    })
    .await;
    create(
        &cluster,
        "crasher",
        json!({"containers": [sh("echo crashing; exit 1")]}),
    )
    .await;
    let s = eventually(
        "CrashLoopBackOff after 3 restarts",
        Duration::from_secs(60),
        || async {
            let s = status(&cluster, "crasher").await?;
            (s.pointer("/containerStatuses/0/restartCount")?.as_i64()? >= 3
                && s.pointer("/containerStatuses/0/state/waiting/reason")? == "CrashLoopBackOff")
                .then_some(s)
        },
    )
    .await;
    let msg = s["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.starts_with("back-off "), "{msg}");
    assert_eq!(
        s["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        1
    );
    eventually(
        "kubectl shows CrashLoopBackOff",
        Duration::from_secs(30),
        || async {
            let (_, out, _) = kubectl(
                &cluster,
                &[
                    "get",
                    "pod",
                    "crasher",
                    "-o",
                    "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
                ],
            )
            .await;
            (out == "CrashLoopBackOff").then_some(())
        },
    )
    .await;
    assert_eq!(
        cluster.pod_pid(NS, "steady", "c"),
        Some(steady),
        "the other pod is untouched"
    );
    let st = status(&cluster, "steady").await.expect("status");
    assert_eq!(st["containerStatuses"][0]["restartCount"], 0);
    cluster.shutdown().await.expect("shutdown");
}

/// A privileged pod that mounts a bpffs at /mnt, which is the node's `/var/lib/pin-test`
/// mounted with `propagation`.
fn bpffs_pod(propagation: Option<&str>) -> Value {
    let mut mount = json!({"name": "pins", "mountPath": "/mnt"});
    if let Some(p) = propagation {
        mount["mountPropagation"] = json!(p);
    }
    let mut c = sh("mount -t bpf bpf /mnt && echo mounted; exec sleep 1000");
    c["securityContext"] = json!({"privileged": true});
    c["volumeMounts"] = json!([mount]);
    json!({
        "containers": [c],
        "volumes": [{"name": "pins", "hostPath": {"path": "/var/lib/pin-test", "type": "DirectoryOrCreate"}}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_under_a_bidirectional_bpffs_mount_survive_the_container_and_private_ones_do_not() {
    require_root();
    let cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .expect("start cluster");
    let node = cluster.node("node-1").expect("node");
    let on_node = node.host_path("/var/lib/pin-test/counters");
    let api: Api<Pod> = Api::namespaced(cluster.client(), NS);

    for (name, propagation, survives) in [
        ("private", None, false),
        ("bidirectional", Some("Bidirectional"), true),
    ] {
        create(&cluster, name, bpffs_pod(propagation)).await;
        log_with(&cluster, name, "c", "mounted").await;
        let pid = eventually(
            &format!("{name}: the container's pid"),
            Duration::from_secs(10),
            || async { cluster.pod_pid(NS, name, "c") },
        )
        .await;
        // Pin a real map into the container's bpffs, through the container's own root.
        let pin = format!("/proc/{pid}/root/mnt/counters");
        let out = std::process::Command::new("bpftool")
            .args([
                "map", "create", &pin, "type", "array", "key", "4", "value", "8", "entries", "1",
                "name", "counters",
            ])
            .output()
            .expect("run bpftool (apt-get install bpftool)");
        assert!(
            out.status.success(),
            "bpftool map create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::path::Path::new(&pin).exists(),
            "{name}: pinned in the container"
        );
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
        eventually(
            &format!("{name}: container gone"),
            Duration::from_secs(30),
            || async { (!alive(pid)).then_some(()) },
        )
        .await;
        if survives {
            assert!(
                on_node.exists(),
                "{name}: the pin survives on the node at {}",
                on_node.display()
            );
            let out = std::process::Command::new("bpftool")
                .args(["map", "show", "pinned", &on_node.display().to_string()])
                .output()
                .expect("bpftool");
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("counters"),
                "{name}: the node's pin is the map: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            assert!(
                !on_node.exists(),
                "{name}: without propagation the pin dies with the container"
            );
        }
    }
    cluster.shutdown().await.expect("shutdown");
}
