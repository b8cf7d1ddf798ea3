#!/usr/bin/env python3
"""Checks the status page of a live three-node cluster in headless Chromium.

Starts three `mailmesh node` processes on 127.0.0.1 (ports chosen by the OS, read back from
each data_dir/http.addr, as src/harness.rs does), lets bravo and charlie write while they are
still isolated, opens alpha's page at `/`, then joins bravo and charlie to alpha so the page
watches a real catch-up (reconciliation and pulls) and a stream of writes. Once every digest
agrees it reads the page's DOM and checks that it shows three nodes agreeing, saves a
screenshot, then freezes charlie (SIGSTOP) and writes on alpha to check that the page turns
charlie red. Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe),
so the page runs in real time and polls for as long as the cluster runs.

Exit status 0 when every check passes, 1 otherwise. The nodes and the browser are always stopped.
"""

import argparse
import base64
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

GOSSIP_MS = 500


def log(message):
    print(f"page-check: {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class LocalNode:
    """One `mailmesh node` process with its own data directory."""

    def __init__(self, binary, name, data_dir, cluster):
        self.binary, self.name, self.data_dir, self.cluster = binary, name, data_dir, cluster
        self.process = None
        self.http = None
        os.makedirs(data_dir, exist_ok=True)

    def start(self, peers=()):
        address_file = os.path.join(self.data_dir, "http.addr")
        if os.path.exists(address_file):
            os.remove(address_file)
        arguments = [self.binary, "node", "--name", self.name, "--data-dir", self.data_dir,
                     "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0",
                     "--cluster", self.cluster, "--gossip-interval-ms", str(GOSSIP_MS)]
        for peer in peers:
            arguments += ["--peer", peer]
        log_file = open(os.path.join(self.data_dir, "node.log"), "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env)
        log_file.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.data_dir}/node.log")
            try:
                with open(address_file) as handle:
                    self.http = handle.read().strip()
                if self.http and self.get("/healthz").get("status") == "alive":
                    return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start within 60 s; see {self.data_dir}/node.log")

    def url(self, path="/"):
        return f"http://{self.http}{path}"

    def request(self, method, path, body=None, content_type="message/rfc822"):
        request = urllib.request.Request(self.url(path), data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path):
        return self.request("GET", path)

    def text(self, path):
        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return response.read().decode()

    def append(self, account, mailbox, raw):
        path = f"/v1/mailboxes/{quote(account)}/{quote(mailbox)}/messages"
        return self.request("POST", path, raw)["id"]

    def flag(self, account, mailbox, message_id, add=(), remove=()):
        path = f"/v1/mailboxes/{quote(account)}/{quote(mailbox)}/messages/{message_id}/flags"
        body = json.dumps({"add": list(add), "remove": list(remove)}).encode()
        return self.request("POST", path, body, "application/json")

    def expunge(self, account, mailbox, message_id):
        return self.request("DELETE", f"/v1/mailboxes/{quote(account)}/{quote(mailbox)}/messages/{message_id}")

    def status(self):
        return self.get("/v1/status")

    def listen_address(self):
        return next(address for address in self.status()["listen"] if "127.0.0.1" in address)

    def terminate(self):
        if self.process and self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGCONT)
                self.process.terminate()
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self):
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)


def quote(segment):
    return urllib.request.quote(segment, safe="")


