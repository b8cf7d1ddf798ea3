#!/usr/bin/env python3
"""Real IMAP clients against a real two-node mailmesh cluster (issue 15, item 4).

Starts two `mailmesh node` processes on 127.0.0.1 (alpha and bravo, peered, IMAP on ports the OS
chooses, read back from data_dir/imap.addr) with one accounts file, then checks:

  1. imaplib (Python's stdlib): LOGIN, LIST, SELECT, APPEND with flags and a date, FETCH, STORE,
     SEARCH, EXPUNGE;
  2. replication into a selected session: a message appended on bravo shows up on alpha as an
     unsolicited EXISTS, once in IDLE and once by NOOP;
  3. CONDSTORE/QRESYNC with imaplib: a client caches alpha's INBOX (UIDVALIDITY, HIGHESTMODSEQ,
     UIDs and flags), messages are added, flagged and expunged on bravo, and once they reach alpha
     the client resyncs with SELECT (QRESYNC ...): VANISHED (EARLIER) and the changed FETCHes
     must bring its cache to what a full fetch shows;
  4. subscriptions: SUBSCRIBE and UNSUBSCRIBE on alpha show in LSUB on bravo;
  5. mbsync (Debian's isync): a two-way sync of alpha's INBOX with a local Maildir, changes on both
     sides (new mail, a flag, a deletion), then two more syncs, with alpha restarted between them:
     no errors, both sides hold the same messages, nothing duplicated;
  6. offlineimap (Debian's offlineimap3): a two-way sync of INBOX with a Maildir of its own, a new
     message on each side and a flag set on the server, then two more runs: no errors, both sides
     equal, nothing duplicated;
  7. LIST-EXTENDED and LIST-STATUS with imaplib: LIST (SUBSCRIBED) with RETURN (CHILDREN STATUS
     (...)), whose STATUS must agree with SELECT, and RECURSIVEMATCH's CHILDINFO;
  8. imapclient (PyPI, in the virtualenv scripts/imap-clients.sh makes): IDLE on alpha sees a
     message appended on bravo, then FETCH (CHANGEDSINCE) names it, folder_status agrees with
     SEARCH, and BINARY.PEEK[1] gives its body.

Prints one line per check and a JSON summary; exit status 0 when every check passes, 1 otherwise.
The nodes are always stopped and the temporary directory removed (unless --keep).
"""

import argparse
import email
import imaplib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from client_checks import WAIT_SECONDS, CheckFailed, expect, run_checks, wait_for

TOKEN = "imap-clients-check-token-0123456789"
# `doveadm pw -s SHA512-CRYPT -p secret`
SECRET_HASH = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8."
ACCOUNT = "alice@example.org"


def log(message):
    print(f"imap-clients: {message}", flush=True)


def message(subject, marker):
    return (
        f"From: Carol <carol@example.net>\r\nTo: {ACCOUNT}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{marker}@example.net>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n"
        f"Body of {marker}\r\n"
    ).encode()


