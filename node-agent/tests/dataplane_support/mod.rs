//! Shared fixtures of the data-plane kernel tests: a private cgroup, bpffs root and lock per
//! test, a traffic helper process placed in that cgroup (optionally in its own network
//! namespace), and cleanup that runs even when the test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use meshlet_agent::dataplane::{self, DataplaneConfig};
use meshlet_agent::model::{Backend, DesiredState, Protocol, ServiceKey};

const CLIENT: &str = include_str!("client.py");
const BPFFS: &str = "/sys/fs/bpf";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The host's cgroup2 root (`/sys/fs/cgroup` on v2-only hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones), found the way the agent finds it; the tests' cgroups are created below it.
pub fn cgroup_root() -> PathBuf {
    meshlet_agent::cgroup::resolve(None)
        .unwrap_or_else(|e| panic!("the kernel tests need cgroup v2: {e}"))
        .path
}

/// Fails with a clear message when a prerequisite of the kernel tests is missing.
pub fn require_prerequisites() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "data-plane tests need root (CAP_BPF, CAP_NET_ADMIN)"
    );
    assert!(
        Path::new(BPFFS).join(".").exists(),
        "bpffs is not mounted at {BPFFS}"
    );
    cgroup_root();
    let ok = Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 is needed for the traffic helper");
    let ok = Command::new("unshare")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "unshare (util-linux) is needed to give the traffic helper its own network namespace"
    );
}

