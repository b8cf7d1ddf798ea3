#!/usr/bin/env python3
"""The checker of scripts/chaos.py: reads a run's history.jsonl and final.json and prints one JSON
summary line; `--totals FILE` sums summary lines (one per run) into the totals of many runs.

    scripts/chaos_check.py WORKDIR          # re-check a kept run
    scripts/chaos_check.py --totals runs.jsonl

The mail model (core/src/mailbox.rs): each account has replicated mailboxes with stable IDs; an
email lives in one mailbox and keeps its ID when it moves; deleting a mailbox destroys the emails
the deleting node shows in it, and an email delivered or moved into it elsewhere meanwhile is shown
in the INBOX instead (the rescue rule). Live siblings with one name are one mailbox (aliases of the
one created first), so a mailbox ID seen in the history may later hide behind another: the checker
groups the IDs ever shown at one path of an account into one class (a union over the run, so it
over-approximates "may have been the same mailbox", which only ever excuses, never accuses).

Rules (each is a function in RULES; a new operation kind adds its own):
- lost: an acknowledged append (by ID) or LMTP delivery (by its unique subject) absent from the
  final listing of some node (or with other bytes: `corrupt`), unless an expunge of it was
  acknowledged or has an unknown outcome, or a mailbox delete that may have applied began after
  it, of a mailbox in the class of one it may have been in (appended, delivered or moved to). A
  delivery to `user+detail@` may land in `detail` or the INBOX, which is never deleted;
- resurrected: a message whose expunge was acknowledged, listed by some node at the end; a message
  the deleting node listed in the mailbox just before an acknowledged delete (with no move of it
  begun before the delete ended), listed again anywhere at the end or by that node afterwards; or
  listed by a node again after that node's complete listing of its mailbox (by ID) had stopped
  showing it, when it was never moved;
- divergent: an email listed on some nodes and not others, or with other flags or mailbox; a
  mailbox (ID, path, parent, role) shown differently by two nodes; a flag or location or mailbox
  placement whose final value differs from the one the stamps must make win (below); a broken tree
  (a parent that is not shown, a path that is not the parent's path plus the name, a cycle); an
  orphan (GET /v1/accounts/A/emails/ID answers 200 on a node that lists it in no mailbox); an email
  shown in a mailbox it was never sent or moved to, other than the INBOX (misplaced);
- duplicates: one ID listed twice by a node, one append (its unique subject) listed under two IDs,
  or two visible mailboxes with one path on a node (concurrent creates must converge to one);
- stale reads: a node's complete listing of a mailbox without a message that node had acknowledged
  appending there (same member, no expunge, move or mailbox delete of it begun before);
- unexpected: a listed message that no append or delivery of this run sent.

Winners. The API does not expose stamps, so the expected winner of a register comes from the
history where it is unambiguous. A change Y is known to come after X when Y's node held X's effect
when Y was stamped (the node's clock is then past X's stamp): X and Y on the same node member with
X acknowledged (or X's process dead, for an unknown X) before Y began; or the record's state hash
read on Y's node just before Y equals one read just after X (or after a change known to follow X);
or a barrier (every node reporting one digest) fell between X's end and Y's start with Y's node the
same member as at the barrier.
- flags: when one acknowledged change follows every other change of the register that may have
  applied, its value must win on every node; when all such changes set the same value and one of
  them was acknowledged, that value must win; otherwise only agreement is required.
- locations: with no move that may have applied, an email stays where it was appended; when one
  acknowledged move follows every other, its target wins. If that mailbox is shown at the end the
  email must be in it; if an acknowledged delete removed it, the email must be in the INBOX (the
  rescue rule); otherwise (it became an alias) only agreement is required.
- mailbox placements: when one acknowledged rename of a mailbox follows every other rename of it,
  no rename concurrent with it moves a mailbox under another (no cycle to cut), and its parent is
  still shown, the mailbox must end under that parent with that name.

Elements, as in Jepsen's set checker: every append or delivery is `stable` (acknowledged and
present on every node), `destroyed` (acknowledged, absent, legitimately expunged or deleted with
its mailbox), `lost`, `unknown_applied` / `never_read` (outcome unknown, then present / absent
everywhere).
"""

import collections
import json
import os
import sys

FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "$Work"]
Entry = collections.namedtuple("Entry", "account mailbox_id path flags sha256 subject")


