//! JMAP (RFC 8620 and RFC 8621) on a node started in this process with an accounts file: the
//! session resource behind HTTP Basic, batched method calls with result references, the request
//! and method errors a client gets for bad requests, and the mail methods driven by a real
//! client library (Stalwart's `jmap-client` crate). Spoken over real sockets.

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use futures::StreamExt;
use jmap_client::client::Client;
use jmap_client::email::query::{Comparator, Filter};
use jmap_client::email::Property;
use jmap_client::mailbox::Role;
use jmap_client::DataType;
use mailmesh::model::Flag;
use mailmesh::node::NodeConfig;
use mailmesh::server::Running;
use mailmesh::service::Delivery;

/// Made with `doveadm pw -s SHA512-CRYPT -p secret` (Dovecot 2.3.19).
const SECRET_HASH: &str = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.";
/// base64("alice@example.org:secret")
const ALICE_BASIC: &str = "YWxpY2VAZXhhbXBsZS5vcmc6c2VjcmV0";

struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn http(address: std::net::SocketAddr, method: &str, path: &str, basic: Option<&str>, body: &[u8]) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let authorization = basic
        .map(|basic| format!("Authorization: Basic {basic}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: mail.example.org\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The node may answer (and close) before a refused body is all sent.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a header block");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers[9..12].parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Answer { status, headers, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|window| window == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[line_end + 2 + size + 2..];
    }
}

async fn call(address: std::net::SocketAddr, request: &Value) -> Answer {
    http(
        address,
        "POST",
        "/jmap/api",
        Some(ALICE_BASIC),
        request.to_string().as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jmap_core_answers_sessions_batches_references_and_errors() {
    let directory = tempfile::tempdir().unwrap();
    let accounts = directory.path().join("accounts");
    std::fs::write(&accounts, format!("alice@example.org:{SECRET_HASH}\n")).unwrap();
    let config = NodeConfig {
        name: "jmap".into(),
        data_dir: directory.path().join("node"),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        http: "127.0.0.1:0".parse().unwrap(),
        cluster: "jmap-test".into(),
        accounts_file: Some(accounts),
        ..NodeConfig::default()
    };
    let (_stop_sender, stop) = tokio::sync::watch::channel(false);
    let running = mailmesh::server::start(config, mailmesh::environment::system(), stop)
        .await
        .unwrap();
    let address = running.http;

    // The session resource needs a login.
    let refused = http(address, "GET", "/.well-known/jmap", None, b"").await;
    assert_eq!(refused.status, 401);
    assert!(refused.headers.contains("Basic realm"), "{}", refused.headers);
    let wrong = http(
        address,
        "GET",
        "/.well-known/jmap",
        Some("YWxpY2VAZXhhbXBsZS5vcmc6Z3Vlc3M="),
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401);
    let session = http(address, "GET", "/.well-known/jmap", Some(ALICE_BASIC), b"").await;
    assert_eq!(session.status, 200);
    let session = session.json();
    assert_eq!(
        session["primaryAccounts"]["urn:ietf:params:jmap:mail"],
        "alice@example.org"
    );
    assert_eq!(session["apiUrl"], "http://mail.example.org/jmap/api");
    assert_eq!(
        session["capabilities"]["urn:ietf:params:jmap:core"]["maxCallsInRequest"],
        64
    );
    assert_eq!(
        session["accounts"]["alice@example.org"]["accountCapabilities"]["urn:ietf:params:jmap:mail"]
            ["maxMailboxesPerEmail"],
        1
    );

    // A batch: echo, a reference into the echo's answer, an unknown method, a foreign account,
    // a reference to a call that never happened.
    let answer = call(
        address,
        &json!({
            "using": ["urn:ietf:params:jmap:core"],
            "methodCalls": [
                ["Core/echo", {"hello": [1, 2], "list": [{"id": "a"}, {"id": "b"}]}, "c0"],
                ["Core/echo", {"#ids": {"resultOf": "c0", "name": "Core/echo", "path": "/list/*/id"}}, "c1"],
                ["Mailbox/frobnicate", {}, "c2"],
                ["Core/echo", {"accountId": "mallory@example.org"}, "c3"],
                ["Core/echo", {"#x": {"resultOf": "c9", "name": "Core/echo", "path": "/hello"}}, "c4"],
            ]
        }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let responses = answer.json()["methodResponses"].clone();
    assert_eq!(
        responses[0],
        json!(["Core/echo", {"hello": [1, 2], "list": [{"id": "a"}, {"id": "b"}]}, "c0"])
    );
    assert_eq!(responses[1], json!(["Core/echo", {"ids": ["a", "b"]}, "c1"]));
    assert_eq!(responses[2][0], "error");
    assert_eq!(responses[2][1]["type"], "unknownMethod");
    assert_eq!(responses[2][2], "c2");
    assert_eq!(responses[3][1]["type"], "accountNotFound");
    assert_eq!(responses[4][1]["type"], "invalidResultReference");

    // Request-level errors are problem details.
    let problem_type = |answer: &Answer| {
        assert_eq!(answer.status, 400, "{}", String::from_utf8_lossy(&answer.body));
        assert!(
            answer.headers.contains("application/problem+json"),
            "{}",
            answer.headers
        );
        answer.json()["type"].as_str().unwrap().to_owned()
    };
    let unknown = call(address, &json!({"using": ["urn:example:nope"], "methodCalls": []})).await;
    assert_eq!(problem_type(&unknown), "urn:ietf:params:jmap:error:unknownCapability");
    let not_json = http(address, "POST", "/jmap/api", Some(ALICE_BASIC), b"{not json").await;
    assert_eq!(problem_type(&not_json), "urn:ietf:params:jmap:error:notJSON");
    let not_request = call(address, &json!({"using": [], "methodCalls": [["Core/echo", {}]]})).await;
    assert_eq!(problem_type(&not_request), "urn:ietf:params:jmap:error:notRequest");
    let calls: Vec<Value> = (0..65)
        .map(|index| json!(["Core/echo", {}, format!("c{index}")]))
        .collect();
    let too_many = call(
        address,
        &json!({"using": ["urn:ietf:params:jmap:core"], "methodCalls": calls}),
    )
    .await;
    assert_eq!(problem_type(&too_many), "urn:ietf:params:jmap:error:limit");
    assert_eq!(too_many.json()["limit"], "maxCallsInRequest");
    let huge = vec![b' '; mailmesh::jmap::MAX_SIZE_REQUEST + 1];
    let too_large = http(address, "POST", "/jmap/api", Some(ALICE_BASIC), &huge).await;
    assert_eq!(problem_type(&too_large), "urn:ietf:params:jmap:error:limit");
    assert_eq!(too_large.json()["limit"], "maxSizeRequest");
}

const ALICE: &str = "alice@example.org";

/// A node of this process with alice in its accounts file; dropping the sender stops it.
async fn start_node(
    directory: &std::path::Path,
    name: &str,
    peers: Vec<libp2p::Multiaddr>,
) -> (Running, tokio::sync::watch::Sender<bool>) {
    start_member(directory, name, peers, None).await
}

/// A node as [`start_node`] makes, in a closed cluster of `members` when they are given.
async fn start_member(
    directory: &std::path::Path,
    name: &str,
    peers: Vec<libp2p::Multiaddr>,
    members: Option<std::collections::HashSet<libp2p::PeerId>>,
) -> (Running, tokio::sync::watch::Sender<bool>) {
    let accounts = directory.join(format!("{name}-accounts"));
    std::fs::write(&accounts, format!("{ALICE}:{SECRET_HASH}\n")).unwrap();
    let config = NodeConfig {
        name: name.into(),
        data_dir: directory.join(name),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        http: "127.0.0.1:0".parse().unwrap(),
        peers,
        cluster: "jmap-test".into(),
        gossip_interval: std::time::Duration::from_millis(200),
        search_commit_interval: std::time::Duration::from_millis(100),
        accounts_file: Some(accounts),
        allowed_peers: members,
        ..NodeConfig::default()
    };
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let running = mailmesh::server::start(config, mailmesh::environment::system(), stop)
        .await
        .unwrap();
    (running, stop_sender)
}

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: Alice <alice@example.org>\r\nSubject: {subject}\r\nMessage-ID: <{}@example.net>\r\nDate: Mon, 1 Jun 2026 10:00:00 +0000\r\n\r\n{body}\r\n",
        subject.replace(' ', ".")
    )
    .into_bytes()
}

async fn deliver(running: &Running, mailbox: &str, raw: Vec<u8>, received_millis: u64) -> String {
    running
        .service
        .deliver(Delivery {
            account: ALICE.into(),
            mailbox: mailmesh::service::MailboxTarget::PathOrCreate(mailbox.into()),
            raw,
            flags: Vec::new(),
            received_millis: Some(received_millis),
            skip_duplicate: false,
        })
        .await
        .unwrap()
        .id
        .to_string()
}

/// 2026-06-01T00:00:00Z.
const JUNE: u64 = 1_780_272_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jmap_client_lists_queries_changes_uploads_and_is_pushed_to() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "client", Vec::new()).await;
    let address = running.http;

    // 25 emails in INBOX, each received a minute after the last, 3 in Work.
    let senders = ["Carol <carol@example.net>", "dave@example.net", "Bob <bob@example.net>"];
    let mut inbox = Vec::new();
    for index in 0..25u64 {
        let raw = message(
            senders[index as usize % 3],
            &format!("Report {:02}", (index * 7) % 25),
            &"x".repeat(index as usize * 10),
        );
        inbox.push(deliver(&running, "INBOX", raw, JUNE + index * 60_000).await);
    }
    for index in 0..3u64 {
        deliver(
            &running,
            "Work",
            message("erin@example.net", &format!("Work {index}"), "w"),
            JUNE + index,
        )
        .await;
    }

    let client = Client::new()
        .credentials((ALICE, "secret"))
        .connect(&format!("http://{address}"))
        .await
        .expect("jmap-client reads the session");
    assert_eq!(client.default_account_id(), ALICE);

    // Mailbox/get: INBOX with its role and counts, Work beside it.
    let mut request = client.build();
    request.get_mailbox();
    let mailboxes = request.send_get_mailbox().await.unwrap();
    let list = mailboxes.list();
    assert_eq!(list.len(), 2, "{list:?}");
    let inbox_box = list.iter().find(|mailbox| mailbox.name() == Some("INBOX")).unwrap();
    assert_eq!(inbox_box.role(), Role::Inbox);
    assert_eq!(inbox_box.total_emails(), 25);
    assert_eq!(inbox_box.unread_emails(), 25);
    let rights = inbox_box.my_rights().expect("myRights");
    assert!(rights.may_set_keywords() && !rights.may_rename());
    let work_box = list.iter().find(|mailbox| mailbox.name() == Some("Work")).unwrap();
    assert_eq!(work_box.role(), Role::None);
    assert_eq!(work_box.total_emails(), 3);
    let inbox_id = inbox_box.id().unwrap().to_owned();

    // Email/query sorted by receivedAt, newest first, second page of 10, with the total.
    let mut request = client.build();
    request
        .query_email()
        .filter(Filter::in_mailbox(&inbox_id))
        .sort([Comparator::received_at().descending()])
        .position(10)
        .limit(10)
        .calculate_total(true);
    let page = request.send_query_email().await.unwrap();
    let newest_first: Vec<String> = inbox.iter().rev().cloned().collect();
    assert_eq!(page.ids(), &newest_first[10..20]);
    assert_eq!(page.total(), Some(25));
    assert_eq!(page.position(), 10);
    // By subject, ascending: "Report 00" .. "Report 24".
    let mut request = client.build();
    request
        .query_email()
        .filter(Filter::in_mailbox(&inbox_id))
        .sort([Comparator::subject().ascending()])
        .limit(3);
    let by_subject = request.send_query_email().await.unwrap();
    let subjects: Vec<String> = {
        let mut request = client.build();
        request
            .get_email()
            .ids(by_subject.ids().iter().map(String::as_str))
            .properties([Property::Subject]);
        request
            .send_get_email()
            .await
            .unwrap()
            .list()
            .iter()
            .map(|email| email.subject().unwrap().to_owned())
            .collect()
    };
    assert_eq!(subjects, ["Report 00", "Report 01", "Report 02"]);
    // Without inMailbox every mailbox is listed; by size, largest first.
    let mut request = client.build();
    request
        .query_email()
        .sort([Comparator::size().descending()])
        .limit(2)
        .calculate_total(true);
    let everywhere = request.send_query_email().await.unwrap();
    assert_eq!(everywhere.total(), Some(28));
    assert_eq!(everywhere.ids(), &[inbox[24].clone(), inbox[23].clone()]);

    // Email/get with header properties.
    let email = client
        .email_get(
            &inbox[2],
            Some([
                Property::Id,
                Property::From,
                Property::Subject,
                Property::Keywords,
                Property::MailboxIds,
                Property::ReceivedAt,
                Property::Size,
                Property::BlobId,
                Property::MessageId,
                Property::Preview,
            ]),
        )
        .await
        .unwrap()
        .expect("the email");
    assert_eq!(email.id(), Some(inbox[2].as_str()));
    let from = email.from().unwrap();
    assert_eq!(from[0].name(), Some("Bob"));
    assert_eq!(from[0].email(), "bob@example.net");
    assert_eq!(email.subject(), Some("Report 14"));
    assert_eq!(email.mailbox_ids(), vec![inbox_id.as_str()]);
    assert!(email.keywords().is_empty());
    assert_eq!(email.received_at(), Some(((JUNE + 2 * 60_000) / 1000) as i64));
    assert_eq!(email.message_id(), Some(&["Report.14@example.net".to_owned()][..]));
    assert_eq!(
        email.preview(),
        Some("x".repeat(20).as_str()),
        "the body outweighs the sender in size"
    );

    // Writes: a keyword over JMAP, a destroy over JMAP, an IMAP-style flag change and a delivery
    // through the service; then Email/changes from the state before them.
    let mut request = client.build();
    request.get_email().ids([inbox[0].as_str()]).properties([Property::Id]);
    let before = request.send_get_email().await.unwrap().state().to_owned();
    client.email_set_keyword(&inbox[0], "$seen", true).await.unwrap();
    client.email_set_keyword(&inbox[0], "$Custom", true).await.unwrap();
    client.email_destroy(&inbox[1]).await.unwrap();
    running
        .service
        .set_flags(ALICE, inbox[3].parse().unwrap(), vec![Flag::Flagged], Vec::new())
        .await
        .unwrap();
    let newest = deliver(
        &running,
        "INBOX",
        message("frank@example.net", "Fresh", "new"),
        JUNE + 3_600_000,
    )
    .await;
    let changes = client.email_changes(&before, None).await.unwrap();
    assert_eq!(changes.created(), &[newest.clone()]);
    assert!(changes.updated().contains(&inbox[0]), "{:?}", changes.updated());
    assert!(changes.updated().contains(&inbox[3]), "{:?}", changes.updated());
    assert_eq!(changes.destroyed(), &[inbox[1].clone()]);
    assert!(!changes.has_more_changes());
    let seen = client
        .email_get(&inbox[0], Some([Property::Keywords]))
        .await
        .unwrap()
        .unwrap();
    let mut keywords = seen.keywords();
    keywords.sort();
    assert_eq!(keywords, ["$custom", "$seen"]);
    let flagged = client
        .email_get(&inbox[3], Some([Property::Keywords]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flagged.keywords(), ["$flagged"]);
    assert_eq!(
        running.service.email(ALICE, inbox[0].parse().unwrap()).unwrap().flags,
        vec![Flag::Seen, Flag::Keyword("$custom".into())],
        "JMAP keywords are IMAP flags (lower case, as JMAP compares them)"
    );
    assert!(client
        .email_get(&inbox[1], None::<Vec<Property>>)
        .await
        .unwrap()
        .is_none());
    // The destroyed email is gone from the counts; Mailbox/changes names INBOX.
    let mut request = client.build();
    request.changes_mailbox(&before);
    let mailbox_changes = request.send_changes_mailbox().await.unwrap();
    assert_eq!(mailbox_changes.updated(), &[inbox_id.clone()]);
    let inbox_now = client
        .mailbox_get(&inbox_id, None::<Vec<jmap_client::mailbox::Property>>)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inbox_now.total_emails(), 25);
    assert_eq!(inbox_now.unread_emails(), 24);
    // Changes from the new state: none.
    let quiet = client.email_changes(changes.new_state(), None).await.unwrap();
    assert!(quiet.created().is_empty() && quiet.destroyed().is_empty(), "{quiet:?}");

    // Upload plus import (the client uploads, then calls Email/import), and download.
    let raw = message("grace@example.net", "Imported", "from a blob");
    let imported = client
        .email_import(
            raw.clone(),
            [inbox_id.as_str()],
            Some(["$seen"]),
            Some((JUNE / 1000) as i64),
        )
        .await
        .unwrap();
    let imported_id = imported.id().unwrap().to_owned();
    let fetched = client
        .email_get(
            &imported_id,
            Some([
                Property::Subject,
                Property::Keywords,
                Property::ReceivedAt,
                Property::BlobId,
            ]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetched.subject(), Some("Imported"));
    assert_eq!(fetched.keywords(), ["$seen"]);
    assert_eq!(fetched.received_at(), Some((JUNE / 1000) as i64));
    assert_eq!(client.download(fetched.blob_id().unwrap()).await.unwrap(), raw);
    let uploaded = client
        .upload(None, b"just bytes".to_vec(), Some("text/plain"))
        .await
        .unwrap();
    assert_eq!(uploaded.size(), 10);
    assert_eq!(client.download(uploaded.blob_id()).await.unwrap(), b"just bytes");

    // Push: a StateChange arrives for a delivery, and its state lists the delivery.
    let state = client
        .email_changes(changes.new_state(), None)
        .await
        .unwrap()
        .new_state()
        .to_owned();
    let mut stream = client
        .event_source(Some([DataType::Email, DataType::Mailbox]), false, Some(1), None)
        .await
        .unwrap();
    // The node subscribes before it answers, so the stream sees every write from here on.
    let pushed = deliver(
        &running,
        "Work",
        message("heidi@example.net", "Pushed", "p"),
        JUNE + 7_200_000,
    )
    .await;
    let notification = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next())
        .await
        .expect("a push within 20 s")
        .expect("the stream is open")
        .unwrap();
    let jmap_client::event_source::PushNotification::StateChange(mut change) = notification else {
        panic!("not a state change");
    };
    let changed = change.account_changes(ALICE).expect("alice's account");
    let pushed_state = changed.get(&DataType::Email).expect("an Email state").clone();
    assert!(changed.contains_key(&DataType::Mailbox));
    let after_push = client.email_changes(&state, None).await.unwrap();
    assert!(after_push.created().contains(&pushed), "{after_push:?}");
    assert!(
        client
            .email_changes(&pushed_state, None)
            .await
            .unwrap()
            .created()
            .is_empty(),
        "the pushed state already covers the delivery"
    );

    // The ping event, read off the wire (the client library swallows pings).
    let ping = event_stream_until(address, "/jmap/eventsource?types=*&closeafter=no&ping=1", "event: ping").await;
    assert!(ping.contains("\"interval\":1"), "{ping}");
}

