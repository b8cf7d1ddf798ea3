//! LMTP on a real node process, over a real socket: per-recipient replies (an unknown account
//! refused with 550 5.1.1 beside a delivered one), `user+detail` to an existing mailbox and to a
//! missing one, an oversized message refused with 552 5.3.4 without the node holding it,
//! pipelining, a connection dropped mid-data, a unix socket, a store refusing writes (4xx per
//! recipient), and the delivered copies read back over HTTP with their trace headers on top of
//! the byte-exact message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailmesh::harness::{wait_until, LocalNode};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mailmesh"))
}

/// Made with `doveadm pw -s SHA512-CRYPT -p secret` (Dovecot 2.3.19).
const SECRET_HASH: &str = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.";
const TOKEN: &str = "operator-token-for-lmtp-tests-0123456789";
/// The node's `max_message_bytes` in these tests.
const MAX_MESSAGE_BYTES: u64 = 1024 * 1024;

/// A node with two accounts, an operator token, a 1 MiB message limit and LMTP on `lmtp`.
fn start_node(directory: &Path, lmtp: &str) -> LocalNode {
    start_node_with(directory, lmtp, "")
}

/// The same, with more configuration keys.
fn start_node_with(directory: &Path, lmtp: &str, configuration: &str) -> LocalNode {
    let accounts_file = directory.join("accounts");
    std::fs::write(
        &accounts_file,
        format!("alice@example.org:{SECRET_HASH}\nbob@example.org:{SECRET_HASH}\n"),
    )
    .unwrap();
    let token_file = directory.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config_file = directory.join("node.toml");
    std::fs::write(
        &config_file,
        format!("max_message_bytes = {MAX_MESSAGE_BYTES}\n{configuration}"),
    )
    .unwrap();
    let mut node = LocalNode::spawn(
        binary(),
        "lmtp-node",
        &directory.join("data"),
        "lmtp-test",
        &[],
        200,
        &[
            "--config".into(),
            config_file.display().to_string(),
            "--accounts-file".into(),
            accounts_file.display().to_string(),
            "--http-token-file".into(),
            token_file.display().to_string(),
            "--lmtp".into(),
            lmtp.into(),
        ],
    )
    .expect("the node starts");
    node.token = Some(TOKEN.into());
    node
}

/// Where the node's LMTP server listens, from `lmtp.addr` in its data dir.
fn lmtp_address(node: &LocalNode) -> String {
    std::fs::read_to_string(node.data_dir.join("lmtp.addr"))
        .expect("the node wrote lmtp.addr")
        .trim()
        .to_owned()
}

/// A minimal LMTP client over any byte stream.
struct Client<S: Read + Write> {
    reader: BufReader<S>,
}

impl Client<TcpStream> {
    fn connect(address: &str) -> Client<TcpStream> {
        let stream = TcpStream::connect(address).expect("the LMTP port accepts");
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Client::over(stream)
    }
}

impl<S: Read + Write> Client<S> {
    fn over(stream: S) -> Client<S> {
        let mut client = Client {
            reader: BufReader::new(stream),
        };
        let greeting = client.reply();
        assert!(greeting[0].starts_with("220 "), "{greeting:?}");
        client
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// One whole reply (every line of a multi-line one).
    fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let count = self.reader.read_line(&mut line).expect("a reply");
            assert!(count > 0, "the server closed the connection after {lines:?}");
            assert!(line.ends_with("\r\n"), "a reply line without CRLF: {line:?}");
            let line = line.trim_end().to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines;
            }
        }
    }

    /// Sends one command and returns its (last) reply line.
    fn command(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply().pop().unwrap()
    }
}

/// A message with a dot-stuffed line, a long line and 8-bit text, as an MTA would send it.
fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: Bob <bob@example.net>\r\nTo: alice@example.org\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.net>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nBonjour, ça va ?\r\n.a line that began with a dot\r\n{}\r\n\r\n",
        "x".repeat(1500)
    )
    .into_bytes()
}

