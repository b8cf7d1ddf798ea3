//! The RocksDB store: atomic operations, the trie kept in step with the records, reconciliation
//! between two real stores, and durability of acknowledged appends across kill -9.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;

use mailmesh::crdt;
use mailmesh::merkle::{MemoryTree, Prefix, StoredDepth, TreeView};
use mailmesh::model::{BlobHash, Flag, MailboxKey, MessageId, MessageRecord, NodeId, Stamp};
use mailmesh::store::{Applied, CommitQueue, Operation, Space, Store, StoreError, StoreOptions};
use mailmesh::sync::{self, Outcome, SyncLimits};

const NOW: u64 = 1_767_225_600_000;

fn inbox() -> MailboxKey {
    MailboxKey::new("alice@example.org", "INBOX").unwrap()
}

fn mail(index: usize) -> Vec<u8> {
    format!("From: bob@example.org\r\nTo: alice@example.org\r\nSubject: note {index}\r\nMessage-ID: <{index}@example.org>\r\n\r\nHello number {index}.\r\n")
        .into_bytes()
}

fn open(path: &std::path::Path, node: u64) -> Store {
    Store::open(path, NodeId(node), StoreOptions::default()).expect("open store")
}

fn append(store: &Store, mailbox: &MailboxKey, index: usize) -> MessageId {
    match store.apply_one(Operation::Append {
        location: None,
        unless_held_in: Vec::new(),
        mailbox: mailbox.clone(),
        raw: mail(index),
        flags: vec![],
        received_millis: None,
        now_millis: NOW + index as u64,
        random: index as u128 * 7919,
    }) {
        Ok(Applied::Appended { id, .. }) => id,
        other => panic!("append failed: {other:?}"),
    }
}

/// Gives `to` a record of `from` the way a pull does: its blob (when `from` has it), then the record.
fn copy_record(from: &Store, to: &Store, mailbox: &MailboxKey, record: MessageRecord) {
    mailmesh::harness::pull_record(from, to, mailbox, record, NOW).unwrap();
}

/// The store's trie must equal a memory trie built from its records.
fn assert_tree_matches_records(store: &Store, mailbox: &MailboxKey) {
    let mut model = MemoryTree::new(StoredDepth::MAILBOX);
    let mut live = 0;
    let mut unseen = 0;
    store
        .records_ordered(mailbox.id(), false, |record| {
            model.insert(record.id.0, crdt::state_hash(&record));
            if record.is_live() {
                live += 1;
                if !record.has_flag(&Flag::Seen) {
                    unseen += 1;
                }
            }
            true
        })
        .unwrap();
    let tree = store.tree(Space::Mailbox(mailbox.id()));
    assert_eq!(tree.aggregate(Prefix::ROOT).unwrap(), model.root());
    for (key, _) in model.iter().take(20) {
        for depth in [1, 6, 12, 13, 20, 32] {
            let prefix = Prefix::of(*key, depth);
            assert_eq!(
                tree.aggregate(prefix).unwrap(),
                model.aggregate(prefix).unwrap(),
                "at {prefix:?}"
            );
        }
    }
    // The store reads a node's children in one scan; they must equal the model's, in the stored
    // levels, across the stored depth and below it.
    for (key, _) in model.iter().step_by(7).take(12) {
        for depth in (0..=14).chain([20, 31, 32]) {
            let prefix = Prefix::of(*key, depth);
            assert_eq!(
                tree.child_aggregates(prefix).unwrap(),
                model.child_aggregates(prefix).unwrap(),
                "children of {prefix:?}"
            );
        }
    }
    let directory = store.tree(Space::Directory);
    for depth in 0..=7 {
        let prefix = Prefix::of(mailbox.id().0, depth);
        let one_by_one: Vec<_> = (0..16)
            .map(|index| directory.aggregate(prefix.child(index).unwrap()).unwrap())
            .collect();
        assert_eq!(
            directory.child_aggregates(prefix).unwrap().to_vec(),
            one_by_one,
            "directory {prefix:?}"
        );
    }
    let entry = store.mailbox_entry(mailbox.id()).unwrap().unwrap();
    assert_eq!((entry.live, entry.unseen), (live, unseen));
    assert_eq!(entry.root.0, model.root().root_hash());
}

