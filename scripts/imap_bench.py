#!/usr/bin/env python3
"""IMAP figures on real nodes (issue 15, item 5), printed as JSON.

1. Two peered nodes (alpha, bravo; gossip every --gossip-ms): an IDLE session on alpha, an APPEND
   on bravo; the time from the APPEND's answer to alpha's unsolicited EXISTS. Bravo is then stopped.
2. An mbox of --messages small messages imported into alpha's INBOX with `mailmesh import`, then
   on alpha: the first SELECT (which numbers every message), a second SELECT, `UID FETCH 1:*
   (FLAGS)` (time and bytes from the server) and `UID SORT (REVERSE ARRIVAL) UTF-8 ALL` (the best
   and the median of --sort-runs);
3. QRESYNC (RFC 7162): a client takes UIDVALIDITY and HIGHESTMODSEQ, another session makes 10
   changes (4 flag changes, 3 expunges, 3 appends), and the client's
   `SELECT INBOX (QRESYNC (uidvalidity modseq 1:last))`: bytes from the server and time.

Timings are wall-clock on whatever machine runs this; the client is a raw socket reader.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from imap_clients import ACCOUNT, SECRET_HASH, TOKEN, Node, message  # noqa: E402


class Raw:
    """A raw IMAP connection that counts the bytes the server sends."""

    def __init__(self, address):
        self.socket = socket.create_connection(address)
        self.buffer = b""
        self.offset = 0
        self.tag = 0
        self.line()

    def fill(self):
        data = self.socket.recv(1 << 20)
        if not data:
            raise RuntimeError("the server closed the connection")
        self.buffer = self.buffer[self.offset:] + data
        self.offset = 0

    def line(self):
        # An offset into the buffer, so that reading many lines does not copy the rest each time.
        while True:
            end = self.buffer.find(b"\r\n", self.offset)
            if end >= 0:
                line = self.buffer[self.offset:end]
                self.offset = end + 2
                return line
            self.fill()

    def command(self, text):
        """Runs a command; returns (seconds, bytes received, untagged lines, tagged line)."""
        self.tag += 1
        tag = f"b{self.tag}".encode()
        started = time.perf_counter()
        self.socket.sendall(tag + b" " + text.encode() + b"\r\n")
        received = 0
        lines = []
        while True:
            line = self.line()
            received += len(line) + 2
            if line.startswith(tag + b" "):
                if not line.split(b" ")[1] == b"OK":
                    raise RuntimeError(f"{text}: {line!r}")
                return time.perf_counter() - started, received, lines, line
            lines.append(line)


def write_mbox(path, count):
    with open(path, "wb") as handle:
        for number in range(count):
            handle.write(b"From carol@example.net Tue Dec  1 12:00:00 2026\n")
            handle.write(message(f"bench {number}", f"bench-{number}").replace(b"\r\n", b"\n"))
            handle.write(b"\n")


def idle_latency(alpha, bravo):
    watcher = Raw(alpha.imap)
    watcher.command(f"LOGIN {ACCOUNT} secret")
    watcher.command("SELECT INBOX")
    watcher.socket.sendall(b"idle IDLE\r\n")
    assert watcher.line().startswith(b"+")
    writer = Raw(bravo.imap)
    writer.command(f"LOGIN {ACCOUNT} secret")
    raw = message("idle probe", "idle-probe")
    writer.socket.sendall(f"w APPEND INBOX {{{len(raw)}+}}\r\n".encode() + raw + b"\r\n")
    while not writer.line().startswith(b"w "):
        pass
    answered = time.perf_counter()
    while True:
        line = watcher.line()
        if line.endswith(b"EXISTS"):
            break
    latency = time.perf_counter() - answered
    watcher.socket.sendall(b"DONE\r\n")
    return latency


def response_code(lines, name):
    prefix = b"* OK [" + name + b" "
    line = next(line for line in lines if line.startswith(prefix))
    return int(line[len(prefix):].split(b"]")[0])


def qresync_after_changes(alpha, exists):
    """SELECT with QRESYNC after 10 changes made by another session: bytes and seconds."""
    cached = Raw(alpha.imap)
    cached.command(f"LOGIN {ACCOUNT} secret")
    cached.command("ENABLE QRESYNC")
    _, _, lines, _ = cached.command("SELECT INBOX")
    validity = response_code(lines, b"UIDVALIDITY")
    highest = response_code(lines, b"HIGHESTMODSEQ")
    last_uid = response_code(lines, b"UIDNEXT") - 1
    cached.socket.close()

    writer = Raw(alpha.imap)
    writer.command(f"LOGIN {ACCOUNT} secret")
    writer.command("SELECT INBOX")
    step = max(exists // 8, 1)
    for uid in (step, 2 * step, 3 * step, 4 * step):
        writer.command(f"UID STORE {uid} +FLAGS.SILENT (\\Flagged)")
    for uid in (5 * step, 6 * step, 7 * step):
        writer.command(f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
        writer.command(f"UID EXPUNGE {uid}")
    for number in range(3):
        raw = message(f"while away {number}", f"away-{number}")
        writer.socket.sendall(f"a{number} APPEND INBOX {{{len(raw)}+}}\r\n".encode() + raw + b"\r\n")
        while not writer.line().startswith(f"a{number} ".encode()):
            pass
    writer.socket.close()

    client = Raw(alpha.imap)
    client.command(f"LOGIN {ACCOUNT} secret")
    client.command("ENABLE QRESYNC")
    seconds, received, lines, _ = client.command(f"SELECT INBOX (QRESYNC ({validity} {highest} 1:{last_uid}))")
    vanished = [line for line in lines if line.startswith(b"* VANISHED")]
    fetches = [line for line in lines if b" FETCH " in line]
    seconds_without, received_without, _, _ = client.command(f"SELECT INBOX (QRESYNC ({validity} {highest}))")
    client.socket.close()
    return {
        "select_qresync_after_10_changes_bytes": received,
        "select_qresync_after_10_changes_seconds": round(seconds, 3),
        "select_qresync_vanished": [line.decode() for line in vanished],
        "select_qresync_fetches": len(fetches),
        "select_qresync_without_known_uids_bytes": received_without,
        "select_qresync_without_known_uids_seconds": round(seconds_without, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--gossip-ms", type=int, default=300)
    parser.add_argument("--sort-runs", type=int, default=5)
    arguments = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="mailmesh-imap-bench-")
    with open(os.path.join(directory, "accounts"), "w") as handle:
        handle.write(f"{ACCOUNT}:{SECRET_HASH}\n")
    token_file = os.path.join(directory, "token")
    with open(token_file, "w") as handle:
        handle.write(TOKEN + "\n")
    common = ["--accounts-file", os.path.join(directory, "accounts"), "--http-token-file", token_file]
    alpha = Node(arguments.binary, "alpha", directory, common)
    bravo = Node(arguments.binary, "bravo", directory, common)
    figures = {"messages": arguments.messages, "gossip_interval_ms": arguments.gossip_ms}
    try:
        alpha.start()
        bravo.start(peers=[alpha.listen_address()])
        time.sleep(2)  # let the two nodes find each other
        figures["idle_exists_after_append_on_other_node_ms"] = round(idle_latency(alpha, bravo) * 1000, 1)
        bravo.stop()

        mbox = os.path.join(directory, "bench.mbox")
        write_mbox(mbox, arguments.messages)
        started = time.perf_counter()
        subprocess.run([arguments.binary, "import", "--http", alpha.http, "--account", ACCOUNT,
                        "--token-file", token_file, "--quiet", mbox], check=True, stdout=subprocess.DEVNULL)
        figures["import_seconds"] = round(time.perf_counter() - started, 1)

        client = Raw(alpha.imap)
        client.command(f"LOGIN {ACCOUNT} secret")
        seconds, received, lines, _ = client.command("SELECT INBOX")
        figures["first_select_seconds"] = round(seconds, 3)
        exists = next(int(line.split()[1]) for line in lines if line.endswith(b"EXISTS"))
        figures["exists"] = exists
        seconds, received, _, _ = client.command("SELECT INBOX")
        figures["select_seconds"] = round(seconds, 3)
        figures["select_bytes"] = received
        seconds, received, lines, _ = client.command("UID FETCH 1:* (FLAGS)")
        figures["uid_fetch_all_flags_seconds"] = round(seconds, 3)
        figures["uid_fetch_all_flags_bytes"] = received
        figures["uid_fetch_all_flags_lines"] = len(lines)
        timings = []
        for _ in range(arguments.sort_runs):
            seconds, received, lines, _ = client.command("UID SORT (REVERSE ARRIVAL) UTF-8 ALL")
            timings.append(seconds)
        timings.sort()
        figures["uid_sort_reverse_arrival_seconds"] = round(timings[0], 3)
        figures["uid_sort_reverse_arrival_median_seconds"] = round(timings[len(timings) // 2], 3)
        figures["uid_sort_bytes"] = received
        figures["uid_sort_count"] = len(lines[0].split()) - 2 if lines else 0
        figures.update(qresync_after_changes(alpha, exists))
    finally:
        alpha.stop()
        bravo.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
