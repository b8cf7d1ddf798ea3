#!/usr/bin/env python3
"""Real Postfix delivering over LMTP to a real mailmesh cluster.

Starts four `mailmesh node` processes on 127.0.0.1 (alpha, bravo, charlie, delta; ports chosen by
the OS and read back from each data_dir/http.addr, as src/harness.rs does) with one accounts
file; alpha serves LMTP on a fixed loopback port, delta on a unix socket. Then it runs a private Postfix instance (its own
config, queue and data directories under a temporary directory, `postfix -c DIR`, SMTP on a
loopback port) whose `virtual_transport` is `lmtp:inet:127.0.0.1:PORT`, sends mail into it over
SMTP with Python's smtplib, and checks on bravo and charlie (so through replication) that:

  1. a normal message arrives, with Return-Path, Delivered-To and Received on top, byte-exact below;
  2. an unknown recipient is bounced by Postfix (550 5.1.1 from the node), and the bounce itself
     reaches the sender's mailbox over LMTP;
  3. a multi-recipient message (two accounts and a user+detail mailbox) reaches every recipient;
  4. a 4xx from the node (alpha restarted with a free-space reserve it cannot meet, so the store
     refuses writes with 452 4.3.1) leaves the message deferred in Postfix's queue; once alpha
     takes writes again, a queue flush delivers it;
  5. with alpha stopped (connection refused) the message is deferred too, and delivered after
     alpha is back and the queue is flushed;
  6. Postfix's `lmtp:unix:` transport (a transport map entry for dave@) reaches a fourth node,
     delta, on a unix socket, and the message replicates to charlie.

Prints one line per check and a JSON summary; exit status 0 when every check passes, 1 otherwise.
Postfix and the nodes are always stopped and the temporary directory removed (unless --keep).
Run as root (Postfix's master runs as root and drops to the `postfix` user).
"""

import argparse
import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

TOKEN = "postfix-lmtp-check-token-0123456789"
# `doveadm pw -s SHA512-CRYPT -p secret`
SECRET_HASH = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8."
ACCOUNTS = ["alice@example.org", "bob@example.org", "carol@example.org", "dave@example.org"]
WAIT_SECONDS = 60


def log(message):
    print(f"postfix-lmtp: {message}", flush=True)