class Classes:
    """Union-find over an account's mailbox IDs and the paths they were shown at."""

    def __init__(self):
        self.parent = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, account, mailbox_id, path):
        if mailbox_id and path:
            self.parent[self.find(("id", account, mailbox_id))] = self.find(("path", account, path))

    def same(self, account, first, second):
        return self.find(("id", account, first)) == self.find(("id", account, second))

    def of_path(self, account, path):
        return self.find(("path", account, path))

    def of_id(self, account, mailbox_id):
        return self.find(("id", account, mailbox_id))


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
        # Final state: node -> id -> Entry; node -> account -> mailbox id -> (path, parent, role).
        self.listed, self.mailboxes, self.inbox = {}, {}, {}
        self.duplicate_ids, self.duplicate_paths = [], []
        for node in self.node_keys:
            by_id, trees = {}, {}
            for account, content in self.final[node]["accounts"].items():
                tree = {}
                for mailbox in content["mailboxes"]:
                    tree[mailbox["id"]] = (mailbox["mailbox"], mailbox["parent"], mailbox["role"])
                    if mailbox["mailbox"] == "INBOX":
                        self.inbox[account] = mailbox["id"]
                paths = collections.Counter(path for path, _, _ in tree.values())
                self.duplicate_paths += [(node, account, path) for path, count in paths.items() if count > 1]
                trees[account] = tree
                for message in content["messages"]:
                    if message["id"] in by_id:
                        self.duplicate_ids.append((node, message["id"]))
                    by_id[message["id"]] = Entry(account, message["mailbox_id"], message["mailbox"],
                                                 tuple(message["flags"]),
                                                 message.get("body_sha256") or message["sha256"], message["subject"])
            self.listed[node], self.mailboxes[node] = by_id, trees
        self.by_subject = {node: {entry.subject: message_id for message_id, entry in self.listed[node].items()}
                           for node in self.node_keys}
        self.appends = [op for op in self.ops if op["kind"] in ("append", "deliver")]
        self.append_by_id = {op["id"]: op for op in self.appends if op["outcome"] == "ok" and "id" in op}
        self.append_by_subject = {op["subject"]: op for op in self.appends if "subject" in op}
        self.expunges, self.moves = collections.defaultdict(list), collections.defaultdict(list)
        for op in self.ops:
            if op["kind"] == "expunge" and "mailbox" in op:
                self.expunges[op["id"]].append(op)
            elif op["kind"] == "move" and "to_id" in op:
                self.moves[op["id"]].append(op)
        self.deletes = [op for op in self.ops if op["kind"] == "delete" and "id" in op]
        self.renames = [op for op in self.ops if op["kind"] == "rename" and "id" in op]
        self.deleted_ids = {(op["account"], op["id"]) for op in self.deletes if op["outcome"] == "ok"}
        self.classes = Classes()
        self.collect_classes()
        # When each life of each node ended (its next start), to bound unknown operations.
        starts = collections.defaultdict(dict)
        for event in self.events:
            if event["event"] == "start":
                starts[event["node"]][event["life"]] = event["time"]
        self.life_ended = {(node, life - 1): moment for node, lives in starts.items() for life, moment in lives.items()}

    def collect_classes(self):
        union = self.classes.union
        for record in self.ops + self.reads:
            account = record["account"]
            for mailbox_id, path, _ in record.get("seen", []):
                union(account, mailbox_id, path)
            kind = record.get("kind")
            if kind == "append":
                union(account, record.get("mailbox_id"), record["mailbox"])
            elif kind in ("flags", "expunge", "move"):
                union(account, record.get("mailbox_id"), record.get("mailbox"))
                union(account, record.get("to_id"), record.get("to_path"))
                union(account, record.get("moved_to"), record.get("moved_to_path"))
            elif kind in ("create", "rename", "delete"):
                union(account, record.get("result_id"), record.get("result_path"))
                union(account, record.get("id"), record.get("from_path"))
                if kind in ("rename", "delete"):
                    union(account, record.get("id"), record.get("path"))
            elif record.get("type") == "read":
                union(account, record.get("mailbox_id"), record.get("mailbox"))
        for node in self.node_keys:
            for account, tree in self.mailboxes[node].items():
                for mailbox_id, (path, _, _) in tree.items():
                    union(account, mailbox_id, path)

    def expunge_may_have_applied(self, message_id):
        return any(op["outcome"] in ("ok", "unknown") for op in self.expunges.get(message_id, []))

    def expunge_acknowledged(self, message_id):
        return [op for op in self.expunges.get(message_id, []) if op["outcome"] == "ok"]

    def possible_classes(self, op):
        """The classes of the mailboxes an appended or delivered email may have been in."""
        account = op["account"]
        if op["kind"] == "deliver":
            return {self.classes.of_path(account, op["detail"])} if op.get("detail") else set()
        classes = set()
        if op.get("mailbox_id"):
            classes.add(self.classes.of_id(account, op["mailbox_id"]))
        classes.add(self.classes.of_path(account, op["mailbox"]))
        for move in self.moves.get(op.get("id"), []):
            if move["outcome"] != "fail":
                classes.add(self.classes.of_id(account, move["to_id"]))
        return classes

    def delete_may_have_destroyed(self, op):
        """A mailbox delete that may have applied, begun after `op` began, of a mailbox in the class
        of one the email may have been in (a delete begun before it cannot have known it)."""
        classes = self.possible_classes(op)
        return [delete for delete in self.deletes
                if delete["account"] == op["account"] and delete["outcome"] != "fail"
                and delete["invoked"] > op["invoked"] and self.classes.of_id(delete["account"], delete["id"]) in classes]

    def locate(self, node, op):
        """The final Entry of an append (by ID) or delivery (by subject) on `node`, or None."""
        message_id = op.get("id") if op["kind"] == "append" else self.by_subject[node].get(op["subject"])
        return self.listed[node].get(message_id) if message_id else None


