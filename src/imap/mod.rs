//! The IMAP server (RFC 3501): how mail clients read and file mail on this node.
//!
//! It listens on `imap_listen` (plain, with STARTTLS when `tls_cert_file`/`tls_key_file` are set)
//! and `imaps_listen` (implicit TLS), runs one [`session::Session`] per connection and calls
//! nothing but [`crate::service::MailService`] (UIDs come from the service's node-local map,
//! [`crate::service::uids`]). [`reader::Reader`] turns bytes into commands without IO; this
//! module does the IO: TLS, the idle timeout, IDLE's wait for changes, and the connection limits
//! (in all, per address, and per account once logged in: [`ConnectionLimits`]).
//!
//! Credentials are refused in the clear (LOGINDISABLED) except from loopback or when the operator
//! set `imap_allow_plaintext`; failed logins are rate-limited by the accounts file's limits.

pub mod message;
pub mod reader;
pub mod session;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::service::uids::UidIndex;
use crate::service::{MailService, Notice};
use reader::{Event, Limits, Reader};
use session::{Connection, Next, Session};

/// Why the IMAP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot listen for IMAP on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// How many IMAP sessions may be open at once (the keys `imap_max_connections`,
/// `imap_max_connections_per_address` and `imap_max_connections_per_account`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Sessions at once; more are answered BYE and closed.
    pub total: usize,
    /// Sessions at once from one address; more are answered BYE and closed.
    pub per_address: usize,
    /// Logged-in sessions of one account; a login past it is refused with `NO [LIMIT]`.
    pub per_account: usize,
}

impl Default for ConnectionLimits {
    /// 500 in all, 50 per address (a NAT or a webmail host), 20 per account (a few devices, each
    /// with the five connections Thunderbird opens by default, and IDLE on several mailboxes).
    fn default() -> Self {
        ConnectionLimits {
            total: 500,
            per_address: 50,
            per_account: 20,
        }
    }
}

/// Limits and policy of the server.
#[derive(Clone, Debug)]
pub struct ImapSettings {
    pub connections: ConnectionLimits,
    /// How long the client may stay silent, IDLE included (RFC 9051: at least 30 minutes).
    pub idle_timeout: Duration,
    /// Accept LOGIN and AUTHENTICATE without TLS from any address, not only loopback.
    pub allow_plaintext: bool,
    pub reader: Limits,
}

impl ImapSettings {
    /// The defaults, with literals up to the service's message limit.
    pub fn for_service(service: &MailService) -> ImapSettings {
        ImapSettings {
            connections: ConnectionLimits::default(),
            idle_timeout: Duration::from_secs(31 * 60),
            allow_plaintext: false,
            reader: Limits {
                max_line_bytes: 64 * 1024,
                max_literal_bytes: service.max_message_bytes().min(u32::MAX as u64) as u32,
            },
        }
    }
}

/// The IMAP server of one node.
#[derive(Clone)]
pub struct ImapServer {
    service: MailService,
    uids: Arc<UidIndex>,
    tls: Option<Arc<ServerConfig>>,
    settings: ImapSettings,
    connections: Arc<Semaphore>,
    per_address: Counts<IpAddr>,
    per_account: Counts<String>,
}

/// The byte stream of a connection, plain or TLS (STARTTLS turns one into the other).
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between STARTTLS taking the plain stream and the handshake's end.
    Switching,
}

impl Transport {
    async fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(buffer).await,
            Transport::Tls(stream) => stream.read(buffer).await,
            Transport::Switching => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.write_all(bytes).await,
            Transport::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
            Transport::Switching => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Plain(stream) => stream.shutdown().await,
            Transport::Tls(stream) => stream.shutdown().await,
            Transport::Switching => Ok(()),
        };
    }
}

/// Sessions at once per key (an address, an account), each at most `limit`.
#[derive(Clone, Debug)]
pub struct Counts<K: Hash + Eq + Clone> {
    map: Arc<Mutex<HashMap<K, usize>>>,
    limit: usize,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    pub fn new(limit: usize) -> Counts<K> {
        Counts {
            map: Default::default(),
            limit,
        }
    }