/// One test's private environment; dropping it tears everything down.
pub struct TestEnv {
    /// Unique name.
    pub name: String,
    /// Config pointing at the private cgroup, bpffs root and lock.
    pub cfg: DataplaneConfig,
    /// Scratch directory (lock, helper script, stop files).
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl TestEnv {
    /// Creates the cgroup, chooses a bpffs root and lock path, with layout `layout`.
    pub fn new(tag: &str, layout: u32) -> Self {
        require_prerequisites();
        let name = format!(
            "meshlet-test-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup = cgroup_root().join(&name);
        std::fs::create_dir_all(&cgroup).expect("create test cgroup");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("client.py"), CLIENT).expect("write helper");
        let cfg = DataplaneConfig {
            bpffs_root: PathBuf::from(BPFFS).join(&name),
            cgroup,
            layout,
            max_services: 8192,
            max_endpoints: 16384,
            lock_path: dir.path().join("agent.lock"),
        };
        Self {
            name,
            cfg,
            dir,
            children: Vec::new(),
        }
    }

    /// Config with another layout (same paths).
    pub fn with_layout(&self, layout: u32) -> DataplaneConfig {
        DataplaneConfig {
            layout,
            ..self.cfg.clone()
        }
    }

    fn helper_command(&self, in_cgroup: bool, netns: bool, args: &[String]) -> Command {
        let script = self.dir.path().join("client.py");
        let mut shell = String::new();
        if in_cgroup {
            shell.push_str(&format!(
                "echo $$ > {}/cgroup.procs || exit 97; ",
                self.cfg.cgroup.display()
            ));
        }
        if netns {
            shell.push_str(
                "exec unshare -n sh -c 'ip link set lo up && exec python3 \"$@\"' sh \"$@\"",
            );
        } else {
            shell.push_str("exec python3 \"$@\"");
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(shell).arg("sh").arg(script).args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// Runs the helper to completion and returns its report.
    pub fn run_traffic(&self, t: &Traffic) -> TrafficReport {
        let out = self
            .helper_command(t.in_cgroup, t.netns, &t.args(None))
            .output()
            .expect("spawn traffic helper");
        parse_report(&out.stdout, &out.stderr)
    }

    /// Starts the helper in the background until `stop()` is called on the handle.
    pub fn start_traffic(&mut self, t: &Traffic) -> RunningTraffic {
        let stop = self
            .dir
            .path()
            .join(format!("stop-{}", NEXT.fetch_add(1, Ordering::SeqCst)));
        let child = self
            .helper_command(t.in_cgroup, t.netns, &t.args(Some(&stop)))
            .spawn()
            .expect("spawn helper");
        RunningTraffic {
            child: Some(child),
            stop,
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = dataplane::reset(&self.cfg);
        let _ = std::fs::remove_dir(&self.cfg.cgroup);
    }
}

/// A background traffic helper.
pub struct RunningTraffic {
    child: Option<Child>,
    stop: PathBuf,
}

impl RunningTraffic {
    /// Asks the helper to stop and returns its report.
    pub fn stop(mut self) -> TrafficReport {
        std::fs::write(&self.stop, b"stop").expect("write stop file");
        let child = self.child.take().expect("child");
        let out = child.wait_with_output().expect("wait helper");
        parse_report(&out.stdout, &out.stderr)
    }
}

impl Drop for RunningTraffic {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn parse_report(stdout: &[u8], stderr: &[u8]) -> TrafficReport {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "helper report unreadable ({e}): {text} / {}",
            String::from_utf8_lossy(stderr)
        )
    });
    let by_backend = v["by_backend"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.parse().unwrap_or(0), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    TrafficReport {
        ok: v["ok"].as_u64().unwrap_or(0),
        fail: v["fail"].as_u64().unwrap_or(0),
        by_backend,
        peer_is_vip: v["peer_is_vip"].as_bool().unwrap_or(false),
        errors: v["errors"].to_string(),
    }
}

/// What the helper saw.
#[derive(Debug, Clone)]
pub struct TrafficReport {
    /// Successful exchanges.
    pub ok: u64,
    /// Failed exchanges.
    pub fail: u64,
    /// Replies per backend port.
    pub by_backend: BTreeMap<u16, u64>,
    /// Whether every peer address the application saw was the VIP.
    pub peer_is_vip: bool,
    /// Error messages with counts (JSON).
    pub errors: String,
}

/// A traffic run description.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Protocol.
    pub protocol: Protocol,
    /// VIP and port clients use.
    pub vip: IpAddr,
    /// VIP port.
    pub vport: u16,
    /// Backends the helper serves.
    pub backends: Vec<Backend>,
    /// Exchanges (ignored when running in the background).
    pub count: u32,
    /// Place the helper in the test cgroup.
    pub in_cgroup: bool,
    /// Give the helper its own network namespace.
    pub netns: bool,
}

impl Traffic {
    /// Traffic for `svc` with the backends of `svc`, in the cgroup and a private netns.
    pub fn to(key: ServiceKey, backends: &[Backend]) -> Self {
        Self {
            protocol: key.protocol,
            vip: key.vip,
            vport: key.port,
            backends: backends.to_vec(),
            count: 30,
            in_cgroup: true,
            netns: true,
        }
    }

    fn args(&self, until: Option<&Path>) -> Vec<String> {
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|b| match b.addr {
                IpAddr::V4(a) => format!("{a}:{}", b.port),
                IpAddr::V6(a) => format!("[{a}]:{}", b.port),
            })
            .collect();
        let mut args = vec![
            "--proto".into(),
            match self.protocol {
                Protocol::Tcp => "tcp".into(),
                Protocol::Udp => "udp".into(),
            },
            "--vip".into(),
            self.vip.to_string(),
            "--vport".into(),
            self.vport.to_string(),
            "--backends".into(),
            backends.join(","),
            "--count".into(),
            self.count.to_string(),
        ];
        if let Some(until) = until {
            args.push("--until".into());
            args.push(until.display().to_string());
        }
        args
    }
}

/// A service key.
pub fn svc(vip: &str, port: u16, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        vip: vip.parse().expect("vip"),
        port,
        protocol,
    }
}

/// Backends on `addr` at consecutive ports from `first`.
pub fn backends(addr: &str, first: u16, n: u16) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            addr: addr.parse().expect("addr"),
            port: first + i,
            weight: 1,
        })
        .collect()
}

/// A desired state of one service.
pub fn state(entries: &[(ServiceKey, Vec<Backend>)]) -> DesiredState {
    DesiredState {
        services: entries.iter().cloned().collect(),
    }
}

/// A large desired state: `services` services with `per` backends each on 127.0.0.1.
pub fn bulk_state(services: u32, per: u16, first_vip_octet: u8) -> DesiredState {
    let mut out = DesiredState::default();
    for s in 0..services {
        let vip = format!("127.{first_vip_octet}.{}.{}", s / 250, s % 250 + 1);
        let key = svc(&vip, 80, Protocol::Tcp);
        out.services.insert(
            key,
            (0..per)
                .map(|i| Backend {
                    addr: "127.0.0.1".parse().expect("addr"),
                    port: 20000 + i,
                    weight: 1 + i % 3,
                })
                .collect(),
        );
    }
    out
}
