#!/usr/bin/env python3
"""The checker of scripts/chaos.py: reads a run's history.jsonl and final.json and prints one JSON
summary line; `--totals FILE` sums summary lines (one per run) into the totals of many runs.

    scripts/chaos_check.py WORKDIR          # re-check a kept run
    scripts/chaos_check.py --totals runs.jsonl

Rules (each is a function in RULES; a new operation kind adds its own):
- lost: an acknowledged append absent from the final listing of some node (or present with other
  bytes: `corrupt`), unless an expunge of it was acknowledged or has an unknown outcome;
- resurrected: a message whose expunge was acknowledged, listed by some node at the end; or listed
  by a node again after that node's complete listing had stopped showing it; or listed by the node
  that acknowledged its expunge, after the acknowledgement;
- divergent: a message listed on some nodes and not others, or with other flags or mailbox;
  plus every flag whose final value differs from the value the stamps must make win (below);
- duplicates: one ID listed twice by a node, or one append (its unique subject) listed under two IDs;
- stale reads: a node's complete listing without a message that node had acknowledged appending
  (same member, no expunge of it begun before);
- unexpected: a listed message that no append of this run sent.

Flag winners. The API does not expose flag stamps, so the expected winner of a (message, flag)
register comes from the history where it is unambiguous. A change Y is known to come after X when
Y's node held X's effect when Y was stamped (the node's clock is then past X's stamp): X and Y on
the same node member with X acknowledged (or X's process dead, for an unknown X) before Y began;
or the record's state hash read on Y's node just before Y equals one read just after X (or after a
change known to follow X); or a barrier (every node reporting one digest) fell between X's end and
Y's start with Y's node the same member as at the barrier. When one acknowledged change follows
every other change of the register that may have applied, its value must win on every node; when
all such changes set the same value and one of them was acknowledged, that value must win; otherwise (concurrent, or unknown
changes) the checker only requires agreement, and the summary counts both kinds.

Elements, as in Jepsen's set checker: every append is `stable` (acknowledged and present on every
node, or legitimately expunged), `lost`, `unknown_applied` / `never_read` (outcome unknown, then
present / absent everywhere).
"""

import collections
import json
import os
import sys

FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "$Work"]


class Run:
    """A run's history and final state, indexed for the rules."""

    def __init__(self, directory):
        self.directory = directory
        self.header = None
        self.ops, self.reads, self.barriers, self.events, self.feeds = [], [], [], [], []
        with open(os.path.join(directory, "history.jsonl")) as handle:
            for line in handle:
                if not line.strip():
                    continue
                record = json.loads(line)
                kind = record.get("type")
                if kind == "run":
                    self.header = record
                elif kind == "op":
                    self.ops.append(record)
                elif kind == "read":
                    self.reads.append(record)
                elif kind == "barrier":
                    self.barriers.append(record)
                elif kind == "event":
                    self.events.append(record)
                elif kind == "feed":
                    self.feeds.append(record)
        with open(os.path.join(directory, "final.json")) as handle:
            self.final = json.load(handle)
        self.node_keys = sorted(key for key in self.final if key.isdigit())
        # Final listings: node -> id -> (mailbox, flags, sha256, subject), and duplicates found.
        self.listed = {}
        self.duplicate_ids = []
        for node in self.node_keys:
            by_id = {}
            for mailbox, content in self.final[node]["mailboxes"].items():
                for message in content["messages"]:
                    if message["id"] in by_id:
                        self.duplicate_ids.append((node, message["id"]))
                    by_id[message["id"]] = (mailbox, tuple(message["flags"]), message["sha256"], message["subject"])
            self.listed[node] = by_id
        self.appends = [op for op in self.ops if op["kind"] == "append"]
        self.append_by_id = {op["id"]: op for op in self.appends if op["outcome"] == "ok" and "id" in op}
        self.append_by_subject = {op["subject"]: op for op in self.appends if "subject" in op}
        self.expunges = collections.defaultdict(list)
        for op in self.ops:
            if op["kind"] == "expunge":
                self.expunges[op["id"]].append(op)
        # When each life of each node ended (its next start), to bound unknown operations.
        starts = collections.defaultdict(dict)
        for event in self.events:
            if event["event"] == "start":
                starts[event["node"]][event["life"]] = event["time"]
        self.life_ended = {(node, life - 1): moment for node, lives in starts.items() for life, moment in lives.items()}

    def expunge_may_have_applied(self, message_id):
        return any(op["outcome"] in ("ok", "unknown") for op in self.expunges.get(message_id, []))

    def expunge_acknowledged(self, message_id):
        return [op for op in self.expunges.get(message_id, []) if op["outcome"] == "ok"]


