#!/usr/bin/env python3
"""Faults on purpose: real `mailmesh node` processes in network namespaces, a seeded schedule of
partitions, pauses, crashes, clock offsets and wipes, clients writing on every node, and a checker
(scripts/chaos_check.py) that reads the history and the final state of every node.

    sudo scripts/chaos.py --seed 7 --duration 90            # one run; exit 1 when a problem is found
    sudo scripts/chaos.py --cleanup                          # remove what an interrupted run left
    scripts/chaos-runs.sh 20 120                             # many seeded runs, then the totals

Network (root only, nothing touches the host's networking or leaves the namespaces created here):
every run has a unique prefix `mmc-XXXXXX` and creates
- `PREFIX-sw`: a "switch" namespace holding two bridges, br0 and br1;
- `PREFIX-nI` per node: `eth0` (10.77.0.I+1/24) is one end of a veth pair whose other end `pI` is
  a port of br0; the node's libp2p listens there, and every node is given every other node's
  address (no /p2p/ id, so a wiped node with a new identity is found again) as bootstrap peers;
- `PREFIX-cl`: the client namespace. Each node has a second veth `cli` (10.78.I.1/24) straight to
  `cI` (10.78.I.254) here, a link no fault ever cuts; the node's HTTP API listens on it. This
  process moves itself into PREFIX-cl once the namespaces exist (setns), so every HTTP request it
  makes stays on those links; `ip -n` and `ip netns exec` still reach the other namespaces.
Partitions: a node cut off (its switch port `pI` down); the cluster halved (the ports of one half
moved to br1); bridge-shaped (the ports of one half moved to br1 and the middle node given a second
veth `eth1` on br1 with the same address and /32 routes to that half, so it sees both halves while
the halves do not see each other). Healing moves the ports back, removes `eth1` and flushes every
node's ARP cache.

Other faults: SIGSTOP then SIGCONT; kill -9 then restart (same store); kill -9 and restart with a
new `MAILMESH_CLOCK_OFFSET_MS` (up to an hour either way); a node drained (every client rests until
the cluster agrees, so that the wipe loses nothing only it held), killed, its data dir removed and
restarted: a new member with a new identity and an empty store.
One fault is active at a time, except that about a third of the partitions also crash a node as
they begin and restart it (perhaps with another clock offset) halfway through. The last fault lasts
until the load stops, so the final heal heals something real. The schedule is drawn from --seed
alone before the run and written to the history, so `--seed S --duration D` replays the same faults
(thread timing still varies).

Clients: one per node. Each appends over HTTP (to INBOX or a path from a small pool, created when
missing), delivers over LMTP (each node listens on 10.78.I.1:2424; to `user@` or `user+detail@`),
changes one flag, expunges, moves an email to another mailbox, and creates, renames (also under
another mailbox) or deletes (a childless) mailbox, with a 3 s timeout. Every request is a line of
history.jsonl with its outcome: ok (acknowledged), fail (refused before it could apply: connection
refused, a 4xx answer, an LMTP 5xx or a refusal before DATA, or a lookup before it that failed) or
unknown (timeout, reset, 5xx, an LMTP 4xx after DATA). Operations on an email first ask their node
where it is (GET /v1/accounts/A/emails/ID); mailbox operations first list the account's mailboxes
on their node and keep that list (`seen`), and a delete keeps the listing of the mailbox it read just
before (`pre_listing`): the emails the node must destroy. Flag changes and moves read the record's
8-byte state hash (GET .../sync/ids?lo=ID&hi=ID) on their node just before and just after: the
checker uses these hashes as causal evidence to name the value the stamps must make win (see
chaos_check.py). A reader lists one mailbox (by its ID, through its path, checked before and after)
of one account on one node every ~second and records what appeared and vanished since that node's
last complete listing of it; a poller records "barriers", moments when all nodes reported one digest.

End: clients stop, every fault is healed (`heal` event), and the run waits (--converge-deadline)
until every node reports the same digest; then it reads every node's mailboxes (ID, path, parent, role), listings and
message bytes into final.json, with what GET /v1/accounts/A/emails/ID answers for each acknowledged
ID a node does not list (orphans), and runs the checker. One JSON summary line goes to stdout. A run
with a problem keeps its work dir (history.jsonl, final.json, logs/nodeI.log) and prints the seed.

Adding operations: each operation kind is a class in OPERATION_KINDS with `choose` (draw a request from the shared model),
`perform` (send it, return the outcome) and `learn` (update the model from an acknowledgement); add
one there with a weight, read what it needs into final.json in `read_final_state`, and add a rule
to chaos_check.RULES. Nothing else has to change.

Python 3.11 standard library only. Needs root (namespaces) and `ip` (iproute2).
"""

import argparse
import ctypes
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos_check  # noqa: E402

# Every namespace of a run is named PREFIX_FAMILY + 6 hex digits + a suffix; --cleanup removes the
# family. `cargo test` (tests/partition.rs) uses its own family, so that a batch of runs cleaning up
# between runs leaves a test's namespaces alone, and the other way round.
PREFIX_FAMILY = os.environ.get("CHAOS_PREFIX_FAMILY", "mmc-")
CLONE_NEWNET = 0x40000000
HTTP_PORT = 8080
P2P_PORT = 4801
CLIENT_TIMEOUT = 3.0
LMTP_PORT = 2424
# Mailbox paths clients create, append to and rename to: few, so that nodes contend for the same
# names (concurrent creates of one name, renames onto one path) while apart.
MAILBOX_POOL = ["Archive", "Work", "Lists", "Travel", "Work/Reports", "Lists/Rust"]
FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "$Work"]
HOUR_MS = 3_600_000
# Every node reads one accounts file (so that LMTP's user+detail@ finds the account and files into
# `detail`, and other addresses are refused) and one operator token, sent with every HTTP request.
TOKEN = "chaos-operator-token-" + "0123456789abcdef"
ACCOUNTS = ["alice@chaos.test", "bob@chaos.test"]


def log(message):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(arguments, check=True):
    """Runs a command (ip, mostly); raises with its stderr when it fails and `check` is set."""
    result = subprocess.run(arguments, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)}: {result.stderr.strip()}")
    return result


# ------------------------------------------------------------------------------------------------
# Network namespaces
# ------------------------------------------------------------------------------------------------

