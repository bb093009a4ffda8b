//! PodSpec → OCI runtime spec, the way containerd's CRI plugin translates a container.
//!
//! ```text
//!  Pod + Container ─┬─ argv: command/args over the image's Entrypoint/Cmd, $(VAR) expanded
//!  image config ────┤  env: image ENV < KUBERNETES_SERVICE_* < container env (fieldRefs)
//!  prepared volumes ┤  user: runAsUser/runAsGroup (container over pod) else the image USER;
//!  node, netns ─────┘        runAsNonRoot refuses uid 0
//!                      caps: containerd's default set + add − drop ("ALL"); privileged: all
//!                      mounts: /proc /dev /sys, cgroup2 at /sys/fs/cgroup (own namespace),
//!                              volumeMounts (bind, propagation), /etc/hosts, /etc/hostname
//!                      namespaces: pid ipc uts mount cgroup, + network unless hostNetwork
//!                      cgroupsPath: <node cgroup>/kubepods/pod<uid>/<container id>
//! ```
//!
//! Pure: [`build`] takes plain values and returns the `config.json` value, so the
//! translation is unit-tested without root or runc. Deviations from containerd are listed in
//! the crate README (no seccomp or AppArmor profile, no resource limits).

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod, SecurityContext};
use meshlet_oci::ImageConfig;
use serde_json::{Value, json};

/// Capabilities containerd grants a container that asks for no change.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The kernel's capabilities up to CAP_CHECKPOINT_RESTORE, in bit order.
pub const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Paths containerd masks in an unprivileged container.
const MASKED_PATHS: [&str; 9] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
];
/// Paths containerd makes read-only in an unprivileged container.
const READONLY_PATHS: [&str; 6] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/scsi",
];

/// Why a container's configuration cannot be created (the kubelet reports
/// `CreateContainerConfigError` with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `runAsNonRoot` with a container that would run as uid 0.
    #[error(
        "container has runAsNonRoot and image will run as root (pod: {pod:?}, container: {container})"
    )]
    RunsAsRoot {
        /// `<name>_<namespace>(<uid>)`.
        pod: String,
        /// Container name.
        container: String,
    },
    /// `runAsNonRoot` with an image user that is a name, not a uid.
    #[error(
        "container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root (pod: {pod:?}, container: {container})"
    )]
    NonNumericUser {
        /// The image's USER.
        user: String,
        /// `<name>_<namespace>(<uid>)`.
        pod: String,
        /// Container name.
        container: String,
    },
    /// A volumeMount names no volume of the pod.
    #[error("container {container} mounts volume {volume:?}, which the pod does not define")]
    UnknownVolume {
        /// Container name.
        container: String,
        /// Volume name.
        volume: String,
    },
    /// `Bidirectional` propagation asked by an unprivileged container.
    #[error(
        "Bidirectional mount propagation is available only to privileged containers (container {container}, volume {volume:?})"
    )]
    BidirectionalUnprivileged {
        /// Container name.
        container: String,
        /// Volume name.
        volume: String,
    },
    /// The image has no entrypoint or cmd and the container gives no command.
    #[error("no command specified for container {0}")]
    NoCommand(String),
}

/// A pod volume, prepared on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedVolume {
    /// Host path to bind.
    pub source: PathBuf,
    /// Mounted read-only whatever the volumeMount says (projected volumes).
    pub read_only: bool,
    /// A hostPath volume (propagation applies; other kinds are private).
    pub host_path: bool,
}

