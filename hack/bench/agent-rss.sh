#!/usr/bin/env bash
# Agent memory at full size: starts a release meshlet-agent in standalone mode with 5,000
# services and 100,000 endpoints, waits until it reports ready, prints its resident memory
# (current and peak) and the time from start to ready, then tears the data plane down.
# Needs root, bpffs and cgroup v2. Not part of CI: the numbers are for humans.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "agent-rss: run as root" >&2; exit 1; }

SERVICES=${SERVICES:-5000}
PER_SERVICE=${PER_SERVICE:-20}
cargo build -q --release -p meshlet-agent --bins
BIN="${CARGO_TARGET_DIR:-target}/release"

NAME="meshlet-rss-$$"
CGROOT=$(awk '$9 == "cgroup2" && $4 == "/" {print $5; exit}' /proc/self/mountinfo)
CG="$CGROOT/$NAME"; ROOT="/sys/fs/bpf/$NAME"; WORK="$(mktemp -d)"
cleanup() {
  [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  "$BIN/meshlet-agent" reset --bpffs-root "$ROOT" --cgroup "$CG" --lock-file "$WORK/lock" >/dev/null 2>&1 || true
  rmdir "$ROOT" "$CG" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$CG"

python3 - "$SERVICES" "$PER_SERVICE" > "$WORK/services.yaml" <<'PY'
import sys
n, per = int(sys.argv[1]), int(sys.argv[2])
print("services:")
for s in range(n):
    print(f"  - name: svc-{s}\n    vip: 127.100.{s // 250}.{s % 250 + 1}\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints:")
    for e in range(per):
        i = s * per + e
        print(f"      - {{address: 127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}}}")
PY

PORT=$((20000 + $$ % 20000))
start=$(date +%s.%N)
"$BIN/meshlet-agent" run --bpffs-root "$ROOT" --cgroup "$CG" --lock-file "$WORK/lock" \
  --admin-socket "$WORK/agent.sock" --metrics-addr "127.0.0.1:$PORT" \
  --standalone "$WORK/services.yaml" --max-services "$SERVICES" \
  --max-endpoints $((SERVICES * PER_SERVICE)) --log-level warn &
PID=$!
for _ in $(seq 1 600); do
  python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$PORT/readyz', timeout=1).status == 200 else 1)" 2>/dev/null && break
  sleep 0.1
done
ready=$(date +%s.%N)
sleep 1
rss=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
python3 - "$SERVICES" "$PER_SERVICE" "$start" "$ready" "$rss" "$hwm" <<'PY'
import sys
n, per, start, ready, rss, hwm = sys.argv[1:]
print(f"agent with {n} services / {int(n) * int(per)} endpoints: ready {float(ready) - float(start):.2f} s after start (parse, load, sync)")
print(f"resident memory: {int(rss) / 1024:.1f} MB now, {int(hwm) / 1024:.1f} MB peak (target <= 50 MB)")
PY