class Node:
    """One `mailmesh node` process with its own data directory."""

    def __init__(self, binary, name, directory, common):
        self.binary, self.name, self.common = binary, name, common
        self.data_dir = os.path.join(directory, name)
        self.process = None
        os.makedirs(self.data_dir, exist_ok=True)

    def start(self, peers=()):
        for name in ("http.addr", "imap.addr"):
            path = os.path.join(self.data_dir, name)
            if os.path.exists(path):
                os.remove(path)
        arguments = [self.binary, "node", "--name", self.name, "--data-dir", self.data_dir,
                     "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--imap", "127.0.0.1:0",
                     "--cluster", "imap-check", "--gossip-interval-ms", "300"] + self.common
        for peer in peers:
            arguments += ["--peer", peer]
        with open(os.path.join(self.data_dir, "node.log"), "ab") as log_file:
            self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise CheckFailed(f"{self.name} exited with {self.process.returncode}; see {self.data_dir}/node.log")
            try:
                with open(os.path.join(self.data_dir, "http.addr")) as handle:
                    self.http = handle.read().strip()
                with open(os.path.join(self.data_dir, "imap.addr")) as handle:
                    host, port = handle.read().strip().rsplit(":", 1)
                    self.imap = (host, int(port))
                if self.request("/healthz").get("status") == "alive":
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

    def request(self, path):
        request = urllib.request.Request(f"http://{self.http}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def listen_address(self):
        status = self.request("/v1/status")
        return next(address for address in status["listen"] if "127.0.0.1" in address)

    def client(self):
        client = imaplib.IMAP4(*self.imap)
        client.login(ACCOUNT, "secret")
        return client


def check(typ, data, what):
    expect(typ == "OK", f"{what}: {typ} {data!r}")
    return data


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_imaplib(alpha):
    client = alpha.client()
    check(*client.list(), "LIST")
    check(*client.select("INBOX"), "SELECT")
    date = imaplib.Time2Internaldate(time.mktime((2026, 12, 1, 10, 0, 0, 0, 0, 0)))
    typ, data = client.append("INBOX", "(\\Flagged)", date, message("first", "imaplib-1"))
    check(typ, data, "APPEND")
    expect(b"APPENDUID" in data[0], f"APPENDUID in {data!r}")
    check(*client.append("INBOX", None, None, message("second", "imaplib-2")), "APPEND")
    data = check(*client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), "UID FETCH")
    subjects = [part[1] for part in data if isinstance(part, tuple)]
    expect(subjects == [b"Subject: first\r\n\r\n", b"Subject: second\r\n\r\n"], f"subjects {subjects!r}")
    data = check(*client.fetch("2", "(BODY[])"), "FETCH BODY[]")
    parsed = email.message_from_bytes(data[0][1])
    expect(parsed["Message-ID"] == "<imaplib-2@example.net>", f"fetched {parsed['Message-ID']}")
    data = check(*client.search(None, "UNSEEN"), "SEARCH UNSEEN")
    expect(data == [b"1"], f"UNSEEN is message 1 only after BODY[] read 2: {data!r}")
    check(*client.store("1", "+FLAGS", "(\\Deleted)"), "STORE")
    data = check(*client.expunge(), "EXPUNGE")
    expect(data == [b"1"], f"EXPUNGE answered {data!r}")
    data = check(*client.search(None, "ALL"), "SEARCH ALL")
    expect(data == [b"1"], f"one message left: {data!r}")
    client.logout()
    return {"commands": "LIST SELECT APPEND UID-FETCH FETCH SEARCH STORE EXPUNGE LOGOUT"}


def idle_until_exists(client, seconds):
    """IDLE (imaplib of Python 3.11 has none: sent by hand) until an EXISTS arrives."""
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    expect(client.readline().startswith(b"+"), "IDLE continuation")
    client.sock.settimeout(seconds)
    started = time.time()
    try:
        line = client.readline()
    finally:
        client.sock.settimeout(None)
    elapsed = time.time() - started
    client.send(b"DONE\r\n")
    while True:
        answer = client.readline()
        if answer.startswith(tag):
            break
    return line, elapsed


def check_replication(alpha, bravo):
    watcher = alpha.client()
    check(*watcher.select("INBOX"), "SELECT on alpha")
    writer = bravo.client()
    started = time.time()
    check(*writer.append("INBOX", None, None, message("from bravo", "replicated-1")), "APPEND on bravo")
    line, _ = idle_until_exists(watcher, WAIT_SECONDS)
    idle_seconds = time.time() - started
    expect(line.endswith(b"EXISTS\r\n"), f"IDLE on alpha saw {line!r}")
    check(*writer.append("INBOX", None, None, message("from bravo again", "replicated-2")), "APPEND on bravo")
    deadline = time.time() + WAIT_SECONDS
    seen = False
    while time.time() < deadline and not seen:
        watcher.untagged_responses.pop("EXISTS", None)
        check(*watcher.noop(), "NOOP")
        seen = bool(watcher.untagged_responses.pop("EXISTS", None))
        if not seen:
            time.sleep(0.2)
    expect(seen, "NOOP on alpha never showed the second message from bravo")
    watcher.logout()
    writer.logout()
    return {"idle_seconds_from_append_on_bravo": round(idle_seconds, 3)}


