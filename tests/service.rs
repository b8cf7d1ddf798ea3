//! The mail service over a real RocksDB store, its group commit and the full-text index, with
//! time and randomness passed in: what every protocol (HTTP, LMTP, and later JMAP and IMAP) will
//! get from it, and the errors it answers with.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mailmesh::accounts::{Accounts, Password, RateLimits};
use mailmesh::environment::Environment;
use mailmesh::metrics::NodeMetrics;
use mailmesh::model::{Flag, MailboxKey, MessageId, NodeId};
use mailmesh::search::SearchIndex;
use mailmesh::service::{
    Delivery, MailService, MailboxTarget, MailboxUpdate, Notice, Query, ServiceError, ServiceParts, SortKey,
};
use mailmesh::store::{CommitQueue, Store, StoreOptions};

/// 2026-06-01T00:00:00Z.
const NOW: u64 = 1_780_272_000_000;

/// Made with `doveadm pw -s SHA512-CRYPT -p secret` (Dovecot 2.3.19).
const SECRET_HASH: &str = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.";

/// A clock that moves only when the test says so, and a counter for randomness.
struct TestEnvironment {
    now: AtomicU64,
    random: AtomicU64,
}

impl Environment for TestEnvironment {
    fn now_millis(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn random(&self) -> u128 {
        u128::from(self.random.fetch_add(7919, Ordering::SeqCst))
    }
}

struct Fixture {
    service: MailService,
    store: Arc<Store>,
    _directory: tempfile::TempDir,
}

fn fixture(accounts: Option<&str>, max_message_bytes: u64) -> Fixture {
    fixture_on(1, NOW, accounts, max_message_bytes)
}

/// A fixture for node `node` whose clock stands at `now`.
fn fixture_on(node: u64, now: u64, accounts: Option<&str>, max_message_bytes: u64) -> Fixture {
    let directory = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(
            &directory.path().join("store"),
            NodeId(node),
            StoreOptions {
                max_message_bytes,
                sync_writes: false,
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    let queue = CommitQueue::start(store.clone(), 64);
    let search = Arc::new(SearchIndex::open(&directory.path().join("search")).unwrap());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    let accounts = accounts.map(|text| {
        let path = directory.path().join("accounts");
        std::fs::write(&path, text).unwrap();
        Arc::new(Accounts::open(&path, RateLimits::default()).unwrap())
    });
    let service = MailService::new(ServiceParts {
        store: store.clone(),
        queue,
        search,
        accounts,
        environment: Arc::new(TestEnvironment {
            now: AtomicU64::new(now),
            random: AtomicU64::new(1),
        }),
        metrics,
        max_message_bytes,
    });
    Fixture {
        service,
        store,
        _directory: directory,
    }
}

fn delivery(account: &str, mailbox: &str, raw: &[u8]) -> Delivery {
    Delivery {
        account: account.into(),
        mailbox: MailboxTarget::PathOrCreate(mailbox.into()),
        raw: raw.to_vec(),
        flags: vec![],
        received_millis: None,
        skip_duplicate: false,
    }
}

fn inbox(service: &MailService, account: &str) -> mailmesh::model::MailboxId {
    service.find_mailbox(account, "INBOX").unwrap()
}

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!("From: carol@example.net\r\nSubject: {subject}\r\nDate: Mon, 1 Jun 2026 09:00:00 +0000\r\n\r\n{body}\r\n")
        .into_bytes()
}

#[tokio::test]
async fn a_delivery_keeps_its_flags_date_and_bytes_and_a_duplicate_is_skipped() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let raw = message("kept", "every byte");
    let received = NOW - 86_400_000 * 365;
    let delivered = service
        .deliver(Delivery {
            flags: vec![Flag::Seen, Flag::Keyword("$label1".into())],
            received_millis: Some(received),
            ..delivery("alice@example.org", "Archive/2025", &raw)
        })
        .await
        .unwrap();
    assert!(!delivered.duplicate);
    let email = service.email("alice@example.org", delivered.id).unwrap();
    assert_eq!(email.received_millis, received);
    assert_eq!(email.subject, "kept");
    assert_eq!(email.flags, vec![Flag::Seen, Flag::Keyword("$label1".into())]);
    assert_eq!(service.raw("alice@example.org", delivered.id).unwrap(), raw);

    let again = service
        .deliver(Delivery {
            skip_duplicate: true,
            ..delivery("alice@example.org", "Archive/2025", &raw)
        })
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, delivered.id);
    let archive = service.find_mailbox("alice@example.org", "Archive/2025").unwrap();
    assert_eq!(email.mailbox, archive);
    let mailbox = service.mailbox("alice@example.org", archive).unwrap();
    assert_eq!((mailbox.total, mailbox.unseen), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_message_that_skip_duplicates_store_one_copy() {
    // A resumed import racing itself: the check and the append happen in the store's writer, so
    // the copies submitted together (one batch) and those after it find the first.
    let fixture = fixture(None, 1 << 20);
    let raw = message("once", "only one copy");
    let deliveries = (0..16).map(|_| {
        let service = fixture.service.clone();
        let raw = raw.clone();
        tokio::spawn(async move {
            service
                .deliver(Delivery {
                    skip_duplicate: true,
                    ..delivery("alice@example.org", "INBOX", &raw)
                })
                .await
        })
    });
    let mut results = Vec::new();
    for handle in deliveries.collect::<Vec<_>>() {
        results.push(handle.await.unwrap().unwrap());
    }
    assert_eq!(results.iter().filter(|delivered| !delivered.duplicate).count(), 1);
    assert!(results.iter().all(|delivered| delivered.id == results[0].id));
    let inbox = inbox(&fixture.service, "alice@example.org");
    assert!(results.iter().all(|delivered| delivered.mailbox == inbox));
    assert_eq!(fixture.service.mailbox("alice@example.org", inbox).unwrap().total, 1);
    // Without the flag, the same bytes are a second message.
    let second = fixture
        .service
        .deliver(delivery("alice@example.org", "INBOX", &raw))
        .await
        .unwrap();
    assert!(!second.duplicate);
    assert_eq!(fixture.service.mailbox("alice@example.org", inbox).unwrap().total, 2);
}

#[tokio::test]
async fn bad_deliveries_get_errors_that_say_whether_to_retry() {
    let fixture = fixture(None, 100);
    let service = &fixture.service;
    let too_large = service
        .deliver(delivery("alice@example.org", "INBOX", &[b'x'; 101]))
        .await
        .unwrap_err();
    assert!(
        matches!(too_large, ServiceError::TooLarge { size: 101, limit: 100 }),
        "{too_large}"
    );
    assert!(!too_large.is_temporary());
    let empty = service
        .deliver(delivery("alice@example.org", "INBOX", b""))
        .await
        .unwrap_err();
    assert!(matches!(empty, ServiceError::Invalid(_)), "{empty}");
    let bad_name = service
        .deliver(delivery("alice@example.org", " padded", b"x"))
        .await
        .unwrap_err();
    assert!(matches!(bad_name, ServiceError::Invalid(_)), "{bad_name}");
    let future = service
        .deliver(Delivery {
            received_millis: Some(NOW + 2 * 86_400_000),
            ..delivery("alice@example.org", "INBOX", b"x")
        })
        .await
        .unwrap_err();
    assert!(matches!(future, ServiceError::Invalid(_)), "{future}");
    let inbox = service
        .mailbox("alice@example.org", inbox(service, "alice@example.org"))
        .unwrap();
    assert_eq!(inbox.total, 0, "nothing was stored");
    assert_eq!(
        service.mailboxes("alice@example.org").unwrap().len(),
        1,
        "the refused deliveries created no mailbox"
    );
    assert!(matches!(
        service.find_mailbox("alice@example.org", "Nowhere"),
        Err(ServiceError::NoSuchMailbox(_))
    ));
}

#[tokio::test]
async fn recipients_resolve_to_accounts_and_detail_mailboxes() {
    let accounts = format!("alice@example.org:{SECRET_HASH}\n");
    let fixture = fixture(Some(&accounts), 1 << 20);
    let service = &fixture.service;
    service
        .deliver(delivery("alice@example.org", "lists", &message("first", "list mail")))
        .await
        .unwrap();
    let resolved = |address: &str| service.resolve_recipient(address).map(|r| (r.account, r.mailbox));
    let alice = "alice@example.org".to_owned();
    assert_eq!(resolved("alice@example.org").unwrap(), (alice.clone(), "INBOX".into()));
    assert_eq!(
        resolved("<Alice@Example.ORG>").unwrap(),
        (alice.clone(), "INBOX".into())
    );
    assert_eq!(
        resolved("alice+lists@example.org").unwrap(),
        (alice.clone(), "lists".into())
    );
    assert_eq!(
        resolved("alice+nosuch@example.org").unwrap(),
        (alice.clone(), "INBOX".into()),
        "a detail that names no mailbox delivers to INBOX"
    );
    assert!(matches!(
        resolved("bob@example.org"),
        Err(ServiceError::NoSuchAccount(_))
    ));
    assert!(matches!(resolved("not an address"), Err(ServiceError::Invalid(_))));

    // Logins go through the same accounts file, with one answer for every refusal.
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let name = service
        .authenticate(alice.clone(), Password::new("secret"), source)
        .await
        .unwrap();
    assert_eq!(name.as_str(), alice);
    let wrong = service
        .authenticate(alice.clone(), Password::new("guess"), source)
        .await
        .unwrap_err();
    let unknown = service
        .authenticate("bob@example.org".into(), Password::new("secret"), source)
        .await
        .unwrap_err();
    assert_eq!(wrong.to_string(), unknown.to_string());
    assert!(!wrong.is_temporary());
}

#[tokio::test]
async fn without_an_accounts_file_plus_detail_files_into_the_base_accounts_mailbox() {
    // Open mode: every address is an account, so `bob+lists@` must not become an account of
    // its own (found by the chaos runs' LMTP deliveries).
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    service
        .deliver(delivery("bob@example.org", "lists", &message("first", "list mail")))
        .await
        .unwrap();
    let resolved = |address: &str| service.resolve_recipient(address).map(|r| (r.account, r.mailbox));
    let bob = "bob@example.org".to_owned();
    assert_eq!(
        resolved("bob+lists@example.org").unwrap(),
        (bob.clone(), "lists".into())
    );
    assert_eq!(
        resolved("bob+nosuch@example.org").unwrap(),
        (bob.clone(), "INBOX".into())
    );
    assert_eq!(resolved("bob@example.org").unwrap(), (bob, "INBOX".into()));
    assert_eq!(
        resolved("carol@example.org").unwrap(),
        ("carol@example.org".into(), "INBOX".into())
    );
}

#[tokio::test]
async fn queries_sort_and_search_near_the_data_and_changes_follow_writes() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let mut ids = Vec::new();
    for (subject, body) in [("charlie", "apples"), ("alpha", "pears"), ("bravo", "apples and pears")] {
        ids.push(
            service
                .deliver(delivery(account, "INBOX", &message(subject, body)))
                .await
                .unwrap()
                .id,
        );
    }
    let subject_window = Query {
        search: None,
        sort: SortKey::Subject,
        descending: false,
        position: 1,
        limit: 5,
    };
    let by_subject = service
        .query(account, inbox(service, account), subject_window.clone())
        .await
        .unwrap();
    assert_eq!(by_subject.total, 3);
    let subjects: Vec<&str> = by_subject.emails.iter().map(|email| email.subject.as_str()).collect();
    assert_eq!(subjects, ["bravo", "charlie"]);
    let apples_window = Query {
        search: Some("apples".into()),
        sort: SortKey::Received,
        descending: false,
        position: 0,
        limit: 10,
    };
    let apples = service
        .query(account, inbox(service, account), apples_window.clone())
        .await
        .unwrap();
    let found: Vec<_> = apples.emails.iter().map(|email| email.id).collect();
    assert_eq!((apples.total, found), (2, vec![ids[0], ids[2]]));
    // The IDs alone (what Email/query answers with) are the same windows, read without the emails.
    let subject_ids: Vec<_> = by_subject.emails.iter().map(|email| email.id).collect();
    for (query, expected) in [
        (subject_window, (subject_ids, 3)),
        (apples_window, (vec![ids[0], ids[2]], 2)),
    ] {
        let listed = service
            .query_ids(account, inbox(service, account), query)
            .await
            .unwrap();
        assert_eq!(listed, expected);
    }

    let before = service.changes(account, inbox(service, account), 0, 100).unwrap();
    assert_eq!(before.created, ids);
    service
        .set_flags(account, ids[1], vec![Flag::Flagged], vec![])
        .await
        .unwrap();
    service.destroy(account, ids[2]).await.unwrap();
    let after = service
        .changes(account, inbox(service, account), before.modseq, 100)
        .unwrap();
    assert_eq!((after.updated, after.expunged), (vec![ids[1]], vec![ids[2]]));
    assert!(matches!(
        service.destroy(account, ids[2]).await,
        Err(ServiceError::NoSuchMessage(id)) if id == ids[2]
    ));
    assert!(matches!(
        service.set_flags(account, ids[2], vec![Flag::Seen], vec![]).await,
        Err(ServiceError::NoSuchMessage(_))
    ));
}

#[tokio::test]
async fn subscribers_hear_of_their_own_accounts_changes_only() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let mut alice = service.subscribe(Some("alice@example.org"));
    let mut everyone = service.subscribe(None);
    service
        .deliver(delivery("bob@example.org", "INBOX", &message("for bob", "x")))
        .await
        .unwrap();
    let delivered = service
        .deliver(delivery("alice@example.org", "INBOX", &message("for alice", "y")))
        .await
        .unwrap();
    service
        .set_flags("alice@example.org", delivered.id, vec![Flag::Seen], vec![])
        .await
        .unwrap();
    let inbox = inbox(service, "alice@example.org");
    let expected = |live| Notice::Changed {
        account: "alice@example.org".into(),
        mailbox: Some(inbox),
        id: delivered.id,
        live,
        replicated: false,
    };
    assert_eq!(
        alice.next().await,
        Some(expected(true)),
        "bob's delivery is not alice's business"
    );
    assert_eq!(alice.next().await, Some(expected(true)));
    let Some(Notice::Changed { account, .. }) = everyone.next().await else {
        panic!("the unfiltered subscription hears every account");
    };
    assert_eq!(account, "bob@example.org");
    service.destroy("alice@example.org", delivered.id).await.unwrap();
    assert_eq!(alice.next().await, Some(expected(false)));
}

