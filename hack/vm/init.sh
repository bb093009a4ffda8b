#!/bin/busybox sh
# /init of the IPsec test VM (see hack/vm/run.sh). Three node namespaces n1..n3 joined by a
# bridge, one agent per node in IPsec-only mode (`meshlet-agent ipsec`) reading its standalone
# file; the checks print `VM-RESULT: PASS|FAIL <what> <figures>` and a final `VM-SUMMARY:`.
/bin/busybox --install -s /bin
export PATH=/sbin:/usr/bin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs run /run; mount -t tmpfs tmp /tmp
mkdir -p /run/netns /etc/meshlet
IP=/sbin/ip
FAILED=0
now() { read up _ < /proc/uptime; echo "$up"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
pass() { echo "VM-RESULT: PASS $*"; }
fail() {
  echo "VM-RESULT: FAIL $*"
  if [ "$FAILED" = 0 ]; then
    for f in /tmp/n*.log; do [ -f "$f" ] && tail -n 8 "$f" | sed "s|^|vm-log $f: |"; done
  fi
  FAILED=1
}
finish() {
  if [ "$FAILED" = 0 ]; then echo "VM-SUMMARY: PASS total $(since 0)s since boot"; else
    echo "VM-SUMMARY: FAIL"; fi
  sync; poweroff -f
}
echo "vm-boot: init started at $(now)s"
# A module may already be built in or refuse a self-test under emulation; the checks below
# catch anything that is really missing.
# No modprobe here: make the kernel's module requests fail at once instead of trying to run one.
echo > /proc/sys/kernel/modprobe
while read -r m; do insmod "$m" 2>/dev/null || echo "vm-warn: insmod $m failed"; done < /etc/modules.order

NODES="1 2 3"
$IP link add br0 type bridge && $IP link set br0 up
for n in $NODES; do
  $IP netns add n$n
  $IP link add veth$n type veth peer name eth0 netns n$n
  $IP link set veth$n master br0 up
  $IP -n n$n link set lo up
  $IP -n n$n addr add 10.77.0.$n/24 dev eth0
  $IP -n n$n link set eth0 up
done

cat > /etc/meshlet/ipsec.keys <<KEYS
# spi psk salt
1 6d65736800000000000000000000000000000000000000000000000000000001 0a0b0c0d
2 6d65736800000000000000000000000000000000000000000000000000000002 0a0b0c0d
3 6d65736800000000000000000000000000000000000000000000000000000003 0a0b0c0d
KEYS

# write_cfg NODE SPIS ACTIVE [ALGORITHM]; SPIS "" writes a file without an ipsec section.
write_cfg() {
  f=/etc/meshlet/n$1.yaml
  {
    echo "services: []"
    if [ -n "$2" ]; then
      echo "ipsec:"
      echo "  nodeName: node-$1"
      echo "  localAddress: 10.77.0.$1"
      echo "  algorithm: ${4:-rfc4106(gcm(aes))}"
      echo "  keyFile: ipsec.keys"
      echo "  spis: [$2]"
      [ -n "$3" ] && echo "  activeSpi: $3"
      echo "  peers:"
      for p in $NODES; do
        [ "$p" = "$1" ] && continue
        echo "    - name: node-$p"
        echo "      address: 10.77.0.$p"
      done
    fi
  } > $f.tmp && mv $f.tmp $f
}
all_cfg() { for n in $NODES; do write_cfg $n "$@"; done; }
start_agent() {
  MESHLET_IPSEC_STATUS=/run/n$1.status $IP netns exec n$1 /usr/bin/meshlet-agent \
    --standalone /etc/meshlet/n$1.yaml --standalone-poll-ms 100 ipsec >> /tmp/n$1.log 2>&1 &
  eval "PID$1=$!"
}
# wait_for DESCRIPTION SECONDS COMMAND...
wait_for() {
  wf_d=$1; wf_t=$2; shift 2; wf_end=$(( $(date +%s) + wf_t ))
  while ! "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$wf_end" ]; then fail "$wf_d (timed out after ${wf_t}s)"; return 1; fi
    usleep 20000
  done
}
all_status() { for n in $NODES; do grep -q "$1" /run/n$n.status 2>/dev/null || return 1; done; }
all_status2() { all_status "$1" && all_status "$2"; }
xstat_errors() { # sum of the error counters of /proc/net/xfrm_stat in every node
  s=0; for n in $NODES; do
    v=$($IP netns exec n$n cat /proc/net/xfrm_stat | awk '{s+=$2} END{print s+0}'); s=$((s+v)); done; echo $s
}
retrans() { $IP netns exec n1 cat /proc/net/snmp | awk '/^Tcp:/{ if (!h) {for(i=1;i<=NF;i++) if($i=="RetransSegs") c=i; h=1} else print $c }'; }

