#!/usr/bin/env python3
"""A real JMAP client (jmapc, from PyPI) against a real two-node mailmesh cluster (issue 14).

Starts two `mailmesh node` processes on 127.0.0.1 (alpha and bravo, peered), each with HTTPS
(a certificate made here for 127.0.0.1, since jmapc speaks only https), LMTP and IMAP on ports
the OS chooses, and one accounts file. jmapc logs in with HTTP Basic and finds everything else
from the session resource. The checks:

  1. session: the primary mail account is the account that logged in;
  2. mailboxes: Mailbox/get lists the inbox; Mailbox/set creates, renames and destroys a
     mailbox, and the rename shows on bravo under the same id;
  3. listing: messages delivered over LMTP (smtplib.LMTP) come back from Email/query sorted by
     receivedAt, newest first, in two pages, with Email/get subjects in delivery order reversed;
  4. changes: after imaplib sets \\Seen on one message and one more is delivered, Email/changes
     from the earlier state names the first as updated and the second as created;
  5. move: Email/set changes mailboxIds; Email/get and an IMAP SELECT of the target agree;
  6. destroy: Email/set destroy, then Email/get answers notFound;
  7. upload and import: a message uploaded to the upload URL and imported with Email/import
     (sent as a custom method: jmapc has no class for it) reads back with its subject and flags;
  8. push: jmapc's EventSource stream on alpha reports a StateChange for a message delivered to
     bravo, within a deadline;
  9. failover: an Email state that alpha handed out is accepted by bravo's Email/changes, which
     names what changed since.

Prints one line per check and a JSON summary; exit status 0 when every check passes, 1 otherwise.
The nodes are always stopped and the temporary directory removed (unless --keep).
"""

import argparse
import datetime
import imaplib
import importlib.metadata
import ipaddress
import json
import os
import queue
import smtplib
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import jmapc
from client_checks import WAIT_SECONDS, CheckFailed, expect, run_checks, wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jmapc import (
    Comparator,
    EmailQueryFilterCondition,
    Mailbox,
    MailboxQueryFilterCondition,
)
from jmapc.methods import (
    CustomMethod,
    EmailChanges,
    EmailGet,
    EmailQuery,
    EmailSet,
    MailboxGet,
    MailboxQuery,
    MailboxSet,
)

TOKEN = "jmap-clients-check-token-0123456789"
# `doveadm pw -s SHA512-CRYPT -p secret`
SECRET_HASH = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8."
ACCOUNT = "alice@example.org"
PASSWORD = "secret"


def log(text):
    print(f"jmap-clients: {text}", flush=True)


def message(subject, marker, sender="carol@example.net"):
    return (
        f"From: Carol <{sender}>\r\nTo: {ACCOUNT}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{marker}@example.net>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n"
        f"Body of {marker}\r\n"
    ).encode()


def make_certificate(directory):
    """A self-signed certificate for 127.0.0.1 and localhost; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailmesh jmap-clients check")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return cert_path, key_path


class Node:
    """One `mailmesh node` process with its own data directory."""

    def __init__(self, binary, name, directory, common, tls_context):
        self.binary, self.name, self.common, self.tls_context = binary, name, common, tls_context
        self.data_dir = os.path.join(directory, name)
        self.process = None
        os.makedirs(self.data_dir, exist_ok=True)

    def start(self, peers=()):
        for name in ("http.addr", "imap.addr", "lmtp.addr"):
            path = os.path.join(self.data_dir, name)
            if os.path.exists(path):
                os.remove(path)
        arguments = [self.binary, "node", "--name", self.name, "--data-dir", self.data_dir,
                     "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--imap", "127.0.0.1:0",
                     "--lmtp", "127.0.0.1:0", "--cluster", "jmap-check", "--gossip-interval-ms", "300"] + self.common
        for peer in peers:
            arguments += ["--peer", peer]
        with open(os.path.join(self.data_dir, "node.log"), "ab") as log_file:
            self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise CheckFailed(f"{self.name} exited with {self.process.returncode}; see {self.data_dir}/node.log")
            try:
                self.http = self.address_file("http.addr")
                self.imap = self.host_port("imap.addr")
                self.lmtp = self.host_port("lmtp.addr")
                if self.request("/healthz").get("status") == "alive":
                    return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise CheckFailed(f"{self.name} did not start within 60 s; see {self.data_dir}/node.log")

    def address_file(self, name):
        with open(os.path.join(self.data_dir, name)) as handle:
            return handle.read().strip()

    def host_port(self, name):
        host, port = self.address_file(name).rsplit(":", 1)
        return host, int(port)

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
        request = urllib.request.Request(f"https://{self.http}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30, context=self.tls_context) as response:
            return json.loads(response.read())

    def listen_address(self):
        status = self.request("/v1/status")
        return next(address for address in status["listen"] if "127.0.0.1" in address)

    def jmap(self):
        """A fresh jmapc client: it reads the session resource on first use."""
        return jmapc.Client.create_with_password(self.http, ACCOUNT, PASSWORD)

    def deliver(self, subject, marker):
        with smtplib.LMTP(*self.lmtp) as lmtp:
            refused = lmtp.sendmail("carol@example.net", [ACCOUNT], message(subject, marker))
        expect(not refused, f"LMTP refused {refused}")

    def imap_client(self):
        client = imaplib.IMAP4(*self.imap)
        client.login(ACCOUNT, PASSWORD)
        return client


class EmailImport(CustomMethod):
    """Email/import (RFC 8621 §4.8), which jmapc 0.4 has no class for."""

    def __post_init__(self):
        self.jmap_method = "Email/import"
        self.__class__.using = {jmapc.constants.JMAP_URN_MAIL}


def answer(client, method):
    """One method's response; a JMAP error fails the check with its type."""
    response = client.request(method)
    expect(not isinstance(response, jmapc.errors.Error), f"{method.jmap_method_name} answered {response}")
    return response


