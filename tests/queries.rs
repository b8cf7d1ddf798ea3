//! Local indexes answer queries near the data: every sort and page against a naive sort of the
//! same records, right after merges from a peer, after expunges and after a rebuild; counters;
//! the change log; full-text search; import of mbox and Maildir samples through a real node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mailmesh::harness::{wait_until, LocalNode};
use mailmesh::mail;
use mailmesh::model::{Flag, MailboxKey, MessageId, MessageRecord, NodeId};
use mailmesh::search::{Commit, SearchIndex};
use mailmesh::store::{Applied, Operation, SortKey, Store, StoreOptions};

const NOW: u64 = 1_767_225_600_000;

struct Sample {
    raw: Vec<u8>,
    date_millis: Option<u64>,
}

/// Realistic messages with varied names, subjects with reply prefixes, dates (some missing or
/// broken), 8-bit and encoded headers, and sizes.
fn samples(count: usize, seed: u64) -> Vec<Sample> {
    let names = [
        "Zoë Adams",
        "bob@example.org",
        "Carol Diaz",
        "\u{e9}mile Zola",
        "dave",
        "Eve O'Neil",
        "",
        "FRANK",
    ];
    let subjects = [
        "Invoice 2026-11",
        "Re: Lunch",
        "Fwd: Re: Budget",
        "AW: Termin",
        "quarterly report",
        "",
        "Re[3]: lunch",
        "Über alles",
    ];
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    (0..count)
        .map(|index| {
            let name = names[next() as usize % names.len()];
            let subject = subjects[next() as usize % subjects.len()];
            let day = 1 + next() % 28;
            let hour = next() % 24;
            let body = "x".repeat(next() as usize % 3000);
            let date_line = match index % 10 {
                0 => String::new(),
                1 => "Date: not a date\r\n".to_owned(),
                _ => format!("Date: {day:02} Oct 2026 {hour:02}:{:02}:00 +0000\r\n", index % 60),
            };
            let from_line = if name.is_empty() {
                String::new()
            } else if name.contains('@') {
                format!("From: {name}\r\n")
            } else {
                format!("From: {name} <user{index}@example.org>\r\n")
            };
            let raw = format!(
                "{from_line}To: team@example.org\r\nSubject: {subject} #{index}\r\n{date_line}Message-ID: <{index}.{seed}@example.org>\r\n\r\n{body} number {index}\r\n"
            )
            .into_bytes();
            let listing = mail::listing(&raw);
            Sample { raw, date_millis: listing.date_millis }
        })
        .collect()
}

fn append_all(store: &Store, mailbox: &MailboxKey, samples: &[Sample]) -> Vec<MessageId> {
    let operations: Vec<Operation> = samples
        .iter()
        .enumerate()
        .map(|(index, sample)| Operation::Append {
            location: None,
            unless_held_in: Vec::new(),
            mailbox: mailbox.clone(),
            raw: sample.raw.clone(),
            flags: if index % 3 == 0 { vec![Flag::Seen] } else { vec![] },
            received_millis: None,
            now_millis: NOW + (index as u64 * 7919) % 100_000,
            random: index as u128,
        })
        .collect();
    store
        .apply(operations)
        .into_iter()
        .map(|result| match result {
            Ok(Applied::Appended { id, .. }) => id,
            other => panic!("append failed: {other:?}"),
        })
        .collect()
}

/// The expected order, computed naively from the records and the parsed headers.
fn naive_order(store: &Store, mailbox: &MailboxKey, sort: SortKey, descending: bool) -> Vec<MessageId> {
    let mut entries: Vec<(Vec<u8>, MessageId)> = Vec::new();
    store
        .records_ordered(mailbox.id(), false, |record: MessageRecord| {
            if record.is_live() {
                let raw = store.blob(&record.blob).unwrap().unwrap();
                let listing = mail::listing(&raw);
                entries.push((sort.key(&record, &listing), record.id));
            }
            true
        })
        .unwrap();
    entries.sort();
    if descending {
        entries.reverse();
    }
    entries.into_iter().map(|(_, id)| id).collect()
}

