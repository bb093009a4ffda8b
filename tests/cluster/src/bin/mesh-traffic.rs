//! `mesh-traffic`: the workload of the local-cluster e2e tests, run as a pod
//! (`meshlet.local/mesh-traffic:v1`) in its own network namespace and its node's cgroup.
//!
//! ```text
//!  backends: listen on 127.0.0.1:<port> (in the pod's namespace), reply with the port
//!  clients:  connect to VIP:port continuously (or --count times); each reply must name a
//!            backend listed for that VIP ── the node's cgroup programs rewrite the connect
//!  stdout:   "ready" once everything runs; on SIGTERM (pod deletion) or after --count, one
//!            JSON line {ok, fail, wrong, by_backend, errors, clients}
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use serde_json::json;

/// Backends and clients of service VIPs.
#[derive(Debug, Parser)]
#[command(name = "mesh-traffic", version)]
struct Args {
    /// Backend ports on 127.0.0.1, comma separated.
    #[arg(long, default_value = "")]
    backends: String,
    /// `VIP:PORT=P1,P2`: a target and the backend ports allowed to answer; repeatable.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Connections per client, then report and exit; 0: until SIGTERM.
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Connect and read timeout, seconds.
    #[arg(long, default_value_t = 3.0)]
    timeout: f64,
}

#[derive(Default)]
struct Report {
    ok: u64,
    fail: u64,
    wrong: u64,
    by_backend: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl Report {
    fn merge(&mut self, o: Report) {
        self.ok += o.ok;
        self.fail += o.fail;
        self.wrong += o.wrong;
        for (k, v) in o.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

fn parse_target(t: &str) -> Result<(SocketAddr, Vec<String>), String> {
    let (addr, allowed) = t
        .split_once('=')
        .ok_or_else(|| format!("--target {t:?}: expected VIP:PORT=P1,P2"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("--target {t:?}: {e}"))?;
    Ok((addr, allowed.split(',').map(str::to_string).collect()))
}

fn one(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, timeout)?;
    c.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn client(
    targets: Arc<Vec<(SocketAddr, Vec<String>)>>,
    count: u64,
    timeout: Duration,
    stop: Arc<AtomicBool>,
) -> Report {
    let mut r = Report::default();
    let mut i = 0u64;
    loop {
        if (count > 0 && i >= count) || (count == 0 && stop.load(Ordering::Relaxed)) {
            return r;
        }
        let (addr, allowed) = &targets[(i as usize) % targets.len()];
        i += 1;
        match one(*addr, timeout) {
            Ok(data) => {
                *r.by_backend.entry(data.clone()).or_default() += 1;
                if allowed.contains(&data) {
                    r.ok += 1;
                } else {
                    r.wrong += 1;
                }
            }
            Err(e) => {
                r.fail += 1;
                *r.errors.entry(format!("{addr} {e}")).or_default() += 1;
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    // SIGTERM is taken synchronously below; block it before any thread starts.
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    term.add(Signal::SIGINT);
    if let Err(e) = term.thread_block() {
        eprintln!("mesh-traffic: cannot block SIGTERM: {e}");
        std::process::exit(2);
    }
    let targets: Vec<_> = match args.targets.iter().map(|t| parse_target(t)).collect() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("mesh-traffic: {e}");
            std::process::exit(2);
        }
    };
    for port in args.backends.split(',').filter(|p| !p.is_empty()) {
        let listener = match TcpListener::bind(format!("127.0.0.1:{port}")) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mesh-traffic: cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(2);
            }
        };
        let reply = port.to_string();
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let _ = c.write_all(reply.as_bytes());
            }
        });
    }
    let targets = Arc::new(targets);
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_secs_f64(args.timeout.max(0.1));
    let clients: Vec<_> = (0..if targets.is_empty() { 0 } else { args.clients })
        .map(|_| {
            let (t, s) = (targets.clone(), stop.clone());
            std::thread::spawn(move || client(t, args.count, timeout, s))
        })
        .collect();
    println!("ready");
    let _ = std::io::stdout().flush();
    if args.count == 0 || clients.is_empty() {
        let _ = term.wait();
        stop.store(true, Ordering::Relaxed);
    }
    let mut total = Report::default();
    let n = clients.len();
    for c in clients {
        match c.join() {
            Ok(r) => total.merge(r),
            Err(_) => {
                total.fail += 1;
                *total.errors.entry("client died".into()).or_default() += 1;
            }
        }
    }
    println!(
        "{}",
        json!({"ok": total.ok, "fail": total.fail, "wrong": total.wrong,
               "by_backend": total.by_backend, "errors": total.errors, "clients": n})
    );
    let _ = std::io::stdout().flush();
}