# 1. Enable IPsec: generation 1 installed and active on every node.
t=$(now)
all_cfg 1 1
for n in $NODES; do start_agent $n; done
if wait_for "enable generation 1" 60 all_status2 '"installedSpis":\[1\]' '"activeSpi":1'; then
  pass "enable: 3 agents installed and activated generation 1 in $(since $t)s"
else finish; fi

# 2. Traffic: capture on the bridge, a long TCP stream n1->n2, pings n1->n3 and n3->n2 in
#    batches (each batch waits for its last reply, so a count is exact).
echo "root:x:0:0:root:/:/bin/sh" > /etc/passwd
tcpdump -Z root -i br0 -n -U -s 200 -w /tmp/cap.pcap 2>/tmp/tcpdump.err &
TCPDUMP=$!
usleep 500000
$IP netns exec n2 sh -c 'tail -f /dev/null | nc -l -p 5000 > /tmp/recv.txt' &
usleep 300000
$IP netns exec n1 sh -c 'i=0; while [ ! -f /tmp/stop ]; do echo "MESHLETPLAINTEXT $i"; i=$((i+1)); usleep 20000; done; echo $i > /tmp/sent; echo END' \
  | $IP netns exec n1 nc 10.77.0.2 5000 &
TCP=$!
pinger() { # FROM TO
  tx=0; rx=0
  while [ ! -f /tmp/stop ]; do
    out=$($IP netns exec n$1 ping -c 20 -i 0.05 -W 5 10.77.0.$2 2>&1 | grep 'packets transmitted')
    a=$(echo "$out" | awk '{print $1}'); b=$(echo "$out" | awk '{print $4}')
    tx=$((tx+${a:-0})); rx=$((rx+${b:-0}))
  done
  echo "$tx $rx" > /tmp/ping$1$2
}
pinger 1 3 & P13=$!
pinger 3 2 & P32=$!
R0=$(retrans)
sleep 2

# 3. Rotation 1 -> 2 in the three acknowledged phases, under traffic.
t=$(now)
all_cfg 1,2 1
wait_for "rotation: install generation 2" 30 all_status '"installedSpis":\[1,2\]' && T_INST=$(since $t)
t2=$(now)
all_cfg 1,2 2
wait_for "rotation: switch to generation 2" 30 all_status '"activeSpi":2' && T_SW=$(since $t2)
sleep 1
t3=$(now)
all_cfg 2 2
wait_for "rotation: retire generation 1" 30 all_status2 '"installedSpis":\[2\]' '"states":4,' && T_RET=$(since $t3)
pass "rotation: install ${T_INST}s, switch ${T_SW}s, retire ${T_RET}s (total $(since $t)s)"
sleep 1

# 4. Agent restart under traffic: the kernel keeps the SAs; the new agent adopts them.
t=$(now)
kill -TERM $PID1; wait $PID1
rm -f /run/n1.status
start_agent 1
wait_for "restart: agent n1 adopts" 30 grep -q '"activeSpi":2' /run/n1.status &&
  grep -q 'adopted the own xfrm states' /tmp/n1.log &&
  pass "restart: agent n1 stopped and adopted 4 states, 2 policies in $(since $t)s (nothing flushed)"
sleep 1