fn check_every_sort(store: &Store, mailbox: &MailboxKey, context: &str) {
    for sort in SortKey::ALL {
        for descending in [false, true] {
            let expected = naive_order(store, mailbox, sort, descending);
            for (position, limit) in [
                (0, 100),
                (0, 7),
                (13, 25),
                (expected.len() / 3, 1),
                (expected.len() / 2, 50),
                (expected.len().saturating_sub(5), 100),
                (expected.len() + 3, 10),
            ] {
                let page = store.list_ids(mailbox.id(), sort, descending, position, limit).unwrap();
                let want: Vec<MessageId> = expected.iter().skip(position).take(limit).copied().collect();
                assert_eq!(
                    page, want,
                    "{context}: sort {sort:?} descending {descending} position {position} limit {limit}"
                );
            }
        }
    }
}

/// The sort key of one message as the sorts are specified, written without the code that builds
/// the indexes: From is the first From address's display name, or its address when it has none,
/// case-folded; Subject drops leading reply and forward markers ("Re:", "Fwd:", "AW:", with an
/// optional "[n]" count, repeated) and is case-folded; Date is the Date header, or the received
/// time when the header is missing or unreadable; Size is the raw length. Text compares by code
/// point after folding; an empty value sorts first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum OracleKey {
    Number(u64),
    Text(String),
}

fn header_value<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
        .map(str::trim)
}

fn oracle_key(raw: &[u8], sort: SortKey, received_millis: u64) -> OracleKey {
    let text = String::from_utf8_lossy(raw);
    match sort {
        SortKey::Received => OracleKey::Number(received_millis),
        SortKey::Size => OracleKey::Number(raw.len() as u64),
        SortKey::Date => {
            // Only the generator's own form: "DD Oct 2026 HH:MM:00 +0000".
            let parsed = header_value(&text, "Date").and_then(|value| {
                let parts: Vec<&str> = value.split_whitespace().collect();
                let [day, "Oct", "2026", time, "+0000"] = parts.as_slice() else {
                    return None;
                };
                let day: u64 = day.parse().ok()?;
                let (hour, minute) = time.split_once(':')?;
                let minute: u64 = minute.split(':').next()?.parse().ok()?;
                // 2026-10-01T00:00:00Z is 1,790,812,800 s after the epoch.
                Some(1_790_812_800_000 + ((day - 1) * 86_400 + hour.parse::<u64>().ok()? * 3_600 + minute * 60) * 1000)
            });
            OracleKey::Number(parsed.unwrap_or(received_millis))
        }
        SortKey::From => {
            let value = header_value(&text, "From").unwrap_or("");
            let shown = match value.split_once('<') {
                Some((name, _)) if !name.trim().is_empty() => name.trim(),
                Some((_, address)) => address.trim_end_matches('>'),
                None => value,
            };
            OracleKey::Text(shown.to_lowercase())
        }
        SortKey::Subject => {
            let mut subject = header_value(&text, "Subject").unwrap_or("").to_owned();
            loop {
                let lower = subject.to_lowercase();
                let marker = ["re", "fwd", "aw"].iter().find_map(|marker| {
                    let rest = lower.strip_prefix(marker)?;
                    let rest = match rest.strip_prefix('[') {
                        Some(counted) => counted
                            .trim_start_matches(|c: char| c.is_ascii_digit())
                            .strip_prefix(']')?,
                        None => rest,
                    };
                    rest.strip_prefix(':').map(|rest| lower.len() - rest.len())
                });
                match marker {
                    Some(cut) => subject = subject[cut..].trim_start().to_owned(),
                    None => break,
                }
            }
            OracleKey::Text(subject.trim().to_lowercase())
        }
    }
}