#[tokio::test]
async fn every_account_has_its_inbox_before_anything_is_written() {
    let accounts = format!("alice@example.org:{SECRET_HASH}\n");
    let with_file = fixture(Some(&accounts), 1 << 20);
    let listed: Vec<(String, Option<&str>)> = with_file
        .service
        .mailboxes("alice@example.org")
        .unwrap()
        .into_iter()
        .map(|mailbox| (mailbox.name, mailbox.role.map(|role| role.as_str())))
        .collect();
    assert_eq!(listed, [("INBOX".to_owned(), Some("inbox"))]);
    assert!(matches!(
        with_file.service.mailboxes("mallory@example.org"),
        Err(ServiceError::NoSuchAccount(_))
    ));
    // Every node derives the same INBOX ID from the account name, with no coordination.
    let open = fixture(None, 1 << 20);
    assert_eq!(
        inbox(&open.service, "alice@example.org"),
        inbox(&with_file.service, "alice@example.org")
    );
    assert_eq!(open.service.mailboxes("alice@example.org").unwrap().len(), 1);
}

#[tokio::test]
async fn the_account_change_feed_lists_each_change_once_and_pages() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let mut ids = Vec::new();
    for (mailbox, subject) in [("INBOX", "one"), ("Work", "two"), ("INBOX", "three")] {
        ids.push(
            service
                .deliver(delivery(account, mailbox, &message(subject, "x")))
                .await
                .unwrap()
                .id,
        );
    }
    service
        .deliver(delivery("bob@example.org", "INBOX", &message("not alice's", "y")))
        .await
        .unwrap();
    let first = service.account_changes(account, None, 100).unwrap();
    let created: Vec<_> = first
        .created
        .iter()
        .map(|email| (email.id, email.mailbox_name.clone()))
        .collect();
    assert_eq!(
        created,
        vec![
            (ids[0], Some("INBOX".into())),
            (ids[1], Some("Work".into())),
            (ids[2], Some("INBOX".into()))
        ]
    );
    assert!(first.updated.is_empty() && first.destroyed.is_empty() && !first.has_more);

    let nothing = service.account_changes(account, Some(&first.new_state), 100).unwrap();
    assert!(nothing.created.is_empty() && nothing.updated.is_empty() && nothing.destroyed.is_empty());

    service
        .set_flags(account, ids[1], vec![Flag::Seen], vec![])
        .await
        .unwrap();
    service.destroy(account, ids[2]).await.unwrap();
    let fresh = service
        .deliver(delivery(account, "INBOX", &message("four", "z")))
        .await
        .unwrap()
        .id;
    // A page of one at a time still gets everything, each once.
    let mut state = nothing.new_state;
    let (mut created, mut updated, mut destroyed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        let page = service.account_changes(account, Some(&state), 1).unwrap();
        created.extend(page.created.iter().map(|email| email.id));
        updated.extend(page.updated.iter().map(|email| email.id));
        destroyed.extend(page.destroyed.iter().copied());
        state = page.new_state;
        if !page.has_more {
            break;
        }
    }
    assert_eq!((created, updated, destroyed), (vec![fresh], vec![ids[1]], vec![ids[2]]));

    for bad in ["", "m1!!", "garbage"] {
        let refused = service.account_changes(account, Some(bad), 10).unwrap_err();
        assert!(
            matches!(refused, ServiceError::CannotCalculateChanges(_)),
            "{bad:?}: {refused}"
        );
    }
}

