//! Cluster tests: real `mailmesh node` processes on 127.0.0.1 (OS-chosen ports), driven through
//! their HTTP API with the harness the demo uses.
//!
//! Every test uses its own cluster name (gossip topics are per cluster) and its own temporary
//! directory. When a test fails, its directory (each node's store and `node.log`) is kept and its
//! path printed; the panic message says, per node, the digest, the record count and which
//! messages or flags differ.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use mailmesh::harness::{digests_agree, sample_message, wait_until, LocalNode};

const LIMIT: Duration = Duration::from_secs(60);
const GOSSIP_MS: u64 = 200;
const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";
const INBOX: &str = "INBOX";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailmesh"))
}

/// A test's temporary directory; kept (and its path printed) when the test panics.
struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mailmesh-{test}-"))
            .tempdir()
            .expect("temporary directory");
        let path = dir.path().to_owned();
        Scratch { dir: Some(dir), path }
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test failed: node data and logs kept in {}", kept.display());
            }
        }
    }
}

fn spawn(scratch: &Scratch, name: &str, cluster: &str, peers: &[String], extra: &[String]) -> LocalNode {
    LocalNode::spawn(
        &binary(),
        name,
        &scratch.node_dir(name),
        cluster,
        peers,
        GOSSIP_MS,
        extra,
    )
    .unwrap_or_else(|error| panic!("starting node {name}: {error}"))
}

fn address(node: &LocalNode) -> String {
    node.listen_address()
        .unwrap_or_else(|error| panic!("listen address of {}: {error}", node.name))
}

fn peer_count(node: &LocalNode) -> usize {
    node.status()
        .map(|status| status["peers"].as_array().map(Vec::len).unwrap_or(0))
        .unwrap_or(0)
}

fn wait_for_peers(nodes: &[&LocalNode], at_least: usize) {
    if wait_until(LIMIT, || nodes.iter().all(|node| peer_count(node) >= at_least)).is_none() {
        let counts: Vec<String> = nodes
            .iter()
            .map(|node| format!("{}: {} peers", node.name, peer_count(node)))
            .collect();
        panic!(
            "the nodes did not each see {at_least} peers within {} s: {}",
            LIMIT.as_secs(),
            counts.join(", ")
        );
    }
}

fn mailbox_url(account: &str, mailbox: &str) -> String {
    LocalNode::mailbox_path(account, mailbox)
}

fn message_url(account: &str, mailbox: &str, id: &str) -> String {
    format!("{}/messages/{id}", mailbox_url(account, mailbox))
}

fn append(node: &LocalNode, account: &str, mailbox: &str, raw: &[u8]) -> String {
    node.append(account, mailbox, raw)
        .unwrap_or_else(|error| panic!("append on {}: {error}", node.name))
}

fn set_flags(node: &LocalNode, account: &str, mailbox: &str, id: &str, body: &str) {
    let path = format!("{}/flags", message_url(account, mailbox, id));
    let response = node
        .send("POST", &path, body.as_bytes())
        .unwrap_or_else(|error| panic!("flags on {}: {error}", node.name));
    assert_eq!(
        response.status,
        200,
        "flag change {body} on {} for {id} answered {}: {}",
        node.name,
        response.status,
        String::from_utf8_lossy(&response.body)
    );
}

fn expunge(node: &LocalNode, account: &str, mailbox: &str, id: &str) {
    let response = node
        .send("DELETE", &message_url(account, mailbox, id), &[])
        .unwrap_or_else(|error| panic!("expunge on {}: {error}", node.name));
    assert_eq!(
        response.status, 204,
        "expunge of {id} on {} answered {}",
        node.name, response.status
    );
}

fn raw(node: &LocalNode, account: &str, mailbox: &str, id: &str) -> (u16, Vec<u8>) {
    let response = node
        .get(&format!("{}/raw", message_url(account, mailbox, id)))
        .unwrap_or_else(|error| panic!("raw fetch on {}: {error}", node.name));
    (response.status, response.body)
}

type MailboxName = (String, String);
/// Every live message of every mailbox a node knows: id -> sorted flags.
type Snapshot = BTreeMap<MailboxName, BTreeMap<String, Vec<String>>>;

