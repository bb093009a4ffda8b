//! Shared fixtures of the agent process tests: a private cgroup, bpffs root, lock, admin socket
//! and standalone file per test; the real `meshlet-agent` and `meshletctl` binaries; a traffic
//! helper (backends + several client processes in the cgroup, in a private network namespace);
//! and cleanup that runs even when the test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const TRAFFIC: &str = include_str!("traffic.py");
const BPFFS: &str = "/sys/fs/bpf";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The host's cgroup2 root (`/sys/fs/cgroup` on v2-only hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones), found the way the agent finds it; the tests' cgroups are created below it.
pub fn cgroup_root() -> PathBuf {
    meshlet_agent::cgroup::resolve(None)
        .unwrap_or_else(|e| panic!("the kernel tests need cgroup v2: {e}"))
        .path
}

/// Path of the agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_meshlet-agent");
/// Path of the admin CLI under test.
pub const CTL: &str = env!("CARGO_BIN_EXE_meshletctl");

/// Fails with a clear message when a prerequisite of the agent tests is missing.
pub fn require_prerequisites() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "agent tests need root (CAP_BPF, CAP_NET_ADMIN, cgroups)"
    );
    assert!(
        Path::new(BPFFS).join(".").exists(),
        "bpffs is not mounted at {BPFFS}"
    );
    cgroup_root();
    for (bin, arg) in [("python3", "-c"), ("unshare", "--version")] {
        let ok = Command::new(bin)
            .arg(arg)
            .args(if arg == "-c" { vec!["pass"] } else { vec![] })
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{bin} is needed by the agent tests (traffic helper)");
    }
}

/// A service of a standalone file: VIP, port and backend ports on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct Svc {
    /// Service name.
    pub name: String,
    /// VIP.
    pub vip: String,
    /// Frontend port.
    pub port: u16,
    /// Backend ports on 127.0.0.1.
    pub backends: Vec<u16>,
}

/// Shorthand for a [`Svc`].
pub fn svc(name: &str, vip: &str, port: u16, backends: &[u16]) -> Svc {
    Svc {
        name: name.into(),
        vip: vip.into(),
        port,
        backends: backends.to_vec(),
    }
}

/// A standalone YAML file with `services` plus `filler` extra services (two backends each,
/// VIPs 127.101.x.y) to put thousands of entries in the maps.
pub fn yaml(services: &[Svc], filler: u32) -> String {
    let mut t = String::from("services:\n");
    for s in services {
        t.push_str(&format!(
            "  - name: {}\n    vip: {}\n    ports:\n      - port: {}\n    endpoints:\n",
            s.name, s.vip, s.port
        ));
        for b in &s.backends {
            t.push_str(&format!("      - address: 127.0.0.1\n        port: {b}\n"));
        }
    }
    for i in 0..filler {
        t.push_str(&format!(
            "  - {{ name: filler-{i}, vip: 127.101.{}.{}, ports: [{{port: 80}}], endpoints: [{{address: 127.0.0.1, port: {}}}, {{address: 127.0.0.2, port: {}}}] }}\n",
            i / 250,
            i % 250 + 1,
            30000 + i % 1000,
            31000 + i % 1000
        ));
    }
    t
}

/// One test's private environment; dropping it stops every process and tears everything down.
pub struct AgentEnv {
    /// Unique name (also the cgroup and bpffs directory name).
    pub name: String,
    /// Private cgroup.
    pub cgroup: PathBuf,
    /// Private bpffs root.
    pub bpffs_root: PathBuf,
    /// Scratch directory: lock, socket, standalone file, logs, stop files.
    pub dir: tempfile::TempDir,
    /// The running agent, if any.
    pub agent: Option<Child>,
    agents_started: u32,
    helpers: Vec<Child>,
}