/// Reads an event stream until `wanted` shows up, and returns what was read.
async fn event_stream_until(address: std::net::SocketAddr, path: &str, wanted: &str) -> String {
    let mut stream = open_event_stream(address, path).await;
    read_until(&mut stream, wanted).await
}

/// Asks for an event stream as alice, over a raw connection.
async fn open_event_stream(address: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: mail.example.org\r\nAuthorization: Basic {ALICE_BASIC}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Reads from `stream` until `wanted` shows up (at most 20 s), and returns what was read.
async fn read_until(stream: &mut tokio::net::TcpStream, wanted: &str) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&seen).contains(wanted) {
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "the stream closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted} within 20 s: {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_ends_its_event_streams_and_closes_its_store() {
    let directory = tempfile::tempdir().unwrap();
    let (running, stop) = start_node(directory.path(), "stopping", Vec::new()).await;
    let mut stream = open_event_stream(running.http, "/jmap/eventsource?types=*&closeafter=no&ping=1").await;
    read_until(&mut stream, "event: ping").await;
    let closed = running.closed.clone();
    drop(running);
    stop.send(true).unwrap();
    // The stream ends, and with it the connection: before, an open stream held the HTTP
    // server's graceful shutdown and the store until the process gave up waiting.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(ended, Ok(Ok(_))),
        "the event stream was still open 30 s after the stop: {}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        closed.wait(std::time::Duration::from_secs(30)).await,
        "the store never closed"
    );
}