# ------------------------------------------------------------------------------------------------
# Rules: each returns a dict of counts (and `details`, a few examples kept for the report)
# ------------------------------------------------------------------------------------------------

def rule_appends(run):
    lost, corrupt, misplaced, details = set(), set(), 0, []
    elements = collections.Counter()
    for op in run.appends:
        if op["outcome"] == "fail":
            continue
        if op["outcome"] == "unknown":
            present = [node for node in run.node_keys if op["subject"] in run.by_subject[node]]
            if len(present) == len(run.node_keys):
                elements["unknown_applied"] += 1
            elif not present:
                elements["never_read"] += 1
            else:
                elements["unknown_partial"] += 1  # counted as divergent by rule_divergence
            continue
        key = op.get("id") or op["subject"]
        excused = (op["kind"] == "append" and run.expunge_may_have_applied(op["id"])) \
            or bool(run.delete_may_have_destroyed(op))
        missing, present = [], 0
        classes = run.possible_classes(op)
        for node in run.node_keys:
            entry = run.locate(node, op)
            if entry is None:
                missing.append(node)
                continue
            present += 1
            if entry.sha256 != op["sha256"]:
                corrupt.add(key)
                details.append({"corrupt": key, "node": node, "op": op["index"]})
            if entry.mailbox_id != run.inbox.get(op["account"]) \
                    and run.classes.of_id(op["account"], entry.mailbox_id) not in classes:
                misplaced += 1
                details.append({"misplaced": key, "node": node, "in": entry.path, "op": op["index"]})
        if missing and not excused:
            lost.add(key)
            details.append({"lost": key, "missing_on": missing, "op": op["index"], "node": op["node"],
                            "kind": op["kind"]})
            elements["lost"] += 1
        elif missing and not present:
            elements["destroyed"] += 1
        elif missing:
            elements["partly_destroyed"] += 1  # divergent
        else:
            elements["stable"] += 1
    return {"lost": len(lost), "corrupt": len(corrupt), "misplaced": misplaced, "elements": dict(elements),
            "details": details[:20]}


def replay_reads(run):
    """Yields (read, listed ids after it) per (node, member, account, mailbox id), in history order."""
    state = {}
    for read in run.reads:
        key = (read["node"], read["member"], read["account"], read["mailbox_id"])
        ids = state.setdefault(key, set())
        ids.difference_update(read["removed"])
        ids.update(read["added"])
        yield read, ids