/// Two messages delivered to the INBOX: one the purge tests keep, one they destroy.
async fn kept_and_gone(service: &MailService, account: &str) -> (MessageId, MessageId) {
    let mut ids = Vec::new();
    for (subject, body) in [("kept", "x"), ("gone", "y")] {
        let delivered = service
            .deliver(delivery(account, "INBOX", &message(subject, body)))
            .await;
        ids.push(delivered.unwrap().id);
    }
    (ids[0], ids[1])
}

#[tokio::test]
async fn a_state_older_than_a_purged_tombstone_cannot_be_calculated() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let (kept, gone) = kept_and_gone(service, account).await;
    let before = service.account_changes(account, None, 100).unwrap().new_state;
    service.destroy(account, gone).await.unwrap();
    let after = service.account_changes(account, Some(&before), 100).unwrap();
    assert_eq!(after.destroyed, vec![gone]);
    // Past the tombstone horizon the expunge is forgotten: the older state might have missed it.
    let later = NOW + mailmesh::store::DEFAULT_TOMBSTONE_HORIZON_MILLIS + 60_000;
    assert_eq!(fixture.store.collect_tombstones(later, 100).unwrap(), 1);
    let refused = service.account_changes(account, Some(&before), 100).unwrap_err();
    assert!(matches!(refused, ServiceError::CannotCalculateChanges(_)), "{refused}");
    // The state taken after the expunge, and a client starting from nothing, are fine.
    assert!(service.account_changes(account, Some(&after.new_state), 100).is_ok());
    let fresh = service.account_changes(account, None, 100).unwrap();
    let created: Vec<_> = fresh.created.iter().map(|email| email.id).collect();
    assert_eq!(created, vec![kept]);
}