#[test]
fn appends_flags_and_expunges_keep_the_tree_and_counters_in_step() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(directory.path(), 1);
    let mailbox = inbox();
    let ids: Vec<MessageId> = (0..200).map(|index| append(&store, &mailbox, index)).collect();
    let raw = store.blob(&BlobHash::of(&mail(3))).unwrap().unwrap();
    assert_eq!(raw, mail(3));
    for id in ids.iter().step_by(3) {
        store
            .apply_one(Operation::SetFlags {
                mailbox: mailbox.clone(),
                id: *id,
                add: vec![Flag::Seen, "$Work".parse().unwrap()],
                remove: vec![],
                unless_changed_since: None,
                now_millis: NOW + 1000,
            })
            .unwrap();
    }
    for id in ids.iter().step_by(7) {
        store
            .apply_one(Operation::Expunge {
                mailbox: mailbox.clone(),
                id: *id,
                now_millis: NOW + 2000,
            })
            .unwrap();
    }
    assert_tree_matches_records(&store, &mailbox);
    // An expunged message refuses flag changes, and an unknown one is reported as such.
    let refused = store.apply_one(Operation::SetFlags {
        mailbox: mailbox.clone(),
        id: ids[0],
        add: vec![Flag::Flagged],
        remove: vec![],
        unless_changed_since: None,
        now_millis: NOW + 3000,
    });
    assert!(matches!(refused, Err(StoreError::Expunged(_))), "{refused:?}");
    let unknown = store.apply_one(Operation::Expunge {
        mailbox: mailbox.clone(),
        id: MessageId(5),
        now_millis: NOW,
    });
    assert!(matches!(unknown, Err(StoreError::NotFound { .. })), "{unknown:?}");
}

#[test]
fn digests_and_roots_are_independent_of_arrival_order() {
    let first_directory = tempfile::tempdir().unwrap();
    let second_directory = tempfile::tempdir().unwrap();
    let source = open(first_directory.path(), 1);
    let mailboxes: Vec<MailboxKey> = (0..5)
        .map(|index| MailboxKey::new("carol", &format!("Folder {index}")).unwrap())
        .collect();
    let mut records = Vec::new();
    for index in 0..300 {
        let mailbox = &mailboxes[index % mailboxes.len()];
        let id = append(&source, mailbox, index);
        if index % 4 == 0 {
            source
                .apply_one(Operation::SetFlags {
                    mailbox: mailbox.clone(),
                    id,
                    add: vec![Flag::Answered],
                    remove: vec![],
                    unless_changed_since: None,
                    now_millis: NOW + 5000,
                })
                .unwrap();
        }
        records.push((mailbox.clone(), id));
    }
    // Copy the records into another store in reverse order, in batches, through Merge.
    let copy = open(second_directory.path(), 2);
    let operations: Vec<Operation> = records
        .iter()
        .rev()
        .map(|(mailbox, id)| Operation::Merge {
            mailbox: mailbox.clone(),
            record: source.record(mailbox.id(), *id).unwrap().unwrap(),
            now_millis: NOW + 6000,
        })
        .collect();
    for chunk in operations.chunks(37) {
        for result in copy.apply(chunk.to_vec()) {
            result.unwrap();
        }
    }
    assert_eq!(copy.digest().unwrap(), source.digest().unwrap());
    for mailbox in &mailboxes {
        assert_eq!(
            copy.mailbox_root(mailbox.id()).unwrap(),
            source.mailbox_root(mailbox.id()).unwrap()
        );
        assert_tree_matches_records(&copy, mailbox);
    }
}