fn method_response(answer: &Answer, index: usize) -> Value {
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    answer.json()["methodResponses"][index].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jmap_mail_methods_refuse_what_they_do_not_serve_and_enforce_limits() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "limits", Vec::new()).await;
    let address = running.http;
    let id = deliver(&running, "INBOX", message("carol@example.net", "One", "1"), JUNE).await;
    let mail = |calls: Value| json!({"using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"], "methodCalls": calls});

    let session = http(address, "GET", "/.well-known/jmap", Some(ALICE_BASIC), b"")
        .await
        .json();
    let account = &session["accounts"][ALICE]["accountCapabilities"]["urn:ietf:params:jmap:mail"];
    assert_eq!(account["mayCreateTopLevelMailbox"], true, "Mailbox/set is served");
    assert!(session["capabilities"].get("urn:ietf:params:jmap:submission").is_none());

    let too_many: Vec<String> = (0..1001).map(|index| format!("id{index}")).collect();
    let answer = call(address, &mail(json!([["Email/get", {"ids": too_many}, "g"]]))).await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "requestTooLarge");
    let destroy: Vec<String> = (0..501).map(|index| format!("id{index}")).collect();
    let answer = call(address, &mail(json!([["Email/set", {"destroy": destroy}, "s"]]))).await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "requestTooLarge");

    // The full-text index commits on its own schedule: wait until it has the email.
    let search = mail(json!([["Email/query", {"filter": {"text": "carol"}}, "t"]]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while method_response(&call(address, &search).await, 0)[1]["ids"] != json!([id]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the search index never found the email"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let answer = call(
        address,
        &mail(json!([
            ["Email/query", {"filter": {"hasKeyword": "$seen"}}, "a"],
            ["Email/query", {"filter": {"operator": "AND", "conditions": []}}, "b"],
            ["Email/query", {"sort": [{"property": "color"}]}, "c"],
            ["Email/query", {"anchor": "nothing"}, "d"],
            ["Email/get", {"ids": [id], "properties": ["header:Subject:asDate"]}, "e"],
            ["Email/changes", {"sinceState": "m1garbage"}, "f"],
            ["Email/set", {"ifInState": "m1old", "destroy": [id]}, "g"],
            ["Email/set", {"create": {"k": {}}, "update": {"nope": {"keywords/$seen": true}}}, "h"],
            ["Identity/get", {}, "i"],
            ["Email/query", {"filter": {"text": "carol"}, "sort": [{"property": "receivedAt", "isAscending": false}], "position": -1, "calculateTotal": true}, "j"],
            ["Email/get", {"#ids": {"resultOf": "j", "name": "Email/query", "path": "/ids"}, "properties": ["subject", "header:Subject:asText", "header:X-Missing"]}, "k"],
            ["Thread/get", {"ids": [id, "nothing"]}, "l"],
        ])),
    )
    .await;
    let response = |index| method_response(&answer, index);
    assert_eq!(response(0)[1]["ids"], json!([]), "no email has $seen");
    assert_eq!(response(1)[1]["ids"], json!([id]), "an AND of nothing holds");
    assert_eq!(response(2)[1]["type"], "unsupportedSort");
    assert_eq!(response(3)[1]["type"], "anchorNotFound");
    assert_eq!(response(4)[1]["type"], "invalidArguments");
    assert_eq!(response(5)[1]["type"], "cannotCalculateChanges");
    assert_eq!(response(6)[1]["type"], "stateMismatch");
    // A creation with no mailbox is refused, naming the property.
    assert_eq!(response(7)[1]["notCreated"]["k"]["type"], "invalidProperties");
    assert_eq!(response(7)[1]["notCreated"]["k"]["properties"], json!(["mailboxIds"]));
    assert_eq!(response(7)[1]["notUpdated"]["nope"]["type"], "notFound");
    assert_eq!(response(8)[1]["type"], "unknownMethod");
    assert_eq!(response(9)[1]["ids"], json!([id]), "{}", response(9));
    assert_eq!(response(9)[1]["total"], 1);
    assert_eq!(response(9)[1]["position"], 0);
    assert_eq!(
        response(10)[1]["list"][0],
        json!({"id": id, "subject": "One", "header:Subject:asText": "One", "header:X-Missing": null})
    );
    assert_eq!(response(11)[1]["list"], json!([]), "an email id is not a thread id");
    assert_eq!(response(11)[1]["notFound"], json!([id, "nothing"]));
    // The message still exists: the refused set destroyed nothing.
    assert!(running
        .service
        .find_email(ALICE, id.parse().unwrap())
        .unwrap()
        .is_some());
}

/// Waits until every node holds the same mailboxes of alice with the same contents.
async fn converge(step: &str, nodes: &[&Running]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let views: Vec<Vec<(String, u64, String)>> = nodes
            .iter()
            .map(|node| {
                node.service
                    .mailboxes(ALICE)
                    .unwrap()
                    .into_iter()
                    .map(|mailbox| (mailbox.name, mailbox.total, mailbox.root))
                    .collect()
            })
            .collect();
        if views.windows(2).all(|pair| pair[0] == pair[1]) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{step}: the nodes did not converge within 60 s: {views:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A JMAP client's idea of alice's emails and its state, carried from node to node.
struct HoppingClient {
    state: String,
    known: std::collections::BTreeSet<String>,
}

impl HoppingClient {
    /// Email/changes from the client's state at `client`'s node, page by page; returns what was
    /// created, updated and destroyed.
    async fn catch_up(&mut self, client: &Client) -> (Vec<String>, Vec<String>, Vec<String>) {
        let (mut created, mut updated, mut destroyed) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let changes = client
                .email_changes(&self.state, Some(3))
                .await
                .unwrap_or_else(|error| panic!("Email/changes from a state of another node: {error}"));
            created.extend(changes.created().iter().cloned());
            updated.extend(changes.updated().iter().cloned());
            destroyed.extend(changes.destroyed().iter().cloned());
            self.state = changes.new_state().to_owned();
            if !changes.has_more_changes() {
                break;
            }
        }
        for id in created.iter().chain(&updated) {
            self.known.insert(id.clone());
        }
        for id in &destroyed {
            self.known.remove(id);
        }
        // An id listed as updated that the client did not know is fetched; one that is gone is
        // dropped (RFC 8620 lets a server list such ids).
        let mut gone = Vec::new();
        for id in &self.known {
            if client.email_get(id, Some([Property::Id])).await.unwrap().is_none() {
                gone.push(id.clone());
            }
        }
        for id in gone {
            self.known.remove(&id);
        }
        (created, updated, destroyed)
    }
}

async fn connect(node: &Running) -> Client {
    Client::new()
        .credentials((ALICE, "secret"))
        .connect(&format!("http://{}", node.http))
        .await
        .unwrap()
}

/// Issue 14's failover case: a client reads on node a, then hands its Email/changes state to b
/// and to c (after they hold the same data) and gets exactly the changes it lacks, with no
/// cannotCalculateChanges, writes having been made on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jmap_client_carries_its_email_state_from_node_to_node() {
    let directory = tempfile::tempdir().unwrap();
    let (a, _stop_a) = start_node(directory.path(), "a", Vec::new()).await;
    let seeds = a.engine.listen_addresses().await;
    let (b, _stop_b) = start_node(directory.path(), "b", seeds.clone()).await;
    let (c, _stop_c) = start_node(directory.path(), "c", seeds).await;
    let nodes = [&a, &b, &c];
    let mut truth = std::collections::BTreeSet::new();

    // Step 1: writes on every node; the client reads everything from a.
    let mut on_a = Vec::new();
    for index in 0..4u64 {
        on_a.push(
            deliver(
                &a,
                "INBOX",
                message("carol@example.net", &format!("a{index}"), "a"),
                JUNE + index,
            )
            .await,
        );
    }
    let mut on_b = Vec::new();
    for index in 0..3u64 {
        on_b.push(
            deliver(
                &b,
                "Work",
                message("dave@example.net", &format!("b{index}"), "b"),
                JUNE + 10 + index,
            )
            .await,
        );
    }
    let on_c = deliver(&c, "INBOX", message("erin@example.net", "c0", "c"), JUNE + 20).await;
    truth.extend(on_a.iter().chain(&on_b).cloned());
    truth.insert(on_c.clone());
    converge("step 1", &nodes).await;
    let at_a = connect(&a).await;
    let mut request = at_a.build();
    request.query_email().limit(100);
    let listed = request.send_query_email().await.unwrap();
    let mut request = at_a.build();
    request
        .get_email()
        .ids(listed.ids().iter().map(String::as_str))
        .properties([Property::Id]);
    let got = request.send_get_email().await.unwrap();
    let mut hopper = HoppingClient {
        state: got.state().to_owned(),
        known: got.list().iter().map(|email| email.id().unwrap().to_owned()).collect(),
    };
    assert_eq!(hopper.known, truth, "step 1 from a");

    // Step 2: a flag change on b to a's email, a destroy on a (over JMAP), a delivery on c; the
    // client now asks b.
    let at_b = connect(&b).await;
    b.service
        .set_flags(ALICE, on_a[0].parse().unwrap(), vec![Flag::Seen], Vec::new())
        .await
        .unwrap();
    at_a.email_destroy(&on_a[1]).await.unwrap();
    let newer = deliver(&c, "Work", message("erin@example.net", "c1", "c"), JUNE + 30).await;
    truth.remove(&on_a[1]);
    truth.insert(newer.clone());
    converge("step 2", &nodes).await;
    let (created, updated, destroyed) = hopper.catch_up(&at_b).await;
    assert_eq!(created, vec![newer.clone()], "step 2 at b: created");
    assert!(
        updated.contains(&on_a[0]),
        "step 2 at b: {} missing from {updated:?}",
        on_a[0]
    );
    // Listed at least once; a later page may list the destroy again (the window between two
    // nodes' frontiers, as in step 3): harmless to a client, and nothing else may be there.
    assert!(destroyed.contains(&on_a[1]), "step 2 at b: destroyed {destroyed:?}");
    assert!(destroyed.iter().all(|id| *id == on_a[1]), "step 2 at b: {destroyed:?}");
    assert_eq!(hopper.known, truth, "step 2 at b");

    // Step 3: a keyword set over JMAP at c, a delivery on a; the client now asks c.
    let at_c = connect(&c).await;
    at_c.email_set_keyword(&on_b[2], "$flagged", true).await.unwrap();
    let newest = deliver(&a, "INBOX", message("carol@example.net", "a4", "a"), JUNE + 40).await;
    truth.insert(newest.clone());
    converge("step 3", &nodes).await;
    let (created, updated, destroyed) = hopper.catch_up(&at_c).await;
    assert_eq!(created, vec![newest.clone()], "step 3 at c: created");
    assert!(
        updated.contains(&on_b[2]),
        "step 3 at c: {} missing from {updated:?}",
        on_b[2]
    );
    // The feed may list a change again from another node's state (the window between two
    // nodes' frontiers); a destroy listed again is harmless to a client, and nothing else is.
    assert!(destroyed.iter().all(|id| *id == on_a[1]), "step 3 at c: {destroyed:?}");
    assert_eq!(hopper.known, truth, "step 3 at c");
    let flagged = at_c
        .email_get(&on_b[2], Some([Property::Keywords]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flagged.keywords(), ["$flagged"]);

    // Step 4: back at a with nothing new: nothing created or destroyed.
    let (created, _, destroyed) = hopper.catch_up(&at_a).await;
    assert!(
        created.is_empty() && destroyed.is_empty(),
        "step 4 at a: {created:?} {destroyed:?}"
    );
    assert_eq!(hopper.known, truth, "the client that moved between three nodes");
}

fn mail_request(calls: Value) -> Value {
    json!({"using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"], "methodCalls": calls})
}

/// Alice's mailboxes by path, as the service holds them.
fn paths(running: &Running) -> Vec<String> {
    running
        .service
        .mailboxes(ALICE)
        .unwrap()
        .into_iter()
        .map(|mailbox| mailbox.name)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Mailbox/set through jmap-client and raw JSON: creates with parents named by creation ids,
/// renames and moves in the tree, role, sort order and subscription, destroys with and without
/// onDestroyRemoveEmails, the SetErrors of RFC 8621 §2.5 and ifInState.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jmap_client_creates_renames_moves_and_destroys_mailboxes() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "mailboxes", Vec::new()).await;
    let address = running.http;
    let in_work = deliver(&running, "Work", message("carol@example.net", "Busy", "b"), JUNE).await;
    let client = connect(&running).await;
    let session = http(address, "GET", "/.well-known/jmap", Some(ALICE_BASIC), b"")
        .await
        .json();
    assert_eq!(
        session["accounts"][ALICE]["accountCapabilities"]["urn:ietf:params:jmap:mail"]["mayCreateTopLevelMailbox"],
        true
    );

    // A top-level mailbox through the client's helper.
    let projects = client
        .mailbox_create("Projects", None::<String>, Role::None)
        .await
        .expect("Mailbox/set create");
    let projects_id = projects.id().unwrap().to_owned();
    assert!(projects.my_rights().unwrap().may_rename());

    // A child and a grandchild in one call, the grandchild listed first and naming its parent by
    // creation id; role, sort order and subscription given at creation.
    let answer = call(
        address,
        &json!({
            "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
            "createdIds": {},
            "methodCalls": [["Mailbox/set", {"create": {
                "a": {"name": "2026", "parentId": "#b", "sortOrder": 7, "isSubscribed": false},
                "b": {"name": "Alpha", "parentId": projects_id, "role": "archive"},
                "bad-name": {"name": "a/b"},
                "bad-parent": {"name": "Orphan", "parentId": "0000000000000000000000000Z"},
                "bad-role": {"name": "Second inbox", "role": "inbox"},
                "twin": {"name": "Projects"},
                "server-set": {"name": "Counted", "totalEmails": 3},
                "after-bad": {"name": "Child of nothing", "parentId": "#bad-parent"},
            }}, "s"]],
        }),
    )
    .await;
    let body = answer.json();
    let set = method_response(&answer, 0)[1].clone();
    let created = &set["created"];
    let alpha_id = created["b"]["id"].as_str().expect("b created").to_owned();
    let year_id = created["a"]["id"].as_str().expect("a created").to_owned();
    assert_eq!(created["a"]["sortOrder"], 7);
    assert_eq!(created["a"]["isSubscribed"], false);
    assert_eq!(created["b"]["role"], "archive");
    assert_eq!(created["a"]["totalEmails"], 0);
    assert_eq!(body["createdIds"]["a"], year_id.as_str(), "{body}");
    assert_eq!(body["createdIds"]["b"], alpha_id.as_str());
    let not_created = &set["notCreated"];
    for (creation, property) in [
        ("bad-name", "name"),
        ("bad-parent", "parentId"),
        ("bad-role", "role"),
        ("twin", "name"),
        ("server-set", "totalEmails"),
        ("after-bad", "parentId"),
    ] {
        assert_eq!(not_created[creation]["type"], "invalidProperties", "{creation}: {set}");
        assert_eq!(
            not_created[creation]["properties"],
            json!([property]),
            "{creation}: {set}"
        );
    }
    assert_ne!(set["oldState"], set["newState"]);
    let mut expected = vec!["INBOX", "Projects", "Projects/Alpha", "Projects/Alpha/2026", "Work"];
    assert_eq!(paths(&running), expected);
    let year = client
        .mailbox_get(&year_id, None::<Vec<jmap_client::mailbox::Property>>)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(year.name(), Some("2026"));
    assert_eq!(year.parent_id(), Some(alpha_id.as_str()));
    assert_eq!(year.sort_order(), 7);
    assert!(!year.is_subscribed());

    // Rename keeps the id and the children; a move changes the parent; role, order, subscription.
    client.mailbox_rename(&projects_id, "Clients").await.unwrap();
    client.mailbox_move(&year_id, None::<String>).await.unwrap();
    client.mailbox_update_role(&alpha_id, Role::Trash).await.unwrap();
    client.mailbox_update_sort_order(&alpha_id, 3).await.unwrap();
    client.mailbox_subscribe(&alpha_id, false).await.unwrap();
    expected = vec!["2026", "Clients", "Clients/Alpha", "INBOX", "Work"];
    assert_eq!(paths(&running), expected);
    let alpha = client
        .mailbox_get(&alpha_id, None::<Vec<jmap_client::mailbox::Property>>)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alpha.parent_id(), Some(projects_id.as_str()));
    assert_eq!(alpha.role(), Role::Trash);
    assert_eq!(alpha.sort_order(), 3);
    assert!(!alpha.is_subscribed());
    let inbox_id = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let work_id = running.service.find_mailbox(ALICE, "Work").unwrap().to_string();

    // Refused updates: the INBOX, a move under itself, a sibling's name, a missing mailbox, a
    // server-set property.
    let answer = call(
        address,
        &mail_request(json!([["Mailbox/set", {"update": {
            inbox_id.clone(): {"name": "Post"},
            projects_id.clone(): {"parentId": alpha_id},
            alpha_id.clone(): {"parentId": null, "name": "Work"},
            "0000000000000000000000000Z": {"name": "Nowhere"},
            work_id.clone(): {"myRights": {}},
        }}, "u"]])),
    )
    .await;
    let not_updated = method_response(&answer, 0)[1]["notUpdated"].clone();
    assert_eq!(not_updated[&inbox_id]["type"], "forbidden", "{not_updated}");
    assert_eq!(not_updated[&projects_id]["properties"], json!(["parentId"]));
    assert_eq!(not_updated[&alpha_id]["properties"], json!(["name"]));
    assert_eq!(not_updated["0000000000000000000000000Z"]["type"], "notFound");
    assert_eq!(not_updated[&work_id]["properties"], json!(["myRights"]));
    assert_eq!(paths(&running), expected, "nothing refused was written");

    // Destroys: the INBOX is forbidden, a mailbox with children or with emails is refused, and
    // onDestroyRemoveEmails destroys the emails with it.
    let refused = client.mailbox_destroy(&work_id, false).await;
    assert!(refused.is_err(), "a mailbox with an email is kept");
    let answer = call(
        address,
        &mail_request(json!([["Mailbox/set", {"destroy": [inbox_id, projects_id, work_id]}, "d"]])),
    )
    .await;
    let not_destroyed = method_response(&answer, 0)[1]["notDestroyed"].clone();
    assert_eq!(not_destroyed[&inbox_id]["type"], "forbidden", "{not_destroyed}");
    assert_eq!(not_destroyed[&projects_id]["type"], "mailboxHasChild");
    assert_eq!(not_destroyed[&work_id]["type"], "mailboxHasEmail");
    client
        .mailbox_destroy(&work_id, true)
        .await
        .expect("destroyed with its emails");
    assert!(running
        .service
        .find_email(ALICE, in_work.parse().unwrap())
        .unwrap()
        .is_none());
    // A parent and its child in one call: the child goes first.
    let answer = call(
        address,
        &mail_request(json!([["Mailbox/set", {"destroy": [projects_id, alpha_id]}, "d"]])),
    )
    .await;
    let destroyed = method_response(&answer, 0)[1].clone();
    assert_eq!(destroyed["destroyed"], json!([alpha_id, projects_id]), "{destroyed}");
    assert_eq!(paths(&running), ["2026", "INBOX"]);

    // ifInState: a stale state is refused and nothing is written.
    let answer = call(
        address,
        &mail_request(json!([["Mailbox/set", {"ifInState": set["oldState"], "create": {"x": {"name": "Late"}}}, "i"]])),
    )
    .await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "stateMismatch");
    assert_eq!(paths(&running), ["2026", "INBOX"]);
    // Mailbox/changes from before the first create lists the mailboxes that are left, and the
    // destroyed ones.
    let mut request = client.build();
    request.changes_mailbox(set["oldState"].as_str().unwrap());
    let changes = request.send_changes_mailbox().await.unwrap();
    assert!(changes.updated().contains(&year_id), "{changes:?}");
    for gone in [&projects_id, &alpha_id, &work_id] {
        assert!(changes.destroyed().contains(gone), "{gone}: {changes:?}");
    }
}

