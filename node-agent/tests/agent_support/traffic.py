"""Traffic for the agent tests: backends that answer with their identity, and several client
processes connecting to service VIPs continuously.

Started by the test with `sh -c 'echo $$ > <cgroup>/cgroup.procs; exec unshare -n ...'`, so
every process here is in the test's cgroup and in a private network namespace (loopback only).
Backends listen on 127.0.0.1 before the clients fork; each accepted connection gets the
backend's port as its reply. Clients check that each reply is a backend of that VIP.

Prints one JSON line: ok, fail, wrong (reply from a backend not listed for the VIP),
replies per backend, error messages.
"""
import argparse, json, os, socket, sys, threading, time

p = argparse.ArgumentParser()
p.add_argument("--backends", default="")        # comma-separated ports on 127.0.0.1
p.add_argument("--target", action="append", default=[])  # vip:port=port1,port2
p.add_argument("--clients", type=int, default=4)
p.add_argument("--until", default="")           # run until this file exists
p.add_argument("--count", type=int, default=0)  # or this many connections per client
p.add_argument("--ready", default="")           # created once every process runs
p.add_argument("--timeout", type=float, default=3.0)
a = p.parse_args()

listeners = []
for port in filter(None, a.backends.split(",")):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port)))
    s.listen(4096)
    listeners.append((s, port))

targets = []
for t in a.target:
    hp, _, allowed = t.partition("=")
    host, _, port = hp.rpartition(":")
    targets.append(((host, int(port)), set(allowed.split(","))))


def client(out_fd):
    ok = fail = wrong = 0
    by, errors = {}, {}
    i = 0
    start = time.time()
    while True:
        if a.until:
            if os.path.exists(a.until) or time.time() - start > 300:
                break
        elif i >= a.count:
            break
        addr, allowed = targets[i % len(targets)]
        i += 1
        try:
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(a.timeout)
            try:
                c.connect(addr)
                data = c.recv(64).decode()
            finally:
                c.close()
            if not data:
                raise OSError("empty reply")
            by[data] = by.get(data, 0) + 1
            if data in allowed:
                ok += 1
            else:
                wrong += 1
        except OSError as e:
            fail += 1
            key = "%s:%d %s" % (addr[0], addr[1], e)
            errors[key] = errors.get(key, 0) + 1
    os.write(out_fd, json.dumps({"ok": ok, "fail": fail, "wrong": wrong, "by_backend": by, "errors": errors}).encode())
    os.close(out_fd)


children = []
for _ in range(a.clients if targets else 0):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for s, _ in listeners:
            s.close()
        try:
            client(w)
        finally:
            os._exit(0)
    os.close(w)
    children.append((pid, r))


def serve(s, port):
    reply = port.encode()
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        try:
            c.sendall(reply)
        except OSError:
            pass
        finally:
            c.close()


for s, port in listeners:
    threading.Thread(target=serve, args=(s, port), daemon=True).start()
if a.ready:
    open(a.ready, "w").close()

total = {"ok": 0, "fail": 0, "wrong": 0, "by_backend": {}, "errors": {}, "clients": len(children)}
for pid, r in children:
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.waitpid(pid, 0)
    rep = json.loads(b"".join(chunks) or b'{"ok":0,"fail":1,"wrong":0,"by_backend":{},"errors":{"client died":1}}')
    for k in ("ok", "fail", "wrong"):
        total[k] += rep[k]
    for d in ("by_backend", "errors"):
        for k, v in rep[d].items():
            total[d][k] = total[d].get(k, 0) + v
if not targets and a.until:
    while not os.path.exists(a.until):
        time.sleep(0.05)
print(json.dumps(total))
sys.stdout.flush()
