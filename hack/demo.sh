#!/usr/bin/env bash
# hack/demo.sh — Meshlet on the local multi-node TEST cluster: an in-memory API test server (HTTPS)
# and 3 simulated nodes whose kubelet runs pods from the OCI images of this repository with runc
# (hack/local-cluster), Meshlet installed from manifests/ with kubectl (the operator runs as a
# Deployment pod under its RBAC, the agents as a DaemonSet), a Service with an EndpointSlice
# reached through its VIP from a workload pod on every node, then an upgrade rollout v1 -> v2
# (map layout migration, maxUnavailable 1) while client pods connect on every node. Prints what
# `kubectl get meshconfig,nodeenrollments` shows and the failed-connection count. Then an
# IPsecPolicy between the nodes (each agent records its xfrm state in a file: the host kernel
# has no ESP) and one key rotation through its acknowledged phases to Stable on a new SPI.
#
# Needs root (eBPF, cgroups, runc). Installs what it needs with hack/setup.sh (skip with
# MESHLET_DEMO_SKIP_SETUP=1) and builds the images with `cargo xtask images` (skip with
# MESHLET_DEMO_SKIP_BUILD=1). The cluster is stopped and
# everything it created removed on exit, even on failure. The single-node demo without a
# cluster is hack/demo-standalone.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo: run as root (eBPF programs and cgroups need it)" >&2; exit 1; }
grep -q ' - cgroup2 ' /proc/self/mountinfo || { echo "demo: no cgroup2 hierarchy is mounted" >&2; exit 1; }

if [ "${MESHLET_DEMO_SKIP_SETUP:-0}" != 1 ]; then
  bash hack/setup.sh
fi
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

VIP=10.96.0.10
BACKENDS=18081,18082
WORK="$(mktemp -d)"
DIR="$WORK/cluster"
KUBECTL="$PWD/.venv/bin/kubectl"
[ -x "$KUBECTL" ] || KUBECTL=kubectl
export KUBECONFIG="$DIR/kubeconfig"
CLIENT_PIDS=()

cleanup() {
  set +e
  for pid in "${CLIENT_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  hack/local-cluster down --dir "$DIR" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "${MESHLET_DEMO_SKIP_BUILD:-0}" != 1 ]; then
  say "building the local cluster and the images (cargo xtask images)"
  cargo build -p meshlet-local-cluster --bin meshlet-local-cluster
  cargo xtask images
fi

say "starting the local TEST cluster: API test server + 3 simulated nodes"
hack/local-cluster up --nodes 3 --dir "$DIR" --no-build --id "demo-$$"
# shellcheck disable=SC1091
. "$DIR/cluster.env"
"$KUBECTL" get nodes -o wide

say "installing Meshlet: kubectl apply -k manifests/"
"$KUBECTL" apply -k manifests/
"$KUBECTL" -n meshlet-system rollout status deployment/meshlet-operator --timeout=120s 2>/dev/null \
  || "$KUBECTL" -n meshlet-system wait --for=condition=Ready pod -l app.kubernetes.io/component=operator --timeout=120s

meshconfig() {
  cat <<EOF
apiVersion: meshlet.io/v1alpha1
kind: MeshConfig
metadata:
  name: default
spec:
  agent:
    image: ghcr.io/meshlet-io/meshlet-agent
    version: $1
  dataplane:
    maxServices: 64
    maxEndpoints: 256
  enrollment:
    nodeSelector:
      matchLabels:
        kubernetes.io/os: linux
  upgrade:
    maxUnavailable: 1
    canaryNodes: 1
    minReadySeconds: 2
    progressDeadlineSeconds: 120
    autoRollback: true
  telemetry:
    metricsPort: 9090
EOF
}

say "MeshConfig default at v1 (kubectl apply --server-side)"
meshconfig v1 | "$KUBECTL" apply --server-side -f -
for _ in $(seq 1 120); do
  [ "$("$KUBECTL" get nodeenrollments -o name 2>/dev/null | wc -l)" -ge 3 ] && break
  sleep 0.5
done
"$KUBECTL" wait --for=condition=Ready nodeenrollments --all --timeout=180s
"$KUBECTL" wait --for=condition=Ready meshconfig/default --timeout=180s
"$KUBECTL" get meshconfig,nodeenrollments

say "a Service (ClusterIP $VIP:80) with endpoints 127.0.0.1:18081 and 127.0.0.1:18082"
"$KUBECTL" apply --server-side -f - <<EOF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  clusterIP: $VIP
  clusterIPs: ["$VIP"]
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-0, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 18081, protocol: TCP}]
endpoints: [{addresses: ["127.0.0.1"], conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 18082, protocol: TCP}]
endpoints: [{addresses: ["127.0.0.1"], conditions: {ready: true}}]
EOF