def inbox_id(client):
    mailboxes = answer(client, MailboxQuery(filter=MailboxQueryFilterCondition(role="inbox")))
    expect(len(mailboxes.ids) == 1, f"one inbox, not {mailboxes.ids}")
    return mailboxes.ids[0]


def newest_first(client, mailbox, position=0, limit=None):
    query = EmailQuery(
        filter=EmailQueryFilterCondition(in_mailbox=mailbox),
        sort=[Comparator(property="receivedAt", is_ascending=False)],
        position=position,
        limit=limit,
        calculate_total=True,
    )
    return answer(client, query)


def email_state(client):
    return answer(client, EmailGet(ids=[])).state


def find_by_marker(client, marker):
    """The id of the one email whose Message-ID is <marker@example.net>, or None."""
    found = answer(client, EmailQuery(filter=EmailQueryFilterCondition(header=["Message-ID", f"<{marker}@example.net>"])))
    return found.ids[0] if len(found.ids) == 1 else None


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_session(alpha):
    client = alpha.jmap()
    expect(client.account_id == ACCOUNT, f"primary mail account {client.account_id!r}")
    session = client.jmap_session
    expect(session.username == ACCOUNT, f"username {session.username!r}")
    expect(session.api_url.startswith(f"https://{alpha.http}/"), f"apiUrl {session.api_url}")
    return {"api_url": session.api_url, "jmapc": importlib.metadata.version("jmapc")}


def check_mailboxes(alpha, bravo, shared):
    client = alpha.jmap()
    listed = answer(client, MailboxGet(ids=None))
    roles = {mailbox.role for mailbox in listed.data}
    expect("inbox" in roles, f"no inbox among {[(m.name, m.role) for m in listed.data]}")
    created = answer(client, MailboxSet(create={"projects": Mailbox(name="Projects")}))
    expect(created.created and "projects" in created.created, f"Mailbox/set create answered {created}")
    projects = created.created["projects"]["id"] if isinstance(created.created["projects"], dict) else created.created["projects"].id
    renamed = answer(client, MailboxSet(update={projects: {"name": "Projects 2026"}}))
    expect(renamed.updated and projects in renamed.updated, f"rename answered {renamed}")
    got = answer(client, MailboxGet(ids=[projects]))
    expect([mailbox.name for mailbox in got.data] == ["Projects 2026"], f"after rename {got.data}")
    remote = bravo.jmap()
    wait_for(
        "the renamed mailbox reaching bravo",
        lambda: [m.name for m in answer(remote, MailboxGet(ids=[projects])).data] == ["Projects 2026"],
    )
    doomed = answer(client, MailboxSet(create={"doomed": Mailbox(name="Doomed")}))
    doomed_id = doomed.created["doomed"]["id"] if isinstance(doomed.created["doomed"], dict) else doomed.created["doomed"].id
    destroyed = answer(client, MailboxSet(destroy=[doomed_id]))
    expect(destroyed.destroyed == [doomed_id], f"destroy answered {destroyed}")
    gone = answer(client, MailboxGet(ids=[doomed_id]))
    expect(gone.not_found == [doomed_id] and not gone.data, f"destroyed mailbox still there: {gone}")
    shared["projects"] = projects
    return {"mailboxes": len(listed.data), "created": projects, "destroyed": doomed_id}