/// The per-mailbox log (IMAP's CONDSTORE and UID map read it) loses an expunge's entry when its
/// tombstone is purged: a modseq from before must not be answered as if nothing was expunged,
/// and the UID map lets the UID go without renumbering the mailbox.
#[tokio::test]
async fn a_mailbox_modseq_older_than_a_purged_tombstone_cannot_be_calculated_and_the_uid_map_lets_its_uid_go() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let (kept, gone) = kept_and_gone(service, account).await;
    let uids_directory = tempfile::tempdir().unwrap();
    let uids = mailmesh::service::uids::UidIndex::open(uids_directory.path()).unwrap();
    let numbered = service.uid_snapshot_after(&uids, account, "INBOX", 0).unwrap();
    assert_eq!(numbered.messages, vec![(1, kept), (2, gone)]);
    let inbox = service.find_mailbox(account, "INBOX").unwrap();
    let before = service.changes(account, inbox, 0, 100).unwrap().modseq;

    service.destroy(account, gone).await.unwrap();
    let exact = service.changes(account, inbox, before, 100).unwrap();
    assert!(!exact.cannot_calculate);
    assert_eq!(exact.expunged, vec![gone]);
    let after = exact.modseq;

    let later = NOW + mailmesh::store::DEFAULT_TOMBSTONE_HORIZON_MILLIS + 60_000;
    assert_eq!(fixture.store.collect_tombstones(later, 100).unwrap(), 1);
    let refused = service.changes(account, inbox, before, 100).unwrap();
    assert!(refused.cannot_calculate, "{refused:?}");
    assert!(refused.expunges_purged, "{refused:?}");
    assert!(
        refused.expunged.is_empty(),
        "the purged expunge is not in the log: {refused:?}"
    );
    // The modseq taken after the expunge saw it: its changes are still exact.
    let current = service.changes(account, inbox, after, 100).unwrap();
    assert!(!current.cannot_calculate, "{current:?}");

    // The UID map followed the log up to `before`: it lets UID 2 go, keeps UIDVALIDITY and
    // numbers what came since.
    let fresh = service
        .deliver(delivery(account, "INBOX", &message("fresh", "z")))
        .await
        .unwrap()
        .id;
    let swept = service.uid_snapshot_after(&uids, account, "INBOX", 0).unwrap();
    assert_eq!(swept.state.uid_validity, numbered.state.uid_validity);
    assert_eq!(swept.messages, vec![(1, kept), (3, fresh)]);
    let vanished = service.vanished_since(&uids, account, "INBOX", before).unwrap();
    assert!(vanished.contains(&2), "{vanished:?}");
}

fn listing(service: &MailService, account: &str) -> Vec<(String, u64)> {
    service
        .mailboxes(account)
        .unwrap()
        .into_iter()
        .map(|mailbox| (mailbox.name, mailbox.total))
        .collect()
}

fn everything() -> Query {
    Query {
        search: None,
        sort: SortKey::Received,
        descending: false,
        position: 0,
        limit: 100,
    }
}