# Workload pods: backends (answering with their port) on the pod's loopback and clients of the
# VIP, in the pod's own network namespace and its node's cgroup (nothing leaves the machine).
traffic_pod() {
  local name=$1 node=$2; shift 2
  local args="" a
  for a in --backends "$BACKENDS" --target "$VIP:80=$BACKENDS" "$@"; do args="$args\"$a\", "; done
  "$KUBECTL" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: default, labels: {app: mesh-traffic}}
spec:
  nodeName: $node
  restartPolicy: Never
  automountServiceAccountToken: false
  containers: [{name: traffic, image: meshlet.local/mesh-traffic:v1, args: [${args%, }]}]
EOF
}
# The pod's log, from its node's /var/log/pods (as the kubelet keeps it).
pod_log() { cat "$DIR/$1"/root/var/log/pods/default_"$2"_*/traffic/0.log 2>/dev/null || true; }
# Waits until the pod's log has its JSON report, prints it.
pod_report() {
  local node=$1 name=$2 line
  for _ in $(seq 1 600); do
    line=$(pod_log "$node" "$name" | grep '^{' | tail -n 1 || true)
    [ -n "$line" ] && { echo "$line"; return 0; }
    sleep 0.1
  done
  echo "demo: no report from pod $name" >&2
  return 1
}

say "traffic through the VIP from a pod on every node (5 connections each)"
for node in node-1 node-2 node-3; do
  for i in $(seq 1 60); do
    traffic_pod "probe-$node-$i" "$node" --clients 1 --count 5 --timeout 2
    out=$(pod_report "$node" "probe-$node-$i")
    "$KUBECTL" delete pod "probe-$node-$i" --wait=false >/dev/null
    case "$out" in *'"ok":5'*) break ;; esac
    sleep 0.5
  done
  printf '%s: %s\n' "$node" "$out"
done

say "client pods connecting continuously on every node while the agents roll v1 -> v2"
for node in node-1 node-2 node-3; do
  traffic_pod "clients-$node" "$node" --clients 2
done
for node in node-1 node-2 node-3; do
  for _ in $(seq 1 300); do { pod_log "$node" "clients-$node" | grep -qx ready; } && break; sleep 0.1; done
done
"$KUBECTL" get pods -o wide
meshconfig v2 | "$KUBECTL" apply --server-side -f -
status() {
  "$KUBECTL" get meshconfig default -o jsonpath='{.status.rollout.phase} updated={.status.updatedNodes}/{.status.selectedNodes} inFlight={.status.rollout.nodesInFlight}{"\n"}' 2>/dev/null || true
}
last=""
for _ in $(seq 1 600); do
  now=$(status)
  if [ "$now" != "$last" ]; then printf '  rollout: %s\n' "$now"; last=$now; fi
  if "$KUBECTL" wait --for=condition=Ready meshconfig/default --timeout=1s >/dev/null 2>&1 \
     && [ "$("$KUBECTL" get meshconfig default -o jsonpath='{.status.updatedNodes}')" = 3 ] \
     && [ "$("$KUBECTL" get meshconfig default -o jsonpath='{.status.rollout.targetVersion}')" = v2 ]; then
    break
  fi
  sleep 0.3
done
"$KUBECTL" wait --for=condition=Ready meshconfig/default --timeout=120s
# Deleting a client pod stops it (SIGTERM); it then prints its report.
"$KUBECTL" delete pod clients-node-1 clients-node-2 clients-node-3 --wait=false
for node in node-1 node-2 node-3; do
  pod_report "$node" "clients-$node" > "$WORK/report-$node"
done

say "kubectl get meshconfig,nodeenrollments"
"$KUBECTL" get meshconfig,nodeenrollments -o wide
"$KUBECTL" get nodeenrollments -o custom-columns='NODE:.metadata.name,AGENT:.status.agentVersion,BACKEND MAP LAYOUT:.status.maps[?(@.name=="backend")].layoutVersion,LINKS STABLE:.status.continuity.linkIdsStable'

say "result"
python3 - "$WORK" <<'PY'
import json, sys
ok = fail = 0
for node in ("node-1", "node-2", "node-3"):
    r = json.load(open(f"{sys.argv[1]}/report-{node}"))
    ok += r["ok"]; fail += r["fail"] + r["wrong"]
    print(f"{node}: {r['ok']} connections, {r['fail']} failed, {r['wrong']} to a wrong backend")
print(f"total: {ok} connections during the rollout, failed connections: {fail}")
sys.exit(1 if fail or not ok else 0)
PY