def fetch_flags(client):
    """{uid: set of flags} of the selected mailbox, from UID FETCH 1:* (FLAGS)."""
    data = check(*client.uid("FETCH", "1:*", "(FLAGS)"), "UID FETCH FLAGS")
    return parse_fetches(data)


def parse_fetches(lines):
    found = {}
    for line in lines:
        if isinstance(line, tuple):
            line = line[0]
        if not line:
            continue
        text = line.decode() if isinstance(line, bytes) else line
        if "UID " not in text or "FLAGS (" not in text:
            continue
        uid = int(text.split("UID ", 1)[1].split()[0].rstrip(")"))
        flags = text.split("FLAGS (", 1)[1].split(")", 1)[0].split()
        found[uid] = set(flags)
    return found


def response_code(client, name):
    values = client.untagged_responses.pop(name, [None])
    return values[-1]


def uid_set(text):
    uids = set()
    for part in text.split(","):
        if ":" in part:
            low, high = (int(number) for number in part.split(":"))
            uids.update(range(min(low, high), max(low, high) + 1))
        elif part:
            uids.add(int(part))
    return uids


def check_qresync(alpha, bravo):
    for number in range(1, 5):
        check(*bravo.client().append("INBOX", None, None, message(f"cached {number}", f"qresync-{number}")), "APPEND")

    def alpha_has(marker, present=True):
        client = alpha.client()
        check(*client.select("INBOX", readonly=True), "EXAMINE")
        data = check(*client.search(None, "HEADER", "Message-ID", marker), "SEARCH")
        client.logout()
        return (data != [b""]) == present

    wait_for("the seeded messages reach alpha", lambda: alpha_has("qresync-4"))

    # The client's cache, taken on alpha.
    client = alpha.client()
    data = check(*client._simple_command("ENABLE", "QRESYNC"), "ENABLE QRESYNC")
    enabled = client.untagged_responses.pop("ENABLED", [b""])[-1]
    expect(b"QRESYNC" in enabled, f"ENABLED {enabled!r}")
    check(*client.select("INBOX"), "SELECT")
    validity = int(response_code(client, "UIDVALIDITY"))
    highest = int(response_code(client, "HIGHESTMODSEQ"))
    cache = fetch_flags(client)
    client.logout()
    expect(len(cache) >= 4, f"cache {cache}")

    # Changes on bravo: a new message, a flag, an expunge.
    writer = bravo.client()
    check(*writer.select("INBOX"), "SELECT on bravo")
    check(*writer.append("INBOX", None, None, message("while away", "qresync-new")), "APPEND on bravo")
    flagged = check(*writer.search(None, "HEADER", "Message-ID", "qresync-2"), "SEARCH")[0].decode()
    check(*writer.store(flagged, "+FLAGS", "(\\Flagged)"), "STORE on bravo")
    doomed = check(*writer.search(None, "HEADER", "Message-ID", "qresync-3"), "SEARCH")[0].decode()
    check(*writer.store(doomed, "+FLAGS", "(\\Deleted)"), "STORE on bravo")
    check(*writer.expunge(), "EXPUNGE on bravo")
    writer.logout()
    wait_for("bravo's changes reach alpha",
             lambda: alpha_has("qresync-new") and alpha_has("qresync-3", present=False)
             and alpha_has_flag(alpha, "qresync-2", "FLAGGED"))

    # Resync on alpha from the cache.
    client = alpha.client()
    check(*client._simple_command("ENABLE", "QRESYNC"), "ENABLE QRESYNC")
    client.untagged_responses.clear()
    known = ",".join(str(uid) for uid in sorted(cache))
    started = time.time()
    typ, data = client._simple_command("SELECT", f"INBOX (QRESYNC ({validity} {highest} {known}))")
    resync_seconds = time.time() - started
    check(typ, data, "SELECT (QRESYNC)")
    client.state = "SELECTED"
    vanished = set()
    for line in client.untagged_responses.pop("VANISHED", []):
        text = line.decode()
        expect(text.startswith("(EARLIER) "), f"VANISHED {text}")
        vanished |= uid_set(text.split(" ", 1)[1])
    changed = parse_fetches(client.untagged_responses.pop("FETCH", []))
    expect(int(response_code(client, "HIGHESTMODSEQ")) > highest, "HIGHESTMODSEQ did not advance")
    for uid in vanished:
        cache.pop(uid, None)
    cache.update(changed)
    truth = fetch_flags(client)
    client.logout()
    expect(len(vanished) == 1, f"one message vanished, told {vanished}")
    expect(cache == truth, f"after QRESYNC the cache {cache} differs from the mailbox {truth}")
    return {"vanished": sorted(vanished), "changed_fetches": len(changed), "messages": len(truth),
            "resync_seconds": round(resync_seconds, 3)}