def free_port():
    """A port that was free a moment ago (bind and release, so racy). Only Postfix's SMTP listener
    uses it: Postfix cannot report a port the kernel chose. The node's LMTP listens on port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what, check, seconds=WAIT_SECONDS):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise CheckFailed(f"timed out after {seconds} s waiting for {what}")


class CheckFailed(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class Node:
    """One `mailmesh node` process with its own data directory."""

    def __init__(self, binary, name, directory, common):
        self.binary, self.name, self.common = binary, name, common
        self.data_dir = os.path.join(directory, name)
        self.process = None
        self.http = None
        os.makedirs(self.data_dir, exist_ok=True)

    def start(self, peers=(), lmtp=None, config=None):
        address_file = os.path.join(self.data_dir, "http.addr")
        if os.path.exists(address_file):
            os.remove(address_file)
        arguments = [self.binary, "node", "--name", self.name, "--data-dir", self.data_dir,
                     "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0",
                     "--cluster", "postfix-check", "--gossip-interval-ms", "300"] + self.common
        for peer in peers:
            arguments += ["--peer", peer]
        if lmtp:
            arguments += ["--lmtp", lmtp]
        if config:
            arguments += ["--config", config]
        with open(os.path.join(self.data_dir, "node.log"), "ab") as log_file:
            self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise CheckFailed(f"{self.name} exited with {self.process.returncode}; see {self.data_dir}/node.log")
            try:
                with open(address_file) as handle:
                    self.http = handle.read().strip()
                if self.http and self.request("/healthz").get("status") == "alive":
                    return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise CheckFailed(f"{self.name} did not start within 60 s; see {self.data_dir}/node.log")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def request(self, path, method="GET", body=None, raw=False):
        request = urllib.request.Request(f"http://{self.http}{path}", data=body, method=method,
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
        return data if raw else json.loads(data)

    def listen_address(self):
        status = self.request("/v1/status")
        return next(address for address in status["listen"] if "127.0.0.1" in address)

    @staticmethod
    def mailbox_path(account, mailbox):
        quote = lambda text: urllib.parse.quote(text, safe="")
        return f"/v1/mailboxes/{quote(account)}/{quote(mailbox)}"

    def messages(self, account, mailbox):
        """Every message of a mailbox as (item, raw bytes)."""
        path = self.mailbox_path(account, mailbox)
        try:
            items = self.request(f"{path}/messages?limit=1000")["items"]
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return []
            raise
        return [(item, self.request(f"{path}/messages/{item['id']}/raw", raw=True)) for item in items]

    def find(self, account, mailbox, marker):
        """The raw bytes of the message whose bytes contain `marker`, if there is one."""
        for _, raw in self.messages(account, mailbox):
            if marker.encode() in raw:
                return raw
        return None


# --------------------------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------------------------

MASTER_CF = """\
{smtp} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
lmtp      unix  - - n -  - lmtp
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.mailmesh.test
mydestination =
inet_protocols = ipv4
inet_interfaces = loopback-only
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
alias_maps =
alias_database =
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
# Every address at example.org goes to mailmesh over LMTP; the node decides who exists.
virtual_mailbox_domains = example.org
virtual_transport = lmtp:inet:127.0.0.1:{lmtp}
# dave@ goes to another node over a unix socket.
transport_maps = texthash:{root}/etc/transport
# Deferred mail waits for an explicit flush (postqueue -f), so the check sees it deferred.
queue_run_delay = 300s
minimal_backoff_time = 300s
maximal_backoff_time = 300s
lmtp_connect_timeout = 5s
"""


class Postfix:
    """A private Postfix instance: its own config, queue and data directories."""

    def __init__(self, root, smtp_port, lmtp_port, socket_path):
        """`lmtp_port`: the port the node reported (data_dir/lmtp.addr) after binding port 0."""
        self.root = os.path.join(root, "postfix")
        self.config = os.path.join(self.root, "etc")
        self.smtp_port = smtp_port
        for folder in ("etc", "queue", "data"):
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)
        shutil.chown(os.path.join(self.root, "data"), user="postfix")
        with open(os.path.join(self.config, "main.cf"), "w") as handle:
            handle.write(MAIN_CF.format(root=self.root, lmtp=lmtp_port))
        with open(os.path.join(self.config, "transport"), "w") as handle:
            handle.write(f"dave@example.org lmtp:unix:{socket_path}\n")
        with open(os.path.join(self.config, "master.cf"), "w") as handle:
            handle.write(MASTER_CF.format(smtp=f"127.0.0.1:{smtp_port}"))
        self.started = False

    def command(self, *arguments, check=True):
        return subprocess.run(list(arguments), check=check, capture_output=True, text=True)

    def start(self):
        result = self.command("postfix", "-c", self.config, "start", check=False)
        if result.returncode != 0:
            raise CheckFailed(f"postfix did not start: {result.stderr.strip()} {self.log_tail()}")
        self.started = True
        wait_for("Postfix's SMTP port", self.smtp_answers, 30)

    def smtp_answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2):
                return True
        except OSError:
            return False

    def stop(self):
        if self.started:
            self.command("postfix", "-c", self.config, "stop", check=False)
            self.started = False

    def send(self, sender, recipients, message):
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            refused = client.sendmail(sender, recipients, message)
        if refused:
            raise CheckFailed(f"Postfix refused at SMTP: {refused}")

    def queue(self):
        """The messages in the queue, from `postqueue -j`."""
        output = self.command("postqueue", "-c", self.config, "-j").stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def flush(self):
        self.command("postqueue", "-c", self.config, "-f")

    def log_text(self):
        try:
            with open(os.path.join(self.root, "postfix.log")) as handle:
                return handle.read()
        except OSError:
            return ""

    def log_tail(self, lines=8):
        return "\n".join(self.log_text().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def message(subject, to, body):
    return (f"From: Bob <bob@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


def check_copy(raw, recipient, sender, body, server="alpha"):
    """Our trace headers come first; Postfix's Received follows; the body is byte-exact."""
    text = raw.decode("utf-8", "replace")
    lines = text.split("\r\n")
    if lines[0] != f"Return-Path: <{sender}>":
        raise CheckFailed(f"first line is {lines[0]!r}, not the Return-Path of {sender}")
    if lines[1] != f"Delivered-To: {recipient}":
        raise CheckFailed(f"second line is {lines[1]!r}, not Delivered-To: {recipient}")
    if not lines[2].startswith("Received: from mta.mailmesh.test") or f"by {server} (mailmesh) with LMTP" not in text:
        raise CheckFailed(f"no Received line of ours: {lines[2:5]!r}")
    if not raw.endswith(body.encode()):
        raise CheckFailed("the body is not byte-exact")