#[test]
fn every_sort_agrees_with_an_oracle_written_from_the_spec() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(directory.path(), 1);
    let mailbox = MailboxKey::new("oracle@example.org", "INBOX").unwrap();
    let samples = samples(300, 42);
    let ids = append_all(&store, &mailbox, &samples);
    let mut keys = BTreeMap::new();
    for (id, sample) in ids.iter().zip(&samples) {
        let record = store.record(mailbox.id(), *id).unwrap().unwrap();
        keys.insert(*id, (sample.raw.clone(), record.received_millis));
    }
    for sort in SortKey::ALL {
        let mut distinct = BTreeSet::new();
        for descending in [false, true] {
            let listed = store.list_ids(mailbox.id(), sort, descending, 0, 1000).unwrap();
            let mut all: Vec<MessageId> = listed.clone();
            all.sort();
            let mut want = ids.clone();
            want.sort();
            assert_eq!(all, want, "{sort:?} must list every message once");
            let order: Vec<OracleKey> = listed
                .iter()
                .map(|id| {
                    let (raw, received) = &keys[id];
                    oracle_key(raw, sort, *received)
                })
                .collect();
            for (position, pair) in order.windows(2).enumerate() {
                let in_order = if descending {
                    pair[0] >= pair[1]
                } else {
                    pair[0] <= pair[1]
                };
                assert!(
                    in_order,
                    "{sort:?} descending {descending}: position {position} has {:?} before {:?}",
                    pair[0], pair[1]
                );
            }
            distinct.extend(order);
        }
        // The samples must exercise the sort: many different keys, not one.
        assert!(distinct.len() >= 5, "{sort:?}: only {} distinct keys", distinct.len());
    }
}

/// Stores with tiny position blocks, so pages deeper than 8 come from the position cache and
/// its splits happen within a few hundred messages.
fn open(directory: &std::path::Path, node: u64) -> Store {
    let options = StoreOptions {
        position_block: 4,
        ..StoreOptions::default()
    };
    Store::open(directory, NodeId(node), options).unwrap()
}