def alpha_has_flag(node, marker, flag):
    client = node.client()
    check(*client.select("INBOX", readonly=True), "EXAMINE")
    data = check(*client.search(None, flag, "HEADER", "Message-ID", marker), "SEARCH")
    client.logout()
    return data != [b""]


def check_subscriptions(alpha, bravo):
    creator = alpha.client()
    check(*creator.create("Lists"), "CREATE on alpha")

    def bravo_lsub():
        client = bravo.client()
        data = check(*client.lsub(), "LSUB on bravo")
        client.logout()
        return [line.decode() for line in data if line]

    wait_for("Lists subscribed on bravo", lambda: any(line.endswith('"Lists"') for line in bravo_lsub()))
    check(*creator.unsubscribe("Lists"), "UNSUBSCRIBE on alpha")
    wait_for("Lists unsubscribed on bravo", lambda: not any(line.endswith('"Lists"') for line in bravo_lsub()))
    check(*creator.subscribe("Lists"), "SUBSCRIBE on alpha")
    wait_for("Lists subscribed again on bravo", lambda: any(line.endswith('"Lists"') for line in bravo_lsub()))
    creator.logout()
    return {"lsub_on_bravo": bravo_lsub()}


MBSYNC_CONFIG = """\
IMAPAccount remote
Host {host}
Port {port}
User {user}
Pass secret
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account remote

MaildirStore local
Path {root}/
Inbox {root}/INBOX

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Expunge Both
Sync All
SyncState *
"""


def maildir_messages(root):
    found = []
    for sub in ("cur", "new"):
        directory = os.path.join(root, "INBOX", sub)
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as handle:
                    found.append((name, email.message_from_bytes(handle.read())["Message-ID"]))
    return found


