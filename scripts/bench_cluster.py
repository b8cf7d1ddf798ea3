#!/usr/bin/env python3
"""Cluster-scale benchmark of mailmesh: real `mailmesh node` processes on 127.0.0.1.

    bench_cluster.py --binary PATH --nodes N --mailboxes M --messages K [--latency-ms L] --json

What it does, in order, and what it measures (all in one JSON object, printed as the last line):

1. Starts N nodes on 127.0.0.1, HTTP on port 0 read from data_dir/http.addr as src/harness.rs
   does. Without relays, libp2p listens on port 0 too: the nodes start one after another, each
   reading its listen address from /v1/status (the `listen` list) and told to --peer every node
   started before it, so no port is chosen by binding and releasing. With --latency-ms or --relay,
   each node is told to --peer the relay in front of every other node (scripts/latency_relay.py,
   one relay process per destination node, L ms one-way delay per direction). The relays listen
   on port 0 and report their ports, the nodes start told of those, and each relay learns its
   node's port once that node reports it (relays hold connections until then): no port is
   chosen by binding and releasing.
   Waits until each node has N-1 peers.
2. Appends K messages (RFC 5322 text, log-normal sizes, median 4 KiB) to M mailboxes at random
   nodes from --clients threads. `appends.per_second` = acknowledged appends / wall time.
3. Visibility: every (K / --samples)-th append by index, once acknowledged and however many are
   being polled, is handed to a separate poller process, where one thread per node GETs
   .../messages/{id} in a tight loop; the time from the acknowledgement to the last node
   answering 200 is the append's visibility time. p50, p99 and max are over every sample: one
   not visible on all nodes within --visibility-timeout counts as that timeout (a lower bound of
   its true time), so slow periods are neither skipped nor left out.
   `poll_sweep_ms` is the poller's mean sweep time, the resolution of these figures. The nodes' own
   `mailmesh_replication_lag_seconds` histogram (origin stamp to arrival) is reported next to it.
   Under `traffic`, `records_pulled_by_reconciliation`, `reconcile_rounds` and
   `mailboxes_found_divergent` show how much anti-entropy ran while gossip was delivering.
4. Waits until every node's digest agrees (`drain_seconds` after the last acknowledgement), then
   counts traffic over steps 2-4:
   - `wire_bytes`: TCP payload bytes every node process sent on its peer sockets (kernel tcp_info
     bytes_acked, read with `ss -tinp` every --socket-poll-seconds during the load and drain; HTTP
     sockets excluded). A socket that closed between polls counts with the last bytes_acked seen
     (`wire_sockets_closed` says how many; what one sent after its last poll is missed, so with
     closed sockets the figure is a lower bound). This is everything: gossipsub data
     and control (IHAVE/IWANT/GRAFT/IDONTWANT), forwards, request-response, identify, ping, and the
     noise and yamux framing;
   - `app_bytes`: what the node counts itself: mailmesh_net_request_bytes_total and
     mailmesh_net_response_bytes_total with direction="outbound", plus gossipsub's
     gossipsub_topic_msg_sent_bytes_total (every message copy sent to every peer, forwards included,
     protobuf envelope included; gossipsub control messages are not in it);
   - `floor_bytes`: each operation delivered once to each other node: (N-1) x (sum of message sizes
     + appends x the record's information content). The record's information content is defined
     here, not read from the node's own encoding: the message ID (16 bytes, its first 6 the
     receive time), the blob hash (32), the size (8), the origin node (8) and the mailbox's name
     (account and mailbox as UTF-8). New messages carry no flags. `record_bytes_encoded_estimate`
     still shows what the node's push payload spends per record, for comparison.
5. Idle: after agreement, waits until no reconciliation round is started for 2 s (sessions begun
   during the load go on walking the mailboxes that differed), then samples the same counters
   over --idle-seconds (60 by default): bytes per second per node. Nodes started together send
   their digest heartbeat (every 30 gossip intervals) at about the same moment, so a window
   shorter than 30 s reads either nothing or a whole burst.
6. Partition (--partition kill, the default): SIGKILLs the second half of the nodes, appends 10% of
   K to the first half, restarts them and times until every digest agrees (`heal_seconds`, from
   the restarted nodes answering /healthz; `restart_to_agreement_seconds` includes process start).
   This is a crash of half the cluster, not a network partition. --partition relay (needs relays)
   instead blocks the relay links between the halves, appends 10% of K at random nodes of both
   halves, unblocks and times agreement; it checks with `ss` whether nodes connected directly,
   around the relays (they learn each other's real addresses from identify and digest gossip).
7. Peak RSS per node: VmHWM from /proc/<pid>/status (before a kill and at the end).

The machine's cores are shared by all nodes, the relays and this script. Python 3.11 standard
library only; `ss` (iproute2) is used for the wire bytes when present.
"""

import argparse
import http.client
import json
import math
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

INLINE_BLOB_BYTES = 64 * 1024  # the node's default inline_blob_bytes


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(len(ordered) * fraction)))
    return ordered[rank - 1]


def record_information_bytes(account, mailbox):
    """What a new message's record must tell another node, beyond the message itself: its ID (16
    bytes; the first 6 are the receive time), blob hash (32), size (8), origin node (8) and the
    mailbox it is in (account and name, UTF-8). A new message has no flags yet."""
    return 16 + 32 + 8 + 8 + len(account.encode()) + len(mailbox.encode())


def rounded(value, digits=3):
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------

