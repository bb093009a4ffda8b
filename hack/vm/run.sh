#!/usr/bin/env bash
# Boots Debian's kernel in qemu (software emulation) with a busybox initramfs holding the agent,
# /sbin/ip and tcpdump, and runs the IPsec checks of hack/vm/init.sh inside it: ESP between
# node namespaces, key rotation under traffic, agent restart, bad algorithm, 1,000 peers,
# teardown. Prints the VM's `VM-RESULT:` lines; exits 0 only when the VM reports PASS.
#
#   hack/vm/run.sh [path/to/meshlet-agent]     (default: builds the debug binary)
#
# Downloads (once, cached under $CARGO_TARGET_DIR/vm-cache or target/vm-cache) the versioned
# linux-image package that linux-image-amd64 depends on, with `apt-get download`.
# Needs: qemu-system-x86, busybox-static, tcpdump, cpio, kmod, iproute2 (hack/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE="${CARGO_TARGET_DIR:-$ROOT/target}/vm-cache"
VM_TIMEOUT="${VM_TIMEOUT:-240}"
mkdir -p "$CACHE"

need() { command -v "$1" >/dev/null 2>&1 || { echo "vm: missing $1 (package $2; run hack/setup.sh)" >&2; exit 2; }; }
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need tcpdump tcpdump
need cpio cpio
need depmod kmod
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || { echo "vm: missing /sbin/ip (package iproute2)" >&2; exit 2; }
file_of() { readlink -f "$(command -v "$1")"; }

AGENT="${1:-}"
if [ -z "$AGENT" ]; then
  cargo build -q -p meshlet-agent --bin meshlet-agent
  AGENT="${CARGO_TARGET_DIR:-$ROOT/target}/debug/meshlet-agent"
fi
[ -x "$AGENT" ] || { echo "vm: agent binary $AGENT not found" >&2; exit 2; }

t0=$(date +%s.%N)
# 1. Kernel: the versioned package linux-image-amd64 points at.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$KPKG" ]; then
  echo "vm: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 2
fi
KVER=${KPKG#linux-image-}
KDIR="$CACHE/kernel-$KVER"
if [ ! -f "$KDIR/.ok" ]; then
  ( cd "$CACHE" && ls "${KPKG}"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG" >/dev/null 2>&1 ) \
    || { echo "vm: apt-get download $KPKG failed" >&2; exit 2; }
  rm -rf "$KDIR"; mkdir -p "$KDIR"
  dpkg-deb -x "$(ls "$CACHE/${KPKG}"_*.deb | head -1)" "$KDIR"
  depmod -b "$KDIR" "$KVER"
  touch "$KDIR/.ok"
fi
VMLINUZ="$KDIR/boot/vmlinuz-$KVER"
MODDIR="$KDIR/lib/modules/$KVER"

# 2. Initramfs.
IR="$CACHE/initramfs"
rm -rf "$IR"; mkdir -p "$IR"/{bin,sbin,etc,proc,sys,dev,run,tmp,lib/modules,usr/bin,var}
ln -s ../run "$IR/var/run"
cp "$(file_of busybox)" "$IR/bin/busybox"
copy_with_libs() { # src dst
  cp "$1" "$IR$2"
  ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' | while read -r lib; do
    mkdir -p "$IR$(dirname "$lib")"
    [ -e "$IR$lib" ] || cp -L "$lib" "$IR$lib"
  done
}
copy_with_libs "$(file_of ip)" /sbin/ip
copy_with_libs "$(file_of tcpdump)" /usr/bin/tcpdump
copy_with_libs "$AGENT" /usr/bin/meshlet-agent
strip --strip-debug "$IR/usr/bin/meshlet-agent" 2>/dev/null || true
# ld.so at its canonical path
for l in /lib64/ld-linux-x86-64.so.2; do mkdir -p "$IR$(dirname $l)"; cp -L "$l" "$IR$l"; done

# Modules in dependency order (deps first). chacha20poly1305 is left out on purpose: the
# bad-algorithm check asks for it.
WANT="veth bridge xfrm_user esp4 gcm ghash-generic ctr seqiv echainiv authenc jitterentropy_rng drbg crypto_null"
ORDER=()
add_mod() {
  local name=${1//-/_} path deps d
  path=$(awk -F: -v n="$name" '{b=$1; sub(/.*\//,"",b); sub(/\.ko.*/,"",b); gsub("-","_",b); if (b==n) {print $1; exit}}' "$MODDIR/modules.dep")
  if [ -z "$path" ]; then return 0; fi # built in
  for p in "${ORDER[@]:-}"; do [ "$p" = "$path" ] && return 0; done
  deps=$(awk -F: -v p="$path" '$1==p{print $2; exit}' "$MODDIR/modules.dep")
  for d in $deps; do
    local dn=${d##*/}; add_mod "${dn%%.ko*}"
  done
  ORDER+=("$path")
}
for m in $WANT; do add_mod "$m"; done
: > "$IR/etc/modules.order"
for p in "${ORDER[@]}"; do
  cp "$MODDIR/$p" "$IR/lib/modules/"
  echo "/lib/modules/${p##*/}" >> "$IR/etc/modules.order"
done
cp hack/vm/init.sh "$IR/init"
chmod +x "$IR/init"
( cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$CACHE/initramfs.cpio.gz"
t1=$(date +%s.%N)
echo "vm: image built in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s (kernel $KVER, initramfs $(du -h "$CACHE/initramfs.cpio.gz" | cut -f1), modules: ${#ORDER[@]})"

# 3. Boot.
LOG="$CACHE/vm.log"
set +e
timeout "$VM_TIMEOUT" qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 2 -m 1024 -nographic \
  -kernel "$VMLINUZ" -initrd "$CACHE/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3" -no-reboot > "$LOG" 2>&1
rc=$?
set -e
t2=$(date +%s.%N)
tr -d '\r' < "$LOG" | grep -E '^(VM-|vm-)' || true
echo "vm: qemu ran $(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.1f", b-a}') s (exit $rc); full log: $LOG"
if [ $rc -eq 124 ]; then echo "VM-RESULT: FAIL timeout after ${VM_TIMEOUT}s"; exit 1; fi
if tr -d '\r' < "$LOG" | grep -q '^VM-RESULT: FAIL'; then exit 1; fi
tr -d '\r' < "$LOG" | grep -q '^VM-SUMMARY: PASS' || { echo "vm: no VM-SUMMARY: PASS line"; exit 1; }