/// Applies a /queryChanges answer to the ids a client held (RFC 8620 §5.6).
fn apply_query_changes(old: &[String], removed: &[String], added: &[(String, usize)]) -> Vec<String> {
    let mut ids: Vec<String> = old.iter().filter(|id| !removed.contains(id)).cloned().collect();
    let mut added = added.to_vec();
    added.sort_by_key(|(_, index)| *index);
    for (id, index) in added {
        ids.insert(index.min(ids.len()), id);
    }
    ids
}

fn added_items(changes: &jmap_client::core::query_changes::QueryChangesResponse) -> Vec<(String, usize)> {
    changes
        .added()
        .iter()
        .map(|item| (item.id().to_owned(), item.index()))
        .collect()
}

/// Mailbox/query with filters, operators, sorts, the tree forms and anchors, then
/// Mailbox/queryChanges after creates, a rename and a destroy: the client that applies the
/// answer holds what a fresh query returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_query_filters_sorts_and_its_changes_rebuild_the_results() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "mailbox-query", Vec::new()).await;
    let client = connect(&running).await;
    let create = |name: &'static str, parent: Option<String>| {
        let client = &client;
        async move {
            client
                .mailbox_create(name, parent, Role::None)
                .await
                .unwrap()
                .id()
                .unwrap()
                .to_owned()
        }
    };
    let alpha = create("Alpha", None).await;
    let beta = create("beta", None).await;
    let child = create("Child", Some(alpha.clone())).await;
    let zulu = create("Zulu", Some(beta.clone())).await;
    client.mailbox_update_role(&beta, Role::Sent).await.unwrap();
    client.mailbox_update_sort_order(&alpha, 5).await.unwrap();
    client.mailbox_subscribe(&child, false).await.unwrap();
    let inbox = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    use jmap_client::core::query::Filter as QueryFilter;
    use jmap_client::mailbox::query::{Comparator as MailboxComparator, Filter as MailboxFilter};

    type Sort = jmap_client::core::query::Comparator<MailboxComparator>;
    let ids = |filter: Option<QueryFilter<MailboxFilter>>, sort: Vec<Sort>| {
        let client = &client;
        async move { client.mailbox_query(filter, Some(sort)).await.unwrap().ids().to_vec() }
    };
    let by_name = vec![MailboxComparator::name()];
    assert_eq!(
        ids(Some(MailboxFilter::parent_id(None::<String>).into()), by_name.clone()).await,
        [alpha.clone(), beta.clone(), inbox.clone()],
        "top level by name, without regard to case"
    );
    assert_eq!(
        ids(Some(MailboxFilter::has_any_role(true).into()), by_name.clone()).await,
        [beta.clone(), inbox.clone()]
    );
    assert_eq!(
        ids(Some(MailboxFilter::role(Role::Sent).into()), by_name.clone()).await,
        [beta.clone()]
    );
    assert_eq!(
        ids(Some(MailboxFilter::name("HIL").into()), by_name.clone()).await,
        [child.clone()]
    );
    assert_eq!(
        ids(Some(MailboxFilter::is_subscribed(false).into()), by_name.clone()).await,
        [child.clone()]
    );
    assert_eq!(
        ids(
            Some(QueryFilter::or([
                MailboxFilter::parent_id(Some(alpha.clone())),
                MailboxFilter::role(Role::Sent)
            ])),
            by_name.clone()
        )
        .await,
        [beta.clone(), child.clone()]
    );
    assert_eq!(
        ids(
            Some(QueryFilter::not([MailboxFilter::parent_id(None::<String>)])),
            vec![MailboxComparator::name().descending()]
        )
        .await,
        [zulu.clone(), child.clone()]
    );
    assert_eq!(
        ids(
            None,
            vec![MailboxComparator::sort_order().descending(), MailboxComparator::name()]
        )
        .await,
        [alpha.clone(), beta.clone(), child.clone(), inbox.clone(), zulu.clone()]
    );
    // sortAsTree: children right after their parent; filterAsTree: only with every ancestor.
    let by_name_as_tree = |sort_as_tree: bool| {
        let client = &client;
        let by_name = by_name.clone();
        async move {
            let mut request = client.build();
            request
                .query_mailbox()
                .sort(by_name)
                .arguments()
                .sort_as_tree(sort_as_tree);
            request.send_query_mailbox().await.unwrap()
        }
    };
    let tree = by_name_as_tree(true).await;
    assert_eq!(
        tree.ids(),
        [alpha.clone(), child.clone(), beta.clone(), zulu.clone(), inbox.clone()]
    );
    let mut request = client.build();
    request
        .query_mailbox()
        .filter(MailboxFilter::name("u"))
        .sort(by_name.clone())
        .arguments()
        .filter_as_tree(true);
    assert_eq!(
        request.send_query_mailbox().await.unwrap().ids(),
        [] as [String; 0],
        "Zulu's parent beta has no u"
    );
    // Anchors and totals.
    let mut request = client.build();
    request
        .query_mailbox()
        .sort(by_name.clone())
        .anchor(&child)
        .anchor_offset(-1)
        .limit(2)
        .calculate_total(true);
    let window = request.send_query_mailbox().await.unwrap();
    assert_eq!(window.ids(), [beta.clone(), child.clone()]);
    assert_eq!(window.position(), 1);
    assert_eq!(window.total(), Some(5));
    let answer = call(
        running.http,
        &mail_request(json!([
            ["Mailbox/query", {"anchor": "0000000000000000000000000Z"}, "a"],
            ["Mailbox/query", {"filter": {"color": "red"}}, "b"],
            ["Mailbox/query", {"sort": [{"property": "totalEmails"}]}, "c"],
        ])),
    )
    .await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "anchorNotFound");
    assert_eq!(method_response(&answer, 1)[1]["type"], "unsupportedFilter");
    assert_eq!(method_response(&answer, 2)[1]["type"], "unsupportedSort");

    // queryChanges, flat and as a tree.
    for sort_as_tree in [false, true] {
        let before = by_name_as_tree(sort_as_tree).await;
        assert!(before.can_calculate_changes());
        let fresh = create(if sort_as_tree { "Middle" } else { "Aardvark" }, Some(beta.clone())).await;
        let top = if sort_as_tree { "Lima" } else { "Kilo" };
        client
            .mailbox_rename(&alpha, if sort_as_tree { "Yak" } else { "Omega" })
            .await
            .unwrap();
        client.mailbox_destroy(&fresh, false).await.unwrap();
        let fresh = create(top, None).await;
        let mut request = client.build();
        request
            .query_mailbox_changes(before.query_state())
            .sort(by_name.clone())
            .calculate_total(true)
            .arguments()
            .sort_as_tree(sort_as_tree);
        let changes = request.send_query_mailbox_changes().await.unwrap();
        let after = by_name_as_tree(sort_as_tree).await;
        assert!(after.ids().contains(&fresh));
        assert_eq!(
            apply_query_changes(before.ids(), changes.removed(), &added_items(&changes)),
            after.ids(),
            "sortAsTree {sort_as_tree}: {changes:?}"
        );
        assert_eq!(changes.total(), Some(after.ids().len()));
        // From the new state: nothing.
        let mut request = client.build();
        request
            .query_mailbox_changes(changes.new_query_state())
            .sort(by_name.clone())
            .arguments()
            .sort_as_tree(sort_as_tree);
        let quiet = request.send_query_mailbox_changes().await.unwrap();
        assert!(quiet.removed().is_empty() && quiet.added().is_empty(), "{quiet:?}");
        // maxChanges smaller than the changes.
        let mut request = client.build();
        request
            .query_mailbox_changes(before.query_state())
            .sort(by_name.clone())
            .max_changes(1);
        assert!(request.send_query_mailbox_changes().await.is_err(), "tooManyChanges");
    }
}