def check_listing(alpha, shared):
    client = alpha.jmap()
    inbox = inbox_id(client)
    shared["inbox"] = inbox
    before = newest_first(client, inbox).total
    subjects = [f"delivered {number}" for number in range(6)]
    for number, subject in enumerate(subjects):
        alpha.deliver(subject, f"lmtp-{number}")
        time.sleep(0.01)  # receivedAt has millisecond precision: keep the order unambiguous
    first = newest_first(client, inbox, position=0, limit=4)
    second = newest_first(client, inbox, position=4, limit=4)
    expect(first.total == before + 6, f"total {first.total}, expected {before + 6}")
    ids = first.ids + second.ids
    got = answer(client, EmailGet(ids=ids[:6], properties=["subject", "receivedAt", "from"]))
    by_id = {email.id: email for email in got.data}
    listed = [by_id[identifier].subject for identifier in ids[:6]]
    expect(listed == list(reversed(subjects)), f"newest first gave {listed}")
    times = [by_id[identifier].received_at for identifier in ids[:6]]
    expect(times == sorted(times, reverse=True), f"receivedAt not descending: {times}")
    sender = by_id[ids[0]].mail_from
    expect(sender and sender[0].email == "carol@example.net" and sender[0].name == "Carol", f"from {sender}")
    expect(len(set(ids)) == len(ids), f"the pages overlap: {first.ids} {second.ids}")
    shared["delivered"] = {subject: by_id[identifier].id for subject, identifier in zip(listed, ids[:6])}
    return {"total": first.total, "page_sizes": [len(first.ids), len(second.ids)]}


def check_changes(alpha, shared):
    client = alpha.jmap()
    state = email_state(client)
    imap = alpha.imap_client()
    typ, _ = imap.select("INBOX")
    expect(typ == "OK", "IMAP SELECT INBOX")
    typ, data = imap.search(None, "HEADER", "Message-ID", "<lmtp-0@example.net>")
    expect(typ == "OK" and data[0], f"IMAP SEARCH found {data!r}")
    typ, data = imap.store(data[0].split()[0], "+FLAGS", "(\\Seen)")
    expect(typ == "OK", f"IMAP STORE answered {data!r}")
    imap.logout()
    alpha.deliver("after the state", "lmtp-after")
    changes = answer(client, EmailChanges(since_state=state))
    seen = shared["delivered"]["delivered 0"]
    new = find_by_marker(client, "lmtp-after")
    expect(seen in changes.updated, f"the \\Seen message {seen} is not in updated {changes.updated}")
    expect(new in changes.created, f"the new message {new} is not in created {changes.created}")
    keywords = answer(client, EmailGet(ids=[seen], properties=["keywords"])).data[0].keywords
    expect(keywords.get("$seen") is True, f"keywords after IMAP STORE: {keywords}")
    return {"created": len(changes.created), "updated": len(changes.updated), "new_state": changes.new_state}


def check_move(alpha, shared):
    client = alpha.jmap()
    moving = shared["delivered"]["delivered 1"]
    projects = shared["projects"]
    moved = answer(client, EmailSet(update={moving: {"mailboxIds": {projects: True}}}))
    expect(moved.updated and moving in moved.updated, f"move answered {moved}")
    got = answer(client, EmailGet(ids=[moving], properties=["mailboxIds"])).data[0]
    expect(got.mailbox_ids == {projects: True}, f"mailboxIds after the move: {got.mailbox_ids}")
    imap = alpha.imap_client()
    typ, data = imap.select('"Projects 2026"')
    expect(typ == "OK", f"IMAP SELECT of the target: {data!r}")
    typ, data = imap.search(None, "HEADER", "Message-ID", "<lmtp-1@example.net>")
    expect(typ == "OK" and len(data[0].split()) == 1, f"the moved message in IMAP: {data!r}")
    imap.logout()
    return {"moved": moving}


def check_destroy(alpha, shared):
    client = alpha.jmap()
    doomed = shared["delivered"]["delivered 2"]
    destroyed = answer(client, EmailSet(destroy=[doomed]))
    expect(destroyed.destroyed == [doomed], f"destroy answered {destroyed}")
    got = answer(client, EmailGet(ids=[doomed]))
    expect(got.not_found == [doomed] and not got.data, f"destroyed email still there: {got}")
    return {"destroyed": doomed}