#[test]
fn records_from_peers_with_far_future_stamps_are_refused_and_leave_the_store_unchanged() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(directory.path(), 1);
    let mailbox = inbox();
    let id = append(&store, &mailbox, 1);
    let digest_before = store.digest().unwrap();
    let clock_before = store.clock();
    let mut hostile = store.record(mailbox.id(), id).unwrap().unwrap();
    crdt::apply_flag(
        &mut hostile,
        Flag::Seen,
        true,
        Stamp {
            time: u64::MAX,
            node: NodeId(66),
        },
    );
    let result = store.apply_one(Operation::Merge {
        mailbox: mailbox.clone(),
        record: hostile,
        now_millis: NOW,
    });
    assert!(matches!(result, Err(StoreError::Clock(_))), "{result:?}");
    assert_eq!(store.digest().unwrap(), digest_before);
    assert_eq!(store.clock(), clock_before);
    // A record whose immutable part conflicts is refused too.
    let mut forged = store.record(mailbox.id(), id).unwrap().unwrap();
    forged.size += 1;
    let result = store.apply_one(Operation::Merge {
        mailbox,
        record: forged,
        now_millis: NOW,
    });
    assert!(matches!(result, Err(StoreError::Merge(_))), "{result:?}");
    assert_eq!(store.digest().unwrap(), digest_before);
    // A blob whose bytes do not match its hash is refused.
    let result = store.apply_one(Operation::PutBlob {
        expected: BlobHash::of(b"one"),
        bytes: b"two".to_vec(),
    });
    assert!(matches!(result, Err(StoreError::BlobMismatch { .. })), "{result:?}");
    assert!(!store.has_blob(&BlobHash::of(b"one")).unwrap());
}

/// Runs reconciliation between two real stores for one space and returns both outcomes.
fn reconcile_stores(a: &Store, b: &Store, space: Space) -> (Outcome, Outcome) {
    let limits = SyncLimits::default();
    let (a_tree, b_tree) = (a.tree(space), b.tree(space));
    let mut outgoing = sync::initial(&a_tree, &limits).unwrap();
    let (mut a_needs, mut b_needs) = (Outcome::default(), Outcome::default());
    let mut a_turn = false;
    let mut messages = 0;
    while !outgoing.is_empty() {
        messages += 1;
        assert!(messages < 70);
        let incoming = sync::decode(&sync::encode(&outgoing), &limits).unwrap();
        let (reply, outcome) = if a_turn {
            sync::respond(&a_tree, &incoming, &limits).unwrap()
        } else {
            sync::respond(&b_tree, &incoming, &limits).unwrap()
        };
        if a_turn {
            a_needs.extend(outcome)
        } else {
            b_needs.extend(outcome)
        }
        outgoing = reply;
        a_turn = !a_turn;
    }
    a_needs.normalize();
    b_needs.normalize();
    (a_needs, b_needs)
}

fn pull_into(needer: &Store, source: &Store, mailbox: &MailboxKey, needs: &Outcome) {
    let mut records: Vec<MessageRecord> = needs
        .need_keys
        .iter()
        .filter_map(|key| source.record(mailbox.id(), MessageId(*key)).unwrap())
        .collect();
    for prefix in &needs.need_prefixes {
        let (low, high) = prefix.bounds();
        records.extend(
            source
                .records_in_range(mailbox.id(), MessageId(low), MessageId(high), usize::MAX)
                .unwrap(),
        );
    }
    let mut operations = Vec::new();
    for record in records {
        if !needer.has_blob(&record.blob).unwrap() {
            let bytes = source.blob(&record.blob).unwrap().unwrap();
            operations.push(Operation::PutBlob {
                expected: record.blob,
                bytes,
            });
        }
        operations.push(Operation::Merge {
            mailbox: mailbox.clone(),
            record,
            now_millis: NOW + 10_000,
        });
    }
    for result in needer.apply(operations) {
        result.unwrap();
    }
}