/// Email/queryChanges for an inMailbox query, sorted by receivedAt and by subject, after
/// deliveries, a destroy, moves in and out and a keyword change: the client that applies the
/// answer holds what a fresh query returns. Also Email/query's anchor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_query_changes_rebuild_the_results_of_a_mailbox_query() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "email-query-changes", Vec::new()).await;
    let mut inbox = Vec::new();
    for index in 0..30u64 {
        let subject = format!("Topic {:02}", (index * 11) % 30);
        inbox.push(
            deliver(
                &running,
                "INBOX",
                message("carol@example.net", &subject, "x"),
                JUNE + index * 60_000,
            )
            .await,
        );
    }
    let elsewhere = deliver(
        &running,
        "Work",
        message("dave@example.net", "Topic 99", "w"),
        JUNE + 90,
    )
    .await;
    let client = connect(&running).await;
    let inbox_id = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let work_id = running.service.find_mailbox(ALICE, "Work").unwrap().to_string();
    let sorts = [
        Comparator::received_at().descending(),
        Comparator::subject().ascending(),
    ];
    let query = |sort: &jmap_client::core::query::Comparator<Comparator>| {
        let client = &client;
        let inbox_id = inbox_id.clone();
        let sort = sort.clone();
        async move {
            let mut request = client.build();
            request
                .query_email()
                .filter(Filter::in_mailbox(&inbox_id))
                .sort([sort])
                .calculate_total(true);
            request.send_query_email().await.unwrap()
        }
    };
    let before: Vec<_> = futures::future::join_all(sorts.iter().map(query)).await;
    assert!(before.iter().all(|result| result.can_calculate_changes()));

    // Anchor: two before the sixth email, three of them.
    let mut request = client.build();
    request
        .query_email()
        .filter(Filter::in_mailbox(&inbox_id))
        .sort([Comparator::received_at().descending()])
        .anchor(&before[0].ids()[5])
        .anchor_offset(-2)
        .limit(3);
    let anchored = request.send_query_email().await.unwrap();
    assert_eq!(anchored.ids(), &before[0].ids()[3..6]);
    assert_eq!(anchored.position(), 3);
    let answer = call(
        running.http,
        &mail_request(json!([
            ["Email/query", {"filter": {"inMailbox": inbox_id}, "anchor": elsewhere}, "a"],
            ["Email/query", {"sort": [{"property": "subject"}], "anchor": elsewhere, "anchorOffset": 1, "limit": 1}, "b"],
            ["Email/queryChanges", {"sinceQueryState": before[0].query_state()}, "c"],
            ["Email/queryChanges", {"filter": {"inMailbox": inbox_id}, "sinceQueryState": before[0].query_state(), "maxChanges": 1}, "d"],
        ])),
    )
    .await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "anchorNotFound");
    assert_eq!(
        method_response(&answer, 1)[1]["position"],
        31,
        "Topic 99 is last of 31 by subject"
    );
    assert_eq!(method_response(&answer, 1)[1]["ids"], json!([]));
    assert_eq!(method_response(&answer, 2)[1]["type"], "cannotCalculateChanges");

    // Writes: two deliveries (one older than most), a destroy, a move out, a move in, a keyword.
    let older = deliver(
        &running,
        "INBOX",
        message("erin@example.net", "Topic 15b", "o"),
        JUNE + 90_000,
    )
    .await;
    let newest = deliver(
        &running,
        "INBOX",
        message("erin@example.net", "Aardvark", "n"),
        JUNE + 99 * 60_000,
    )
    .await;
    client.email_destroy(&inbox[4]).await.unwrap();
    client.email_set_mailboxes(&inbox[7], [work_id.as_str()]).await.unwrap();
    client
        .email_set_mailboxes(&elsewhere, [inbox_id.as_str()])
        .await
        .unwrap();
    client.email_set_keyword(&inbox[9], "$seen", true).await.unwrap();
    let answer = call(
        running.http,
        &mail_request(json!([[
            "Email/queryChanges",
            {"filter": {"inMailbox": inbox_id}, "sinceQueryState": before[0].query_state(), "maxChanges": 1},
            "d"
        ]])),
    )
    .await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "tooManyChanges");
    for (sort, old) in sorts.iter().zip(&before) {
        let mut request = client.build();
        request
            .query_email_changes(old.query_state())
            .filter(Filter::in_mailbox(&inbox_id))
            .sort([sort.clone()])
            .calculate_total(true);
        let changes = request.send_query_email_changes().await.unwrap();
        let after = query(sort).await;
        for id in [&older, &newest, &elsewhere] {
            assert!(after.ids().contains(id));
        }
        assert_eq!(
            apply_query_changes(old.ids(), changes.removed(), &added_items(&changes)),
            after.ids(),
            "{sort:?}: {changes:?}"
        );
        assert_eq!(changes.total(), Some(31));
        let mut request = client.build();
        request
            .query_email_changes(changes.new_query_state())
            .filter(Filter::in_mailbox(&inbox_id))
            .sort([sort.clone()]);
        let quiet = request.send_query_email_changes().await.unwrap();
        assert!(quiet.removed().is_empty() && quiet.added().is_empty(), "{quiet:?}");
    }
}

/// Issue 14: a state older than a purged tombstone gets cannotCalculateChanges, on every node and
/// from every /changes and /queryChanges, while a state taken after the purge works. Two nodes of
/// a closed cluster purge a tombstone as soon as both hold it (the acknowledged cut), so the
/// state from before the destroy falls behind the horizon within the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_from_before_a_purged_tombstone_cannot_calculate_changes() {
    let directory = tempfile::tempdir().unwrap();
    let mut members = std::collections::HashSet::new();
    for name in ["a", "b"] {
        std::fs::create_dir_all(directory.path().join(name)).unwrap();
        let keypair =
            mailmesh::node::load_or_create_identity(&directory.path().join(name).join("identity.key")).unwrap();
        members.insert(keypair.public().to_peer_id());
    }
    let (a, _stop_a) = start_member(directory.path(), "a", Vec::new(), Some(members.clone())).await;
    let seeds = a.engine.listen_addresses().await;
    let (b, _stop_b) = start_member(directory.path(), "b", seeds, Some(members)).await;
    let kept = deliver(&a, "INBOX", message("carol@example.net", "Kept", "k"), JUNE).await;
    let gone = deliver(&a, "INBOX", message("carol@example.net", "Gone", "g"), JUNE + 1).await;
    converge("delivered", &[&a, &b]).await;
    let inbox_id = a.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let at_a = connect(&a).await;
    let mut request = at_a.build();
    request.query_email().filter(Filter::in_mailbox(&inbox_id));
    let before = request.send_query_email().await.unwrap();
    assert_eq!(before.ids().len(), 2);
    let old_state = before.query_state().to_owned();

    at_a.email_destroy(&gone).await.unwrap();
    converge("destroyed", &[&a, &b]).await;
    let calls = |state: &str| {
        mail_request(json!([
            ["Email/changes", {"sinceState": state}, "e"],
            ["Mailbox/changes", {"sinceState": state}, "m"],
            ["Email/queryChanges", {"sinceQueryState": state, "filter": {"inMailbox": inbox_id}}, "q"],
            ["Mailbox/queryChanges", {"sinceQueryState": state}, "n"],
        ]))
    };
    // Until both members hold the tombstone and purge it, the old state still lists the destroy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let answer = call(a.http, &calls(&old_state)).await;
        let email = method_response(&answer, 0);
        if email[0] == "error" {
            assert_eq!(email[1]["type"], "cannotCalculateChanges", "{email}");
            break;
        }
        assert_eq!(email[1]["destroyed"], json!([gone]), "before the purge: {email}");
        assert!(
            std::time::Instant::now() < deadline,
            "the tombstone was not purged within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    converge("purged", &[&a, &b]).await;
    for node in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let answer = loop {
            let answer = call(node.http, &calls(&old_state)).await;
            if method_response(&answer, 0)[0] == "error" || std::time::Instant::now() > deadline {
                break answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        for index in 0..4 {
            let response = method_response(&answer, index);
            assert_eq!(response[0], "error", "{index}: {response}");
            assert_eq!(response[1]["type"], "cannotCalculateChanges", "{index}: {response}");
        }
        // A fresh state works on that node.
        let fresh = node.service.account_state(ALICE).unwrap();
        let answer = call(node.http, &calls(&fresh)).await;
        for index in 0..4 {
            let response = method_response(&answer, index);
            assert_ne!(response[0], "error", "{index}: {response}");
        }
        assert_eq!(method_response(&answer, 0)[1]["destroyed"], json!([]));
    }
    let mut request = at_a.build();
    request.query_email().filter(Filter::in_mailbox(&inbox_id));
    assert_eq!(request.send_query_email().await.unwrap().ids(), [kept]);
}

/// Email/query's filters beyond inMailbox and text (from, subject, before, after, minSize,
/// maxSize, hasKeyword, notKeyword, inMailboxOtherThan) under AND, OR and NOT, through
/// jmap-client, and the filters it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_query_filters_by_sender_subject_dates_sizes_keywords_and_operators() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "email-filters", Vec::new()).await;
    let alpha = deliver(
        &running,
        "INBOX",
        message("Carol <carol@example.net>", "Alpha plan", "a"),
        JUNE,
    )
    .await;
    let beta = deliver(
        &running,
        "INBOX",
        message("dave@example.net", "Beta plan", &"long ".repeat(200)),
        JUNE + 3_600_000,
    )
    .await;
    let gamma = deliver(
        &running,
        "INBOX",
        message("Carol <carol@example.net>", "Gamma", "g"),
        JUNE + 7_200_000,
    )
    .await;
    let work = deliver(
        &running,
        "Work",
        message("erin@example.net", "Delta plan", "d"),
        JUNE + 60_000,
    )
    .await;
    let client = connect(&running).await;
    client.email_set_keyword(&beta, "$flagged", true).await.unwrap();
    client.email_set_keyword(&gamma, "$seen", true).await.unwrap();
    let inbox_id = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let oldest_first = || Some([Comparator::received_at().ascending()]);
    let query = |filter: jmap_client::core::query::Filter<Filter>| {
        let client = &client;
        async move {
            client
                .email_query(Some(filter), oldest_first())
                .await
                .unwrap()
                .ids()
                .to_vec()
        }
    };
    let hour = (JUNE / 1000) as i64 + 3600;
    assert_eq!(
        query(jmap_client::core::query::Filter::and([
            Filter::in_mailbox(&inbox_id),
            Filter::from("CAROL")
        ]))
        .await,
        [alpha.clone(), gamma.clone()]
    );
    assert_eq!(
        query(Filter::subject("plan").into()).await,
        [alpha.clone(), work.clone(), beta.clone()]
    );
    assert_eq!(query(Filter::has_keyword("$flagged").into()).await, [beta.clone()]);
    assert_eq!(
        query(jmap_client::core::query::Filter::not([Filter::not_keyword("$seen")])).await,
        [gamma.clone()]
    );
    assert_eq!(query(Filter::before(hour).into()).await, [alpha.clone(), work.clone()]);
    assert_eq!(query(Filter::after(hour).into()).await, [beta.clone(), gamma.clone()]);
    assert_eq!(query(Filter::min_size(900).into()).await, [beta.clone()]);
    assert_eq!(
        query(Filter::max_size(900).into()).await,
        [alpha.clone(), work.clone(), gamma.clone()]
    );
    assert_eq!(
        query(Filter::in_mailbox_other_than([inbox_id.as_str()]).into()).await,
        [work.clone()]
    );
    assert_eq!(
        query(jmap_client::core::query::Filter::or([
            Filter::subject("gamma"),
            Filter::min_size(900)
        ]))
        .await,
        [beta.clone(), gamma.clone()]
    );
    // A filtered query pages, counts and anchors like any other, and says it cannot calculate
    // changes.
    let mut request = client.build();
    request
        .query_email()
        .filter(Filter::subject("plan"))
        .sort([Comparator::received_at().ascending()])
        .anchor(&work)
        .limit(1)
        .calculate_total(true);
    let window = request.send_query_email().await.unwrap();
    assert_eq!(window.ids(), [work.clone()]);
    assert_eq!(window.position(), 1);
    assert_eq!(window.total(), Some(3));
    assert!(!window.can_calculate_changes());
    let answer = call(
        running.http,
        &mail_request(json!([
            ["Email/query", {"filter": {"priority": "high"}}, "a"],
            ["Email/query", {"filter": {"operator": "OR", "conditions": [{"inMailbox": inbox_id}, {"subject": "x"}]}}, "b"],
            ["Email/query", {"filter": {"before": "yesterday"}}, "c"],
            ["Email/query", {"filter": {"operator": "XOR", "conditions": []}}, "d"],
        ])),
    )
    .await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "unsupportedFilter");
    assert_eq!(method_response(&answer, 1)[1]["type"], "unsupportedFilter");
    assert_eq!(method_response(&answer, 2)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 3)[1]["type"], "unsupportedFilter");
}