class Http:
    """Keep-alive connections, one per (thread, address)."""

    def __init__(self, timeout=30.0):
        self.local = threading.local()
        self.timeout = timeout

    def request(self, address, method, path, body=None, headers=None):
        connections = self.local.__dict__.setdefault("connections", {})
        for attempt in range(2):
            connection = connections.get(address)
            if connection is None:
                host, port = address.rsplit(":", 1)
                connection = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
                connections[address] = connection
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                connections.pop(address, None)
                if attempt == 1:
                    raise
        raise OSError("unreachable")

    def json(self, address, path):
        status, body = self.request(address, "GET", path)
        if status != 200:
            raise OSError(f"GET {path} answered {status}")
        return json.loads(body)


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text -> list of (name, labels dict, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = METRIC_LINE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = dict(METRIC_LABEL.findall(match.group(2) or ""))
        samples.append((match.group(1), labels, value))
    return samples


def metric_sum(samples, name, **labels):
    return sum(value for sample_name, sample_labels, value in samples
               if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()))


def histogram_quantile(samples, name, fraction):
    """Upper bound of the bucket holding the given quantile (bucket counts are cumulative)."""
    buckets = {}
    for sample_name, labels, value in samples:
        if sample_name == name + "_bucket":
            bound = math.inf if labels.get("le") == "+Inf" else float(labels.get("le", "inf"))
            buckets[bound] = buckets.get(bound, 0) + value
    if not buckets:
        return None
    total = buckets.get(math.inf, max(buckets.values()))
    if total == 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= fraction * total:
            return bound
    return math.inf


# ------------------------------------------------------------------------------------------------
# Nodes and relays
# ------------------------------------------------------------------------------------------------