def destroyed_by_deletes(run):
    """id -> the acknowledged delete that must have destroyed it: the deleting node listed it in the
    mailbox just before, and no move of it began before the delete ended."""
    destroyed = {}
    for delete in run.deletes:
        if delete["outcome"] != "ok" or not delete.get("pre_complete"):
            continue
        for message_id in delete["pre_listing"]:
            if any(move["outcome"] != "fail" and move["invoked"] < delete["completed"]
                   for move in run.moves.get(message_id, [])):
                continue
            destroyed.setdefault(message_id, delete)
    return destroyed


def rule_resurrection(run):
    resurrected, details = set(), []
    destroyed = destroyed_by_deletes(run)
    for node in run.node_keys:
        for message_id in run.listed[node]:
            acknowledged = run.expunge_acknowledged(message_id)
            if acknowledged:
                resurrected.add(message_id)
                details.append({"resurrected": message_id, "listed_at_end_on": node,
                                "expunge_ops": [op["index"] for op in acknowledged]})
            if message_id in destroyed:
                resurrected.add(message_id)
                details.append({"resurrected": message_id, "listed_at_end_on": node,
                                "destroyed_by_delete_op": destroyed[message_id]["index"]})
    gone = collections.defaultdict(set)
    gone_here = collections.defaultdict(dict)  # (node, member) -> id -> completion time
    for op in run.ops:
        if op["kind"] == "expunge" and op["outcome"] == "ok":
            gone_here[(op["node"], op["member"])][op["id"]] = op["completed"]
    for message_id, delete in destroyed.items():
        gone_here[(delete["node"], delete["member"])].setdefault(message_id, delete["completed"])
    for read, ids in replay_reads(run):
        key = (read["node"], read["member"], read["account"], read["mailbox_id"])
        back = {message_id for message_id in set(read["added"]) & gone[key] if not run.moves.get(message_id)}
        for message_id in back:
            resurrected.add(message_id)
            details.append({"resurrected": message_id, "listed_again_by_read": read["index"]})
        gone[key].update(read["removed"])
        for message_id, completed in gone_here[(read["node"], read["member"])].items():
            if message_id in ids and completed < read["invoked"]:
                resurrected.add(message_id)
                details.append({"resurrected": message_id, "listed_after_local_destroy_by_read": read["index"]})
    return {"resurrected": len(resurrected), "details": details[:20]}


def rule_stale_reads(run):
    stale, details = 0, []
    acknowledged = collections.defaultdict(list)
    for op in run.appends:
        if op["outcome"] == "ok" and op["kind"] == "append":
            acknowledged[(op["node"], op["member"], op["account"], op["mailbox_id"])].append(op)
    for read, ids in replay_reads(run):
        key = (read["node"], read["member"], read["account"], read["mailbox_id"])
        for op in acknowledged[key]:
            if op["completed"] >= read["invoked"] or op["id"] in ids:
                continue
            changed = run.expunges.get(op["id"], []) + run.moves.get(op["id"], []) \
                + [delete for delete in run.deletes if delete["account"] == op["account"]]
            if any(other["invoked"] < read["completed"] and other["outcome"] != "fail" for other in changed):
                continue
            stale += 1
            if len(details) < 10:
                details.append({"stale_read": read["index"], "missing": op["id"], "append_op": op["index"]})
    return {"stale_reads": stale, "details": details}


def rule_duplicates(run):
    duplicates, details = len(run.duplicate_ids), [{"duplicate_id": pair} for pair in run.duplicate_ids[:10]]
    duplicates += len(run.duplicate_paths)
    details += [{"duplicate_mailbox_path": triple} for triple in run.duplicate_paths[:10]]
    unexpected = 0
    for node in run.node_keys:
        subjects = collections.Counter(entry.subject for entry in run.listed[node].values())
        for subject, count in subjects.items():
            if subject not in run.append_by_subject:
                unexpected += count
                details.append({"unexpected": subject, "node": node})
            elif count > 1:
                duplicates += count - 1
                details.append({"duplicate_subject": subject, "node": node, "count": count})
    return {"duplicates": duplicates, "unexpected": unexpected, "details": details[:20]}