#[tokio::test]
async fn mailboxes_keep_their_ids_through_renames_and_a_delete_destroys_their_emails() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let projects = service.create_mailbox(account, "Work/Projects", None).await.unwrap();
    let work = service.find_mailbox(account, "Work").unwrap();
    assert_eq!(projects.parent, Some(work), "the missing parent was created");
    assert!(matches!(
        service.create_mailbox(account, "Work", None).await,
        Err(ServiceError::MailboxExists(_))
    ));
    let delivered = service
        .deliver(Delivery {
            mailbox: MailboxTarget::Id(projects.id),
            ..delivery(account, "unused", &message("plans", "x"))
        })
        .await
        .unwrap();
    let renamed = service.rename_mailbox(account, work, "Jobs").await.unwrap();
    assert_eq!((renamed.id, renamed.name.as_str()), (work, "Jobs"));
    assert_eq!(
        listing(service, account),
        [
            ("INBOX".to_owned(), 0),
            ("Jobs".to_owned(), 0),
            ("Jobs/Projects".to_owned(), 1)
        ]
    );
    assert_eq!(service.find_mailbox(account, "Jobs/Projects").unwrap(), projects.id);
    assert_eq!(service.email(account, delivered.id).unwrap().mailbox, projects.id);
    assert!(matches!(
        service.rename_mailbox(account, work, "Jobs/Projects/Deeper").await,
        Err(ServiceError::Invalid(_))
    ));
    assert!(matches!(
        service.delete_mailbox(account, work).await,
        Err(ServiceError::MailboxHasChildren(_))
    ));
    assert!(matches!(
        service.delete_mailbox(account, inbox(service, account)).await,
        Err(ServiceError::Invalid(_))
    ));
    assert_eq!(service.delete_mailbox(account, projects.id).await.unwrap(), 1);
    assert!(matches!(
        service.email(account, delivered.id),
        Err(ServiceError::NoSuchMessage(_))
    ));
    assert_eq!(
        listing(service, account),
        [("INBOX".to_owned(), 0), ("Jobs".to_owned(), 0)]
    );
    let archived = service
        .update_mailbox(
            account,
            work,
            MailboxUpdate {
                role: Some(Some("archive".parse().unwrap())),
                subscribed: Some(false),
                sort_order: Some(3),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            archived.role.map(|role| role.as_str()),
            archived.subscribed,
            archived.sort_order
        ),
        (Some("archive"), false, 3)
    );
}

#[tokio::test]
async fn an_email_moves_and_keeps_its_id_and_every_listing_follows() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let inbox = inbox(service, account);
    let work = service.create_mailbox(account, "Work", None).await.unwrap().id;
    let delivered = service
        .deliver(delivery(account, "INBOX", &message("moving", "boxes")))
        .await
        .unwrap();
    let before_inbox = service.changes(account, inbox, 0, 100).unwrap();
    let feed = service.account_changes(account, None, 100).unwrap();
    let moved = service.move_email(account, delivered.id, work).await.unwrap();
    assert_eq!((moved.id, moved.mailbox), (delivered.id, work));
    assert_eq!(
        listing(service, account),
        [("INBOX".to_owned(), 0), ("Work".to_owned(), 1)]
    );
    assert!(service
        .query(account, inbox, everything())
        .await
        .unwrap()
        .emails
        .is_empty());
    let in_work = service.query(account, work, everything()).await.unwrap();
    assert_eq!(
        in_work.emails.iter().map(|email| email.id).collect::<Vec<_>>(),
        [delivered.id]
    );
    let searched = service
        .query(
            account,
            work,
            Query {
                search: Some("boxes".into()),
                ..everything()
            },
        )
        .await
        .unwrap();
    assert_eq!(searched.total, 1, "the search index follows the move");
    let inbox_changes = service.changes(account, inbox, before_inbox.modseq, 100).unwrap();
    assert_eq!(inbox_changes.expunged, [delivered.id], "IMAP sees it leave the INBOX");
    let work_changes = service.changes(account, work, before_inbox.modseq, 100).unwrap();
    assert_eq!(work_changes.created, [delivered.id], "and arrive in Work");
    let after = service.account_changes(account, Some(&feed.new_state), 100).unwrap();
    assert_eq!(
        after
            .updated
            .iter()
            .map(|email| (email.id, email.mailbox))
            .collect::<Vec<_>>(),
        [(delivered.id, Some(work))],
        "the portable feed reports a move as an update"
    );
    let again = service.move_email(account, delivered.id, work).await.unwrap();
    assert_eq!(again.mailbox, work, "moving to where it is changes nothing");
    assert!(matches!(
        service
            .move_email(account, delivered.id, mailmesh::model::MailboxId(12345))
            .await,
        Err(ServiceError::NoSuchMailbox(_))
    ));
}

#[tokio::test]
async fn an_empty_mailbox_follows_its_accounts_modseq_so_a_later_state_is_still_good() {
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let account = "alice@example.org";
    let empty = service.create_mailbox(account, "Empty", None).await.unwrap().id;
    service
        .deliver(delivery(account, "INBOX", &message("elsewhere", "x")))
        .await
        .unwrap();
    let first = service.changes(account, empty, 0, 100).unwrap();
    assert!(first.modseq > 0 && !first.cannot_calculate);
    // An IMAP UID map asks again from that modseq: an empty mailbox must not look renumbered.
    let again = service.changes(account, empty, first.modseq, 100).unwrap();
    assert!(!again.cannot_calculate, "{again:?}");
    assert!(again.created.is_empty() && again.expunged.is_empty());
}

/// Gives `to` every record of one of `from`'s containers the way a pull does: blob, then record.
fn copy_container(from: &Store, to: &Store, container: &MailboxKey) {
    for record in from
        .records_in_range(container.id(), MessageId(0), MessageId(u128::MAX), usize::MAX)
        .unwrap()
    {
        mailmesh::harness::pull_record(from, to, container, record, NOW).unwrap();
    }
}

/// Reads the account's change feed from `state` to the end in pages of `limit`, checking that no
/// page holds more: the emails listed as updated with the mailbox each is shown in, and the state.
fn updated_since(
    service: &MailService,
    account: &str,
    state: &str,
    limit: usize,
) -> (Vec<(MessageId, Option<mailmesh::model::MailboxId>)>, String) {
    let mut state = state.to_owned();
    let mut updated = Vec::new();
    for _ in 0..100 {
        let page = service.account_changes(account, Some(&state), limit).unwrap();
        let size = page.created.len() + page.updated.len() + page.destroyed.len();
        assert!(size <= limit, "a page of limit {limit} held {size} emails");
        updated.extend(page.updated.iter().map(|email| (email.id, email.mailbox)));
        state = page.new_state;
        if !page.has_more {
            return (updated, state);
        }
    }
    panic!("the feed never ended");
}