fn threaded(message_id: &str, references: &[&str], subject: &str) -> Vec<u8> {
    let mut headers = format!(
        "From: carol@example.net\r\nTo: alice@example.org\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n"
    );
    if let Some(parent) = references.last() {
        headers.push_str(&format!("In-Reply-To: <{parent}>\r\n"));
        let list: Vec<String> = references.iter().map(|id| format!("<{id}>")).collect();
        headers.push_str(&format!("References: {}\r\n", list.join(" ")));
    }
    format!("{headers}Date: Mon, 1 Jun 2026 10:00:00 +0000\r\n\r\nabout {subject}\r\n").into_bytes()
}

/// Threads from References and In-Reply-To: a parent and two replies, the deeper reply
/// delivered first on one node and the parent on the other, are one thread with the same id on
/// both nodes, through Email/get, Thread/get (jmap-client) and Thread/changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_and_its_replies_share_one_thread_on_every_node() {
    let directory = tempfile::tempdir().unwrap();
    let (a, _stop_a) = start_node(directory.path(), "a", Vec::new()).await;
    let seeds = a.engine.listen_addresses().await;
    let (b, _stop_b) = start_node(directory.path(), "b", seeds).await;
    let unrelated = deliver(&a, "INBOX", message("dave@example.net", "Lunch", "l"), JUNE).await;
    converge("before", &[&a, &b]).await;
    let before = a.service.account_state(ALICE).unwrap();
    // The second reply arrives first (on a), then the parent (on b), then the first reply (on a).
    let second = deliver(
        &a,
        "INBOX",
        threaded(
            "r2@example.net",
            &["root@example.net", "r1@example.net"],
            "Re: Re: Plan",
        ),
        JUNE + 3000,
    )
    .await;
    let parent = deliver(&b, "Work", threaded("root@example.net", &[], "Plan"), JUNE + 1000).await;
    let first = deliver(
        &a,
        "INBOX",
        threaded("r1@example.net", &["root@example.net"], "RE: Plan"),
        JUNE + 2000,
    )
    .await;
    converge("delivered", &[&a, &b]).await;
    let mut thread_ids = Vec::new();
    for node in [&a, &b] {
        let client = connect(node).await;
        let mut request = client.build();
        request
            .get_email()
            .ids([parent.as_str(), first.as_str(), second.as_str(), unrelated.as_str()])
            .properties([Property::Id, Property::ThreadId]);
        let got = request.send_get_email().await.unwrap();
        let threads: Vec<String> = got
            .list()
            .iter()
            .map(|email| email.thread_id().unwrap().to_owned())
            .collect();
        assert_eq!(threads[0], threads[1], "{threads:?}");
        assert_eq!(threads[0], threads[2], "{threads:?}");
        assert_ne!(threads[0], threads[3], "{threads:?}");
        let thread = client.thread_get(&threads[0]).await.unwrap().unwrap();
        assert_eq!(
            thread.email_ids(),
            [parent.clone(), first.clone(), second.clone()],
            "oldest first"
        );
        let lunch = client.thread_get(&threads[3]).await.unwrap().unwrap();
        assert_eq!(lunch.email_ids(), [unrelated.clone()]);
        assert!(client.thread_get("Tnothing").await.unwrap().is_none());
        // Since the state before the three: the thread is created, the other untouched.
        let mut request = client.build();
        request.changes_thread(&before);
        let changes = request.send_changes_thread().await.unwrap();
        // (A feed read from another node's state may list an older change again: only the
        // thread's own entry is asserted.)
        assert!(changes.created().contains(&threads[0]), "{:?}", changes.created());
        assert!(!changes.updated().contains(&threads[0]) && !changes.destroyed().contains(&threads[0]));
        thread_ids.push(threads[0].clone());
    }
    assert_eq!(thread_ids[0], thread_ids[1], "both nodes give the same thread id");

    // A destroy: the thread is updated while a reply is left, destroyed with its last email.
    let at_a = connect(&a).await;
    let after_delivery = a.service.account_state(ALICE).unwrap();
    at_a.email_destroy(&second).await.unwrap();
    let answer = call(
        a.http,
        &mail_request(json!([
            ["Thread/changes", {"sinceState": after_delivery}, "c"],
            ["Thread/get", {"ids": [thread_ids[0]]}, "g"],
            ["Thread/changes", {"sinceState": "garbage"}, "e"],
            ["Thread/changes", {"sinceState": after_delivery, "maxChanges": 0}, "z"],
            ["Thread/get", {"ids": [thread_ids[0]], "properties": ["subject"]}, "p"],
        ])),
    )
    .await;
    let changes = method_response(&answer, 0);
    assert!(
        changes[1]["updated"]
            .as_array()
            .unwrap()
            .contains(&json!(thread_ids[0])),
        "{changes}"
    );
    assert!(
        !changes[1]["destroyed"]
            .as_array()
            .unwrap()
            .contains(&json!(thread_ids[0])),
        "{changes}"
    );
    assert_eq!(
        method_response(&answer, 1)[1]["list"][0]["emailIds"],
        json!([parent, first])
    );
    assert_eq!(method_response(&answer, 2)[1]["type"], "cannotCalculateChanges");
    assert_eq!(method_response(&answer, 3)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 4)[1]["type"], "invalidArguments");
    let before_destroys = a.service.account_state(ALICE).unwrap();
    at_a.email_destroy(&parent).await.unwrap();
    at_a.email_destroy(&first).await.unwrap();
    let answer = call(
        a.http,
        &mail_request(json!([["Thread/changes", {"sinceState": before_destroys}, "c"]])),
    )
    .await;
    let changes = method_response(&answer, 0);
    assert!(
        changes[1]["destroyed"]
            .as_array()
            .unwrap()
            .contains(&json!(thread_ids[0])),
        "{changes}"
    );
    assert!(
        !changes[1]["updated"]
            .as_array()
            .unwrap()
            .contains(&json!(thread_ids[0])),
        "{changes}"
    );
}

/// Waits until the full-text index finds `id` for `text`.
async fn wait_for_search(address: std::net::SocketAddr, text: &str, id: &str) {
    let search = mail_request(json!([["Email/query", {"filter": {"text": text}}, "t"]]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !method_response(&call(address, &search).await, 0)[1]["ids"]
        .as_array()
        .is_some_and(|ids| ids.contains(&json!(id)))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the search index never found {id}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// SearchSnippet/get through jmap-client and raw JSON: the words of text, subject and body
/// conditions marked, everything else HTML-escaped, null where nothing matches, and its errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_snippets_mark_the_words_searched_for() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "snippets", Vec::new()).await;
    let body = format!(
        "{}The <new> budget plan & more is ready.\r\n{}",
        "Filler words. ".repeat(30),
        "Tail. ".repeat(80)
    );
    let planned = deliver(
        &running,
        "INBOX",
        message("carol@example.net", "Budget plan", &body),
        JUNE,
    )
    .await;
    let other = deliver(
        &running,
        "INBOX",
        message("dave@example.net", "Lunch", "sandwiches"),
        JUNE + 1,
    )
    .await;
    wait_for_search(running.http, "budget", &planned).await;
    let client = connect(&running).await;
    let snippets = client
        .search_snippet_get(
            Some(Filter::text("budget")),
            [planned.as_str(), other.as_str(), "nothing"],
        )
        .await
        .unwrap();
    let snippet = snippets.snippet(&planned).unwrap();
    assert_eq!(snippet.subject(), Some("<mark>Budget</mark> plan"));
    let preview = snippet.preview().unwrap();
    assert!(
        preview.contains("The &lt;new&gt; <mark>budget</mark> plan &amp; more is ready."),
        "{preview}"
    );
    assert!(preview.chars().count() <= 260, "{preview}");
    let lunch = snippets.snippet(&other).unwrap();
    assert_eq!((lunch.subject(), lunch.preview()), (None, None));
    assert_eq!(snippets.not_found(), Some(&["nothing".to_owned()][..]));

    let answer = call(
        running.http,
        &mail_request(json!([
            ["SearchSnippet/get", {"filter": {"subject": "plan"}, "emailIds": [planned]}, "s"],
            ["SearchSnippet/get", {"filter": {"operator": "OR", "conditions": [{"body": "sandwiches"}, {"from": "x"}]}, "emailIds": [planned, other]}, "b"],
            ["SearchSnippet/get", {"filter": {"text": 7}, "emailIds": [planned]}, "e1"],
            ["SearchSnippet/get", {"filter": {"text": "x"}}, "e2"],
            ["SearchSnippet/get", {"filter": {"operator": "XOR", "conditions": []}, "emailIds": []}, "e3"],
        ])),
    )
    .await;
    let subject_only = method_response(&answer, 0);
    assert_eq!(subject_only[1]["list"][0]["subject"], "Budget <mark>plan</mark>");
    assert_eq!(
        subject_only[1]["list"][0]["preview"],
        json!(null),
        "subject words are not marked in the body"
    );
    let body_only = method_response(&answer, 1);
    assert_eq!(body_only[1]["list"][0]["preview"], json!(null));
    assert_eq!(body_only[1]["list"][1]["preview"], "<mark>sandwiches</mark>");
    assert_eq!(body_only[1]["list"][1]["subject"], json!(null));
    assert_eq!(method_response(&answer, 2)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 3)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 4)[1]["type"], "unsupportedFilter");
}

const MULTIPART: &str = "From: Carol <carol@example.net>\r\nTo: \"Alice A.\" <alice@example.org>, bob@example.org\r\nCc: Team: dave@example.net, erin@example.net;\r\nSubject: =?utf-8?q?Caf=C3=A9?= plan\r\nDate: Mon, 1 Jun 2026 10:00:00 +0200\r\nMessage-ID: <mixed@example.net>\r\nList-Unsubscribe: <mailto:leave@example.net>\r\nX-Tag: one\r\nX-Tag: two\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello in plain text, with a café.\r\n--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello in <b>HTML</b></p>\r\n--inner--\r\n--outer\r\nContent-Type: application/pdf; name=\"plan.pdf\"\r\nContent-Disposition: attachment; filename=\"plan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--outer--\r\n";

