//! Hostile input and bad conditions: a bearer-token API, nodes whose wall clocks are an hour
//! off, and a hand-made hostile peer speaking the real protocol over real libp2p.

use std::time::Duration;

use libp2p::identity::Keypair;
use mailmesh::harness::{digests_agree, sample_message, wait_until, LocalNode};
use mailmesh::merkle::{MemoryTree, StoredDepth};
use mailmesh::model::{BlobHash, Flag, MailboxKey, MessageId, MessageRecord, NodeId, Stamp};
use mailmesh::net::{self, NetworkConfig, NetworkEvent, Topic};
use mailmesh::sync::{self, ByteString, Element, SyncLimits};
use mailmesh::wire::{self, Gossip, Response};

fn binary() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_mailmesh"))
}

#[test]
fn the_http_api_can_require_a_bearer_token() {
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, "s3cret-token-for-tests-0123456789\n").unwrap();
    let mut node = LocalNode::spawn(
        binary(),
        "guarded",
        &directory.path().join("node"),
        "test-token",
        &[],
        200,
        &["--http-token-file".into(), token_file.display().to_string()],
    )
    .unwrap();
    assert_eq!(node.get("/healthz").unwrap().status, 200, "health checks stay open");
    let refused = node.get("/v1/status").unwrap();
    assert_eq!(refused.status, 401);
    assert!(refused.json()["error"].is_string());
    node.token = Some("wrong-token-wrong-token".into());
    assert_eq!(node.get("/v1/mailboxes").unwrap().status, 401);
    assert_eq!(
        node.send("POST", "/v1/mailboxes/a/INBOX/messages", b"Subject: x\r\n\r\nx")
            .unwrap()
            .status,
        401
    );
    node.token = Some("s3cret-token-for-tests-0123456789".into());
    assert_eq!(node.get("/v1/status").unwrap().status, 200);
    node.append("a", "INBOX", b"Subject: allowed\r\n\r\nyes").unwrap();
    // A token that is too short is refused at start, with a clear error.
    std::fs::write(&token_file, "short\n").unwrap();
    let output = std::process::Command::new(binary())
        .args(["node", "--data-dir"])
        .arg(directory.path().join("other"))
        .args([
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--http-token-file",
        ])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("at least 16"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn flags_of(node: &LocalNode, id: &str) -> Vec<String> {
    node.messages("skew@example.org", "INBOX")
        .unwrap_or_default()
        .into_iter()
        .find(|(candidate, _)| candidate == id)
        .map(|(_, flags)| flags)
        .unwrap_or_default()
}

#[test]
fn nodes_an_hour_off_end_flag_and_expunge_changes_the_same_way() {
    let directory = tempfile::tempdir().unwrap();
    let ahead = LocalNode::spawn_with_environment(
        binary(),
        "ahead",
        &directory.path().join("ahead"),
        "test-skew",
        &[],
        200,
        &[],
        &[("MAILMESH_CLOCK_OFFSET_MS", "3600000")],
    )
    .unwrap();
    let seed = ahead.listen_address().unwrap();
    let exact = LocalNode::spawn(
        binary(),
        "exact",
        &directory.path().join("exact"),
        "test-skew",
        &[seed.clone()],
        200,
        &[],
    )
    .unwrap();
    let behind = LocalNode::spawn_with_environment(
        binary(),
        "behind",
        &directory.path().join("behind"),
        "test-skew",
        &[seed],
        200,
        &[],
        &[("MAILMESH_CLOCK_OFFSET_MS", "-3600000")],
    )
    .unwrap();
    let nodes = [&ahead, &exact, &behind];
    let settle = |what: &str| {
        assert!(
            wait_until(Duration::from_secs(60), || digests_agree(&nodes)).is_some(),
            "{what}: digests {:?}",
            nodes
                .iter()
                .map(|node| node.digest().unwrap_or_default())
                .collect::<Vec<_>>()
        );
    };
    let mut ids = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        ids.push(
            node.append(
                "skew@example.org",
                "INBOX",
                &sample_message("s@example.org", &format!("skew {index}"), "x"),
            )
            .unwrap(),
        );
    }
    settle("appends");
    let flags_path = |id: &str| {
        format!(
            "{}/messages/{id}/flags",
            LocalNode::mailbox_path("skew@example.org", "INBOX")
        )
    };
    // The fast node sets \Seen, then the slow node (an hour behind) clears it after seeing that:
    // the later decision wins everywhere although its wall clock is two hours earlier.
    assert_eq!(
        ahead
            .send("POST", &flags_path(&ids[0]), br#"{"add":["\\Seen"]}"#)
            .unwrap()
            .status,
        200
    );
    settle("set on the fast node");
    assert_eq!(
        behind
            .send("POST", &flags_path(&ids[0]), br#"{"remove":["\\Seen"]}"#)
            .unwrap()
            .status,
        200
    );
    settle("cleared on the slow node");
    for node in nodes {
        assert!(
            !flags_of(node, &ids[0]).contains(&"\\Seen".to_owned()),
            "{} still shows \\Seen",
            node.name
        );
    }
    // And the other way round.
    assert_eq!(
        behind
            .send("POST", &flags_path(&ids[1]), br#"{"add":["\\Flagged"]}"#)
            .unwrap()
            .status,
        200
    );
    settle("set on the slow node");
    assert_eq!(
        ahead
            .send("POST", &flags_path(&ids[1]), br#"{"remove":["\\Flagged"]}"#)
            .unwrap()
            .status,
        200
    );
    settle("cleared on the fast node");
    for node in nodes {
        assert!(
            flags_of(node, &ids[1]).is_empty(),
            "{} shows {:?}",
            node.name,
            flags_of(node, &ids[1])
        );
    }
    // Concurrent conflicting changes end identical everywhere.
    let statuses = std::thread::scope(|scope| {
        let add = scope.spawn(|| ahead.send("POST", &flags_path(&ids[2]), br#"{"add":["$Work"]}"#));
        let remove = scope.spawn(|| behind.send("POST", &flags_path(&ids[2]), br#"{"remove":["$Work"]}"#));
        [
            add.join().unwrap().unwrap().status,
            remove.join().unwrap().unwrap().status,
        ]
    });
    assert_eq!(
        statuses,
        [200, 200],
        "the concurrent add and remove were not both taken"
    );
    settle("concurrent changes");
    let first = flags_of(&ahead, &ids[2]);
    assert!(nodes.iter().all(|node| flags_of(node, &ids[2]) == first));
    // An expunge on the slow node sticks everywhere.
    let message = format!(
        "{}/messages/{}",
        LocalNode::mailbox_path("skew@example.org", "INBOX"),
        ids[2]
    );
    assert_eq!(behind.send("DELETE", &message, &[]).unwrap().status, 204);
    settle("expunge on the slow node");
    for node in nodes {
        assert_eq!(
            node.get(&message).unwrap().status,
            404,
            "{} still lists the expunged message",
            node.name
        );
    }
}

struct Hostile {
    client: net::NetworkClient,
    events: tokio::sync::mpsc::Receiver<NetworkEvent>,
}

/// A digest gossip from `peer` that differs from any real node's, so the node opens a session.
fn differing_digest(peer: &Hostile, name: &str, sequence: u64) -> Vec<u8> {
    differing_digest_of(peer.client.local_peer_id(), name, sequence)
}

fn differing_digest_of(peer: net::PeerId, name: &str, sequence: u64) -> Vec<u8> {
    wire::encode(&Gossip::Digest {
        peer: peer.to_string(),
        name: name.into(),
        sequence,
        digest: ByteString(vec![7; 32]),
        mailboxes: 1,
        addresses: vec![],
        stale: false,
        clock: 0,
        acknowledged_before: 0,
        frontier: vec![],
    })
}

async fn hostile_peer(bootstrap: &str, cluster: &str) -> Hostile {
    hostile_peer_with(bootstrap, cluster, |_| {}).await
}

/// A hand-made peer whose network settings `adjust` changes (to send what a node refuses).
async fn hostile_peer_with(bootstrap: &str, cluster: &str, adjust: impl FnOnce(&mut NetworkConfig)) -> Hostile {
    let mut config = NetworkConfig::new(Keypair::generate_ed25519(), cluster);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = vec![bootstrap.parse().unwrap()];
    adjust(&mut config);
    let mut registry = prometheus_client::registry::Registry::default();
    let (client, events, event_loop) = net::new(config, &mut registry).unwrap();
    tokio::spawn(event_loop.run(futures::future::pending::<()>()));
    Hostile { client, events }
}

/// One round of inviting a session: announces a digest that differs from the node's, then
/// handles the next event (waiting at most 300 ms): a request is answered with `answer`, gossip
/// is accepted. Returns whether the node disconnected.
async fn invite_and_answer(peer: &mut Hostile, name: &str, sequence: u64, answer: &[u8]) -> bool {
    let _ = peer
        .client
        .publish(Topic::Digests, differing_digest(peer, name, sequence))
        .await;
    match tokio::time::timeout(Duration::from_millis(300), peer.events.recv()).await {
        Ok(Some(NetworkEvent::Request { channel, .. })) => {
            let _ = peer.client.respond(channel, answer.to_vec()).await;
        }
        Ok(Some(NetworkEvent::PeerDisconnected(_))) => return true,
        Ok(Some(NetworkEvent::Gossip {
            message_id,
            propagation_source,
            ..
        })) => {
            let _ = peer
                .client
                .report_validation(message_id, propagation_source, true)
                .await;
        }
        _ => {}
    }
    false
}

/// Runs a node, makes it open a session with a hand-made peer, answers every request of that
/// session with `garbage`, and checks the node drops, blocks and counts the peer.
async fn assert_dropped_for_answering(garbage: Vec<u8>, cluster: &str, why: &str) {
    let directory = tempfile::tempdir().unwrap();
    let node = tokio::task::spawn_blocking({
        let path = directory.path().join("node");
        let cluster = cluster.to_string();
        move || LocalNode::spawn(binary(), "target", &path, &cluster, &[], 200, &[]).unwrap()
    })
    .await
    .unwrap();
    let address = node.listen_address().unwrap();
    let mut hostile = hostile_peer(&address, cluster).await;
    // Announce a digest that differs from the node's, so it opens a session with us (or it does
    // so on connect, when its peer ID is the lower); answer with the wrong kind of frame.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut disconnected = false;
    let mut sequence = 0u64;
    while tokio::time::Instant::now() < deadline && !disconnected {
        sequence += 1;
        disconnected = invite_and_answer(&mut hostile, "hostile", sequence, &garbage).await;
    }
    assert!(disconnected, "the node kept talking to a peer that broke the protocol");
    // Blocked, not only disconnected: the status lists the hostile peer with time left.
    let hostile_id = hostile.client.local_peer_id().to_string();
    let status = node.status().unwrap();
    let blocked = status["blocked"].as_array().cloned().unwrap_or_default();
    assert!(
        blocked.iter().any(|entry| entry["peer_id"] == hostile_id.as_str()
            && entry["seconds_left"].as_u64().is_some_and(|left| left > 0)),
        "the status does not list the hostile peer {hostile_id} as blocked: {blocked:?}"
    );
    let penalised = node.metric_sum("mailmesh_peers_penalised_total").unwrap();
    assert!(penalised >= 1.0, "mailmesh_peers_penalised_total is {penalised}");
    let log = std::fs::read_to_string(directory.path().join("node").join("node.log")).unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("misbehaving peer") && line.contains(why)),
        "the log does not say the peer was dropped for {why:?}"
    );
}

/// A digest in another member's name could move the acknowledged tombstone cut for that member
/// (and so purge tombstones early). Gossipsub checks who signed a message; the node now checks
/// that the signer is the peer the digest names, and blocks a signer that is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_signed_in_another_peers_name_is_refused_and_its_signer_blocked() {
    let directory = tempfile::tempdir().unwrap();
    let node = tokio::task::spawn_blocking({
        let path = directory.path().join("node");
        move || LocalNode::spawn(binary(), "target", &path, "test-forged-digest", &[], 200, &[]).unwrap()
    })
    .await
    .unwrap();
    let address = node.listen_address().unwrap();
    let mut hostile = hostile_peer(&address, "test-forged-digest").await;
    let victim = Keypair::generate_ed25519().public().to_peer_id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut disconnected = false;
    let mut sequence = 0u64;
    while tokio::time::Instant::now() < deadline && !disconnected {
        sequence += 1;
        let _ = hostile
            .client
            .publish(Topic::Digests, differing_digest_of(victim, "forger", sequence))
            .await;
        match tokio::time::timeout(Duration::from_millis(300), hostile.events.recv()).await {
            Ok(Some(NetworkEvent::PeerDisconnected(_))) => disconnected = true,
            Ok(Some(NetworkEvent::Gossip {
                message_id,
                propagation_source,
                ..
            })) => {
                let _ = hostile
                    .client
                    .report_validation(message_id, propagation_source, true)
                    .await;
            }
            _ => {}
        }
    }
    assert!(
        disconnected,
        "the node kept a peer that signed digests in another's name"
    );
    let metrics = String::from_utf8_lossy(&node.get("/metrics").unwrap().body).into_owned();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("mailmesh_peers_penalised_total{reason=\"digest_for_another_peer\"} ")),
        "no penalty counted for the forged digest"
    );
    let status = node.status().unwrap();
    let hostile_id = hostile.client.local_peer_id().to_string();
    assert!(
        status["blocked"]
            .as_array()
            .is_some_and(|blocked| blocked.iter().any(|entry| entry["peer_id"] == hostile_id.as_str())),
        "the signer is not blocked: {status}"
    );
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    assert!(
        peers
            .iter()
            .all(|entry| entry["peer_id"] != victim.to_string().as_str()),
        "the forged digest made the node believe in a peer it never met: {peers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_out_of_protocol_is_disconnected_and_counted() {
    let wrong_kind = wire::encode(&Response::Records {
        records: vec![],
        more: false,
        blobs: vec![],
    });
    assert_dropped_for_answering(wrong_kind, "test-hostile", "unexpected answer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_records_nobody_lacked_with_a_reply_is_disconnected() {
    let raw = b"Subject: unasked\r\n\r\nhello".to_vec();
    let record = MessageRecord::new(
        MessageId::from_parts(1_767_225_600_000, 5),
        BlobHash::of(&raw),
        raw.len() as u64,
        1_767_225_600_000,
        NodeId(66),
    );
    // A reply that says nothing is lacking, yet carries a record.
    let unasked = wire::encode(&Response::Reconcile {
        message: ByteString(sync::encode(&[])),
        records: vec![record],
        blobs: vec![ByteString(raw)],
        states: ByteString::default(),
        returned: ByteString::default(),
    });
    assert_dropped_for_answering(unasked, "test-unasked", "not lacking").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_another_protocol_version_is_refused_and_counted_but_not_blamed() {
    let directory = tempfile::tempdir().unwrap();
    let node = tokio::task::spawn_blocking({
        let path = directory.path().join("node");
        move || LocalNode::spawn(binary(), "target", &path, "test-version", &[], 200, &[]).unwrap()
    })
    .await
    .unwrap();
    let address = node.listen_address().unwrap();
    let mut peer = hostile_peer(&address, "test-version").await;
    let node_peer = loop {
        match tokio::time::timeout(Duration::from_secs(20), peer.events.recv()).await {
            Ok(Some(NetworkEvent::PeerConnected(connected))) => break connected,
            Ok(Some(_)) => {}
            _ => panic!("the node never connected"),
        }
    };
    // A frame of the next protocol version, as a newer build would send it.
    let newer = wire::WIRE_VERSION + 1;
    let frame = cbor4ii::serde::to_vec(Vec::new(), &(newer, "records")).unwrap();
    let answer = peer.client.request(node_peer, frame.clone()).await.unwrap();
    match wire::decode::<Response>(&answer).unwrap() {
        Response::Error { message } => assert!(
            message.contains(&format!(
                "speaks protocol version {newer}, this node speaks {}",
                wire::WIRE_VERSION
            )),
            "{message}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The node's own session requests get frames of that version back; digests that differ keep
    // inviting sessions. The node must stay connected, count the refusal once and blame no one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut sequence = 0u64;
    while tokio::time::Instant::now() < deadline {
        sequence += 1;
        assert!(
            !invite_and_answer(&mut peer, "newer", sequence, &frame).await,
            "the node dropped a peer of another version"
        );
    }
    let metrics = String::from_utf8_lossy(&node.get("/metrics").unwrap().body).into_owned();
    let refused: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("mailmesh_peers_refused_total{reason=\"protocol_version\"} "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0);
    // Counted when found, not for every frame after (at most twice if the first frame raced the
    // node's own notice of the connection).
    assert!(
        (1.0..=2.0).contains(&refused),
        "mailmesh_peers_refused_total is {refused}"
    );
    assert_eq!(
        node.metric_sum("mailmesh_peers_penalised_total").unwrap(),
        0.0,
        "not blamed"
    );
    let log = std::fs::read_to_string(directory.path().join("node").join("node.log")).unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("another protocol version") && line.contains(&format!("theirs={newer}"))),
        "the log does not give the reason"
    );
    // It is still connected and still answers, but opens no session with that peer.
    assert!(peer.client.request(node_peer, frame).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_reply_carries_the_records_and_blobs_the_asker_lacks() {
    let directory = tempfile::tempdir().unwrap();
    let node = tokio::task::spawn_blocking({
        let path = directory.path().join("node");
        move || LocalNode::spawn(binary(), "target", &path, "test-carry", &[], 200, &[]).unwrap()
    })
    .await
    .unwrap();
    let mut written = Vec::new();
    for index in 0..5 {
        let raw = sample_message("carol@example.org", &format!("carried {index}"), "in the reply");
        // Blocking HTTP, before any peer runs on this runtime.
        written.push((node.append("dora@example.org", "INBOX", &raw).unwrap(), raw));
    }
    let address = node.listen_address().unwrap();
    let mut hostile = hostile_peer(&address, "test-carry").await;
    let peer = loop {
        match tokio::time::timeout(Duration::from_secs(20), hostile.events.recv()).await {
            Ok(Some(NetworkEvent::PeerConnected(peer))) => break peer,
            Ok(Some(_)) => {}
            _ => panic!("the node never connected"),
        }
    };
    // Keep the hand-made peer's events flowing, and answer the node's own session politely.
    let client = answer_with(hostile, |_| nothing_to_reconcile());
    // Ask as a replica holding nothing of the mailbox would.
    // The container of dora's emails: every mailbox of an account reconciles as one trie.
    let mailbox = MailboxKey::emails("dora@example.org").unwrap();
    let empty = MemoryTree::new(StoredDepth::MAILBOX);
    let limits = SyncLimits::default();
    let request = wire::Request::Reconcile {
        space: wire::WireSpace::Mailbox(mailbox),
        message: ByteString(sync::encode(&sync::initial(&empty, &limits).unwrap())),
        states: ByteString::default(),
        returned: ByteString::default(),
    };
    let answer = client.request(peer, wire::encode(&request)).await.unwrap();
    let Response::Reconcile {
        message,
        records,
        blobs,
        ..
    } = wire::decode::<Response>(&answer).unwrap()
    else {
        panic!("not a reconciliation reply");
    };
    let mut lacked: Vec<u128> = sync::decode(&message.0, &limits)
        .unwrap()
        .into_iter()
        .flat_map(|element| match element {
            Element::YouLack { keys } => keys,
            _ => vec![],
        })
        .collect();
    lacked.sort();
    let mut expected: Vec<u128> = written
        .iter()
        .map(|(id, _)| id.parse::<MessageId>().unwrap().0)
        .collect();
    expected.sort();
    assert_eq!(lacked, expected, "the reply names every message as lacking");
    let mut carried: Vec<u128> = records.iter().map(|record| record.id.0).collect();
    carried.sort();
    assert_eq!(carried, expected, "and carries each of their records");
    let mut carried_blobs: Vec<BlobHash> = blobs.iter().map(|bytes| BlobHash::of(&bytes.0)).collect();
    carried_blobs.sort();
    let mut expected_blobs: Vec<BlobHash> = written.iter().map(|(_, raw)| BlobHash::of(raw)).collect();
    expected_blobs.sort();
    assert_eq!(carried_blobs, expected_blobs, "with the bytes of each message");
    // The same in a batch, beside a mailbox the node does not know: one reply each, in order.
    let first = ByteString(sync::encode(&sync::initial(&empty, &limits).unwrap()));
    let unknown = MailboxKey::emails("nobody@example.org").unwrap();
    let batch = wire::Request::ReconcileMailboxes {
        mailboxes: vec![
            wire::MailboxMessage {
                mailbox: unknown,
                message: first.clone(),
            },
            wire::MailboxMessage {
                mailbox: MailboxKey::emails("dora@example.org").unwrap(),
                message: first,
            },
        ],
    };
    let answer = client.request(peer, wire::encode(&batch)).await.unwrap();
    let Response::ReconciledMailboxes { replies } = wire::decode::<Response>(&answer).unwrap() else {
        panic!("not a batch reply");
    };
    assert_eq!(replies.len(), 2);
    assert!(replies[0].records.is_empty() && replies[0].blobs.is_empty());
    assert!(sync::decode(&replies[0].message.0, &limits).unwrap().is_empty());
    let mut carried: Vec<u128> = replies[1].records.iter().map(|record| record.id.0).collect();
    carried.sort();
    assert_eq!(carried, expected, "the batch reply carries the same records");
    assert_eq!(replies[1].blobs.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_with_a_stamp_far_in_the_future_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let node = tokio::task::spawn_blocking({
        let path = directory.path().join("node");
        move || LocalNode::spawn(binary(), "target", &path, "test-future", &[], 200, &[]).unwrap()
    })
    .await
    .unwrap();
    let address = node.listen_address().unwrap();
    let mut hostile = hostile_peer(&address, "test-future").await;
    let mailbox = MailboxKey::emails("victim@example.org").unwrap();
    let raw = b"Subject: from the future\r\n\r\nhello".to_vec();
    let mut record = MessageRecord::new(
        MessageId::from_parts(1_767_225_600_000, 77),
        BlobHash::of(&raw),
        raw.len() as u64,
        1_767_225_600_000,
        NodeId(66),
    );
    record.place_in(mailmesh::mailbox::inbox_id("victim@example.org"));
    mailmesh::crdt::apply_flag(
        &mut record,
        Flag::Seen,
        true,
        Stamp {
            time: u64::MAX,
            node: NodeId(66),
        },
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut sequence = 0u64;
    while tokio::time::Instant::now() < deadline {
        // Answer the node's session politely (nothing to reconcile), and keep publishing.
        let next = tokio::time::timeout(Duration::from_millis(100), hostile.events.recv()).await;
        for event in next
            .ok()
            .flatten()
            .into_iter()
            .chain(std::iter::from_fn(|| hostile.events.try_recv().ok()))
        {
            if let NetworkEvent::Request { channel, .. } = event {
                let _ = hostile
                    .client
                    .respond(channel, wire::encode(&nothing_to_reconcile()))
                    .await;
            }
        }
        sequence += 1;
        let mut message = record.clone();
        message.received_millis += sequence % 2; // distinct content each time, as gossip IDs are content hashes
        message.id = MessageId::from_parts(1_767_225_600_000, 77 + u128::from(sequence));
        let gossip = Gossip::Operation {
            mailbox: mailbox.clone(),
            record: message,
            blob: Some(ByteString(raw.clone())),
        };
        let _ = hostile.client.publish(Topic::Operations, wire::encode(&gossip)).await;
        let log = std::fs::read_to_string(directory.path().join("node").join("node.log")).unwrap_or_default();
        if log.contains("refused an operation") && sequence > 5 {
            break;
        }
    }
    let received = node.get("/metrics").unwrap();
    let text = String::from_utf8_lossy(&received.body);
    assert!(
        text.lines()
            .any(|line| line.starts_with("mailmesh_gossip_messages_total{kind=\"operation\",direction=\"in\"}")),
        "the node never received the hostile gossip"
    );
    assert_eq!(
        node.get(&LocalNode::mailbox_path("victim@example.org", "INBOX"))
            .unwrap()
            .json()["count"],
        0,
        "a record stamped u64::MAX was stored"
    );
    assert_eq!(
        node.status().unwrap()["mailboxes"],
        0,
        "nothing of the hostile gossip reached the store"
    );
    let log = std::fs::read_to_string(directory.path().join("node").join("node.log")).unwrap();
    assert!(
        log.contains("refused an operation") && log.contains("ahead"),
        "the log does not say why the gossip was refused"
    );
}

/// Digest gossip a node has received.
fn digests_heard(node: &LocalNode) -> f64 {
    node.metric_sum(r#"mailmesh_gossip_messages_total{kind="digest",direction="in"}"#)
        .unwrap_or(0.0)
}

#[test]
fn a_replica_away_longer_than_the_tombstone_horizon_is_refused_resynchronisation() {
    let directory = tempfile::tempdir().unwrap();
    let first = LocalNode::spawn(
        binary(),
        "steady",
        &directory.path().join("steady"),
        "test-stale",
        &[],
        200,
        &[],
    )
    .unwrap();
    let seed = first.listen_address().unwrap();
    let mut away = LocalNode::spawn(
        binary(),
        "away",
        &directory.path().join("away"),
        "test-stale",
        &[seed.clone()],
        200,
        &[],
    )
    .unwrap();
    first
        .append(
            "stale@example.org",
            "INBOX",
            &sample_message("a@example.org", "before", "x"),
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || digests_agree(&[&first, &away])).is_some());
    // An agreeing digest from a connected peer is contact with the cluster, and is written down.
    // Two more digests from the healthy node: the first of them agrees (neither changed since),
    // and the second arrives after the first was handled.
    let heard = digests_heard(&away);
    assert!(
        wait_until(Duration::from_secs(60), || digests_heard(&away) >= heard + 2.0).is_some(),
        "the away node heard no digest from the healthy node"
    );
    away.kill();
    // Thirty-one days later by its clock, the away replica comes back.
    let mut returning = LocalNode::spawn_with_environment(
        binary(),
        "away",
        &directory.path().join("away"),
        "test-stale",
        &[seed],
        200,
        &[],
        &[("MAILMESH_CLOCK_OFFSET_MS", "2678400000")],
    )
    .unwrap();
    let status = returning.status().unwrap();
    assert_eq!(status["stale"], true, "{status}");
    assert_eq!(returning.get("/readyz").unwrap().status, 503);
    let log = std::fs::read_to_string(directory.path().join("away").join("node.log")).unwrap();
    assert!(
        log.contains("tombstone horizon") && log.contains("rejoin empty"),
        "the log does not tell the operator what to do"
    );
    // It takes nothing in and gives nothing out, and the healthy node does not treat it as hostile.
    let heard = digests_heard(&returning);
    first
        .append(
            "stale@example.org",
            "INBOX",
            &sample_message("a@example.org", "after", "y"),
        )
        .unwrap();
    // The healthy node pushes the write at once and announces its new digest; by the second
    // digest heard since the write (a heartbeat, thirty gossip ticks after the first), the push
    // and a session the new digest could have opened would both have been taken in.
    assert!(
        wait_until(Duration::from_secs(60), || digests_heard(&returning) >= heard + 2.0).is_some(),
        "the returning node heard no digest from the healthy node"
    );
    assert_eq!(returning.messages("stale@example.org", "INBOX").unwrap().len(), 1);
    assert_eq!(first.metric_sum("mailmesh_peers_penalised_total").unwrap(), 0.0);
    // Emptied, it rejoins and fills up.
    returning.kill();
    std::fs::remove_dir_all(directory.path().join("away").join("store")).unwrap();
    std::fs::remove_dir_all(directory.path().join("away").join("search")).unwrap();
    returning.restart().unwrap();
    assert_eq!(returning.status().unwrap()["stale"], false);
    assert!(wait_until(Duration::from_secs(60), || returning
        .messages("stale@example.org", "INBOX")
        .map(|list| list.len() == 2)
        .unwrap_or(false))
    .is_some());
}

#[test]
fn only_listed_peers_and_holders_of_the_cluster_key_get_in() {
    let directory = tempfile::tempdir().unwrap();
    let path = |name: &str| directory.path().join(name);
    let key = path("swarm.key");
    std::fs::write(&key, format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32))).unwrap();
    let other_key = path("other.key");
    std::fs::write(&other_key, "cd".repeat(32)).unwrap();
    let with_key = |file: &std::path::Path| vec!["--cluster-key".to_owned(), file.display().to_string()];
    let friend = LocalNode::spawn(
        binary(),
        "friend",
        &path("friend"),
        "test-access",
        &[],
        200,
        &with_key(&key),
    )
    .unwrap();
    let friend_id = friend.status().unwrap()["peer_id"].as_str().unwrap().to_owned();
    let mut arguments = with_key(&key);
    arguments.extend(["--allow-peer".to_owned(), friend_id.clone()]);
    let guarded = LocalNode::spawn(
        binary(),
        "guarded",
        &path("guarded"),
        "test-access",
        &[friend.listen_address().unwrap()],
        200,
        &arguments,
    )
    .unwrap();
    // A node holding another cluster key knocks (it dials the guarded node: the guarded node
    // would never dial it, as it is not on the allow list).
    let outsider = LocalNode::spawn(
        binary(),
        "outsider",
        &path("outsider"),
        "test-access",
        &[guarded.listen_address().unwrap()],
        200,
        &with_key(&other_key),
    )
    .unwrap();
    // A node with the right key but not on the list knocks.
    let stranger = LocalNode::spawn(
        binary(),
        "stranger",
        &path("stranger"),
        "test-access",
        &[guarded.listen_address().unwrap()],
        200,
        &with_key(&key),
    )
    .unwrap();
    let connected = |node: &LocalNode| -> Vec<String> {
        node.status().unwrap()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|peer| peer["peer_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || connected(&guarded)
            == vec![friend_id.clone()])
        .is_some(),
        "{:?}",
        connected(&guarded)
    );
    assert!(
        wait_until(Duration::from_secs(30), || guarded
            .metric_sum("mailmesh_net_peers_refused_total")
            .unwrap_or(0.0)
            >= 1.0)
        .is_some(),
        "the refusal of the unlisted peer was not counted"
    );
    // The unlisted peer redials (a second later) and is refused again.
    assert!(
        wait_until(Duration::from_secs(30), || guarded
            .metric_sum("mailmesh_net_peers_refused_total")
            .unwrap_or(0.0)
            >= 2.0)
        .is_some(),
        "the unlisted peer's redial was not refused"
    );
    // The node with the other key fails the handshake: the guarded node counts it.
    assert!(
        wait_until(Duration::from_secs(30), || guarded
            .metric_sum("mailmesh_net_inbound_handshake_failures_total")
            .unwrap_or(0.0)
            >= 1.0)
        .is_some(),
        "the guarded node saw no failed handshake from the node with another key"
    );
    assert_eq!(
        connected(&guarded),
        vec![friend_id],
        "only the listed peer holding the key is connected"
    );
    assert!(
        connected(&outsider).is_empty(),
        "a node with another cluster key got in: {:?}",
        connected(&outsider)
    );
    // Data flows between the admitted pair.
    guarded
        .append(
            "access@example.org",
            "INBOX",
            &sample_message("g@example.org", "hello", "x"),
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || digests_agree(&[&guarded, &friend])).is_some());
    assert_ne!(stranger.digest().unwrap(), guarded.digest().unwrap());
    let log = std::fs::read_to_string(path("guarded").join("node.log")).unwrap();
    assert!(log.contains("not on the allow list"), "the refusal is not logged");
}

#[test]
fn a_full_disk_answers_507_writes_nothing_and_writes_resume_once_space_returns() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("node.toml");
    // Demand more free space than any disk has: every write meets a "full" disk.
    std::fs::write(&config, "min_free_bytes = 4611686018427387904\n").unwrap();
    let data = directory.path().join("node");
    let mut node = LocalNode::spawn(
        binary(),
        "full",
        &data,
        "test-full",
        &[],
        200,
        &["--config".into(), config.display().to_string()],
    )
    .unwrap();
    let response = node
        .send(
            "POST",
            "/v1/mailboxes/full%40example.org/INBOX/messages",
            b"Subject: no room\r\n\r\nx",
        )
        .unwrap();
    assert_eq!(response.status, 507, "{}", String::from_utf8_lossy(&response.body));
    assert!(response.json()["error"].as_str().unwrap().contains("disk space"));
    assert_eq!(
        node.get("/v1/mailboxes/full%40example.org/INBOX").unwrap().json()["count"],
        0,
        "something was half-written"
    );
    assert_eq!(node.status().unwrap()["mailboxes"], 0, "something was half-written");
    // Space returns (here: the reserve is lowered) and the same node takes writes again.
    node.kill();
    std::fs::write(&config, "min_free_bytes = 1024\n").unwrap();
    node.restart().unwrap();
    node.append("full@example.org", "INBOX", b"Subject: room again\r\n\r\nx")
        .unwrap();
    assert_eq!(node.messages("full@example.org", "INBOX").unwrap().len(), 1);
}

#[test]
fn small_answer_limits_page_every_record_and_blob_across_and_are_counted() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("node.toml");
    // Tiny answers: 7 records per answer, 9 IDs per fetch, 4 KiB blob chunks, nothing inline,
    // and two requests of a peer at a time. Everything must still arrive, in pages.
    std::fs::write(
        &config,
        "max_records_per_response = 7\nmax_ids_per_request = 9\nblob_chunk_bytes = 4096\n\
         inline_blob_bytes = 0\nmax_requests_in_flight_per_peer = 2\n",
    )
    .unwrap();
    let extra = ["--config".to_string(), config.display().to_string()];
    let origin = LocalNode::spawn(
        binary(),
        "origin",
        &directory.path().join("origin"),
        "test-limits",
        &[],
        200,
        &extra,
    )
    .unwrap();
    for index in 0..40 {
        let body = format!("{index} {}", "paged body text ".repeat(300 + index * 37));
        origin
            .append(
                "limits@example.org",
                if index % 2 == 0 { "INBOX" } else { "Archive" },
                &sample_message("p@example.org", &format!("message {index}"), &body),
            )
            .unwrap();
    }
    let late = LocalNode::spawn(
        binary(),
        "late",
        &directory.path().join("late"),
        "test-limits",
        &[origin.listen_address().unwrap()],
        200,
        &extra,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || digests_agree(&[&origin, &late])).is_some(),
        "the late node did not catch up through small pages"
    );
    for mailbox in ["INBOX", "Archive"] {
        let mut want = origin.messages("limits@example.org", mailbox).unwrap();
        let mut got = late.messages("limits@example.org", mailbox).unwrap();
        want.sort();
        got.sort();
        assert_eq!(got.len(), 20);
        assert_eq!(got, want, "{mailbox} differs");
    }
    // Every blob arrived whole (each is over 4 KiB, so in several chunks) and verified.
    for mailbox in ["INBOX", "Archive"] {
        for (id, _) in late.messages("limits@example.org", mailbox).unwrap() {
            let path = format!(
                "{}/messages/{id}/raw",
                LocalNode::mailbox_path("limits@example.org", mailbox)
            );
            let (mine, theirs) = (late.get(&path).unwrap(), origin.get(&path).unwrap());
            assert_eq!(mine.status, 200);
            assert!(mine.body.len() > 4096);
            assert_eq!(mine.body, theirs.body, "message {id} differs");
        }
    }
    let cut = origin
        .metric_sum(r#"mailmesh_limits_hit_total{limit="records_per_response"}"#)
        .unwrap()
        + late
            .metric_sum(r#"mailmesh_limits_hit_total{limit="records_per_response"}"#)
            .unwrap();
    assert!(cut >= 1.0, "no answer was cut at max_records_per_response");
    // Blob fetches run 16 at a time, over the limit of 2: some were declined, retried, and arrived.
    let declined = origin
        .metric_sum(r#"mailmesh_limits_hit_total{limit="peer_requests_in_flight"}"#)
        .unwrap()
        + late
            .metric_sum(r#"mailmesh_limits_hit_total{limit="peer_requests_in_flight"}"#)
            .unwrap();
    assert!(
        declined >= 1.0,
        "no request was declined at max_requests_in_flight_per_peer"
    );
    assert_eq!(late.metric_sum("mailmesh_peers_penalised_total").unwrap(), 0.0);
    assert_eq!(origin.metric_sum("mailmesh_peers_penalised_total").unwrap(), 0.0);
}

#[test]
fn a_closed_cluster_collects_tombstones_once_every_member_holds_them() {
    let directory = tempfile::tempdir().unwrap();
    let names = ["left", "middle", "right"];
    let keys: Vec<Keypair> = names.iter().map(|_| Keypair::generate_ed25519()).collect();
    let ids: Vec<String> = keys.iter().map(|key| key.public().to_peer_id().to_string()).collect();
    for (name, key) in names.iter().zip(&keys) {
        let data = directory.path().join(name);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("identity.key"), key.to_protobuf_encoding().unwrap()).unwrap();
    }
    // Each node lists the other two: the membership is closed.
    let allow = |index: usize| -> Vec<String> {
        ids.iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .flat_map(|(_, id)| ["--allow-peer".to_owned(), id.clone()])
            .collect()
    };
    let spawn = |index: usize, peers: &[String]| {
        LocalNode::spawn(
            binary(),
            names[index],
            &directory.path().join(names[index]),
            "test-acknowledged",
            peers,
            100,
            &allow(index),
        )
        .unwrap()
    };
    let left = spawn(0, &[]);
    let middle = spawn(1, &[left.listen_address().unwrap()]);
    let right = spawn(2, &[left.listen_address().unwrap(), middle.listen_address().unwrap()]);
    let nodes = [&left, &middle, &right];
    let mut messages = Vec::new();
    for index in 0..12 {
        let node = nodes[index % 3];
        let raw = sample_message("t@example.org", &format!("note {index}"), "body");
        messages.push(node.append("gc@example.org", "INBOX", &raw).unwrap());
    }
    assert!(wait_until(Duration::from_secs(30), || digests_agree(&nodes)).is_some());
    let mailbox = LocalNode::mailbox_path("gc@example.org", "INBOX");
    let tombstones = |node: &LocalNode| node.get(&mailbox).unwrap().json()["tombstones"].as_u64().unwrap();
    // Expunges made on different members.
    for (index, id) in messages.iter().take(4).enumerate() {
        let response = nodes[index % 3]
            .send("DELETE", &format!("{mailbox}/messages/{id}"), b"")
            .unwrap();
        assert_eq!(response.status, 204, "{}", String::from_utf8_lossy(&response.body));
    }
    // Every member takes the expunges, reports the same digest, and then collects the tombstones,
    // thirty days before the horizon would.
    let collected = wait_until(Duration::from_secs(60), || {
        digests_agree(&nodes) && nodes.iter().all(|node| tombstones(node) == 0)
    });
    assert!(
        collected.is_some(),
        "tombstones left: {:?}",
        nodes.iter().map(|node| tombstones(node)).collect::<Vec<_>>()
    );
    for node in nodes {
        let listed: Vec<String> = node
            .messages("gc@example.org", "INBOX")
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(listed.len(), 8);
        assert!(
            messages.iter().take(4).all(|id| !listed.contains(id)),
            "an expunged message came back"
        );
        assert!(
            node.status().unwrap()["tombstones_acknowledged_before"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    // The cut keeps moving: a later expunge is collected too, and the members still agree.
    let response = middle
        .send("DELETE", &format!("{mailbox}/messages/{}", messages[7]), b"")
        .unwrap();
    assert_eq!(response.status, 204);
    assert!(wait_until(Duration::from_secs(60), || {
        digests_agree(&nodes) && nodes.iter().all(|node| tombstones(node) == 0)
    })
    .is_some());
    assert_eq!(left.messages("gc@example.org", "INBOX").unwrap().len(), 7);
}

// ---------------------------------------------------------------------------------------------
// What a peer sends is checked: blobs against their hashes and the size limit, stamps against
// the clock bound, frames against the transport's limits. Each test below sends one kind of bad
// data through a path nodes use (a push, a blob fetch, a reconciliation reply), then checks that
// nothing of it was kept, that the peer was counted (and blocked where it is to blame), and that
// the node still takes the right data from an honest peer afterwards.
// ---------------------------------------------------------------------------------------------

const INTEGRITY_ACCOUNT: &str = "integrity@example.org";
/// How long a test waits for a condition before it fails.
const CONDITION_DEADLINE: Duration = Duration::from_secs(60);

fn wall_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The same number of bytes with the last one changed: what a peer announced, another hash.
fn corrupted(raw: &[u8]) -> Vec<u8> {
    let mut bytes = raw.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    bytes
}

fn nothing_to_reconcile() -> Response {
    Response::Reconcile {
        message: ByteString(sync::encode(&[])),
        records: vec![],
        blobs: vec![],
        states: ByteString::default(),
        returned: ByteString::default(),
    }
}

/// A record of `raw` in the integrity mailbox, as its origin would have written it.
fn record_of(raw: &[u8], random: u128) -> MessageRecord {
    let mut record = MessageRecord::new(
        MessageId::from_parts(1_767_225_600_000, random),
        BlobHash::of(raw),
        raw.len() as u64,
        1_767_225_600_000,
        NodeId(66),
    );
    record.place_in(mailmesh::mailbox::inbox_id(INTEGRITY_ACCOUNT));
    record
}

/// The container of the integrity account's emails (all its mailboxes reconcile as one trie).
fn integrity_mailbox() -> MailboxKey {
    MailboxKey::emails(INTEGRITY_ACCOUNT).unwrap()
}

/// Starts a node process (on a blocking thread: the harness speaks blocking HTTP), with `config`
/// as its TOML configuration when given.
async fn spawn_node(directory: &std::path::Path, name: &str, cluster: &str, config: &str) -> LocalNode {
    let path = directory.join(name);
    let config_file = directory.join(format!("{name}.toml"));
    let (name, cluster, config) = (name.to_owned(), cluster.to_owned(), config.to_owned());
    tokio::task::spawn_blocking(move || {
        std::fs::write(&config_file, config).unwrap();
        let extra = ["--config".to_owned(), config_file.display().to_string()];
        LocalNode::spawn(binary(), &name, &path, &cluster, &[], 200, &extra).unwrap()
    })
    .await
    .unwrap()
}

/// Polls `check` (blocking HTTP against node processes) every 50 ms until it holds; fails the
/// test, saying what it waited for, once [`CONDITION_DEADLINE`] passes.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        if tokio::task::block_in_place(&mut check) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {CONDITION_DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(node: &LocalNode, series: &str) -> f64 {
    tokio::task::block_in_place(|| node.metric_sum(series).unwrap())
}

/// Waits until a hand-made peer is connected to the node; returns the node's peer ID.
async fn node_of(peer: &mut Hostile) -> net::PeerId {
    loop {
        match tokio::time::timeout(CONDITION_DEADLINE, peer.events.recv()).await {
            Ok(Some(NetworkEvent::PeerConnected(node))) => return node,
            Ok(Some(_)) => {}
            _ => panic!("the node never connected to the hand-made peer"),
        }
    }
}

/// Hands every request the node sends a hand-made peer to `on_request`, and accepts its gossip,
/// on a task of its own; returns the client for the peer's own requests.
fn serve_requests(
    peer: Hostile,
    on_request: impl Fn(net::NetworkClient, Vec<u8>, net::ResponseHandle) + Send + 'static,
) -> net::NetworkClient {
    let Hostile { client, mut events } = peer;
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                NetworkEvent::Request { data, channel, .. } => on_request(responder.clone(), data, channel),
                NetworkEvent::Gossip {
                    message_id,
                    propagation_source,
                    ..
                } => {
                    let _ = responder.report_validation(message_id, propagation_source, true).await;
                }
                _ => {}
            }
        }
    });
    client
}

/// Answers every request the node sends a hand-made peer with `answer`, and accepts its gossip.
fn answer_with(
    peer: Hostile,
    answer: impl Fn(wire::Request) -> Response + Send + Sync + 'static,
) -> net::NetworkClient {
    serve_requests(peer, move |responder, data, channel| {
        let response = match wire::decode::<wire::Request>(&data) {
            Ok(request) => answer(request),
            Err(error) => Response::Error {
                message: error.to_string(),
            },
        };
        tokio::spawn(async move {
            let _ = responder.respond(channel, wire::encode(&response)).await;
        });
    })
}

/// The messages of the integrity mailbox a node lists, by ID.
fn listed(node: &LocalNode) -> Vec<String> {
    tokio::task::block_in_place(|| {
        node.messages(INTEGRITY_ACCOUNT, "INBOX")
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    })
}

fn raw_of(node: &LocalNode, id: MessageId) -> (u16, Vec<u8>) {
    let path = format!(
        "{}/messages/{id}/raw",
        LocalNode::mailbox_path(INTEGRITY_ACCOUNT, "INBOX")
    );
    let response = tokio::task::block_in_place(|| node.get(&path).unwrap());
    (response.status, response.body)
}

/// After a peer sent bad data for `record`: the record is not listed (no listing of bad bytes,
/// no record whose body never arrives), and the peer was counted for `reason` and blocked.
fn assert_nothing_kept_and_peer_blocked(node: &LocalNode, id: MessageId, peer: net::PeerId, reason: &str) {
    assert!(
        !listed(node).contains(&id.to_string()),
        "the record that came with bad data is listed"
    );
    assert_eq!(raw_of(node, id).0, 404, "the record's body is served");
    let penalised = metric(node, &format!(r#"mailmesh_peers_penalised_total{{reason="{reason}"}}"#));
    assert!(penalised >= 1.0, "the peer was not penalised for {reason}");
    let status = tokio::task::block_in_place(|| node.status().unwrap());
    let blocked = status["blocked"].as_array().cloned().unwrap_or_default();
    assert!(
        blocked
            .iter()
            .any(|entry| entry["peer_id"] == peer.to_string().as_str()),
        "the peer that sent bad data is not blocked: {blocked:?}"
    );
}

/// An honest peer pushes `record` with its right bytes: the node acknowledges it, lists it and
/// serves exactly those bytes.
async fn assert_taken_from_an_honest_peer(node: &LocalNode, cluster: &str, record: &MessageRecord, raw: &[u8]) {
    let address = tokio::task::block_in_place(|| node.listen_address().unwrap());
    let mut honest = hostile_peer(&address, cluster).await;
    let node_peer = node_of(&mut honest).await;
    let client = answer_with(honest, |_| nothing_to_reconcile());
    let push = wire::Request::Push {
        mailbox: integrity_mailbox(),
        record: record.clone(),
        blob: Some(ByteString(raw.to_vec())),
    };
    let answer = client.request(node_peer, wire::encode(&push)).await.unwrap();
    assert_eq!(wire::decode::<Response>(&answer).unwrap(), Response::Ack);
    assert!(
        listed(node).contains(&record.id.to_string()),
        "the honest push is not listed"
    );
    assert_eq!(
        raw_of(node, record.id),
        (200, raw.to_vec()),
        "the node serves other bytes"
    );
}

/// A hand-made peer pushes a record whose blob it brings inline as `inline`, or, when that is
/// `None`, answers the node's blob fetches with `blob_answer(offset)`. The push must not be
/// acknowledged, nothing of it kept, the peer blocked for `reason`; an honest push of the same
/// record afterwards is taken whole.
async fn assert_bad_pushed_bytes_refused(
    cluster: &str,
    config: &str,
    inline: Option<Vec<u8>>,
    blob_answer: impl Fn(u64) -> Response + Send + Sync + 'static,
    reason: &str,
) {
    let raw = sample_message("mallory@example.org", "pushed", "the right bytes");
    assert_pushed_record_refused(cluster, config, &raw, inline, blob_answer, reason, &raw).await;
}

/// The same for a record of `raw`; the honest push afterwards brings a record of `honest_raw`.
async fn assert_pushed_record_refused(
    cluster: &str,
    config: &str,
    raw: &[u8],
    inline: Option<Vec<u8>>,
    blob_answer: impl Fn(u64) -> Response + Send + Sync + 'static,
    reason: &str,
    honest_raw: &[u8],
) {
    let directory = tempfile::tempdir().unwrap();
    let node = spawn_node(directory.path(), "target", cluster, config).await;
    let record = record_of(raw, 901);
    let address = tokio::task::block_in_place(|| node.listen_address().unwrap());
    let mut hostile = hostile_peer(&address, cluster).await;
    let hostile_id = hostile.client.local_peer_id();
    let node_peer = node_of(&mut hostile).await;
    let client = answer_with(hostile, move |request| match request {
        wire::Request::FetchBlob { offset, .. } => blob_answer(offset),
        wire::Request::Reconcile { .. } => nothing_to_reconcile(),
        _ => Response::Error {
            message: "not answered by this test".into(),
        },
    });
    let push = wire::Request::Push {
        mailbox: integrity_mailbox(),
        record: record.clone(),
        blob: inline.map(ByteString),
    };
    // The node blocks the peer while it answers, so the answer may be a closed connection.
    let answer = client.request(node_peer, wire::encode(&push)).await;
    let decoded = answer.as_deref().map(wire::decode::<Response>);
    assert!(
        !matches!(decoded, Ok(Ok(Response::Ack))),
        "the node acknowledged a push with bad bytes"
    );
    eventually("the peer to be penalised", || {
        node.metric_sum(&format!(r#"mailmesh_peers_penalised_total{{reason="{reason}"}}"#))
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert_nothing_kept_and_peer_blocked(&node, record.id, hostile_id, reason);
    if reason == "blob_hash_mismatch" {
        assert!(
            metric(&node, "mailmesh_blobs_rejected_total") >= 1.0,
            "the wrong bytes were not counted"
        );
    }
    assert_taken_from_an_honest_peer(&node, cluster, &record_of(honest_raw, 901), honest_raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_wrong_inline_blob_is_refused_and_the_peer_blocked() {
    let raw = sample_message("mallory@example.org", "pushed", "the right bytes");
    assert_bad_pushed_bytes_refused(
        "test-push-inline",
        "",
        Some(corrupted(&raw)),
        |_| Response::Blob { bytes: None, total: 0 },
        "blob_hash_mismatch",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_fetch_answered_with_wrong_bytes_is_refused_and_counted() {
    let raw = sample_message("mallory@example.org", "pushed", "the right bytes");
    let wrong = corrupted(&raw);
    let total = wrong.len() as u64;
    assert_bad_pushed_bytes_refused(
        "test-fetch-wrong",
        "",
        None,
        move |offset| Response::Blob {
            bytes: Some(ByteString(wrong[offset as usize..].to_vec())),
            total,
        },
        "blob_hash_mismatch",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_claiming_one_byte_over_the_size_limit_is_refused() {
    let raw = sample_message("mallory@example.org", "pushed", "the right bytes");
    // The right bytes, but the peer claims the blob is one byte over this node's limit.
    assert_bad_pushed_bytes_refused(
        "test-fetch-over",
        "max_message_bytes = 4096\n",
        None,
        move |offset| Response::Blob {
            bytes: Some(ByteString(raw[offset as usize..].to_vec())),
            total: 4097,
        },
        "protocol_violation",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_blob_one_byte_over_the_size_limit_is_refused() {
    // Its hash is right, but it is one byte over this node's limit.
    let mut raw = sample_message("mallory@example.org", "pushed", "");
    raw.resize(4097, b'x');
    let honest = sample_message("honest@example.org", "within the limit", "the right bytes");
    assert_pushed_record_refused(
        "test-push-over",
        "max_message_bytes = 4096\n",
        &raw,
        Some(raw.clone()),
        |_| Response::Blob { bytes: None, total: 0 },
        "protocol_violation",
        &honest,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_stops_short_is_refused() {
    let raw = sample_message("mallory@example.org", "pushed", "the right bytes");
    let total = raw.len() as u64;
    // Half the bytes, then an empty chunk although the blob is said to be longer.
    assert_bad_pushed_bytes_refused(
        "test-fetch-short",
        "",
        None,
        move |offset| {
            let half = raw.len() / 2;
            let chunk = if offset == 0 { raw[..half].to_vec() } else { Vec::new() };
            Response::Blob {
                bytes: Some(ByteString(chunk)),
                total,
            }
        },
        "protocol_violation",
    )
    .await;
}

/// A hand-made replica that serves a target node the data of a source node: the target's
/// requests go to the source through a second peer in the source's own cluster (so the two
/// nodes never meet, not even by gossip), and the source's answers come back through `tamper`.
/// It announces a digest that differs from the target's, so the target opens sessions with it.
struct Relay {
    front: net::PeerId,
    /// Every request the target sent the relay.
    requests: tokio::sync::mpsc::UnboundedReceiver<wire::Request>,
}

async fn relay(
    target: &LocalNode,
    target_cluster: &str,
    source: &LocalNode,
    source_cluster: &str,
    tamper: fn(Response) -> Response,
) -> Relay {
    let source_address = tokio::task::block_in_place(|| source.listen_address().unwrap());
    let mut back = hostile_peer(&source_address, source_cluster).await;
    let source_peer = node_of(&mut back).await;
    // The source's own sessions with the relay find nothing to take.
    let back = answer_with(back, |request| match request {
        wire::Request::Reconcile { .. } => nothing_to_reconcile(),
        _ => Response::Error {
            message: "the relay answers nothing else".into(),
        },
    });
    let target_address = tokio::task::block_in_place(|| target.listen_address().unwrap());
    let mut front = hostile_peer(&target_address, target_cluster).await;
    let front_id = front.client.local_peer_id();
    node_of(&mut front).await;
    let (copies, requests) = tokio::sync::mpsc::unbounded_channel();
    let publisher = front.client.clone();
    // Not a wait: the relay keeps announcing a differing digest, as a peer's heartbeat would, so
    // the target keeps opening sessions with it; nothing below waits on this cadence.
    tokio::spawn(async move {
        for sequence in 1u64.. {
            let _ = publisher
                .publish(Topic::Digests, differing_digest_of(front_id, "relay", sequence))
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    serve_requests(front, move |responder, data, channel| {
        if let Ok(request) = wire::decode::<wire::Request>(&data) {
            let _ = copies.send(request);
        }
        let back = back.clone();
        tokio::spawn(async move {
            let answer = match back.request(source_peer, data).await {
                Ok(answer) => match wire::decode::<Response>(&answer) {
                    Ok(response) => wire::encode(&tamper(response)),
                    Err(_) => answer,
                },
                Err(error) => wire::encode(&Response::Error {
                    message: format!("relay: {error}"),
                }),
            };
            let _ = responder.respond(channel, answer).await;
        });
    });
    Relay {
        front: front_id,
        requests,
    }
}

fn passed_through(response: Response) -> Response {
    response
}

fn corrupt_all(blobs: Vec<ByteString>) -> Vec<ByteString> {
    blobs.into_iter().map(|blob| ByteString(corrupted(&blob.0))).collect()
}

/// Changes every blob that travels inline with records in replies and record fetches.
fn corrupt_inline_blobs(response: Response) -> Response {
    match response {
        Response::Reconcile {
            message,
            records,
            blobs,
            states,
            returned,
        } => Response::Reconcile {
            message,
            records,
            blobs: corrupt_all(blobs),
            states,
            returned,
        },
        Response::ReconciledMailboxes { mut replies } => {
            for reply in &mut replies {
                reply.blobs = corrupt_all(std::mem::take(&mut reply.blobs));
            }
            Response::ReconciledMailboxes { replies }
        }
        Response::Records { records, more, blobs } => Response::Records {
            records,
            more,
            blobs: corrupt_all(blobs),
        },
        other => other,
    }
}

/// Changes the bytes of every blob fetch answer.
fn corrupt_fetched_blobs(response: Response) -> Response {
    match response {
        Response::Blob {
            bytes: Some(bytes),
            total,
        } if !bytes.0.is_empty() => Response::Blob {
            bytes: Some(ByteString(corrupted(&bytes.0))),
            total,
        },
        other => other,
    }
}

const A_DAY_MILLIS: u64 = 24 * 60 * 60 * 1000;

/// Flags every record in replies and record fetches with a stamp a day ahead of the wall
/// clock, far past the node's bound (two hours by default).
fn stamp_a_day_ahead(response: Response) -> Response {
    let stamp = Stamp {
        time: mailmesh::crdt::physical_time(wall_millis() + A_DAY_MILLIS),
        node: NodeId(66),
    };
    let far = |records: &mut Vec<MessageRecord>| {
        for record in records {
            mailmesh::crdt::apply_flag(record, Flag::Flagged, true, stamp);
        }
    };
    match response {
        Response::Reconcile {
            message,
            mut records,
            blobs,
            states,
            returned,
        } => {
            far(&mut records);
            Response::Reconcile {
                message,
                records,
                blobs,
                states,
                returned,
            }
        }
        Response::ReconciledMailboxes { mut replies } => {
            for reply in &mut replies {
                far(&mut reply.records);
            }
            Response::ReconciledMailboxes { replies }
        }
        Response::Records {
            mut records,
            more,
            blobs,
        } => {
            far(&mut records);
            Response::Records { records, more, blobs }
        }
        other => other,
    }
}

/// A source node holds three messages; a relay serves them to an empty target through
/// `tamper`. The target must keep none of them, block the relay for `reason`, and then take all
/// three whole from an honest relay. Returns the nodes, the honest relay and the messages.
async fn assert_relayed_bad_data_refused(
    cluster: &str,
    source_config: &str,
    tamper: fn(Response) -> Response,
    reason: &str,
) -> (
    tempfile::TempDir,
    LocalNode,
    LocalNode,
    Relay,
    Vec<(MessageId, Vec<u8>)>,
) {
    let directory = tempfile::tempdir().unwrap();
    let source_cluster = format!("{cluster}-source");
    let source = spawn_node(directory.path(), "source", &source_cluster, source_config).await;
    let mut messages = Vec::new();
    for index in 0..3 {
        let raw = sample_message("source@example.org", &format!("relayed {index}"), "the right bytes");
        let id = tokio::task::block_in_place(|| source.append(INTEGRITY_ACCOUNT, "INBOX", &raw).unwrap());
        messages.push((id.parse::<MessageId>().unwrap(), raw));
    }
    let target = spawn_node(directory.path(), "target", cluster, "").await;
    let bad = relay(&target, cluster, &source, &source_cluster, tamper).await;
    let penalised = format!(r#"mailmesh_peers_penalised_total{{reason="{reason}"}}"#);
    eventually(&format!("the relay to be penalised for {reason}"), || {
        target.metric_sum(&penalised).unwrap_or(0.0) >= 1.0
    })
    .await;
    for (id, _) in &messages {
        assert_nothing_kept_and_peer_blocked(&target, *id, bad.front, reason);
    }
    let honest = relay(&target, cluster, &source, &source_cluster, passed_through).await;
    let ids: Vec<String> = messages.iter().map(|(id, _)| id.to_string()).collect();
    eventually("the target to take every message from the honest relay", || {
        let listed = listed(&target);
        ids.iter().all(|id| listed.contains(id))
    })
    .await;
    for (id, raw) in &messages {
        assert_eq!(raw_of(&target, *id), (200, raw.clone()), "message {id} differs");
    }
    (directory, target, source, honest, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_reply_with_wrong_inline_blobs_is_refused_and_the_peer_blocked() {
    let (_directory, target, ..) =
        assert_relayed_bad_data_refused("test-reply-inline", "", corrupt_inline_blobs, "protocol_violation").await;
    assert!(metric(&target, "mailmesh_blobs_rejected_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_blob_fetch_answered_with_wrong_bytes_is_refused_and_the_peer_blocked() {
    // Nothing inline: every blob is fetched, and every fetch answer is wrong.
    let (_directory, target, ..) = assert_relayed_bad_data_refused(
        "test-reply-fetch",
        "inline_blob_bytes = 0\n",
        corrupt_fetched_blobs,
        "blob_hash_mismatch",
    )
    .await;
    assert!(metric(&target, "mailmesh_blobs_rejected_total") >= 1.0);
}

/// Makes a flag change on `node` and reads its stamp from the push an observer peer receives:
/// the node's clock must be below `far_millis`, where a refused stamp would have taken it.
async fn assert_clock_below(
    node: &LocalNode,
    requests: &mut tokio::sync::mpsc::UnboundedReceiver<wire::Request>,
    far_millis: u64,
) {
    let raw = sample_message("clock@example.org", "clock", "stamped here");
    let id = tokio::task::block_in_place(|| node.append(INTEGRITY_ACCOUNT, "Clock", &raw).unwrap());
    let flags = format!(
        "{}/messages/{id}/flags",
        LocalNode::mailbox_path(INTEGRITY_ACCOUNT, "Clock")
    );
    let status = tokio::task::block_in_place(|| node.send("POST", &flags, br#"{"add":["\\Seen"]}"#).unwrap().status);
    assert_eq!(status, 200);
    // The node pushes the change to every connected peer, stamped by its clock.
    let stamp = loop {
        let request = tokio::time::timeout(CONDITION_DEADLINE, requests.recv())
            .await
            .expect("the node never pushed the flag change")
            .expect("the observer stopped");
        if let wire::Request::Push { record, .. } = request {
            if record.id.to_string() == id {
                if let Some(register) = record.flags.get(&Flag::Seen) {
                    break register.stamp;
                }
            }
        }
    };
    let millis = mailmesh::crdt::millis_of(stamp.time);
    assert!(
        millis < far_millis,
        "the clock moved to {millis}, at or past the refused stamp's {far_millis}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_reply_stamped_far_ahead_is_refused_and_the_clock_stays() {
    let started = wall_millis();
    let (_directory, target, _source, mut honest, messages) =
        assert_relayed_bad_data_refused("test-reply-future", "", stamp_a_day_ahead, "stamp_too_far_ahead").await;
    // The honest copies carry no trace of the refused flag.
    let listing = tokio::task::block_in_place(|| target.messages(INTEGRITY_ACCOUNT, "INBOX").unwrap());
    assert_eq!(listing.len(), messages.len());
    assert!(listing.iter().all(|(_, flags)| flags.is_empty()), "{listing:?}");
    assert_clock_below(&target, &mut honest.requests, started + A_DAY_MILLIS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stamped_far_ahead_is_refused_and_the_clock_stays() {
    let cluster = "test-push-future";
    let directory = tempfile::tempdir().unwrap();
    let node = spawn_node(directory.path(), "target", cluster, "").await;
    let raw = sample_message("mallory@example.org", "from the future", "right bytes, wrong time");
    let far_millis = wall_millis() + A_DAY_MILLIS;
    let mut record = record_of(&raw, 902);
    mailmesh::crdt::apply_flag(
        &mut record,
        Flag::Flagged,
        true,
        Stamp {
            time: mailmesh::crdt::physical_time(far_millis),
            node: NodeId(66),
        },
    );
    let address = tokio::task::block_in_place(|| node.listen_address().unwrap());
    let mut hostile = hostile_peer(&address, cluster).await;
    let hostile_id = hostile.client.local_peer_id();
    let node_peer = node_of(&mut hostile).await;
    let client = answer_with(hostile, |_| nothing_to_reconcile());
    let push = wire::Request::Push {
        mailbox: integrity_mailbox(),
        record: record.clone(),
        blob: Some(ByteString(raw.clone())),
    };
    let answer = client.request(node_peer, wire::encode(&push)).await;
    assert!(
        !matches!(answer.as_deref().map(wire::decode::<Response>), Ok(Ok(Response::Ack))),
        "the node acknowledged a record stamped a day ahead"
    );
    eventually("the peer to be penalised", || {
        node.metric_sum(r#"mailmesh_peers_penalised_total{reason="stamp_too_far_ahead"}"#)
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert_nothing_kept_and_peer_blocked(&node, record.id, hostile_id, "stamp_too_far_ahead");
    // An observer sees the node's next stamp; the same message without the flag is taken.
    let mut observer = hostile_peer(&address, cluster).await;
    let observer_id = observer.client.local_peer_id().to_string();
    node_of(&mut observer).await;
    let (copies, mut requests) = tokio::sync::mpsc::unbounded_channel();
    let _observer = answer_with(observer, move |request| {
        let answer = match &request {
            wire::Request::Push { .. } => Response::Ack,
            _ => nothing_to_reconcile(),
        };
        let _ = copies.send(request);
        answer
    });
    eventually("the node to list the observer as a peer", || {
        node.status().unwrap()["peers"]
            .as_array()
            .is_some_and(|peers| peers.iter().any(|peer| peer["peer_id"] == observer_id.as_str()))
    })
    .await;
    assert_clock_below(&node, &mut requests, far_millis).await;
    assert_taken_from_an_honest_peer(&node, cluster, &record_of(&raw, 902), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_gossip_is_refused_counted_and_the_node_keeps_serving() {
    let cluster = "test-big-gossip";
    let directory = tempfile::tempdir().unwrap();
    let node = spawn_node(directory.path(), "target", cluster, "").await;
    let address = tokio::task::block_in_place(|| node.listen_address().unwrap());
    // The node's gossip limit: its default 256 KiB (above inline_blob_bytes + 64 KiB). The peer
    // lets itself publish four times as much.
    let limit = 256 * 1024;
    let mut peer = hostile_peer_with(&address, cluster, |config| config.max_gossip_bytes = 4 * limit).await;
    node_of(&mut peer).await;
    let too_large = r#"mailmesh_net_frames_rejected_total{reason="gossip_too_large"}"#;
    let inbound = r#"mailmesh_net_gossip_messages_total{topic="digests",direction="inbound"}"#;
    // One byte over, until the node has refused one (the first may go out before the mesh forms);
    // then exactly at the limit, until one is delivered. Each payload differs: gossip IDs are
    // content hashes.
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    let mut attempt = 0u64;
    for (size, series) in [(limit + 1, too_large), (limit, inbound)] {
        let before = metric(&node, series);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no gossip of {size} bytes moved {series}"
            );
            attempt += 1;
            let mut payload = vec![0u8; size];
            payload[..8].copy_from_slice(&attempt.to_be_bytes());
            peer.client.publish(Topic::Digests, payload).await.unwrap();
            if let Ok(Some(NetworkEvent::Gossip {
                message_id,
                propagation_source,
                ..
            })) = tokio::time::timeout(Duration::from_millis(300), peer.events.recv()).await
            {
                let _ = peer
                    .client
                    .report_validation(message_id, propagation_source, true)
                    .await;
            }
            if metric(&node, series) > before {
                break;
            }
        }
    }
    assert_eq!(
        tokio::task::block_in_place(|| node.get("/healthz").unwrap().status),
        200
    );
    let raw = sample_message("honest@example.org", "after big gossip", "still served");
    assert_taken_from_an_honest_peer(&node, cluster, &record_of(&raw, 903), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_response_is_refused_counted_and_the_node_keeps_serving() {
    let cluster = "test-big-response";
    let directory = tempfile::tempdir().unwrap();
    let node = spawn_node(directory.path(), "target", cluster, "").await;
    let address = tokio::task::block_in_place(|| node.listen_address().unwrap());
    // The node reads responses of at most its default 8 MiB (above the 4 MiB blob chunk and
    // 64 KiB); the peer lets itself send twice that, and answers one byte over.
    let limit = 8 * 1024 * 1024;
    let mut peer = hostile_peer_with(&address, cluster, |config| config.max_response_bytes = 2 * limit).await;
    node_of(&mut peer).await;
    let oversized = vec![0u8; limit + 1];
    let too_large = r#"mailmesh_net_frames_rejected_total{reason="response_too_large"}"#;
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    let mut sequence = 0u64;
    while metric(&node, too_large) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never refused an oversized response"
        );
        sequence += 1;
        invite_and_answer(&mut peer, "oversized", sequence, &oversized).await;
    }
    assert!(
        metric(
            &node,
            r#"mailmesh_net_requests_total{direction="outbound",outcome="response_too_large"}"#
        ) >= 1.0
    );
    assert_eq!(
        tokio::task::block_in_place(|| node.get("/healthz").unwrap().status),
        200
    );
    let raw = sample_message("honest@example.org", "after a big answer", "still served");
    assert_taken_from_an_honest_peer(&node, cluster, &record_of(&raw, 904), &raw).await;
}