# 5. Bad input: a generation with an algorithm the kernel lacks halts instead of half-applying.
B=$($IP -n n1 xfrm state | grep -c '^src')
write_cfg 1 2,3 2 'rfc7539esp(chacha20,poly1305)'
if wait_for "bad algorithm reported" 30 grep -q 'does not provide algorithm rfc7539esp' /run/n1.status; then
  A=$($IP -n n1 xfrm state | grep -c '^src')
  if [ "$A" = "$B" ] && grep -q '"installedSpis":\[2\]' /run/n1.status; then
    pass "bad algorithm: n1 reports '$(grep -o 'the kernel does not provide algorithm [^;(]*' /run/n1.status | head -1)', states unchanged ($A), installed SPIs stay [2]"
  else fail "bad algorithm: states changed from $B to $A"; fi
fi
write_cfg 1 2 2
wait_for "bad algorithm: recovery" 30 grep -q '"error":null' /run/n1.status
sleep 1

# 6. Stop traffic and judge.
touch /tmp/stop
wait $TCP; TCPRC=$?
wait $P13 $P32
R1=$(retrans)
usleep 500000
kill $TCPDUMP; wait $TCPDUMP 2>/dev/null
SENT=$(cat /tmp/sent 2>/dev/null); GOT=$(grep -c MESHLETPLAINTEXT /tmp/recv.txt); LAST=$(tail -n 1 /tmp/recv.txt)
if [ "$TCPRC" = 0 ] && [ -n "$SENT" ] && [ "$GOT" = "$SENT" ] && [ "$LAST" = END ]; then
  pass "tcp: one connection kept through rotation, restart and bad input: $GOT/$SENT lines in order, retransmitted segments $((R1-R0))"
else fail "tcp: sender rc $TCPRC, sent ${SENT:-?}, received $GOT, last line '$LAST'"; fi
read tx13 rx13 < /tmp/ping13; read tx32 rx32 < /tmp/ping32
if [ "$tx13" -gt 0 ] && [ "$tx13" = "$rx13" ] && [ "$tx32" -gt 0 ] && [ "$tx32" = "$rx32" ]; then
  pass "ping: 0 lost (n1->n3 $rx13/$tx13, n3->n2 $rx32/$tx32)"
else fail "ping: lost packets (n1->n3 $rx13/$tx13, n3->n2 $rx32/$tx32)"; fi
XE=$(xstat_errors)
[ "$XE" = 0 ] && pass "xfrm: 0 errors in /proc/net/xfrm_stat of every node" || fail "xfrm: $XE errors in /proc/net/xfrm_stat"
ESP=$(tcpdump -Z root -r /tmp/cap.pcap -n esp 2>/dev/null | wc -l)
PLAIN=$(tcpdump -Z root -r /tmp/cap.pcap -n 'ip and not esp' 2>/dev/null | wc -l)
if grep -q MESHLETPLAINTEXT /tmp/cap.pcap; then MARK=yes; else MARK=no; fi
if [ "$ESP" -gt 0 ] && [ "$PLAIN" = 0 ] && [ "$MARK" = no ]; then
  pass "capture: $ESP ESP packets, 0 plaintext IP packets, payload marker absent"
else fail "capture: $ESP ESP, $PLAIN plaintext IP packets, marker present: $MARK ($(head -c 300 /tmp/tcpdump.err))"; fi
TX=$(grep -o '"txPackets":[0-9]*' /run/n1.status | cut -d: -f2); RX=$(grep -o '"rxPackets":[0-9]*' /run/n2.status | cut -d: -f2)
[ "${TX:-0}" -gt 0 ] && [ "${RX:-0}" -gt 0 ] && pass "counters: n1 sent $TX packets through its SAs, n2 received $RX" || fail "counters: tx ${TX:-?} rx ${RX:-?}"
echo "vm-xfrm n1:"; $IP -n n1 -s xfrm state | grep -E '^src|lifetime current|bytes' | head -12 | sed 's/^/vm-xfrm   /'