/// Email/get's body properties (bodyStructure, textBody, htmlBody, attachments, bodyValues with
/// its fetch and truncation arguments, hasAttachment) and the header forms, through jmap-client
/// and raw JSON; a part's blobId downloads its decoded content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_get_serves_bodies_parts_and_every_header_form() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "bodies", Vec::new()).await;
    let id = deliver(&running, "INBOX", MULTIPART.as_bytes().to_vec(), JUNE).await;
    let plain = deliver(
        &running,
        "INBOX",
        message("dave@example.net", "Plain", "just text"),
        JUNE + 1,
    )
    .await;
    let client = connect(&running).await;
    let mut request = client.build();
    request
        .get_email()
        .ids([id.as_str(), plain.as_str()])
        .properties([
            Property::Id,
            Property::HasAttachment,
            Property::TextBody,
            Property::HtmlBody,
            Property::Attachments,
            Property::BodyValues,
        ])
        .arguments()
        .fetch_text_body_values(true)
        .fetch_html_body_values(true)
        .max_body_value_bytes(12);
    let got = request.send_get_email().await.unwrap();
    let email = &got.list()[0];
    assert!(email.has_attachment());
    let text_part = email.text_body().unwrap()[0].part_id().unwrap().to_owned();
    let html_part = email.html_body().unwrap()[0].part_id().unwrap().to_owned();
    assert_ne!(text_part, html_part);
    assert_eq!(email.body_value(&text_part).unwrap().value(), "Hello in pla");
    assert!(email.body_value(&text_part).unwrap().is_truncated());
    assert_eq!(email.body_value(&html_part).unwrap().value(), "<p>Hello in ");
    let attachment = &email.attachments().unwrap()[0];
    assert_eq!(attachment.name(), Some("plan.pdf"));
    assert_eq!(attachment.content_type(), Some("application/pdf"));
    let downloaded = client.download(attachment.blob_id().unwrap()).await.unwrap();
    assert_eq!(downloaded, b"%PDF-1.4\n");
    assert!(!got.list()[1].has_attachment());

    let answer = call(
        running.http,
        &mail_request(json!([
            ["Email/get", {"ids": [id], "properties": [
                "bodyStructure", "bodyValues",
                "header:Subject:asText", "header:To:asAddresses", "header:Cc:asGroupedAddresses",
                "header:Message-ID:asMessageIds", "header:Date:asDate", "header:List-Unsubscribe:asURLs",
                "header:X-Tag:all", "header:x-tag", "header:X-Tag:asText:all", "header:From:asRaw"
            ], "bodyProperties": ["partId", "type", "charset", "size", "headers"], "fetchAllBodyValues": true}, "g"],
            ["Email/get", {"ids": [id], "properties": ["header:From:asDate"]}, "e1"],
            ["Email/get", {"ids": [id], "properties": ["header:X:asNothing"]}, "e2"],
            ["Email/get", {"ids": [id], "properties": ["bodyStructure"], "bodyProperties": ["nope"]}, "e3"],
            ["Email/get", {"ids": [id], "properties": ["bodyValues"], "maxBodyValueBytes": -1}, "e4"],
        ])),
    )
    .await;
    let email = method_response(&answer, 0)[1]["list"][0].clone();
    let structure = &email["bodyStructure"];
    assert_eq!(structure["type"], "multipart/mixed");
    assert_eq!(structure["partId"], json!(null));
    assert_eq!(structure["subParts"][0]["type"], "multipart/alternative");
    assert_eq!(structure["subParts"][0]["subParts"][0]["type"], "text/plain");
    assert_eq!(structure["subParts"][0]["subParts"][0]["charset"], "utf-8");
    assert_eq!(structure["subParts"][1]["size"], 9);
    assert!(structure["subParts"][1]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|header| header["name"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case("Content-Transfer-Encoding")));
    assert_eq!(
        email["bodyValues"].as_object().unwrap().len(),
        2,
        "{}",
        email["bodyValues"]
    );
    assert!(email["bodyValues"]
        .as_object()
        .unwrap()
        .values()
        .any(|value| value["value"].as_str().unwrap().contains("café")));
    assert_eq!(email["header:Subject:asText"], "Café plan");
    assert_eq!(
        email["header:To:asAddresses"],
        json!([{"name": "Alice A.", "email": "alice@example.org"}, {"name": null, "email": "bob@example.org"}])
    );
    assert_eq!(email["header:Cc:asGroupedAddresses"][0]["name"], "Team");
    assert_eq!(
        email["header:Cc:asGroupedAddresses"][0]["addresses"][1]["email"],
        "erin@example.net"
    );
    assert_eq!(email["header:Message-ID:asMessageIds"], json!(["mixed@example.net"]));
    assert_eq!(email["header:Date:asDate"], "2026-06-01T10:00:00+02:00");
    assert_eq!(
        email["header:List-Unsubscribe:asURLs"],
        json!(["mailto:leave@example.net"])
    );
    assert_eq!(email["header:X-Tag:all"], json!([" one", " two"]));
    assert_eq!(email["header:x-tag"], " two", "the last one, raw");
    assert_eq!(email["header:X-Tag:asText:all"], json!(["one", "two"]));
    assert_eq!(email["header:From:asRaw"], " Carol <carol@example.net>");
    for index in 1..=4 {
        assert_eq!(
            method_response(&answer, index)[1]["type"],
            "invalidArguments",
            "{index}"
        );
    }
}

/// Email/query's filters that read the message (to, cc, bcc, body, header, hasAttachment, and a
/// text condition inside an operator) through jmap-client, their bad arguments, and
/// Email/queryChanges' upToId.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_query_filters_read_recipients_bodies_headers_and_attachments() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "message-filters", Vec::new()).await;
    let mixed = deliver(&running, "INBOX", MULTIPART.as_bytes().to_vec(), JUNE).await;
    let lunch = deliver(
        &running,
        "INBOX",
        message("carol@example.net", "Lunch", "sandwiches at noon"),
        JUNE + 1,
    )
    .await;
    let client = connect(&running).await;
    let query = |filter: jmap_client::core::query::Filter<Filter>| {
        let client = &client;
        async move {
            client
                .email_query(Some(filter), Some([Comparator::received_at().ascending()]))
                .await
                .unwrap()
                .ids()
                .to_vec()
        }
    };
    let none: Vec<String> = Vec::new();
    assert_eq!(query(Filter::to("BOB@example").into()).await, [mixed.clone()]);
    assert_eq!(query(Filter::to("alice").into()).await, [mixed.clone(), lunch.clone()]);
    assert_eq!(query(Filter::cc("erin").into()).await, [mixed.clone()]);
    assert_eq!(query(Filter::bcc("alice").into()).await, none);
    assert_eq!(query(Filter::body("Sandwiches").into()).await, [lunch.clone()]);
    assert_eq!(
        query(Filter::body("html").into()).await,
        [mixed.clone()],
        "HTML parts are body text"
    );
    assert_eq!(query(Filter::has_attachment(true).into()).await, [mixed.clone()]);
    assert_eq!(query(Filter::has_attachment(false).into()).await, [lunch.clone()]);
    assert_eq!(
        query(Filter::header("x-tag", None::<String>).into()).await,
        [mixed.clone()]
    );
    assert_eq!(
        query(Filter::header("X-Tag", Some("TWO")).into()).await,
        [mixed.clone()]
    );
    assert_eq!(query(Filter::header("X-Tag", Some("three")).into()).await, none);
    assert_eq!(
        query(jmap_client::core::query::Filter::or([
            Filter::text("noon"),
            Filter::cc("dave")
        ]))
        .await,
        [mixed.clone(), lunch.clone()],
        "a text condition inside an operator"
    );
    assert_eq!(
        query(jmap_client::core::query::Filter::not([Filter::text("carol")])).await,
        none,
        "both are from carol"
    );
    let inbox_id = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let state = running.service.account_state(ALICE).unwrap();
    let answer = call(
        running.http,
        &mail_request(json!([
            ["Email/query", {"filter": {"header": ["a", "b", "c"]}}, "a"],
            ["Email/query", {"filter": {"header": []}}, "b"],
            ["Email/query", {"filter": {"hasAttachment": "yes"}}, "c"],
            ["Email/query", {"filter": {"to": 1}}, "d"],
            ["Email/queryChanges", {"sinceQueryState": state, "filter": {"inMailbox": inbox_id}, "upToId": 5}, "e"],
            ["Email/queryChanges", {"sinceQueryState": state, "filter": {"inMailbox": inbox_id}, "upToId": mixed}, "f"],
        ])),
    )
    .await;
    for index in 0..5 {
        assert_eq!(
            method_response(&answer, index)[1]["type"],
            "invalidArguments",
            "{index}"
        );
    }
    let changes = method_response(&answer, 5);
    assert_eq!(changes[0], "Email/queryChanges", "{changes}");
    assert_eq!(changes[1]["added"], json!([]));
}

/// Email/parse of an uploaded message through jmap-client (properties, body parts and values,
/// a part's blob downloadable), its notFound and notParsable, and Email/copy's errors for a
/// login that reaches one account (RFC 8620 §5.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_parse_reads_uploads_and_email_copy_answers_with_one_account() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "parse-copy", Vec::new()).await;
    let stored = deliver(&running, "INBOX", message("carol@example.net", "Stored", "s"), JUNE).await;
    let client = connect(&running).await;
    let upload = client
        .upload(None, MULTIPART.as_bytes().to_vec(), Some("message/rfc822"))
        .await
        .unwrap();
    let blob = upload.blob_id().to_owned();
    let parsed = client
        .email_parse(
            &blob,
            Some([
                Property::Subject,
                Property::From,
                Property::Cc,
                Property::HasAttachment,
                Property::TextBody,
                Property::Attachments,
                Property::BodyValues,
                Property::Size,
                Property::ThreadId,
            ]),
            None::<Vec<jmap_client::email::BodyProperty>>,
            Some(5),
        )
        .await
        .unwrap();
    assert_eq!(parsed.subject(), Some("Café plan"));
    assert_eq!(parsed.from().unwrap()[0].email(), "carol@example.net");
    assert_eq!(parsed.cc().unwrap().len(), 2, "the group's members");
    assert!(parsed.has_attachment());
    assert_eq!(parsed.size(), MULTIPART.len());
    assert_eq!(parsed.thread_id(), None, "only stored emails have threads");
    let text_part = parsed.text_body().unwrap()[0].part_id().unwrap().to_owned();
    assert_eq!(parsed.body_value(&text_part).unwrap().value(), "Hello");
    let attachment = parsed.attachments().unwrap()[0].blob_id().unwrap().to_owned();
    assert_eq!(client.download(&attachment).await.unwrap(), b"%PDF-1.4\n");
    let not_mail = client
        .upload(None, b"\x00\x01 no headers".to_vec(), Some("application/octet-stream"))
        .await
        .unwrap();

    let answer = call(
        running.http,
        &mail_request(json!([
            ["Email/parse", {"blobIds": [not_mail.blob_id(), "Unothing", format!("M{stored}")], "properties": ["subject", "blobId"]}, "p"],
            ["Email/parse", {"blobIds": "x"}, "e1"],
            ["Email/parse", {"blobIds": [blob], "properties": ["header:From:asDate"]}, "e2"],
            ["Email/copy", {"fromAccountId": ALICE, "accountId": ALICE, "create": {"c": {"id": stored, "mailboxIds": {}}}}, "c1"],
            ["Email/copy", {"fromAccountId": "bob@example.org", "accountId": ALICE, "create": {}}, "c2"],
            ["Email/copy", {"fromAccountId": ALICE, "accountId": "bob@example.org", "create": {}}, "c3"],
            ["Email/copy", {"accountId": ALICE, "create": {}}, "c4"],
        ])),
    )
    .await;
    let parse = method_response(&answer, 0);
    assert_eq!(parse[1]["notParsable"], json!([not_mail.blob_id()]), "{parse}");
    assert_eq!(parse[1]["notFound"], json!(["Unothing"]));
    assert_eq!(
        parse[1]["parsed"][format!("M{stored}")],
        json!({"subject": "Stored", "blobId": format!("M{stored}")})
    );
    assert_eq!(method_response(&answer, 1)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 2)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 3)[1]["type"], "invalidArguments");
    assert_eq!(method_response(&answer, 4)[1]["type"], "fromAccountNotFound");
    assert_eq!(method_response(&answer, 5)[1]["type"], "accountNotFound");
    assert_eq!(method_response(&answer, 6)[1]["type"], "invalidArguments");
    // jmap-client's copy from another account gets the same error.
    let error = client
        .email_copy(
            "bob@example.org",
            &stored,
            [running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string()],
            None::<Vec<String>>,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("fromAccountNotFound") || format!("{error:?}").contains("FromAccountNotFound"),
        "{error:?}"
    );
}