class Network:
    """The namespaces, bridges and veth pairs of one run, and the partitions applied to them."""

    def __init__(self, prefix, count):
        self.prefix = prefix
        self.count = count
        self.switch = f"{prefix}-sw"
        self.client = f"{prefix}-cl"
        self.created = []  # namespaces, in creation order

    def node_namespace(self, index):
        return f"{self.prefix}-n{index}"

    @staticmethod
    def cluster_address(index):
        return f"10.77.0.{index + 1}"

    @staticmethod
    def http_address(index):
        return f"10.78.{index}.1:{HTTP_PORT}"

    @staticmethod
    def lmtp_address(index):
        return f"10.78.{index}.1:{LMTP_PORT}"

    def ip(self, namespace, *arguments, check=True):
        return run(["ip", "-n", namespace, *arguments], check=check)

    def add_namespace(self, name):
        run(["ip", "netns", "add", name])
        self.created.append(name)
        self.ip(name, "link", "set", "lo", "up")

    def create(self):
        self.add_namespace(self.switch)
        self.add_namespace(self.client)
        for bridge in ("br0", "br1"):
            self.ip(self.switch, "link", "add", bridge, "type", "bridge")
            self.ip(self.switch, "link", "set", bridge, "up")
        for index in range(self.count):
            namespace = self.node_namespace(index)
            self.add_namespace(namespace)
            self.ip(self.switch, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0",
                    "netns", namespace)
            self.ip(self.switch, "link", "set", f"p{index}", "master", "br0", "up")
            self.ip(namespace, "addr", "add", f"{self.cluster_address(index)}/24", "dev", "eth0")
            self.ip(namespace, "link", "set", "eth0", "up")
            self.ip(self.client, "link", "add", f"c{index}", "type", "veth", "peer", "name", "cli",
                    "netns", namespace)
            self.ip(self.client, "addr", "add", f"10.78.{index}.254/24", "dev", f"c{index}")
            self.ip(self.client, "link", "set", f"c{index}", "up")
            self.ip(namespace, "addr", "add", f"10.78.{index}.1/24", "dev", "cli")
            self.ip(namespace, "link", "set", "cli", "up")

    def enter_client_namespace(self):
        """Moves this whole process (every thread started afterwards) into the client namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        descriptor = os.open(f"/run/netns/{self.client}", os.O_RDONLY)
        try:
            if libc.setns(descriptor, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the client namespace failed")
        finally:
            os.close(descriptor)

    # Partitions --------------------------------------------------------------------------------

    def isolate(self, index):
        self.ip(self.switch, "link", "set", f"p{index}", "down")

    def split(self, other_half):
        for index in other_half:
            self.ip(self.switch, "link", "set", f"p{index}", "master", "br1")

    def add_bridge_node(self, middle, other_half):
        """Gives `middle` a second port on br1, with /32 routes to the nodes there."""
        namespace = self.node_namespace(middle)
        self.ip(self.switch, "link", "add", f"q{middle}", "type", "veth", "peer", "name", "eth1",
                "netns", namespace)
        self.ip(self.switch, "link", "set", f"q{middle}", "master", "br1", "up")
        self.ip(namespace, "addr", "add", f"{self.cluster_address(middle)}/32", "dev", "eth1")
        self.ip(namespace, "link", "set", "eth1", "up")
        for index in other_half:
            self.ip(namespace, "route", "add", f"{self.cluster_address(index)}/32", "dev", "eth1",
                    "src", self.cluster_address(middle))

    def heal(self):
        """Every port back on br0 and up, no second ports, fresh ARP caches."""
        for index in range(self.count):
            self.ip(self.switch, "link", "del", f"q{index}", check=False)
            self.ip(self.switch, "link", "set", f"p{index}", "master", "br0", "up")
        for index in range(self.count):
            self.ip(self.node_namespace(index), "neigh", "flush", "all", check=False)

    def destroy(self):
        remove_namespaces(self.created)


def namespace_pids(name):
    result = run(["ip", "netns", "pids", name], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def remove_namespaces(names):
    """Kills what still runs inside each namespace (only those), then deletes the namespace."""
    for name in names:
        for pid in namespace_pids(name):
            if pid == os.getpid():
                continue
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + 5
    for name in names:
        while any(pid != os.getpid() for pid in namespace_pids(name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        run(["ip", "netns", "del", name], check=False)


def cleanup_leftovers(prefix):
    names = [line.split()[0] for line in run(["ip", "netns", "list"], check=False).stdout.splitlines()
             if line.strip() and line.split()[0].startswith(prefix)]
    remove_namespaces(names)
    return names


# ------------------------------------------------------------------------------------------------
# Nodes
# ------------------------------------------------------------------------------------------------

class NodeProcess:
    """One node: its namespace, config, data dir, log, process and offsets over its lives."""

    def __init__(self, index, network, binary, root, gossip_interval_ms):
        self.accounts_file = os.path.join(root, "accounts")
        self.token_file = os.path.join(root, "token")
        self.index = index
        self.name = f"node{index}"
        self.network = network
        self.binary = binary
        self.directory = os.path.join(root, "nodes", self.name)
        self.data_dir = os.path.join(self.directory, "data")
        self.log_path = os.path.join(root, "logs", f"{self.name}.log")
        self.http = network.http_address(index)
        self.lmtp = network.lmtp_address(index)
        self.gossip_interval_ms = gossip_interval_ms
        self.process = None
        self.offset_ms = 0
        self.member = 0  # bumped by a wipe: a new identity and an empty store
        self.life = 0  # bumped by every start
        self.paused = False
        self.accepting = True  # clients send to it (false while drained for a wipe)

    def write_config(self):
        peers = [f"/ip4/{Network.cluster_address(other)}/tcp/{P2P_PORT}"
                 for other in range(self.network.count) if other != self.index]
        text = "\n".join([
            f'name = "{self.name}"',
            f'data_dir = "{self.data_dir}"',
            f'listen = ["/ip4/{Network.cluster_address(self.index)}/tcp/{P2P_PORT}"]',
            f'http = "{self.http}"',
            f'lmtp_listen = "{self.lmtp}"',
            f'accounts_file = "{self.accounts_file}"',
            f'http_token_file = "{self.token_file}"',
            "allow_plaintext_auth = true",
            "peers = [" + ", ".join(f'"{peer}"' for peer in peers) + "]",
            'cluster = "chaos"',
            f"gossip_interval_ms = {self.gossip_interval_ms}",
            "search_commit_interval_ms = 5000",
        ]) + "\n"
        path = os.path.join(self.directory, "node.toml")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def start(self, history):
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        config = self.write_config()
        self.life += 1
        environment = dict(os.environ)
        environment.setdefault("RUST_LOG", "info,libp2p_gossipsub=warn")
        environment["MAILMESH_CLOCK_OFFSET_MS"] = str(self.offset_ms)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"=== chaos: {self.name} life {self.life} member {self.member} offset_ms "
                           f"{self.offset_ms} at {history.now():.3f}\n".encode())
            log_file.flush()
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.network.node_namespace(self.index), self.binary, "node",
                 "--config", config],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=environment)
        self.paused = False
        history.event("start", node=self.index, life=self.life, member=self.member, offset_ms=self.offset_ms,
                      pid=self.process.pid)

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                status, _ = http_request(self.http, "GET", "/healthz", timeout=1.0)
                if status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer /healthz within {timeout} s")

    def signal(self, sig):
        if self.alive():
            os.kill(self.process.pid, sig)

    def kill(self):
        if self.process is None:
            return
        if self.alive():
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait()
        self.paused = False

    def wipe(self):
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.member += 1


# ------------------------------------------------------------------------------------------------
# HTTP and history
# ------------------------------------------------------------------------------------------------

class Unsent(OSError):
    """The request never reached the node: it cannot have applied."""


def http_request(address, method, path, body=None, timeout=CLIENT_TIMEOUT, headers=None):
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        try:
            connection.connect()
        except OSError as error:
            raise Unsent(str(error)) from error
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def mailbox_path(account, mailbox):
    return f"/v1/mailboxes/{urllib.parse.quote(account, safe='')}/{urllib.parse.quote(mailbox, safe='')}"


class History:
    """history.jsonl: one JSON object per line, written under a lock, times in seconds from start."""

    def __init__(self, path):
        self.handle = open(path, "a", buffering=1)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.counter = 0

    def now(self):
        return time.monotonic() - self.started

    def write(self, record):
        with self.lock:
            self.counter += 1
            record["index"] = self.counter
            self.handle.write(json.dumps(record, separators=(",", ":")) + "\n")

    def event(self, kind, **fields):
        self.write({"type": "event", "event": kind, "time": round(self.now(), 4), **fields})

    def close(self):
        with self.lock:
            self.handle.close()


def outcome_of(call):
    """(outcome, status, body, error) of an HTTP call: ok for 2xx, fail when unsent or 4xx,
    unknown on a timeout, reset or 5xx (a 5xx may follow a write that did apply)."""
    try:
        status, body = call()
    except Unsent as error:
        return "fail", None, b"", f"unsent: {error}"
    except (OSError, http.client.HTTPException) as error:
        return "unknown", None, b"", f"{type(error).__name__}: {error}"
    if 200 <= status < 300:
        return "ok", status, body, None
    if 400 <= status < 500:
        return "fail", status, body, body[:200].decode(errors="replace")
    return "unknown", status, body, body[:200].decode(errors="replace")


# ------------------------------------------------------------------------------------------------
# Operations
# ------------------------------------------------------------------------------------------------

class Model:
    """What clients know: acknowledged messages (shared by every client), for choosing targets."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = []  # (account, id), in the order they were acknowledged
        self.expunged = set()

    def add(self, account, message_id):
        with self.lock:
            self.messages.append((account, message_id))

    def pick(self, rng):
        with self.lock:
            live = [key for key in self.messages[-30:] if key[1] not in self.expunged]
            if live and rng.random() < 0.8:
                return rng.choice(live)
            candidates = [key for key in self.messages if key[1] not in self.expunged]
            return rng.choice(candidates) if candidates else None


