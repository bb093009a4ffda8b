//! The agent finds the node's cgroup2 root and bpffs as it does in its DaemonSet pod: in a
//! private mount and cgroup namespace where `/sys/fs/cgroup`-style mounts show only the
//! container's own cgroup unless the host's is bind-mounted, and where bpffs may be missing.
//! Everything runs under `unshare`, so no mount outlives the test. Needs root, bpffs,
//! cgroup v2 and util-linux (`unshare`, `findmnt`).

mod agent_support;

use std::path::Path;
use std::process::{Command, Output};

use agent_support::{AGENT, AgentEnv};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `script` with `sh` in a new mount namespace (nothing propagates back to the host).
fn in_private_mounts(script: &str, args: &[&Path]) -> Output {
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            script,
            "sh",
        ])
        .args(args)
        .output()
        .expect("run unshare")
}

#[test]
fn mount_bpffs_mounts_a_bpffs_once_and_then_leaves_it_alone() {
    agent_support::require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("bpf");
    let out = in_private_mounts(
        r#"
        "$1" mount-bpffs --path "$2"
        stat -f -c 'type=%T' "$2"
        "$1" mount-bpffs --path "$2"
        echo "mounts=$(findmnt -n -t bpf -o TARGET | grep -cx "$2")"
        "#,
        &[Path::new(AGENT), &target],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("mounted bpffs at {}", target.display())),
        "{t}"
    );
    assert!(t.contains("type=bpf_fs"), "the path is no bpffs: {t}");
    assert!(
        t.contains(&format!("{} is already on a bpffs", target.display())),
        "{t}"
    );
    assert!(t.contains("mounts=1"), "mounted twice: {t}");
    assert_ne!(
        meshlet_agent::bpffs::filesystem_magic(&target).expect("statfs"),
        meshlet_agent::bpffs::BPF_FS_MAGIC,
        "the mount leaked out of the test's namespace"
    );
}

#[test]
fn an_agent_refuses_to_pin_outside_a_bpffs_naming_the_directory() {
    let env = AgentEnv::new("no-bpffs");
    let root = env.dir.path().join("pins").join("meshlet");
    let out = Command::new(AGENT)
        .arg("run")
        .arg("--bpffs-root")
        .arg(&root)
        .arg("--cgroup")
        .arg(&env.cgroup)
        .arg("--lock-file")
        .arg(env.dir.path().join("agent.lock"))
        .arg("--admin-socket")
        .arg(env.dir.path().join("agent.sock"))
        .output()
        .expect("run the agent");
    let t = text(&out);
    assert!(!out.status.success(), "the agent pinned into a tmpfs: {t}");
    assert!(
        t.contains("is not on a bpffs") && t.contains(&env.dir.path().display().to_string()),
        "{t}"
    );
    assert!(t.contains("meshlet-agent mount-bpffs"), "{t}");
    assert!(
        !root.exists(),
        "the refused agent created {}",
        root.display()
    );
}

/// Moves the shell into `ctr` (below the test cgroup, the "node"), then starts a new cgroup
/// namespace rooted there, as a container runtime does, and mounts cgroup2 as the
/// container's own view. With `bind`, the node cgroup is first bind-mounted at `$3` (a path
/// with spaces, escaped in mountinfo), the way a hostPath volume of /sys/fs/cgroup shows up
/// in a pod; the host's own cgroup2 mounts are then unmounted from the namespace.
const CONTAINER: &str = r#"
    agent="$1"; node="$2"; hostcg="$3"; mode="$4"; bpffs_root="$5"
    mkdir -p "$node/ctr" "$hostcg" "$hostcg-own"
    echo $$ > "$node/ctr/cgroup.procs"
    exec unshare --cgroup --mount --propagation private sh -ec '
        agent="$1"; node="$2"; hostcg="$3"; mode="$4"; bpffs_root="$5"
        host_mounts=$(findmnt -n -l -t cgroup2 -o TARGET)
        if [ "$mode" = bind ]; then mount --bind "$node" "$hostcg"; fi
        for m in $host_mounts; do umount -l "$m"; done
        mount -t cgroup2 cgroup2 "$hostcg-own"
        exec "$agent" preflight --bpffs-root "$bpffs_root"
    ' sh "$agent" "$node" "$hostcg" "$mode" "$bpffs_root"
"#;

fn preflight_in_a_container(env: &AgentEnv, bind_host: bool) -> Output {
    let hostcg = env.dir.path().join("host sys fs cgroup");
    let mode = Path::new(if bind_host { "bind" } else { "none" });
    let out = in_private_mounts(
        CONTAINER,
        &[
            Path::new(AGENT),
            &env.cgroup,
            &hostcg,
            mode,
            &env.bpffs_root,
        ],
    );
    // The shell has left the cgroup; the fixture removes it with the test cgroup.
    let _ = std::fs::remove_dir(env.cgroup.join("ctr"));
    out
}

#[test]
fn in_a_cgroup_namespace_the_agent_attaches_through_the_bind_of_the_host_cgroup() {
    let env = AgentEnv::new("cgroupns-bind");
    let out = preflight_in_a_container(&env, true);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let hostcg = env.dir.path().join("host sys fs cgroup");
    assert!(
        t.contains(&format!("cgroup={}", hostcg.display())),
        "the agent did not choose the bind (a path with spaces, escaped in mountinfo): {t}"
    );
    assert!(
        t.contains("chosen_by=\"mountinfo\"") || t.contains("chosen_by=mountinfo"),
        "{t}"
    );
    assert!(t.contains("fresh:"), "{t}");
}

#[test]
fn in_a_cgroup_namespace_without_the_host_cgroup_the_agent_says_what_to_mount() {
    let env = AgentEnv::new("cgroupns-own");
    let out = preflight_in_a_container(&env, false);
    let t = text(&out);
    assert!(
        !out.status.success(),
        "preflight accepted its own cgroup: {t}"
    );
    assert!(
        t.contains("no cgroup2 mount of the node's hierarchy; mount the host's /sys/fs/cgroup"),
        "{t}"
    );
}