def run_checks(binary, directory):
    smtp_port = free_port()
    accounts = os.path.join(directory, "accounts")
    with open(accounts, "w") as handle:
        handle.writelines(f"{account}:{SECRET_HASH}\n" for account in ACCOUNTS)
    token = os.path.join(directory, "token")
    with open(token, "w") as handle:
        handle.write(TOKEN + "\n")
    full_disk = os.path.join(directory, "full-disk.toml")
    with open(full_disk, "w") as handle:
        handle.write("min_free_bytes = 1000000000000000000\n")
    common = ["--accounts-file", accounts, "--http-token-file", token]
    socket_path = os.path.join(directory, "delta-lmtp.sock")

    alpha, bravo, charlie, delta = (Node(binary, name, directory, common)
                                    for name in ("alpha", "bravo", "charlie", "delta"))
    nodes = [alpha, bravo, charlie, delta]
    postfix = None
    checks = []
    try:
        # alpha's LMTP listens on a port the kernel chooses; its restarts keep that port, as a
        # deployed node's would, so Postfix's configuration stays right.
        alpha.start(lmtp="127.0.0.1:0")
        with open(os.path.join(alpha.data_dir, "lmtp.addr")) as handle:
            lmtp = handle.read().strip()
        lmtp_port = int(lmtp.rsplit(":", 1)[1])
        postfix = Postfix(directory, smtp_port, lmtp_port, socket_path)
        bravo.start(peers=[alpha.listen_address()])
        charlie.start(peers=[alpha.listen_address()])
        peers_of_alpha = [bravo.listen_address(), charlie.listen_address()]
        delta.start(peers=[alpha.listen_address()], lmtp=f"unix:{socket_path}")
        # alice has a mailbox "lists" (made over HTTP), so alice+lists@ delivers there.
        alpha.request(Node.mailbox_path("alice@example.org", "lists") + "/messages", "POST",
                      b"Subject: made over HTTP\r\n\r\nfirst\r\n")
        postfix.start()
        log(f"cluster of 4 up, Postfix {postfix.command('postconf', '-c', postfix.config, '-h', 'mail_version').stdout.strip()} "
            f"on 127.0.0.1:{smtp_port} -> LMTP 127.0.0.1:{lmtp_port}")

        def check(name, function):
            started = time.time()
            try:
                function()
            except CheckFailed as error:
                checks.append({"check": name, "passed": False, "error": str(error)})
                log(f"FAILED {name}: {error}")
                log("postfix log:\n" + postfix.log_tail())
                return
            seconds = round(time.time() - started, 2)
            checks.append({"check": name, "passed": True, "seconds": seconds})
            log(f"ok     {name} ({seconds} s)")

        def normal():
            # Lines under 998 bytes: Postfix itself folds longer ones (lmtp_line_length_limit).
            body = "Bonjour, ça va ?\r\n.a dotted line\r\n" + "z" * 990 + "\r\n"
            postfix.send("bob@example.org", ["alice@example.org"], message("normal", "alice@example.org", body))
            for node in (bravo, charlie):
                raw = wait_for(f"the message on {node.name}", lambda: node.find("alice@example.org", "INBOX", "normal@"))
                check_copy(raw, "alice@example.org", "bob@example.org", body)

        def unknown():
            postfix.send("bob@example.org", ["nobody@example.org"], message("unknown", "nobody@example.org", "lost?\r\n"))
            wait_for("Postfix to log the bounce", lambda: "to=<nobody@example.org>" in postfix.log_text()
                     and "status=bounced" in postfix.log_text())
            line = next(line for line in postfix.log_text().splitlines()
                        if "to=<nobody@example.org>" in line and "status=bounced" in line)
            if "550 5.1.1" not in line:
                raise CheckFailed(f"bounced, but not with 550 5.1.1: {line}")
            # The bounce goes back to bob over LMTP too; it reaches bob's mailbox on charlie.
            wait_for("the bounce in bob's INBOX on charlie",
                     lambda: charlie.find("bob@example.org", "INBOX", "unknown@example.org"))
            if any(entry for entry in postfix.queue()):
                raise CheckFailed(f"the queue is not empty: {postfix.queue()}")

        def multiple():
            recipients = ["alice@example.org", "carol@example.org", "alice+lists@example.org"]
            body = "one message, three mailboxes\r\n"
            postfix.send("bob@example.org", recipients, message("multiple", ", ".join(recipients), body))
            for account, mailbox, recipient in [("alice@example.org", "INBOX", "alice@example.org"),
                                                ("carol@example.org", "INBOX", "carol@example.org"),
                                                ("alice@example.org", "lists", "alice+lists@example.org")]:
                for node in (bravo, charlie):
                    raw = wait_for(f"{recipient} on {node.name}", lambda: node.find(account, mailbox, "multiple@"))
                    check_copy(raw, recipient, "bob@example.org", body)

        def deferred(subject, reason, break_alpha, mend_alpha):
            break_alpha()
            body = f"{subject}: held back, then delivered\r\n"
            postfix.send("bob@example.org", ["carol@example.org"], message(subject, "carol@example.org", body))
            entry = wait_for(f"the message deferred with {reason!r}", lambda: next(
                (entry for entry in postfix.queue() if entry["queue_name"] == "deferred"
                 and reason in entry["recipients"][0].get("delay_reason", "")), None))
            log(f"       deferred in Postfix's queue: {entry['recipients'][0]['delay_reason']}")
            if bravo.find("carol@example.org", "INBOX", f"{subject}@"):
                raise CheckFailed("delivered although alpha refused it")
            mend_alpha()
            postfix.flush()
            raw = wait_for("the message on bravo after the flush",
                           lambda: bravo.find("carol@example.org", "INBOX", f"{subject}@"))
            check_copy(raw, "carol@example.org", "bob@example.org", body)
            wait_for("an empty queue", lambda: not postfix.queue())

        def unix_socket():
            body = "over lmtp:unix:\r\n"
            postfix.send("bob@example.org", ["dave@example.org"], message("unix", "dave@example.org", body))
            raw = wait_for("dave's message on charlie", lambda: charlie.find("dave@example.org", "INBOX", "unix@"))
            check_copy(raw, "dave@example.org", "bob@example.org", body, server="delta")
            line = next((line for line in postfix.log_text().splitlines() if "to=<dave@example.org>" in line), "")
            if "status=sent" not in line or socket_path not in line:
                raise CheckFailed(f"Postfix did not log a delivery over {socket_path}: {line!r}")

        def restart_alpha(config=None):
            alpha.stop()
            alpha.start(peers=peers_of_alpha, lmtp=lmtp, config=config)

        check("normal delivery, read on bravo and charlie", normal)
        check("unknown recipient bounced (550 5.1.1), bounce delivered", unknown)
        check("multi-recipient message, user+detail mailbox", multiple)
        check("4xx (store full: 452 4.3.1) deferred, then delivered after a flush",
              lambda: deferred("full-disk", "452 4.3.1", lambda: restart_alpha(full_disk), restart_alpha))
        check("node down (connection refused) deferred, then delivered after a flush",
              lambda: deferred("node-down", "Connection refused", alpha.stop,
                               lambda: alpha.start(peers=peers_of_alpha, lmtp=lmtp)))
        check("lmtp:unix: transport to a fourth node, replicated", unix_socket)
    finally:
        if postfix:
            postfix.stop()
        for node in nodes:
            node.stop()
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        log("must run as root (Postfix's master starts as root)")
        return 2
    started = time.time()
    directory = tempfile.mkdtemp(prefix="mailmesh-postfix-")
    # Postfix's daemons run as the postfix user and must reach their directories.
    os.chmod(directory, 0o755)
    try:
        checks = run_checks(os.path.abspath(arguments.binary), directory)
    except Exception as error:  # a failure outside a check (setup, or a bug here) fails the run
        log(f"FAILED setup: {error!r}")
        checks = [{"check": "setup", "passed": False, "error": str(error)}]
    finally:
        if arguments.keep:
            log(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    failed = sum(1 for entry in checks if not entry["passed"])
    summary = {"summary": "postfix-lmtp", "checks": len(checks), "passed": len(checks) - failed,
               "failed": failed, "seconds": round(time.time() - started, 1)}
    print(json.dumps(summary), flush=True)
    return 1 if failed or len(checks) < 6 else 0


if __name__ == "__main__":
    sys.exit(main())