#[test]
fn two_stores_find_differing_mailboxes_then_differing_messages() {
    let first_directory = tempfile::tempdir().unwrap();
    let second_directory = tempfile::tempdir().unwrap();
    let a = open(first_directory.path(), 1);
    let b = open(second_directory.path(), 2);
    let mailboxes: Vec<MailboxKey> = (0..40)
        .map(|index| MailboxKey::new("dave", &format!("Box {index}")).unwrap())
        .collect();
    // Shared history: both hold the same records.
    for index in 0..400 {
        let mailbox = &mailboxes[index % mailboxes.len()];
        let id = append(&a, mailbox, index);
        copy_record(&a, &b, mailbox, a.record(mailbox.id(), id).unwrap().unwrap());
    }
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // Divergence: each side appends to a few mailboxes, and b changes a flag in another.
    append(&a, &mailboxes[3], 1000);
    append(&b, &mailboxes[3], 1001);
    append(&b, &mailboxes[17], 1002);
    let flagged = b
        .records_in_range(mailboxes[25].id(), MessageId(0), MessageId(u128::MAX), 1)
        .unwrap()[0]
        .id;
    b.apply_one(Operation::SetFlags {
        mailbox: mailboxes[25].clone(),
        id: flagged,
        add: vec![Flag::Flagged],
        remove: vec![],
        unless_changed_since: None,
        now_millis: NOW + 20,
    })
    .unwrap();
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());

    let (a_needs, b_needs) = reconcile_stores(&a, &b, Space::Directory);
    let mut differing: Vec<u128> = a_needs.need_keys.iter().chain(&b_needs.need_keys).copied().collect();
    differing.sort();
    differing.dedup();
    let mut expected: Vec<u128> = [3, 17, 25].iter().map(|index| mailboxes[*index].id().0).collect();
    expected.sort();
    assert_eq!(
        differing, expected,
        "the directory session must name exactly the differing mailboxes"
    );

    for mailbox in [&mailboxes[3], &mailboxes[17], &mailboxes[25]] {
        let (a_needs, b_needs) = reconcile_stores(&a, &b, Space::Mailbox(mailbox.id()));
        pull_into(&a, &b, mailbox, &a_needs);
        pull_into(&b, &a, mailbox, &b_needs);
    }
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert!(a
        .record(mailboxes[25].id(), flagged)
        .unwrap()
        .unwrap()
        .has_flag(&Flag::Flagged));
    assert_eq!(a.mailbox_entry(mailboxes[3].id()).unwrap().unwrap().live, 12);
}