/// Email/set create (RFC 8621 §4.6) through jmap-client: an email given by its properties
/// (addresses, subject, date, keywords, a text and an HTML body from bodyValues, an attachment
/// from an uploaded blob) is written as a real MIME message and stored; Email/get reads back what
/// was given, and the stored bytes parse as that message. A creation may name a mailbox created
/// earlier in the same request; creations that would inject a header, set a Content-* header or
/// name a missing blob are refused one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_set_creates_a_message_from_its_properties() {
    use jmap_client::email::{EmailAddress, EmailBodyPart};
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "create", Vec::new()).await;
    let client = connect(&running).await;
    let inbox = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let attachment = client
        .upload(None, b"%PDF-1.4 not really\x00\xff".to_vec(), Some("application/pdf"))
        .await
        .unwrap();

    let mut request = client.build();
    request
        .set_email()
        .create_with_id("draft")
        .mailbox_ids([inbox.as_str()])
        .keywords(["$seen", "$draft"])
        .from([EmailAddress::from(("Alice Liddell", "alice@example.org"))])
        .to([EmailAddress::from(("Bob", "bob@example.net"))])
        .subject("Plans for Zürich")
        .sent_at(1_780_308_000)
        .received_at((JUNE / 1000) as i64)
        .text_body(EmailBodyPart::new().part_id("text"))
        .html_body(EmailBodyPart::new().part_id("html"))
        .attachment(
            EmailBodyPart::new()
                .blob_id(attachment.blob_id())
                .content_type("application/pdf")
                .name("plan.pdf"),
        )
        .body_value("text".into(), "Let us meet at noon.\nSee you")
        .body_value("html".into(), "<p>Let us meet at <b>noon</b>.</p>");
    let mut response = request.send_set_email().await.unwrap();
    let created = response.created("draft").expect("the email is created");
    let id = created.id().unwrap().to_owned();
    assert!(created.thread_id().is_some());
    assert!(created.size() > 0);

    let email = client
        .email_get(
            &id,
            Some([
                Property::Subject,
                Property::From,
                Property::To,
                Property::Keywords,
                Property::ReceivedAt,
                Property::SentAt,
                Property::MailboxIds,
                Property::HasAttachment,
                Property::Attachments,
                Property::Preview,
            ]),
        )
        .await
        .unwrap()
        .expect("Email/get finds the created email");
    assert_eq!(email.subject(), Some("Plans for Zürich"));
    assert_eq!(email.from().unwrap()[0].email(), "alice@example.org");
    assert_eq!(email.from().unwrap()[0].name(), Some("Alice Liddell"));
    assert_eq!(email.to().unwrap()[0].email(), "bob@example.net");
    let mut keywords = email.keywords();
    keywords.sort();
    assert_eq!(keywords, ["$draft", "$seen"]);
    assert_eq!(email.received_at(), Some((JUNE / 1000) as i64));
    assert_eq!(email.sent_at(), Some(1_780_308_000));
    assert_eq!(email.mailbox_ids(), [inbox.as_str()]);
    assert!(email.has_attachment());
    assert_eq!(email.attachments().unwrap()[0].name(), Some("plan.pdf"));
    assert!(
        email.preview().unwrap().starts_with("Let us meet at noon."),
        "{:?}",
        email.preview()
    );

    // The stored bytes are a real MIME message: alternative text and HTML, the attachment's
    // bytes intact.
    let raw = running.service.raw(ALICE, id.parse().unwrap()).unwrap();
    let message = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(message.subject(), Some("Plans for Zürich"));
    assert_eq!(
        message.body_text(0).unwrap().replace("\r\n", "\n").trim_end(),
        "Let us meet at noon.\nSee you"
    );
    assert!(message.body_html(0).unwrap().contains("<b>noon</b>"));
    assert_eq!(
        message.attachment(0).unwrap().contents(),
        b"%PDF-1.4 not really\x00\xff"
    );
    assert!(
        message.message_id().is_some(),
        "the writer gives the message a Message-ID"
    );

    // A mailbox created in the same request, then errors, one creation at a time.
    let answer = call(
        running.http,
        &mail_request(json!([
            ["Mailbox/set", {"create": {"m": {"name": "Drafts", "role": "drafts"}}}, "0"],
            ["Email/set", {"create": {
                "good": {"mailboxIds": {"#m": true}, "subject": "Draft", "header:X-Trace:asText": "kept",
                         "bodyStructure": {"type": "multipart/mixed", "subParts": [
                             {"partId": "1", "type": "text/plain"},
                             {"blobId": attachment.blob_id(), "type": "text/plain", "disposition": "attachment", "name": "notes.txt"}
                         ]},
                         "bodyValues": {"1": {"value": "inside"}}},
                "injected": {"mailboxIds": {"#m": true}, "subject": "Hi\r\nBcc: eve@example.net"},
                "content": {"mailboxIds": {"#m": true}, "header:Content-Type": "text/html"},
                "missing": {"mailboxIds": {"#m": true}, "attachments": [{"blobId": "Unothere", "type": "image/png"}]},
                "server": {"mailboxIds": {"#m": true}, "threadId": "T1"},
                "two": {"mailboxIds": {"#m": true, (inbox.as_str()): true}},
            }}, "1"],
        ])),
    )
    .await;
    let set = method_response(&answer, 1)[1].clone();
    let good = set["created"]["good"]["id"]
        .as_str()
        .expect("the good creation is stored")
        .to_owned();
    for (creation, kind, property) in [
        ("injected", "invalidProperties", Some("subject")),
        ("content", "invalidProperties", Some("header:Content-Type")),
        ("missing", "blobNotFound", None),
        ("server", "invalidProperties", Some("threadId")),
        ("two", "invalidProperties", Some("mailboxIds")),
    ] {
        assert_eq!(set["notCreated"][creation]["type"], kind, "{creation}: {set}");
        if let Some(property) = property {
            assert_eq!(
                set["notCreated"][creation]["properties"],
                json!([property]),
                "{creation}: {set}"
            );
        }
    }
    let drafts = running.service.find_mailbox(ALICE, "Drafts").unwrap();
    let stored = running
        .service
        .find_email(ALICE, good.parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(stored.1.mailbox, drafts);
    let raw = running.service.raw(ALICE, good.parse().unwrap()).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("eve@example.net"), "no injected header");
    let message = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(
        message.header("X-Trace").and_then(|value| value.as_text()),
        Some("kept")
    );
    use mail_parser::MimeHeaders;
    assert_eq!(message.attachment(0).unwrap().attachment_name(), Some("notes.txt"));
}

/// Email/query sorted by several comparators, by `to` and by keywords (on the email and across
/// its thread), and with collapseThreads: one email per thread, the first in the sort, with the
/// total counting threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_query_sorts_by_several_comparators_and_collapses_threads() {
    let directory = tempfile::tempdir().unwrap();
    let (running, _stop) = start_node(directory.path(), "sorts", Vec::new()).await;
    let client = connect(&running).await;
    let inbox = running.service.find_mailbox(ALICE, "INBOX").unwrap().to_string();
    let to = |recipient: &str, subject: &str, id: &str| {
        format!(
            "From: carol@example.net\r\nTo: {recipient}\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\nDate: Mon, 1 Jun 2026 10:00:00 +0000\r\n\r\nx\r\n"
        )
        .into_bytes()
    };
    // Subjects pair up so that a second comparator decides within each pair.
    let zed = deliver(&running, "INBOX", to("Zed <zed@example.net>", "Same", "a@x"), JUNE).await;
    let amy = deliver(&running, "INBOX", to("amy@example.net", "Same", "b@x"), JUNE + 1000).await;
    let bea = deliver(
        &running,
        "INBOX",
        to("Bea <bea@example.net>", "Other", "c@x"),
        JUNE + 2000,
    )
    .await;
    // A thread of two: the root and a reply, the reply flagged.
    let root = deliver(&running, "INBOX", threaded("root@x", &[], "Plan"), JUNE + 3000).await;
    let reply = deliver(
        &running,
        "INBOX",
        threaded("reply@x", &["root@x"], "Re: Plan"),
        JUNE + 4000,
    )
    .await;
    client.email_set_keyword(&reply, "$flagged", true).await.unwrap();

    let query = |arguments: Value| {
        let address = running.http;
        let inbox = inbox.clone();
        async move {
            let mut arguments = arguments;
            arguments["filter"] = json!({"inMailbox": inbox});
            let answer = call(address, &mail_request(json!([["Email/query", arguments, "q"]]))).await;
            method_response(&answer, 0)[1].clone()
        }
    };
    let ids = |response: &Value| -> Vec<String> {
        response["ids"]
            .as_array()
            .unwrap_or_else(|| panic!("{response}"))
            .iter()
            .map(|id| id.as_str().unwrap().to_owned())
            .collect()
    };
    let by_subject_then_newest = query(json!({"sort": [
        {"property": "subject"},
        {"property": "receivedAt", "isAscending": false}
    ]}))
    .await;
    // "Re: Plan" sorts as "Plan": the newer of the two first.
    assert_eq!(
        ids(&by_subject_then_newest),
        [bea.clone(), reply.clone(), root.clone(), amy.clone(), zed.clone()]
    );
    assert_eq!(by_subject_then_newest["canCalculateChanges"], false);
    let by_to = query(json!({"sort": [{"property": "to"}, {"property": "receivedAt"}]})).await;
    // By name, else address, without regard to case: alice (the threaded ones, oldest first), amy, Bea, Zed.
    assert_eq!(
        ids(&by_to),
        [root.clone(), reply.clone(), amy.clone(), bea.clone(), zed.clone()]
    );
    let flagged_first = query(json!({"sort": [
        {"property": "hasKeyword", "keyword": "$flagged", "isAscending": false},
        {"property": "receivedAt"}
    ]}))
    .await;
    assert_eq!(
        ids(&flagged_first),
        [reply.clone(), zed.clone(), amy.clone(), bea.clone(), root.clone()]
    );
    let thread_flagged_first = query(json!({"sort": [
        {"property": "someInThreadHaveKeyword", "keyword": "$flagged", "isAscending": false},
        {"property": "receivedAt"}
    ]}))
    .await;
    assert_eq!(
        ids(&thread_flagged_first),
        [root.clone(), reply.clone(), zed.clone(), amy.clone(), bea.clone()]
    );
    let all_flagged = query(json!({"sort": [
        {"property": "allInThreadHaveKeyword", "keyword": "$flagged", "isAscending": false},
        {"property": "receivedAt"}
    ]}))
    .await;
    assert_eq!(
        ids(&all_flagged),
        [zed.clone(), amy.clone(), bea.clone(), root.clone(), reply.clone()]
    );

    // collapseThreads through jmap-client: the newest of the thread stands for it.
    let mut request = client.build();
    let collapsed = request
        .query_email()
        .filter(Filter::in_mailbox(inbox.as_str()))
        .sort([Comparator::received_at().descending()])
        .calculate_total(true);
    collapsed.arguments().collapse_threads(true);
    let collapsed = request.send_query_email().await.unwrap();
    assert_eq!(collapsed.ids(), [reply.clone(), bea.clone(), amy.clone(), zed.clone()]);
    assert_eq!(collapsed.total(), Some(4));
    // A window of a collapsed query, and the same sorted here.
    let window = query(json!({"collapseThreads": true, "position": 1, "limit": 2})).await;
    assert_eq!(ids(&window), [bea.clone(), amy.clone()]);
    let sorted_here = query(json!({"collapseThreads": true, "calculateTotal": true, "sort": [
        {"property": "subject"}, {"property": "receivedAt"}
    ]}))
    .await;
    // The two "Same" emails are threads of their own; the reply is collapsed into its root.
    assert_eq!(ids(&sorted_here), [bea, root, zed, amy]);
    assert_eq!(sorted_here["total"], 4);
    // Changes of a query sorted here cannot be calculated; a keyword comparator needs a keyword.
    let answer = call(
        running.http,
        &mail_request(json!([
            ["Email/queryChanges", {"filter": {"inMailbox": inbox}, "collapseThreads": true, "sinceQueryState": "x"}, "a"],
            ["Email/query", {"sort": [{"property": "hasKeyword"}]}, "b"],
        ])),
    )
    .await;
    assert_eq!(method_response(&answer, 0)[1]["type"], "cannotCalculateChanges");
    assert_eq!(method_response(&answer, 1)[1]["type"], "invalidArguments");
}