fn mailbox_names(node: &LocalNode) -> Vec<MailboxName> {
    let Ok(response) = node.get("/v1/mailboxes") else {
        return Vec::new();
    };
    response.json()["mailboxes"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|entry| {
                    (
                        entry["account"].as_str().unwrap_or_default().to_owned(),
                        entry["mailbox"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn snapshot(node: &LocalNode, mailboxes: &[MailboxName]) -> Snapshot {
    let mut all = Snapshot::new();
    for (account, mailbox) in mailboxes {
        let messages = node.messages(account, mailbox).unwrap_or_default();
        all.insert(
            (account.clone(), mailbox.clone()),
            messages
                .into_iter()
                .map(|(id, mut flags)| {
                    flags.sort();
                    (id, flags)
                })
                .collect(),
        );
    }
    all
}

fn all_mailboxes(nodes: &[&LocalNode]) -> Vec<MailboxName> {
    let set: BTreeSet<MailboxName> = nodes.iter().flat_map(|node| mailbox_names(node)).collect();
    set.into_iter().collect()
}

fn shorten<T: std::fmt::Debug>(items: &[T]) -> String {
    if items.len() <= 8 {
        format!("{items:?}")
    } else {
        format!("{:?} and {} more", &items[..8], items.len() - 8)
    }
}

/// What each node holds and where they differ: the body of every convergence panic.
fn describe(nodes: &[&LocalNode]) -> String {
    let mailboxes = all_mailboxes(nodes);
    let snapshots: Vec<Snapshot> = nodes.iter().map(|node| snapshot(node, &mailboxes)).collect();
    let mut text = String::new();
    for (node, snap) in nodes.iter().zip(&snapshots) {
        let (digest, peers) = match node.status() {
            Ok(status) => (
                status["digest"].as_str().unwrap_or("?").to_owned(),
                status["peers"].as_array().map(Vec::len).unwrap_or(0),
            ),
            Err(error) => (format!("unreachable ({error})"), 0),
        };
        let live: usize = snap.values().map(BTreeMap::len).sum();
        text.push_str(&format!(
            "  {}: digest {digest}, {} mailboxes, {live} live messages, {peers} peers, log {}\n",
            node.name,
            snap.len(),
            node.data_dir.join("node.log").display()
        ));
    }
    for mailbox in &mailboxes {
        let union: BTreeMap<&String, BTreeSet<&Vec<String>>> = snapshots
            .iter()
            .filter_map(|snap| snap.get(mailbox))
            .flat_map(|messages| messages.iter())
            .fold(BTreeMap::new(), |mut union, (id, flags)| {
                union.entry(id).or_default().insert(flags);
                union
            });
        for (node, snap) in nodes.iter().zip(&snapshots) {
            let empty = BTreeMap::new();
            let messages = snap.get(mailbox).unwrap_or(&empty);
            let missing: Vec<&String> = union
                .keys()
                .filter(|id| !messages.contains_key(**id))
                .copied()
                .collect();
            let flag_conflicts: Vec<String> = messages
                .iter()
                .filter(|(id, _)| union.get(id).is_some_and(|variants| variants.len() > 1))
                .map(|(id, flags)| format!("{id}={flags:?}"))
                .collect();
            if !missing.is_empty() || !flag_conflicts.is_empty() {
                text.push_str(&format!(
                    "  {} {:?}: {} live; lacks {} held elsewhere {}; flags that differ between nodes: {}\n",
                    node.name,
                    mailbox,
                    messages.len(),
                    missing.len(),
                    shorten(&missing),
                    shorten(&flag_conflicts)
                ));
            }
        }
    }
    text
}

/// Waits until every node reports the same digest and `extra` holds; panics with a description
/// of what diverged otherwise.
fn converge(step: &str, nodes: &[&LocalNode], mut extra: impl FnMut() -> bool) -> Duration {
    match wait_until(LIMIT, || digests_agree(nodes) && extra()) {
        Some(elapsed) => elapsed,
        None => panic!(
            "{step}: no convergence within {} s (digests agree: {})\n{}",
            LIMIT.as_secs(),
            digests_agree(nodes),
            describe(nodes)
        ),
    }
}

fn ids_of(node: &LocalNode, account: &str, mailbox: &str) -> BTreeSet<String> {
    node.messages(account, mailbox)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

fn flags_of(node: &LocalNode, account: &str, mailbox: &str, id: &str) -> Option<Vec<String>> {
    node.messages(account, mailbox)
        .ok()?
        .into_iter()
        .find(|(other, _)| other == id)
        .map(|(_, mut flags)| {
            flags.sort();
            flags
        })
}

fn set_difference(left: &BTreeSet<String>, right: &BTreeSet<String>) -> Vec<String> {
    left.difference(right).cloned().collect()
}

fn is_json_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json["error"].as_str().map(|message| !message.is_empty()))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent appends
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_appends_on_three_nodes_all_survive() {
    let scratch = Scratch::new("appends");
    let cluster = "test-appends";
    let a = spawn(&scratch, "a", cluster, &[], &[]);
    let seed = address(&a);
    let b = spawn(&scratch, "b", cluster, &[seed.clone()], &[]);
    let c = spawn(&scratch, "c", cluster, &[seed], &[]);
    let nodes = [&a, &b, &c];
    wait_for_peers(&nodes, 2);

    let per_node = 25;
    let appended: Vec<(String, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                scope.spawn(move || {
                    (0..per_node)
                        .map(|index| {
                            let raw = sample_message(
                                &format!("{}@example.org", node.name),
                                &format!("Concurrent {index} from {}", node.name),
                                &format!("Body {index} written on node {}.", node.name),
                            );
                            (append(node, ALICE, INBOX, &raw), raw)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("append thread"))
            .collect()
    });
    let expected: BTreeSet<String> = appended.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(expected.len(), 3 * per_node, "the appends returned duplicate IDs");

    converge("75 concurrent appends", &nodes, || {
        nodes.iter().all(|node| ids_of(node, ALICE, INBOX) == expected)
    });
    for node in nodes {
        let listed = ids_of(node, ALICE, INBOX);
        assert_eq!(
            listed,
            expected,
            "{} lists the wrong IDs: lacks {:?}, extra {:?}",
            node.name,
            set_difference(&expected, &listed),
            set_difference(&listed, &expected)
        );
        // A sample of 10 per node, spread over the three origins.
        for (id, bytes) in appended.iter().step_by(appended.len() / 10).take(10) {
            let (status, body) = raw(node, ALICE, INBOX, id);
            assert_eq!(status, 200, "raw {id} on {} answered {status}", node.name);
            assert!(
                body == *bytes,
                "raw {id} on {} differs from the appended bytes ({} vs {} bytes)",
                node.name,
                body.len(),
                bytes.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Conflicting flag changes
// ---------------------------------------------------------------------------------------------

#[test]
fn conflicting_flag_changes_end_identical_with_the_higher_stamp_winning() {
    let scratch = Scratch::new("flags");
    let cluster = "test-flags";
    // a's clock runs 30 s ahead, so every stamp a issues for a concurrent change is higher than
    // b's (b's clock only catches up on what it has already seen from a): a's change must win.
    let a = LocalNode::spawn_with_environment(
        &binary(),
        "a",
        &scratch.node_dir("a"),
        cluster,
        &[],
        GOSSIP_MS,
        &[],
        &[("MAILMESH_CLOCK_OFFSET_MS", "30000")],
    )
    .unwrap_or_else(|error| panic!("starting node a: {error}"));
    let seed = address(&a);
    let b = spawn(&scratch, "b", cluster, &[seed.clone()], &[]);
    let c = spawn(&scratch, "c", cluster, &[seed], &[]);
    let nodes = [&a, &b, &c];
    wait_for_peers(&nodes, 2);

    let ids: Vec<String> = (0..7)
        .map(|index| {
            append(
                &a,
                ALICE,
                INBOX,
                &sample_message(BOB, &format!("Flag me {index}"), "Conflicts ahead."),
            )
        })
        .collect();
    converge("appends for the flag test", &nodes, || {
        nodes.iter().all(|node| ids_of(node, ALICE, INBOX).len() == ids.len())
    });

    // Concurrent and decided by stamps, not by arrival. b and c go down; a (clock 30 s ahead)
    // adds \Flagged to ids 0-2 and removes it from ids 3-4, which b had flagged. Then a is frozen
    // and b comes back alone and does the opposite, later in real time but with lower stamps (b's
    // clock has only caught up with what it saw from a before). After the heal a's changes must
    // win on every node: last-writer-wins by stamp, not by which write arrived last.
    for id in &ids[3..5] {
        set_flags(&b, ALICE, INBOX, id, r#"{"add":["\\Flagged"]}"#);
    }
    converge("pre-flagging", &nodes, || {
        ids[3..5].iter().all(|id| {
            nodes.iter().all(|node| {
                flags_of(node, ALICE, INBOX, id).is_some_and(|flags| flags.contains(&"\\Flagged".to_owned()))
            })
        })
    });
    let mut b = b;
    let mut c = c;
    b.kill();
    c.kill();
    for id in &ids[..3] {
        set_flags(&a, ALICE, INBOX, id, r#"{"add":["\\Flagged"]}"#);
    }
    for id in &ids[3..5] {
        set_flags(&a, ALICE, INBOX, id, r#"{"remove":["\\Flagged"]}"#);
    }
    a.pause();
    b.restart().expect("restarting b alone");
    for id in &ids[..3] {
        set_flags(&b, ALICE, INBOX, id, r#"{"remove":["\\Flagged"]}"#);
    }
    for id in &ids[3..5] {
        set_flags(&b, ALICE, INBOX, id, r#"{"add":["\\Flagged"]}"#);
    }
    a.resume();
    c.restart().expect("restarting c");
    let nodes = [&a, &b, &c];
    wait_for_peers(&nodes, 2);
    let snapshots = || {
        nodes
            .iter()
            .map(|node| node.messages(ALICE, INBOX).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    converge("the heal after concurrent flag changes", &nodes, || {
        let all = snapshots();
        all.iter().all(|list| list == &all[0])
    });
    let all = snapshots();
    for (node, list) in nodes.iter().zip(&all) {
        assert_eq!(
            list, &all[0],
            "after convergence {} shows flags {list:?}, {} shows {:?}",
            node.name, a.name, all[0]
        );
    }
    // Agreement is not enough (LWW can converge to the wrong value): check the winner.
    for (index, id) in ids[..5].iter().enumerate() {
        let want = index < 3;
        for node in nodes {
            let flags = flags_of(node, ALICE, INBOX, id).unwrap_or_default();
            assert_eq!(
                flags.contains(&"\\Flagged".to_owned()),
                want,
                "{} shows {id} with flags {flags:?}; a's change had the higher stamp and should win",
                node.name
            );
        }
    }

    // Sequential: the strictly later write wins, in both directions between a and b.
    for (setter, clearer, id) in [(&a, &b, &ids[5]), (&b, &a, &ids[6])] {
        set_flags(setter, ALICE, INBOX, id, r#"{"add":["\\Seen"]}"#);
        converge(&format!("{} sets \\Seen on {id}", setter.name), &nodes, || {
            nodes
                .iter()
                .all(|node| flags_of(node, ALICE, INBOX, id).is_some_and(|flags| flags.contains(&"\\Seen".to_owned())))
        });
        set_flags(clearer, ALICE, INBOX, id, r#"{"remove":["\\Seen"]}"#);
        converge(&format!("{} then clears \\Seen on {id}", clearer.name), &nodes, || {
            nodes
                .iter()
                .all(|node| flags_of(node, ALICE, INBOX, id).is_some_and(|flags| !flags.contains(&"\\Seen".to_owned())))
        });
    }
    // The mailbox counters agree too.
    let entries: Vec<serde_json::Value> = nodes
        .iter()
        .map(|node| node.get(&mailbox_url(ALICE, INBOX)).expect("mailbox").json())
        .collect();
    for (node, entry) in nodes.iter().zip(&entries) {
        assert_eq!(entry["count"], 7, "{} mailbox entry {entry}", node.name);
        assert_eq!(
            entry, &entries[0],
            "{} mailbox entry {entry} differs from {}'s {}",
            node.name, a.name, entries[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Expunge while a node is down
// ---------------------------------------------------------------------------------------------

#[test]
fn an_expunged_message_never_comes_back() {
    let scratch = Scratch::new("expunge");
    let cluster = "test-expunge";
    let a = spawn(&scratch, "a", cluster, &[], &[]);
    let seed = address(&a);
    let b = spawn(&scratch, "b", cluster, &[seed.clone()], &[]);
    let mut c = spawn(&scratch, "c", cluster, &[seed], &[]);
    wait_for_peers(&[&a, &b, &c], 2);

    let ids: Vec<String> = (0..5)
        .map(|index| {
            append(
                &a,
                ALICE,
                INBOX,
                &sample_message(BOB, &format!("Doomed {index}"), "Will one come back?"),
            )
        })
        .collect();
    converge("5 appends", &[&a, &b, &c], || {
        [&a, &b, &c].iter().all(|node| ids_of(node, ALICE, INBOX).len() == 5)
    });

    c.kill();
    expunge(&a, ALICE, INBOX, &ids[0]);
    set_flags(&b, ALICE, INBOX, &ids[1], r#"{"add":["\\Answered"]}"#);
    converge("expunge and flag while c is down", &[&a, &b], || {
        [&a, &b]
            .iter()
            .all(|node| !ids_of(node, ALICE, INBOX).contains(&ids[0]))
            && flags_of(&a, ALICE, INBOX, &ids[1]).is_some_and(|flags| flags.contains(&"\\Answered".to_owned()))
    });

    c.restart().expect("restarting c");
    let nodes = [&a, &b, &c];
    converge("c restarted", &nodes, || true);
    let check_gone = |when: &str| {
        for node in nodes {
            let response = node.get(&message_url(ALICE, INBOX, &ids[0])).expect("get message");
            assert_eq!(
                response.status, 404,
                "{when}: expunged {} answered {} on {}",
                ids[0], response.status, node.name
            );
            let (status, _) = raw(node, ALICE, INBOX, &ids[0]);
            assert_eq!(
                status, 404,
                "{when}: raw of expunged {} answered {status} on {}",
                ids[0], node.name
            );
            let listed = ids_of(node, ALICE, INBOX);
            assert!(
                !listed.contains(&ids[0]),
                "{when}: expunged {} is listed on {}",
                ids[0],
                node.name
            );
            assert_eq!(listed.len(), 4, "{when}: {} lists {listed:?}", node.name);
            assert!(
                flags_of(node, ALICE, INBOX, &ids[1]).is_some_and(|flags| flags.contains(&"\\Answered".to_owned())),
                "{when}: the flag set while c was down is missing on {}",
                node.name
            );
            let entry = node.get(&mailbox_url(ALICE, INBOX)).expect("mailbox").json();
            assert_eq!(entry["count"], 4, "{when}: mailbox entry on {}: {entry}", node.name);
        }
    };
    check_gone("after convergence");
    // Not a sleep: wait until every node has taken in at least five more gossip messages (digest
    // rounds from its peers), so a tombstone that was about to be resurrected by anti-entropy
    // would have been.
    let gossip = |node: &LocalNode| node.metric_sum("mailmesh_gossip_messages_total").unwrap_or(0.0);
    let before: Vec<f64> = nodes.iter().map(|node| gossip(node)).collect();
    assert!(
        wait_until(LIMIT, || nodes
            .iter()
            .zip(&before)
            .all(|(node, seen)| gossip(node) >= seen + 5.0))
        .is_some(),
        "gossip stopped after convergence\n{}",
        describe(&nodes)
    );
    assert!(
        digests_agree(&nodes),
        "digests diverged again after five more gossip rounds\n{}",
        describe(&nodes)
    );
    check_gone("five gossip rounds later");
}

// ---------------------------------------------------------------------------------------------
// 4. SIGKILL after acknowledged appends
// ---------------------------------------------------------------------------------------------

#[test]
fn a_killed_node_keeps_acknowledged_appends_and_catches_up() {
    let scratch = Scratch::new("durability");
    let cluster = "test-durability";
    let a = spawn(&scratch, "a", cluster, &[], &[]);
    let mut b = spawn(&scratch, "b", cluster, &[address(&a)], &[]);
    wait_for_peers(&[&a, &b], 1);

    let mut acknowledged: Vec<(String, Vec<u8>)> = Vec::new();
    for index in 0..20 {
        let raw = sample_message(
            BOB,
            &format!("Durable {index}"),
            &format!("Acknowledged append {index}."),
        );
        acknowledged.push((append(&b, ALICE, INBOX, &raw), raw));
    }
    b.kill(); // SIGKILL right after the last 201

    let mut written_on_a: Vec<String> = Vec::new();
    for index in 0..10 {
        written_on_a.push(append(
            &a,
            ALICE,
            INBOX,
            &sample_message(BOB, &format!("While b is down {index}"), "Catch up."),
        ));
    }

    // First, b alone (no peers, and a cannot reach it on its new port): what it acknowledged
    // must be on its own disk, not merely re-fetched from a.
    {
        let alone = spawn(&scratch, "b", cluster, &[], &[]);
        let listed = ids_of(&alone, ALICE, INBOX);
        let lost: Vec<&String> = acknowledged
            .iter()
            .map(|(id, _)| id)
            .filter(|id| !listed.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "b lost {} acknowledged appends across SIGKILL: {lost:?}",
            lost.len()
        );
        for (id, bytes) in &acknowledged {
            let (status, body) = raw(&alone, ALICE, INBOX, id);
            assert!(
                status == 200 && body == *bytes,
                "b's blob of acknowledged {id} after SIGKILL: status {status}, {} bytes",
                body.len()
            );
        }
        assert_eq!(peer_count(&alone), 0, "the isolated b has peers");
    } // killed here

    b.restart().expect("restarting b");
    let mut expected: BTreeSet<String> = acknowledged.iter().map(|(id, _)| id.clone()).collect();
    expected.extend(written_on_a.iter().cloned());
    let nodes = [&a, &b];
    converge("b catches up after restart", &nodes, || {
        nodes.iter().all(|node| ids_of(node, ALICE, INBOX) == expected)
    });
    for node in nodes {
        assert_eq!(ids_of(node, ALICE, INBOX).len(), 30, "{} message count", node.name);
    }
    for id in &written_on_a {
        let (status, _) = raw(&b, ALICE, INBOX, id);
        assert_eq!(
            status, 200,
            "raw {id} (written on a while b was down) on b answered {status}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. An empty node joining later
// ---------------------------------------------------------------------------------------------

#[test]
fn an_empty_node_joining_later_receives_every_mailbox_and_blob() {
    let scratch = Scratch::new("join");
    let cluster = "test-join";
    let one = spawn(&scratch, "one", cluster, &[], &[]);
    let two = spawn(&scratch, "two", cluster, &[address(&one)], &[]);
    wait_for_peers(&[&one, &two], 1);

    let mailboxes: [(&str, &str); 5] = [
        (ALICE, INBOX),
        (ALICE, "Archive/2026"),
        (ALICE, "Sent Items"),
        (BOB, INBOX),
        (BOB, "Projects/mesh & sync"),
    ];
    let mut written: Vec<(usize, String, Vec<u8>)> = Vec::new();
    for index in 0..40 {
        let mailbox = index % mailboxes.len();
        let (account, name) = mailboxes[mailbox];
        // Every 7th message is larger than one RocksDB blob-file threshold (4 KiB).
        let body = if index % 7 == 0 {
            "large body line\r\n".repeat(400)
        } else {
            format!("Small body {index}.")
        };
        let raw = sample_message(BOB, &format!("Joining {index} in {name}"), &body);
        let node = if index % 2 == 0 { &one } else { &two };
        written.push((mailbox, append(node, account, name, &raw), raw));
    }
    converge("40 appends on two nodes", &[&one, &two], || {
        [&one, &two].iter().all(|node| {
            mailboxes
                .iter()
                .map(|(account, name)| ids_of(node, account, name).len())
                .sum::<usize>()
                == 40
        })
    });
    for (index, (mailbox, id, _)) in written.iter().enumerate() {
        let (account, name) = mailboxes[*mailbox];
        match index % 5 {
            1 => set_flags(&one, account, name, id, r#"{"add":["\\Flagged","$Work"]}"#),
            3 => set_flags(&two, account, name, id, r#"{"add":["\\Seen"]}"#),
            _ => {}
        }
    }
    let (expunged_mailbox, expunged_id, _) = written[2].clone();
    expunge(
        &two,
        mailboxes[expunged_mailbox].0,
        mailboxes[expunged_mailbox].1,
        &expunged_id,
    );
    converge("flags and an expunge", &[&one, &two], || true);

    let three = spawn(&scratch, "three", cluster, &[address(&two)], &[]);
    let nodes = [&one, &two, &three];
    converge("the empty node joins", &nodes, || true);

    let list = |node: &LocalNode| -> Vec<serde_json::Value> {
        let mut entries = node.get("/v1/mailboxes").expect("mailboxes").json()["mailboxes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        entries.sort_by_key(|entry| (entry["account"].to_string(), entry["mailbox"].to_string()));
        entries
    };
    let reference = list(&one);
    let joined = list(&three);
    // Five mailboxes written to, and the two parents their paths created ("Archive", "Projects").
    assert_eq!(reference.len(), 7, "node one lists {reference:?}");
    assert_eq!(joined, reference, "the new node's mailboxes differ from node one's");
    for (account, name) in mailboxes {
        let on_one = node_flags(&one, account, name);
        let on_three = node_flags(&three, account, name);
        assert_eq!(
            on_three, on_one,
            "{account}/{name}: messages and flags differ between one and three"
        );
    }
    for (mailbox, id, bytes) in &written {
        let (account, name) = mailboxes[*mailbox];
        let (status, body) = raw(&three, account, name, id);
        if *id == expunged_id {
            assert_eq!(status, 404, "the expunged {id} is served by the new node");
        } else {
            assert_eq!(
                status, 200,
                "raw {account}/{name}/{id} on the new node answered {status}"
            );
            assert!(
                body == *bytes,
                "raw {account}/{name}/{id} on the new node differs ({} vs {} bytes)",
                body.len(),
                bytes.len()
            );
        }
    }
}

fn node_flags(node: &LocalNode, account: &str, mailbox: &str) -> BTreeMap<String, Vec<String>> {
    node.messages(account, mailbox)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, mut flags)| {
            flags.sort();
            (id, flags)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 6. Two groups introduced late
// ---------------------------------------------------------------------------------------------

/// The `/ip4/127.0.0.1/tcp/<port>` part of a `/p2p/`-suffixed listen address.
fn without_peer_id(address: &str) -> String {
    address.split("/p2p/").next().unwrap_or(address).to_owned()
}

#[test]
fn two_groups_started_apart_converge_once_introduced() {
    let scratch = Scratch::new("groups");
    let cluster = "test-groups";
    let a = spawn(&scratch, "a", cluster, &[], &[]);
    let a_address = address(&a);
    let b = spawn(&scratch, "b", cluster, &[a_address.clone()], &[]);
    let mut c = spawn(&scratch, "c", cluster, &[], &[]);
    let c_address = address(&c);
    let d = spawn(&scratch, "d", cluster, &[c_address.clone()], &[]);
    wait_for_peers(&[&a, &b, &c, &d], 1);

    let group_one = [&a, &b];
    let group_two = [&c, &d];
    let mut ids_one = Vec::new();
    let mut ids_two = Vec::new();
    for index in 0..6 {
        ids_one.push(append(
            group_one[index % 2],
            ALICE,
            INBOX,
            &sample_message(BOB, &format!("Group one {index}"), "One."),
        ));
        ids_two.push(append(
            group_two[index % 2],
            ALICE,
            INBOX,
            &sample_message(BOB, &format!("Group two {index}"), "Two."),
        ));
    }
    for index in 0..3 {
        append(
            &a,
            ALICE,
            "Only in group one",
            &sample_message(BOB, &format!("G1 private {index}"), "One."),
        );
        append(
            &d,
            BOB,
            "Only in group two",
            &sample_message(BOB, &format!("G2 private {index}"), "Two."),
        );
    }
    converge("group one internally", &group_one, || {
        ids_of(&b, ALICE, INBOX).len() == 6
    });
    converge("group two internally", &group_two, || {
        ids_of(&c, ALICE, INBOX).len() == 6
    });
    set_flags(&b, ALICE, INBOX, &ids_one[0], r#"{"add":["\\Flagged"]}"#);
    set_flags(&c, ALICE, INBOX, &ids_two[1], r#"{"add":["\\Seen","$Label"]}"#);
    expunge(&d, ALICE, INBOX, &ids_two[2]);
    converge("group one after a flag change", &group_one, || {
        flags_of(&a, ALICE, INBOX, &ids_one[0]).is_some_and(|flags| flags == ["\\Flagged"])
    });
    converge("group two after a flag change and an expunge", &group_two, || {
        flags_of(&d, ALICE, INBOX, &ids_two[1]).is_some_and(|flags| flags.len() == 2)
            && !ids_of(&c, ALICE, INBOX).contains(&ids_two[2])
    });
    assert_ne!(
        a.digest().unwrap(),
        c.digest().unwrap(),
        "the two groups agree before they were introduced"
    );
    assert_eq!(
        peer_count(&a),
        1,
        "group one is already linked to group two\n{}",
        describe(&[&a, &b, &c, &d])
    );

    // The union, as each group sees it before the introduction.
    let mut expected: Snapshot = Snapshot::new();
    for node in [&a, &c] {
        for (mailbox, messages) in snapshot(node, &mailbox_names(node)) {
            expected.entry(mailbox).or_default().extend(messages);
        }
    }

    // Introduce: c restarts (same data dir, so same identity) with a as an extra peer. It keeps
    // its old TCP port, as a deployed node would, so that d's redials reach it again.
    c.kill();
    let c = spawn(
        &scratch,
        "c",
        cluster,
        &[],
        &[
            "--peer".into(),
            a_address,
            "--listen".into(),
            without_peer_id(&c_address),
        ],
    );
    let nodes = [&a, &b, &c, &d];
    let mailboxes: Vec<MailboxName> = expected.keys().cloned().collect();
    converge("the groups introduced", &nodes, || {
        nodes.iter().all(|node| snapshot(node, &mailboxes) == expected)
    });
    for node in nodes {
        let snap = snapshot(node, &all_mailboxes(&nodes));
        assert_eq!(
            snap, expected,
            "{} does not hold exactly the union of both groups",
            node.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. HTTP errors
// ---------------------------------------------------------------------------------------------

#[test]
fn http_api_errors_are_json_with_fitting_status() {
    let scratch = Scratch::new("http");
    let max_bytes = 2048;
    let config = scratch.path.join("node.toml");
    std::fs::write(&config, format!("max_message_bytes = {max_bytes}\n")).expect("writing the config file");
    let node = spawn(
        &scratch,
        "solo",
        "test-http",
        &[],
        &["--config".into(), config.display().to_string()],
    );
    let id = append(&node, ALICE, INBOX, &sample_message(BOB, "Errors", "Here."));
    let inbox = mailbox_url(ALICE, INBOX);
    let unknown_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

    let check = |method: &str, path: &str, body: &[u8], expected: u16| {
        let response = node
            .send(method, path, body)
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
        let text = String::from_utf8_lossy(&response.body);
        assert_eq!(
            response.status, expected,
            "{method} {path} answered {} ({text}), expected {expected}",
            response.status
        );
        assert!(
            is_json_error(&response.body),
            "{method} {path} answered {expected} without a JSON error body: {text:?}"
        );
    };
    let flags = |message: &str| format!("{inbox}/messages/{message}/flags");

    // 400: bad input.
    check("POST", &flags(&id), br#"{"add":["\\Bogus"]}"#, 400);
    check("POST", &flags(&id), br#"{"add":["has space"]}"#, 400);
    check("POST", &flags(&id), b"not json", 400);
    check("GET", &format!("{inbox}/messages/not-a-message-id"), &[], 400);
    check("GET", &format!("{inbox}/messages/01ARZ3NDEKTSV4RRFFQ69G5FAU"), &[], 400); // U is not Crockford
    check("GET", &format!("{inbox}/messages/81ARZ3NDEKTSV4RRFFQ69G5FAV"), &[], 400); // above 128 bits
    check("DELETE", &format!("{inbox}/messages/x"), &[], 400);
    check("GET", &format!("{inbox}/messages?limit=5000"), &[], 400);
    check("GET", &format!("{inbox}/messages?order=sideways"), &[], 400);
    check("GET", &format!("{inbox}/messages?sort=shoe-size"), &[], 400);
    check("POST", &format!("{inbox}/messages"), &[], 400);
    check("POST", &format!("{}/messages", mailbox_url(" alice", INBOX)), b"x", 400);

    // 404: unknown mailboxes and messages.
    check("GET", &format!("{inbox}/messages/{unknown_id}"), &[], 404);
    check("GET", &format!("{inbox}/messages/{unknown_id}/raw"), &[], 404);
    check("DELETE", &format!("{inbox}/messages/{unknown_id}"), &[], 404);
    check("POST", &flags(unknown_id), br#"{"add":["\\Seen"]}"#, 404);
    check("GET", &mailbox_url(ALICE, "No such mailbox"), &[], 404);
    // Every account has an INBOX, so another account's INBOX answers an empty listing; its
    // other mailboxes do not exist.
    check(
        "GET",
        &format!("{}/messages", mailbox_url("nobody@example.org", "Work")),
        &[],
        404,
    );
    check(
        "PATCH",
        &format!("/v1/accounts/{}/mailboxes/Nowhere", "alice%40example.org"),
        br#"{"name":"Elsewhere"}"#,
        404,
    );
    check(
        "POST",
        "/v1/accounts/alice%40example.org/mailboxes",
        br#"{"name":"INBOX"}"#,
        409,
    );
    check(
        "POST",
        "/v1/accounts/alice%40example.org/mailboxes",
        br#"{"name":"Bad/ padded"}"#,
        400,
    );

    // Expunged messages are gone for every route.
    expunge(&node, ALICE, INBOX, &id);
    check("GET", &format!("{inbox}/messages/{id}"), &[], 404);
    check("GET", &format!("{inbox}/messages/{id}/raw"), &[], 404);
    check("DELETE", &format!("{inbox}/messages/{id}"), &[], 404);
    check("POST", &flags(&id), br#"{"add":["\\Seen"]}"#, 404);

    // 413 above max_message_bytes (set through the config file); exactly the limit is accepted.
    let at_limit = vec![b'x'; max_bytes];
    let response = node
        .send("POST", &format!("{inbox}/messages"), &at_limit)
        .expect("append at the limit");
    assert_eq!(
        response.status, 201,
        "an append of exactly {max_bytes} bytes answered {}",
        response.status
    );
    check("POST", &format!("{inbox}/messages"), &vec![b'x'; max_bytes + 1], 413);
    check("POST", &format!("{inbox}/messages"), &vec![b'x'; 4 * max_bytes], 413);
}

/// The module doc of src/api.rs promises `{"error": ...}` for every error, including requests that
/// axum's extractors refuse (a query parameter of the wrong type) and unknown routes.
#[test]
fn query_rejections_are_json_too() {
    let scratch = Scratch::new("http-rejections");
    let node = spawn(&scratch, "solo", "test-http-rejections", &[], &[]);
    append(&node, ALICE, INBOX, &sample_message(BOB, "Rejections", "Here."));
    for query in ["limit=abc", "position=-1"] {
        let path = format!("{}/messages?{query}", mailbox_url(ALICE, INBOX));
        let response = node.get(&path).expect("list");
        assert_eq!(response.status, 400, "GET {path}");
        assert!(
            is_json_error(&response.body),
            "GET {path} answered {}",
            String::from_utf8_lossy(&response.body)
        );
    }
    let response = node.get("/v1/no-such-thing").expect("unknown route");
    assert_eq!(response.status, 404);
    assert!(
        is_json_error(&response.body),
        "unknown route answered {}",
        String::from_utf8_lossy(&response.body)
    );
    let response = node.send("PUT", "/v1/status", b"x").expect("wrong method");
    assert_eq!(response.status, 405);
    assert!(
        is_json_error(&response.body),
        "wrong method answered {}",
        String::from_utf8_lossy(&response.body)
    );
}

/// A client of the account change feed: what it believes the account holds.
#[derive(Default)]
struct FeedClient {
    state: Option<String>,
    known: BTreeSet<String>,
}

/// One call's answer: (created, updated, destroyed) IDs.
type FeedPage = (Vec<String>, Vec<String>, Vec<String>);

impl FeedClient {
    /// Reads every page of changes from `node` and applies it; panics if an ID is reported as
    /// created twice (RFC 8620: a client may see an ID in "updated" it knows, never a second
    /// creation).
    fn catch_up(&mut self, node: &LocalNode, account: &str) -> FeedPage {
        let mut page: FeedPage = Default::default();
        loop {
            let mut path = format!("/v1/accounts/{}/changes?limit=3", account.replace('@', "%40"));
            if let Some(state) = &self.state {
                path.push_str(&format!("&since={state}"));
            }
            let response = node
                .get(&path)
                .unwrap_or_else(|error| panic!("changes on {}: {error}", node.name));
            assert_eq!(
                response.status,
                200,
                "changes on {}: {}",
                node.name,
                String::from_utf8_lossy(&response.body)
            );
            let answer: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            let ids = |key: &str| -> Vec<String> {
                answer[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|item| item.get("id").unwrap_or(item).as_str().unwrap().to_owned())
                    .collect()
            };
            for id in ids("created") {
                assert!(
                    self.known.insert(id.clone()),
                    "{id} was reported as created twice (last from {})",
                    node.name
                );
                page.0.push(id);
            }
            for id in ids("updated") {
                self.known.insert(id.clone());
                page.1.push(id);
            }
            for id in ids("destroyed") {
                self.known.remove(&id);
                page.2.push(id);
            }
            self.state = Some(answer["state"].as_str().unwrap().to_owned());
            if !answer["has_more"].as_bool().unwrap() {
                return page;
            }
        }
    }
}

#[test]
fn a_change_state_from_one_node_carries_on_at_another() {
    let scratch = Scratch::new("feed");
    let cluster = "feed-test";
    let a = spawn(&scratch, "a", cluster, &[], &[]);
    let b = spawn(&scratch, "b", cluster, &[address(&a)], &[]);
    wait_for_peers(&[&a, &b], 1);
    let mut hopper = FeedClient::default();
    let mut stayer = FeedClient::default();
    let mut truth = BTreeSet::new();
    let live = |node: &LocalNode| {
        ids_of(node, ALICE, INBOX)
            .union(&ids_of(node, ALICE, "Work"))
            .cloned()
            .collect::<BTreeSet<_>>()
    };

    // Step 1: writes on both nodes; the hopper reads from a.
    let mut on_a: Vec<String> = (0..4)
        .map(|index| {
            append(
                &a,
                ALICE,
                INBOX,
                &sample_message("carol@example.net", &format!("a{index}"), "x"),
            )
        })
        .collect();
    let on_b: Vec<String> = (0..3)
        .map(|index| {
            append(
                &b,
                ALICE,
                "Work",
                &sample_message("dave@example.net", &format!("b{index}"), "y"),
            )
        })
        .collect();
    truth.extend(on_a.iter().cloned().chain(on_b.iter().cloned()));
    converge("step 1", &[&a, &b], || live(&a) == truth);
    let (created, _, _) = hopper.catch_up(&a, ALICE);
    assert_eq!(created.iter().cloned().collect::<BTreeSet<_>>(), truth, "step 1 from a");
    stayer.catch_up(&a, ALICE);

    // Step 2: a flag change made on b to a message from a, an expunge on a, a new message on b;
    // the hopper now reads from b.
    set_flags(&b, ALICE, INBOX, &on_a[0], r#"{"add":["\\Seen"]}"#);
    expunge(&a, ALICE, INBOX, &on_a[1]);
    let newer = append(&b, ALICE, "Work", &sample_message("dave@example.net", "b3", "z"));
    truth.remove(&on_a[1]);
    truth.insert(newer.clone());
    converge("step 2", &[&a, &b], || live(&b) == truth);
    let (created, updated, destroyed) = hopper.catch_up(&b, ALICE);
    assert_eq!(created, vec![newer.clone()], "step 2 from b: created");
    assert!(
        updated.contains(&on_a[0]),
        "step 2 from b: the flag change on {} is missing from {updated:?}",
        on_a[0]
    );
    assert_eq!(destroyed, vec![on_a[1].clone()], "step 2 from b: destroyed");
    stayer.catch_up(&a, ALICE);

    // Step 3: more writes; the hopper goes back to a.
    set_flags(&a, ALICE, "Work", &on_b[2], r#"{"add":["\\Flagged"]}"#);
    on_a.push(append(
        &a,
        ALICE,
        INBOX,
        &sample_message("carol@example.net", "a4", "w"),
    ));
    truth.insert(on_a[4].clone());
    converge("step 3", &[&a, &b], || live(&a) == truth);
    let (created, updated, _) = hopper.catch_up(&a, ALICE);
    assert!(created.contains(&on_a[4]), "step 3 from a: {created:?}");
    assert!(
        updated.contains(&on_b[2]),
        "step 3 from a: the flag change on {} is missing from {updated:?}",
        on_b[2]
    );
    stayer.catch_up(&a, ALICE);

    // Both clients end with exactly the account's messages.
    assert_eq!(hopper.known, truth, "the client that moved between nodes");
    assert_eq!(stayer.known, truth, "the client that stayed on a");

    // A state that is not one of ours is refused with 410, so the client resyncs.
    let response = a
        .get(&format!(
            "/v1/accounts/{}/changes?since=m1garbage",
            ALICE.replace('@', "%40")
        ))
        .unwrap();
    assert_eq!(response.status, 410, "{}", String::from_utf8_lossy(&response.body));
    assert!(is_json_error(&response.body));
}

// ---------------------------------------------------------------------------------------------
// 9. Mailboxes as replicated objects
// ---------------------------------------------------------------------------------------------

fn account_path(account: &str) -> String {
    format!("/v1/accounts/{}", account.replace('@', "%40"))
}

fn mailbox_write(node: &LocalNode, method: &str, path: &str, body: &str, expected: u16) -> serde_json::Value {
    let response = node
        .send(method, path, body.as_bytes())
        .unwrap_or_else(|error| panic!("{method} {path} on {}: {error}", node.name));
    assert_eq!(
        response.status,
        expected,
        "{method} {path} {body} on {} answered {}: {}",
        node.name,
        response.status,
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

/// (path, id, role) of every mailbox of an account, and the email IDs each one lists.
fn tree_of(node: &LocalNode, account: &str) -> BTreeMap<String, (String, Option<String>, BTreeSet<String>)> {
    let response = node
        .get(&format!("{}/mailboxes", account_path(account)))
        .unwrap_or_else(|error| panic!("mailboxes of {}: {error}", node.name));
    let mut tree = BTreeMap::new();
    for entry in response.json()["mailboxes"].as_array().cloned().unwrap_or_default() {
        let name = entry["mailbox"].as_str().unwrap_or_default().to_owned();
        let id = entry["id"].as_str().unwrap_or_default().to_owned();
        let role = entry["role"].as_str().map(str::to_owned);
        let ids = ids_of(node, account, &name);
        tree.insert(name, (id, role, ids));
    }
    tree
}

#[test]
fn mailbox_writes_made_apart_merge_by_the_laws_once_the_nodes_meet() {
    let scratch = Scratch::new("mailboxes");
    let cluster = "test-mailboxes";
    let a = spawn(&scratch, "a", cluster, &[], &[]);
    let a_address = address(&a);
    let mut b = spawn(&scratch, "b", cluster, &[a_address.clone()], &[]);
    wait_for_peers(&[&a, &b], 1);
    let account = account_path(ALICE);
    for name in ["X", "Y", "Old"] {
        mailbox_write(
            &a,
            "POST",
            &format!("{account}/mailboxes"),
            &format!(r#"{{"name":"{name}"}}"#),
            201,
        );
    }
    let shared = append(&a, ALICE, INBOX, &sample_message(BOB, "Shared", "Both sites know me."));
    converge("before the split", &[&a, &b], || {
        tree_of(&b, ALICE).len() == 4 && ids_of(&b, ALICE, INBOX).contains(&shared)
    });
    let x_id = tree_of(&a, ALICE)["X"].0.clone();

    // Apart: b restarts on another port with no peers, so neither can reach the other.
    b.kill();
    let b = spawn(&scratch, "b", cluster, &[], &[]);
    let work_a = append(&a, ALICE, "Work", &sample_message(BOB, "Work at a", "Site a."));
    let work_b = append(&b, ALICE, "Work", &sample_message(BOB, "Work at b", "Site b."));
    mailbox_write(
        &a,
        "POST",
        &format!("{account}/emails/{shared}/move"),
        r#"{"mailbox":"X"}"#,
        200,
    );
    // b's move must carry the later stamp. a's stamp is at most a's wall clock when it answered
    // (no skew here, no later stamp seen), and both nodes read this machine's clock: so b's move
    // is made once the clock shows a later millisecond than the one a answered in.
    let answered = wall_millis();
    while wall_millis() <= answered {
        std::thread::yield_now();
    }
    mailbox_write(
        &b,
        "POST",
        &format!("{account}/emails/{shared}/move"),
        r#"{"mailbox":"Y"}"#,
        200,
    );
    let deleted = mailbox_write(&a, "DELETE", &format!("{account}/mailboxes/Old"), "", 200);
    assert_eq!(deleted["destroyed"], 0);
    let rescued = append(
        &b,
        ALICE,
        "Old",
        &sample_message(BOB, "Into Old", "Delivered as a deletes it."),
    );
    mailbox_write(
        &a,
        "PATCH",
        &format!("{account}/mailboxes/X"),
        r#"{"name":"Renamed","role":"archive"}"#,
        200,
    );
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());

    // Together again.
    let mut b = b;
    b.kill();
    let b = spawn(&scratch, "b", cluster, &[a_address], &[]);
    let expected_names = ["INBOX", "Renamed", "Work", "Y"];
    converge("after the nodes meet", &[&a, &b], || {
        let (left, right) = (tree_of(&a, ALICE), tree_of(&b, ALICE));
        left == right && left.keys().map(String::as_str).eq(expected_names)
    });
    let tree = tree_of(&a, ALICE);
    assert_eq!(
        tree["Work"].2,
        BTreeSet::from([work_a.clone(), work_b.clone()]),
        "two sites creating Work apart see one Work holding both sites' messages"
    );
    assert_eq!(
        tree["Y"].2,
        BTreeSet::from([shared.clone()]),
        "concurrent moves end in the later one everywhere"
    );
    assert!(tree["Renamed"].2.is_empty());
    assert_eq!(tree["Renamed"].0, x_id, "a rename keeps the mailbox's ID");
    assert_eq!(tree["Renamed"].1.as_deref(), Some("archive"));
    assert!(
        tree["INBOX"].2.contains(&rescued),
        "a delivery made into a mailbox deleted concurrently is shown in the INBOX"
    );
    assert!(!tree["INBOX"].2.contains(&shared));
}

/// This machine's wall clock in milliseconds since the Unix epoch, as the nodes read it.
fn wall_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}