#[test]
fn deep_pages_stay_exact_while_the_mailbox_grows_and_shrinks() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(directory.path(), 1);
    let mailbox = MailboxKey::new("deep@example.org", "INBOX").unwrap();
    let mut ids = append_all(&store, &mailbox, &samples(200, 11));
    check_every_sort(&store, &mailbox, "first fill");
    // The position cache now exists for every sort; writes must keep it exact, in batches and
    // one at a time, and blocks that grow must split.
    for round in 0..3u64 {
        let more: Vec<Sample> = samples(150, 100 + round);
        let operations: Vec<Operation> = more
            .iter()
            .enumerate()
            .map(|(index, sample)| Operation::Append {
                location: None,
                unless_held_in: Vec::new(),
                mailbox: mailbox.clone(),
                raw: sample.raw.clone(),
                flags: vec![],
                received_millis: None,
                now_millis: NOW + 200_000 * (round + 1) + index as u64,
                random: (round as u128 + 1) << 64 | index as u128,
            })
            .collect();
        for chunk in operations.chunks(1 + round as usize * 20) {
            for result in store.apply(chunk.to_vec()) {
                match result.unwrap() {
                    Applied::Appended { id, .. } => ids.push(id),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        check_every_sort(&store, &mailbox, &format!("after growth round {round}"));
        for id in ids.iter().skip(round as usize).step_by(5) {
            let _ = store.apply_one(Operation::Expunge {
                mailbox: mailbox.clone(),
                id: *id,
                now_millis: NOW + 900_000,
            });
        }
        check_every_sort(&store, &mailbox, &format!("after expunges round {round}"));
    }
    let live = store.mailbox_entry(mailbox.id()).unwrap().unwrap().live as usize;
    assert_eq!(naive_order(&store, &mailbox, SortKey::Received, false).len(), live);
    assert!(live > 300, "the mailbox should still be large, holds {live}");
}

#[test]
fn every_sort_and_page_matches_a_naive_sort_through_merges_expunges_and_rebuild() {
    let first_directory = tempfile::tempdir().unwrap();
    let second_directory = tempfile::tempdir().unwrap();
    let origin = open(first_directory.path(), 1);
    let mailbox = MailboxKey::new("alice@example.org", "INBOX").unwrap();
    let all = samples(300, 7);
    // Missing and unparseable Date headers fall back to the received time; good ones parse.
    assert_eq!((all[0].date_millis, all[1].date_millis), (None, None));
    assert!(all[2].date_millis.is_some());
    let ids = append_all(&origin, &mailbox, &all);
    check_every_sort(&origin, &mailbox, "after appends");

    // Merged in from a peer, blobs first, in reverse order and batches.
    let replica = open(second_directory.path(), 2);
    let mut operations = Vec::new();
    for id in ids.iter().rev() {
        let record = origin.record(mailbox.id(), *id).unwrap().unwrap();
        let bytes = origin.blob(&record.blob).unwrap().unwrap();
        operations.push(Operation::PutBlob {
            expected: record.blob,
            bytes,
        });
        operations.push(Operation::Merge {
            mailbox: mailbox.clone(),
            record,
            now_millis: NOW,
        });
    }
    for chunk in operations.chunks(50) {
        for result in replica.apply(chunk.to_vec()) {
            result.unwrap();
        }
    }
    check_every_sort(&replica, &mailbox, "after merges from a peer");
    let entry = replica.mailbox_entry(mailbox.id()).unwrap().unwrap();
    assert_eq!((entry.live, entry.unseen), (300, 200));

    // Expunges drop out of every index and counter at once.
    for id in ids.iter().step_by(4) {
        replica
            .apply_one(Operation::Expunge {
                mailbox: mailbox.clone(),
                id: *id,
                now_millis: NOW + 1,
            })
            .unwrap();
    }
    check_every_sort(&replica, &mailbox, "after expunges");
    let entry = replica.mailbox_entry(mailbox.id()).unwrap().unwrap();
    assert_eq!(entry.live, 225);

    // Rebuilding from the store gives the same answers.
    let records = replica.rebuild_local_indexes().unwrap();
    assert_eq!(records, 300);
    check_every_sort(&replica, &mailbox, "after rebuild");
    assert_eq!(replica.mailbox_entry(mailbox.id()).unwrap().unwrap().live, 225);
}

#[test]
fn the_change_log_names_created_updated_and_expunged_messages() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(directory.path(), 1);
    let mailbox = MailboxKey::new("carol", "Work").unwrap();
    let ids = append_all(&store, &mailbox, &samples(10, 3));
    let state = store.changes_since(mailbox.id(), 0, 1000).unwrap();
    assert_eq!(state.created.len(), 10);
    let since = state.modseq;
    store
        .apply_one(Operation::SetFlags {
            mailbox: mailbox.clone(),
            id: ids[1],
            add: vec![Flag::Flagged],
            remove: vec![],
            unless_changed_since: None,
            now_millis: NOW,
        })
        .unwrap();
    store
        .apply_one(Operation::Expunge {
            mailbox: mailbox.clone(),
            id: ids[2],
            now_millis: NOW,
        })
        .unwrap();
    let fresh = append_all(&store, &mailbox, &samples(1, 99));
    let changes = store.changes_since(mailbox.id(), since, 1000).unwrap();
    assert_eq!(changes.updated, vec![ids[1]]);
    assert_eq!(changes.expunged, vec![ids[2]]);
    assert_eq!(changes.created, fresh);
    assert!(!changes.cannot_calculate);
    assert!(
        store
            .changes_since(mailbox.id(), changes.modseq + 5, 1000)
            .unwrap()
            .cannot_calculate
    );
    assert!(store
        .changes_since(mailbox.id(), changes.modseq, 1000)
        .unwrap()
        .created
        .is_empty());
}

#[test]
fn search_finds_words_in_headers_and_bodies_of_one_mailbox_only() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(&directory.path().join("store"), 1);
    let index = SearchIndex::open(&directory.path().join("search")).unwrap();
    let inbox = MailboxKey::new("dave", "INBOX").unwrap();
    let other = MailboxKey::new("dave", "Other").unwrap();
    let mail_with = |subject: &str, body: &str| {
        format!("From: Dave <dave@example.org>\r\nTo: erin@example.org\r\nSubject: {subject}\r\n\r\n{body}\r\n")
            .into_bytes()
    };
    let append = |mailbox: &MailboxKey, raw: Vec<u8>| match store
        .apply_one(Operation::Append {
            location: None,
            unless_held_in: Vec::new(),
            mailbox: mailbox.clone(),
            raw,
            flags: vec![],
            received_millis: None,
            now_millis: NOW,
            random: 1,
        })
        .unwrap()
    {
        Applied::Appended { id, .. } => id,
        other => panic!("{other:?}"),
    };
    let invoice = append(&inbox, mail_with("Invoice for November", "Please pay."));
    let body_hit = append(&inbox, mail_with("Hello", "the invoice is attached"));
    append(&inbox, mail_with("Lunch", "pizza?"));
    append(&other, mail_with("Invoice elsewhere", "not in the inbox"));
    let hits = index
        .search(&store, inbox.id(), "invoice", SortKey::Received, false, 0, 100)
        .unwrap();
    let mut found = hits.ids.clone();
    found.sort();
    let mut expected = vec![invoice, body_hit];
    expected.sort();
    assert_eq!(
        found, expected,
        "search must be fresh right after the write and limited to the mailbox"
    );
    assert_eq!(hits.total, 2);
    assert_eq!(
        index
            .search(&store, inbox.id(), "erin@example.org", SortKey::Subject, true, 0, 100)
            .unwrap()
            .ids
            .len(),
        3
    );
    store
        .apply_one(Operation::Expunge {
            mailbox: inbox.clone(),
            id: invoice,
            now_millis: NOW,
        })
        .unwrap();
    assert_eq!(
        index
            .search(&store, inbox.id(), "invoice", SortKey::Received, false, 0, 100)
            .unwrap()
            .ids,
        vec![body_hit]
    );
    // Sorted and paged inside the index: the same order as a naive sort of the hits.
    let many = samples(60, 21);
    for sample in &many {
        append(&inbox, sample.raw.clone());
    }
    for sort in SortKey::ALL {
        for descending in [false, true] {
            let everything = index
                .search(&store, inbox.id(), "number", sort, descending, 0, 1000)
                .unwrap();
            assert_eq!(everything.total, 60);
            let mut keyed: Vec<(Vec<u8>, MessageId)> = everything
                .ids
                .iter()
                .map(|id| {
                    let record = store.record(inbox.id(), *id).unwrap().unwrap();
                    let listing = store.local_state(inbox.id(), *id).unwrap().unwrap().listing.unwrap();
                    (sort.key(&record, &listing), *id)
                })
                .collect();
            let keys: Vec<Vec<u8>> = keyed.iter().map(|(key, _)| key.clone()).collect();
            keyed.sort();
            if descending {
                keyed.reverse();
            }
            let expected: Vec<Vec<u8>> = keyed.iter().map(|(key, _)| key.clone()).collect();
            assert_eq!(keys, expected, "search sorted by {sort:?} descending {descending}");
            let page = index
                .search(&store, inbox.id(), "number", sort, descending, 10, 5)
                .unwrap();
            let page_keys: Vec<Vec<u8>> = page
                .ids
                .iter()
                .map(|id| {
                    let record = store.record(inbox.id(), *id).unwrap().unwrap();
                    let listing = store.local_state(inbox.id(), *id).unwrap().unwrap().listing.unwrap();
                    sort.key(&record, &listing)
                })
                .collect();
            assert_eq!(page_keys, keys[10..15].to_vec(), "page of a search sorted by {sort:?}");
        }
    }
    // A query that is not valid syntax is read leniently rather than refused: its words still
    // match ("number" is in every body), and its stray syntax matches nothing by itself.
    let lenient = index
        .search(&store, inbox.id(), "number (( \"", SortKey::From, false, 0, 10)
        .unwrap();
    let strict = index
        .search(&store, inbox.id(), "number", SortKey::From, false, 0, 10)
        .unwrap();
    assert!(lenient.total > 0, "the lenient query found nothing");
    assert_eq!(
        lenient.total, strict.total,
        "stray syntax changed what the word matched"
    );
    let nothing = index
        .search(
            &store,
            inbox.id(),
            "AND (( \"zzzunclosedword",
            SortKey::From,
            false,
            0,
            10,
        )
        .unwrap();
    assert_eq!(
        nothing.total, 0,
        "a malformed query of words nobody wrote matched {}",
        nothing.total
    );
}