    /// A place for one more session of `key`, or `None` when it has `limit` already.
    pub fn take(&self, key: K) -> Option<Slot<K>> {
        let mut map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = map.entry(key.clone()).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            counts: self.clone(),
            key,
        })
    }
}

/// One session's place in a [`Counts`], given back when it is dropped.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq + Clone> {
    counts: Counts<K>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut map = self.counts.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = map.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl ImapServer {
    /// A server over `service`; `tls` enables STARTTLS on plain listeners and IMAPS listeners.
    pub fn new(
        service: MailService,
        uids: Arc<UidIndex>,
        tls: Option<Arc<ServerConfig>>,
        settings: ImapSettings,
    ) -> Self {
        ImapServer {
            connections: Arc::new(Semaphore::new(settings.connections.total)),
            per_address: Counts::new(settings.connections.per_address),
            per_account: Counts::new(settings.connections.per_account),
            service,
            uids,
            tls,
            settings,
        }
    }

    /// Binds a TCP address.
    pub async fn bind(address: SocketAddr) -> Result<TcpListener, ImapError> {
        TcpListener::bind(address)
            .await
            .map_err(|source| ImapError::Bind { address, source })
    }

    /// Accepts connections until `stop` is set; `implicit_tls` for the IMAPS port.
    pub async fn serve(self, listener: TcpListener, implicit_tls: bool, mut stop: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped(&mut stop) => break,
            };
            let (stream, address) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!("IMAP accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(error) = server.connection(stream, address, implicit_tls, stop).await {
                    tracing::debug!(%address, "IMAP session ended: {error}");
                }
            });
        }
    }

    async fn connection(
        &self,
        stream: TcpStream,
        address: SocketAddr,
        implicit_tls: bool,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut transport = Transport::Plain(stream);
        let ip = address.ip().to_canonical();
        let permit = self.connections.clone().try_acquire_owned();
        let slot = self.per_address.take(ip);
        if implicit_tls {
            let Some(tls) = &self.tls else {
                return Ok(());
            };
            let Transport::Plain(stream) = transport else {
                unreachable!()
            };
            let accepted = tokio::time::timeout(
                crate::tls::HANDSHAKE_TIMEOUT,
                TlsAcceptor::from(tls.clone()).accept(stream),
            )
            .await;
            transport = Transport::Tls(Box::new(
                accepted.map_err(|_| std::io::Error::other("TLS handshake timed out"))??,
            ));
        }
        if permit.is_err() || slot.is_none() {
            transport
                .write_all(b"* BYE [UNAVAILABLE] too many connections, try again later\r\n")
                .await?;
            transport.shutdown().await;
            return Ok(());
        }
        let connection = Connection {
            address: ip,
            secure: implicit_tls,
            tls_available: !implicit_tls && self.tls.is_some(),
            plaintext_allowed: self.settings.allow_plaintext || ip.is_loopback(),
        };
        let mut session = Session::new(self.service.clone(), self.uids.clone(), connection)
            .with_account_limit(self.per_account.clone());
        transport.write_all(&session.greeting()).await?;
        self.run(&mut transport, &mut session, stop).await
    }

    async fn run(
        &self,
        transport: &mut Transport,
        session: &mut Session,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut reader = Reader::new(self.settings.reader);
        let mut buffer = vec![0u8; 16 * 1024];
        let mut raw_for: Option<String> = None;
        loop {
            let event = reader.next(raw_for.is_some());
            match event {
                Event::NeedMore => {
                    let read = tokio::select! {
                        read = tokio::time::timeout(self.settings.idle_timeout, transport.read(&mut buffer)) => read,
                        _ = stopped(&mut stop) => {
                            transport.write_all(b"* BYE the server is shutting down\r\n").await?;
                            return Ok(());
                        }
                    };
                    match read {
                        Err(_) => {
                            transport.write_all(b"* BYE idle for too long\r\n").await?;
                            transport.shutdown().await;
                            return Ok(());
                        }
                        Ok(Ok(0)) => return Ok(()),
                        Ok(Ok(count)) => reader.enqueue(&buffer[..count]),
                        Ok(Err(error)) => return Err(error),
                    }
                }
                Event::Continue => transport.write_all(b"+ OK\r\n").await?,
                Event::LineTooLong => {
                    transport.write_all(b"* BYE line too long\r\n").await?;
                    transport.shutdown().await;
                    return Ok(());
                }
                Event::Refused { tag, reason, too_big } => {
                    raw_for = None;
                    session.refused(tag.as_deref(), &reason, too_big);
                    transport.write_all(&session.take_output()).await?;
                }
                Event::Line(line) => {
                    if let Some(tag) = raw_for.take() {
                        session.authenticate_response(&tag, &line).await;
                        transport.write_all(&session.take_output()).await?;
                    }
                }
                Event::Command(request) => {
                    let next = session.handle(*request).await;
                    transport.write_all(&session.take_output()).await?;
                    match next {
                        Next::Continue => {}
                        Next::Close => {
                            transport.shutdown().await;
                            return Ok(());
                        }
                        Next::AuthenticateResponse(tag) => {
                            transport.write_all(b"+ \r\n").await?;
                            raw_for = Some(tag);
                        }
                        Next::StartTls => {
                            let Some(tls) = &self.tls else {
                                return Ok(());
                            };
                            // Bytes sent before the handshake would be an injection (RFC 3501 6.2.1).
                            reader = Reader::new(self.settings.reader);
                            let plain = std::mem::replace(transport, Transport::Switching);
                            let Transport::Plain(stream) = plain else {
                                return Ok(());
                            };
                            let accepted = tokio::time::timeout(
                                crate::tls::HANDSHAKE_TIMEOUT,
                                TlsAcceptor::from(tls.clone()).accept(stream),
                            )
                            .await
                            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
                            *transport = Transport::Tls(Box::new(accepted));
                            session.tls_started();
                        }
                        Next::Idle(tag) => {
                            if !self
                                .idle(transport, session, &mut reader, &mut buffer, &tag, &mut stop)
                                .await?
                            {
                                return Ok(());
                            }
                        }
                    }
                    if session.logged_out() {
                        transport.shutdown().await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Waits for DONE, writing the selected mailbox's changes as they come; false: close.
    async fn idle(
        &self,
        transport: &mut Transport,
        session: &mut Session,
        reader: &mut Reader,
        buffer: &mut [u8],
        tag: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> std::io::Result<bool> {
        let mut subscription = self.service.subscribe(session.account());
        transport.write_all(b"+ idling\r\n").await?;
        session.idle_update().await;
        transport.write_all(&session.take_output()).await?;
        loop {
            match reader.next(true) {
                Event::Line(line) => {
                    if line.eq_ignore_ascii_case(b"DONE") {
                        session.idle_done(tag);
                    } else {
                        session.refused(Some(tag), "expected DONE", false);
                    }
                    transport.write_all(&session.take_output()).await?;
                    return Ok(true);
                }
                Event::LineTooLong => {
                    transport.write_all(b"* BYE line too long\r\n").await?;
                    return Ok(false);
                }
                Event::Refused { .. } | Event::Continue | Event::Command(_) => {
                    session.refused(Some(tag), "expected DONE", false);
                    transport.write_all(&session.take_output()).await?;
                    return Ok(false);
                }
                Event::NeedMore => {}
            }
            tokio::select! {
                read = tokio::time::timeout(self.settings.idle_timeout, transport.read(buffer)) => match read {
                    Err(_) => {
                        transport.write_all(b"* BYE idle for too long\r\n").await?;
                        return Ok(false);
                    }
                    Ok(Ok(0)) => return Ok(false),
                    Ok(Ok(count)) => reader.enqueue(&buffer[..count]),
                    Ok(Err(error)) => return Err(error),
                },
                notice = subscription.next() => match notice {
                    // Any change to the account refreshes the selected mailbox: an email that
                    // moved out names its new mailbox, not the one it left.
                    Some(Notice::Changed { .. }) if session.selected_mailbox().is_none() => {}
                    Some(_) => {
                        session.idle_update().await;
                        transport.write_all(&session.take_output()).await?;
                    }
                    None => return Ok(false),
                },
                _ = stopped(stop) => {
                    transport.write_all(b"* BYE the server is shutting down\r\n").await?;
                    return Ok(false);
                }
            }
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
