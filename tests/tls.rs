//! HTTPS on the node's HTTP address: a node started in this process with a certificate made
//! here, reached by a rustls client that trusts only that certificate. Plain HTTP to the same
//! port gets nothing, and a client that never finishes its handshake does not stop others.

use std::sync::Arc;
use std::time::Duration;

use mailmesh::node::NodeConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Certificate {
    certificate_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn certificate() -> Certificate {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    Certificate {
        certificate_pem: certified.cert.pem(),
        key_pem: certified.key_pair.serialize_pem(),
        der: certified.cert.der().clone(),
    }
}

async fn get_over_tls(address: std::net::SocketAddr, trusted: &CertificateDer<'static>, request: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(address).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .expect("TLS handshake with the node");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_address_speaks_https_with_the_configured_certificate() {
    let directory = tempfile::tempdir().unwrap();
    let certificate = certificate();
    let certificate_path = directory.path().join("cert.pem");
    let key_path = directory.path().join("key.pem");
    std::fs::write(&certificate_path, &certificate.certificate_pem).unwrap();
    std::fs::write(&key_path, &certificate.key_pem).unwrap();
    let config = NodeConfig {
        name: "tls".into(),
        data_dir: directory.path().join("node"),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        http: "127.0.0.1:0".parse().unwrap(),
        cluster: "tls-test".into(),
        tls_cert_file: Some(certificate_path.clone()),
        tls_key_file: Some(key_path.clone()),
        ..NodeConfig::default()
    };
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let running = mailmesh::server::start(config.clone(), mailmesh::environment::system(), stop)
        .await
        .expect("node with TLS starts");

    // A client that connects and never speaks holds a handshake slot, not the listener.
    let _silent = TcpStream::connect(running.http).await.unwrap();

    let answer = get_over_tls(
        running.http,
        &certificate.der,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("alive"), "{answer}");
    let raw = "From: carol@example.net\r\nSubject: over TLS\r\n\r\nsecret\r\n";
    let answer = get_over_tls(
        running.http,
        &certificate.der,
        &format!(
            "POST /v1/mailboxes/alice@example.org/INBOX/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{raw}",
            raw.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(running.http).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));

    let _ = stop_sender.send(true);

    // Half a configuration is refused at start, saying what is missing.
    let (_sender, stop) = tokio::sync::watch::channel(false);
    let half = NodeConfig {
        data_dir: directory.path().join("half"),
        tls_key_file: None,
        ..config
    };
    let refused = mailmesh::server::start(half, mailmesh::environment::system(), stop)
        .await
        .err()
        .expect("refused");
    assert!(
        refused.to_string().contains("tls_cert_file and tls_key_file"),
        "{refused}"
    );
}
