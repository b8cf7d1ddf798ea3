//! TLS for the listeners clients reach (HTTP and JMAP now; IMAP will share the same keys), through
//! rustls with the ring provider that libp2p's noise already builds.
//!
//! With `tls_cert_file` and `tls_key_file` (PEM: the certificate chain, leaf first, and its
//! private key) the HTTP address speaks HTTPS only. Handshakes run concurrently, each bounded by
//! [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at a time, so a client that connects and
//! says nothing holds neither the accept loop nor memory for long.
//!
//! Every connection is labelled with a [`ClientAddress`] saying whether it is encrypted: the API
//! refuses credentials sent in the clear from anywhere but loopback unless the operator set
//! `allow_plaintext_auth` (for a proxy that terminates TLS in front of the node).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 256;

/// Why the TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the TLS certificate file {0} holds no certificate (PEM \"CERTIFICATE\" blocks expected)")]
    NoCertificate(PathBuf),
    #[error("the TLS certificate and key cannot be used together: {0}")]
    Invalid(String),
}

/// A server configuration from PEM files.
pub fn server_config(certificate: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |error: rustls::pki_types::pem::Error| TlsError::Read {
            path: path.clone(),
            reason: error.to_string(),
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(read_error(certificate))?
        .collect::<Result<_, _>>()
        .map_err(read_error(certificate))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(certificate.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(read_error(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Invalid(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Invalid(error.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener that hands out connections once their TLS handshake is done.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener`; the accept loop ends when this listener is dropped.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (sender, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (stream, address) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: wait instead of spinning.
                            tracing::warn!("HTTPS accept failed: {error}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = sender.closed() => break,
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%address, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send((stream, address)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%address, "TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!(%address, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Who is on the other end of an HTTP connection, and whether the connection is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddress {
    pub address: SocketAddr,
    pub secure: bool,
}

impl ClientAddress {
    /// Whether credentials may be accepted on this connection: over TLS, from loopback, or
    /// anywhere when the operator allowed plaintext logins.
    pub fn may_send_credentials(&self, allow_plaintext: bool) -> bool {
        self.secure || allow_plaintext || self.address.ip().to_canonical().is_loopback()
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for ClientAddress {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        ClientAddress {
            address: *stream.remote_addr(),
            secure: false,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for ClientAddress {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        ClientAddress {
            address: *stream.remote_addr(),
            secure: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClientAddress;

    #[test]
    fn credentials_in_the_clear_only_from_loopback_unless_allowed() {
        let client = |address: &str, secure| ClientAddress {
            address: address.parse().unwrap(),
            secure,
        };
        assert!(client("127.0.0.1:5000", false).may_send_credentials(false));
        assert!(client("[::1]:5000", false).may_send_credentials(false));
        assert!(client("[::ffff:127.0.0.1]:5000", false).may_send_credentials(false));
        assert!(!client("192.0.2.7:5000", false).may_send_credentials(false));
        assert!(!client("[2001:db8::7]:5000", false).may_send_credentials(false));
        assert!(client("192.0.2.7:5000", true).may_send_credentials(false));
        assert!(client("192.0.2.7:5000", false).may_send_credentials(true));
    }
}