#[test]
fn fed_but_uncommitted_search_updates_are_found_by_searches_and_replayed_after_a_crash() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(&directory.path().join("store"), 1);
    let inbox = MailboxKey::new("frank", "INBOX").unwrap();
    let ids = append_all(&store, &inbox, &samples(30, 5));
    let index = SearchIndex::open(&directory.path().join("search")).unwrap();
    let later = Commit::After(std::time::Duration::from_secs(3600));
    assert_eq!(index.update(&store, later, 10).unwrap(), 10, "at most as many as asked");
    assert_eq!(index.update(&store, later, usize::MAX).unwrap(), 20, "then the rest");
    assert_eq!(
        store.search_tasks(0, 100).unwrap().len(),
        30,
        "fed but not committed: the tasks stay queued"
    );
    // A crash now (the index dropped without a commit) loses nothing: reopened, the queue is fed
    // again, and each message is indexed once.
    drop(index);
    let index = SearchIndex::open(&directory.path().join("search")).unwrap();
    index.update(&store, later, usize::MAX).unwrap();
    let hits = index
        .search(&store, inbox.id(), "number", SortKey::Received, false, 0, 1000)
        .unwrap();
    assert_eq!(hits.total, 30, "a search commits what was fed first");
    let mut found = hits.ids.clone();
    found.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(found, expected);
    assert!(
        store.search_tasks(0, 100).unwrap().is_empty(),
        "committed tasks leave the queue"
    );
    // Replayed after a commit too: the tasks are fed once, however often update runs.
    append_all(&store, &inbox, &samples(5, 6));
    assert_eq!(index.update(&store, later, usize::MAX).unwrap(), 5);
    assert_eq!(index.update(&store, later, usize::MAX).unwrap(), 0);
    assert_eq!(index.update(&store, Commit::Now, usize::MAX).unwrap(), 0);
    assert!(store.search_tasks(0, 100).unwrap().is_empty());
    assert_eq!(
        index
            .search(&store, inbox.id(), "number", SortKey::Received, false, 0, 1000)
            .unwrap()
            .total,
        35
    );
}