impl AgentEnv {
    /// Creates the cgroup and chooses the paths.
    pub fn new(tag: &str) -> Self {
        require_prerequisites();
        let name = format!(
            "meshlet-test-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup = cgroup_root().join(&name);
        std::fs::create_dir_all(&cgroup).expect("create test cgroup");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("traffic.py"), TRAFFIC).expect("write helper");
        Self {
            name: name.clone(),
            cgroup,
            bpffs_root: PathBuf::from(BPFFS).join(&name),
            dir,
            agent: None,
            agents_started: 0,
            helpers: Vec::new(),
        }
    }

    /// The standalone source file of this test.
    pub fn source(&self) -> PathBuf {
        self.dir.path().join("services.yaml")
    }

    /// Admin socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Agent log file (stderr of every agent started, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Everything the agents logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Write the standalone file atomically (write + rename), as a config manager would.
    pub fn write_source(&self, text: &str) {
        let tmp = self.dir.path().join("services.yaml.tmp");
        std::fs::write(&tmp, text).expect("write source");
        std::fs::rename(&tmp, self.source()).expect("rename source");
    }

    /// The flags every agent of this test runs with.
    pub fn agent_args(&self, layout: u32) -> Vec<String> {
        vec![
            "--bpffs-root".into(),
            self.bpffs_root.display().to_string(),
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--lock-file".into(),
            self.dir.path().join("agent.lock").display().to_string(),
            "--admin-socket".into(),
            self.socket().display().to_string(),
            "--dataplane-layout".into(),
            layout.to_string(),
            "--max-services".into(),
            "8192".into(),
            "--max-endpoints".into(),
            "16384".into(),
            "--standalone".into(),
            self.source().display().to_string(),
            "--standalone-poll-ms".into(),
            "50".into(),
        ]
    }