def mailbox_of(op):
    return f"{op['account']}/{op['mailbox']}"


# ------------------------------------------------------------------------------------------------
# Rules: each returns a dict of counts (and `details`, a few examples kept for the report)
# ------------------------------------------------------------------------------------------------

def rule_appends(run):
    lost, corrupt, details = set(), set(), []
    elements = collections.Counter()
    for op in run.appends:
        message_id = op.get("id")
        if op["outcome"] == "fail":
            continue
        if op["outcome"] == "unknown":
            present = [node for node in run.node_keys
                       if any(entry[3] == op["subject"] for entry in run.listed[node].values())]
            if len(present) == len(run.node_keys):
                elements["unknown_applied"] += 1
            elif not present:
                elements["never_read"] += 1
            else:
                elements["unknown_partial"] += 1  # counted as divergent by rule_divergence
            continue
        expunged = run.expunge_may_have_applied(message_id)
        missing = []
        for node in run.node_keys:
            entry = run.listed[node].get(message_id)
            if entry is None:
                if not expunged:
                    missing.append(node)
                continue
            if entry[0] != mailbox_of(op) or entry[2] != op["sha256"]:
                corrupt.add(message_id)
                details.append({"corrupt": message_id, "node": node, "listed": entry[:3:2], "op": op["index"]})
        if missing:
            lost.add(message_id)
            details.append({"lost": message_id, "missing_on": missing, "op": op["index"], "node": op["node"]})
            elements["lost"] += 1
        else:
            elements["stable"] += 1
    return {"lost": len(lost), "corrupt": len(corrupt), "elements": dict(elements), "details": details[:20]}


def replay_reads(run):
    """Yields (read, listed ids after it) per (node, member, mailbox), in history order."""
    state = {}
    for read in run.reads:
        key = (read["node"], read["member"], read["account"], read["mailbox"])
        ids = state.setdefault(key, set())
        ids.difference_update(read["removed"])
        ids.update(read["added"])
        yield read, ids


def rule_resurrection(run):
    resurrected, details = set(), []
    for node in run.node_keys:
        for message_id in run.listed[node]:
            acknowledged = run.expunge_acknowledged(message_id)
            if acknowledged:
                resurrected.add(message_id)
                details.append({"resurrected": message_id, "listed_at_end_on": node,
                                "expunge_ops": [op["index"] for op in acknowledged]})
    gone = collections.defaultdict(set)
    expunged_here = collections.defaultdict(dict)  # (node, member) -> id -> completion time
    for op in run.ops:
        if op["kind"] == "expunge" and op["outcome"] == "ok":
            expunged_here[(op["node"], op["member"])][op["id"]] = op["completed"]
    for read, ids in replay_reads(run):
        key = (read["node"], read["member"], read["account"], read["mailbox"])
        back = set(read["added"]) & gone[key]
        for message_id in back:
            resurrected.add(message_id)
            details.append({"resurrected": message_id, "listed_again_by_read": read["index"]})
        gone[key].update(read["removed"])
        for message_id, completed in expunged_here[(read["node"], read["member"])].items():
            if message_id in ids and completed < read["invoked"]:
                resurrected.add(message_id)
                details.append({"resurrected": message_id, "listed_after_local_expunge_by_read": read["index"]})
    return {"resurrected": len(resurrected), "details": details[:20]}