def tree_problems(tree):
    """What is wrong with one node's mailbox tree of one account (id -> (path, parent, role))."""
    problems = []
    for mailbox_id, (path, parent, _) in tree.items():
        if parent is None:
            if "/" in path:
                problems.append({"top_level_path_with_separator": mailbox_id, "path": path})
            continue
        if parent not in tree:
            problems.append({"parent_not_shown": mailbox_id, "parent": parent})
            continue
        if path.rsplit("/", 1)[0] != tree[parent][0]:
            problems.append({"path_not_under_parent": mailbox_id, "path": path, "parent_path": tree[parent][0]})
        walked, step = {mailbox_id}, parent
        while step is not None and step in tree:
            if step in walked:
                problems.append({"cycle": mailbox_id})
                break
            walked.add(step)
            step = tree[step][1]
    return problems


def rule_divergence(run):
    divergent, details = set(), []
    everything = set()
    for node in run.node_keys:
        everything.update(run.listed[node])
    for message_id in sorted(everything):
        views = {node: run.listed[node][message_id][1:4:2] if message_id in run.listed[node] else None
                 for node in run.node_keys}
        if len(set(views.values())) > 1:
            divergent.add(message_id)
            details.append({"divergent": message_id, "views": {node: list(view) if view else None
                                                               for node, view in views.items()}})
    mailbox_divergent, tree_errors = 0, 0
    accounts = sorted({account for node in run.node_keys for account in run.mailboxes[node]})
    for account in accounts:
        trees = {node: run.mailboxes[node].get(account, {}) for node in run.node_keys}
        identifiers = set().union(*[set(tree) for tree in trees.values()])
        for mailbox_id in sorted(identifiers):
            views = {node: trees[node].get(mailbox_id) for node in run.node_keys}
            if len(set(views.values())) > 1:
                mailbox_divergent += 1
                details.append({"divergent_mailbox": mailbox_id, "account": account, "views": views})
        for node, tree in trees.items():
            for problem in tree_problems(tree):
                tree_errors += 1
                details.append({**problem, "node": node, "account": account})
    orphans = 0
    for node in run.node_keys:
        for message_id, probe in run.final[node].get("probes", {}).items():
            if probe["status"] == 200:
                orphans += 1
                details.append({"orphan": message_id, "node": node, "probe": probe})
    digests = {run.final[node]["digest"] for node in run.node_keys}
    return {"divergent": len(divergent), "mailbox_divergent": mailbox_divergent, "tree_errors": tree_errors,
            "orphans": orphans, "digests_differ": len(digests) > 1, "details": details[:20]}


def causal_order(run, changes):
    """`before(x, y)`: change x known to precede change y (see the docstring), over `changes`
    (those that may have applied), from same-node order, barriers and state hashes."""
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
    return lambda x, y: y["index"] in follows[x["index"]]


def flag_order(run, message_id):
    """Flag changes of one message (that may have applied) and their `before(x, y)`."""
    changes = [op for op in run.ops if op["kind"] == "flags" and op.get("id") == message_id
               and op["outcome"] in ("ok", "unknown") and "mailbox" in op]
    changes.sort(key=lambda op: op["invoked"])
    return changes, causal_order(run, changes)


def last_of(candidates, before):
    """The acknowledged change that follows every other candidate, or None."""
    for last in candidates:
        if last["outcome"] == "ok" and all(other is last or before(other, last) for other in candidates):
            return last
    return None


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
                last = last_of(candidates, before)
                expected = None if last is None else last["set"]
            if expected is None:
                agreement_only += 1
                continue
            checked += 1
            for node in run.node_keys:
                entry = run.listed[node].get(message_id)
                if entry is not None and (flag in entry.flags) != expected:
                    wrong += 1
                    details.append({"wrong_flag_winner": message_id, "flag": flag, "node": node,
                                    "expected": expected, "changes": [op["index"] for op in candidates]})
                    break
    return {"flags_checked_against_order": checked, "flags_contested": contested, "flags_agreement_only": agreement_only,
            "wrong_flag_winner": wrong, "details": details[:20]}