/// Everything [`build`] needs beyond the Pod and the container.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// The container to run (init or regular).
    pub container: &'a Container,
    /// The image's config.
    pub image: &'a ImageConfig,
    /// The container's root filesystem (prepared, e.g. an overlay of the image).
    pub rootfs: PathBuf,
    /// Pod volumes by name.
    pub volumes: &'a BTreeMap<String, PreparedVolume>,
    /// The pod's network namespace file; `None` for `hostNetwork` pods.
    pub netns: Option<PathBuf>,
    /// cgroup path relative to the cgroup2 root.
    pub cgroups_path: String,
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub api_service: (String, u16),
    /// The node's name (hostname of hostNetwork pods, `spec.nodeName`).
    pub node_name: &'a str,
    /// The node's InternalIP (`status.hostIP`).
    pub host_ip: String,
    /// The pod's IP (`status.podIP`).
    pub pod_ip: String,
    /// `/etc/hosts` and `/etc/hostname` files prepared for the pod.
    pub etc_hosts: PathBuf,
    /// See [`Plan::etc_hosts`].
    pub etc_hostname: PathBuf,
}

/// The effective security context of a container: the container's fields over the pod's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    /// `privileged`.
    pub privileged: bool,
    /// `runAsUser`.
    pub run_as_user: Option<i64>,
    /// `runAsGroup`.
    pub run_as_group: Option<i64>,
    /// `runAsNonRoot`.
    pub run_as_non_root: bool,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation` (default true).
    pub allow_privilege_escalation: bool,
    /// Capabilities to add (`CAP_` prefixed).
    pub add: Vec<String>,
    /// Capabilities to drop (`CAP_` prefixed, or `ALL`).
    pub drop: Vec<String>,
}

/// The effective security settings of `c` in `pod`.
pub fn effective(pod: &Pod, c: &Container) -> Effective {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.clone());
    let sc: SecurityContext = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    let norm = |v: Option<Vec<String>>| -> Vec<String> {
        v.unwrap_or_default()
            .into_iter()
            .map(|c| {
                let c = c.to_ascii_uppercase();
                if c == "ALL" || c.starts_with("CAP_") {
                    c
                } else {
                    format!("CAP_{c}")
                }
            })
            .collect()
    };
    Effective {
        privileged: sc.privileged.unwrap_or(false),
        run_as_user: sc
            .run_as_user
            .or_else(|| psc.as_ref().and_then(|p| p.run_as_user)),
        run_as_group: sc
            .run_as_group
            .or_else(|| psc.as_ref().and_then(|p| p.run_as_group)),
        run_as_non_root: sc
            .run_as_non_root
            .or_else(|| psc.as_ref().and_then(|p| p.run_as_non_root))
            .unwrap_or(false),
        read_only_root: sc.read_only_root_filesystem.unwrap_or(false),
        allow_privilege_escalation: sc.allow_privilege_escalation.unwrap_or(true),
        add: norm(caps.add),
        drop: norm(caps.drop),
    }
}

/// Every capability this host can grant: those of [`ALL_CAPS`] in the runtime's own bounding
/// set (what a privileged container gets from containerd).
pub fn host_caps() -> Vec<String> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1 << bit) != 0)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// The capability set of a container with `eff`.
pub fn capabilities(eff: &Effective) -> Vec<String> {
    if eff.privileged {
        return host_caps();
    }
    let mut caps: Vec<String> = if eff.drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|s| s.to_string())
            .filter(|c| !eff.drop.contains(c))
            .collect()
    };
    if eff.add.iter().any(|a| a == "ALL") {
        return host_caps();
    }
    for a in &eff.add {
        if !caps.contains(a) {
            caps.push(a.clone());
        }
    }
    caps
}

/// Expands `$(VAR)` references as Kubernetes does: a defined variable is replaced, `$$` is a
/// literal `$`, an undefined reference stays as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The value of a downward-API `fieldRef` for `pod` in `plan`.
pub fn field_ref(plan: &Plan<'_>, path: &str) -> Option<String> {
    let md = &plan.pod.metadata;
    let spec = plan.pod.spec.as_ref();
    Some(match path {
        "spec.nodeName" => plan.node_name.to_string(),
        "metadata.name" => md.name.clone().unwrap_or_default(),
        "metadata.namespace" => md.namespace.clone().unwrap_or_default(),
        "metadata.uid" => md.uid.clone().unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.hostIP" => plan.host_ip.clone(),
        "status.podIP" => plan.pod_ip.clone(),
        "status.hostIPs" => plan.host_ip.clone(),
        "status.podIPs" => plan.pod_ip.clone(),
        _ => {
            let (key, labels) = path
                .strip_prefix("metadata.labels['")
                .map(|k| (k, true))
                .or_else(|| {
                    path.strip_prefix("metadata.annotations['")
                        .map(|k| (k, false))
                })?;
            let name = key.strip_suffix("']")?;
            let map = if labels { &md.labels } else { &md.annotations };
            map.as_ref()?.get(name)?.clone()
        }
    })
}

/// The container's hostname: the node's for hostNetwork pods, else the pod's name.
fn hostname(plan: &Plan<'_>) -> String {
    if plan.netns.is_none() {
        plan.node_name.to_string()
    } else {
        plan.pod.metadata.name.clone().unwrap_or_default()
    }
}

/// The container's environment, in order: image ENV, the `kubernetes` Service variables, then
/// the container's `env` (values with `$(VAR)` expanded against what precedes them,
/// `fieldRef`s resolved). Unresolvable sources (Secrets, ConfigMaps) are reported.
pub fn environment(plan: &Plan<'_>) -> (Vec<(String, String)>, Vec<String>) {
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(e) = vars.iter_mut().find(|(n, _)| *n == k) {
            e.1 = v;
        } else {
            vars.push((k, v));
        }
    };
    for kv in &plan.image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        set(&mut vars, k.to_string(), v.to_string());
    }
    let hostname = hostname(plan);
    set(&mut vars, "HOSTNAME".into(), hostname);
    let (host, port) = &plan.api_service;
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST", host.clone()),
        ("KUBERNETES_SERVICE_PORT", port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string()),
        ("KUBERNETES_PORT", format!("tcp://{host}:{port}")),
        (
            &format!("KUBERNETES_PORT_{port}_TCP"),
            format!("tcp://{host}:{port}"),
        ),
        (&format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (
            &format!("KUBERNETES_PORT_{port}_TCP_PORT"),
            port.to_string(),
        ),
        (&format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host.clone()),
    ] {
        set(&mut vars, k.to_string(), v);
    }
    let mut problems = Vec::new();
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    for e in plan.container.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &declared)
        } else if let Some(from) = &e.value_from {
            match from.field_ref.as_ref() {
                Some(f) => match field_ref(plan, &f.field_path) {
                    Some(v) => v,
                    None => {
                        problems.push(format!(
                            "env {}: unsupported fieldRef {}",
                            e.name, f.field_path
                        ));
                        continue;
                    }
                },
                None => {
                    problems.push(format!(
                        "env {}: only fieldRef sources are resolved by the local cluster",
                        e.name
                    ));
                    continue;
                }
            }
        } else {
            String::new()
        };
        declared.insert(e.name.clone(), value.clone());
        set(&mut vars, e.name.clone(), value);
    }
    (vars, problems)
}

/// argv of the container: `command` (else the image Entrypoint) followed by `args` (else,
/// when no `command` was given, the image Cmd), each with `$(VAR)` expanded.
pub fn argv(
    c: &Container,
    image: &ImageConfig,
    env: &BTreeMap<String, String>,
) -> Result<Vec<String>, SpecError> {
    let argv: Vec<String> = match (&c.command, &c.args) {
        (Some(cmd), args) if !cmd.is_empty() => {
            cmd.iter().chain(args.iter().flatten()).cloned().collect()
        }
        (_, Some(args)) if !args.is_empty() => image
            .entrypoint
            .iter()
            .chain(args.iter())
            .cloned()
            .collect(),
        _ => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    };
    if argv.is_empty() {
        return Err(SpecError::NoCommand(c.name.clone()));
    }
    Ok(argv.iter().map(|a| expand(a, env)).collect())
}

/// uid and gid the container runs as: the security context's, else the image's numeric USER
/// (`uid[:gid]`), else root. A user name must be numeric for `runAsNonRoot` to be checked.
fn user(plan: &Plan<'_>, eff: &Effective) -> Result<(u32, u32), SpecError> {
    let pod_id = format!(
        "{}_{}({})",
        plan.pod.metadata.name.clone().unwrap_or_default(),
        plan.pod.metadata.namespace.clone().unwrap_or_default(),
        plan.pod.metadata.uid.clone().unwrap_or_default()
    );
    let image_user = plan.image.user.clone().unwrap_or_default();
    let (iu, ig) = image_user
        .split_once(':')
        .map(|(u, g)| (u.to_string(), Some(g.to_string())))
        .unwrap_or((image_user.clone(), None));
    let uid = match eff.run_as_user {
        Some(u) => u as u32,
        None if iu.is_empty() => 0,
        None => match iu.parse::<u32>() {
            Ok(u) => u,
            Err(_) if eff.run_as_non_root => {
                return Err(SpecError::NonNumericUser {
                    user: iu,
                    pod: pod_id,
                    container: plan.container.name.clone(),
                });
            }
            Err(_) => 0,
        },
    };
    if eff.run_as_non_root && uid == 0 {
        return Err(SpecError::RunsAsRoot {
            pod: pod_id,
            container: plan.container.name.clone(),
        });
    }
    let gid = eff
        .run_as_group
        .map(|g| g as u32)
        .or_else(|| ig.and_then(|g| g.parse().ok()))
        .unwrap_or(if eff.run_as_user.is_some() { 0 } else { uid });
    Ok((uid, gid))
}

/// RLIMIT_NOFILE as this process has it: a container inherits the runtime's limits, as with
/// containerd.
fn nofile_limit() -> Value {
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    json!({"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft})
}

/// The OCI runtime spec (`config.json`) of `plan`.
pub fn build(plan: &Plan<'_>) -> Result<Value, SpecError> {
    let c = plan.container;
    let eff = effective(plan.pod, c);
    let (uid, gid) = user(plan, &eff)?;
    let (env, _) = environment(plan);
    let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
    let args = argv(c, plan.image, &env_map)?;
    let caps = capabilities(&eff);
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| plan.image.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let pod_spec = plan.pod.spec.clone().unwrap_or_default();

    let ro = |privileged: bool| if privileged { "rw" } else { "ro" };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", ro(eff.privileged)]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup2",
               "options": ["nosuid", "noexec", "nodev", "relatime", ro(eff.privileged)]}),
        json!({"destination": "/etc/hosts", "type": "bind",
               "source": plan.etc_hosts, "options": ["rbind", "rprivate", "rw"]}),
        json!({"destination": "/etc/hostname", "type": "bind",
               "source": plan.etc_hostname, "options": ["rbind", "rprivate", "rw"]}),
    ];
    let mut rootfs_propagation: Option<&str> = None;
    for m in c.volume_mounts.iter().flatten() {
        let Some(v) = plan.volumes.get(&m.name) else {
            return Err(SpecError::UnknownVolume {
                container: c.name.clone(),
                volume: m.name.clone(),
            });
        };
        let mut source = v.source.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            source = source.join(sub);
        }
        let propagation = match (v.host_path, m.mount_propagation.as_deref()) {
            (_, Some("Bidirectional")) if !eff.privileged => {
                return Err(SpecError::BidirectionalUnprivileged {
                    container: c.name.clone(),
                    volume: m.name.clone(),
                });
            }
            (true, Some("Bidirectional")) => {
                rootfs_propagation = Some("rshared");
                "rshared"
            }
            (true, Some("HostToContainer")) => {
                if rootfs_propagation.is_none() {
                    rootfs_propagation = Some("rslave");
                }
                "rslave"
            }
            _ => "rprivate",
        };
        let rw = if m.read_only.unwrap_or(false) || v.read_only {
            "ro"
        } else {
            "rw"
        };
        mounts.push(
            json!({"destination": m.mount_path, "type": "bind", "source": source,
            "options": ["rbind", propagation, rw]}),
        );
    }

    // The service-account volume the admission plugin would have added to every container.
    if let Some(v) = plan.volumes.get(crate::volumes::SA_VOLUME)
        && !c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == crate::volumes::SA_MOUNT_PATH)
    {
        mounts.push(
            json!({"destination": crate::volumes::SA_MOUNT_PATH, "type": "bind",
            "source": v.source, "options": ["rbind", "rprivate", "ro"]}),
        );
    }

    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "uts"}),
        json!({"type": "cgroup"}),
    ];
    if !pod_spec.host_pid.unwrap_or(false) {
        namespaces.push(json!({"type": "pid"}));
    }
    if !pod_spec.host_ipc.unwrap_or(false) {
        namespaces.push(json!({"type": "ipc"}));
    }
    if let Some(ns) = &plan.netns {
        namespaces.push(json!({"type": "network", "path": ns}));
    }
    let hostname = hostname(plan);

    let mut linux = json!({
        "cgroupsPath": plan.cgroups_path,
        "namespaces": namespaces,
        "resources": {"devices": [{"allow": eff.privileged, "access": "rwm"}]},
    });
    if !eff.privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }
    if let Some(p) = rootfs_propagation {
        linux["rootfsPropagation"] = json!(p);
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                // Ambient capabilities reach a non-root process only; containerd sets none.
                "ambient": [],
            },
            "rlimits": [nofile_limit()],
            "noNewPrivileges": !eff.privileged && !eff.allow_privilege_escalation,
        },
        "root": {"path": plan.rootfs, "readonly": eff.read_only_root},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::from_value;

    fn pod(spec: Value) -> Pod {
        from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
            "spec": spec,
        }))
        .expect("pod")
    }

    fn plan<'a>(
        pod: &'a Pod,
        image: &'a ImageConfig,
        volumes: &'a BTreeMap<String, PreparedVolume>,
        host_network: bool,
    ) -> Plan<'a> {
        Plan {
            pod,
            container: &pod.spec.as_ref().expect("spec").containers[0],
            image,
            rootfs: "/r".into(),
            volumes,
            netns: (!host_network).then(|| "/run/netns/x".into()),
            cgroups_path: "/n/kubepods/podu-1/c".into(),
            api_service: ("10.96.0.1".into(), 443),
            node_name: "node-1",
            host_ip: "127.0.1.1".into(),
            pod_ip: "10.244.1.2".into(),
            etc_hosts: "/h".into(),
            etc_hostname: "/hn".into(),
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            ..ImageConfig::default()
        }
    }

    #[test]
    fn args_replace_the_image_cmd_and_command_replaces_both() {
        let env = BTreeMap::from([("X".to_string(), "1".to_string())]);
        let c = |v: Value| -> Container { from_value(v).expect("container") };
        let img = image();
        assert_eq!(
            argv(&c(json!({"name": "a"})), &img, &env).expect("argv"),
            ["/bin/app", "serve"]
        );
        assert_eq!(
            argv(
                &c(json!({"name": "a", "args": ["run", "$(X)"]})),
                &img,
                &env
            )
            .expect("argv"),
            ["/bin/app", "run", "1"]
        );
        assert_eq!(
            argv(
                &c(json!({"name": "a", "command": ["/bin/sh"], "args": ["-c", "$$(X) $(Y)"]})),
                &img,
                &env
            )
            .expect("argv"),
            ["/bin/sh", "-c", "$(X) $(Y)"]
        );
    }

    #[test]
    fn env_resolves_field_refs_and_expands_earlier_variables_over_the_image_env() {
        let p = pod(json!({"containers": [{"name": "a", "env": [
            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "ADDR", "value": "$(HOST_IP):9090"},
            {"name": "MODE", "value": "pod"},
        ]}]}));
        let img = image();
        let vols = BTreeMap::new();
        let (env, problems) = environment(&plan(&p, &img, &vols, true));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(get("ADDR"), Some("127.0.1.1:9090"));
        assert_eq!(get("MODE"), Some("pod"));
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("HOSTNAME"), Some("node-1"));
    }

    #[test]
    fn run_as_non_root_refuses_a_root_image_and_accepts_a_run_as_user() {
        let img = image();
        let vols = BTreeMap::new();
        let p =
            pod(json!({"securityContext": {"runAsNonRoot": true}, "containers": [{"name": "a"}]}));
        let err = build(&plan(&p, &img, &vols, false)).expect_err("root refused");
        assert!(
            err.to_string()
                .contains("runAsNonRoot and image will run as root"),
            "{err}"
        );
        let p = pod(
            json!({"securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                           "containers": [{"name": "a"}]}),
        );
        let spec = build(&plan(&p, &img, &vols, false)).expect("spec");
        assert_eq!(spec["process"]["user"]["uid"], 65532);
    }

    #[test]
    fn dropped_capabilities_are_absent_and_privileged_gets_every_one() {
        let img = image();
        let vols = BTreeMap::new();
        let p = pod(json!({"containers": [{"name": "a", "securityContext": {
            "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN"]}}}]}));
        let spec = build(&plan(&p, &img, &vols, true)).expect("spec");
        assert_eq!(
            spec["process"]["capabilities"]["bounding"],
            json!(["CAP_BPF", "CAP_NET_ADMIN"])
        );
        assert!(spec["linux"]["maskedPaths"].is_array());
        let p =
            pod(json!({"containers": [{"name": "a", "securityContext": {"privileged": true}}]}));
        let spec = build(&plan(&p, &img, &vols, true)).expect("spec");
        let caps = spec["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("caps");
        assert!(caps.contains(&json!("CAP_SYS_ADMIN")));
        assert!(spec["linux"].get("maskedPaths").is_none());
    }

    #[test]
    fn mount_propagation_follows_the_volume_mount() {
        let img = image();
        let vols = BTreeMap::from([
            (
                "bpf".to_string(),
                PreparedVolume {
                    source: "/node/sys/fs/bpf".into(),
                    read_only: false,
                    host_path: true,
                },
            ),
            (
                "tmp".to_string(),
                PreparedVolume {
                    source: "/pod/tmp".into(),
                    read_only: false,
                    host_path: false,
                },
            ),
        ]);
        let p = pod(json!({"hostNetwork": true, "containers": [{"name": "a",
            "securityContext": {"privileged": true}, "volumeMounts": [
            {"name": "bpf", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"},
            {"name": "tmp", "mountPath": "/tmp", "mountPropagation": "Bidirectional"},
        ]}]}));
        let spec = build(&plan(&p, &img, &vols, true)).expect("spec");
        let mounts = spec["mounts"].as_array().expect("mounts");
        let opts = |dest: &str| {
            mounts
                .iter()
                .find(|m| m["destination"] == dest)
                .map(|m| m["options"].clone())
        };
        assert_eq!(opts("/sys/fs/bpf"), Some(json!(["rbind", "rshared", "rw"])));
        assert_eq!(opts("/tmp"), Some(json!(["rbind", "rprivate", "rw"])));
        assert_eq!(spec["linux"]["rootfsPropagation"], "rshared");
        let ns: Vec<_> = spec["linux"]["namespaces"]
            .as_array()
            .expect("ns")
            .iter()
            .map(|n| n["type"].as_str().unwrap_or_default().to_string())
            .collect();
        assert!(ns.contains(&"cgroup".to_string()) && !ns.contains(&"network".to_string()));
        let p = pod(json!({"containers": [{"name": "a", "volumeMounts": [
            {"name": "bpf", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}]}]}));
        let err = build(&plan(&p, &img, &vols, true)).expect_err("unprivileged");
        assert!(
            err.to_string().contains("only to privileged containers"),
            "{err}"
        );
    }
}