def message(sender, subject, body):
    return (f"From: {sender}\r\nTo: ops@example.org\r\nSubject: {subject}\r\n"
            f"Date: Sun, 29 Nov 2026 08:00:00 +0000\r\nMessage-ID: <{random.getrandbits(64):x}@example.org>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()


def wait_until(seconds, check):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return True
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol on a pipe
# --------------------------------------------------------------------------------------------


def high_fd(fd):
    """Duplicates `fd` onto a number of at least 10 and closes the original."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven through --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, chromium, profile_dir, width, height):
        self.width, self.height = width, height
        os.makedirs(profile_dir, exist_ok=True)
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()
        # Move the child's ends above 9 so the shell's redirections onto 3 and 4 cannot clobber them.
        to_browser_read, from_browser_write = high_fd(to_browser_read), high_fd(from_browser_write)
        arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                     f"--user-data-dir={profile_dir}", "--no-first-run", "--no-default-browser-check",
                     "--hide-scrollbars", f"--window-size={width},{height}", "about:blank"]
        # bash (dash refuses fds above 9) moves the pipe ends onto fds 3 and 4 and execs Chromium.
        script = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write} {to_browser_read}<&- {from_browser_write}>&-'
        self.stderr = open(os.path.join(profile_dir, "chromium.log"), "wb")
        self.process = subprocess.Popen(["bash", "-c", script, chromium, *arguments],
                                        pass_fds=(to_browser_read, from_browser_write),
                                        stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.next_id = 0
        self.answers = {}
        self.events = []
        self.lock = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.session = None

    def _read(self):
        buffer = b""
        while True:
            try:
                chunk = os.read(self.from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self.lock:
                    self.answers[None] = "closed"
                    self.lock.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                frame, buffer = buffer.split(b"\0", 1)
                message = json.loads(frame)
                with self.lock:
                    if "id" in message:
                        self.answers[message["id"]] = message
                    else:
                        self.events.append(message)
                    self.lock.notify_all()

    def send(self, method, params=None, session=True, timeout=30):
        with self.lock:
            self.next_id += 1
            command_id = self.next_id
        command = {"id": command_id, "method": method, "params": params or {}}
        if session and self.session:
            command["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.time() + timeout
        with self.lock:
            while command_id not in self.answers:
                if None in self.answers:
                    raise RuntimeError(f"Chromium closed the pipe during {method}")
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise RuntimeError(f"Chromium did not answer {method} within {timeout} s")
                self.lock.wait(remaining)
            answer = self.answers.pop(command_id)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def dom(self):
        # Empty while a navigation has not made a document yet.
        return self.evaluate("document.documentElement ? document.documentElement.outerHTML : ''")

    def screenshot(self, path):
        metrics = self.send("Page.getLayoutMetrics")
        height = max(self.height, int(metrics.get("cssContentSize", metrics.get("contentSize"))["height"]))
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}})
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(shot["data"]))

    def page_errors(self):
        with self.lock:
            events = list(self.events)
        errors = []
        for event in events:
            if event.get("method") == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text"))
            elif event.get("method") == "Runtime.consoleAPICalled" and event["params"].get("type") == "error":
                errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in event["params"]["args"]))
        return errors

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self.to_browser, self.from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.stderr.close()


# --------------------------------------------------------------------------------------------
# Reading the DOM
# --------------------------------------------------------------------------------------------


class PageDom(HTMLParser):
    """Collects the attributes and text of elements with an id, and the rows of the peer table."""

    def __init__(self, html):
        super().__init__()
        self.by_id = {}
        self.peer_rows = []
        self.stack = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        entry = {"tag": tag, "attrs": attributes, "text": []}
        if tag not in ("br", "img", "input", "meta", "link", "hr", "line", "path"):
            self.stack.append(entry)
        if "id" in attributes:
            self.by_id[attributes["id"]] = entry
        if tag == "tr" and "peer" in attributes.get("class", "").split():
            self.peer_rows.append(attributes)

    def handle_endtag(self, tag):
        while self.stack:
            entry = self.stack.pop()
            if entry["tag"] == tag:
                break

    def handle_data(self, data):
        for entry in self.stack:
            entry["text"].append(data)

    def text(self, element_id):
        entry = self.by_id.get(element_id)
        return "".join(entry["text"]).strip() if entry else None

    def attr(self, element_id, name):
        entry = self.by_id.get(element_id)
        return entry["attrs"].get(name) if entry else None


# --------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------


def writer(nodes, stop, counts):
    """Appends, flags and expunges at a few operations per second on random nodes."""
    mailboxes = [("ops@example.org", "INBOX"), ("ops@example.org", "Archive/2026"), ("sales@example.org", "INBOX")]
    written = []
    sequence = 0
    while not stop.is_set():
        node = random.choice(nodes)
        account, mailbox = random.choice(mailboxes)
        try:
            roll = random.random()
            if roll < 0.65 or not written:
                size = 100_000 if sequence % 15 == 14 else 0   # now and then one above the inline-gossip limit
                raw = message(f"{node.name}@example.org", f"live message {sequence}", "hello " * 20 + "x" * size)
                written.append((account, mailbox, node.append(account, mailbox, raw)))
                counts["append"] += 1
            elif roll < 0.92:
                account, mailbox, message_id = random.choice(written)
                node.flag(account, mailbox, message_id, add=[random.choice(["\\Seen", "\\Flagged", "$Important"])])
                counts["flags"] += 1
            else:
                account, mailbox, message_id = written.pop(random.randrange(len(written)))
                node.expunge(account, mailbox, message_id)
                counts["expunge"] += 1
        except urllib.error.HTTPError as error:
            if error.code != 404:   # a message expunged elsewhere that has not arrived here yet
                counts["errors"] += 1
        except (OSError, urllib.error.URLError):
            counts["errors"] += 1
        sequence += 1
        stop.wait(0.2)


def wait_for_page(browser, seconds, check):
    """Reads the page's DOM every 250 ms until `check(PageDom)` holds or `seconds` pass. Returns
    (html, held): the last DOM read, and whether the condition held in it."""
    deadline = time.time() + seconds
    while True:
        html = browser.dom()
        if check(PageDom(html)):
            return html, True
        if time.time() >= deadline:
            return html, False
        time.sleep(0.25)


def samples_shown(dom):
    return int(dom.attr("chart-sync", "data-samples") or 0)


def peer_rows(dom):
    """{peer name: its data-agrees} as the page's peer table shows them."""
    return {row.get("data-name"): row.get("data-agrees") for row in dom.peer_rows}


def all_agree(nodes):
    digests = {node.status()["digest"] for node in nodes}
    peers_ok = all(
        len(status["peers"]) == len(nodes) - 1 and all(peer["agrees"] for peer in status["peers"])
        for status in (node.status() for node in nodes))
    return len(digests) == 1 and peers_ok


def run(args, root, failures):
    cluster = f"pagecheck{os.getpid()}"
    alpha, bravo, charlie = (LocalNode(args.binary, name, os.path.join(root, name), cluster)
                             for name in ("alpha", "bravo", "charlie"))
    nodes = [alpha, bravo, charlie]
    browser = None
    try:
        log(f"starting alpha, bravo and charlie (data and logs in {root})")
        for node in nodes:
            node.start()
        # Writes while bravo and charlie are isolated: they will have to be reconciled and pulled.
        for index in range(30):
            alpha.append("ops@example.org", "INBOX", message("alpha@example.org", f"before join {index}", "early"))
        for node, mailbox in ((bravo, "Archive/2026"), (charlie, "INBOX")):
            for index in range(60):
                raw = message(f"{node.name}@example.org", f"isolated {index}", "written while isolated " * 10)
                node.append("sales@example.org" if node is charlie else "ops@example.org", mailbox, raw)
        bravo.terminate()
        charlie.terminate()

        browser = Browser(args.chromium, os.path.join(root, "chromium-profile"), args.width, args.height)
        log(f"opening {alpha.url('/')} in headless Chromium")
        browser.open(alpha.url("/"))
        # Not a fixed pause: wait until the page has drawn three samples of alpha alone (past its
        # "collecting samples" state), so its charts have a baseline before the catch-up starts.
        if not wait_for_page(browser, 30, lambda dom: samples_shown(dom) >= 3)[1]:
            failures.append("the page drew fewer than 3 samples within 30 s of opening")

        seed = alpha.listen_address()
        stop = threading.Event()
        counts = {"append": 0, "flags": 0, "expunge": 0, "errors": 0}
        log("joining bravo to alpha")
        bravo.start([seed])
        # Until the page lists bravo, so the page has seen the first join before the second.
        if not wait_for_page(browser, 60, lambda dom: "bravo" in peer_rows(dom))[1]:
            failures.append("the page did not list bravo within 60 s of its join")
        log("joining charlie to alpha; writing on all three")
        charlie.start([seed])
        thread = threading.Thread(target=writer, args=(nodes, stop, counts), daemon=True)
        thread.start()
        # The length of the write load, not a wait for anything: the page must watch writes
        # stream in for this long.
        time.sleep(args.write_seconds)
        stop.set()
        thread.join()
        log(f"wrote {counts['append']} appends, {counts['flags']} flag changes, {counts['expunge']} expunges "
            f"({counts['errors']} failed requests)")
        if counts["errors"]:
            failures.append(f"{counts['errors']} write requests failed")

        if not wait_until(60, lambda: all_agree(nodes)):
            failures.append("the three nodes did not agree within 60 s")
            for node in nodes:
                log(f"  {node.name}: {node.status()}")
        # Until the page shows the settled state: alpha's current digest, three of three agreeing
        # (check_agreeing below then checks every element and says what it found).
        settled_digest = alpha.status()["digest"]
        html, _ = wait_for_page(browser, 30, lambda dom: dom.text("self-digest") == settled_digest
                                and dom.attr("agreement", "data-agreeing") == "3"
                                and set(peer_rows(dom).values()) == {"true"})
        with open(os.path.join(root, "page.html"), "w") as handle:
            handle.write(html)
        browser.screenshot(args.screenshot)
        log(f"screenshot: {args.screenshot}")
        check_agreeing(PageDom(html), alpha, failures)
        with open(os.path.join(root, "metrics.txt"), "w") as handle:
            handle.write(alpha.text("/metrics"))

        # Freeze charlie and change alpha's digest: the page must show charlie disagreeing.
        log("freezing charlie (SIGSTOP) and writing on alpha")
        charlie.pause()
        alpha.append("ops@example.org", "INBOX", message("alpha@example.org", "while charlie is frozen", "diverge"))
        if not wait_until(30, lambda: bravo.status()["digest"] == alpha.status()["digest"]):
            failures.append("bravo did not take alpha's write within 30 s while charlie was frozen")
        # Until the page shows charlie disagreeing (check_diverged below checks the rest).
        html, _ = wait_for_page(browser, 30, lambda dom: peer_rows(dom).get("charlie") == "false"
                                and peer_rows(dom).get("bravo") == "true")
        diverged_path = os.path.splitext(args.screenshot)[0] + "-diverged.png"
        browser.screenshot(diverged_path)
        log(f"screenshot with charlie frozen: {diverged_path}")
        check_diverged(PageDom(html), failures)
        charlie.resume()

        errors = browser.page_errors()
        if errors:
            failures.append(f"the page logged errors: {errors}")
    finally:
        if browser:
            browser.close()
        for node in nodes:
            node.terminate()


def check(failures, condition, description):
    if condition:
        log(f"ok    {description}")
    else:
        log(f"FAIL  {description}")
        failures.append(description)


def check_agreeing(dom, alpha, failures):
    status = alpha.status()
    check(failures, dom.text("self-name") == "alpha", f"this node's name is shown (got {dom.text('self-name')!r})")
    check(failures, dom.text("self-peer") == status["peer_id"], "this node's peer ID is shown")
    check(failures, dom.text("self-digest") == status["digest"], "this node's digest is shown and current")
    agreement = (dom.attr("agreement", "data-agreeing"), dom.attr("agreement", "data-nodes"))
    check(failures, agreement == ("3", "3") and "ok" in (dom.attr("agreement", "class") or "").split(),
          f"the summary says 3 of 3 nodes agree (got {dom.text('agreement')!r})")
    names = sorted(row.get("data-name") for row in dom.peer_rows)
    check(failures, names == ["bravo", "charlie"], f"the peer table lists bravo and charlie (got {names})")
    check(failures, len(dom.peer_rows) == 2 and all(row.get("data-agrees") == "true" for row in dom.peer_rows),
          "both peers are marked as agreeing")
    samples = int(dom.attr("chart-sync", "data-samples") or 0)
    check(failures, samples >= 10, f"the page refreshed live: {samples} samples in its history")
    check(failures, (dom.text("live-text") or "").startswith("live"), "the live indicator reports fresh data")
    pulled_text = dom.text("legend-pulled") or ""
    pulled = alpha.get("/v1/page-data")["counters"]["records_pulled"]
    check(failures, pulled > 0 and f"{pulled} records" in pulled_text,
          f"the catch-up shows on the page: alpha pulled {pulled} records ({pulled_text!r})")


def check_diverged(dom, failures):
    rows = peer_rows(dom)
    check(failures, rows.get("charlie") == "false", f"frozen charlie is shown disagreeing (rows {rows})")
    check(failures, rows.get("bravo") == "true", "bravo still agrees")
    check(failures, dom.attr("agreement", "data-agreeing") == "2" and "bad" in (dom.attr("agreement", "class") or "").split(),
          f"the summary turns red with 2 of 3 agreeing (got {dom.text('agreement')!r})")
    check(failures, "charlie" in (dom.text("divergence") or ""), "the divergence card names charlie")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "/var/tmp/mailmesh-target"),
                                                         "release", "mailmesh"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--screenshot", help="where to save the PNG (default: in the run's temporary directory)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--write-seconds", type=float, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the data directories and logs")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="mailmesh-page-check-")
    args.screenshot = os.path.abspath(args.screenshot or os.path.join(root, "page.png"))
    os.makedirs(os.path.dirname(args.screenshot), exist_ok=True)
    failures = []
    try:
        run(args, root, failures)
    except Exception as error:   # report, clean up, fail
        failures.append(f"{type(error).__name__}: {error}")
    if failures:
        log(f"FAILED ({len(failures)}): " + "; ".join(failures))
        log(f"data, logs, page.html and metrics.txt kept in {root}")
        return 1
    if not args.keep and not args.screenshot.startswith(root):
        shutil.rmtree(root, ignore_errors=True)
    else:
        log(f"data, logs, page.html and metrics.txt kept in {root}")
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