/// Found by the chaos runs' feed checker: an email whose mailbox became an alias of a same-named
/// mailbox created earlier on another site kept its old mailbox in a JMAP client, because its
/// own record did not change and the feed did not list it.
#[tokio::test]
async fn the_feed_lists_the_emails_of_a_mailbox_that_became_an_alias() {
    let account = "alice@example.org";
    let first = fixture_on(1, NOW, None, 1 << 20);
    let second = fixture_on(2, NOW + 60_000, None, 1 << 20);
    let earlier = first.service.create_mailbox(account, "Work", None).await.unwrap().id;
    let later = second.service.create_mailbox(account, "Work", None).await.unwrap().id;
    let mut ids = Vec::new();
    for subject in ["one", "two", "three"] {
        let delivery = Delivery {
            mailbox: MailboxTarget::Id(later),
            ..delivery(account, "unused", &message(subject, "x"))
        };
        ids.push(second.service.deliver(delivery).await.unwrap().id);
    }
    let start = second.service.account_changes(account, None, 100).unwrap();
    assert!(start.created.iter().all(|email| email.mailbox == Some(later)));
    assert!(!start.has_more);

    copy_container(&first.store, &second.store, &MailboxKey::mailboxes(account).unwrap());
    assert_eq!(second.service.find_mailbox(account, "Work").unwrap(), earlier);
    for id in &ids {
        assert_eq!(
            second.service.email(account, *id).unwrap().mailbox,
            earlier,
            "Email/get"
        );
    }
    // A mailbox of two records: its listing merges both, and its IDs alone are the same window.
    let window = Query {
        sort: SortKey::Subject,
        position: 1,
        limit: 1,
        ..everything()
    };
    let merged = second.service.query(account, earlier, window.clone()).await.unwrap();
    assert_eq!(merged.total, 3);
    assert_eq!(
        merged
            .emails
            .iter()
            .map(|email| email.subject.as_str())
            .collect::<Vec<_>>(),
        ["three"]
    );
    assert_eq!(
        second.service.query_ids(account, earlier, window).await.unwrap(),
        (vec![merged.emails[0].id], 3)
    );
    // Pages of two: the three emails do not fit beside the mailbox's change on one page.
    let (updated, state) = updated_since(&second.service, account, &start.new_state, 2);
    let mut listed: Vec<_> = updated.iter().filter(|(id, _)| ids.contains(id)).copied().collect();
    listed.sort();
    listed.dedup();
    ids.sort();
    assert_eq!(listed, ids.iter().map(|id| (*id, Some(earlier))).collect::<Vec<_>>());
    let after = second.service.account_changes(account, Some(&state), 100).unwrap();
    assert!(after.created.is_empty() && after.updated.is_empty() && after.destroyed.is_empty());
}

/// Found by the chaos runs' feed checker (seeds 301, 307 and 320): a wiped node got emails back
/// before the record of their mailbox, an old one, and listed them without a mailbox. When the
/// mailbox record arrived, only its own change was listed: the client had been shown later
/// changes of the mailbox's origin, so the feed took the mailbox for one the client knew, and
/// the emails' own records, covered by the client's state, never came again. They must.
#[tokio::test]
async fn emails_listed_before_their_mailbox_was_here_are_listed_again_once_it_is() {
    let account = "alice@example.org";
    let first = fixture_on(1, NOW, None, 1 << 20);
    let third = fixture_on(3, NOW + 60_000, None, 1 << 20);
    let second = fixture_on(2, NOW + 120_000, None, 1 << 20);
    let work = first.service.create_mailbox(account, "Work", None).await.unwrap().id;
    // A later change of the same origin, which the client will be shown.
    first
        .service
        .deliver(delivery(account, "INBOX", &message("zero", "x")))
        .await
        .unwrap();
    for container in [
        MailboxKey::mailboxes(account).unwrap(),
        MailboxKey::emails(account).unwrap(),
    ] {
        copy_container(&first.store, &third.store, &container);
    }
    let mut ids = Vec::new();
    for subject in ["one", "two"] {
        let delivery = Delivery {
            mailbox: MailboxTarget::Id(work),
            ..delivery(account, "unused", &message(subject, "x"))
        };
        ids.push(third.service.deliver(delivery).await.unwrap().id);
    }
    // The second node gets the emails, not the mailboxes, and every change of the third node.
    copy_container(&third.store, &second.store, &MailboxKey::emails(account).unwrap());
    second.store.adopt_frontier(&third.store.frontier().unwrap()).unwrap();
    let start = second.service.account_changes(account, None, 100).unwrap();
    assert!(!start.has_more);
    for id in &ids {
        let listed = start.created.iter().find(|email| email.id == *id).expect("listed");
        assert_eq!(listed.mailbox, None, "the second node cannot place it yet");
    }
    let token = mailmesh::changes::ChangeState::decode(&start.new_state).unwrap();
    assert_eq!(token.unplaced, std::collections::BTreeSet::from([work.0]));

    // The mailbox record arrives: the emails come again, now in it.
    copy_container(&first.store, &second.store, &MailboxKey::mailboxes(account).unwrap());
    let after = second
        .service
        .account_changes(account, Some(&start.new_state), 100)
        .unwrap();
    for id in &ids {
        let listed = after
            .updated
            .iter()
            .chain(&after.created)
            .find(|email| email.id == *id)
            .unwrap_or_else(|| panic!("{id} listed again once its mailbox is here: {after:?}"));
        assert_eq!(listed.mailbox, Some(work));
        assert_eq!(listed.mailbox_name.as_deref(), Some("Work"));
    }
    let token = mailmesh::changes::ChangeState::decode(&after.new_state).unwrap();
    assert!(token.unplaced.is_empty(), "{token:?}");
    // Whatever later calls list again of them (the price of node hopping), they stay placed.
    let (updated, _) = updated_since(&second.service, account, &after.new_state, 100);
    assert!(updated
        .iter()
        .filter(|(id, _)| ids.contains(id))
        .all(|(_, mailbox)| *mailbox == Some(work)));
}