def server_message_ids(node):
    client = node.client()
    check(*client.select("INBOX", readonly=True), "EXAMINE")
    data = check(*client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"), "FETCH")
    client.logout()
    ids = []
    for part in data:
        if isinstance(part, tuple):
            ids.append(email.message_from_bytes(part[1])["Message-ID"])
    return ids


def run_mbsync(config_path, round_name):
    result = subprocess.run(["mbsync", "-c", config_path, "-a"], capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or "rror" in output:
        raise CheckFailed(f"mbsync ({round_name}) exited {result.returncode}: {output}")
    return output


def check_mbsync(alpha, directory, restart):
    root = os.path.join(directory, "maildir")
    os.makedirs(root, exist_ok=True)
    config_path = os.path.join(directory, "mbsyncrc")
    with open(config_path, "w") as handle:
        handle.write(MBSYNC_CONFIG.format(host=alpha.imap[0], port=alpha.imap[1], user=ACCOUNT, root=root))
    client = alpha.client()
    for number in range(1, 4):
        check(*client.append("INBOX", None, None, message(f"seed {number}", f"seed-{number}")), "APPEND seed")
    client.logout()

    run_mbsync(config_path, "first")
    local = maildir_messages(root)
    server = server_message_ids(alpha)
    expect(sorted(mid for _, mid in local) == sorted(server), f"first sync: local {local} server {server}")

    # Changes on both sides: a new local message, a local \Seen, a local deletion; a new server
    # message and a server flag.
    new_dir = os.path.join(root, "INBOX", "new")
    os.makedirs(new_dir, exist_ok=True)
    with open(os.path.join(new_dir, f"{int(time.time())}.local.mailmesh"), "wb") as handle:
        handle.write(message("written locally", "local-1"))
    by_id = {mid: name for name, mid in local}
    cur_dir = os.path.join(root, "INBOX", "cur")
    seen_name = by_id["<seed-1@example.net>"]
    seen_path = next(os.path.join(d, seen_name) for d in (cur_dir, new_dir) if os.path.exists(os.path.join(d, seen_name)))
    base = seen_name.split(":2,")[0]
    os.rename(seen_path, os.path.join(cur_dir, base + ":2,S"))
    deleted_name = by_id["<seed-2@example.net>"]
    for d in (cur_dir, new_dir):
        if os.path.exists(os.path.join(d, deleted_name)):
            os.remove(os.path.join(d, deleted_name))
    client = alpha.client()
    check(*client.select("INBOX"), "SELECT")
    check(*client.append("INBOX", None, None, message("written on the server", "server-1")), "APPEND")
    data = check(*client.search(None, "HEADER", "Message-ID", "seed-3"), "SEARCH")
    check(*client.store(data[0].decode(), "+FLAGS", "(\\Flagged)"), "STORE")
    client.logout()

    run_mbsync(config_path, "second")
    if restart:
        alpha.stop()
        alpha.start(peers=restart)
        with open(config_path, "w") as handle:
            handle.write(MBSYNC_CONFIG.format(host=alpha.imap[0], port=alpha.imap[1], user=ACCOUNT, root=root))
    third = run_mbsync(config_path, "third")
    fourth = run_mbsync(config_path, "fourth")

    local = maildir_messages(root)
    server = server_message_ids(alpha)
    local_ids = [mid for _, mid in local]
    expect(len(set(local_ids)) == len(local_ids), f"duplicates locally: {local_ids}")
    expect(len(set(server)) == len(server), f"duplicates on the server: {server}")
    expect(sorted(local_ids) == sorted(server), f"after syncing: local {sorted(local_ids)} server {sorted(server)}")
    wanted = {"<seed-1@example.net>", "<seed-3@example.net>", "<local-1@example.net>", "<server-1@example.net>"}
    expect(wanted <= set(server), f"server lacks some of {wanted}: {server}")
    expect("<seed-2@example.net>" not in server, "the local deletion did not reach the server")
    client = alpha.client()
    check(*client.select("INBOX", readonly=True), "EXAMINE")
    data = check(*client.search(None, "SEEN", "HEADER", "Message-ID", "seed-1"), "SEARCH")
    expect(data != [b""], "the local \\Seen did not reach the server")
    client.logout()
    flagged = [name for name, mid in local if mid == "<seed-3@example.net>"]
    expect(flagged and "F" in flagged[0].split(":2,")[-1], f"the server's \\Flagged did not reach the Maildir: {flagged}")
    return {"messages": len(server), "third_sync_output": third[-200:], "fourth_sync_output": fourth[-200:]}


OFFLINEIMAP_CONFIG = """\
[general]
accounts = mailmesh
metadata = {root}/metadata
ui = basic

[Account mailmesh]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {root}/maildir

[Repository remote]
type = IMAP
remotehost = {host}
remoteport = {port}
remoteuser = {user}
remotepass = secret
ssl = no
starttls = no
folderfilter = lambda folder: folder == 'INBOX'
"""


def run_offlineimap(config_path, round_name):
    result = subprocess.run(["offlineimap", "-c", config_path, "-o"], capture_output=True, text=True, timeout=180)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or "ERROR" in output:
        raise CheckFailed(f"offlineimap ({round_name}) exited {result.returncode}: {output[-2000:]}")
    return output


def check_offlineimap(alpha, directory):
    root = os.path.join(directory, "offlineimap")
    os.makedirs(os.path.join(root, "maildir"), exist_ok=True)
    config_path = os.path.join(root, "offlineimaprc")
    with open(config_path, "w") as handle:
        handle.write(OFFLINEIMAP_CONFIG.format(root=root, host=alpha.imap[0], port=alpha.imap[1], user=ACCOUNT))
    client = alpha.client()
    check(*client.append("INBOX", None, None, message("to be answered", "offlineimap-flag")), "APPEND")
    client.logout()
    run_offlineimap(config_path, "first")
    local = maildir_messages(os.path.join(root, "maildir"))
    server = server_message_ids(alpha)
    expect(sorted(mid for _, mid in local) == sorted(server), f"first run: local {local} server {server}")

    new_dir = os.path.join(root, "maildir", "INBOX", "new")
    with open(os.path.join(new_dir, f"{int(time.time())}_0.{os.getpid()}.mailmesh"), "wb") as handle:
        handle.write(message("written in offlineimap's Maildir", "offlineimap-local"))
    client = alpha.client()
    check(*client.select("INBOX"), "SELECT")
    check(*client.append("INBOX", None, None, message("for offlineimap", "offlineimap-server")), "APPEND")
    data = check(*client.search(None, "HEADER", "Message-ID", "offlineimap-flag"), "SEARCH")
    check(*client.store(data[0].decode().split()[0], "+FLAGS", "(\\Answered)"), "STORE")
    client.logout()

    run_offlineimap(config_path, "second")
    third = run_offlineimap(config_path, "third")
    local = maildir_messages(os.path.join(root, "maildir"))
    server = server_message_ids(alpha)
    local_ids = [mid for _, mid in local]
    expect(len(set(local_ids)) == len(local_ids), f"duplicates locally: {local_ids}")
    expect(len(set(server)) == len(server), f"duplicates on the server: {server}")
    expect(sorted(local_ids) == sorted(server), f"after syncing: local {sorted(local_ids)} server {sorted(server)}")
    expect({"<offlineimap-local@example.net>", "<offlineimap-server@example.net>"} <= set(server),
           f"a new message is missing: {server}")
    answered = [name for name, mid in local if mid == "<offlineimap-flag@example.net>"]
    expect(answered and "R" in answered[0].split(":2,")[-1], f"the server's \\Answered is not in the Maildir: {answered}")
    return {"messages": len(server), "third_run_output": third[-200:]}


def check_list_extended(alpha):
    client = alpha.client()
    check(*client.create("Extended/Child"), "CREATE Extended/Child")
    check(*client.unsubscribe("Extended"), "UNSUBSCRIBE Extended")
    typ, data = client.select("INBOX", readonly=True)
    messages = int(check(typ, data, "EXAMINE")[0])
    client.untagged_responses.clear()
    typ, data = client._simple_command("LIST", "(SUBSCRIBED)", '""', '"*"', "RETURN",
                                       "(CHILDREN STATUS (MESSAGES UNSEEN))")
    check(typ, data, "LIST (SUBSCRIBED) ... RETURN (CHILDREN STATUS (...))")
    lists = [line.decode() for line in client.untagged_responses.pop("LIST", [])]
    statuses = [line.decode() for line in client.untagged_responses.pop("STATUS", [])]
    expect(any(line.endswith('"INBOX"') and "\\Subscribed" in line for line in lists), f"LIST {lists}")
    expect(not any(line.endswith('"Extended"') for line in lists), f"unsubscribed Extended listed: {lists}")
    inbox = [line for line in statuses if line.startswith('"INBOX" ')]
    expect(inbox and f"MESSAGES {messages}" in inbox[0], f"STATUS {statuses} for {messages} messages")
    typ, data = client._simple_command("LIST", "(SUBSCRIBED RECURSIVEMATCH)", '""', '"Extended"')
    check(typ, data, "LIST (SUBSCRIBED RECURSIVEMATCH)")
    recursive = [line.decode() for line in client.untagged_responses.pop("LIST", [])]
    expect(recursive == ['(\\HasChildren) "/" "Extended" ("CHILDINFO" ("SUBSCRIBED"))'], f"LIST {recursive}")
    client.logout()
    return {"list": lists, "status": statuses, "recursive": recursive}


def check_imapclient(alpha, bravo):
    try:
        import imapclient
    except ImportError:
        raise CheckFailed("imapclient is not installed (scripts/imap-clients.sh puts it in a virtualenv)")
    client = imapclient.IMAPClient(alpha.imap[0], port=alpha.imap[1], ssl=False, timeout=WAIT_SECONDS)
    client.login(ACCOUNT, "secret")
    capabilities = set(client.capabilities())
    for wanted in (b"IDLE", b"CONDSTORE", b"QRESYNC", b"LIST-EXTENDED", b"LIST-STATUS", b"BINARY"):
        expect(wanted in capabilities, f"{wanted} not in {sorted(capabilities)}")
    selected = client.select_folder("INBOX")
    modseq = selected[b"HIGHESTMODSEQ"]
    client.idle()
    writer = bravo.client()
    started = time.time()
    check(*writer.append("INBOX", None, None, message("for imapclient", "imapclient-1")), "APPEND on bravo")
    writer.logout()
    deadline = time.time() + WAIT_SECONDS
    seen = False
    while not seen and time.time() < deadline:
        for response in client.idle_check(timeout=1):
            seen |= len(response) > 1 and response[1] == b"EXISTS"
    idle_seconds = time.time() - started
    client.idle_done()
    expect(seen, "IDLE on alpha never told the message appended on bravo")
    changed = client.fetch(client.search(["ALL"]), ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"],
                           modifiers=[f"CHANGEDSINCE {modseq}"])
    new = [uid for uid, data in changed.items()
           if b"imapclient-1" in data.get(b"BODY[HEADER.FIELDS (MESSAGE-ID)]", b"")]
    expect(len(new) == 1, f"CHANGEDSINCE {modseq} gave {changed}")
    expect(all(b"MODSEQ" in data for data in changed.values()), f"MODSEQ missing in {changed}")
    body = client.fetch(new, ["BINARY.PEEK[1]"])[new[0]].get(b"BINARY[1]")
    expect(body == b"Body of imapclient-1\r\n", f"BINARY.PEEK[1] gave {body!r}")
    status = client.folder_status("INBOX", [b"MESSAGES", b"UNSEEN", b"HIGHESTMODSEQ"])
    everything = client.search(["ALL"])
    expect(status[b"MESSAGES"] == len(everything), f"STATUS {status} against {len(everything)} messages")
    expect(status[b"HIGHESTMODSEQ"] > modseq, f"HIGHESTMODSEQ {status} did not pass {modseq}")
    client.logout()
    return {"imapclient": imapclient.__version__, "idle_seconds_from_append_on_bravo": round(idle_seconds, 3),
            "changed_since": len(changed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--keep", action="store_true")
    arguments = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="mailmesh-imap-")
    with open(os.path.join(directory, "accounts"), "w") as handle:
        handle.write(f"{ACCOUNT}:{SECRET_HASH}\n")
    with open(os.path.join(directory, "token"), "w") as handle:
        handle.write(TOKEN + "\n")
    common = ["--accounts-file", os.path.join(directory, "accounts"), "--http-token-file", os.path.join(directory, "token")]
    alpha = Node(arguments.binary, "alpha", directory, common)
    bravo = Node(arguments.binary, "bravo", directory, common)
    failures = []

    def start():
        alpha.start()
        bravo.start(peers=[alpha.listen_address()])

    def checks():
        listed = [
            ("imaplib", lambda: check_imaplib(alpha)),
            ("replication into a selected session", lambda: check_replication(alpha, bravo)),
            ("imaplib CONDSTORE/QRESYNC resync after changes on another node", lambda: check_qresync(alpha, bravo)),
            ("subscriptions replicate to LSUB on another node", lambda: check_subscriptions(alpha, bravo)),
            ("imaplib LIST-EXTENDED and LIST-STATUS", lambda: check_list_extended(alpha)),
            ("imapclient IDLE, CHANGEDSINCE, STATUS and BINARY across nodes", lambda: check_imapclient(alpha, bravo)),
        ]
        if shutil.which("mbsync"):
            listed.append(("mbsync two-way", lambda: check_mbsync(alpha, directory, [bravo.listen_address()])))
        else:
            failures.append("mbsync is not installed")
        if shutil.which("offlineimap"):
            listed.append(("offlineimap two-way", lambda: check_offlineimap(alpha, directory)))
        else:
            failures.append("offlineimap is not installed")
        return listed

    run_checks("imap-clients", [alpha, bravo], start, checks, directory, arguments.keep, failures)

if __name__ == "__main__":
    main()