def rule_stale_reads(run):
    stale, details = 0, []
    acknowledged = collections.defaultdict(list)
    for op in run.appends:
        if op["outcome"] == "ok":
            acknowledged[(op["node"], op["member"], op["account"], op["mailbox"])].append(op)
    for read, ids in replay_reads(run):
        key = (read["node"], read["member"], read["account"], read["mailbox"])
        for op in acknowledged[key]:
            if op["completed"] >= read["invoked"] or op["id"] in ids:
                continue
            if any(other["invoked"] < read["completed"] and other["outcome"] != "fail"
                   for other in run.expunges.get(op["id"], [])):
                continue
            stale += 1
            if len(details) < 10:
                details.append({"stale_read": read["index"], "missing": op["id"], "append_op": op["index"]})
    return {"stale_reads": stale, "details": details}


def rule_duplicates(run):
    duplicates, details = len(run.duplicate_ids), [{"duplicate_id": pair} for pair in run.duplicate_ids[:10]]
    unexpected = 0
    for node in run.node_keys:
        subjects = collections.Counter(entry[3] for entry in run.listed[node].values())
        for subject, count in subjects.items():
            if subject not in run.append_by_subject:
                unexpected += count
                details.append({"unexpected": subject, "node": node})
            elif count > 1:
                duplicates += count - 1
                details.append({"duplicate_subject": subject, "node": node, "count": count})
    return {"duplicates": duplicates, "unexpected": unexpected, "details": details[:20]}


def rule_divergence(run):
    divergent, details = set(), []
    everything = set()
    for node in run.node_keys:
        everything.update(run.listed[node])
    for message_id in sorted(everything):
        views = {node: run.listed[node].get(message_id, (None, None))[:2] for node in run.node_keys}
        if len(set(views.values())) > 1:
            divergent.add(message_id)
            details.append({"divergent": message_id, "views": {node: list(view) if view[0] else None
                                                               for node, view in views.items()}})
    digests = {run.final[node]["digest"] for node in run.node_keys}
    return {"divergent": len(divergent), "digests_differ": len(digests) > 1, "details": details[:20]}


def flag_order(run, message_id):
    """Flag changes of one message (that may have applied) and `before(x, y)`: x known to precede y."""
    changes = [op for op in run.ops if op["kind"] == "flags" and op.get("id") == message_id
               and op["outcome"] in ("ok", "unknown")]
    changes.sort(key=lambda op: op["invoked"])

    def done_by(op):
        """When op's effect, if any, was certainly on its node: its acknowledgement, or the death
        of the process that held it unanswered."""
        if op["outcome"] == "ok":
            return op["completed"]
        return run.life_ended.get((op["node"], op["life"]))

    direct = {}
    for x in changes:
        x_end = done_by(x)
        for y in changes:
            if x is y or x_end is None or y["invoked"] <= x_end:
                continue
            same_node = x["node"] == y["node"] and x["member"] == y["member"]
            barrier = any(x_end < barrier["start"] and barrier["end"] < y["invoked"]
                          and barrier["members"][y["node"]] == y["member"] for barrier in run.barriers)
            if same_node or barrier:
                direct.setdefault(x["index"], set()).add(y["index"])
    # State hashes known to include each change, closed under "read before a later change".
    includes = {op["index"]: ({op["post_state"]} if op.get("post_state") else set()) for op in changes}
    follows = {op["index"]: set(direct.get(op["index"], ())) for op in changes}
    changed = True
    while changed:
        changed = False
        for x in changes:
            for y in changes:
                if x is y or y["index"] in follows[x["index"]]:
                    continue
                if y.get("pre_state") and y["pre_state"] in includes[x["index"]] and y["invoked"] > x["invoked"]:
                    follows[x["index"]].add(y["index"])
                    changed = True
            for y_index in list(follows[x["index"]]):
                extra = includes[y_index] - includes[x["index"]]
                further = follows.get(y_index, set()) - follows[x["index"]]
                if extra or further:
                    includes[x["index"]] |= extra
                    follows[x["index"]] |= further
                    changed = True
    return changes, lambda x, y: y["index"] in follows[x["index"]]