/// Found by the chaos runs' feed checker: an email delivered on one site into a mailbox another
/// site deleted meanwhile is rescued to the INBOX, and the feed must say so.
#[tokio::test]
async fn the_feed_lists_the_emails_rescued_from_a_deleted_mailbox() {
    let account = "alice@example.org";
    let deleting = fixture_on(1, NOW, None, 1 << 20);
    let delivering = fixture_on(2, NOW + 60_000, None, 1 << 20);
    let mailboxes = MailboxKey::mailboxes(account).unwrap();
    let trips = deleting
        .service
        .create_mailbox(account, "Trips", None)
        .await
        .unwrap()
        .id;
    copy_container(&deleting.store, &delivering.store, &mailboxes);
    let mut ids = Vec::new();
    for index in 0..5 {
        let delivery = Delivery {
            mailbox: MailboxTarget::Id(trips),
            ..delivery(account, "unused", &message(&format!("trip {index}"), "x"))
        };
        ids.push(delivering.service.deliver(delivery).await.unwrap().id);
    }
    let start = delivering.service.account_changes(account, None, 100).unwrap();
    assert_eq!(start.created.len(), 5);

    assert_eq!(deleting.service.delete_mailbox(account, trips).await.unwrap(), 0);
    copy_container(&deleting.store, &delivering.store, &mailboxes);
    ids.sort();
    let inbox = inbox(&delivering.service, account);
    for id in &ids {
        assert_eq!(
            delivering.service.email(account, *id).unwrap().mailbox,
            inbox,
            "Email/get"
        );
    }
    for limit in [1, 2, 3, 100] {
        let (updated, _) = updated_since(&delivering.service, account, &start.new_state, limit);
        let mut listed: Vec<_> = updated.iter().filter(|(id, _)| ids.contains(id)).copied().collect();
        listed.sort();
        listed.dedup();
        assert_eq!(
            listed,
            ids.iter().map(|id| (*id, Some(inbox))).collect::<Vec<_>>(),
            "pages of {limit}"
        );
    }
}

/// The live snapshot records in the account's mailboxes container.
fn live_snapshots(store: &Store, account: &str) -> usize {
    store
        .records_in_range(
            MailboxKey::mailboxes(account).unwrap().id(),
            MessageId(0),
            MessageId(u128::MAX),
            usize::MAX,
        )
        .unwrap()
        .iter()
        .filter(|record| record.expunged.is_none())
        .count()
}