/// The message as it goes on the wire after DATA: dot-stuffed, with the terminating dot.
fn stuffed(message: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    for line in message.split_inclusive(|&byte| byte == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    wire
}

/// Every message of a mailbox as (id, raw bytes).
fn raw_messages(node: &LocalNode, account: &str, mailbox: &str) -> Vec<(String, Vec<u8>)> {
    node.messages(account, mailbox)
        .unwrap()
        .into_iter()
        .map(|(id, _)| {
            let response = node
                .get(&format!(
                    "{}/messages/{id}/raw",
                    LocalNode::mailbox_path(account, mailbox)
                ))
                .unwrap();
            assert_eq!(response.status, 200);
            (id, response.body)
        })
        .collect()
}

/// Splits a delivered copy into its first three header lines (folded lines joined) and the rest.
fn trace_and_rest(raw: &[u8]) -> (Vec<String>, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let mut fields: Vec<String> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive("\r\n") {
        if fields.len() == 3 && !line.starts_with('\t') {
            break;
        }
        if line.starts_with('\t') {
            fields.last_mut().unwrap().push_str(line.trim_end());
        } else {
            fields.push(line.trim_end().to_owned());
        }
        offset += line.len();
    }
    (fields, raw[offset..].to_vec())
}

/// The node's peak resident memory (VmHWM) in bytes.
fn peak_memory(node: &LocalNode) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid().unwrap())).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    let kilobytes: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kilobytes * 1024
}

