#!/usr/bin/env python3
"""Crash safety: append continuously, SIGKILL the node at random moments, restart it, and check
that every acknowledged append (HTTP 201) is still there with its exact bytes.

Usage: scripts/crash-test.sh [--kills 100] [--writers 4] [--seed 1]
Prints one JSON object as its last line. Exits 1 if any acknowledged append was lost.
"""
import argparse, http.client, json, os, random, shutil, signal, subprocess, sys, tempfile, threading, time

def request(address, method, path, body=None, timeout=10):
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()

def start(binary, data_dir, log):
    try:
        os.remove(os.path.join(data_dir, "http.addr"))
    except FileNotFoundError:
        pass
    process = subprocess.Popen(
        [binary, "node", "--name", "crash", "--data-dir", data_dir, "--listen", "/ip4/127.0.0.1/tcp/0",
         "--http", "127.0.0.1:0", "--cluster", "crash-test"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with open(os.path.join(data_dir, "http.addr")) as file:
                address = file.read().strip()
            if request(address, "GET", "/healthz")[0] == 200:
                return process, address
        except (OSError, ValueError):
            pass
        if process.poll() is not None:
            raise SystemExit(f"the node exited with {process.returncode} during start")
        time.sleep(0.05)
    raise SystemExit("the node did not start within 60 s")

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=os.environ.get("MAILMESH_BINARY", "/var/tmp/mailmesh-target/release/mailmesh"))
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    arguments = parser.parse_args()
    chooser = random.Random(arguments.seed)
    root = tempfile.mkdtemp(prefix="mailmesh-crash-")
    data_dir = os.path.join(root, "node")
    log = open(os.path.join(root, "node.log"), "ab")
    acknowledged = {}  # id -> bytes
    lock = threading.Lock()
    counter = [0]
    failed_requests = [0]
    started = time.time()
    lost = []
    fresh = {}
    for kill in range(arguments.kills):
        process, address = start(arguments.binary, data_dir, log)
        # Everything acknowledged in the last round (and a sample of older ones) must be there
        # after the restart; the whole set is checked once more at the end.
        if kill > 0:
            older = [item for item in acknowledged.items() if item[0] not in fresh]
            sample = chooser.sample(older, min(200, len(older)))
            for message_id, body in list(fresh.items()) + sample:
                status, raw = request(address, "GET", f"/v1/mailboxes/crash%40example.org/INBOX/messages/{message_id}/raw")
                if status != 200 or raw != body:
                    lost.append({"kill": kill, "id": message_id, "status": status})
            if lost:
                break
        fresh = {}
        stop = threading.Event()
        def writer(number):
            while not stop.is_set():
                with lock:
                    counter[0] += 1
                    index = counter[0]
                size = chooser.choice([300, 2000, 4096, 9000, 40000])
                body = (f"From: writer{number}@example.org\r\nSubject: crash test {index}\r\n"
                        f"Message-ID: <{index}@crash.example.org>\r\n\r\n").encode() + os.urandom(size // 2).hex().encode()[:size]
                try:
                    status, answer = request(address, "POST", "/v1/mailboxes/crash%40example.org/INBOX/messages", body, timeout=5)
                except OSError:
                    failed_requests[0] += 1  # the node is down or died mid-request: not acknowledged
                    continue
                if status == 201:
                    with lock:
                        message_id = json.loads(answer)["id"]
                        acknowledged[message_id] = body
                        fresh[message_id] = body
        threads = [threading.Thread(target=writer, args=(number,), daemon=True) for number in range(arguments.writers)]
        for thread in threads:
            thread.start()
        time.sleep(chooser.uniform(0.2, 1.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        print(f"kill {kill + 1}/{arguments.kills}: {len(acknowledged)} acknowledged so far", file=sys.stderr)
    if not lost:
        process, address = start(arguments.binary, data_dir, log)
        for message_id, body in acknowledged.items():
            status, raw = request(address, "GET", f"/v1/mailboxes/crash%40example.org/INBOX/messages/{message_id}/raw")
            if status != 200 or raw != body:
                lost.append({"kill": arguments.kills, "id": message_id, "status": status})
        _, listing = request(address, "GET", "/v1/mailboxes/crash%40example.org/INBOX")
        process.send_signal(signal.SIGTERM)
        process.wait()
    result = {
        "kills": arguments.kills,
        "acknowledged": len(acknowledged),
        "lost": len(lost),
        "first_lost": lost[:5],
        "requests_refused_while_down": failed_requests[0],
        "seconds": round(time.time() - started, 1),
        "data": root if (arguments.keep or lost) else None,
    }
    if not (arguments.keep or lost):
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    sys.exit(1 if lost else 0)

if __name__ == "__main__":
    main()
