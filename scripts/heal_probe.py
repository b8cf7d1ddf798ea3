"""Heal probe on a large store, without reloading it.

    python3 scripts/heal_probe.py BINARY DIR N

DIR is an 8-node directory kept by `scripts/bench-cluster.sh --nodes 8 ... --keep --workdir DIR`
(node0 ... node7). The probe starts nodes 0-3 on it, appends N messages to them from 16 threads
(random accounts user0..user9999, INBOX), starts nodes 4-7, and prints one JSON line with the
seconds until every digest agrees. MAILMESH_PROBE_CONFIG names a TOML config file the nodes get.
The nodes log at debug level to DIR/nodeI/diverge.log, which
shows each session's phases. The data is changed: copy DIR first to compare two builds.
"""
import json, os, random, subprocess, sys, threading, time, urllib.request

binary, root, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Below the kernel's ephemeral range (32768 and up here), so no outgoing connection holds them.
base_listen, base_http = 23300, 23400
procs = []

def start(i):
    peers = ["--config", os.environ["MAILMESH_PROBE_CONFIG"]] if os.environ.get("MAILMESH_PROBE_CONFIG") else []
    for j in range(8):
        if j != i and (j < 4 or j < i):
            peers += ["--peer", f"/ip4/127.0.0.1/tcp/{base_listen + j}"]
    env = dict(os.environ, RUST_LOG="info,libp2p_gossipsub=warn,mailmesh::node=debug")
    log = open(os.path.join(root, f"node{i}", "diverge.log"), "ab")
    p = subprocess.Popen([binary, "node", "--name", f"node{i}", "--data-dir", os.path.join(root, f"node{i}"),
                          "--listen", f"/ip4/127.0.0.1/tcp/{base_listen + i}", "--http", f"127.0.0.1:{base_http + i}",
                          "--cluster", "diverge", "--gossip-interval-ms", "1000"] + peers,
                         stdout=log, stderr=log, env=env)
    procs.append(p)

def get(i, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{base_http + i}{path}", timeout=5) as r:
        return json.loads(r.read())

def healthy(i):
    try:
        return get(i, "/healthz") is not None
    except Exception:
        return False

for i in range(4):
    start(i)
while not all(healthy(i) for i in range(4)):
    time.sleep(0.2)
counter = iter(range(count))
lock = threading.Lock()
def load():
    rng = random.Random(threading.get_ident())
    while True:
        with lock:
            n = next(counter, None)
        if n is None:
            return
        node = rng.randrange(4)
        account = f"user{rng.randrange(10000)}"
        body = f"From: probe@example.org\r\nSubject: probe {n}\r\n\r\n{'x' * rng.randrange(200, 8000)}\r\n".encode()
        req = urllib.request.Request(f"http://127.0.0.1:{base_http + node}/v1/mailboxes/{account}/INBOX/messages",
                                     data=body, method="POST")
        urllib.request.urlopen(req, timeout=30).read()
t0 = time.time()
threads = [threading.Thread(target=load) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
load_s = time.time() - t0
time.sleep(3)
for i in range(4, 8):
    start(i)
while not all(healthy(i) for i in range(4, 8)):
    time.sleep(0.1)
t1 = time.time()
agreed = None
while time.time() - t1 < 240:
    try:
        digests = {get(i, "/v1/status")["digest"] for i in range(8)}
    except Exception:
        digests = {None, 1}
    if len(digests) == 1:
        agreed = time.time() - t1
        break
    time.sleep(0.5)
print(json.dumps({"appended": count, "load_seconds": round(load_s, 1), "heal_seconds": agreed and round(agreed, 1)}))
for p in procs:
    p.kill()
