#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs formatting,
# lints, the generated-files drift check, every unit/integration/kernel test, and the
# manifest and OLM bundle validations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "generated files are up to date (cargo xtask verify)"
cargo xtask verify

step "manifests validate against the Kubernetes schemas"
bash hack/validate-manifests.sh

step "OLM bundle validates (cargo xtask olm-validate olm)"
cargo xtask olm-validate olm

step "container images (cargo xtask images): the image tests and the local cluster run them"
cargo xtask images

step "cargo test"
cargo test --workspace --all-features --no-fail-fast
