#!/usr/bin/env bash
# Data-plane benchmark: one run, prints ratios and timings. Needs root, bpffs, cgroup v2,
# iptables (nf_tables), unshare. Not part of CI; numbers are for humans, not gates.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo test -p meshlet-agent --release --test dataplane_bench -- --ignored --exact benchmark_dataplane --nocapture