def rule_flag_winners(run):
    checked, agreement_only, wrong, contested, details = 0, 0, 0, 0, []
    live = set()
    for node in run.node_keys:
        live.update(run.listed[node])
    for message_id in sorted(live):
        if message_id not in run.append_by_id:
            continue
        changes, before = flag_order(run, message_id)
        for flag in FLAGS:
            candidates = [op for op in changes if op["flag"] == flag]
            expected = None
            if not candidates:
                expected = False
            elif len({op["set"] for op in candidates}) == 1 and any(op["outcome"] == "ok" for op in candidates):
                # One value, applied at least once: whichever stamp wins carries it. (With only
                # unknown changes the register may still be unset.)
                expected = candidates[0]["set"]
            else:
                contested += 1
                for last in candidates:
                    if last["outcome"] == "ok" and all(other is last or before(other, last) for other in candidates):
                        expected = last["set"]
                        break
            if expected is None:
                agreement_only += 1
                continue
            checked += 1
            for node in run.node_keys:
                entry = run.listed[node].get(message_id)
                if entry is not None and (flag in entry[1]) != expected:
                    wrong += 1
                    details.append({"wrong_flag_winner": message_id, "flag": flag, "node": node,
                                    "expected": expected, "changes": [op["index"] for op in candidates]})
                    break
    return {"flags_checked_against_order": checked, "flags_contested": contested, "flags_agreement_only": agreement_only,
            "wrong_flag_winner": wrong, "details": details[:20]}


def account_listing(run, node, account):
    """id -> mailbox of one account's messages in a node's final listing."""
    return {message_id: entry[0].split("/", 1)[1] for message_id, entry in run.listed.get(node, {}).items()
            if entry[0].split("/", 1)[0] == account}


def feed_sequences(records):
    """The pages of one client grouped by catch-up, in order."""
    sequences = collections.OrderedDict()
    for record in records:
        sequences.setdefault(record["catch_up"], []).append(record)
    return list(sequences.values())


