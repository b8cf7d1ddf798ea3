//! IMAP on a node started in this process, over real sockets: logins (LOGIN, AUTHENTICATE PLAIN
//! with SASL-IR, refusals), LIST/STATUS/SELECT, APPEND with flags and date, FETCH of every item
//! with sections and partials, STORE, SEARCH, EXPUNGE, IDLE seeing another session's append and
//! expunge, UIDs that survive a restart (and a new UIDVALIDITY when the map is lost), STARTTLS and
//! IMAPS with a certificate made here, LOGINDISABLED in the clear from a non-loopback address,
//! CONDSTORE/QRESYNC (MODSEQ, CHANGEDSINCE, UNCHANGEDSINCE, VANISHED), kept subscriptions (LSUB),
//! ESEARCH and ENABLE IMAP4rev2.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mailmesh::node::NodeConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Made with `doveadm pw -s SHA512-CRYPT -p secret` (Dovecot 2.3.19).
const SECRET_HASH: &str = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.";

const MESSAGE: &str = "From: Carol <carol@example.net>\r\nTo: alice@example.org\r\nSubject: Lunch\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <lunch@example.net>\r\n\r\nShall we meet at noon?\r\n";

struct Node {
    service: mailmesh::service::MailService,
    imap: SocketAddr,
    imaps: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    closed: mailmesh::server::StoreClosed,
}

impl Node {
    /// Stops the node and waits until its store has closed: a test that ends with RocksDB still
    /// open can abort the test process at exit, and a restart needs the store's lock.
    async fn close(self) {
        let _ = self.stop.send(true);
        let closed = self.closed.clone();
        drop(self);
        assert!(closed.wait(Duration::from_secs(30)).await, "the store never closed");
    }
}

fn config(directory: &Path, extra: impl FnOnce(&mut NodeConfig)) -> NodeConfig {
    let accounts_file = directory.join("accounts");
    std::fs::write(
        &accounts_file,
        format!("alice@example.org:{SECRET_HASH}\nbob@example.org:{SECRET_HASH}\n"),
    )
    .unwrap();
    let mut config = NodeConfig {
        name: "imap".into(),
        data_dir: directory.join("node"),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        http: "127.0.0.1:0".parse().unwrap(),
        cluster: "imap-test".into(),
        accounts_file: Some(accounts_file),
        imap_listen: Some("127.0.0.1:0".parse().unwrap()),
        max_message_bytes: 64 * 1024,
        ..NodeConfig::default()
    };
    extra(&mut config);
    config
}

async fn start(config: NodeConfig) -> Node {
    start_on(config, mailmesh::environment::system()).await
}

async fn start_on(config: NodeConfig, environment: Arc<dyn mailmesh::environment::Environment>) -> Node {
    let data_dir = config.data_dir.clone();
    let (stop, receiver) = watch::channel(false);
    let running = mailmesh::server::start(config, environment, receiver)
        .await
        .expect("the node starts");
    node_of(running, stop, &data_dir)
}

/// The wall clock moved ahead by what the test says: the node's time can jump past a horizon.
#[derive(Default)]
struct AheadClock {
    ahead_millis: std::sync::atomic::AtomicU64,
}