def rule_location_winners(run):
    """Where each live appended email must be (see the docstring: locations)."""
    checked, agreement_only, wrong, rescued, details = 0, 0, 0, 0, []
    for message_id, op in sorted(run.append_by_id.items()):
        if op["kind"] != "append" or not any(message_id in run.listed[node] for node in run.node_keys):
            continue
        account = op["account"]
        moves = sorted((move for move in run.moves.get(message_id, []) if move["outcome"] != "fail"),
                       key=lambda move: move["invoked"])
        if not moves:
            expected = op.get("mailbox_id")
        else:
            last = last_of(moves, causal_order(run, moves))
            expected = None if last is None else (last.get("moved_to") or last["to_id"])
        if expected is None:
            agreement_only += 1
            continue
        for node in run.node_keys:
            entry = run.listed[node].get(message_id)
            if entry is None:
                continue
            if expected in run.mailboxes[node].get(account, {}):
                want = expected
            elif (account, expected) in run.deleted_ids:
                want = run.inbox.get(account)
            else:
                agreement_only += 1
                break
            checked += 1
            rescued += want != expected
            if entry.mailbox_id != want:
                wrong += 1
                details.append({"wrong_location": message_id, "node": node, "in": entry.path, "expected": want,
                                "moves": [move["index"] for move in moves], "append_op": op["index"]})
            break
    return {"locations_checked": checked, "locations_agreement_only": agreement_only, "locations_rescued": rescued,
            "wrong_location": wrong, "details": details[:20]}


def rule_placement_winners(run):
    """Where each renamed mailbox must be (see the docstring: mailbox placements)."""
    checked, agreement_only, wrong, details = 0, 0, 0, []
    for account in sorted({op["account"] for op in run.renames}):
        renames = sorted((op for op in run.renames if op["account"] == account and op["outcome"] != "fail"),
                         key=lambda op: op["invoked"])
        before = causal_order(run, renames)
        for mailbox_id in sorted({op["id"] for op in renames}):
            node = run.node_keys[0]
            tree = run.mailboxes[node].get(account, {})
            if mailbox_id not in tree:
                continue
            own = [op for op in renames if op["id"] == mailbox_id]
            last = last_of(own, before)
            # A cycle to cut needs a rename concurrent with this one that moves a mailbox under
            # another; renames to the top level cannot make one.
            concurrent_nesting = last is not None and any(
                not before(other, last) and not before(last, other) and "/" in other["path"]
                for other in renames if other is not last)
            if last is None or "result_path" not in last or concurrent_nesting \
                    or (last["result_parent"] is not None and last["result_parent"] not in tree):
                agreement_only += 1
                continue
            checked += 1
            path, parent, _ = tree[mailbox_id]
            if parent != last["result_parent"] or path.rsplit("/", 1)[-1] != last["result_path"].rsplit("/", 1)[-1]:
                wrong += 1
                details.append({"wrong_placement": mailbox_id, "account": account, "path": path, "parent": parent,
                                "expected": [last["result_path"], last["result_parent"]], "rename_op": last["index"]})
    return {"placements_checked": checked, "placements_agreement_only": agreement_only, "wrong_placement": wrong,
            "details": details[:20]}


def account_listing(run, node, account):
    """id -> mailbox id of one account's messages in a node's final listing."""
    return {message_id: entry.mailbox_id for message_id, entry in run.listed.get(node, {}).items()
            if entry.account == account}


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
      N had acknowledged (same member) before the catch-up's pages on N began, unless an expunge
      of it may have begun before the catch-up ended; and none of the messages N had acknowledged
      expunging before it (the node holds those changes: the feed's first law). A pass begins at
      a page whose token has no cursor of N; a token taken mid-listing from N carries N's pass
      on, and the pass wraps around to the origins before its cursor (core/src/changes.rs,
      "Pages"), so a change N made since the pass began is listed before has_more is false too:
      one missing from a pass begun earlier is counted as deferred_past_has_more_false, a
      failure like missing_local (before the wrap-around it was allowed);
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
        if op["kind"] in ("flags", "expunge", "move") and op["outcome"] != "fail" and "id" in op:
            writes[op["id"]].append(op["invoked"])
    final_ends = run.final.get("feed_final", {})
    counts["clients"] = len(by_client)
    # Catch-ups after the first final one, until one listed nothing (scripts/chaos.py).
    counts["final_polls"] = sum(end.get("polls", 0) for end in final_ends.values())
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
                       for other in run.expunges.get(op["id"], []) + run.delete_may_have_destroyed(op)):
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
        # An email whose mailbox became an alias (a same-named one created earlier arrived) or was
        # deleted (the email rescued to the INBOX) is listed again by the feed although its record
        # did not change (src/service/mod.rs, account_changes): one still shown to the client in
        # a mailbox that is no longer shown is counted apart as well, and is a mismatch like any.
        shown = run.mailboxes.get(str(finals[-1]["node"]), {}).get(account, {})
        hidden = [message_id for message_id in moved if view[message_id] not in shown]
        counts["mailbox_hidden_since"] += len(hidden)
        if missing or extra or moved:
            counts["mismatches"] += 1
            details.append({"feed_mismatch": client, "account": account, "node": finals[-1]["node"],
                            "missing": missing[:20], "extra": extra[:20], "wrong_mailbox": moved[:20],
                            "counts": [len(missing), len(extra), len(moved)], "state": state})
        counts["final_view_total"] += len(view)
    return {"feed": dict(counts), "details": details[:30]}


