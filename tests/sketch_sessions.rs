//! Sketch sessions between real nodes: a mailbox large enough for sketches (at least 4,096
//! records) whose replicas differ by flag changes spread all over it heals through sketch cells,
//! and ends with every change on both nodes.
//!
//! The store is written directly (no network) and copied to the second node's data directory
//! while no node runs, as `examples/resync_bench` does, so both start as replicas that agree.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailmesh::harness::{digests_agree, wait_until, LocalNode};
use mailmesh::model::{MailboxKey, NodeId};
use mailmesh::store::{Applied, Operation, Store, StoreOptions};

const ACCOUNT: &str = "reader@example.org";
const RECORDS: usize = 5_000;
const CHANGES: usize = 40;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailmesh"))
}

/// Writes `RECORDS` small messages into the first node's store and copies it to the second.
fn load(first: &Path, second: &Path) -> Vec<String> {
    for directory in [first, second] {
        std::fs::create_dir_all(directory).unwrap();
        mailmesh::node::load_or_create_identity(&directory.join("identity.key")).unwrap();
    }
    let keypair = mailmesh::node::load_or_create_identity(&first.join("identity.key")).unwrap();
    let node = NodeId::from_identity(&keypair.public().to_peer_id().to_bytes());
    let store = Store::open(
        &first.join("store"),
        node,
        StoreOptions {
            sync_writes: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let container = MailboxKey::emails(ACCOUNT).unwrap();
    let inbox = mailmesh::mailbox::inbox_id(ACCOUNT);
    let now = mailmesh::environment::now_millis();
    let mut ids = Vec::new();
    for batch in 0..RECORDS / 500 {
        let operations = (0..500)
            .map(|index| {
                let number = batch * 500 + index;
                Operation::Append {
                    mailbox: container.clone(),
                    location: Some(inbox),
                    unless_held_in: Vec::new(),
                    raw: format!("From: a@example.net\r\nSubject: message {number}\r\n\r\nBody {number}.\r\n")
                        .into_bytes(),
                    flags: vec![],
                    received_millis: None,
                    now_millis: now,
                    random: number as u128 * 0x9e37_79b9_7f4a_7c15,
                }
            })
            .collect();
        for result in store.apply(operations) {
            match result.unwrap() {
                Applied::Appended { id, .. } => ids.push(id.to_string()),
                other => panic!("an append answered {other:?}"),
            }
        }
    }
    drop(store);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(first.join("store"))
        .arg(second.join("store"))
        .status()
        .unwrap();
    assert!(status.success());
    ids
}

fn sketch_sessions(node: &LocalNode, outcome: &str) -> f64 {
    let text = String::from_utf8_lossy(&node.get("/metrics").unwrap().body).into_owned();
    let series = format!("mailmesh_sketch_sessions_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn flag_changes_spread_over_a_large_mailbox_heal_through_sketch_cells() {
    let directory = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (directory.path().join("a"), directory.path().join("b"));
    let ids = load(&first_dir, &second_dir);
    assert_eq!(ids.len(), RECORDS);
    let cluster = "sketch-sessions";
    let first = LocalNode::spawn(&binary(), "a", &first_dir, cluster, &[], 200, &[]).unwrap();
    let mut second = LocalNode::spawn(
        &binary(),
        "b",
        &second_dir,
        cluster,
        &[first.listen_address().unwrap()],
        200,
        &[],
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || digests_agree(&[&first, &second])).is_some(),
        "the two copies never agreed"
    );

    // Apart: the first node sets \Seen on messages drawn all over the mailbox.
    second.terminate();
    let mut chosen = BTreeSet::new();
    let mut draw = 12_345u64;
    while chosen.len() < CHANGES {
        draw = draw
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        chosen.insert(ids[(draw >> 33) as usize % ids.len()].clone());
    }
    let mailbox_path = LocalNode::mailbox_path(ACCOUNT, "INBOX");
    for id in &chosen {
        let response = first
            .send(
                "POST",
                &format!("{mailbox_path}/messages/{id}/flags"),
                br#"{"add":["\\Seen"]}"#,
            )
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
    }
    second.restart().unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || digests_agree(&[&first, &second])).is_some(),
        "the replicas never agreed again"
    );

    // Whichever node opened the session, it went by cells and decoded.
    let decoded = sketch_sessions(&first, "decoded") + sketch_sessions(&second, "decoded");
    assert!(
        decoded >= 1.0,
        "no sketch session decoded (first: {}, second: {})",
        String::from_utf8_lossy(&first.get("/metrics").unwrap().body),
        String::from_utf8_lossy(&second.get("/metrics").unwrap().body)
    );
    // And the values, not only the digests: exactly the chosen messages are seen on both.
    for node in [&first, &second] {
        let messages = node.messages(ACCOUNT, "INBOX").unwrap();
        assert_eq!(messages.len(), RECORDS);
        let seen: BTreeSet<String> = messages
            .into_iter()
            .filter(|(_, flags)| flags.iter().any(|flag| flag == "\\Seen"))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(seen, chosen);
    }
}
