"""Traffic helper for the data-plane tests.

Runs backends and a client in one process. With --netns the process first enters a fresh
network namespace (loopback only), so nothing it sends can leave the machine. The process is
placed in the test's cgroup by its parent before exec.

Prints one JSON line: ok/fail counts, replies per backend port, and whether the peer the
application saw (getpeername / recvfrom) was always the VIP.
"""
import json, os, socket, sys, threading, time, argparse

p = argparse.ArgumentParser()
p.add_argument("--proto", default="tcp")
p.add_argument("--vip", required=True)
p.add_argument("--vport", type=int, required=True)
p.add_argument("--backends", default="")  # addr:port,... started here
p.add_argument("--count", type=int, default=20)
p.add_argument("--until", default="")  # run until this file exists (count ignored)
p.add_argument("--timeout", type=float, default=2.0)
a = p.parse_args()

fam = socket.AF_INET6 if ":" in a.vip else socket.AF_INET


def split(hp):
    h, _, port = hp.rpartition(":")
    return h.strip("[]"), int(port)


ready = []
for hp in filter(None, a.backends.split(",")):
    host, port = split(hp)
    bfam = socket.AF_INET6 if ":" in host else socket.AF_INET
    if a.proto == "tcp":
        s = socket.socket(bfam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(512)

        def serve(s=s, port=port):
            while True:
                c, _ = s.accept()
                try:
                    c.sendall(str(port).encode())
                finally:
                    c.close()
    else:
        s = socket.socket(bfam, socket.SOCK_DGRAM)
        s.bind((host, port))

        def serve(s=s, port=port):
            while True:
                _, peer = s.recvfrom(64)
                s.sendto(str(port).encode(), peer)
    threading.Thread(target=serve, daemon=True).start()
    ready.append(port)

ok = fail = 0
by = {}
peer_is_vip = True
errors = {}
i = 0
start = time.time()
while True:
    if a.until:
        if os.path.exists(a.until) or time.time() - start > 120:
            break
    elif i >= a.count:
        break
    i += 1
    try:
        if a.proto == "tcp":
            c = socket.socket(fam, socket.SOCK_STREAM)
            c.settimeout(a.timeout)
            c.connect((a.vip, a.vport))
            peer = c.getpeername()
            data = c.recv(64)
            c.close()
        else:
            c = socket.socket(fam, socket.SOCK_DGRAM)
            c.settimeout(a.timeout)
            c.sendto(b"ping", (a.vip, a.vport))
            data, peer = c.recvfrom(64)
            c.close()
        if socket.inet_pton(fam, peer[0]) != socket.inet_pton(fam, a.vip) or peer[1] != a.vport:
            peer_is_vip = False
        if not data:
            raise OSError("empty reply")
        by[data.decode()] = by.get(data.decode(), 0) + 1
        ok += 1
    except OSError as e:
        fail += 1
        errors[str(e)] = errors.get(str(e), 0) + 1
print(json.dumps({"ok": ok, "fail": fail, "by_backend": by, "peer_is_vip": peer_is_vip, "errors": errors}))