#[test]
fn a_search_backlog_is_fed_and_committed_a_thousand_at_a_time() {
    let directory = tempfile::tempdir().unwrap();
    let store = open(&directory.path().join("store"), 1);
    let inbox = MailboxKey::new("gina", "INBOX").unwrap();
    assert_eq!(store.search_backlog().unwrap(), 0, "nothing written, nothing queued");
    append_all(&store, &inbox, &samples(1_200, 9));
    assert_eq!(
        store.search_backlog().unwrap(),
        1_200,
        "the metric counts every queued task"
    );
    let index = SearchIndex::open(&directory.path().join("search")).unwrap();
    let later = Commit::After(std::time::Duration::from_secs(3600));
    assert_eq!(index.update(&store, later, usize::MAX).unwrap(), 1_200);
    // The first thousand were committed before the rest was fed (tantivy's own queue never holds
    // the whole backlog); the last 200 wait for the commit interval, still queued in the store.
    assert_eq!(store.search_tasks(0, 2_000).unwrap().len(), 200);
    assert_eq!(store.search_backlog().unwrap(), 200);
    assert_eq!(
        index
            .search(&store, inbox.id(), "number", SortKey::Received, false, 0, 10)
            .unwrap()
            .total,
        1_200
    );
    assert!(store.search_tasks(0, 2_000).unwrap().is_empty());
    assert_eq!(store.search_backlog().unwrap(), 0);
}