def check_import(alpha, directory, shared):
    client = alpha.jmap()
    path = os.path.join(directory, "imported.eml")
    with open(path, "wb") as handle:
        handle.write(message("uploaded then imported", "imported-1"))
    blob = client.upload_blob(path)
    expect(blob.size == os.path.getsize(path), f"upload answered {blob}")
    imported = answer(client, EmailImport(data={
        "accountId": client.account_id,
        "emails": {"one": {"blobId": blob.id, "mailboxIds": {shared["inbox"]: True},
                           "keywords": {"$flagged": True}, "receivedAt": "2026-11-30T08:00:00Z"}},
    }))
    created = (imported.data or {}).get("created") or {}
    expect("one" in created, f"Email/import answered {imported.data}")
    identifier = created["one"]["id"]
    got = answer(client, EmailGet(ids=[identifier], properties=["subject", "keywords", "receivedAt", "blobId"])).data[0]
    expect(got.subject == "uploaded then imported", f"imported subject {got.subject!r}")
    expect(got.keywords == {"$flagged": True}, f"imported keywords {got.keywords}")
    expect(got.received_at.isoformat().startswith("2026-11-30T08:00:00"), f"imported receivedAt {got.received_at}")
    return {"blob": blob.id, "email": identifier}


def check_push(alpha, bravo):
    client = jmapc.Client.create_with_password(
        alpha.http, ACCOUNT, PASSWORD, event_source_config=jmapc.EventSourceConfig(types="Email", closeafter="no", ping=5)
    )
    state = email_state(client)
    events = queue.Queue()

    def listen():
        try:
            for event in client.events:
                events.put(event)
        except Exception as error:  # the stream ends when the node stops
            events.put(error)

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(0.5)  # the stream is open before the delivery it must report
    started = time.time()
    bravo.deliver("pushed from bravo", "pushed-1")
    deadline = started + WAIT_SECONDS
    while True:
        remaining = deadline - time.time()
        expect(remaining > 0, f"no StateChange within {WAIT_SECONDS} s of a delivery to bravo")
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            continue
        expect(not isinstance(event, Exception), f"the event stream failed: {event}")
        changed = event.data.changed.get(ACCOUNT)
        if changed and changed.email and changed.email != state:
            break
    seconds = time.time() - started
    changes = answer(client, EmailChanges(since_state=state))
    new = find_by_marker(client, "pushed-1")
    expect(new in changes.created, f"after the push, Email/changes created {changes.created} lacks {new}")
    return {"seconds_from_delivery_on_bravo": round(seconds, 3)}


def check_failover(alpha, bravo):
    local, remote = alpha.jmap(), bravo.jmap()
    state = email_state(local)
    alpha.deliver("written on alpha after the state", "failover-1")
    new = find_by_marker(local, "failover-1")
    wait_for("the message reaching bravo", lambda: find_by_marker(remote, "failover-1") == new)
    changes = answer(remote, EmailChanges(since_state=state))
    expect(new in changes.created, f"bravo's Email/changes from alpha's state: created {changes.created}")
    return {"state_from_alpha": state, "created_on_bravo": len(changes.created)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--keep", action="store_true")
    arguments = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="mailmesh-jmap-")
    cert, key = make_certificate(directory)
    os.environ["REQUESTS_CA_BUNDLE"] = cert  # jmapc and its event stream go through requests
    tls_context = ssl.create_default_context(cafile=cert)
    with open(os.path.join(directory, "accounts"), "w") as handle:
        handle.write(f"{ACCOUNT}:{SECRET_HASH}\n")
    with open(os.path.join(directory, "token"), "w") as handle:
        handle.write(TOKEN + "\n")
    common = ["--accounts-file", os.path.join(directory, "accounts"), "--http-token-file", os.path.join(directory, "token"),
              "--tls-cert-file", cert, "--tls-key-file", key]
    alpha = Node(arguments.binary, "alpha", directory, common, tls_context)
    bravo = Node(arguments.binary, "bravo", directory, common, tls_context)
    shared = {}

    def start():
        alpha.start()
        bravo.start(peers=[alpha.listen_address()])

    def checks():
        return [
            ("session", lambda: check_session(alpha)),
            ("Mailbox/get and Mailbox/set create, rename, destroy", lambda: check_mailboxes(alpha, bravo, shared)),
            ("LMTP deliveries listed by Email/query newest first, in pages", lambda: check_listing(alpha, shared)),
            ("Email/changes after IMAP \\Seen and a delivery", lambda: check_changes(alpha, shared)),
            ("move by mailboxIds, seen by IMAP", lambda: check_move(alpha, shared)),
            ("Email/set destroy, then notFound", lambda: check_destroy(alpha, shared)),
            ("upload and Email/import", lambda: check_import(alpha, directory, shared)),
            ("EventSource StateChange for a delivery to the other node", lambda: check_push(alpha, bravo)),
            ("an Email state from alpha answered by bravo", lambda: check_failover(alpha, bravo)),
        ]

    run_checks("jmap-clients", [alpha, bravo], start, checks, directory, arguments.keep)

if __name__ == "__main__":
    main()