/// Snapshot records used to pile up, one per mailbox write for ever (a hostile peer could fill
/// the container up to its fold limit). A write now collects the snapshots it folded.
#[tokio::test]
async fn a_mailbox_write_collects_the_snapshots_it_supersedes_and_the_feed_destroys_no_email() {
    let account = "alice@example.org";
    let fixture = fixture(None, 1 << 20);
    let service = &fixture.service;
    let work = service.create_mailbox(account, "Work", None).await.unwrap().id;
    let start = service.account_changes(account, None, 100).unwrap();
    for round in 0..30 {
        let name = if round % 2 == 0 { "Jobs" } else { "Work" };
        service.rename_mailbox(account, work, name).await.unwrap();
    }
    service
        .update_mailbox(
            account,
            work,
            MailboxUpdate {
                sort_order: Some(7),
                ..MailboxUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        live_snapshots(&fixture.store, account),
        1,
        "one live snapshot per mailbox"
    );
    let shown = service.mailbox(account, work).unwrap();
    assert_eq!((shown.name.as_str(), shown.sort_order), ("Work", 7));
    let changes = service.account_changes(account, Some(&start.new_state), 100).unwrap();
    assert!(
        changes.destroyed.is_empty(),
        "collected snapshots are no emails: {changes:?}"
    );
    assert_eq!(changes.mailboxes, vec![work]);

    // Two sites write the same mailbox while apart: each collects only what it folded, so both
    // new snapshots stay live, and both decisions show once they meet.
    let other = fixture_on(2, NOW + 1_000, None, 1 << 20);
    let container = MailboxKey::mailboxes(account).unwrap();
    copy_container(&fixture.store, &other.store, &container);
    service.rename_mailbox(account, work, "Projects").await.unwrap();
    other
        .service
        .update_mailbox(
            account,
            work,
            MailboxUpdate {
                subscribed: Some(false),
                ..MailboxUpdate::default()
            },
        )
        .await
        .unwrap();
    copy_container(&fixture.store, &other.store, &container);
    copy_container(&other.store, &fixture.store, &container);
    for (site, store) in [(service, &fixture.store), (&other.service, &other.store)] {
        let shown = site.mailbox(account, work).unwrap();
        assert_eq!(
            (shown.name.as_str(), shown.subscribed, shown.sort_order),
            ("Projects", false, 7)
        );
        assert_eq!(
            live_snapshots(store, account),
            2,
            "neither concurrent snapshot dominates"
        );
    }
    // The next write on either site folds both and collects both.
    other.service.rename_mailbox(account, work, "Done").await.unwrap();
    copy_container(&other.store, &fixture.store, &container);
    for (site, store) in [(service, &fixture.store), (&other.service, &other.store)] {
        let shown = site.mailbox(account, work).unwrap();
        assert_eq!(
            (shown.name.as_str(), shown.subscribed, shown.sort_order),
            ("Done", false, 7)
        );
        assert_eq!(live_snapshots(store, account), 1);
    }
}

/// Copies every mailbox and email record of `account` from each of `sources` into `to`, which
/// then holds all they hold and adopts their frontiers (as after reconciliations with each).
fn gather(to: &Fixture, sources: &[&Fixture], account: &str) {
    for source in sources {
        copy_container(&source.store, &to.store, &MailboxKey::mailboxes(account).unwrap());
        copy_container(&source.store, &to.store, &MailboxKey::emails(account).unwrap());
        to.store.adopt_frontier(&source.store.frontier().unwrap()).unwrap();
    }
}

/// Creates a mailbox at `path` on a fixture's service.
async fn create(fixture: &Fixture, account: &str, path: &str) -> mailmesh::model::MailboxId {
    fixture.service.create_mailbox(account, path, None).await.unwrap().id
}

/// Found by the chaos runs' feed checker (seeds 367 and 375): an email of a mailbox that was an
/// alias was listed in its canonical mailbox; then a site that never knew the alias deleted or
/// renamed that canonical mailbox, the group split up, and the email was shown in its own
/// mailbox again though no record of the alias or the email changed. The client kept it in the
/// other mailbox. Both ways of splitting the group must list it again.
#[tokio::test]
async fn the_feed_lists_again_the_emails_of_an_alias_whose_group_split_up() {
    for split in ["delete", "rename"] {
        let account = "alice@example.org";
        let first = fixture_on(1, NOW, None, 1 << 20);
        let third = fixture_on(3, NOW + 60_000, None, 1 << 20);
        let second = fixture_on(2, NOW + 120_000, None, 1 << 20);
        let mailboxes = MailboxKey::mailboxes(account).unwrap();
        // Two sites apart each create an Archive; the first one's is older.
        let older = first.service.create_mailbox(account, "Archive", None).await.unwrap().id;
        let younger = third.service.create_mailbox(account, "Archive", None).await.unwrap().id;
        let delivery = Delivery {
            mailbox: MailboxTarget::Id(younger),
            ..delivery(account, "unused", &message("filed", "x"))
        };
        let email = third.service.deliver(delivery).await.unwrap().id;
        // The second site holds both: one Archive, the email shown in the older record.
        gather(&second, &[&first, &third], account);
        let start = second.service.account_changes(account, None, 100).unwrap();
        let shown = start.created.iter().find(|listed| listed.id == email).expect("listed");
        assert_eq!(shown.mailbox, Some(older), "{split}: shown in the canonical mailbox");
        let token = mailmesh::changes::ChangeState::decode(&start.new_state).unwrap();
        assert_eq!(token.aliased, std::collections::BTreeSet::from([(younger.0, older.0)]));
        // The first site, which never saw the younger Archive, splits the group up.
        if split == "delete" {
            first.service.delete_mailbox(account, older).await.unwrap();
        } else {
            first.service.rename_mailbox(account, older, "Old").await.unwrap();
        }
        copy_container(&first.store, &second.store, &mailboxes);
        second.store.adopt_frontier(&first.store.frontier().unwrap()).unwrap();
        assert_eq!(
            second.service.email(account, email).unwrap().mailbox,
            younger,
            "{split}: the email is shown in its own mailbox now"
        );
        // The client, reading on from its token, is told so (on a page of one or of many).
        for limit in [1, 100] {
            let (updated, state) = updated_since(&second.service, account, &start.new_state, limit);
            assert_eq!(
                updated.iter().filter(|(id, _)| *id == email).last(),
                Some(&(email, Some(younger))),
                "{split}, pages of {limit}: {updated:?}"
            );
            let token = mailmesh::changes::ChangeState::decode(&state).unwrap();
            assert!(token.aliased.is_empty(), "{split}: {token:?}");
            let after = second.service.account_changes(account, Some(&state), 100).unwrap();
            assert!(
                after
                    .updated
                    .iter()
                    .all(|listed| listed.mailbox == Some(younger) || listed.id != email),
                "{split}: {after:?}"
            );
        }
    }
}

/// A mailbox renamed into the place of a same-named one brings its children beside the other's
/// children, and a same-named child becomes an alias too: its emails are then shown in the other
/// child, and the feed must list them there though only the parent's record changed.
#[tokio::test]
async fn the_feed_lists_the_emails_of_a_child_that_became_an_alias_through_its_parent() {
    let account = "alice@example.org";
    let first = fixture_on(1, NOW, None, 1 << 20);
    let third = fixture_on(3, NOW + 60_000, None, 1 << 20);
    let second = fixture_on(2, NOW + 120_000, None, 1 << 20);
    let mailboxes = MailboxKey::mailboxes(account).unwrap();
    let work = create(&first, account, "Work").await;
    let reports = create(&first, account, "Work/Reports").await;
    let projects = create(&third, account, "Projects").await;
    let other_reports = create(&third, account, "Projects/Reports").await;
    let delivery = Delivery {
        mailbox: MailboxTarget::Id(other_reports),
        ..delivery(account, "unused", &message("quarterly", "x"))
    };
    let email = third.service.deliver(delivery).await.unwrap().id;
    gather(&second, &[&first, &third], account);
    let start = second.service.account_changes(account, None, 100).unwrap();
    let shown = start.created.iter().find(|listed| listed.id == email).expect("listed");
    assert_eq!(shown.mailbox, Some(other_reports));
    // On the site that never saw the other Work, Projects becomes Work: the second site then
    // shows one Work (the older) and one Reports (the older) holding the email.
    third.service.rename_mailbox(account, projects, "Work").await.unwrap();
    copy_container(&third.store, &second.store, &mailboxes);
    second.store.adopt_frontier(&third.store.frontier().unwrap()).unwrap();
    assert_eq!(second.service.email(account, email).unwrap().mailbox, reports);
    assert_eq!(second.service.find_mailbox(account, "Work").unwrap(), work);
    for limit in [1, 100] {
        let (updated, _) = updated_since(&second.service, account, &start.new_state, limit);
        assert_eq!(
            updated.iter().filter(|(id, _)| *id == email).last(),
            Some(&(email, Some(reports))),
            "pages of {limit}: {updated:?}"
        );
    }
}
