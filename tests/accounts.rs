//! Accounts on a real node process: HTTP Basic against the accounts file on an account's own
//! routes (401, 403, 200), the operator's bearer token everywhere, a reload of the file while
//! the node runs, throttled failures (429), and `mailmesh passwd` making a line that logs in.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mailmesh::harness::{sample_message, wait_until, LocalNode};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mailmesh"))
}

/// Made with `doveadm pw -s SHA512-CRYPT -p secret` (Dovecot 2.3.19).
const BOB_HASH: &str = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.";
const TOKEN: &str = "operator-token-for-tests-0123456789";

/// `mailmesh passwd [--user NAME]` with `password` on stdin.
fn passwd(password: &str, user: Option<&str>) -> String {
    let mut command = Command::new(binary());
    command.arg("passwd");
    if let Some(user) = user {
        command.args(["--user", user]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim_end().to_owned()
}

/// One response: status, headers (names lowercased) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

#[derive(Clone, Copy)]
enum Credentials<'a> {
    None,
    Basic(&'a str, &'a str),
    Bearer(&'a str),
}

/// Sends one HTTP/1.1 request with the given credentials and reads the whole answer (the
/// harness's client sends bearer tokens only and keeps no headers).
fn request(node: &LocalNode, method: &str, path: &str, credentials: Credentials<'_>, body: &[u8]) -> Answer {
    use base64::Engine;
    let mut stream = TcpStream::connect(&node.http).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        node.http,
        body.len()
    );
    match credentials {
        Credentials::None => {}
        Credentials::Basic(login, password) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
            head.push_str(&format!("Authorization: Basic {encoded}\r\n"));
        }
        Credentials::Bearer(token) => head.push_str(&format!("Authorization: Bearer {token}\r\n")),
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn get(node: &LocalNode, path: &str, credentials: Credentials<'_>) -> Answer {
    request(node, "GET", path, credentials, b"")
}

/// The status of a GET with HTTP Basic.
fn get_as(node: &LocalNode, path: &str, login: &str, password: &str) -> u16 {
    get(node, path, Credentials::Basic(login, password)).status
}

fn write_accounts(path: &Path, text: &str) {
    // As an editor or `mv` replaces it: a new file renamed over the old one.
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[test]
fn accounts_log_in_with_basic_to_their_own_mailboxes_only() {
    let directory = tempfile::tempdir().unwrap();
    let accounts_file = directory.path().join("accounts");
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    // `mailmesh passwd` makes the lines, as `doveadm pw -s ARGON2ID` would.
    let bare = passwd("alice password", None);
    assert!(bare.starts_with("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"), "{bare}");
    let alice_line = passwd("alice password", Some("alice@example.org"));
    assert!(
        alice_line.starts_with("alice@example.org:{ARGON2ID}$argon2id$"),
        "{alice_line}"
    );
    write_accounts(
        &accounts_file,
        &format!("# the accounts of example.org\n{alice_line}\n\nbob@example.org:{BOB_HASH}::::::\n"),
    );

    let node = LocalNode::spawn(
        binary(),
        "accounts",
        &directory.path().join("node"),
        "test-accounts",
        &[],
        200,
        &[
            "--accounts-file".into(),
            accounts_file.display().to_string(),
            "--http-token-file".into(),
            token_file.display().to_string(),
        ],
    )
    .unwrap();
    let alice = Credentials::Basic("alice@example.org", "alice password");
    let alice_inbox = "/v1/mailboxes/alice@example.org/INBOX/messages";
    let bob_inbox = "/v1/mailboxes/bob@example.org/INBOX/messages";

    // Health checks stay open; everything else asks for credentials.
    assert_eq!(get(&node, "/healthz", Credentials::None).status, 200);
    let missing = get(&node, alice_inbox, Credentials::None);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert!(
        missing.header("www-authenticate").contains(&"Basic realm=\"mailmesh\""),
        "{:?}",
        missing.headers
    );

    // Alice reaches her own mailboxes, and only hers.
    let message = sample_message("carol@example.org", "for alice", "hello");
    let appended = request(&node, "POST", alice_inbox, alice, &message);
    assert_eq!(appended.status, 201, "{}", appended.body);
    let listed = get(&node, alice_inbox, alice);
    assert_eq!(listed.status, 200, "{}", listed.body);
    let listing: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
    assert_eq!(listing["total"], 1, "{listing}");
    assert_eq!(listing["items"][0]["subject"], "for alice");
    let foreign = get(&node, bob_inbox, alice);
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let operator_route = get(&node, "/v1/mailboxes", alice);
    assert_eq!(operator_route.status, 403, "{}", operator_route.body);

    // The operator's token writes into any account (here bob's, so that his inbox exists).
    let for_bob = sample_message("carol@example.org", "for bob", "hello");
    assert_eq!(
        request(&node, "POST", bob_inbox, Credentials::Bearer(TOKEN), &for_bob).status,
        201
    );
    // Bob's hash came from doveadm; a wrong password and an unknown account look the same.
    assert_eq!(get_as(&node, bob_inbox, "bob@example.org", "secret"), 200);
    let wrong = get(&node, bob_inbox, Credentials::Basic("bob@example.org", "Secret"));
    let unknown = get(
        &node,
        "/v1/mailboxes/nobody@example.org/INBOX/messages",
        Credentials::Basic("nobody@example.org", "Secret"),
    );
    assert_eq!((wrong.status, unknown.status), (401, 401));
    assert_eq!(wrong.body, unknown.body);
    assert_eq!(wrong.header("www-authenticate"), unknown.header("www-authenticate"));

    // The operator's token reaches everything; Basic does not replace it.
    let by_operator = get(&node, alice_inbox, Credentials::Bearer(TOKEN));
    assert_eq!(by_operator.status, 200, "{}", by_operator.body);
    assert_eq!(get(&node, "/v1/status", Credentials::Bearer(TOKEN)).status, 200);
    let no_token = get(&node, "/v1/status", Credentials::None);
    assert_eq!(no_token.status, 401);
    assert_eq!(no_token.header("www-authenticate"), vec!["Bearer"]);
    assert_eq!(
        get(&node, alice_inbox, Credentials::Bearer("wrong-token-wrong-token")).status,
        401
    );

    // The file changes while the node runs: carol arrives and alice's password changes.
    let carol_line = passwd("carol password", Some("carol@example.org"));
    let new_alice = passwd("new alice password", Some("alice@example.org"));
    write_accounts(
        &accounts_file,
        &format!("{new_alice}\nbob@example.org:{BOB_HASH}\n{carol_line}\n"),
    );
    // The node looks at the file at most once a second: a few tries, far apart, so the failed
    // ones do not spend the address's allowance.
    let carol_inbox = "/v1/mailboxes/carol@example.org/INBOX/messages";
    let mut carol = 0;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(700));
        carol = request(
            &node,
            "POST",
            carol_inbox,
            Credentials::Basic("carol@example.org", "carol password"),
            &sample_message("dave@example.org", "for carol", "hi"),
        )
        .status;
        if carol == 201 {
            break;
        }
    }
    assert_eq!(carol, 201, "the reloaded file's new account could not log in");
    assert_eq!(
        get_as(&node, alice_inbox, "alice@example.org", "alice password"),
        401,
        "the old password outlived the reload"
    );
    assert_eq!(
        get_as(&node, alice_inbox, "alice@example.org", "new alice password"),
        200
    );
    // A broken version is refused and the last good table kept.
    write_accounts(&accounts_file, "carol@example.org {ARGON2ID}$argon2id$broken\n");
    // Not a sleep: the node looks at the file when a login comes (at most once a second), so
    // log in as bob until the node has said it keeps the accounts it read before.
    let log_path = node.data_dir.join("node.log");
    let refused = wait_until(Duration::from_secs(30), || {
        assert_eq!(get_as(&node, bob_inbox, "bob@example.org", "secret"), 200);
        std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("keeping the accounts read before"))
    });
    assert!(
        refused.is_some(),
        "the broken file was never reported: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert_eq!(get_as(&node, bob_inbox, "bob@example.org", "secret"), 200);

    // Repeated failures on one account are throttled: 429 with Retry-After.
    let mut throttled = None;
    for _ in 0..20 {
        let answer = get(&node, bob_inbox, Credentials::Basic("bob@example.org", "guess"));
        if answer.status == 429 {
            throttled = Some(answer);
            break;
        }
        assert_eq!(answer.status, 401);
    }
    let throttled = throttled.expect("20 failed logins were never throttled");
    let retry_after: u64 = throttled.header("retry-after")[0].parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    // Bob's own client, logged in minutes ago, is not locked out by the attack.
    assert_eq!(get_as(&node, bob_inbox, "bob@example.org", "secret"), 200);

    // Counted in the metrics, and no password or hash in the log.
    let metrics = get(&node, "/metrics", Credentials::Bearer(TOKEN)).body;
    let sum = |name: &str| mailmesh::api_client::metric_sum(&metrics, name);
    assert!(sum("mailmesh_login_failures_total") >= 12.0, "{metrics}");
    assert!(sum("mailmesh_login_throttled_total") >= 1.0, "{metrics}");
    assert!(sum("mailmesh_accounts_reloads_total") >= 2.0, "{metrics}");
    let log = std::fs::read_to_string(node.data_dir.join("node.log")).unwrap();
    assert!(log.contains("login failed"), "{log}");
    for secret in ["alice password", "guess", "BaSpHPEbL9a6Kr7", "$argon2id$", "$6$"] {
        assert!(!log.contains(secret), "{secret:?} reached the log:\n{log}");
    }
}

#[test]
fn a_malformed_accounts_file_stops_the_node_at_start_naming_the_line() {
    let directory = tempfile::tempdir().unwrap();
    let accounts_file = directory.path().join("accounts");
    std::fs::write(
        &accounts_file,
        format!("# ok\nbob@example.org:{BOB_HASH}\nalice@example.org {BOB_HASH}\n"),
    )
    .unwrap();
    let output = Command::new(binary())
        .args(["node", "--data-dir"])
        .arg(directory.path().join("node"))
        .args([
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--accounts-file",
        ])
        .arg(&accounts_file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(!stderr.contains("BaSpHPEbL9a6Kr7"), "the hash was echoed: {stderr}");
}