fn write_samples_to_mbox(path: &std::path::Path, samples: &[Vec<u8>]) {
    let mut text = Vec::new();
    for raw in samples {
        text.extend_from_slice(b"From sender@example.org Sat Nov 28 10:00:00 2026\n");
        for line in raw.split(|byte| *byte == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(b"From ") {
                text.push(b'>');
            }
            text.extend_from_slice(line);
            text.push(b'\n');
        }
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn import_of_mbox_and_maildir_with_broken_mail_adds_nothing_twice() {
    let directory = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mailmesh"));
    let node = LocalNode::spawn(
        binary,
        "importer",
        &directory.path().join("node"),
        "test-import",
        &[],
        200,
        &[],
    )
    .unwrap();
    let mut messages: Vec<Vec<u8>> = samples(40, 11).into_iter().map(|sample| sample.raw).collect();
    // Malformed, 8-bit headers, non-UTF-8 charsets.
    messages.push(b"this is not a mail at all, no headers\r\n".to_vec());
    messages.push(b"Subject: caf\xe9 cr\xe8me\r\nFrom: \xff\xfe <broken@>\r\n\r\nLatin-1 bytes in headers".to_vec());
    messages.push(b"Subject: =?iso-8859-1?Q?Gr=FC=DFe?=\r\nFrom: =?koi8-r?B?7s/Xz9PUySDEzNEg18HT?= <news@example.ru>\r\nContent-Type: text/plain; charset=windows-1251\r\n\r\n\xcf\xf0\xe8\xe2\xe5\xf2".to_vec());
    let mbox = directory.path().join("sample.mbox");
    write_samples_to_mbox(&mbox, &messages);
    let import = |mailbox: &str, path: &std::path::Path| {
        let mut options = mailmesh::import::ImportOptions::new(&node.http, "importer@example.org");
        options.mailbox = mailbox.to_owned();
        mailmesh::import::import(&options, path).unwrap()
    };
    let first = import("Imported", &mbox);
    assert_eq!(first.read, messages.len() as u64);
    assert_eq!(first.failed, 0, "{first:?}");
    let distinct: std::collections::BTreeSet<&Vec<u8>> = messages.iter().collect();
    assert_eq!(first.imported, distinct.len() as u64);
    let again = import("Imported", &mbox);
    assert_eq!(
        (again.imported, again.duplicates),
        (0, messages.len() as u64),
        "a re-run adds no duplicates"
    );

    // Maildir: cur/ and new/ with a few files, one of them broken.
    let maildir = directory.path().join("Maildir");
    for folder in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(folder)).unwrap();
    }
    for (index, raw) in messages.iter().take(6).enumerate() {
        let folder = if index % 2 == 0 { "cur" } else { "new" };
        std::fs::write(maildir.join(folder).join(format!("17000000{index}.M1P1.host:2,S")), raw).unwrap();
    }
    let from_maildir = import("FromMaildir", &maildir);
    assert_eq!((from_maildir.imported, from_maildir.failed), (6, 0));
    let again = import("FromMaildir", &maildir);
    assert_eq!(again.imported, 0);

    // The HTTP listing reads the parsed headers, sorted by subject, and counts match.
    let path = format!(
        "{}/messages?sort=subject&order=asc&limit=1000",
        LocalNode::mailbox_path("importer@example.org", "Imported")
    );
    let listing = node.get(&path).unwrap().json();
    assert_eq!(listing["total"].as_u64(), Some(first.imported));
    let subjects: Vec<Vec<u8>> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| mail::subject_sort_key(item["subject"].as_str().unwrap_or_default()))
        .collect();
    let mut sorted = subjects.clone();
    sorted.sort();
    assert_eq!(subjects, sorted);
    assert!(listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|item| item["subject"] == "Gr\u{fc}\u{df}e"));
    // Search over HTTP sees the imported text.
    let search = format!(
        "{}/messages?search=number&limit=5",
        LocalNode::mailbox_path("importer@example.org", "Imported")
    );
    let found = wait_until(Duration::from_secs(10), || {
        node.get(&search)
            .map(|r| r.json()["total"].as_u64() == Some(40))
            .unwrap_or(false)
    });
    assert!(
        found.is_some(),
        "search over HTTP: {}",
        node.get(&search).unwrap().json()
    );
}