class Node:
    def __init__(self, index, binary, root, cluster, gossip_interval_ms):
        self.index = index
        self.name = f"node{index}"
        self.binary = binary
        self.data_dir = os.path.join(root, self.name)
        self.cluster = cluster
        self.gossip_interval_ms = gossip_interval_ms
        # None: listen on port 0 and learn the port from /v1/status; a restart reuses that port.
        self.listen_port = None
        self.listen_address = None  # /ip4/127.0.0.1/tcp/PORT/p2p/ID, as the node reports it
        self.peers = []
        self.process = None
        self.http = None
        self.peak_rss_kb = 0
        self.cpu_seconds_before = 0.0  # CPU time of earlier lives of this node

    def arguments(self):
        arguments = [
            self.binary, "node", "--name", self.name, "--data-dir", self.data_dir,
            "--listen", f"/ip4/127.0.0.1/tcp/{self.listen_port or 0}", "--http", "127.0.0.1:0",
            "--cluster", self.cluster, "--gossip-interval-ms", str(self.gossip_interval_ms),
        ]
        for peer in self.peers:
            arguments += ["--peer", peer]
        return arguments

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        address_file = os.path.join(self.data_dir, "http.addr")
        if os.path.exists(address_file):
            os.remove(address_file)
        log_file = open(os.path.join(self.data_dir, "node.log"), "ab")
        environment = dict(os.environ)
        environment.setdefault("RUST_LOG", "info,libp2p_gossipsub=warn")
        self.process = subprocess.Popen(self.arguments(), stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=log_file, env=environment)
        log_file.close()
        self.http = None

    def wait_healthy(self, http_client, timeout=60.0):
        address_file = os.path.join(self.data_dir, "http.addr")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.data_dir}/node.log")
            try:
                with open(address_file) as handle:
                    address = handle.read().strip()
                if address and http_client.request(address, "GET", "/healthz")[0] == 200:
                    self.http = address
                    self.read_listen_address(http_client)
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start within {timeout} s")

    def read_listen_address(self, http_client):
        """The libp2p address the node reports listening on (port 0 resolved by the kernel)."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            listen = http_client.json(self.http, "/v1/status").get("listen") or []
            for address in listen:
                match = re.match(r"^/ip4/127\.0\.0\.1/tcp/(\d+)", address)
                if match and int(match.group(1)) != 0:
                    self.listen_address = address
                    self.listen_port = int(match.group(1))
                    return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} reported no 127.0.0.1 listen address")

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def read_rss(self):
        if not self.alive():
            return
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        except OSError:
            pass

    def cpu_seconds(self):
        """User + system CPU seconds of this node over all its lives so far."""
        current = 0.0
        if self.alive():
            try:
                with open(f"/proc/{self.pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                current = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return self.cpu_seconds_before + current

    def kill(self, sig=signal.SIGKILL):
        if not self.alive():
            return
        self.read_rss()
        self.cpu_seconds_before = self.cpu_seconds()
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop(self):
        if self.alive():
            self.read_rss()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Relay:
    """One latency_relay.py process: every link into one destination node."""

    def __init__(self, script, delay_ms, links, root, name):
        """`links`: the link IDs. Each listens on a port the kernel chooses (`self.ports`, ID ->
        port) and holds its connections until `set_target` names the destination's port."""
        arguments = [sys.executable, script, "--delay-ms", str(delay_ms)]
        for ident in links:
            arguments += ["--link", f"{ident}:0:0"]
        self.log = open(os.path.join(root, f"{name}.log"), "ab")
        self.process = subprocess.Popen(arguments, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)
        line = self.process.stdout.readline().strip()
        if not line.startswith("ready "):
            raise RuntimeError(f"relay {name} did not start: {line!r}")
        self.ports = json.loads(line[len("ready "):])
        self.links = list(links)
        self.lock = threading.Lock()

    def set_target(self, port):
        for ident in self.links:
            answer = self.command(f"target {ident} {port}")
            if answer != "ok":
                raise RuntimeError(f"relay link {ident} refused its target: {answer!r}")

    def command(self, text):
        with self.lock:
            self.process.stdin.write(text + "\n")
            self.process.stdin.flush()
            return self.process.stdout.readline().strip()

    def stop(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------
# Wire bytes from the kernel (ss -tinp)
# ------------------------------------------------------------------------------------------------

SS_SOCKET = re.compile(r'^ESTAB\s+\d+\s+\d+\s+(\S+)\s+(\S+)(?:\s+users:\(\((.*)\)\))?')
SS_PID = re.compile(r'pid=(\d+)')
SS_ACKED = re.compile(r'\bbytes_acked:(\d+)')


def socket_snapshot():
    """{(local, remote): (pids, bytes_acked)} for every established TCP socket, or None without ss."""
    try:
        output = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sockets = {}
    current = None
    for line in output.splitlines():
        match = SS_SOCKET.match(line)
        if match:
            pids = frozenset(int(pid) for pid in SS_PID.findall(match.group(3) or ""))
            current = (match.group(1), match.group(2))
            sockets[current] = (pids, 0)
        elif current is not None and line.startswith(("\t", " ")):
            acked = SS_ACKED.search(line)
            if acked:
                sockets[current] = (sockets[current][0], int(acked.group(1)))
            current = None
    return sockets


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def peer_sockets(snapshot, nodes):
    """{node index: {(local, remote): bytes_acked}} for the nodes' non-HTTP sockets."""
    by_pid = {node.pid: node for node in nodes if node.alive()}
    result = {node.index: {} for node in nodes}
    for key, (pids, acked) in snapshot.items():
        for pid in pids:
            node = by_pid.get(pid)
            if node is None or node.http is None or port_of(key[0]) == port_of(node.http):
                continue
            result[node.index][key] = acked
    return result


class SocketWatch:
    """Bytes each node sent on its peer sockets over a window, sockets that closed included: the
    sockets' counters are read every `interval` seconds, and a socket that is gone at the end
    counts with the last bytes_acked seen (what it sent after that read is missed)."""

    def __init__(self, nodes, interval):
        self.nodes = nodes
        self.interval = interval
        snapshot = socket_snapshot()
        self.available = snapshot is not None
        self.before = peer_sockets(snapshot, nodes) if self.available else None
        self.last = {index: dict(sockets) for index, sockets in (self.before or {}).items()}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        if self.available:
            self.thread.start()

    def read(self):
        snapshot = socket_snapshot()
        if snapshot is None:
            return None
        current = peer_sockets(snapshot, self.nodes)
        with self.lock:
            for index, sockets in current.items():
                seen = self.last.setdefault(index, {})
                for key, acked in sockets.items():
                    seen[key] = max(seen.get(key, 0), acked)
        return current

    def watch(self):
        while not self.stopping.wait(self.interval):
            self.read()

    def finish(self):
        """({node index: bytes sent}, sockets closed during the window), or (None, None) without ss."""
        if not self.available:
            return None, None
        self.stopping.set()
        self.thread.join(timeout=60)
        final = self.read() or {}
        sent, closed = {}, 0
        with self.lock:
            for node in self.nodes:
                before = self.before.get(node.index, {})
                still_open = final.get(node.index, {})
                total = 0
                for key, acked in self.last.get(node.index, {}).items():
                    total += acked - before.get(key, 0)
                    closed += key not in still_open
                sent[node.index] = total
        return sent, closed


def direct_links(snapshot, nodes):
    """Pairs of nodes with a TCP connection straight between their processes (no relay)."""
    if snapshot is None:
        return None
    by_pid = {node.pid: node.index for node in nodes if node.alive()}
    pairs = set()
    for (local, remote), (pids, _) in snapshot.items():
        other = snapshot.get((remote, local))
        if other is None:
            continue
        mine = [by_pid[pid] for pid in pids if pid in by_pid]
        theirs = [by_pid[pid] for pid in other[0] if pid in by_pid]
        for a in mine:
            for b in theirs:
                if a != b:
                    pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------

WORDS = ("the meeting invoice attached please review quarterly report thanks regards schedule project "
         "update deadline customer shipment contract draft budget team tomorrow agenda minutes question "
         "answer server release notes before after we will").split()


class MessageMaker:
    def __init__(self, seed, median_bytes, sigma, max_bytes):
        corpus_random = random.Random(seed)
        lines, line = [], []
        length = 0
        while length < 1 << 20:
            word = corpus_random.choice(WORDS)
            line.append(word)
            if sum(len(w) + 1 for w in line) > 72:
                text = " ".join(line) + "\r\n"
                lines.append(text)
                length += len(text)
                line = []
        self.corpus = "".join(lines).encode()
        self.mu = math.log(median_bytes)
        self.sigma = sigma
        self.max_bytes = max_bytes

    def size(self, rng):
        return int(min(self.max_bytes, max(300.0, rng.lognormvariate(self.mu, self.sigma))))

    def make(self, rng, index, size, mailbox):
        header = (f"From: sender{rng.randrange(1000)}@example.org\r\nTo: user{mailbox}@example.net\r\n"
                  f"Subject: benchmark message {index}\r\nDate: Sun, 29 Nov 2026 08:00:00 +0000\r\n"
                  f"Message-ID: <{rng.getrandbits(64):016x}.{index}@example.org>\r\nMIME-Version: 1.0\r\n"
                  f"Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()
        need = max(0, size - len(header))
        parts = []
        while need > 0:
            offset = rng.randrange(len(self.corpus))
            piece = self.corpus[offset:offset + need]
            parts.append(piece)
            need -= len(piece)
        return header + b"".join(parts)


# ------------------------------------------------------------------------------------------------
# Visibility poller (a separate process, so the load threads' GIL does not delay it)
# ------------------------------------------------------------------------------------------------

def poller_main(samples, results, timeout, node_count):
    """Reads (id, path, ack_time, [(index, http), ...]) from `samples` (None ends the input); one
    thread per node polls that node for every pending sample until it answers 200. Writes one
    result dict per sample, then a summary with the mean sweep time."""
    lock = threading.Lock()
    pending = {}
    stop = threading.Event()
    sweep_stats = []

    def poll(index):
        client = Http(timeout=10.0)
        sweeps, busy = 0, 0.0
        while not stop.is_set():
            with lock:
                work = [(ident, sample["path"], sample["targets"][index])
                        for ident, sample in pending.items() if index in sample["targets"]]
            if not work:
                time.sleep(0.001)
                continue
            started = time.monotonic()
            for ident, path, address in work:
                try:
                    status, _ = client.request(address, "GET", path)
                except (OSError, http.client.HTTPException):
                    continue
                if status != 200:
                    continue
                now = time.monotonic()
                with lock:
                    sample = pending.get(ident)
                    if sample is None or index not in sample["targets"]:
                        continue
                    del sample["targets"][index]
                    sample["seen"] = max(sample["seen"], now)
                    if not sample["targets"]:
                        del pending[ident]
                        results.put({"id": ident, "visible": sample["seen"] - sample["ack"]})
            sweeps += 1
            busy += time.monotonic() - started
            time.sleep(0.0005)
        with lock:
            sweep_stats.append((sweeps, busy))

    threads = [threading.Thread(target=poll, args=(index,), daemon=True) for index in range(node_count)]
    for thread in threads:
        thread.start()
    finished = False
    while True:
        try:
            item = samples.get(timeout=0.01)
            if item is None:
                finished = True
            else:
                ident, path, acked, targets = item
                with lock:
                    pending[ident] = {"path": path, "ack": acked, "targets": dict(targets), "seen": acked}
        except queue.Empty:
            pass
        now = time.monotonic()
        with lock:
            for ident in [ident for ident, sample in pending.items() if now - sample["ack"] > timeout]:
                del pending[ident]
                results.put({"id": ident, "visible": None})
            empty = not pending
        if finished and empty:
            break
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    sweeps = sum(count for count, _ in sweep_stats)
    busy = sum(seconds for _, seconds in sweep_stats)
    results.put({"summary": True, "sweeps": sweeps, "sweep_ms": 1000 * busy / max(1, sweeps)})


class VisibilityResults:
    """Collects the poller's results in the background and counts samples still in flight."""

    def __init__(self, results):
        self.results = results
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.visible = []
        self.timed_out = 0
        self.summary = None
        self.thread = threading.Thread(target=self.collect, daemon=True)
        self.thread.start()

    def sent(self):
        with self.lock:
            self.in_flight += 1

    def collect(self):
        while True:
            item = self.results.get()
            with self.lock:
                if item.get("summary"):
                    self.summary = item
                    return
                self.in_flight -= 1
                if item["visible"] is None:
                    self.timed_out += 1
                else:
                    self.visible.append(item["visible"])


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, options, root):
        self.options = options
        self.root = root
        self.http = Http()
        self.cluster = f"bench{os.getpid()}"
        self.nodes = [Node(index, options.binary, root, self.cluster, options.gossip_interval_ms)
                      for index in range(options.nodes)]
        self.relays = []
        self.relayed = options.relay or options.latency_ms is not None
        self.link_ids = {}  # (i, j) -> relay link id, for the link i -> j
        self.relay_of = {}  # j -> Relay

    def start(self):
        nodes = self.nodes
        started = time.monotonic()
        if self.relayed:
            # Relays first, on ports the kernel chooses; then the nodes, told of the relays' ports;
            # each relay learns its node's port (port 0 too) once the node reports it.
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "latency_relay.py")
            for destination in nodes:
                links = [f"{source.index}-{destination.index}" for source in nodes if source is not destination]
                relay = Relay(script, self.options.latency_ms or 0, links, self.root, f"relay{destination.index}")
                for source in nodes:
                    if source is not destination:
                        ident = f"{source.index}-{destination.index}"
                        self.link_ids[(source.index, destination.index)] = ident
                        source.peers.append(f"/ip4/127.0.0.1/tcp/{relay.ports[ident]}")
                self.relays.append(relay)
                self.relay_of[destination.index] = relay
            for node in nodes:
                node.start()
            for node in nodes:
                node.wait_healthy(self.http)
                self.relay_of[node.index].set_target(node.listen_port)
        else:
            # One after another: each node dials the reported addresses of those before it, so
            # every pair is dialled once and no port is guessed.
            for index, node in enumerate(nodes):
                node.peers = [other.listen_address for other in nodes[:index]]
                node.start()
                node.wait_healthy(self.http)
        self.wait_mesh(nodes, timeout=90)
        self.wait_gossip_peers(nodes, timeout=60)
        return time.monotonic() - started

    def wait_gossip_peers(self, nodes, timeout):
        """Until every node knows every other node's subscription to both gossip topics (before
        that an operation published reaches only some peers, and the rest get it by
        reconciliation), then one more gossipsub heartbeat for the mesh."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = True
            for node, samples in self.metrics().items():
                counts = [value for name, _, value in samples if name == "gossipsub_topic_peers_counts"]
                if len(counts) < 2 or min(counts) < len(self.nodes) - 1:
                    ready = False
                    break
            if ready:
                time.sleep(self.options.settle_seconds)
                return True
            time.sleep(0.1)
        raise RuntimeError(f"gossipsub subscriptions did not spread within {timeout} s")

    def peer_count(self, node):
        try:
            return len(self.http.json(node.http, "/v1/status").get("peers", []))
        except (OSError, ValueError, http.client.HTTPException):
            return -1

    def wait_mesh(self, nodes, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.peer_count(node) >= len(self.nodes) - 1 for node in nodes):
                return True
            time.sleep(0.1)
        counts = {node.name: self.peer_count(node) for node in nodes}
        raise RuntimeError(f"the nodes did not all connect within {timeout} s: {counts}")

    def digests(self):
        result = []
        for node in self.nodes:
            try:
                result.append(self.http.json(node.http, "/v1/status").get("digest"))
            except (OSError, ValueError, http.client.HTTPException):
                result.append(None)
        return result

    def wait_agreement(self, timeout):
        """Seconds until every digest is equal (polled every 20 ms), or None on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            digests = self.digests()
            if digests[0] and all(digest == digests[0] for digest in digests):
                return time.monotonic() - started
            time.sleep(0.02)
        return None

    def wait_heal(self, timeout):
        """(seconds until every node has all peers connected, seconds until every digest is
        equal), polling every 50 ms; None for what did not happen within `timeout`."""
        started = time.monotonic()
        connected = agreed = None
        while time.monotonic() - started < timeout and agreed is None:
            statuses = []
            for node in self.nodes:
                try:
                    statuses.append(self.http.json(node.http, "/v1/status"))
                except (OSError, ValueError, http.client.HTTPException):
                    statuses.append({})
            now = time.monotonic() - started
            if connected is None and all(len(status.get("peers", [])) >= len(self.nodes) - 1 for status in statuses):
                connected = now
            digests = [status.get("digest") for status in statuses]
            if digests[0] and all(digest == digests[0] for digest in digests):
                agreed = now
            else:
                time.sleep(0.05)
        return connected, agreed

    def message_counts(self):
        """Messages per node (sum over GET /v1/mailboxes), to show how far a heal got."""
        counts = []
        for node in self.nodes:
            try:
                listing = self.http.json(node.http, "/v1/mailboxes").get("mailboxes", [])
                counts.append(sum(entry.get("count", 0) for entry in listing))
            except (OSError, ValueError, http.client.HTTPException):
                counts.append(None)
        return counts

    def metrics(self):
        result = {}
        for node in self.nodes:
            try:
                status, body = self.http.request(node.http, "GET", "/metrics")
                result[node.index] = parse_metrics(body.decode()) if status == 200 else []
            except (OSError, http.client.HTTPException):
                result[node.index] = []
        return result

    def stop(self):
        for node in self.nodes:
            node.stop()
        for relay in self.relays:
            relay.stop()