def rule_feed(run):
    """Replays every change-feed client from the history alone.

    - created twice: an ID reported as created to a client that had it reported as created
      before (since its last resync), or after a destroy of it was reported (IDs are never reused);
    - 410 Gone is allowed when the client's next call starts from nothing (a resync); a token the
      driver damaged on purpose (--feed-bad-token-rate) must get one;
    - missing local: a catch-up that ended (has_more false) on node N must have shown every append
      N had acknowledged (same member) before the pass began, unless an expunge of it may have
      begun before the catch-up ended; and none of the messages N had acknowledged expunging
      before it (the node holds those changes: the feed's first law). A pass begins at a page
      whose token has no cursor of N; a token taken mid-listing from N carries N's pass on, and
      the origins before its cursor are not listed again, so their changes since the pass began
      come on the next call even though has_more was false: counted as
      deferred_past_has_more_false, not a failure (core/src/changes.rs allows "a later call");
    - mismatch: after the final catch-up (after heal and convergence) the client's view must
      equal the account's messages in the final listing of the node that ended it, mailboxes too.
    """
    counts = collections.Counter()
    details = []
    by_client = collections.defaultdict(list)
    for record in run.feeds:
        by_client[record["client"]].append(record)
    local_appends = collections.defaultdict(list)  # (node, member, account) -> acknowledged appends
    local_expunges = collections.defaultdict(list)
    for op in run.ops:
        if op["outcome"] != "ok" or "id" not in op:
            continue
        if op["kind"] == "append":
            local_appends[(op["node"], op["member"], op["account"])].append(op)
        elif op["kind"] == "expunge":
            local_expunges[(op["node"], op["member"], op["account"])].append(op)
    writes = collections.defaultdict(list)  # id -> when flag changes or expunges of it were invoked
    for op in run.ops:
        if op["kind"] in ("flags", "expunge") and op["outcome"] != "fail" and "id" in op:
            writes[op["id"]].append(op["invoked"])
    final_ends = run.final.get("feed_final", {})
    counts["clients"] = len(by_client)
    for client, records in sorted(by_client.items()):
        account = records[0]["account"]
        state, view, created, destroyed = None, {}, set(), set()
        told = {}  # id -> when the client was last told of it
        answers = []  # the client's ok answers so far, in order
        awaiting_resync = False
        for sequence in feed_sequences(records):
            for record in sequence:
                counts["calls"] += 1
                if record.get("damaged"):
                    counts["damaged_tokens"] += 1
                    if record["outcome"] == "ok":
                        counts["damaged_token_accepted"] += 1
                        details.append({"feed_damaged_token_accepted": record["index"], "client": client})
                elif record["since"] != state:
                    counts["state_not_replayed"] += 1  # the driver sent another token than it was given
                if awaiting_resync:
                    if record["since"] is not None:
                        counts["gone_without_resync"] += 1
                        details.append({"feed_gone_without_resync": record["index"], "client": client})
                    if record["outcome"] == "ok":
                        awaiting_resync = False
                        counts["resyncs"] += record["since"] is None
                outcome = record["outcome"]
                if outcome in ("fail", "unknown"):
                    counts[f"calls_{outcome}"] += 1
                    continue
                if outcome == "gone":
                    counts["gone"] += 1
                    state, view, created, destroyed, told = None, {}, set(), set(), {}
                    awaiting_resync = True
                    continue
                counts["answers"] += 1
                size = len(record["created"]) + len(record["updated"]) + len(record["destroyed"])
                counts["max_listing"] = max(counts["max_listing"], size)
                if size > record["limit"]:
                    counts["over_limit"] += 1
                for message_id, mailbox in record["created"]:
                    if message_id in created or message_id in destroyed:
                        counts["created_twice"] += 1
                        details.append({"feed_created_twice": message_id, "client": client, "call": record["index"],
                                        "node": record["node"], "since": record["since"],
                                        "after_destroy": message_id in destroyed})
                    created.add(message_id)
                    view[message_id] = mailbox
                for message_id, mailbox in record["updated"]:
                    if message_id in view:
                        counts["updated_repeats"] += 1
                        if not any(moment > told[message_id] for moment in writes.get(message_id, ())):
                            counts["updated_repeats_without_new_write"] += 1
                    elif message_id in destroyed:
                        counts["updated_after_destroyed"] += 1
                    else:
                        counts["updated_not_seen_created"] += 1
                    view[message_id] = mailbox
                for message_id in record["destroyed"]:
                    view.pop(message_id, None)
                    destroyed.add(message_id)
                for message_id, _ in record["created"] + record["updated"]:
                    told[message_id] = record["invoked"]
                state = record["state"]
                answers.append(record)
            last = sequence[-1]
            if last["outcome"] != "ok" or last["has_more"]:
                continue
            # The pages served by the node that ended this catch-up, back to the first of the run.
            first = last
            for record in reversed(sequence):
                if record["outcome"] != "ok" or (record["node"], record["member"]) != (last["node"], last["member"]):
                    break
                first = record
            # The pass: a token with a cursor from this node carries on its pass, which skips
            # origins before the cursor (their changes since the pass began wait for the next
            # call, "on this call or a later one"); it starts at a page whose token has no cursor
            # of this node: from nothing, or from another node's answer or a last page.
            position = len(answers) - 1
            while position > 0:
                before, page = answers[position - 1], answers[position]
                if page["since"] is None or page["since"] != before["state"] or not before["has_more"] \
                        or (before["node"], before["member"]) != (page["node"], page["member"]):
                    break
                position -= 1
            pass_start = answers[position]
            key = (last["node"], last["member"], account)
            counts["complete_catch_ups"] += 1
            # An ID the client was told was destroyed, back in its view (an `updated` from a node
            # that lacked the destroy) after a catch-up said there was nothing more.
            counts["complete_catch_ups_holding_a_destroyed_id"] += bool(destroyed & set(view))
            counts["catch_ups_ending_a_pass_begun_earlier"] += pass_start["invoked"] < first["invoked"]
            for op in local_appends[key]:
                if op["completed"] >= first["invoked"] or op["id"] in view:
                    continue
                if any(other["invoked"] < last["completed"] and other["outcome"] != "fail"
                       for other in run.expunges.get(op["id"], [])):
                    continue
                calls = [record["index"] for record in sequence]
                if op["completed"] >= pass_start["invoked"]:
                    counts["deferred_past_has_more_false"] += 1
                    if counts["deferred_past_has_more_false"] <= 5:
                        details.append({"feed_deferred_past_has_more_false": op["id"], "client": client,
                                        "node": last["node"], "append_op": op["index"], "calls": calls,
                                        "pass_began_at_call": pass_start["index"]})
                    continue
                counts["missing_local"] += 1
                details.append({"feed_missing_local": op["id"], "client": client, "node": last["node"],
                                "append_op": op["index"], "calls": calls})
            for op in local_expunges[key]:
                if op["completed"] < first["invoked"] and op["id"] in view:
                    if op["completed"] >= pass_start["invoked"]:
                        counts["deferred_past_has_more_false"] += 1
                        continue
                    counts["missing_local"] += 1
                    details.append({"feed_missing_local_expunge": op["id"], "client": client, "node": last["node"],
                                    "expunge_op": op["index"], "calls": [record["index"] for record in sequence]})
        end = final_ends.get(str(client))
        finals = [record for record in records if record["final"]]
        if end is None or not finals or finals[-1]["outcome"] != "ok" or finals[-1]["has_more"]:
            counts["final_incomplete"] += 1
            details.append({"feed_final_incomplete": client})
            continue
        live = account_listing(run, str(finals[-1]["node"]), account)
        missing, extra = sorted(set(live) - set(view)), sorted(set(view) - set(live))
        moved = sorted(message_id for message_id in set(live) & set(view) if live[message_id] != view[message_id])
        if missing or extra or moved:
            counts["mismatches"] += 1
            details.append({"feed_mismatch": client, "account": account, "node": finals[-1]["node"],
                            "missing": missing[:20], "extra": extra[:20], "wrong_mailbox": moved[:20],
                            "counts": [len(missing), len(extra), len(moved)], "state": state})
        counts["final_view_total"] += len(view)
    return {"feed": dict(counts), "details": details[:30]}