#[test]
fn lmtp_delivers_per_recipient_and_refuses_what_it_must() {
    let directory = tempfile::tempdir().unwrap();
    let node = start_node(directory.path(), "127.0.0.1:0");
    let address = lmtp_address(&node);
    // alice has a mailbox "lists" (made by an HTTP append), so alice+lists@ goes there.
    node.append(
        "alice@example.org",
        "lists",
        b"Subject: first\r\n\r\nmade over HTTP\r\n",
    )
    .unwrap();

    // Two recipients, one unknown: 250 and 550 5.1.1 at RCPT, one 250 after the data.
    let mut client = Client::connect(&address);
    client.send(b"LHLO mta.example.org\r\n");
    let capabilities = client.reply();
    for extension in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING"] {
        assert!(
            capabilities.iter().any(|line| line[4..] == *extension),
            "{extension} missing from {capabilities:?}"
        );
    }
    let size = capabilities
        .iter()
        .find_map(|line| line[4..].strip_prefix("SIZE "))
        .expect("SIZE is advertised");
    assert!(size.parse::<u64>().unwrap() <= MAX_MESSAGE_BYTES);
    assert!(client
        .command("MAIL FROM:<bob@example.net> BODY=8BITMIME")
        .starts_with("250 2.1.0"));
    assert!(client.command("RCPT TO:<alice@example.org>").starts_with("250 2.1.5"));
    let unknown = client.command("RCPT TO:<nobody@example.org>");
    assert!(unknown.starts_with("550 5.1.1"), "{unknown}");
    assert!(client.command("DATA").starts_with("354"));
    let first = message("two-recipients");
    client.send(&stuffed(&first));
    let delivered = client.reply();
    assert_eq!(delivered, ["250 2.0.0 <alice@example.org> Delivered"]);

    // user+detail: to the existing mailbox "lists", and to a missing one (INBOX).
    assert!(client.command("MAIL FROM:<>").starts_with("250"));
    assert!(client.command("RCPT TO:<alice+lists@example.org>").starts_with("250"));
    assert!(client
        .command("RCPT TO:<Alice+nosuchbox@example.org>")
        .starts_with("250"));
    assert!(client.command("DATA").starts_with("354"));
    let second = message("detail");
    client.send(&stuffed(&second));
    assert!(client.reply()[0].starts_with("250 2.0.0 <alice+lists@example.org>"));
    assert!(client.reply()[0].starts_with("250 2.0.0 <Alice+nosuchbox@example.org>"));

    // An oversized message: refused after the data with 552 5.3.4, and the node never held it.
    // It is streamed at 64 times the limit while the node's peak memory is watched.
    let peak_before = peak_memory(&node);
    assert!(client.command("MAIL FROM:<bob@example.net>").starts_with("250"));
    assert!(client.command("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(client.command("DATA").starts_with("354"));
    let line = format!("{}\r\n", "y".repeat(998));
    let block = line.repeat(1024); // 1 MiB
    for _ in 0..64 {
        client.send(block.as_bytes());
    }
    client.send(b".\r\n");
    let refused = client.reply();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].starts_with("552 5.3.4 <bob@example.org>"), "{refused:?}");
    let growth = peak_memory(&node).saturating_sub(peak_before);
    eprintln!("peak memory before the 64 MiB message: {peak_before} bytes; grew by {growth} bytes");
    assert!(
        growth < 32 * 1024 * 1024,
        "the node's peak memory grew by {growth} bytes while a 64 MiB message was refused"
    );
    // The session is still usable, and a declared SIZE over the limit is refused at MAIL.
    let declared = client.command(&format!("MAIL FROM:<bob@example.net> SIZE={}", 2 * MAX_MESSAGE_BYTES));
    assert!(declared.starts_with("552 5.3.4"), "{declared}");
    assert!(client.command("NOOP").starts_with("250"));
    assert!(client.command("QUIT").starts_with("221"));

    // Pipelining: a whole transaction in one write; replies in order.
    let mut client = Client::connect(&address);
    let third = message("pipelined");
    let mut batch = b"LHLO mta.example.org\r\nMAIL FROM:<carol@example.net>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<ghost@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n".to_vec();
    batch.extend_from_slice(&stuffed(&third));
    batch.extend_from_slice(b"QUIT\r\n");
    client.send(&batch);
    let mut codes = Vec::new();
    for _ in 0..9 {
        let reply = client.reply();
        codes.push(reply.last().unwrap()[..9].to_owned());
    }
    assert_eq!(
        codes,
        [
            "250 CHUNK",
            "250 2.1.0",
            "250 2.1.5",
            "550 5.1.1",
            "250 2.1.5",
            "354 2.0.0",
            "250 2.0.0",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );

    // A connection dropped in the middle of the data stores nothing.
    let mut client = Client::connect(&address);
    client.command("LHLO mta.example.org");
    client.command("MAIL FROM:<bob@example.net>");
    client.command("RCPT TO:<bob@example.org>");
    client.command("DATA");
    client.send(b"Subject: cut off\r\n\r\nhalf a mess");
    drop(client);

    // What was stored, read back over HTTP: the trace headers, then the message byte for byte.
    let inbox = raw_messages(&node, "alice@example.org", "INBOX");
    assert_eq!(inbox.len(), 3, "two-recipients, detail to a missing mailbox, pipelined");
    let lists = raw_messages(&node, "alice@example.org", "lists");
    assert_eq!(lists.len(), 2, "the HTTP append and the +lists delivery");
    let bob = raw_messages(&node, "bob@example.org", "INBOX");
    assert_eq!(
        bob.len(),
        1,
        "only the pipelined message: neither the oversized nor the cut-off one"
    );
    let all: Vec<&Vec<u8>> = inbox.iter().chain(&lists).chain(&bob).map(|(_, raw)| raw).collect();
    let mut checked = 0;
    for raw in all {
        if raw.starts_with(b"Subject: first") {
            continue;
        }
        let (trace, rest) = trace_and_rest(raw);
        assert!(trace[0].starts_with("Return-Path: <"), "{trace:?}");
        assert!(trace[1].starts_with("Delivered-To: "), "{trace:?}");
        assert!(
            trace[2].starts_with("Received: from mta.example.org ([127.0.0.1])"),
            "{trace:?}"
        );
        assert!(trace[2].contains("by lmtp-node (mailmesh) with LMTP"), "{trace:?}");
        let recipient = trace[1].strip_prefix("Delivered-To: ").unwrap();
        assert!(trace[2].contains(&format!("for <{recipient}>;")), "{trace:?}");
        assert!(
            [&first, &second, &third].iter().any(|message| rest == **message),
            "the message after the trace headers is not byte-exact: {:?}",
            String::from_utf8_lossy(&rest)
        );
        checked += 1;
    }
    assert_eq!(checked, 5);
    let detail_copy = &lists
        .iter()
        .find(|(_, raw)| !raw.starts_with(b"Subject: first"))
        .unwrap()
        .1;
    assert!(trace_and_rest(detail_copy).0[0] == "Return-Path: <>");
    assert!(trace_and_rest(detail_copy).0[1] == "Delivered-To: alice+lists@example.org");

    // The counters: 5 copies stored; 2 unknown recipients and the oversized one refused.
    let accepted = node
        .metric_sum("mailmesh_lmtp_deliveries_total{outcome=\"accepted\"}")
        .unwrap();
    let refused = node
        .metric_sum("mailmesh_lmtp_deliveries_total{outcome=\"refused\"}")
        .unwrap();
    assert_eq!((accepted, refused), (5.0, 3.0));
}