say "IPsec between the nodes: kubectl apply an IPsecPolicy"
echo "(the v2 agent images keep xfrm state in each node's /run/meshlet/xfrm.json: this host kernel has no ESP)"
"$KUBECTL" apply --server-side -f - <<EOF
apiVersion: meshlet.io/v1alpha1
kind: IPsecPolicy
metadata: {name: node-to-node}
spec:
  algorithm: rfc4106(gcm(aes))
  rotationInterval: 24h
  mode: Transport
EOF
ipsec_phase() {
  "$KUBECTL" get ipsecpolicy node-to-node -o jsonpath='{.status.phase} active={.status.activeSPI} pending={.status.pendingSPI} installed={.status.acks.installed}/{.status.acks.selected} switched={.status.acks.switched} retired={.status.acks.retired}' 2>/dev/null || true
}
# Waits until the policy is Stable on an SPI other than $1 and all 3 nodes send with it.
wait_ipsec_stable() {
  local not=$1 quiet=${2:-} last="" now spi acked
  for _ in $(seq 1 300); do
    now=$(ipsec_phase)
    if [ "$now" != "$last" ] && [ -z "$quiet" ]; then printf '  ipsec: %s\n' "$now"; last=$now; fi
    spi=$("$KUBECTL" get ipsecpolicy node-to-node -o jsonpath='{.status.activeSPI}' 2>/dev/null || true)
    if [ "${now%% *}" = Stable ] && [ -n "$spi" ] && [ "$spi" != "$not" ]; then
      acked=$("$KUBECTL" get nodeenrollments -o jsonpath='{range .items[*]}{.status.ipsec.activeSPI}{"\n"}{end}' | grep -cx "$spi" || true)
      if [ "$acked" = 3 ]; then SPI=$spi; return 0; fi
    fi
    sleep 0.2
  done
  echo "demo: the IPsecPolicy did not become Stable on a new SPI in time: $(ipsec_phase)" >&2
  "$KUBECTL" get ipsecpolicy node-to-node -o yaml >&2 || true
  return 1
}
show_ipsec() {
  "$KUBECTL" get ipsecpolicy
  "$KUBECTL" get nodeenrollments -o custom-columns='NODE:.metadata.name,INSTALLED SPIS:.status.ipsec.installedSPIs,ACTIVE SPI:.status.ipsec.activeSPI,IPSEC READY:.status.conditions[?(@.type=="IPsecReady")].status'
  python3 - "$DIR" <<'PY'
import json, sys
def gen(reqid):
    return reqid & 0xFFFF if reqid >> 16 == 0x6D6C else None
for node in ("node-1", "node-2", "node-3"):
    try:
        r = json.load(open(f"{sys.argv[1]}/{node}/root/run/meshlet/xfrm.json"))
    except OSError:
        print(f"{node} xfrm: no recording")
        continue
    sas = sorted({gen(s["reqid"]) for s in r["states"]} - {None})
    pols = sorted({gen(p["reqid"]) for p in r["policies"]} - {None})
    print(f"{node} xfrm: {len(r['states'])} SAs of SPI {sas}, {len(r['policies'])} outbound policies on SPI {pols}, {len(r['calls'])} calls so far")
PY
}
SPI=""
wait_ipsec_stable ""
show_ipsec
OLD_SPI=$SPI

say "rotating the key: kubectl annotate ipsecpolicy node-to-node meshlet.io/rotate=demo-1"
# Every status write of the rotation, through a watch (polling could miss a short phase).
"$KUBECTL" get ipsecpolicy node-to-node --watch-only -o jsonpath='{.status.phase} active={.status.activeSPI} pending={.status.pendingSPI} installed={.status.acks.installed}/{.status.acks.selected} switched={.status.acks.switched} retired={.status.acks.retired}{"\n"}' > "$WORK/ipsec-watch" 2>/dev/null &
WATCH_PID=$!
CLIENT_PIDS+=("$WATCH_PID")
sleep 0.5
t_rot=$(date +%s%N)
"$KUBECTL" annotate --overwrite ipsecpolicy/node-to-node meshlet.io/rotate=demo-1
wait_ipsec_stable "$OLD_SPI" quiet
sleep 0.3
kill "$WATCH_PID" 2>/dev/null || true
uniq "$WORK/ipsec-watch" | sed 's/^/  ipsec: /'
echo "rotated SPI $OLD_SPI -> $SPI in $(( ($(date +%s%N) - t_rot) / 1000000 )) ms: Installing (new inbound SAs everywhere) -> Switching (outbound moves) -> Retiring (old SAs deleted) -> Stable"
show_ipsec

say "stopping the cluster (hack/local-cluster down)"