RULES = [rule_appends, rule_resurrection, rule_stale_reads, rule_duplicates, rule_divergence, rule_flag_winners,
         rule_feed]


def check(directory):
    run = Run(directory)
    operations = collections.defaultdict(lambda: collections.Counter())
    for op in run.ops:
        operations[op["kind"]][op["outcome"]] += 1
    results = {}
    details = []
    for rule in RULES:
        result = rule(run)
        details.extend(result.pop("details", []))
        results.update(result)
    faults = collections.Counter(event["fault"] for event in run.events if event["event"] == "fault")
    converged = run.final.get("converged_seconds")
    summary = {
        "seed": run.header["seed"],
        "nodes": run.header["nodes"],
        "duration": run.header["duration"],
        "operations": {kind: dict(counts) for kind, counts in sorted(operations.items())},
        "acknowledged": sum(counts["ok"] for counts in operations.values()),
        "lost": results["lost"],
        "resurrected": results["resurrected"],
        "divergent": results["divergent"] + results["wrong_flag_winner"],
        "duplicates": results["duplicates"],
        "corrupt": results["corrupt"],
        "unexpected": results["unexpected"],
        "stale_reads": results["stale_reads"],
        "wrong_flag_winner": results["wrong_flag_winner"],
        "flags": {"checked_against_causal_order": results["flags_checked_against_order"],
                  "agreement_only": results["flags_agreement_only"],
                  "contested": results["flags_contested"],
                  "note": "the API exposes no flag stamps: winners come from the history's causal order"},
        "elements": results["elements"],
        "reads": len(run.reads),
        "barriers": len(run.barriers),
        "faults": dict(faults),
        "converged": converged is not None,
        "heal_to_convergence_seconds": converged,
        "client_errors": run.final.get("client_errors", []),
        "feed": results["feed"],
        "feed_mismatches": results["feed"].get("mismatches", 0),
    }
    problems = [name for name in ("lost", "resurrected", "divergent", "duplicates", "corrupt", "unexpected",
                                  "stale_reads") if summary[name]]
    if not summary["converged"]:
        problems.append("not_converged")
    if results["digests_differ"] or run.final.get("digest_after_reading") is None:
        problems.append("digests_differ")
    if summary["client_errors"]:
        problems.append("client_errors")
    feed = results["feed"]
    # over_limit (a page longer than `limit`: RFC 8620 says MUST NOT) is counted, not a failure:
    # it loses nothing.
    for name in ("mismatches", "created_twice", "missing_local", "gone_without_resync", "final_incomplete",
                 "state_not_replayed", "damaged_token_accepted"):
        if feed.get(name):
            problems.append(f"feed_{name}")
    summary["problems"] = problems
    summary["workdir"] = directory
    if problems:
        with open(os.path.join(directory, "findings.json"), "w") as handle:
            json.dump(details, handle, indent=1)
    return summary


