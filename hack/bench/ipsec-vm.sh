#!/usr/bin/env bash
# IPsec figures with the release agent: builds `meshlet-agent` in release mode and runs the VM
# checks of hack/vm/run.sh with it (qemu software emulation, Debian's kernel). Prints the VM's
# results, among them the time to install SAs for 1,000 peers and, from the same run, the time
# `ip -batch` needs for the same 2,000 SAs + 1,000 policies (the ratio compares the two).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p meshlet-agent --bin meshlet-agent
exec bash hack/vm/run.sh "${CARGO_TARGET_DIR:-$PWD/target}/release/meshlet-agent"
