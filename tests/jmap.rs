//! JMAP core (RFC 8620) on a node started in this process with an accounts file: the session
//! resource behind HTTP Basic, batched method calls with result references, and the request
//! and method errors a client gets for bad requests. Spoken over a real socket.

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mailmesh::node::NodeConfig;

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