def account_path(account):
    return f"/v1/accounts/{urllib.parse.quote(account, safe='')}"


def fetch_mailboxes(node, account, timeout=1.5):
    """The account's visible mailboxes on `node` ([{id, mailbox, parent, role}]), or None."""
    try:
        status, body = http_request(node.http, "GET", f"{account_path(account)}/mailboxes", timeout=timeout)
        if status != 200:
            return None
        return [{"id": entry["id"], "mailbox": entry["mailbox"], "parent": entry.get("parent"),
                 "role": entry.get("role")} for entry in json.loads(body)["mailboxes"]]
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None


def seen_of(mailboxes):
    """A mailbox list as the history keeps it: [[id, path, parent]]."""
    return [[entry["id"], entry["mailbox"], entry["parent"]] for entry in mailboxes]


def email_location(node, account, message_id, timeout=1.5):
    """(mailbox id, mailbox path) of a live email on `node`, or None."""
    try:
        status, body = http_request(node.http, "GET", f"{account_path(account)}/emails/{message_id}",
                                    timeout=timeout)
        if status != 200:
            return None
        answer = json.loads(body)
        return answer.get("mailbox_id"), answer.get("mailbox")
    except (OSError, http.client.HTTPException, ValueError):
        return None


def state_hash(node, account, message_id):
    """The record's 8-byte state hash on `node`, or None. The ranges cover the account's whole
    emails trie; the route only needs a mailbox that exists, and INBOX always does."""
    query = urllib.parse.urlencode({"lo": message_id, "hi": message_id, "limit": 1})
    try:
        status, body = http_request(node.http, "GET", f"{mailbox_path(account, 'INBOX')}/sync/ids?{query}",
                                    timeout=1.5)
    except (OSError, http.client.HTTPException, Unsent):
        return None
    if status != 200:
        return None
    ids = json.loads(body).get("ids", [])
    return ids[0]["state"] if ids and ids[0].get("id") == message_id else None