def totals(path):
    runs = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    total = {"runs": len(runs), "operations": 0, "acknowledged": 0, "lost": 0, "resurrected": 0, "divergent": 0,
             "duplicates": 0, "corrupt": 0, "stale_reads": 0, "not_converged": 0, "max_heal_seconds": 0.0,
             "runs_with_problems": [], "faults": collections.Counter(), "outcomes": collections.Counter(),
             "feed_clients": 0, "feed_calls": 0, "feed_answers": 0, "feed_410s": 0, "feed_resyncs": 0,
             "feed_mismatches": 0, "feed_created_twice": 0, "feed_missing_local": 0, "feed_final_incomplete": 0,
             "feed_updated_repeats": 0, "feed_updated_repeats_without_new_write": 0, "feed_over_limit": 0,
             "feed_deferred_past_has_more_false": 0, "feed_complete_catch_ups_holding_a_destroyed_id": 0,
             "feed_max_listing": 0}
    for run in runs:
        for counts in run["operations"].values():
            total["operations"] += sum(counts.values())
            total["outcomes"].update(counts)
        for key in ("acknowledged", "lost", "resurrected", "divergent", "duplicates", "corrupt", "stale_reads"):
            total[key] += run[key]
        total["not_converged"] += not run["converged"]
        if run["heal_to_convergence_seconds"] is not None:
            total["max_heal_seconds"] = max(total["max_heal_seconds"], run["heal_to_convergence_seconds"])
        total["faults"].update(run["faults"])
        feed = run.get("feed", {})
        for key, name in (("clients", "feed_clients"), ("calls", "feed_calls"), ("answers", "feed_answers"),
                          ("gone", "feed_410s"), ("resyncs", "feed_resyncs"), ("mismatches", "feed_mismatches"),
                          ("created_twice", "feed_created_twice"), ("missing_local", "feed_missing_local"),
                          ("final_incomplete", "feed_final_incomplete"), ("updated_repeats", "feed_updated_repeats"),
                          ("updated_repeats_without_new_write", "feed_updated_repeats_without_new_write"),
                          ("over_limit", "feed_over_limit"),
                          ("deferred_past_has_more_false", "feed_deferred_past_has_more_false"),
                          ("complete_catch_ups_holding_a_destroyed_id",
                           "feed_complete_catch_ups_holding_a_destroyed_id")):
            total[name] += feed.get(key, 0)
        total["feed_max_listing"] = max(total["feed_max_listing"], feed.get("max_listing", 0))
        if run["problems"]:
            total["runs_with_problems"].append({"seed": run["seed"], "problems": run["problems"],
                                                "workdir": run.get("workdir")})
    total["faults"], total["outcomes"] = dict(total["faults"]), dict(total["outcomes"])
    return total


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--totals":
        print(json.dumps(totals(sys.argv[2]), separators=(",", ":")))
        return 0
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    summary = check(sys.argv[1])
    print(json.dumps(summary, separators=(",", ":")))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