#[test]
fn group_commit_serves_many_concurrent_writers() {
    let directory = tempfile::tempdir().unwrap();
    let store = Arc::new(open(directory.path(), 1));
    let queue = CommitQueue::start(store.clone(), 256);
    let mailbox = inbox();
    let threads: Vec<_> = (0..16)
        .map(|writer| {
            let queue = queue.clone();
            let mailbox = mailbox.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|index| {
                        let n = writer * 100 + index;
                        match queue.submit_blocking(Operation::Append {
                            location: None,
                            unless_held_in: Vec::new(),
                            mailbox: mailbox.clone(),
                            raw: mail(n),
                            flags: vec![],
                            received_millis: None,
                            now_millis: NOW,
                            random: n as u128,
                        }) {
                            Ok(Applied::Appended { id, .. }) => id,
                            other => panic!("{other:?}"),
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids: Vec<MessageId> = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400, "every append got its own ID");
    assert_tree_matches_records(&store, &mailbox);
}

/// Child side of the kill test: appends forever, printing each acknowledged ID after it is durable.
#[test]
#[ignore = "run by acknowledged_appends_survive_kill_9 as a child process"]
fn child_appends_until_killed() {
    let Ok(path) = std::env::var("MAILMESH_KILL_TEST_DIR") else {
        return;
    };
    let store = open(std::path::Path::new(&path), 1);
    let mailbox = inbox();
    let mut stdout = std::io::stdout();
    for index in 0.. {
        let id = append(&store, &mailbox, index);
        writeln!(stdout, "ACK {id}").unwrap();
        stdout.flush().unwrap();
    }
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let directory = tempfile::tempdir().unwrap();
    let mut acknowledged: Vec<MessageId> = Vec::new();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_appends_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MAILMESH_KILL_TEST_DIR", directory.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reader = BufReader::new(child.stdout.take().unwrap());
        let target = 150 + round * 40;
        let mut seen = 0;
        for line in reader.lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("ACK ") {
                acknowledged.push(id.parse().unwrap());
                seen += 1;
                if seen == target {
                    // SIGKILL mid-stream: the child is still appending.
                    child.kill().unwrap();
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(seen, target, "child stopped early in round {round}");
        let store = open(directory.path(), 1);
        for id in &acknowledged {
            let record = store.record(inbox().id(), *id).unwrap();
            let record = record.unwrap_or_else(|| panic!("acknowledged {id} lost after kill -9 in round {round}"));
            let blob = store
                .blob(&record.blob)
                .unwrap()
                .expect("blob of an acknowledged append");
            assert_eq!(BlobHash::of(&blob), record.blob);
        }
        assert_tree_matches_records(&store, &inbox());
    }
}

#[test]
fn tombstones_past_the_horizon_are_collected_and_not_taken_back() {
    let first_directory = tempfile::tempdir().unwrap();
    let second_directory = tempfile::tempdir().unwrap();
    let day: u64 = 86_400_000;
    let a = open(first_directory.path(), 1);
    let b = open(second_directory.path(), 2);
    let mailbox = inbox();
    let ids: Vec<MessageId> = (0..20).map(|index| append(&a, &mailbox, index)).collect();
    for id in &ids {
        copy_record(&a, &b, &mailbox, a.record(mailbox.id(), *id).unwrap().unwrap());
    }
    for id in &ids[..5] {
        a.apply_one(Operation::Expunge {
            mailbox: mailbox.clone(),
            id: *id,
            now_millis: NOW,
        })
        .unwrap();
        let tombstone = a.record(mailbox.id(), *id).unwrap().unwrap();
        b.apply_one(Operation::Merge {
            mailbox: mailbox.clone(),
            record: tombstone,
            now_millis: NOW,
        })
        .unwrap();
    }
    // Not yet past the horizon: nothing is collected.
    assert_eq!(a.collect_tombstones(NOW + 29 * day, 100).unwrap(), 0);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // Past it: both replicas collect the same tombstones and agree again.
    let later = NOW + 31 * day;
    assert_eq!(a.collect_tombstones(later, 100).unwrap(), 5);
    assert_eq!(b.collect_tombstones(later, 100).unwrap(), 5);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert!(a.record(mailbox.id(), ids[0]).unwrap().is_none());
    assert_tree_matches_records(&a, &mailbox);
    let entry = a.mailbox_entry(mailbox.id()).unwrap().unwrap();
    assert_eq!((entry.records, entry.live), (15, 15));
    // A peer offering an old tombstone for a message this node no longer has: ignored.
    let mut old_tombstone = MessageRecord::new(ids[0], BlobHash::of(&mail(0)), mail(0).len() as u64, NOW, NodeId(1));
    old_tombstone.expunged = Some(Stamp {
        time: mailmesh::crdt::physical_time(NOW),
        node: NodeId(1),
    });
    let digest = a.digest().unwrap();
    a.apply_one(Operation::Merge {
        mailbox: mailbox.clone(),
        record: old_tombstone,
        now_millis: later,
    })
    .unwrap();
    assert_eq!(a.digest().unwrap(), digest, "a collected tombstone came back");
    // But an old expunge still kills a live copy this node holds.
    let live = a.record(mailbox.id(), ids[10]).unwrap().unwrap();
    let mut killed = live.clone();
    killed.expunged = Some(Stamp {
        time: mailmesh::crdt::physical_time(NOW),
        node: NodeId(2),
    });
    a.apply_one(Operation::Merge {
        mailbox: mailbox.clone(),
        record: killed,
        now_millis: later,
    })
    .unwrap();
    assert!(!a.record(mailbox.id(), ids[10]).unwrap().unwrap().is_live());
    assert_eq!(a.collect_tombstones(later, 100).unwrap(), 1);
    assert_tree_matches_records(&a, &mailbox);
}

#[test]
fn tombstones_every_member_acknowledged_are_collected_before_the_horizon() {
    let first_directory = tempfile::tempdir().unwrap();
    let second_directory = tempfile::tempdir().unwrap();
    let a = open(first_directory.path(), 1);
    let b = open(second_directory.path(), 2);
    let mailbox = inbox();
    let ids: Vec<MessageId> = (0..12).map(|index| append(&a, &mailbox, index)).collect();
    let copy = |record: MessageRecord| copy_record(&a, &b, &mailbox, record);
    for id in &ids {
        copy(a.record(mailbox.id(), *id).unwrap().unwrap());
    }
    for id in &ids[..4] {
        a.apply_one(Operation::Expunge {
            mailbox: mailbox.clone(),
            id: *id,
            now_millis: NOW,
        })
        .unwrap();
        copy(a.record(mailbox.id(), *id).unwrap().unwrap());
    }
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // Without a cut, a day later nothing goes (the horizon is 30 days).
    let day_later = NOW + 86_400_000;
    assert_eq!(a.collect_tombstones(day_later, 100).unwrap(), 0);
    // Both members acknowledged everything expunged before NOW + 1 s: both collect the same four.
    let cut = NOW + 1_000;
    assert!(a.acknowledge_tombstones_before(cut).unwrap());
    assert!(b.acknowledge_tombstones_before(cut).unwrap());
    assert!(!a.acknowledge_tombstones_before(cut - 1).unwrap(), "the cut moved back");
    assert_eq!(a.collect_tombstones(day_later, 100).unwrap(), 4);
    assert_eq!(b.collect_tombstones(day_later, 100).unwrap(), 4);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert_tree_matches_records(&a, &mailbox);
    assert_eq!(a.mailbox_entry(mailbox.id()).unwrap().unwrap().records, 8);
    // The cut survives a restart, and a collected tombstone offered again is not taken back.
    let tombstone = {
        let mut record = MessageRecord::new(ids[0], BlobHash::of(&mail(0)), mail(0).len() as u64, NOW, NodeId(1));
        record.expunged = Some(Stamp {
            time: mailmesh::crdt::physical_time(NOW + 10),
            node: NodeId(1),
        });
        record
    };
    drop(a);
    let a = open(first_directory.path(), 1);
    assert_eq!(a.acknowledged_before(), cut);
    let digest = a.digest().unwrap();
    a.apply_one(Operation::Merge {
        mailbox: mailbox.clone(),
        record: tombstone,
        now_millis: day_later,
    })
    .unwrap();
    assert_eq!(a.digest().unwrap(), digest, "a collected tombstone came back");
    // A later expunge is not covered by the cut and stays until the next one.
    a.apply_one(Operation::Expunge {
        mailbox: mailbox.clone(),
        id: ids[5],
        now_millis: NOW + 5_000,
    })
    .unwrap();
    assert_eq!(a.collect_tombstones(day_later, 100).unwrap(), 0);
    assert!(a.record(mailbox.id(), ids[5]).unwrap().is_some());
}

/// Rewrites the format marker of a closed store, as another build would have left it; `None`
/// removes it, as every build before the marker did.
fn set_format_marker(path: &std::path::Path, format: Option<u64>) {
    let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), path, &families).unwrap();
    let meta = db.cf_handle("meta").unwrap();
    match format {
        Some(format) => db.put_cf(&meta, b"format", format.to_be_bytes()).unwrap(),
        None => db.delete_cf(&meta, b"format").unwrap(),
    }
}

#[test]
fn a_store_of_another_format_is_refused_at_open_with_what_to_do() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("store");
    // A new store takes this build's format, and opens again.
    {
        let store = open(&path, 1);
        append(&store, &inbox(), 0);
    }
    drop(open(&path, 1));
    // A store written before the marker existed (data, no marker) is format 1.
    set_format_marker(&path, None);
    let refusal = Store::open(&path, NodeId(1), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(
        matches!(
            refusal,
            StoreError::Format {
                found: 1,
                expected: mailmesh::store::STORE_FORMAT,
                ..
            }
        ),
        "{refusal:?}"
    );
    let message = refusal.to_string();
    assert!(
        message.contains(&format!(
            "store at {} has format 1, this build reads format {}",
            path.display(),
            mailmesh::store::STORE_FORMAT
        )),
        "{message}"
    );
    assert!(
        message.contains("older mailmesh") && message.contains("empty"),
        "{message}"
    );
    // An older marker says the same; a newer one says to run a newer build. Nothing is changed.
    // Format 2 (before records carried their creation stamp and the account change log) too.
    for older in 1..mailmesh::store::STORE_FORMAT {
        set_format_marker(&path, Some(older));
        let refusal = Store::open(&path, NodeId(1), StoreOptions::default());
        assert!(
            matches!(&refusal, Err(StoreError::Format { found, .. }) if *found == older),
            "format {older}: {:?}",
            refusal.err()
        );
    }
    set_format_marker(&path, Some(mailmesh::store::STORE_FORMAT + 1));
    let newer = Store::open(&path, NodeId(1), StoreOptions::default())
        .err()
        .expect("refused");
    assert!(newer.to_string().contains("newer mailmesh"), "{newer}");
    // With its own format back, the store opens with its message intact.
    set_format_marker(&path, Some(mailmesh::store::STORE_FORMAT));
    let store = open(&path, 1);
    assert_eq!(store.digest().unwrap().count, 1);
}