def make_message(tag, sender, recipient, size):
    """A message whose subject (and Message-ID) names the operation that sent it."""
    subject = f"chaos {tag}"
    text = (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{tag}@chaos.test>\r\nDate: Tue, 01 Dec 2026 09:00:00 +0000\r\n\r\n")
    filler = hashlib.sha256(tag.encode()).hexdigest()
    return subject, (text + (filler * (size // 64 + 1))[:size] + "\r\n").encode()


def not_sent(why):
    """The outcome of an operation that could not be sent (a lookup before it failed)."""
    return "fail", None, f"unsent: {why}", {}


SIZES = [200, 800, 3000, 12000, 70000]


class Operation:
    """An operation kind: `choose` draws a request, `perform` sends it, `learn` updates the shared
    model from an acknowledgement (most kinds learn nothing)."""

    def learn(self, model, request, result):
        pass


class Append(Operation):
    """POST a message to a mailbox by path (created when missing: the route's PathOrCreate)."""
    kind = "append"
    weight = 28

    def choose(self, model, rng, client):
        account = rng.choice(ACCOUNTS)
        mailbox = "INBOX" if rng.random() < 0.5 else rng.choice(MAILBOX_POOL)
        return {"account": account, "mailbox": mailbox, "size": rng.choice(SIZES)}

    def perform(self, node, request, client, history):
        tag = f"{client.prefix}-op{client.number}-{client.sequence}"
        subject, body = make_message(tag, f"client{client.number}@chaos.test", request["account"], request["size"])
        request["subject"] = subject
        request["sha256"] = hashlib.sha256(body).hexdigest()
        path = f"{mailbox_path(request['account'], request['mailbox'])}/messages"
        outcome, status, answer, error = outcome_of(lambda: http_request(node.http, "POST", path, body))
        result = {}
        if outcome == "ok":
            try:
                document = json.loads(answer)
                result["id"], result["mailbox_id"] = document["id"], document.get("mailbox_id")
            except (ValueError, KeyError):
                outcome, error = "unknown", f"unparsable answer {answer[:100]!r}"
        return outcome, status, error, result

    def learn(self, model, request, result):
        model.add(request["account"], result["id"])


class Deliver(Operation):
    """An LMTP delivery (RFC 2033) to the node's listener: to the INBOX, or to `user+detail@`,
    which the node files in the mailbox `detail` when the account has one (else the INBOX). The
    250 for the recipient is the acknowledgement; a 5xx (or a refusal before DATA) is a failure;
    a 4xx after DATA, a timeout or a reset once the message was sent are unknown."""
    kind = "deliver"
    weight = 15

    def choose(self, model, rng, client):
        account = rng.choice(ACCOUNTS)
        detail = None if rng.random() < 0.4 else rng.choice([path for path in MAILBOX_POOL if "/" not in path])
        return {"account": account, "detail": detail, "size": rng.choice(SIZES)}

    def perform(self, node, request, client, history):
        tag = f"{client.prefix}-lmtp{client.number}-{client.sequence}"
        local, domain = request["account"].split("@", 1)
        recipient = f"{local}+{request['detail']}@{domain}" if request["detail"] else request["account"]
        subject, body = make_message(tag, f"sender{client.number}@chaos.test", recipient, request["size"])
        request.update(subject=subject, sha256=hashlib.sha256(body).hexdigest(), recipient=recipient)
        host, port = node.lmtp.rsplit(":", 1)
        step = "connect"
        connection = None
        try:
            connection = smtplib.LMTP(host, int(port), timeout=CLIENT_TIMEOUT)
            step = "envelope"
            connection.ehlo("chaos.test")
            code, reply = connection.mail(f"sender{client.number}@chaos.test")
            if code != 250:
                return "fail", code, f"MAIL: {reply[:200]!r}", {}
            code, reply = connection.rcpt(recipient)
            if code != 250:
                return "fail", code, f"RCPT: {reply[:200]!r}", {}
            code, reply = connection.docmd("DATA")
            if code != 354:
                return "fail", code, f"DATA: {reply[:200]!r}", {}
            step = "data"
            connection.send(body + b".\r\n")  # no line of the body starts with a dot
            code, reply = connection.getreply()
        except (OSError, smtplib.SMTPException) as error:
            outcome = "unknown" if step == "data" else "fail"
            return outcome, None, f"{step}: {type(error).__name__}: {error}", {}
        finally:
            if connection is not None:
                try:
                    connection.close()
                except OSError:
                    pass
        if code == 250:
            return "ok", code, None, {}
        return ("fail" if code >= 500 else "unknown"), code, f"after DATA: {reply[:200]!r}", {}


class OnMessage(Operation):
    """An operation on one acknowledged message, mostly a recent one (so that clients contend).
    `perform` first asks its node where the email is now (it moves, and its mailbox is renamed)."""

    def choose(self, model, rng, client):
        target = model.pick(rng)
        if target is None:
            return None
        account, message_id = target
        return {"account": account, "id": message_id}

    @staticmethod
    def locate(node, request):
        """Fills in the email's mailbox on `node`; False when the node does not show it."""
        location = email_location(node, request["account"], request["id"])
        if location is None:
            return False
        request["mailbox_id"], request["mailbox"] = location
        return True


class SetFlag(OnMessage):
    kind = "flags"
    weight = 25

    def choose(self, model, rng, client):
        request = super().choose(model, rng, client)
        if request is not None:
            request.update(flag=rng.choice(FLAGS), set=rng.random() < 0.6)
        return request

    def perform(self, node, request, client, history):
        account, message_id = request["account"], request["id"]
        request["pre_state"] = state_hash(node, account, message_id)
        if not self.locate(node, request):
            return not_sent("the node does not show the email")
        change = {"add" if request["set"] else "remove": [request["flag"]]}
        path = f"{mailbox_path(account, request['mailbox'])}/messages/{message_id}/flags"
        outcome, status, answer, error = outcome_of(lambda: http_request(
            node.http, "POST", path, json.dumps(change).encode(), headers={"Content-Type": "application/json"}))
        result = {}
        if outcome == "ok":
            try:
                result["flags"] = sorted(json.loads(answer).get("flags", []))
            except ValueError:
                pass
            result["post_state"] = state_hash(node, account, message_id)
        return outcome, status, error, result


class Expunge(OnMessage):
    kind = "expunge"
    weight = 6

    def perform(self, node, request, client, history):
        if not self.locate(node, request):
            return not_sent("the node does not show the email")
        path = f"{mailbox_path(request['account'], request['mailbox'])}/messages/{request['id']}"
        outcome, status, _, error = outcome_of(lambda: http_request(node.http, "DELETE", path))
        return outcome, status, error, {}

    def learn(self, model, request, result):
        with model.lock:
            model.expunged.add(request["id"])


class Move(OnMessage):
    """POST /v1/accounts/A/emails/ID/move to another visible mailbox of the node; the email keeps
    its ID. The state hashes read before and after are causal evidence, as for flag changes."""
    kind = "move"
    weight = 12

    def perform(self, node, request, client, history):
        account, message_id = request["account"], request["id"]
        mailboxes = fetch_mailboxes(node, account)
        request["pre_state"] = state_hash(node, account, message_id)
        if mailboxes is None or not self.locate(node, request):
            return not_sent("the node does not show the email or its mailboxes")
        targets = [entry for entry in mailboxes if entry["id"] != request["mailbox_id"]]
        if not targets:
            return not_sent("no other mailbox")
        target = client.rng.choice(targets)
        request.update(to_id=target["id"], to_path=target["mailbox"], seen=seen_of(mailboxes))
        outcome, status, error, result = json_call(
            node, "POST", f"{account_path(account)}/emails/{message_id}/move", {"mailbox": target["id"]},
            lambda answer: {"moved_to": json.loads(answer)["mailbox_id"],
                            "moved_to_path": json.loads(answer).get("mailbox")})
        if outcome == "ok":
            result["post_state"] = state_hash(node, account, message_id)
        return outcome, status, error, result


def json_call(node, method, path, document=None, parse=lambda answer: {}):
    """Sends a JSON request: (outcome, status, error, result), with result = parse(answer) when
    acknowledged (an answer that does not parse makes the outcome unknown)."""
    body = None if document is None else json.dumps(document).encode()
    headers = {} if document is None else {"Content-Type": "application/json"}
    outcome, status, answer, error = outcome_of(lambda: http_request(node.http, method, path, body, headers=headers))
    result = {}
    if outcome == "ok":
        try:
            result = parse(answer)
        except (ValueError, KeyError, TypeError) as problem:
            outcome, error = "unknown", f"unparsable answer ({problem}): {answer[:100]!r}"
    return outcome, status, error, result


def mailbox_answer(answer):
    """The fields of a mailbox the history keeps from an answer: id, path, parent."""
    document = json.loads(answer)
    return {"result_id": document["id"], "result_path": document["mailbox"], "result_parent": document.get("parent")}


class CreateMailbox(Operation):
    """POST /v1/accounts/A/mailboxes with a path from the small pool (levels above are created)."""
    kind = "create"
    weight = 5

    def choose(self, model, rng, client):
        return {"account": rng.choice(ACCOUNTS), "path": rng.choice(MAILBOX_POOL)}

    def perform(self, node, request, client, history):
        return json_call(node, "POST", f"{account_path(request['account'])}/mailboxes", {"name": request["path"]},
                         mailbox_answer)


class OnMailbox(Operation):
    """An operation on one of the account's mailboxes as its node lists them now (never the INBOX)."""

    def choose(self, model, rng, client):
        return {"account": rng.choice(ACCOUNTS)}

    @staticmethod
    def candidates(node, request, leaves_only):
        """(the node's mailboxes, those the operation may pick), or None when it lists none."""
        mailboxes = fetch_mailboxes(node, request["account"])
        if mailboxes is None:
            return None
        parents = {entry["parent"] for entry in mailboxes}
        return mailboxes, [entry for entry in mailboxes
                           if entry["role"] != "inbox" and entry["mailbox"] != "INBOX"
                           and not (leaves_only and entry["id"] in parents)]


class RenameMailbox(OnMailbox):
    """PATCH a mailbox (by ID) to a new path: a pool path (nodes contend for it), a fresh name under
    another mailbox (a move in the tree, which can make cycles when nodes are apart), or a fresh
    top-level name."""
    kind = "rename"
    weight = 4

    def perform(self, node, request, client, history):
        account = request["account"]
        mailboxes, candidates = self.candidates(node, request, leaves_only=False) or (None, [])
        if not candidates:
            return not_sent("no mailbox list, or no mailbox to rename")
        rng = client.rng
        target = rng.choice(candidates)
        fresh = f"R{client.number}x{client.sequence}"
        draw = rng.random()
        others = [entry for entry in candidates if entry["id"] != target["id"]]
        if draw < 0.4:
            path = rng.choice(MAILBOX_POOL)
        elif draw < 0.75 and others:
            path = f"{rng.choice(others)['mailbox']}/{fresh}"
        else:
            path = fresh
        request.update(id=target["id"], from_path=target["mailbox"], path=path, seen=seen_of(mailboxes))
        return json_call(node, "PATCH", f"{account_path(account)}/mailboxes/{target['id']}", {"name": path},
                         mailbox_answer)


class DeleteMailbox(OnMailbox):
    """DELETE a childless mailbox (by ID). Just before, the client lists it on the same node: those
    emails the node must destroy (unless a move of one was under way), see chaos_check."""
    kind = "delete"
    weight = 1.5

    def perform(self, node, request, client, history):
        account = request["account"]
        mailboxes, leaves = self.candidates(node, request, leaves_only=True) or (None, [])
        if not leaves:
            return not_sent("no mailbox list, or no childless mailbox to delete")
        target = client.rng.choice(leaves)
        request.update(id=target["id"], path=target["mailbox"], seen=seen_of(mailboxes))
        listed = list_mailbox_by_id(node, account, target, timeout=1.5)
        request["pre_listing"] = sorted(listed or [])
        request["pre_complete"] = listed is not None
        return json_call(node, "DELETE", f"{account_path(account)}/mailboxes/{target['id']}",
                         parse=lambda answer: {"destroyed": json.loads(answer)["destroyed"]})


OPERATION_KINDS = [Append(), Deliver(), SetFlag(), Expunge(), Move(), CreateMailbox(), RenameMailbox(),
                   DeleteMailbox()]


class Client(threading.Thread):
    """Sends operations to one node until stopped, one at a time."""

    def __init__(self, number, node, model, history, stop, seed, prefix):
        super().__init__(daemon=True, name=f"client{number}")
        self.number = number
        self.node = node
        self.model = model
        self.history = history
        self.stop_event = stop
        self.rng = random.Random(seed * 1000 + number)
        self.prefix = prefix
        self.sequence = 0
        self.error = None
        self.busy = False  # set before it looks at `accepting`, cleared once a request is recorded

    def run(self):
        try:
            self.loop()
        except Exception as error:  # reported by the run, never silent
            self.error = repr(error)

    def loop(self):
        weights = [kind.weight for kind in OPERATION_KINDS]
        while not self.stop_event.is_set():
            self.busy = True
            if not self.node.accepting:
                self.busy = False
                time.sleep(0.05)
                continue
            try:
                self.one_request(weights)
            finally:
                self.busy = False
            time.sleep(self.rng.uniform(0.05, 0.3))

    def one_request(self, weights):
        """One operation sent and recorded in the history."""
        kind = self.rng.choices(OPERATION_KINDS, weights)[0]
        request = kind.choose(self.model, self.rng, self)
        if request is None:
            kind, request = OPERATION_KINDS[0], OPERATION_KINDS[0].choose(self.model, self.rng, self)
        self.sequence += 1
        node = self.node
        member, life = node.member, node.life
        invoked = self.history.now()
        outcome, status, error, result = kind.perform(node, request, self, self.history)
        completed = self.history.now()
        record = {"type": "op", "kind": kind.kind, "client": self.number, "node": node.index,
                  "member": member, "life": life, "invoked": round(invoked, 4),
                  "completed": round(completed, 4), "outcome": outcome, "status": status, **request,
                  **result}
        if error:
            record["error"] = error
        self.history.write(record)
        if outcome == "ok":
            kind.learn(self.model, request, result)


def list_mailbox(node, account, mailbox, timeout=CLIENT_TIMEOUT):
    """(complete, total, items) of one listing page of up to 1000 messages; raises on errors
    (a 404 too: the path may have been renamed away, which says nothing of its emails)."""
    status, body = http_request(node.http, "GET", f"{mailbox_path(account, mailbox)}/messages?limit=1000",
                                timeout=timeout)
    if status != 200:
        raise OSError(f"listing answered {status}")
    document = json.loads(body)
    items = document.get("items", [])
    return document.get("total", 0) == len(items), document.get("total", 0), items


def list_mailbox_by_id(node, account, mailbox, timeout=CLIENT_TIMEOUT):
    """Lists the visible mailbox {id, mailbox} by its path, and checks that the path named the
    same mailbox before and after (a rename may move another mailbox onto it meanwhile): the
    listed ids, or None when the listing is incomplete or the path moved."""
    try:
        complete, _, items = list_mailbox(node, account, mailbox["mailbox"], timeout=timeout)
    except (OSError, http.client.HTTPException, Unsent, ValueError):
        return None
    after = fetch_mailboxes(node, account, timeout=timeout)
    if not complete or after is None or not any(entry["id"] == mailbox["id"] and entry["mailbox"] == mailbox["mailbox"]
                                                for entry in after):
        return None
    return {item["id"] for item in items}


class Reader(threading.Thread):
    """Lists a random mailbox on a random node about every second; records what appeared and
    vanished since that node member's previous complete listing of the mailbox (by its ID, which
    renames keep)."""

    def __init__(self, nodes, history, stop, seed):
        super().__init__(daemon=True, name="reader")
        self.nodes, self.history, self.stop_event = nodes, history, stop
        self.rng = random.Random(seed * 1000 + 999)
        self.previous = {}

    def run(self):
        while not self.stop_event.wait(self.rng.uniform(0.5, 1.2)):
            node = self.rng.choice(self.nodes)
            account = self.rng.choice(ACCOUNTS)
            member = node.member
            invoked = self.history.now()
            mailboxes = fetch_mailboxes(node, account, timeout=2.0)
            if not mailboxes:
                continue
            mailbox = self.rng.choice(mailboxes)
            ids = list_mailbox_by_id(node, account, mailbox, timeout=2.0)
            completed = self.history.now()
            if ids is None:
                continue
            key = (node.index, member, account, mailbox["id"])
            before = self.previous.get(key, set())
            self.previous[key] = ids
            self.history.write({"type": "read", "node": node.index, "member": member, "account": account,
                                "mailbox": mailbox["mailbox"], "mailbox_id": mailbox["id"],
                                "invoked": round(invoked, 4), "completed": round(completed, 4),
                                "count": len(ids), "added": sorted(ids - before), "removed": sorted(before - ids),
                                "seen": seen_of(mailboxes)})


FEED_LIMITS = [7, 40, 500]  # small pages make has_more and tokens taken mid-listing common
FEED_PAGE_CAP = 400  # pages in one catch-up before the client gives up (an endless has_more)


def account_changes_path(account, since, limit):
    query = {"limit": limit}
    if since is not None:
        query["since"] = since
    return f"/v1/accounts/{urllib.parse.quote(account, safe='')}/changes?{urllib.parse.urlencode(query)}"


class FeedClient(threading.Thread):
    """A client of one account's change feed (GET /v1/accounts/A/changes): about every second it
    catches up from a node drawn at random, pages through has_more (sometimes moving to another
    node between pages), and keeps its state token from node to node and a view of the account's
    message IDs (created and updated add, destroyed removes). A node that is down, paused or cut
    off just fails the call; the client tries another later. A 410 Gone makes it resync from
    nothing. Every call is a `feed` line of the history, with what it sent and what it got, so
    the checker replays the client without trusting this one."""

    def __init__(self, number, account, nodes, history, stop, seed, bad_token_rate=0.0):
        super().__init__(daemon=True, name=f"feed{number}")
        self.bad_token_rate = bad_token_rate
        self.number, self.account, self.nodes, self.history = number, account, nodes, history
        self.stop_event = stop
        self.rng = random.Random(seed * 1000 + 500 + number)
        self.state = None
        self.view = {}  # id -> mailbox id
        self.catch_ups = 0
        self.listed = 0  # items (emails and mailboxes) the calls listed, for the final polls
        self.error = None

    def run(self):
        try:
            while not self.stop_event.wait(self.rng.uniform(0.2, 1.5)):
                self.catch_up(self.rng.choice(self.nodes), final=False)
        except Exception as error:  # reported by the run, never silent
            self.error = repr(error)

    def call(self, node, limit, catch_up, page, final):
        """One page from `node`: records it and applies it; returns its outcome and has_more."""
        member, life = node.member, node.life
        since = self.state
        # A token that cannot decode ("!" is not base64): the node must answer 410 and the client
        # then resyncs from nothing, which exercises the resync path (expired tokens need hours).
        damaged = (self.bad_token_rate > 0 and since is not None and page == 0 and not final
                   and self.rng.random() < self.bad_token_rate)
        if damaged:
            since = "m1!damaged!" + since[:8]
        invoked = self.history.now()
        outcome, status, body, error = outcome_of(
            lambda: http_request(node.http, "GET", account_changes_path(self.account, since, limit)))
        completed = self.history.now()
        record = {"type": "feed", "client": self.number, "account": self.account, "node": node.index,
                  "member": member, "life": life, "catch_up": catch_up, "page": page, "final": final,
                  "invoked": round(invoked, 4), "completed": round(completed, 4), "since": since, "limit": limit,
                  "status": status}
        if damaged:
            record["damaged"] = True
        has_more = False
        if status == 410:
            outcome = "gone"
        if outcome == "ok":
            try:
                answer = json.loads(body)
                created = [[item["id"], item.get("mailbox_id")] for item in answer["created"]]
                updated = [[item["id"], item.get("mailbox_id")] for item in answer["updated"]]
                destroyed = list(answer["destroyed"])
                mailboxes = list(answer.get("mailboxes", []))
                state, has_more = answer["state"], bool(answer["has_more"])
            except (ValueError, KeyError, TypeError) as problem:
                outcome, error = "unknown", f"unparsable answer ({problem}): {body[:100]!r}"
            else:
                record.update(created=created, updated=updated, destroyed=destroyed, mailboxes=mailboxes,
                              state=state, has_more=has_more)
                self.listed += len(created) + len(updated) + len(destroyed) + len(mailboxes)
        record["outcome"] = outcome
        if error and outcome != "ok":
            record["error"] = error[:300]
        self.history.write(record)
        if outcome == "ok":
            for message_id, mailbox in created + updated:
                self.view[message_id] = mailbox
            for message_id in destroyed:
                self.view.pop(message_id, None)
            self.state = state
        elif outcome == "gone":
            self.state, self.view = None, {}
        return outcome, has_more

    def catch_up(self, node, final):
        """Pages until has_more is false; True when it got there. On a 410 the client drops its
        state and view and resyncs from nothing on the same node; on a failed call it stops."""
        self.catch_ups += 1
        limit = self.rng.choice(FEED_LIMITS)
        for page in range(FEED_PAGE_CAP):
            outcome, has_more = self.call(node, limit, self.catch_ups, page, final)
            if outcome in ("fail", "unknown"):
                return False
            if outcome == "ok" and not has_more:
                return True
            if outcome == "ok" and not final and self.rng.random() < 0.25:
                node = self.rng.choice(self.nodes)  # the token must be good anywhere, even mid-listing
        self.history.event("feed-page-cap", client=self.number, catch_up=self.catch_ups)
        return False


FINAL_POLLS = 10
FINAL_POLL_SECONDS = 1.0


def final_feed_catch_ups(feed_clients, nodes, seed):
    """After convergence: every feed client catches up once more from a random node (another one
    when a call fails, a few times), then polls that node about once a second, as a client does,
    until a catch-up lists nothing at all (at most FINAL_POLLS more), and says which node ended
    it and how many polls it took. The extra polls are needed because a node lists the emails of
    a mailbox change only once its frontier covers that change (see `crate::changes`), which
    can come a gossip round after the digests agree: one call right at convergence may still
    list the mailbox without them."""
    rng = random.Random(seed * 1000 + 777)
    ended = {}
    for client in feed_clients:
        for _ in range(2 * len(nodes)):
            node = rng.choice(nodes)
            if client.catch_up(node, final=True):
                polls = 0
                while polls < FINAL_POLLS:
                    time.sleep(FINAL_POLL_SECONDS)
                    listed = client.listed
                    if not client.catch_up(node, final=True):
                        break
                    polls += 1
                    if client.listed == listed:
                        break
                ended[str(client.number)] = {"node": node.index, "view": len(client.view), "polls": polls}
                break
    return ended


class Poller(threading.Thread):
    """Records a barrier whenever every node answers /v1/status with the same digest."""

    def __init__(self, nodes, history, stop):
        super().__init__(daemon=True, name="poller")
        self.nodes, self.history, self.stop_event = nodes, history, stop

    def run(self):
        while not self.stop_event.wait(1.0):
            start = self.history.now()
            members = [node.member for node in self.nodes]
            digest = all_same_digest(self.nodes, timeout=1.0)
            end = self.history.now()
            if digest and members == [node.member for node in self.nodes]:
                self.history.write({"type": "barrier", "start": round(start, 4), "end": round(end, 4),
                                    "members": members, "digest": digest})


def all_same_digest(nodes, timeout=2.0):
    """The common digest when every node answers with the same one, else None."""
    digests = set()
    for node in nodes:
        try:
            status, body = http_request(node.http, "GET", "/v1/status", timeout=timeout)
        except (OSError, http.client.HTTPException, Unsent):
            return None
        if status != 200:
            return None
        digests.add(json.loads(body).get("digest"))
        if len(digests) > 1:
            return None
    return digests.pop() if len(digests) == 1 else None


# ------------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------------

FAULT_WEIGHTS = {"isolate": 3, "halves": 3, "bridge": 3, "pause": 3, "kill": 3, "clock": 2, "wipe": 2}


def draw_offset(rng):
    return rng.choice([0, rng.randint(-HOUR_MS, HOUR_MS), rng.choice([-HOUR_MS, HOUR_MS])])


def draw_fault(rng, kind, count, length):
    """Parameters of one fault of `kind` over `count` nodes: (parameters, length)."""
    order = list(range(count))
    rng.shuffle(order)
    parameters = {}
    if kind in ("isolate", "pause", "kill", "clock", "wipe"):
        parameters["node"] = order[0]
    if kind in ("kill", "clock", "wipe"):
        length = rng.uniform(0.3, 5)
        parameters["offset_ms"] = draw_offset(rng) if kind in ("clock", "wipe") or rng.random() < 0.3 else None
    if kind == "pause":
        length = rng.uniform(1, 8)
    if kind in ("halves", "bridge"):
        half = count // 2
        parameters["other_half"] = sorted(order[:half])
        if kind == "bridge":
            parameters["middle"] = order[half]
    if kind in ("isolate", "halves", "bridge") and rng.random() < 0.35:
        # A crash inside the partition: killed as it starts, restarted halfway through it.
        parameters["crash"] = order[-1]
        parameters["crash_offset_ms"] = draw_offset(rng) if rng.random() < 0.5 else None
    return parameters, length


def make_schedule(seed, duration, count, kinds=None):
    """The faults of a run, drawn from the seed alone: [(start, kind, parameters, length)]. The
    last one lasts until the load stops, so that the final heal heals a real fault. `kinds`
    (default: all) limits the faults drawn."""
    rng = random.Random(seed)
    weights = {kind: weight for kind, weight in FAULT_WEIGHTS.items() if kinds is None or kind in kinds}
    finals = [kind for kind in ("isolate", "halves", "bridge", "pause", "kill") if kind in weights] or list(weights)
    schedule = []
    moment = rng.uniform(2, 5)
    wipes = 0
    final_start = max(moment, duration - 8)
    while moment < final_start - 4:
        kind = rng.choices(list(weights), list(weights.values()))[0]
        if kind == "wipe" and wipes >= 2:
            kind = "kill" if "kill" in weights else rng.choice(finals)
        wipes += kind == "wipe"
        parameters, length = draw_fault(rng, kind, count, rng.uniform(3, 12))
        length = min(length, max(1.0, final_start - 2 - moment))
        schedule.append((round(moment, 3), kind, parameters, round(length, 3)))
        moment += length + rng.uniform(1, 5)
    kind = rng.choice(finals)
    parameters, _ = draw_fault(rng, kind, count, 0)
    parameters.pop("crash", None)
    parameters.pop("crash_offset_ms", None)
    parameters.pop("offset_ms", None)
    parameters["until_end"] = True
    schedule.append((round(max(moment, final_start), 3), kind, parameters, round(duration - max(moment, final_start), 3)))
    return schedule


class Nemesis:
    """Applies the schedule's faults one at a time and heals them."""

    def __init__(self, network, nodes, history, clients):
        self.network, self.nodes, self.history, self.clients = network, nodes, history, clients

    def apply(self, kind, parameters, length, stop):
        history = self.history
        history.event("fault", fault=kind, **parameters, length=length)
        node = self.nodes[parameters["node"]] if "node" in parameters else None
        if kind == "isolate":
            self.network.isolate(node.index)
        elif kind == "halves":
            self.network.split(parameters["other_half"])
        elif kind == "bridge":
            self.network.split(parameters["other_half"])
            self.network.add_bridge_node(parameters["middle"], parameters["other_half"])
        elif kind == "pause":
            node.signal(signal.SIGSTOP)
            node.paused = True
        elif kind in ("kill", "clock"):
            node.kill()
        crash = self.nodes[parameters["crash"]] if "crash" in parameters else None
        if crash is not None:
            crash.kill()
            stop.wait(length / 2)
            if parameters.get("crash_offset_ms") is not None:
                crash.offset_ms = parameters["crash_offset_ms"]
            crash.start(history)
            crash.wait_healthy()
            length /= 2
        elif kind == "wipe":
            # A wipe loses what only this node held; to test rejoining, not that loss, every client
            # rests until the cluster agrees (or 20 s pass: then the node is only killed).
            for other in self.nodes:
                other.accepting = False
            # Each client finishes the request it is in (a flag change's two reads and its write
            # at most), then rests.
            deadline = time.monotonic() + 2 * 1.5 + CLIENT_TIMEOUT + 5.0
            while any(client.busy for client in self.clients) and time.monotonic() < deadline:
                time.sleep(0.02)
            drained = wait_converged(self.nodes, 20.0) is not None
            history.event("drained", node=node.index, converged=drained)
            node.kill()
            if drained:
                node.wipe()
            for other in self.nodes:
                other.accepting = other is not node
        if parameters.get("until_end"):
            return  # healed by heal_all when the load stops
        stop.wait(length)
        self.heal_one(kind, parameters)

    def heal_one(self, kind, parameters):
        node = self.nodes[parameters["node"]] if "node" in parameters else None
        if kind in ("isolate", "halves", "bridge"):
            self.network.heal()
        elif kind == "pause":
            node.signal(signal.SIGCONT)
            node.paused = False
        elif kind in ("kill", "clock", "wipe"):
            if parameters.get("offset_ms") is not None:
                node.offset_ms = parameters["offset_ms"]
            node.start(self.history)
            node.wait_healthy()
            node.accepting = True
        self.history.event("healed", fault=kind, **parameters)

    def heal_all(self):
        """Whatever state the run is in: links back, processes running and resumed."""
        self.network.heal()
        for node in self.nodes:
            if node.alive():
                node.signal(signal.SIGCONT)
                node.paused = False
            else:
                node.start(self.history)
        for node in self.nodes:
            node.wait_healthy()
            node.accepting = True


def wait_converged(nodes, limit):
    """Seconds until every node reports one digest, or None after `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if all_same_digest(nodes):
            return time.monotonic() - started
        time.sleep(0.2)
    return None


# ------------------------------------------------------------------------------------------------
# Final state
# ------------------------------------------------------------------------------------------------

def below_trace(raw):
    """The bytes a client sent: an LMTP copy has trace headers (Return-Path, Delivered-To,
    Received) on top of them; every message chaos sends begins with its From: line."""
    if raw.startswith(b"From: "):
        return raw
    start = raw.find(b"\r\nFrom: ")
    return raw[start + 2:] if start >= 0 else raw


def read_final_state(nodes, known_ids):
    """Every node's view of each account: its visible mailboxes (ID, path, parent, role) and every
    listed email with its mailbox, flags and the sha256 of its bytes; plus, for each acknowledged
    email ID a node does not list, what GET /v1/accounts/A/emails/ID answers there (a live email
    that no listing shows is an orphan)."""
    final = {}
    for node in nodes:
        status, body = http_request(node.http, "GET", "/v1/status", timeout=10)
        document = json.loads(body)
        state = {"digest": document.get("digest"), "peer_id": document.get("peer_id"), "member": node.member,
                 "accounts": {}, "probes": {}}
        listed = set()
        for account in ACCOUNTS:
            status, body = http_request(node.http, "GET", f"{account_path(account)}/mailboxes", timeout=10)
            if status != 200:
                raise RuntimeError(f"{node.name}: mailboxes of {account} answered {status}")
            mailboxes = json.loads(body)["mailboxes"]
            messages = []
            for entry in mailboxes:
                items, position = [], 0
                while True:
                    status, body = http_request(
                        node.http, "GET",
                        f"{mailbox_path(account, entry['mailbox'])}/messages?limit=1000&position={position}",
                        timeout=10)
                    if status != 200:
                        raise RuntimeError(f"{node.name}: listing {account}/{entry['mailbox']} answered {status}")
                    page = json.loads(body).get("items", [])
                    if not page:
                        break
                    items.extend(page)
                    position += len(page)
                for item in items:
                    raw_status, raw = http_request(
                        node.http, "GET", f"{mailbox_path(account, entry['mailbox'])}/messages/{item['id']}/raw",
                        timeout=10)
                    messages.append({"id": item["id"], "mailbox_id": entry["id"], "mailbox": entry["mailbox"],
                                     "subject": item.get("subject"), "flags": sorted(item.get("flags", [])),
                                     "sha256": hashlib.sha256(raw).hexdigest() if raw_status == 200 else None,
                                     "body_sha256": hashlib.sha256(below_trace(raw)).hexdigest()
                                     if raw_status == 200 else None})
                    listed.add(item["id"])
            state["accounts"][account] = {
                "mailboxes": [{"id": entry["id"], "mailbox": entry["mailbox"], "parent": entry.get("parent"),
                               "role": entry.get("role"), "count": entry.get("count")} for entry in mailboxes],
                "messages": messages}
        for account, message_id in known_ids:
            if message_id in listed:
                continue
            status, body = http_request(node.http, "GET", f"{account_path(account)}/emails/{message_id}", timeout=10)
            probe = {"status": status}
            if status == 200:
                answer = json.loads(body)
                probe.update(mailbox_id=answer.get("mailbox_id"), mailbox=answer.get("mailbox"))
            state["probes"][message_id] = probe
        final[str(node.index)] = state
    return final


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def on_signal(number, _frame):
    raise Interrupted(f"signal {number}")


def write_credentials(binary, root):
    """The accounts file (`mailmesh passwd --user NAME` makes each line) and the token file."""
    lines = []
    for account in ACCOUNTS:
        made = subprocess.run([binary, "passwd", "--user", account], input="chaos-password\n", capture_output=True,
                              text=True, check=True)
        lines.append(made.stdout.strip())
    with open(os.path.join(root, "accounts"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "token"), "w") as handle:
        handle.write(TOKEN + "\n")


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/mailmesh-target")
    return os.environ.get("MAILMESH_BINARY", os.path.join(target, "release", "mailmesh"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of faults and load")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--binary", default=default_binary())
    parser.add_argument("--workdir", default="/var/tmp/mailmesh-chaos")
    parser.add_argument("--converge-deadline", type=float, default=120.0)
    parser.add_argument("--gossip-interval-ms", type=int, default=500)
    parser.add_argument("--feed-clients", type=int, default=4,
                        help="change-feed clients, spread over the accounts (0: none)")
    parser.add_argument("--feed-bad-token-rate", type=float, default=0.0,
                        help="share of feed catch-ups that send a malformed token (expect 410, then a resync)")
    parser.add_argument("--only-faults", default=None,
                        help=f"comma-separated fault kinds to draw from ({','.join(FAULT_WEIGHTS)}; default all)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even when the run passes")
    parser.add_argument("--cleanup", action="store_true", help=f"remove namespaces named {PREFIX_FAMILY}* and exit")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("chaos.py needs root (network namespaces)")
    if arguments.cleanup:
        removed = cleanup_leftovers(PREFIX_FAMILY)
        print(json.dumps({"removed_namespaces": removed}))
        return 0
    if arguments.nodes < 3:
        raise SystemExit("--nodes must be at least 3")
    if not os.access(arguments.binary, os.X_OK):
        raise SystemExit(f"no mailmesh binary at {arguments.binary}: cargo build --release --bin mailmesh")
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(1, 1 << 31)
    prefix = f"{PREFIX_FAMILY}{os.urandom(3).hex()}"
    os.makedirs(arguments.workdir, exist_ok=True)
    root = tempfile.mkdtemp(prefix=f"seed{seed}-", dir=arguments.workdir)
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, on_signal)
    history = History(os.path.join(root, "history.jsonl"))
    write_credentials(arguments.binary, root)
    kinds = None
    if arguments.only_faults:
        kinds = set(arguments.only_faults.split(","))
        unknown = kinds - set(FAULT_WEIGHTS)
        if unknown or not kinds:
            raise SystemExit(f"--only-faults takes a comma-separated subset of {','.join(FAULT_WEIGHTS)}")
    schedule = make_schedule(seed, arguments.duration, arguments.nodes, kinds)
    history.write({"type": "run", "seed": seed, "prefix": prefix, "nodes": arguments.nodes,
                   "duration": arguments.duration, "binary": arguments.binary, "schedule": schedule,
                   "accounts": ACCOUNTS, "mailbox_pool": MAILBOX_POOL, "feed_clients": arguments.feed_clients})
    log(f"seed {seed}, prefix {prefix}, work dir {root}, {len(schedule)} faults")
    network = Network(prefix, arguments.nodes)
    nodes = []
    stop = threading.Event()
    threads = []
    summary = None
    try:
        network.create()
        network.enter_client_namespace()
        nodes = [NodeProcess(index, network, arguments.binary, root, arguments.gossip_interval_ms)
                 for index in range(arguments.nodes)]
        for node in nodes:
            node.start(history)
        for node in nodes:
            node.wait_healthy()
        if wait_converged(nodes, 30.0) is None:
            raise RuntimeError("the empty cluster did not agree within 30 s")
        model = Model()
        threads = [Client(node.index, node, model, history, stop, seed, prefix) for node in nodes]
        feed_clients = [FeedClient(number, ACCOUNTS[number % len(ACCOUNTS)], nodes, history, stop, seed,
                                   arguments.feed_bad_token_rate)
                        for number in range(arguments.feed_clients)]
        threads += [Reader(nodes, history, stop, seed), Poller(nodes, history, stop)] + feed_clients
        for thread in threads:
            thread.start()
        history.event("load-started")
        nemesis = Nemesis(network, nodes, history, [thread for thread in threads if isinstance(thread, Client)])
        began = time.monotonic()
        for start, kind, parameters, length in schedule:
            delay = start - (time.monotonic() - began)
            if delay > 0 and stop.wait(delay):
                break
            log(f"fault {kind} {parameters} for {length:.1f} s")
            nemesis.apply(kind, parameters, length, threading.Event())
        remaining = arguments.duration - (time.monotonic() - began)
        if remaining > 0:
            time.sleep(remaining)
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT * 3 + 5)
        client_errors = [thread.error for thread in threads
                         if isinstance(thread, (Client, FeedClient)) and thread.error]
        nemesis.heal_all()
        history.event("heal")
        healed = history.now()
        log("all faults healed; waiting for convergence")
        converged_after = wait_converged(nodes, arguments.converge_deadline)
        history.event("converged" if converged_after is not None else "not-converged",
                      seconds=None if converged_after is None else round(history.now() - healed, 3))
        final = read_final_state(nodes, list(model.messages))
        final["feed_final"] = final_feed_catch_ups(feed_clients, nodes, seed)
        final["converged_seconds"] = None if converged_after is None else round(history.now() - healed, 3)
        final["digest_after_reading"] = all_same_digest(nodes)
        final["client_errors"] = client_errors
        with open(os.path.join(root, "final.json"), "w") as handle:
            json.dump(final, handle)
        history.close()
        summary = chaos_check.check(root)
    except Interrupted as error:
        log(f"interrupted ({error}); cleaning up; work dir kept: {root}")
        raise SystemExit(130)
    finally:
        stop.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for node in nodes:
            try:
                node.kill()
            except OSError:
                pass
        network.destroy()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if summary is None:
            log(f"the run did not finish: seed {seed}, work dir kept: {root}")
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    if summary["problems"]:
        log(f"PROBLEMS {summary['problems']}: replay with --seed {seed} --duration {arguments.duration:g}; "
            f"history and logs kept in {root}")
        return 1
    if not arguments.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