#[test]
fn heavy_clients_resync_with_the_fingerprints_peers_use() {
    let directory = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mailmesh"));
    let node = LocalNode::spawn(
        binary,
        "resync",
        &directory.path().join("node"),
        "test-resync",
        &[],
        200,
        &[],
    )
    .unwrap();
    let account = "heavy@example.org";
    let mut ids = Vec::new();
    for sample in samples(120, 5) {
        ids.push(node.append(account, "Archive/2026", &sample.raw).unwrap());
    }
    let base = LocalNode::mailbox_path(account, "Archive/2026");
    // The client's copy: every ID and state digest, in pages.
    let mut client: BTreeMap<String, String> = BTreeMap::new();
    let all = node.get(&format!("{base}/sync/ids?limit=10000")).unwrap().json();
    for entry in all["ids"].as_array().unwrap() {
        client.insert(
            entry["id"].as_str().unwrap().to_owned(),
            entry["state"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(client.len(), 120);
    // The client also remembers the range fingerprints it last saw, the whole tree.
    let fingerprints = |node: &LocalNode| -> BTreeMap<(String, String), (String, u64)> {
        let mut seen = BTreeMap::new();
        let mut pending = vec![None::<(String, String)>];
        while let Some(bounds) = pending.pop() {
            let query = match &bounds {
                Some((lo, hi)) => format!("{base}/sync?lo={lo}&hi={hi}"),
                None => format!("{base}/sync"),
            };
            let answer = node.get(&query).unwrap().json();
            seen.insert(
                (
                    answer["lo"].as_str().unwrap().to_owned(),
                    answer["hi"].as_str().unwrap().to_owned(),
                ),
                (
                    answer["fingerprint"].as_str().unwrap().to_owned(),
                    answer["count"].as_u64().unwrap(),
                ),
            );
            for range in answer["ranges"].as_array().unwrap() {
                seen.insert(
                    (
                        range["lo"].as_str().unwrap().to_owned(),
                        range["hi"].as_str().unwrap().to_owned(),
                    ),
                    (
                        range["fingerprint"].as_str().unwrap().to_owned(),
                        range["count"].as_u64().unwrap(),
                    ),
                );
                if range["count"].as_u64().unwrap() > 4 {
                    pending.push(Some((
                        range["lo"].as_str().unwrap().to_owned(),
                        range["hi"].as_str().unwrap().to_owned(),
                    )));
                }
            }
        }
        seen
    };
    let remembered = fingerprints(&node);
    let root = node.get(&format!("{base}/sync")).unwrap().json();
    assert_eq!(root["count"].as_u64(), Some(120));
    let before_root = root["fingerprint"].as_str().unwrap().to_owned();
    // One message changes. The client descends only where fingerprints moved and finds it.
    let changed = ids[57].clone();
    let response = node
        .send(
            "POST",
            &format!("{base}/messages/{changed}/flags"),
            br#"{"add":["\\Answered"]}"#,
        )
        .unwrap();
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    let mut found = Vec::new();
    let mut requests = 0;
    let mut frontier = vec![None::<(String, String)>];
    while let Some(bounds) = frontier.pop() {
        let query = match &bounds {
            Some((lo, hi)) => format!("{base}/sync?lo={lo}&hi={hi}"),
            None => format!("{base}/sync"),
        };
        requests += 1;
        let answer = node.get(&query).unwrap().json();
        for range in answer["ranges"].as_array().unwrap() {
            let key = (
                range["lo"].as_str().unwrap().to_owned(),
                range["hi"].as_str().unwrap().to_owned(),
            );
            let now = (
                range["fingerprint"].as_str().unwrap().to_owned(),
                range["count"].as_u64().unwrap(),
            );
            if remembered.get(&key) == Some(&now) {
                continue;
            }
            if now.1 <= 4 {
                requests += 1;
                let listed = node
                    .get(&format!("{base}/sync/ids?lo={}&hi={}", key.0, key.1))
                    .unwrap()
                    .json();
                for entry in listed["ids"].as_array().unwrap() {
                    let id = entry["id"].as_str().unwrap().to_owned();
                    if client.get(&id).map(String::as_str) != entry["state"].as_str() {
                        found.push(id);
                    }
                }
            } else {
                frontier.push(Some(key));
            }
        }
    }
    assert_eq!(found, vec![changed]);
    assert!(requests <= 8, "finding one change among 120 took {requests} requests");
    assert_ne!(
        node.get(&format!("{base}/sync")).unwrap().json()["fingerprint"]
            .as_str()
            .unwrap(),
        before_root
    );
    let bad = node.get(&format!("{base}/sync?lo={}&hi={}", ids[0], ids[1])).unwrap();
    assert_eq!(bad.status, 400);
}