RULES = [rule_appends, rule_resurrection, rule_stale_reads, rule_duplicates, rule_divergence, rule_flag_winners,
         rule_location_winners, rule_placement_winners, rule_feed]


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
        "divergent": sum(results[name] for name in ("divergent", "wrong_flag_winner", "wrong_location",
                                                     "wrong_placement", "mailbox_divergent", "tree_errors",
                                                     "orphans", "misplaced")),
        "divergent_emails": results["divergent"],
        "mailbox_divergent": results["mailbox_divergent"],
        "tree_errors": results["tree_errors"],
        "orphans": results["orphans"],
        "misplaced": results["misplaced"],
        "wrong_location": results["wrong_location"],
        "wrong_placement": results["wrong_placement"],
        "locations": {"checked_against_causal_order": results["locations_checked"],
                      "agreement_only": results["locations_agreement_only"],
                      "rescued_to_inbox": results["locations_rescued"]},
        "placements": {"checked_against_causal_order": results["placements_checked"],
                       "agreement_only": results["placements_agreement_only"]},
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
                 "state_not_replayed", "damaged_token_accepted", "deferred_past_has_more_false"):
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
             "orphans": 0, "mailbox_divergent": 0, "wrong_location": 0, "wrong_placement": 0, "misplaced": 0,
             "elements": collections.Counter(), "locations_checked": 0, "locations_rescued": 0,
             "placements_checked": 0,
             "runs_with_problems": [], "faults": collections.Counter(), "outcomes": collections.Counter(),
             "feed_clients": 0, "feed_calls": 0, "feed_answers": 0, "feed_410s": 0, "feed_resyncs": 0,
             "feed_mismatches": 0, "feed_created_twice": 0, "feed_missing_local": 0, "feed_final_incomplete": 0,
             "feed_updated_repeats": 0, "feed_updated_repeats_without_new_write": 0, "feed_over_limit": 0,
             "feed_deferred_past_has_more_false": 0, "feed_complete_catch_ups_holding_a_destroyed_id": 0,
             "feed_max_listing": 0, "feed_mailbox_hidden_since": 0}
    for run in runs:
        for counts in run["operations"].values():
            total["operations"] += sum(counts.values())
            total["outcomes"].update(counts)
        for key in ("acknowledged", "lost", "resurrected", "divergent", "duplicates", "corrupt", "stale_reads",
                    "orphans", "mailbox_divergent", "wrong_location", "wrong_placement", "misplaced"):
            total[key] += run.get(key, 0)
        total["elements"].update(run.get("elements", {}))
        total["locations_checked"] += run.get("locations", {}).get("checked_against_causal_order", 0)
        total["locations_rescued"] += run.get("locations", {}).get("rescued_to_inbox", 0)
        total["placements_checked"] += run.get("placements", {}).get("checked_against_causal_order", 0)
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
                          ("over_limit", "feed_over_limit"), ("mailbox_hidden_since", "feed_mailbox_hidden_since"),
                          ("deferred_past_has_more_false", "feed_deferred_past_has_more_false"),
                          ("complete_catch_ups_holding_a_destroyed_id",
                           "feed_complete_catch_ups_holding_a_destroyed_id")):
            total[name] += feed.get(key, 0)
        total["feed_max_listing"] = max(total["feed_max_listing"], feed.get("max_listing", 0))
        if run["problems"]:
            total["runs_with_problems"].append({"seed": run["seed"], "problems": run["problems"],
                                                "workdir": run.get("workdir")})
    total["faults"], total["outcomes"] = dict(total["faults"]), dict(total["outcomes"])
    total["elements"] = dict(total["elements"])
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