    /// An agent command with this test's flags (not started).
    pub fn agent_command(&self, sub: &str, layout: u32) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open agent log");
        let mut cmd = Command::new(AGENT);
        cmd.arg(sub)
            .args(self.agent_args(layout))
            .stdout(Stdio::null())
            .stderr(log);
        cmd.env("NO_COLOR", "1");
        cmd
    }

    /// Start an agent in the background (the previous one must be gone).
    pub fn start_agent(&mut self, layout: u32) {
        assert!(self.agent.is_none(), "an agent is already running");
        let child = self
            .agent_command("run", layout)
            .spawn()
            .expect("spawn meshlet-agent");
        self.agents_started += 1;
        self.agent = Some(child);
    }

    /// Send `signal` to the running agent and wait for it to exit.
    pub fn stop_agent(&mut self, signal: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.agent.take().expect("no agent running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait agent") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after {signal:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Run `meshletctl` with this test's socket; returns (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(CTL)
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--lock-file")
            .arg(self.dir.path().join("agent.lock"))
            .args(args)
            .output()
            .expect("run meshletctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `meshletctl <args> --json`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let (ok, out, _) = self.ctl(&all);
        if !ok {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// Wait until the running agent reports ready (first sync done); returns its status.
    pub fn wait_ready(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.agent.as_mut()
                && let Some(st) = child.try_wait().expect("wait agent")
            {
                panic!("agent exited early ({st})\n{}", self.log());
            }
            if let Some(s) = self.ctl_json(&["status"])
                && s["ready"] == Value::Bool(true)
                && s["pid"].as_u64() == self.agent.as_ref().map(|c| u64::from(c.id()))
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready within 30 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until `meshletctl status` satisfies `pred`.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.ctl_json(&["status"])
                && pred(&s)
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Link ids of the attached programs, by program name.
    pub fn link_ids(&self) -> BTreeMap<String, u64> {
        let s = self.ctl_json(&["status"]).expect("status");
        s["programs"]
            .as_array()
            .expect("programs")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    p["link_id"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// The service table as the agent reads it back from the maps.
    pub fn map_services(&self) -> Value {
        self.ctl_json(&["maps"]).expect("meshletctl maps --json")["services"].clone()
    }

    /// The service table the standalone file describes, in the same form.
    pub fn source_services(&self) -> Value {
        let limits = meshlet_agent::source::standalone::Limits {
            max_services: 8192,
            max_endpoints: 16384,
        };
        let state =
            meshlet_agent::source::standalone::load(&self.source(), limits).expect("source valid");
        serde_json::to_value(meshlet_agent::admin::services_to_pb(&state)).expect("json")
    }

    /// Start traffic: backends on `backend_ports`, `clients` client processes connecting to
    /// `targets` (VIP:port → allowed backend ports) until [`Traffic::stop`].
    pub fn start_traffic(
        &mut self,
        backend_ports: &[u16],
        targets: &[(String, u16, Vec<u16>)],
        clients: u32,
    ) -> Traffic {
        let n = self.helpers.len();
        let stop = self.dir.path().join(format!("stop-{n}"));
        let ready = self.dir.path().join(format!("ready-{n}"));
        let mut args = vec![
            "--clients".to_string(),
            clients.to_string(),
            "--until".into(),
            stop.display().to_string(),
            "--ready".into(),
            ready.display().to_string(),
        ];
        args.extend(self.traffic_args(backend_ports, targets));
        let child = self
            .helper_command(&args)
            .spawn()
            .expect("spawn traffic helper");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "traffic helper did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.helpers.push(child);
        Traffic {
            index: self.helpers.len() - 1,
            stop,
        }
    }

    /// Run `count` connections per client to completion and return the report.
    pub fn run_traffic(
        &self,
        backend_ports: &[u16],
        targets: &[(String, u16, Vec<u16>)],
        count: u32,
    ) -> Value {
        let mut args = vec![
            "--clients".to_string(),
            "1".into(),
            "--count".into(),
            count.to_string(),
        ];
        args.extend(self.traffic_args(backend_ports, targets));
        let out = self
            .helper_command(&args)
            .output()
            .expect("run traffic helper");
        parse_report(&out.stdout, &out.stderr)
    }

    /// Stop a traffic run and return its report.
    pub fn stop_traffic(&mut self, t: Traffic) -> Value {
        std::fs::write(&t.stop, b"").expect("write stop file");
        let child = &mut self.helpers[t.index];
        let mut out = Vec::new();
        let mut err = Vec::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_end(&mut out)
            .expect("read report");
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_end(&mut err)
            .expect("read stderr");
        let _ = child.wait();
        parse_report(&out, &err)
    }

    fn traffic_args(
        &self,
        backend_ports: &[u16],
        targets: &[(String, u16, Vec<u16>)],
    ) -> Vec<String> {
        let mut args = vec![
            "--backends".to_string(),
            backend_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ];
        for (vip, port, allowed) in targets {
            args.push("--target".into());
            args.push(format!(
                "{vip}:{port}={}",
                allowed
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        args
    }

    fn helper_command(&self, args: &[String]) -> Command {
        let script = self.dir.path().join("traffic.py");
        let shell = format!(
            "echo $$ > {}/cgroup.procs || exit 97; exec unshare -n sh -c 'ip link set lo up && exec python3 \"$@\"' sh \"$@\"",
            self.cgroup.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(shell).arg("sh").arg(script).args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// Tear down with the agent binary (as an operator would without a running agent).
    pub fn reset_direct(&self) -> (bool, String) {
        let out = self.agent_command("reset", 2).output().expect("run reset");
        (out.status.success(), self.log())
    }

    /// Number of agents started by this test.
    pub fn agents_started(&self) -> u32 {
        self.agents_started
    }
}

/// A running traffic helper.
pub struct Traffic {
    index: usize,
    stop: PathBuf,
}

fn parse_report(stdout: &[u8], stderr: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "traffic helper report unreadable ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(stderr)
        )
    })
}

/// Number field of a traffic report.
pub fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("report has no {field}: {report}"))
}

impl Drop for AgentEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (i, child) in self.helpers.iter_mut().enumerate() {
            let _ = std::fs::write(self.dir.path().join(format!("stop-{i}")), b"");
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Kill anything left in the cgroup, then remove it.
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), b"1");
        let _ = self.agent_command("reset", 2).status();
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