#[test]
fn lmtp_listens_on_a_unix_socket() {
    let directory = tempfile::tempdir().unwrap();
    let socket: PathBuf = directory.path().join("lmtp.sock");
    let node = start_node(directory.path(), &format!("unix:{}", socket.display()));
    assert_eq!(lmtp_address(&node), socket.display().to_string());
    // Writable by all, so that an MTA's delivery agent running as its own user (Postfix's lmtp
    // runs as `postfix`) can connect; the directory decides who reaches it.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o666);
    let stream = UnixStream::connect(&socket).expect("the socket accepts");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut client = Client::over(stream);
    client.command("LHLO postfix.example.org");
    client.command("MAIL FROM:<bob@example.net>");
    assert!(client.command("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(client.command("DATA").starts_with("354"));
    // Bare LF line ends, as a local client may write them, are taken as line ends.
    client.send(b"Subject: over a socket\n\nhello\n.\n");
    assert_eq!(client.reply(), ["250 2.0.0 <bob@example.org> Delivered"]);
    assert!(client.command("QUIT").starts_with("221"));
    let stored = raw_messages(&node, "bob@example.org", "INBOX");
    assert_eq!(stored.len(), 1);
    let text = String::from_utf8(stored[0].1.clone()).unwrap();
    assert!(text.starts_with("Return-Path: <bob@example.net>\nDelivered-To: bob@example.org\nReceived: from postfix.example.org (local)\n"), "{text}");
    assert!(text.ends_with("\nSubject: over a socket\n\nhello\n"), "{text}");
    // A clean stop removes the socket file.
    let mut node = node;
    node.terminate();
    assert!(wait_until(Duration::from_secs(10), || !socket.exists()).is_some());
}

#[test]
fn a_store_that_refuses_writes_answers_4xx_so_the_mta_retries() {
    let directory = tempfile::tempdir().unwrap();
    // A free-space reserve no disk has: the store refuses every write as it would on a full disk.
    let node = start_node_with(
        directory.path(),
        "127.0.0.1:0",
        "min_free_bytes = 1000000000000000000\n",
    );
    let mut client = Client::connect(&lmtp_address(&node));
    client.command("LHLO mta.example.org");
    client.command("MAIL FROM:<bob@example.net>");
    assert!(client.command("RCPT TO:<alice@example.org>").starts_with("250"));
    assert!(client.command("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(client.command("DATA").starts_with("354"));
    client.send(&stuffed(&message("full-disk")));
    for recipient in ["alice@example.org", "bob@example.org"] {
        let reply = client.reply();
        assert!(
            reply[0].starts_with(&format!("452 4.3.1 <{recipient}>")),
            "a temporary refusal for {recipient}, not {reply:?}"
        );
    }
    assert!(client.command("QUIT").starts_with("221"));
    assert!(raw_messages(&node, "alice@example.org", "INBOX").is_empty());
    let deferred = node
        .metric_sum("mailmesh_lmtp_deliveries_total{outcome=\"deferred\"}")
        .unwrap();
    assert_eq!(deferred, 2.0);
}