# 7. 1,000 peers on one node.
$IP netns add n9; $IP -n n9 link set lo up
{
  echo "services: []"; echo "ipsec:"; echo "  nodeName: big"; echo "  localAddress: 10.90.0.1"
  echo "  keyFile: ipsec.keys"; echo "  spis: [1]"; echo "  activeSpi: 1"; echo "  peers:"
  i=0; while [ $i -lt 1000 ]; do
    echo "    - name: peer-$i"; echo "      address: 10.91.$((i/250)).$((i%250+1))"; i=$((i+1)); done
} > /etc/meshlet/n9.yaml
t=$(now)
start_agent 9
if wait_for "1,000 peers" 120 grep -q '"states":2000,"policies":1000' /run/n9.status; then
  US=$(grep -o 'duration_us=[0-9]*' /tmp/n9.log | head -1 | cut -d= -f2)
  pass "scale: 1000 peers -> 2000 SAs + 1000 policies applied in $(awk -v u="$US" 'BEGIN{printf "%.3f", u/1e6}')s (file to status $(since $t)s)"
else tail -n 5 /tmp/n9.log | sed 's/^/vm-log n9: /'; head -c 300 /run/n9.status; fi
kill -TERM $PID9; wait $PID9

# 7b. Baseline for the same scale: iproute2 installs the same 2,000 SAs + 1,000 policies in one
# `ip -batch` (no key derivation, no status) in a namespace of its own; the ratio shows how much
# of the agent's time is the emulated kernel's.
$IP netns add n10
KEY=0x$(i=0; while [ $i -lt 9 ]; do printf '%s' 6d657368; i=$((i+1)); done)
i=0; while [ $i -lt 1000 ]; do
  peer="10.91.$((i/250)).$((i%250+1))"
  printf 'xfrm state add src %s dst 10.90.0.1 proto esp spi 0x%x reqid 1 mode transport aead rfc4106(gcm(aes)) %s 128\n' "$peer" $((0x10000 + 2*i)) "$KEY"
  printf 'xfrm state add src 10.90.0.1 dst %s proto esp spi 0x%x reqid 1 mode transport aead rfc4106(gcm(aes)) %s 128\n' "$peer" $((0x10001 + 2*i)) "$KEY"
  printf 'xfrm policy add src 10.90.0.1/32 dst %s/32 dir out tmpl src 10.90.0.1 dst %s proto esp reqid 1 mode transport\n' "$peer" "$peer"
  i=$((i+1))
done > /tmp/baseline.batch
t=$(now)
if $IP -n n10 -batch /tmp/baseline.batch > /tmp/baseline.err 2>&1; then
  B=$(since $t)
  BS=$($IP -n n10 xfrm state | grep -c '^src'); BP=$($IP -n n10 xfrm policy | grep -c '^src')
  if [ -n "$US" ] && [ "$BS" = 2000 ] && [ "$BP" = 1000 ]; then
    pass "scale baseline: ip -batch installs the same 2000 SAs + 1000 policies in ${B}s; agent / ip -batch = $(awk -v a="$US" -v b="$B" 'BEGIN{ if (b > 0) printf "%.2f", a/1e6/b; else print "n/a" }')"
  else echo "vm-warn: scale baseline: $BS states, $BP policies after ip -batch (${B}s)"; fi
else echo "vm-warn: scale baseline: ip -batch failed: $(head -c 300 /tmp/baseline.err)"; fi
$IP -n n10 xfrm state flush; $IP -n n10 xfrm policy flush; $IP netns del n10

# 8. Teardown removes exactly the agent's own objects.
$IP -n n1 xfrm state add src 10.77.0.1 dst 10.77.0.99 proto esp spi 0x999 reqid 7 mode transport \
  aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128
all_cfg ""
wait_for "teardown" 30 all_status '"states":0,"policies":0' && {
  F=$($IP -n n1 xfrm state | grep -c '^src'); P=0
  for n in $NODES; do P=$((P + $($IP -n n$n xfrm policy | grep -c '^src'))); done
  $IP -n n1 xfrm state del src 10.77.0.1 dst 10.77.0.99 proto esp spi 0x999
  S=0; for n in $NODES; do S=$((S + $($IP -n n$n xfrm state | grep -c '^src'))); done
  if [ "$F" = 1 ] && [ "$P" = 0 ] && [ "$S" = 0 ]; then
    pass "teardown: own states and policies removed, the foreign SA kept; no xfrm state left"
  else fail "teardown: foreign $F (want 1), policies $P, states after $S"; fi
}
for n in $NODES; do eval "kill -TERM \$PID$n"; done
finish