impl mailmesh::environment::Environment for AheadClock {
    fn now_millis(&self) -> u64 {
        mailmesh::environment::now_millis() + self.ahead_millis.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn random(&self) -> u128 {
        rand::random()
    }
}

/// Starts a node again on a data dir whose previous node was just stopped: its background tasks
/// let go of the store a moment later, so the start is retried until the store opens (not a
/// sleep: it goes on as soon as the condition holds).
async fn start_again(directory: &Path) -> Node {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let config = config(directory, |_| {});
        let data_dir = config.data_dir.clone();
        let (stop, receiver) = watch::channel(false);
        match mailmesh::server::start(config, mailmesh::environment::system(), receiver).await {
            Ok(running) => return node_of(running, stop, &data_dir),
            Err(error) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the node never started again: {error}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn node_of(running: mailmesh::server::Running, stop: watch::Sender<bool>, data_dir: &Path) -> Node {
    let read = |name: &str| {
        std::fs::read_to_string(data_dir.join(name))
            .ok()
            .map(|text| text.trim().parse().unwrap())
    };
    Node {
        service: running.service,
        imap: read("imap.addr").expect("imap.addr written"),
        imaps: read("imaps.addr"),
        stop,
        closed: running.closed,
    }
}

/// A minimal IMAP client: sends tagged commands and collects the responses, literals inlined.
struct Client<S> {
    stream: BufReader<S>,
    next_tag: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn over(stream: S) -> (Client<S>, String) {
        let mut client = Client {
            stream: BufReader::new(stream),
            next_tag: 0,
        };
        let greeting = client.line().await;
        (client, greeting)
    }

    /// One response line, with any literals it announces read into it.
    async fn line(&mut self) -> String {
        let mut whole = Vec::new();
        loop {
            let mut line = Vec::new();
            let count = tokio::time::timeout(Duration::from_secs(30), self.stream.read_until(b'\n', &mut line))
                .await
                .expect("the server answers within 30 s")
                .unwrap();
            assert!(
                count > 0,
                "the server closed the connection after {:?}",
                String::from_utf8_lossy(&whole)
            );
            whole.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line).into_owned();
            let trimmed = text.trim_end();
            if let Some(open) = trimmed.rfind('{').filter(|_| trimmed.ends_with('}')) {
                if let Ok(length) = trimmed[open + 1..trimmed.len() - 1].parse::<usize>() {
                    let mut literal = vec![0u8; length];
                    self.stream.read_exact(&mut literal).await.unwrap();
                    whole.extend_from_slice(&literal);
                    continue;
                }
            }
            return String::from_utf8_lossy(&whole).trim_end().to_owned();
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
    }

    /// Runs a command; returns the untagged lines and the tagged one.
    async fn command(&mut self, text: &str) -> (Vec<String>, String) {
        self.next_tag += 1;
        let tag = format!("t{}", self.next_tag);
        self.send(format!("{tag} {text}\r\n").as_bytes()).await;
        self.until_tagged(&tag).await
    }

    async fn until_tagged(&mut self, tag: &str) -> (Vec<String>, String) {
        let mut untagged = Vec::new();
        loop {
            let line = self.line().await;
            if line.starts_with(&format!("{tag} ")) {
                return (untagged, line);
            }
            untagged.push(line);
        }
    }

    /// A command that must succeed.
    async fn ok(&mut self, text: &str) -> Vec<String> {
        let (untagged, tagged) = self.command(text).await;
        assert!(
            tagged.split(' ').nth(1) == Some("OK"),
            "{text} -> {untagged:?} {tagged}"
        );
        untagged
    }

    async fn append(&mut self, mailbox: &str, flags: &str, message: &str) -> String {
        self.next_tag += 1;
        let tag = format!("t{}", self.next_tag);
        self.send(
            format!(
                "{tag} APPEND {mailbox} ({flags}) \"01-Dec-2026 10:00:00 +0000\" {{{}}}\r\n",
                message.len()
            )
            .as_bytes(),
        )
        .await;
        let continuation = self.line().await;
        assert!(continuation.starts_with('+'), "{continuation}");
        self.send(format!("{message}\r\n").as_bytes()).await;
        let (untagged, tagged) = self.until_tagged(&tag).await;
        assert!(tagged.contains(" OK "), "{untagged:?} {tagged}");
        tagged
    }
}

async fn connect(address: SocketAddr) -> (Client<TcpStream>, String) {
    Client::over(TcpStream::connect(address).await.unwrap()).await
}

async fn logged_in(address: SocketAddr, account: &str) -> Client<TcpStream> {
    let (mut client, _) = connect(address).await;
    client.ok(&format!("LOGIN {account} secret")).await;
    client
}

/// `[APPENDUID validity uid]` from a tagged answer.
fn append_uid(tagged: &str) -> (u32, u32) {
    let start = tagged.find("[APPENDUID ").expect("APPENDUID") + "[APPENDUID ".len();
    let mut numbers = tagged[start..]
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .split([' ', ']']);
    (
        numbers.next().unwrap().parse().unwrap(),
        numbers.next().unwrap().parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_logs_in_files_reads_searches_and_expunges() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;

    let (mut client, greeting) = connect(node.imap).await;
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4rev1"), "{greeting}");
    assert!(
        greeting.contains("AUTH=PLAIN") && !greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert!(!greeting.contains("STARTTLS"), "no TLS configured: {greeting}");
    let (_, refused) = client.command("LOGIN alice@example.org wrong").await;
    assert!(refused.starts_with("t1 NO [AUTHENTICATIONFAILED]"), "{refused}");
    let (_, early) = client.command("SELECT INBOX").await;
    assert!(early.starts_with("t2 BAD"), "{early}");
    // SASL-IR: "\0alice@example.org\0secret".
    let plain = "AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==";
    let (_, tagged) = client.command(&format!("AUTHENTICATE PLAIN {plain}")).await;
    assert!(tagged.starts_with("t3 OK"), "{tagged}");

    let list = client.ok("LIST \"\" \"*\"").await;
    assert_eq!(list, vec!["* LIST (\\HasNoChildren) \"/\" \"INBOX\""]);
    let selected = client.ok("SELECT INBOX").await;
    assert!(selected.contains(&"* 0 EXISTS".to_owned()), "{selected:?}");
    let validity: u32 = selected
        .iter()
        .find_map(|line| line.strip_prefix("* OK [UIDVALIDITY "))
        .and_then(|rest| rest.split(']').next())
        .unwrap()
        .parse()
        .unwrap();

    let first = client.append("INBOX", "\\Seen", MESSAGE).await;
    assert_eq!(append_uid(&first), (validity, 1));
    let second = client.append("INBOX", "", &MESSAGE.replace("Lunch", "Dinner")).await;
    assert_eq!(append_uid(&second), (validity, 2));
    let noop = client.ok("NOOP").await;
    assert!(noop.contains(&"* 2 EXISTS".to_owned()) || noop.is_empty(), "{noop:?}");

    let fetched = client
        .ok("FETCH 1 (UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT]<0.5>)")
        .await;
    let line = &fetched[0];
    assert!(
        line.starts_with("* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE \"01-Dec-2026 10:00:00 +0000\""),
        "{line}"
    );
    assert!(line.contains(&format!("RFC822.SIZE {}", MESSAGE.len())), "{line}");
    assert!(
        line.contains(
            "ENVELOPE (\"Tue, 1 Dec 2026 12:00:00 +0000\" \"Lunch\" ((\"Carol\" NIL \"carol\" \"example.net\"))"
        ),
        "{line}"
    );
    assert!(
        line.contains("BODYSTRUCTURE (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 24 1"),
        "{line}"
    );
    assert!(
        line.contains("BODY[HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: Lunch\r\n\r\n"),
        "{line}"
    );
    assert!(line.contains("BODY[TEXT]<0> {5}\r\nShall"), "{line}");

    // BODY[] without PEEK sets \Seen and says so.
    let fetched = client.ok("UID FETCH 2 (BODY[])").await;
    assert!(fetched[0].starts_with("* 2 FETCH (UID 2 BODY[] {"), "{fetched:?}");
    assert!(fetched[0].contains("FLAGS (\\Seen)"), "{fetched:?}");

    let stored = client.ok("STORE 1 +FLAGS (\\Flagged $label)").await;
    assert!(
        stored.iter().any(|line| line.starts_with("* 1 FETCH (FLAGS (")
            && line.contains("\\Flagged")
            && line.contains("$label")),
        "{stored:?}"
    );
    let search = client.ok("SEARCH FLAGGED").await;
    assert!(search.contains(&"* SEARCH 1".to_owned()), "{search:?}");
    let search = client.ok("UID SEARCH SUBJECT dinner").await;
    assert!(search.contains(&"* SEARCH 2".to_owned()), "{search:?}");
    let search = client.ok("SEARCH OR KEYWORD $label LARGER 100000").await;
    assert!(search.contains(&"* SEARCH 1".to_owned()), "{search:?}");
    let search = client.ok("UID SEARCH UID 2:* NOT SEEN").await;
    assert!(search.contains(&"* SEARCH".to_owned()), "{search:?}");

    let sorted = client.ok("UID SORT (REVERSE ARRIVAL) UTF-8 ALL").await;
    assert!(sorted.contains(&"* SORT 2 1".to_owned()), "{sorted:?}");
    let sorted = client.ok("SORT (SUBJECT) UTF-8 ALL").await;
    assert!(
        sorted.contains(&"* SORT 2 1".to_owned()),
        "Dinner before Lunch: {sorted:?}"
    );
    let sorted = client.ok("SORT (ARRIVAL) UTF-8 FLAGGED").await;
    assert!(sorted.contains(&"* SORT 1".to_owned()), "{sorted:?}");

    let status = client.ok("STATUS INBOX (MESSAGES UNSEEN UIDNEXT UIDVALIDITY)").await;
    assert!(
        status.contains(&format!(
            "* STATUS \"INBOX\" (MESSAGES 2 UNSEEN 0 UIDNEXT 3 UIDVALIDITY {validity})"
        )),
        "{status:?}"
    );

    // IDLE sees what another session does.
    let mut other = logged_in(node.imap, "alice@example.org").await;
    other.ok("SELECT INBOX").await;
    client.send(b"idle1 IDLE\r\n").await;
    assert!(client.line().await.starts_with("+ "));
    other.append("INBOX", "", &MESSAGE.replace("Lunch", "Tea")).await;
    assert_eq!(client.line().await, "* 3 EXISTS");
    other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let flags = client.line().await;
    assert!(
        flags.starts_with("* 1 FETCH (UID 1 FLAGS (") && flags.contains("\\Deleted"),
        "{flags}"
    );
    let expunged = other.ok("EXPUNGE").await;
    assert!(expunged.contains(&"* 1 EXPUNGE".to_owned()), "{expunged:?}");
    assert_eq!(client.line().await, "* 1 EXPUNGE");
    client.send(b"DONE\r\n").await;
    let (_, done) = client.until_tagged("idle1").await;
    assert!(done.starts_with("idle1 OK"), "{done}");

    let fetched = client.ok("UID FETCH 1:* (FLAGS)").await;
    assert_eq!(fetched.len(), 2, "{fetched:?}");
    assert!(fetched[0].starts_with("* 1 FETCH (UID 2 FLAGS"), "{fetched:?}");
    assert!(fetched[1].starts_with("* 2 FETCH (UID 3 FLAGS"), "{fetched:?}");

    // A flag change and an expunge seen by one NOOP: both are told, numbered after the expunge.
    other.ok("UID STORE 3 +FLAGS (\\Flagged)").await;
    other.ok("UID STORE 2 +FLAGS (\\Deleted)").await;
    other.ok("UID EXPUNGE 2").await;
    let noop = client.ok("NOOP").await;
    assert_eq!(noop[0], "* 1 EXPUNGE", "{noop:?}");
    assert!(
        noop.iter()
            .any(|line| line.starts_with("* 1 FETCH (UID 3 FLAGS (") && line.contains("\\Flagged")),
        "{noop:?}"
    );
    assert!(!noop.iter().any(|line| line.ends_with("EXISTS")), "{noop:?}");

    // COPY keeps flags and answers COPYUID (here into the same mailbox, the only one there is).
    let (copied_lines, copied) = client.command("UID COPY 3 INBOX").await;
    assert!(
        copied.contains(&format!("OK [COPYUID {validity} 3 4]")),
        "{copied_lines:?} {copied}"
    );
    assert!(copied_lines.contains(&"* 2 EXISTS".to_owned()), "{copied_lines:?}");
    let fetched = client.ok("UID FETCH 4 (FLAGS)").await;
    assert!(fetched[0].contains("\\Flagged"), "{fetched:?}");

    // A mailbox with a non-ASCII name (delivered to through the service, as LMTP would) is
    // named in modified UTF-7 on the wire, both ways.
    node.service
        .deliver(mailmesh::service::Delivery {
            account: "alice@example.org".into(),
            mailbox: mailmesh::service::MailboxTarget::PathOrCreate("Entwürfe".into()),
            raw: MESSAGE.as_bytes().to_vec(),
            flags: Vec::new(),
            received_millis: None,
            skip_duplicate: false,
        })
        .await
        .unwrap();
    let list = client.ok("LIST \"\" \"Entw*\"").await;
    assert_eq!(list, vec!["* LIST (\\HasNoChildren) \"/\" \"Entw&APw-rfe\""]);
    let status = client.ok("STATUS Entw&APw-rfe (MESSAGES)").await;
    assert_eq!(status, vec!["* STATUS \"Entw&APw-rfe\" (MESSAGES 1)"]);

    // A mailbox that does not exist is not created by APPEND: the client is told to CREATE it.
    client.ok("CREATE Archive").await;
    client.send(b"nowhere APPEND Nowhere {3+}\r\nabc\r\n").await;
    let (_, appended) = client.until_tagged("nowhere").await;
    assert!(appended.starts_with("nowhere NO [TRYCREATE]"), "{appended}");

    let (bye, tagged) = client.command("LOGOUT").await;
    assert!(bye[0].starts_with("* BYE"), "{bye:?}");
    assert!(tagged.contains(" OK "), "{tagged}");
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_survive_a_restart_and_a_lost_map_means_a_new_uidvalidity() {
    let directory = tempfile::tempdir().unwrap();
    let select = |lines: &[String]| -> u32 {
        lines
            .iter()
            .find_map(|line| line.strip_prefix("* OK [UIDVALIDITY "))
            .and_then(|rest| rest.split(']').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let node = start(config(directory.path(), |_| {})).await;
    let mut client = logged_in(node.imap, "bob@example.org").await;
    let validity = select(&client.ok("SELECT INBOX").await);
    for subject in ["one", "two", "three"] {
        client.append("INBOX", "", &MESSAGE.replace("Lunch", subject)).await;
    }
    client.ok("STORE 1 +FLAGS (\\Deleted)").await;
    client.ok("EXPUNGE").await;
    let before = client.ok("UID FETCH 1:* (UID ENVELOPE)").await;
    drop(client);
    node.close().await;

    let node = start_again(directory.path()).await;
    let mut client = logged_in(node.imap, "bob@example.org").await;
    assert_eq!(select(&client.ok("SELECT INBOX").await), validity);
    assert_eq!(client.ok("UID FETCH 1:* (UID ENVELOPE)").await, before);
    let appended = client.append("INBOX", "", &MESSAGE.replace("Lunch", "four")).await;
    assert_eq!(append_uid(&appended), (validity, 4), "UIDs are never reused");
    drop(client);
    node.close().await;
    // UIDVALIDITY is in seconds: make sure the next one is a later second (a time the value
    // depends on, not synchronisation).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::remove_dir_all(directory.path().join("node").join("uids")).unwrap();
    let node = start_again(directory.path()).await;
    let mut client = logged_in(node.imap, "bob@example.org").await;
    let renumbered = select(&client.ok("SELECT INBOX").await);
    assert!(renumbered > validity, "{renumbered} after {validity}");
    let fetched = client.ok("UID FETCH 1:* (UID)").await;
    assert_eq!(fetched.len(), 3, "{fetched:?}");
    node.close().await;
}

struct Certificate {
    certificate_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn certificate() -> Certificate {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Certificate {
        certificate_pem: certified.cert.pem(),
        key_pem: certified.key_pair.serialize_pem(),
        der: certified.cert.der().clone(),
    }
}

fn connector(trusted: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_imaps_with_the_configured_certificate() {
    let directory = tempfile::tempdir().unwrap();
    let certificate = certificate();
    let certificate_path = directory.path().join("cert.pem");
    let key_path = directory.path().join("key.pem");
    std::fs::write(&certificate_path, &certificate.certificate_pem).unwrap();
    std::fs::write(&key_path, &certificate.key_pem).unwrap();
    let node = start(config(directory.path(), |config| {
        config.tls_cert_file = Some(certificate_path.clone());
        config.tls_key_file = Some(key_path.clone());
        config.imaps_listen = Some("127.0.0.1:0".parse().unwrap());
    }))
    .await;
    let connector = connector(&certificate.der);

    let (mut client, greeting) = connect(node.imap).await;
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    client.ok("STARTTLS").await;
    let stream = client.stream.into_inner();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .expect("TLS after STARTTLS");
    let mut client = Client {
        stream: BufReader::new(tls),
        next_tag: 10,
    };
    let capabilities = client.ok("CAPABILITY").await;
    assert!(!capabilities[0].contains("STARTTLS"), "{capabilities:?}");
    client.ok("LOGIN alice@example.org secret").await;
    client.ok("SELECT INBOX").await;
    client.ok("LOGOUT").await;

    let stream = TcpStream::connect(node.imaps.expect("imaps.addr written"))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .expect("IMAPS handshake");
    let (mut client, greeting) = Client::over(tls).await;
    assert!(
        greeting.contains("AUTH=PLAIN") && !greeting.contains("STARTTLS"),
        "{greeting}"
    );
    client.ok("LOGIN bob@example.org secret").await;
    client.ok("LOGOUT").await;
    node.close().await;
}

/// This machine's address on its default route, when it has one.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let address = socket.local_addr().ok()?.ip();
    (!address.is_loopback() && !address.is_unspecified()).then_some(address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_disabled_in_the_clear_from_other_hosts() {
    let Some(address) = non_loopback_address() else {
        eprintln!("no non-loopback address on this machine: nothing to check");
        return;
    };
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |config| {
        config.imap_listen = Some(SocketAddr::new(address, 0));
    }))
    .await;
    let (mut client, greeting) = connect(node.imap).await;
    assert!(
        greeting.contains("LOGINDISABLED") && !greeting.contains("AUTH=PLAIN"),
        "{greeting}"
    );
    let (_, refused) = client.command("LOGIN alice@example.org secret").await;
    assert!(refused.starts_with("t1 NO [PRIVACYREQUIRED]"), "{refused}");
    let (_, refused) = client
        .command("AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==")
        .await;
    assert!(refused.starts_with("t2 NO"), "{refused}");
    node.close().await;

    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |config| {
        config.imap_listen = Some(SocketAddr::new(address, 0));
        config.imap_allow_plaintext = true;
    }))
    .await;
    let mut client = logged_in(node.imap, "alice@example.org").await;
    client.ok("LOGOUT").await;
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_literals_and_lines_are_refused() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let mut client = logged_in(node.imap, "alice@example.org").await;
    // Over max_message_bytes (64 KiB here): refused before the client sends it.
    client.send(b"big APPEND INBOX {100000}\r\n").await;
    let (_, refused) = client.until_tagged("big").await;
    assert!(refused.starts_with("big NO [TOOBIG]"), "{refused}");
    client.ok("NOOP").await;
    // A line with no end: BYE, and the connection closes.
    client.send(&vec![b'a'; 70 * 1024]).await;
    let bye = client.line().await;
    assert!(bye.starts_with("* BYE"), "{bye}");
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_are_created_renamed_and_deleted_and_move_keeps_the_email() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let mut client = logged_in(node.imap, "bob@example.org").await;
    client.ok("CREATE Work/").await;
    client.ok("CREATE Work/Projects").await;
    let (_, exists) = client.command("CREATE Work").await;
    assert!(exists.contains("NO [ALREADYEXISTS]"), "{exists}");
    let listed = client.ok("LIST \"\" \"*\"").await;
    assert!(
        listed.iter().any(|line| line.ends_with("\"Work/Projects\"")),
        "{listed:?}"
    );

    client.ok("SELECT INBOX").await;
    client.append("INBOX", "\\Seen", MESSAGE).await;
    let moved = client.ok("UID MOVE 1 Work/Projects").await;
    assert!(moved.iter().any(|line| line.starts_with("* OK [COPYUID ")), "{moved:?}");
    assert!(moved.iter().any(|line| line == "* 1 EXPUNGE"), "{moved:?}");
    // The email is the same one, with the same ID, now in Work/Projects.
    let account = "bob@example.org";
    let projects = node.service.find_mailbox(account, "Work/Projects").unwrap();
    let listing = node
        .service
        .query(
            account,
            projects,
            mailmesh::service::Query {
                search: None,
                sort: mailmesh::service::SortKey::Received,
                descending: false,
                position: 0,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(listing.total, 1);

    // A rename keeps the mailbox's UIDs and UIDVALIDITY.
    let before = client.ok("EXAMINE Work/Projects").await;
    let fetched = client.ok("UID FETCH 1:* (UID FLAGS)").await;
    client.ok("UNSELECT").await;
    client.ok("RENAME Work Jobs").await;
    let after = client.ok("EXAMINE Jobs/Projects").await;
    let validity = |lines: &[String]| lines.iter().find(|line| line.contains("UIDVALIDITY")).cloned();
    assert_eq!(validity(&after), validity(&before));
    assert_eq!(client.ok("UID FETCH 1:* (UID FLAGS)").await, fetched);
    assert_eq!(node.service.find_mailbox(account, "Jobs/Projects").unwrap(), projects);
    client.ok("UNSELECT").await;

    let (_, refused) = client.command("DELETE Jobs").await;
    assert!(refused.contains("NO [INUSE]"), "{refused}");
    let (_, inbox) = client.command("DELETE INBOX").await;
    assert!(inbox.contains(" NO "), "{inbox}");
    client.ok("DELETE Jobs/Projects").await;
    client.ok("DELETE Jobs").await;
    let (_, gone) = client.command("SELECT Jobs").await;
    assert!(gone.contains(" NO "), "{gone}");
    assert_eq!(
        node.service.mailboxes(account).unwrap().len(),
        1,
        "only the INBOX is left"
    );
}

/// A number after `key` in a line (`HIGHESTMODSEQ 12`, `MODSEQ (12)`).
fn number_after(line: &str, key: &str) -> u64 {
    let start = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[start..]
        .trim_start_matches([' ', '('])
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condstore_and_qresync_resync_a_client_from_its_modseq() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let mut writer = logged_in(node.imap, "alice@example.org").await;
    for subject in ["one", "two", "three", "four", "five"] {
        writer.append("INBOX", "", &MESSAGE.replace("Lunch", subject)).await;
    }

    // A CONDSTORE client: HIGHESTMODSEQ on SELECT and STATUS, MODSEQ in FETCH.
    let mut client = logged_in(node.imap, "alice@example.org").await;
    let status = client.ok("STATUS INBOX (MESSAGES HIGHESTMODSEQ)").await;
    let status_modseq = number_after(&status[0], "HIGHESTMODSEQ");
    let selected = client.ok("SELECT INBOX (CONDSTORE)").await;
    let line = selected
        .iter()
        .find(|line| line.contains("HIGHESTMODSEQ"))
        .expect("HIGHESTMODSEQ");
    let highest = number_after(line, "[HIGHESTMODSEQ");
    assert_eq!(highest, status_modseq);
    let (validity, _) = append_uid(&writer.append("INBOX", "", MESSAGE).await);
    client.ok("NOOP").await;
    let fetched = client.ok("UID FETCH 1:* (FLAGS MODSEQ)").await;
    assert_eq!(fetched.len(), 6, "{fetched:?}");
    let modseqs: Vec<u64> = fetched.iter().map(|line| number_after(line, "MODSEQ")).collect();
    assert!(modseqs.iter().all(|modseq| *modseq > 0), "{fetched:?}");
    let after_appends = *modseqs.iter().max().unwrap();

    // CHANGEDSINCE lists only what changed; STORE answers with the new MODSEQ.
    writer.ok("SELECT INBOX").await;
    writer.ok("UID STORE 2 +FLAGS.SILENT (\\Flagged)").await;
    let changed = client
        .ok(&format!("UID FETCH 1:* (FLAGS) (CHANGEDSINCE {after_appends})"))
        .await;
    let changed: Vec<&String> = changed.iter().filter(|line| line.contains("MODSEQ")).collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0].contains("UID 2 ") && changed[0].contains("\\Flagged"),
        "{changed:?}"
    );
    let flagged_modseq = number_after(changed[0], "MODSEQ");
    assert!(flagged_modseq > after_appends);

    // UNCHANGEDSINCE: message 2 changed after `after_appends`, so only 3 is stored.
    let (untagged, tagged) = client
        .command(&format!(
            "UID STORE 2:3 (UNCHANGEDSINCE {after_appends}) +FLAGS (\\Seen)"
        ))
        .await;
    assert!(tagged.contains("OK [MODIFIED 2]"), "{untagged:?} {tagged}");
    let stored: Vec<&String> = untagged.iter().filter(|line| line.contains("UID 3 ")).collect();
    assert!(
        stored.len() == 1 && stored[0].contains("\\Seen") && stored[0].contains("MODSEQ ("),
        "{untagged:?}"
    );
    let searched = client.ok(&format!("UID SEARCH MODSEQ {}", after_appends + 1)).await;
    assert!(searched[0].starts_with("* SEARCH 2 3 (MODSEQ "), "{searched:?}");
    client.ok("LOGOUT").await;

    // Later: a flag change and an expunge while the client is away.
    let (_, known_highest) = {
        let mut probe = logged_in(node.imap, "alice@example.org").await;
        let selected = probe.ok("SELECT INBOX").await;
        let line = selected
            .iter()
            .find(|line| line.contains("HIGHESTMODSEQ"))
            .unwrap()
            .clone();
        (probe, number_after(&line, "[HIGHESTMODSEQ"))
    };
    writer.ok("UID STORE 4 +FLAGS.SILENT (\\Answered)").await;
    writer.ok("UID STORE 5 +FLAGS.SILENT (\\Deleted)").await;
    writer.ok("UID EXPUNGE 5").await;

    // QRESYNC: SELECT needs ENABLE first, then tells VANISHED (EARLIER) and the changed flags.
    let mut client = logged_in(node.imap, "alice@example.org").await;
    let (_, refused) = client
        .command(&format!("SELECT INBOX (QRESYNC ({validity} {known_highest}))"))
        .await;
    assert!(refused.contains(" BAD "), "{refused}");
    let enabled = client.ok("ENABLE QRESYNC").await;
    assert_eq!(enabled, vec!["* ENABLED QRESYNC"]);
    let selected = client
        .ok(&format!("SELECT INBOX (QRESYNC ({validity} {known_highest}))"))
        .await;
    assert!(selected.contains(&"* VANISHED (EARLIER) 5".to_owned()), "{selected:?}");
    let fetches: Vec<&String> = selected.iter().filter(|line| line.contains(" FETCH ")).collect();
    assert_eq!(fetches.len(), 1, "only UID 4 changed: {selected:?}");
    assert!(
        fetches[0].contains("UID 4 ") && fetches[0].contains("\\Answered"),
        "{fetches:?}"
    );
    assert!(selected
        .iter()
        .all(|line| !line.contains("RECENT") || !line.contains("VANISHED")));
    // With known UIDs, what the client holds and is not here vanished.
    client.ok("UNSELECT").await;
    let selected = client
        .ok(&format!("SELECT INBOX (QRESYNC ({validity} {known_highest} 1:6))"))
        .await;
    assert!(selected.contains(&"* VANISHED (EARLIER) 5".to_owned()), "{selected:?}");
    // UID FETCH ... (CHANGEDSINCE m VANISHED).
    let fetched = client
        .ok(&format!(
            "UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known_highest} VANISHED)"
        ))
        .await;
    assert_eq!(fetched[0], "* VANISHED (EARLIER) 5", "{fetched:?}");

    // Expunges in the session come as VANISHED once QRESYNC is on.
    writer.ok("UID STORE 6 +FLAGS.SILENT (\\Deleted)").await;
    writer.ok("EXPUNGE").await;
    let noop = client.ok("NOOP").await;
    assert!(noop.contains(&"* VANISHED 6".to_owned()), "{noop:?}");
    assert!(noop.iter().all(|line| !line.ends_with("EXPUNGE")), "{noop:?}");
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_kept_and_esearch_answers_what_was_asked() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let mut client = logged_in(node.imap, "alice@example.org").await;
    client.ok("CREATE Lists").await;
    client.ok("CREATE Old").await;
    client.ok("UNSUBSCRIBE Old").await;
    let lsub = client.ok("LSUB \"\" \"*\"").await;
    assert!(lsub.iter().any(|line| line.ends_with("\"Lists\"")), "{lsub:?}");
    assert!(lsub.iter().all(|line| !line.ends_with("\"Old\"")), "{lsub:?}");
    let summary = node.service.mailbox_at("alice@example.org", "Old").unwrap();
    assert!(!summary.subscribed, "the register is written");
    client.ok("SUBSCRIBE Old").await;
    let lsub = client.ok("LSUB \"\" \"*\"").await;
    assert!(lsub.iter().any(|line| line.ends_with("\"Old\"")), "{lsub:?}");
    let (_, missing) = client.command("SUBSCRIBE Nowhere").await;
    assert!(missing.contains(" NO "), "{missing}");

    for (index, flags) in ["\\Seen", "", "\\Seen", "", ""].iter().enumerate() {
        client
            .append("INBOX", flags, &MESSAGE.replace("Lunch", &format!("m{index}")))
            .await;
    }
    client.ok("SELECT INBOX").await;
    let (untagged, tagged) = client.command("UID SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN").await;
    let tag = tagged.split(' ').next().unwrap();
    assert_eq!(
        untagged,
        vec![format!("* ESEARCH (TAG \"{tag}\") UID MIN 2 MAX 5 COUNT 3 ALL 2,4:5")]
    );
    let (untagged, tagged) = client.command("SEARCH RETURN () DELETED").await;
    let tag = tagged.split(' ').next().unwrap();
    assert_eq!(untagged, vec![format!("* ESEARCH (TAG \"{tag}\")")]);
    let (untagged, _) = client.command("SEARCH RETURN (COUNT) ALL").await;
    assert!(untagged[0].ends_with(" COUNT 5"), "{untagged:?}");

    // IMAP4rev2, advertised beside IMAP4rev1 (RFC 9051 6.3.1) and enabled: SEARCH answers
    // ESEARCH, SELECT has no RECENT.
    let capability = client.ok("CAPABILITY").await;
    let words: Vec<&str> = capability[0].split(' ').collect();
    assert!(
        words.contains(&"IMAP4rev1") && words.contains(&"IMAP4rev2"),
        "{capability:?}"
    );
    let enabled = client.ok("ENABLE IMAP4rev2").await;
    assert_eq!(enabled[0], "* ENABLED IMAP4REV2", "{enabled:?}");
    let selected = client.ok("SELECT INBOX").await;
    assert!(selected.iter().all(|line| !line.contains("RECENT")), "{selected:?}");
    let (untagged, tagged) = client.command("SEARCH SEEN").await;
    let tag = tagged.split(' ').next().unwrap();
    assert_eq!(untagged, vec![format!("* ESEARCH (TAG \"{tag}\") ALL 1,3")]);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_list_selects_by_subscription_and_use_and_returns_children_and_status() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let (_, greeting) = connect(node.imap).await;
    assert!(
        greeting.contains(" LIST-EXTENDED ") && greeting.contains(" LIST-STATUS "),
        "{greeting}"
    );
    let mut client = logged_in(node.imap, "alice@example.org").await;
    for name in ["Fruit", "Fruit/Apple", "Fruit/Banana", "Tofu", "Sent"] {
        client.ok(&format!("CREATE {name}")).await;
    }
    for name in ["Fruit", "Fruit/Apple", "Tofu"] {
        client.ok(&format!("UNSUBSCRIBE {name}")).await;
    }
    client.append("INBOX", "\\Seen", MESSAGE).await;
    client.append("INBOX", "", MESSAGE).await;

    // SUBSCRIBED selects, and implies the \Subscribed attribute.
    let subscribed = client.ok("LIST (SUBSCRIBED) \"\" \"*\"").await;
    assert_eq!(
        subscribed,
        vec![
            "* LIST (\\HasNoChildren \\Subscribed) \"/\" \"INBOX\"",
            "* LIST (\\HasNoChildren \\Subscribed) \"/\" \"Fruit/Banana\"",
            "* LIST (\\HasNoChildren \\Sent \\Subscribed) \"/\" \"Sent\"",
        ]
    );
    // RECURSIVEMATCH: Fruit is not subscribed but has a subscribed child "%" does not list.
    let recursive = client.ok("LIST (SUBSCRIBED RECURSIVEMATCH) \"\" \"%\"").await;
    assert_eq!(
        recursive,
        vec![
            "* LIST (\\HasNoChildren \\Subscribed) \"/\" \"INBOX\"",
            "* LIST (\\HasChildren) \"/\" \"Fruit\" (\"CHILDINFO\" (\"SUBSCRIBED\"))",
            "* LIST (\\HasNoChildren \\Sent \\Subscribed) \"/\" \"Sent\"",
        ]
    );
    // Several patterns, and the subscription state returned for each mailbox listed.
    let patterns = client
        .ok("LIST \"\" (\"INBOX\" \"Fruit/%\") RETURN (CHILDREN SUBSCRIBED)")
        .await;
    assert_eq!(
        patterns,
        vec![
            "* LIST (\\HasNoChildren \\Subscribed) \"/\" \"INBOX\"",
            "* LIST (\\HasNoChildren) \"/\" \"Fruit/Apple\"",
            "* LIST (\\HasNoChildren \\Subscribed) \"/\" \"Fruit/Banana\"",
        ]
    );
    let special = client.ok("LIST (SPECIAL-USE) \"\" \"*\" RETURN (SPECIAL-USE)").await;
    assert_eq!(special, vec!["* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent\""]);
    // LIST-STATUS: a STATUS after each mailbox listed.
    let status = client
        .ok("LIST \"\" \"INBOX\" RETURN (STATUS (MESSAGES UNSEEN UIDNEXT))")
        .await;
    assert_eq!(
        status,
        vec![
            "* LIST (\\HasNoChildren) \"/\" \"INBOX\"",
            "* STATUS \"INBOX\" (MESSAGES 2 UNSEEN 1 UIDNEXT 3)",
        ]
    );
    for refused in [
        "LIST (RECURSIVEMATCH) \"\" \"*\"",
        "LIST (FLAVOURED) \"\" \"*\"",
        "LIST \"\" \"*\" RETURN (STATUS (SIZE))",
    ] {
        let (_, tagged) = client.command(refused).await;
        assert!(tagged.contains(" BAD "), "{refused} -> {tagged}");
    }
    // The basic forms are as they were.
    let lsub = client.ok("LSUB \"\" \"Fruit/*\"").await;
    assert_eq!(lsub, vec!["* LSUB (\\HasNoChildren) \"/\" \"Fruit/Banana\""]);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_past_the_accounts_session_limit_is_refused_until_one_ends() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |config| {
        config.imap_connections.per_account = 2;
    }))
    .await;
    let mut first = logged_in(node.imap, "alice@example.org").await;
    let _second = logged_in(node.imap, "alice@example.org").await;
    let (mut third, _) = connect(node.imap).await;
    let (_, refused) = third.command("LOGIN alice@example.org secret").await;
    assert!(refused.contains(" NO [LIMIT]"), "{refused}");
    // Another account is not held back, and the refused session may still log in later.
    let _bob = logged_in(node.imap, "bob@example.org").await;
    first.ok("LOGOUT").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, tagged) = third.command("LOGIN alice@example.org secret").await;
        if tagged.contains(" OK ") {
            break;
        }
        assert!(tagged.contains(" NO [LIMIT]"), "{tagged}");
        assert!(
            std::time::Instant::now() < deadline,
            "the ended session never gave its place back"
        );
        tokio::task::yield_now().await;
    }
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_since_lets_exactly_one_of_concurrent_writers_store() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let mut client = logged_in(node.imap, "alice@example.org").await;
    client.append("INBOX", "", MESSAGE).await;
    client.ok("SELECT INBOX").await;
    let fetched = client.ok("UID FETCH 1 (MODSEQ)").await;
    let modseq = number_after(&fetched[0], "MODSEQ");
    for round in 0..5 {
        let mut writers = Vec::new();
        for _ in 0..8 {
            let mut writer = logged_in(node.imap, "alice@example.org").await;
            writer.ok("SELECT INBOX").await;
            writers.push(writer);
        }
        let fetched = client.ok("UID FETCH 1 (MODSEQ)").await;
        let modseq = fetched
            .iter()
            .filter(|line| line.contains("MODSEQ"))
            .map(|line| number_after(line, "MODSEQ"))
            .fold(modseq, u64::max);
        // Every writer sends before any answer is read: the STOREs reach the server together.
        for (index, writer) in writers.iter_mut().enumerate() {
            writer
                .send(
                    format!("w UID STORE 1 (UNCHANGEDSINCE {modseq}) +FLAGS.SILENT (r{round}w{index})\r\n").as_bytes(),
                )
                .await;
        }
        let mut stored = Vec::new();
        for (index, writer) in writers.iter_mut().enumerate() {
            let (_, tagged) = writer.until_tagged("w").await;
            assert!(tagged.starts_with("w OK"), "{tagged}");
            if !tagged.contains("[MODIFIED 1]") {
                stored.push(index);
            }
        }
        assert_eq!(stored.len(), 1, "round {round}: writers {stored:?} all stored");
        let flags = client.ok("UID FETCH 1 (FLAGS)").await;
        let keywords: std::collections::HashSet<&str> = flags
            .iter()
            .flat_map(|line| line.split([' ', '(', ')']))
            .filter(|word| word.starts_with(&format!("r{round}w")))
            .collect();
        assert_eq!(keywords.len(), 1, "round {round}: {flags:?}");
        for mut writer in writers {
            writer.ok("LOGOUT").await;
        }
    }
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_fetches_decode_the_parts_transfer_encoding() {
    let directory = tempfile::tempdir().unwrap();
    let node = start(config(directory.path(), |_| {})).await;
    let mut client = logged_in(node.imap, "alice@example.org").await;
    let message = "From: carol@example.net\r\nSubject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECaGk=\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-frob\r\n\r\n???\r\n--b--\r\n";
    client.append("INBOX", "", message).await;
    client.ok("SELECT INBOX").await;
    let capability = client.ok("CAPABILITY").await;
    assert!(capability[0].contains(" BINARY"), "{capability:?}");
    let fetched = client
        .ok("FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1] BINARY.PEEK[2]<1.4>)")
        .await;
    assert_eq!(
        fetched,
        vec!["* 1 FETCH (BINARY.SIZE[1] 5 BINARY[1] ~{5}\r\n\u{0}\u{1}\u{2}hi BINARY[2]<1> {4}\r\naf\u{e9})"]
    );
    let flags = client.ok("FETCH 1 (FLAGS)").await;
    assert!(!flags[0].contains("\\Seen"), "BINARY.PEEK leaves \\Seen: {flags:?}");
    let (_, unknown) = client.command("FETCH 1 (BINARY[3])").await;
    assert!(unknown.contains(" NO [UNKNOWN-CTE]"), "{unknown}");
    let read = client.ok("FETCH 1 (BINARY[2])").await;
    assert!(read[0].contains("BINARY[2] {5}\r\ncafé"), "{read:?}");
    assert!(
        read.iter().any(|line| line.contains("\\Seen")),
        "BINARY sets \\Seen: {read:?}"
    );
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_uids_past_the_tombstone_horizon_are_pruned_and_older_clients_get_every_gap() {
    let directory = tempfile::tempdir().unwrap();
    let clock = Arc::new(AheadClock::default());
    let node = start_on(config(directory.path(), |_| {}), clock.clone()).await;
    let mut writer = logged_in(node.imap, "alice@example.org").await;
    for subject in ["one", "two", "three", "four"] {
        writer.append("INBOX", "", &MESSAGE.replace("Lunch", subject)).await;
    }
    let selected = writer.ok("SELECT INBOX").await;
    let validity = number_after(
        selected.iter().find(|line| line.contains("UIDVALIDITY")).unwrap(),
        "[UIDVALIDITY",
    );
    let highest = |lines: &[String]| {
        number_after(
            lines.iter().find(|line| line.contains("HIGHESTMODSEQ")).unwrap(),
            "[HIGHESTMODSEQ",
        )
    };
    writer.ok("UID STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    writer.ok("UID EXPUNGE 1").await;
    let before_second = highest(&writer.ok("SELECT INBOX").await);
    writer.ok("UID STORE 2 +FLAGS.SILENT (\\Deleted)").await;
    writer.ok("UID EXPUNGE 2").await;
    let before_third = highest(&writer.ok("SELECT INBOX").await);

    let mut client = logged_in(node.imap, "alice@example.org").await;
    client.ok("ENABLE QRESYNC").await;
    let resync = |modseq: u64| format!("EXAMINE INBOX (QRESYNC ({validity} {modseq}))");
    let exact = client.ok(&resync(before_second)).await;
    assert!(exact.contains(&"* VANISHED (EARLIER) 2".to_owned()), "{exact:?}");

    // A horizon later the first two entries are pruned when the third expunge is numbered.
    clock.ahead_millis.store(
        mailmesh::store::DEFAULT_TOMBSTONE_HORIZON_MILLIS + 60_000,
        std::sync::atomic::Ordering::SeqCst,
    );
    writer.ok("UID STORE 3 +FLAGS.SILENT (\\Deleted)").await;
    writer.ok("UID EXPUNGE 3").await;
    let after = highest(&writer.ok("SELECT INBOX").await);
    // Older than what was pruned: every UID that is not here, 1 included (a full resync).
    let full = client.ok(&resync(before_second)).await;
    assert!(full.contains(&"* VANISHED (EARLIER) 1:3".to_owned()), "{full:?}");
    // Newer: still exact, from the entry that was kept.
    let kept = client.ok(&resync(before_third)).await;
    assert!(kept.contains(&"* VANISHED (EARLIER) 3".to_owned()), "{kept:?}");
    let fetched = client
        .ok(&format!(
            "UID FETCH 1:* (FLAGS) (CHANGEDSINCE {before_second} VANISHED)"
        ))
        .await;
    assert_eq!(fetched[0], "* VANISHED (EARLIER) 1:3", "{fetched:?}");
    let current = client.ok(&resync(after)).await;
    assert!(current.iter().all(|line| !line.contains("VANISHED")), "{current:?}");
    node.close().await;
}