class Load:
    """Appends `count` messages at random nodes among `targets` from several threads."""

    def __init__(self, cluster, maker, count, targets, threads, seed, sample_every=None, sample_queue=None,
                 index_offset=0, visibility=None):
        self.cluster = cluster
        self.maker = maker
        self.count = count
        self.targets = targets
        self.threads = threads
        self.seed = seed
        self.sample_every = sample_every
        self.sample_queue = sample_queue
        self.index_offset = index_offset
        self.visibility = visibility
        self.next = 0
        self.lock = threading.Lock()
        self.acked = 0
        self.failed = 0
        self.errors = {}
        self.latencies = []
        self.sizes = []
        self.inline_bytes = 0
        self.record_information_bytes = 0
        self.mailboxes_written = set()
        self.last_ack = None

    def take(self):
        with self.lock:
            if self.next >= self.count:
                return None
            self.next += 1
            return self.next - 1

    def want_sample(self, index):
        """Samples every `sample_every`-th append (by its index, so the sample is uniform over the
        load), whatever is being polled: skipping samples while the poller is busy, or spacing them
        from the last one taken, would under-sample exactly the slow periods."""
        if index % self.sample_every != 0:
            return False
        with self.visibility.lock:
            self.visibility.in_flight += 1
            self.visibility.peak_in_flight = max(self.visibility.peak_in_flight, self.visibility.in_flight)
        return True

    def worker(self, thread_index):
        rng = random.Random(self.seed * 1000 + thread_index)
        http_client = self.cluster.http
        latencies, sizes, inline, acked, failed, information = [], [], 0, 0, 0, 0
        written = set()
        mailboxes = self.cluster.options.mailboxes
        while True:
            index = self.take()
            if index is None:
                break
            index += self.index_offset
            node = rng.choice(self.targets)
            mailbox = rng.randrange(mailboxes)
            size = self.maker.size(rng)
            body = self.maker.make(rng, index, size, mailbox)
            path = f"/v1/mailboxes/user{mailbox}/INBOX/messages"
            started = time.monotonic()
            try:
                status, answer = http_client.request(node.http, "POST", path, body=body,
                                                     headers={"Content-Type": "message/rfc822"})
            except (OSError, http.client.HTTPException) as error:
                status, answer = None, str(error).encode()
            acknowledged = time.monotonic()
            if status == 201:
                acked += 1
                written.add(mailbox)
                latencies.append(acknowledged - started)
                sizes.append(len(body))
                if len(body) <= INLINE_BLOB_BYTES:
                    inline += len(body)
                information += record_information_bytes(f"user{mailbox}", "INBOX")
                if self.sample_queue is not None and self.want_sample(index):
                    ident = json.loads(answer)["id"]
                    targets = [(other.index, other.http) for other in self.cluster.nodes
                               if other is not node and other.alive()]
                    self.sample_queue.put((ident, f"{path}/{ident}", acknowledged, targets))
            else:
                failed += 1
                with self.lock:
                    key = f"{status}: {answer[:120].decode(errors='replace')}"
                    self.errors[key] = self.errors.get(key, 0) + 1
        with self.lock:
            self.latencies += latencies
            self.sizes += sizes
            self.inline_bytes += inline
            self.record_information_bytes += information
            self.mailboxes_written |= written
            self.acked += acked
            self.failed += failed
            now = time.monotonic()
            self.last_ack = now if self.last_ack is None else max(self.last_ack, now)

    def run(self):
        started = time.monotonic()
        workers = [threading.Thread(target=self.worker, args=(index,), daemon=True) for index in range(self.threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self.seconds = time.monotonic() - started
        return self


def target(value, limit, smaller_is_better=True, skipped=False):
    if skipped:
        return {"value": None, "target": limit, "met": None, "skipped": True}
    if value is None:
        return {"value": None, "target": limit, "met": False}
    met = value <= limit if smaller_is_better else value >= limit
    return {"value": rounded(value), "target": limit, "met": met}


def run(options):
    root = options.workdir or tempfile.mkdtemp(prefix="mailmesh-bench-")
    os.makedirs(root, exist_ok=True)
    binary = os.path.join(root, "mailmesh")
    shutil.copy2(options.binary, binary)  # immune to rebuilds while we run
    options.binary = binary
    context = multiprocessing.get_context("spawn")
    sample_queue, result_queue = context.Queue(), context.Queue()
    poller = context.Process(target=poller_main, daemon=True,
                             args=(sample_queue, result_queue, options.visibility_timeout, options.nodes))
    poller.start()
    visibility = VisibilityResults(result_queue)
    cluster = Cluster(options, root)
    report = {
        "benchmark": "cluster",
        "nodes": options.nodes,
        "mailboxes": options.mailboxes,
        "messages": options.messages,
        "latency_ms": options.latency_ms,
        "relayed": cluster.relayed,
        "clients": options.clients,
        "gossip_interval_ms": options.gossip_interval_ms,
        "cores": os.cpu_count(),
        "note": "all nodes, relays and the load generator share the machine's cores",
    }
    try:
        log(f"starting {options.nodes} nodes in {root}" + (f" behind relays ({options.latency_ms or 0} ms)" if cluster.relayed else ""))
        report["mesh_seconds"] = rounded(cluster.start())
        nodes = cluster.nodes
        if cluster.relayed:
            report["direct_links_at_start"] = direct_links(socket_snapshot(), nodes)

        maker = MessageMaker(options.seed, options.median_bytes, options.sigma, options.max_bytes)
        metrics_before = cluster.metrics()
        sockets = SocketWatch(nodes, options.socket_poll_seconds)
        cpu_before = {node.index: node.cpu_seconds() for node in nodes}
        sample_every = max(1, options.messages // max(1, options.samples))
        log(f"appending {options.messages} messages to {options.mailboxes} mailboxes from {options.clients} clients")
        load = Load(cluster, maker, options.messages, nodes, options.clients, options.seed,
                    sample_every=sample_every, sample_queue=sample_queue, visibility=visibility).run()
        drain = cluster.wait_agreement(options.converge_timeout)
        drain_from_last_ack = None
        if drain is not None and load.last_ack is not None:
            drain_from_last_ack = time.monotonic() - load.last_ack
        wire, closed = sockets.finish()
        metrics_after = cluster.metrics()
        cpu_after = {node.index: node.cpu_seconds() for node in nodes}
        sample_queue.put(None)
        visibility.thread.join(timeout=options.visibility_timeout + 30)
        visible, timed_out, poll_summary = visibility.visible, visibility.timed_out, visibility.summary or {}
        poller.join(timeout=5)

        report["message_bytes"] = {
            "median": percentile(load.sizes, 0.5),
            "mean": rounded(sum(load.sizes) / max(1, len(load.sizes)), 0),
            "p99": percentile(load.sizes, 0.99),
            "max": max(load.sizes) if load.sizes else None,
            "total": sum(load.sizes),
        }
        report["appends"] = {
            "acknowledged": load.acked,
            "failed": load.failed,
            "errors": load.errors,
            "seconds": rounded(load.seconds),
            "per_second": rounded(load.acked / load.seconds, 1),
            "ack_latency_ms": {"p50": rounded(1000 * (percentile(load.latencies, 0.5) or 0)),
                               "p99": rounded(1000 * (percentile(load.latencies, 0.99) or 0))},
            "node_cpu_seconds": rounded(sum(cpu_after[i] - cpu_before[i] for i in cpu_after), 2),
        }
        lag = [sample for index in metrics_after for sample in metrics_after[index]]
        # A sample that timed out took at least the timeout: it stays in the percentiles as that.
        every_sample = visible + [options.visibility_timeout] * timed_out
        report["visibility"] = {
            "samples": len(every_sample),
            "visible_on_all": len(visible),
            "timed_out": timed_out,
            "timeout_counted_as_ms": rounded(1000 * options.visibility_timeout),
            "p50_ms": rounded(1000 * percentile(every_sample, 0.5)) if every_sample else None,
            "p99_ms": rounded(1000 * percentile(every_sample, 0.99)) if every_sample else None,
            "max_ms": rounded(1000 * max(every_sample)) if every_sample else None,
            "peak_samples_in_flight": visibility.peak_in_flight,
            "poll_sweep_ms": rounded(poll_summary.get("sweep_ms")),
            "node_replication_lag_histogram_s": {
                "p50_le": histogram_quantile(lag, "mailmesh_replication_lag_seconds", 0.5),
                "p99_le": histogram_quantile(lag, "mailmesh_replication_lag_seconds", 0.99),
            },
        }
        try:
            report["mailboxes_created"] = cluster.http.json(nodes[0].http, "/v1/status").get("mailboxes")
        except (OSError, ValueError, http.client.HTTPException):
            report["mailboxes_created"] = None
        report["ping_rtt_median_le_s"] = histogram_quantile(lag, "libp2p_ping_rtt_seconds", 0.5)
        report["drain_seconds"] = rounded(drain_from_last_ack)
        report["converged_after_load"] = drain is not None

        # Traffic over the load and its drain.
        def delta(name, **labels):
            return {index: metric_sum(metrics_after[index], name, **labels) - metric_sum(metrics_before[index], name, **labels)
                    for index in metrics_after}
        request_out = delta("mailmesh_net_request_bytes_total", direction="outbound")
        response_out = delta("mailmesh_net_response_bytes_total", direction="outbound")
        gossipsub_sent = delta("gossipsub_topic_msg_sent_bytes_total")
        operation_payload = delta("mailmesh_gossip_bytes_total", kind="operation", direction="out")
        publish_skipped = delta("mailmesh_net_gossip_publish_skipped_total", topic="operations")
        records_pulled = delta("mailmesh_records_pulled_total")
        divergent = delta("mailmesh_mailboxes_divergent_total")
        rounds = delta("mailmesh_reconcile_rounds_total")
        sessions = delta("mailmesh_reconcile_sessions_total")
        digest_payload = delta("mailmesh_gossip_bytes_total", kind="digest", direction="out")
        appends = max(1, load.acked)
        # For comparison only: what the node's own push payload spends per record (the origins'
        # operation gossip, each pushed once to each of the other N-1 nodes, minus inline bytes).
        record_bytes_encoded = max(0.0, (sum(operation_payload.values()) / max(1, options.nodes - 1) - load.inline_bytes) / appends)
        # The floor: every message and its record's information content, once to each other node.
        floor = (options.nodes - 1) * (sum(load.sizes) + load.record_information_bytes)
        app_total = sum(request_out.values()) + sum(response_out.values()) + sum(gossipsub_sent.values())
        wire_total = sum(wire.values()) if wire is not None else None
        report["traffic"] = {
            "wire_bytes": wire_total,
            "wire_sockets_closed": closed,
            "wire_is_lower_bound": bool(closed),
            "app_bytes": app_total,
            "app_breakdown": {
                "request_outbound": sum(request_out.values()),
                "response_outbound": sum(response_out.values()),
                "gossipsub_sent_incl_forwards": sum(gossipsub_sent.values()),
                "operation_gossip_published": sum(operation_payload.values()),
                "digest_gossip_published": sum(digest_payload.values()),
            },
            "operation_publishes_skipped": sum(publish_skipped.values()),
            "records_pulled_by_reconciliation": sum(records_pulled.values()),
            "reconcile_sessions": sum(sessions.values()),
            "reconcile_rounds": sum(rounds.values()),
            "mailboxes_found_divergent": sum(divergent.values()),
            "record_information_bytes_mean": rounded(load.record_information_bytes / appends, 1),
            "record_bytes_encoded_estimate": rounded(record_bytes_encoded, 1),
            "floor_bytes": round(floor),
            "wire_ratio": rounded(wire_total / floor) if wire_total is not None and floor else None,
            "app_ratio": rounded(app_total / floor) if floor else None,
            "wire_bytes_per_node": wire,
        }

        # Idle gossip, once the reconciliation sessions started during the load have ended (a
        # session walks every mailbox that differed when it started, even if gossip has since
        # delivered them).
        settle_started = time.monotonic()
        last_rounds = None
        while time.monotonic() - settle_started < options.settle_timeout:
            rounds = sum(metric_sum(samples, "mailmesh_reconcile_rounds_total") for samples in cluster.metrics().values())
            if rounds == last_rounds:
                break
            last_rounds = rounds
            time.sleep(2.0)
        report["sessions_settled_seconds"] = rounded(time.monotonic() - settle_started, 1)
        metrics_before, sockets = cluster.metrics(), SocketWatch(nodes, options.socket_poll_seconds)
        idle_started = time.monotonic()
        time.sleep(options.idle_seconds)
        wire, idle_closed = sockets.finish()
        metrics_after = cluster.metrics()
        idle = time.monotonic() - idle_started
        gossipsub_sent = delta("gossipsub_topic_msg_sent_bytes_total")
        sync_out = {index: request_out_value + response_out_value for index, request_out_value, response_out_value in
                    zip(metrics_after, delta("mailmesh_net_request_bytes_total", direction="outbound").values(),
                        delta("mailmesh_net_response_bytes_total", direction="outbound").values())}
        per_node = lambda values: rounded(sum(values.values()) / len(nodes) / idle, 1) if values is not None else None
        report["idle"] = {
            "seconds": rounded(idle, 1),
            "wire_bytes_per_second_per_node": per_node(wire),
            "gossipsub_sent_bytes_per_second_per_node": per_node(gossipsub_sent),
            "sync_bytes_per_second_per_node": per_node(sync_out),
            "wire_max_node_bytes_per_second": rounded(max(wire.values()) / idle, 1) if wire else None,
            "wire_sockets_closed": idle_closed,
        }
        for node in nodes:
            node.read_rss()

        # Partition.
        partition_writes = max(1, options.messages // 10)
        half = options.nodes // 2
        first, second = nodes[:options.nodes - half], nodes[options.nodes - half:]
        mode = options.partition
        if mode == "relay" and not cluster.relayed:
            raise RuntimeError("--partition relay needs relays (--latency-ms or --relay)")
        partition = {"mode": mode, "writes": partition_writes, "cut_off_nodes": [node.name for node in second]}
        if mode == "kill":
            log(f"killing {len(second)} nodes, appending {partition_writes} to the other {len(first)}, restarting")
            for node in second:
                node.kill()
            down_started = time.monotonic()
            part_load = Load(cluster, maker, partition_writes, first, options.clients, options.seed + 1,
                             index_offset=options.messages).run()
            restarted = time.monotonic()
            for node in second:
                node.start()
            for node in second:
                node.wait_healthy(cluster.http)
            healthy = time.monotonic()
            reconnected, agreement = cluster.wait_heal(options.converge_timeout)
            partition.update({
                "acknowledged": part_load.acked,
                "failed": part_load.failed,
                "mailboxes_written": len(part_load.mailboxes_written),
                "down_seconds": rounded(restarted - down_started, 1),
                "reconnect_seconds": rounded(reconnected),
                "heal_seconds": rounded(agreement),
                "restart_to_agreement_seconds": rounded(healthy - restarted + agreement) if agreement is not None else None,
                "note": "crash emulation: half the nodes SIGKILLed during the writes, then restarted",
            })
            if cluster.relayed:
                partition["direct_links_after_restart"] = direct_links(socket_snapshot(), nodes)
        elif mode == "relay":
            log(f"blocking the relay links between {len(first)} and {len(second)} nodes")
            group = {node.index: (0 if node in first else 1) for node in nodes}
            for destination, relay in cluster.relay_of.items():
                cut = [cluster.link_ids[(source, destination)] for source in group
                       if source != destination and group[source] != group[destination]]
                relay.command("block " + " ".join(cut))
            cut_started = time.monotonic()
            time.sleep(options.cut_seconds)
            crossing = [pair for pair in (direct_links(socket_snapshot(), nodes) or [])
                        if group[pair[0]] != group[pair[1]]]
            part_load = Load(cluster, maker, partition_writes, nodes, options.clients, options.seed + 1,
                             index_offset=options.messages).run()
            crossing_after = [pair for pair in (direct_links(socket_snapshot(), nodes) or [])
                              if group[pair[0]] != group[pair[1]]]
            digests = cluster.digests()
            partition["diverged_during_cut"] = len(set(digests)) > 1
            partition["cut_seconds"] = rounded(time.monotonic() - cut_started, 1)
            for relay in cluster.relays:
                relay.command("unblock")
            reconnected, agreement = cluster.wait_heal(options.converge_timeout)
            partition.update({
                "acknowledged": part_load.acked,
                "failed": part_load.failed,
                "mailboxes_written": len(part_load.mailboxes_written),
                "reconnect_seconds": rounded(reconnected),
                "heal_seconds": rounded(agreement),
                "direct_links_across_cut": sorted(set(map(tuple, crossing + crossing_after))),
                "note": "relay links between the halves dropped and refused; direct links across the cut mean "
                        "the nodes went around the relays, so the cut was not a real partition",
            })
        if mode != "none" and partition.get("heal_seconds") is None:
            partition["messages_per_node_at_timeout"] = cluster.message_counts()
            partition["messages_acknowledged_in_total"] = load.acked + partition.get("acknowledged", 0)
        report["partition"] = partition
        for node in nodes:
            node.read_rss()
        rss = [rounded(node.peak_rss_kb / 1024, 1) for node in nodes]
        report["rss_mb"] = {"per_node": rss, "max": max(rss)}

        warnings = 0
        for node in nodes:
            try:
                with open(os.path.join(node.data_dir, "node.log"), errors="replace") as handle:
                    warnings += sum(1 for line in handle if " WARN " in line or " ERROR " in line)
            except OSError:
                pass
        report["node_log_warnings"] = warnings

        visibility_limit = 1000.0 if not options.latency_ms else (3 * options.latency_ms + 1000.0)
        report["targets"] = {
            "bytes_ratio_wire": target(report["traffic"]["wire_ratio"], 1.2),
            "bytes_ratio_app": target(report["traffic"]["app_ratio"], 1.2),
            "visibility_p99_ms": target(report["visibility"]["p99_ms"], visibility_limit),
            "partition_heal_seconds": target(partition.get("heal_seconds"), 10.0, skipped=mode == "none"),
            "idle_wire_bytes_per_second_per_node": target(report["idle"]["wire_bytes_per_second_per_node"], 1000.0),
            "rss_mb_per_node": target(report["rss_mb"]["max"], 300.0),
        }
        return report
    finally:
        cluster.stop()
        if poller.is_alive():
            poller.terminate()
        if options.keep:
            log(f"kept {root}")
        elif not options.workdir:
            shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description="mailmesh cluster benchmark (see the module docstring)")
    parser.add_argument("--binary", required=True, help="the mailmesh binary (copied before use)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--mailboxes", type=int, default=10)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=None, help="one-way delay per link, through relays")
    parser.add_argument("--relay", action="store_true", help="put relays between the nodes even without delay")
    parser.add_argument("--partition", choices=["kill", "relay", "none"], default="kill")
    parser.add_argument("--clients", type=int, default=16, help="load threads")
    parser.add_argument("--samples", type=int, default=200, help="appends whose visibility is polled")
    parser.add_argument("--socket-poll-seconds", type=float, default=1.0,
                        help="how often the peer sockets' counters are read during the load, so that "
                        "sockets closing mid-run are still counted")
    parser.add_argument("--gossip-interval-ms", type=int, default=1000)
    parser.add_argument("--median-bytes", type=float, default=4096)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--max-bytes", type=int, default=1 << 20)
    parser.add_argument("--settle-seconds", type=float, default=1.5,
                        help="wait after the gossip subscriptions are known, for the gossipsub mesh")
    parser.add_argument("--cut-seconds", type=float, default=3.0,
                        help="--partition relay: how long the cut lasts before the writes start")
    parser.add_argument("--settle-timeout", type=float, default=60.0,
                        help="longest wait for reconciliation rounds to stop before the idle sample")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="idle sample length; nodes started together send their digest heartbeats (every 30 "
                        "gossip intervals) at about the same moment, so a window shorter than 30 s reads 0 or a burst")
    parser.add_argument("--converge-timeout", type=float, default=120.0)
    parser.add_argument("--visibility-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="directory for the data (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    parser.add_argument("--json", action="store_true", help="print only the JSON object (compact)")
    options = parser.parse_args()
    if options.nodes < 2:
        parser.error("--nodes must be at least 2")
    for name in ("mailboxes", "messages", "clients"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be positive")
    report = run(options)
    if options.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
