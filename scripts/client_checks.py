"""What the real-client checks (scripts/imap_clients.py, scripts/jmap_clients.py) share: a
failed expectation, waiting with a deadline, and running a list of named checks against nodes
that are always stopped afterwards, with one line per check and a JSON summary."""

import json
import shutil
import sys
import time

WAIT_SECONDS = 60


class CheckFailed(Exception):
    pass


def expect(ok, what):
    if not ok:
        raise CheckFailed(what)


def wait_for(what, predicate, seconds=WAIT_SECONDS):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise CheckFailed(f"{what} within {seconds} s")


def run_checks(prefix, nodes, start, checks, directory, keep, failures=None):
    """Runs start(), then each (name, function) of checks(); stops the nodes, removes the
    directory unless keep, prints the summary and exits 0 only when everything passed. checks()
    may add to failures (a client that is not installed)."""
    results = {}
    failures = [] if failures is None else failures
    try:
        start()
        for name, run in checks():
            try:
                results[name] = run()
                print(f"{prefix}: ok: {name}", flush=True)
            except Exception as error:  # every failure is reported, and the nodes still stopped
                failures.append(f"{name}: {error!r}")
                print(f"{prefix}: FAILED: {name}: {error!r}", flush=True)
    except Exception as error:
        failures.append(f"start: {error!r}")
        print(f"{prefix}: FAILED to start: {error!r}", flush=True)
    finally:
        for node in nodes:
            node.stop()
        if keep:
            print(f"{prefix}: kept {directory}", flush=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps({"passed": len(results), "failed": len(failures), "results": results, "failures": failures}, indent=2))
    print(f"{len(results)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)
