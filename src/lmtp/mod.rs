//! The LMTP server (RFC 2033): how an MTA such as Postfix hands mail to this node.
//!
//! It listens on a TCP address or a unix socket (Postfix's `lmtp:inet:` and `lmtp:unix:`
//! transports), runs one [`session::Session`] per connection and stores each recipient's copy
//! through the mail service, so it calls nothing but [`crate::service::MailService`] (through the
//! small [`Mailboxes`] trait, which the unit tests implement in memory). Each recipient's `250`
//! is written only once [`crate::service::MailService::deliver`] has returned, that is once the
//! copy is durable here; replication takes it to the other nodes from the commit feed.
//!
//! Limits: connections at once ([`ServerLimits::max_connections`]), an idle timeout on every
//! read, a deadline on the whole session (a client that sends one byte before each idle timeout
//! cannot hold a connection for ever), and the session's own limits on line length, message size
//! and recipients. The operator sets them with the `lmtp_*` configuration keys.

pub mod session;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{watch, Semaphore};

use crate::metrics::{NodeMetrics, OutcomeLabel};
use crate::service::{Delivered, Delivery, MailService, Recipient, ServiceError};
use session::{Limits, Next, Outcomes, Peer, Session};

/// Room left under the store's message limit for the trace headers added to each copy.
pub const TRACE_HEADROOM_BYTES: u64 = 2048;

/// Why the LMTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum LmtpError {
    #[error("cannot listen for LMTP on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("{path} exists and is not a socket; remove it or choose another LMTP path")]
    NotASocket { path: PathBuf },
    #[error("invalid LMTP address {text:?}: give HOST:PORT, or a socket path starting with / or unix:")]
    Address { text: String },
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddress {
    type Err = LmtpError;

    /// `127.0.0.1:24` is TCP; `/run/mailmesh/lmtp` or `unix:/run/mailmesh/lmtp` is a unix socket.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(LmtpError::Address { text: text.into() });
            }
            return Ok(ListenAddress::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(ListenAddress::Unix(PathBuf::from(text)));
        }
        text.parse()
            .map(ListenAddress::Tcp)
            .map_err(|_| LmtpError::Address { text: text.into() })
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(address) => write!(formatter, "{address}"),
            ListenAddress::Unix(path) => write!(formatter, "unix:{}", path.display()),
        }
    }
}

/// Limits of the server as a whole.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Sessions at once; more are answered `421` and closed.
    pub max_connections: usize,
    /// How long a read may wait for the client (RFC 5321 4.5.3.2 suggests minutes).
    pub idle_timeout: Duration,
    /// How long one connection may last in all; then it is answered `421` and closed, and a
    /// transaction whose data was not all read is dropped (the MTA retries it).
    pub session_deadline: Duration,
    pub session: Limits,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 100,
            idle_timeout: Duration::from_secs(300),
            session_deadline: Duration::from_secs(3600),
            session: Limits::default(),
        }
    }
}

/// What the server needs from the mail service: looking up recipients and storing copies.
pub trait Mailboxes: Clone + Send + Sync + 'static {
    fn max_message_bytes(&self) -> u64;
    fn resolve_recipient(&self, address: &str) -> Result<Recipient, ServiceError>;
    /// Stores one copy; returns once it is durable.
    fn deliver(&self, delivery: Delivery) -> impl Future<Output = Result<Delivered, ServiceError>> + Send;
}

impl Mailboxes for MailService {
    fn max_message_bytes(&self) -> u64 {
        MailService::max_message_bytes(self)
    }

    fn resolve_recipient(&self, address: &str) -> Result<Recipient, ServiceError> {
        MailService::resolve_recipient(self, address)
    }

    fn deliver(&self, delivery: Delivery) -> impl Future<Output = Result<Delivered, ServiceError>> + Send {
        MailService::deliver(self, delivery)
    }
}

