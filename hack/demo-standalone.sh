#!/usr/bin/env bash
# hack/demo-standalone.sh — Meshlet on one machine, no cluster: the node agent in standalone mode balancing two service
# VIPs over loopback backends, then restarted, killed with SIGKILL, upgraded (map layout 1 -> 2)
# and rolled back while clients keep connecting. Prints the connection count and the failures.
#
# Needs root (eBPF, cgroups). Installs what it needs with hack/setup.sh (skip with
# MESHLET_DEMO_SKIP_SETUP=1) and builds with cargo. Everything it creates (cgroup, bpffs
# directory, processes, temp files) is removed on exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo: run as root (eBPF programs and cgroups need it)" >&2; exit 1; }
# The cgroup2 hierarchy wherever this host mounts it (/sys/fs/cgroup on cgroup-v2-only hosts).
CGROOT=$(awk '$9 == "cgroup2" && $4 == "/" {print $5; exit}' /proc/self/mountinfo)
[ -n "$CGROOT" ] || { echo "demo: no cgroup2 hierarchy is mounted" >&2; exit 1; }
[ -d /sys/fs/bpf ] || { echo "demo: bpffs not mounted at /sys/fs/bpf" >&2; exit 1; }

if [ "${MESHLET_DEMO_SKIP_SETUP:-0}" != 1 ]; then
  bash hack/setup.sh
fi
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "building meshlet-agent and meshletctl"
cargo build -p meshlet-agent --bins
BIN="${CARGO_TARGET_DIR:-target}/debug"
AGENT="$PWD/$BIN/meshlet-agent"; CTL="$PWD/$BIN/meshletctl"
[ -x "$AGENT" ] || { AGENT="$BIN/meshlet-agent"; CTL="$BIN/meshletctl"; }

NAME="meshlet-demo-$$"
CG="$CGROOT/$NAME"
ROOT="/sys/fs/bpf/$NAME"
WORK="$(mktemp -d)"
METRICS="127.0.0.1:${MESHLET_DEMO_METRICS_PORT:-19464}"
AGENT_PID=""; BACKENDS_PID=""; CLIENT_PID=""
FLAGS=(--bpffs-root "$ROOT" --cgroup "$CG" --lock-file "$WORK/agent.lock"
       --admin-socket "$WORK/agent.sock" --standalone "$WORK/services.yaml"
       --metrics-addr "$METRICS")
ctl() { "$CTL" --socket "$WORK/agent.sock" --bpffs-root "$ROOT" --cgroup "$CG" --lock-file "$WORK/agent.lock" "$@"; }

cleanup() {
  set +e
  for pid in $CLIENT_PID $AGENT_PID $BACKENDS_PID; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  "$AGENT" reset "${FLAGS[@]}" >/dev/null 2>&1
  if [ -d "$CG" ]; then echo 1 > "$CG/cgroup.kill" 2>/dev/null; sleep 0.2; rmdir "$CG" 2>/dev/null; fi
  rm -rf "$ROOT" "$WORK"
}
trap cleanup EXIT
mkdir -p "$CG"
cp examples/standalone/services.yaml "$WORK/services.yaml"

say "backends on 127.0.0.1:18081-18083 (each answers with its name)"
cat > "$WORK/backends.py" <<'PY'
import socket, threading, time
for port in (18081, 18082, 18083):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(4096)
    def serve(s=s, port=port):
        while True:
            c, _ = s.accept()
            try: c.sendall(b"backend-%d" % port)
            finally: c.close()
    threading.Thread(target=serve, daemon=True).start()
while True: time.sleep(3600)
PY
python3 "$WORK/backends.py" & BACKENDS_PID=$!

# A client in the cgroup: N processes connecting to both VIPs until $WORK/stop exists.
cat > "$WORK/client.py" <<'PY'
import json, os, socket, sys
procs, stop, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
targets = [("127.100.0.1", 80), ("127.100.0.2", 8080)]
def run(w):
    ok = fail = 0; seen = {}
    i = 0
    while (count and i < count) or (not count and not os.path.exists(stop)):
        addr = targets[i % 2]; i += 1
        try:
            c = socket.create_connection(addr, timeout=3); data = c.recv(64).decode(); c.close()
            if not data: raise OSError("empty reply")
            ok += 1; seen[data] = seen.get(data, 0) + 1
        except OSError:
            fail += 1
    os.write(w, json.dumps([ok, fail, seen]).encode()); os.close(w)
pipes = []
for _ in range(procs):
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r); run(w); os._exit(0)
    os.close(w); pipes.append(r)
ok = fail = 0; seen = {}
for r in pipes:
    buf = b""
    while True:
        b = os.read(r, 65536)
        if not b: break
        buf += b
    o, f, s = json.loads(buf); ok += o; fail += f
    for k, v in s.items(): seen[k] = seen.get(k, 0) + v
print(json.dumps({"connections": ok + fail, "ok": ok, "failed": fail, "by_backend": dict(sorted(seen.items()))}))
PY
in_cgroup() { sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" "$@"; }

start_agent() { # layout
  "$AGENT" run --dataplane-layout "$1" "${FLAGS[@]}" >>"$WORK/agent.log" 2>&1 & AGENT_PID=$!
  for _ in $(seq 200); do
    if ctl status --json 2>/dev/null | grep -q '"ready": true'; then
      ctl status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print("   agent pid %d: layout %d, %s start-up in %.1f ms, link ids unchanged: %s" % (s["pid"], s["layout"], s["restart_kind"], s["start_duration_micros"]/1000, s["link_ids_unchanged"]))'
      return
    fi
    sleep 0.05
  done
  echo "agent did not become ready:"; tail -20 "$WORK/agent.log"; exit 1
}
stop_agent() { # signal
  kill -"$1" "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; AGENT_PID=""
}

say "starting the agent (the 'old release': map layout 1)"
start_agent 1
ctl status
ctl maps --entries

say "six connections from a client in the cgroup"
in_cgroup python3 "$WORK/client.py" 1 "$WORK/none" 6

say "metrics (excerpt)"
python3 - "$METRICS" <<'PY' || true
import sys, urllib.request
body = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=3).read().decode()
for line in body.splitlines():
    if line.startswith(("meshlet_agent_map_entries", "meshlet_agent_restarts", "meshlet_agent_dataplane_events", "meshlet_agent_ready")):
        print("   " + line)
PY

say "4 client processes connect continuously while the agent is disrupted"
in_cgroup python3 "$WORK/client.py" 4 "$WORK/stop" 0 > "$WORK/client.json" & CLIENT_PID=$!
sleep 0.5
for i in 1 2 3; do echo " - restart (SIGTERM) $i"; stop_agent TERM; start_agent 1; done
for i in 1 2 3; do echo " - kill -9 $i"; sleep 0.$((RANDOM % 3)); stop_agent KILL; start_agent 1; done
echo " - upgrade: layout 1 -> 2"; stop_agent TERM; start_agent 2
echo " - roll back: layout 2 -> 1"; stop_agent TERM; start_agent 1
echo " - upgrade again: layout 1 -> 2"; stop_agent TERM; start_agent 2
echo " - change the source: api gets a second backend"
sed -i 's/        port: 18083/        port: 18083\n      - address: 127.0.0.1\n        port: 18081/' "$WORK/services.yaml"
sleep 1
touch "$WORK/stop"; wait "$CLIENT_PID"; CLIENT_PID=""

say "result"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("   connections: %d   failed: %d   by backend: %s" % (r["connections"], r["failed"], r["by_backend"]))' "$WORK/client.json"
ctl maps
say "tearing down (meshletctl reset)"
ctl reset
AGENT_PID=""