/// A bound listener, TCP or unix.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix {
        listener: tokio::net::UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// Binds the address; a stale unix socket left by an earlier run is replaced.
    pub async fn bind(address: &ListenAddress) -> Result<Listener, LmtpError> {
        let failed = |source| LmtpError::Bind {
            address: address.to_string(),
            source,
        };
        match address {
            ListenAddress::Tcp(socket) => Ok(Listener::Tcp(
                tokio::net::TcpListener::bind(socket).await.map_err(failed)?,
            )),
            ListenAddress::Unix(path) => {
                if let Ok(metadata) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !metadata.file_type().is_socket() {
                        return Err(LmtpError::NotASocket { path: path.clone() });
                    }
                    std::fs::remove_file(path).map_err(failed)?;
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(failed)?;
                // The MTA's delivery agent runs as its own user (Postfix's lmtp as `postfix`) and
                // needs write permission to connect. Who may reach the socket is decided by the
                // directory it is in, as with Postfix's own private/ sockets.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(failed)?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// The address as bound (with the port the OS chose for port 0).
    pub fn local_address(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map(|address| address.to_string())
                .unwrap_or_default(),
            Listener::Unix { path, .. } => path.display().to_string(),
        }
    }
}

/// The LMTP server of one node.
#[derive(Clone)]
pub struct LmtpServer<M: Mailboxes> {
    mailboxes: M,
    metrics: Option<NodeMetrics>,
    server_name: String,
    limits: ServerLimits,
}

impl<M: Mailboxes> LmtpServer<M> {
    /// A server storing through `mailboxes`, naming itself `server_name` in replies and in the
    /// `Received` line. The message limit is the service's, less room for the trace headers.
    pub fn new(mailboxes: M, server_name: &str, metrics: Option<NodeMetrics>) -> Self {
        let mut limits = ServerLimits::default();
        limits.session.max_message_bytes = mailboxes
            .max_message_bytes()
            .saturating_sub(TRACE_HEADROOM_BYTES)
            .max(1);
        LmtpServer {
            mailboxes,
            metrics,
            server_name: server_name.to_owned(),
            limits,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Replaces the limits (the configuration's `lmtp_*` keys; tests use short timeouts).
    pub fn with_limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Accepts connections until `stop` is set; each session then ends at its next command.
    pub async fn serve(self, listener: Listener, mut stop: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        loop {
            let accepted = tokio::select! {
                accepted = accept(&listener) => accepted,
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            let (stream, client_address) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!("LMTP accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            let permit = permits.clone().try_acquire_owned();
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(_permit) = permit else {
                    server.count(Outcomes::default(), 1);
                    let mut stream = stream;
                    let _ = stream
                        .write_all(b"421 4.3.2 Too many connections, try again later\r\n")
                        .await;
                    let _ = stream.shutdown().await;
                    return;
                };
                if let Err(error) = server.run_session(stream, client_address, stop).await {
                    tracing::debug!("LMTP session ended: {error}");
                }
            });
        }
        if let Listener::Unix { path, .. } = &listener {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Runs one session over any byte stream until QUIT, an error, the idle timeout or `stop`.
    pub async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        client_address: String,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let (reader, writer) = tokio::io::split(stream);
        let mut reader = reader;
        let mut writer = BufWriter::new(writer);
        let mut session = Session::new(
            Peer {
                server_name: self.server_name.clone(),
                client_address,
            },
            self.limits.session,
        );
        writer.write_all(session.greeting().as_bytes()).await?;
        writer.flush().await?;
        let mut buffer: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + self.limits.session_deadline;
        loop {
            // Answer everything already read (pipelined commands), then flush once.
            loop {
                let mailboxes = &self.mailboxes;
                let progress = session.advance(&buffer, &mut |address| mailboxes.resolve_recipient(address));
                buffer.drain(..progress.consumed);
                writer.write_all(&progress.output).await?;
                match progress.next {
                    Next::MoreInput => break,
                    Next::Close => {
                        self.count(session.take_outcomes(), 0);
                        writer.flush().await?;
                        return writer.shutdown().await;
                    }
                    Next::Deliver(transaction) => {
                        writer.flush().await?;
                        for index in 0..transaction.recipients.len() {
                            let copy = transaction.copy_for(index, now_millis());
                            let result = self.mailboxes.deliver(copy).await;
                            if let Err(error) = &result {
                                tracing::info!(
                                    recipient = %transaction.recipients[index].address,
                                    "LMTP delivery refused: {error}"
                                );
                            }
                            session.count_delivery(&result);
                            writer
                                .write_all(transaction.reply_for(index, &result).as_bytes())
                                .await?;
                            writer.flush().await?;
                        }
                        session.transaction_done();
                    }
                }
            }
            self.count(session.take_outcomes(), 0);
            writer.flush().await?;
            // (The stop flag's guard is dropped inside the select, so the future stays Send.)
            let idle_until = (tokio::time::Instant::now() + self.limits.idle_timeout).min(deadline);
            let read = tokio::select! {
                read = tokio::time::timeout_at(idle_until, reader.read(&mut chunk)) => Some(read),
                _ = stop.wait_for(|stopped| *stopped) => None,
            };
            let Some(read) = read else {
                writer.write_all(b"421 4.3.2 Server shutting down\r\n").await?;
                writer.flush().await?;
                return Ok(());
            };
            match read {
                Err(_) => {
                    let reply: &[u8] = if tokio::time::Instant::now() >= deadline {
                        b"421 4.4.2 Session time limit reached, closing the connection\r\n"
                    } else {
                        b"421 4.4.2 Idle timeout, closing the connection\r\n"
                    };
                    writer.write_all(reply).await?;
                    writer.flush().await?;
                    return Ok(());
                }
                // End of input: a transaction cut off mid-data is dropped, nothing was stored.
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(count)) => buffer.extend_from_slice(&chunk[..count]),
                Ok(Err(error)) => return Err(error),
            }
        }
    }

    fn count(&self, outcomes: Outcomes, connections_refused: u64) {
        let Some(metrics) = &self.metrics else { return };
        for (outcome, count) in [
            ("accepted", outcomes.accepted),
            ("refused", outcomes.refused),
            ("deferred", outcomes.deferred),
        ] {
            if count > 0 {
                metrics
                    .lmtp_deliveries
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc_by(count);
            }
        }
        if connections_refused > 0 {
            metrics.lmtp_connections_refused.inc_by(connections_refused);
        }
    }
}

/// A connection and the client's address as the `Received` line names it.
type Connection = (Box<dyn Stream>, String);

/// A byte stream of either kind.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn accept(listener: &Listener) -> std::io::Result<Connection> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, address) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Box::new(stream), format!("[{}]", address.ip())))
        }
        Listener::Unix { listener, .. } => {
            let (stream, _) = listener.accept().await?;
            Ok((Box::new(stream), "local".to_owned()))
        }
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Mailboxes in memory: `alice@example.org` exists; copies are kept in order.
    #[derive(Clone, Default)]
    struct Memory {
        copies: Arc<Mutex<Vec<Delivery>>>,
    }

    impl Mailboxes for Memory {
        fn max_message_bytes(&self) -> u64 {
            1 << 20
        }
        fn resolve_recipient(&self, address: &str) -> Result<Recipient, ServiceError> {
            if address == "alice@example.org" {
                Ok(Recipient {
                    account: address.into(),
                    mailbox: "INBOX".into(),
                })
            } else {
                Err(ServiceError::NoSuchAccount(address.into()))
            }
        }
        async fn deliver(&self, delivery: Delivery) -> Result<Delivered, ServiceError> {
            let size = delivery.raw.len() as u64;
            self.copies.lock().unwrap().push(delivery);
            Ok(Delivered {
                id: crate::model::MessageId(1),
                mailbox: crate::model::MailboxId(1),
                blob: crate::model::BlobHash::of(b"x"),
                size,
                duplicate: false,
            })
        }
    }

    async fn read_until(stream: &mut tokio::io::DuplexStream, ending: &str) -> String {
        let mut text = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&text).ends_with(ending) {
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            text.push(byte[0]);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    #[test]
    fn addresses_parse_as_tcp_or_unix_sockets() {
        assert_eq!(
            "127.0.0.1:24".parse::<ListenAddress>().unwrap(),
            ListenAddress::Tcp("127.0.0.1:24".parse().unwrap())
        );
        assert_eq!(
            "/run/mailmesh/lmtp".parse::<ListenAddress>().unwrap(),
            ListenAddress::Unix("/run/mailmesh/lmtp".into())
        );
        assert_eq!(
            "unix:private/mailmesh".parse::<ListenAddress>().unwrap(),
            ListenAddress::Unix("private/mailmesh".into())
        );
        assert!("localhost".parse::<ListenAddress>().is_err());
        assert!("unix:".parse::<ListenAddress>().is_err());
    }

    #[tokio::test]
    async fn an_idle_session_is_closed_with_421() {
        let memory = Memory::default();
        let mut limits = ServerLimits {
            idle_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        };
        limits.session.max_message_bytes = 1046528;
        let server = LmtpServer::new(memory, "node-1", None).with_limits(limits);
        let (mut client, server_side) = tokio::io::duplex(4096);
        let (_stop_sender, stop) = watch::channel(false);
        let session = tokio::spawn(async move { server.run_session(server_side, "[::1]".into(), stop).await });
        assert!(read_until(&mut client, "\r\n").await.starts_with("220 node-1"));
        client.write_all(b"LHLO x\r\n").await.unwrap();
        assert!(read_until(&mut client, "250 CHUNKING\r\n")
            .await
            .contains("250-SIZE 1046528"));
        // The client says nothing more.
        let closing = read_until(&mut client, "\r\n").await;
        assert_eq!(closing, "421 4.4.2 Idle timeout, closing the connection\r\n");
        session.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_session_that_trickles_its_data_past_the_deadline_is_closed_and_stores_nothing() {
        let memory = Memory::default();
        let limits = ServerLimits {
            idle_timeout: Duration::from_secs(5),
            session_deadline: Duration::from_millis(400),
            ..ServerLimits::default()
        };
        let server = LmtpServer::new(memory.clone(), "node-1", None).with_limits(limits);
        let (mut client, server_side) = tokio::io::duplex(4096);
        let (_stop_sender, stop) = watch::channel(false);
        let session = tokio::spawn(async move { server.run_session(server_side, "[::1]".into(), stop).await });
        assert!(read_until(&mut client, "\r\n").await.starts_with("220 node-1"));
        client
            .write_all(b"LHLO x\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
            .await
            .unwrap();
        assert!(read_until(&mut client, "354").await.contains("354"));
        read_until(&mut client, "\r\n").await;
        // One line every 50 ms: never idle for long, but never done either.
        let trickle = async {
            for line in 0..1000 {
                if client.write_all(format!("line {line}\r\n").as_bytes()).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), trickle).await;
        let closing = read_until(&mut client, "\r\n").await;
        assert_eq!(
            closing,
            "421 4.4.2 Session time limit reached, closing the connection\r\n"
        );
        session.await.unwrap().unwrap();
        assert!(
            memory.copies.lock().unwrap().is_empty(),
            "a cut-off transaction stores nothing"
        );
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_answered_421() {
        let memory = Memory::default();
        let limits = ServerLimits {
            max_connections: 1,
            ..ServerLimits::default()
        };
        let server = LmtpServer::new(memory, "node-1", None).with_limits(limits);
        let address = ListenAddress::Tcp("127.0.0.1:0".parse().unwrap());
        let listener = Listener::bind(&address).await.unwrap();
        let bound = listener.local_address();
        let (stop_sender, stop) = watch::channel(false);
        let serving = tokio::spawn(server.serve(listener, stop));
        let read_line = |mut stream: tokio::net::TcpStream| async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\r\n") && stream.read(&mut byte).await.unwrap() == 1 {
                line.push(byte[0]);
            }
            (stream, String::from_utf8_lossy(&line).into_owned())
        };
        let (first, greeting) = read_line(tokio::net::TcpStream::connect(&bound).await.unwrap()).await;
        assert!(greeting.starts_with("220 node-1"), "{greeting}");
        let (_second, refusal) = read_line(tokio::net::TcpStream::connect(&bound).await.unwrap()).await;
        assert_eq!(refusal, "421 4.3.2 Too many connections, try again later\r\n");
        // Once the first session ends, its place is free again.
        drop(first);
        let mut greeted = String::new();
        for _ in 0..100 {
            let (_third, line) = read_line(tokio::net::TcpStream::connect(&bound).await.unwrap()).await;
            greeted = line;
            if greeted.starts_with("220") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(greeted.starts_with("220 node-1"), "{greeted}");
        stop_sender.send(true).unwrap();
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_dropped_mid_data_stores_nothing() {
        let memory = Memory::default();
        let server = LmtpServer::new(memory.clone(), "node-1", None);
        let (mut client, server_side) = tokio::io::duplex(4096);
        let (_stop_sender, stop) = watch::channel(false);
        let session = tokio::spawn(async move { server.run_session(server_side, "[::1]".into(), stop).await });
        client
            .write_all(b"LHLO x\r\nMAIL FROM:<b@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
            .await
            .unwrap();
        read_until(&mut client, "354 2.0.0 Send the message, end with <CRLF>.<CRLF>\r\n").await;
        client
            .write_all(b"Subject: half\r\n\r\nand then the line")
            .await
            .unwrap();
        drop(client);
        session.await.unwrap().unwrap();
        assert!(memory.copies.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn stop_closes_a_waiting_session_and_pipelined_replies_come_in_order() {
        let memory = Memory::default();
        let server = LmtpServer::new(memory.clone(), "node-1", None);
        let (mut client, server_side) = tokio::io::duplex(1 << 16);
        let (stop_sender, stop) = watch::channel(false);
        let session = tokio::spawn(async move { server.run_session(server_side, "[::1]".into(), stop).await });
        read_until(&mut client, "\r\n").await;
        client
            .write_all(b"LHLO x\r\nMAIL FROM:<b@example.net>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<eve@example.org>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\n")
            .await
            .unwrap();
        let replies = read_until(&mut client, "250 2.0.0 OK\r\n").await;
        let codes: Vec<&str> = replies.lines().skip(6).map(|line| &line[..3]).collect();
        assert_eq!(codes, ["250", "250", "550", "354", "250", "250"], "{replies}");
        assert_eq!(memory.copies.lock().unwrap().len(), 1);
        stop_sender.send(true).unwrap();
        assert_eq!(
            read_until(&mut client, "\r\n").await,
            "421 4.3.2 Server shutting down\r\n"
        );
        session.await.unwrap().unwrap();
    }
}
