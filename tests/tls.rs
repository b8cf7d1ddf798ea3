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

/// A fresh certificate written into `directory`, and the configuration of a node serving it.
fn node_with_certificate(directory: &std::path::Path, name: &str) -> (Certificate, NodeConfig) {
    let certificate = certificate();
    let certificate_path = directory.join("cert.pem");
    let key_path = directory.join("key.pem");
    std::fs::write(&certificate_path, &certificate.certificate_pem).unwrap();
    std::fs::write(&key_path, &certificate.key_pem).unwrap();
    let config = NodeConfig {
        name: name.into(),
        data_dir: directory.join("node"),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        http: "127.0.0.1:0".parse().unwrap(),
        cluster: format!("{name}-test"),
        tls_cert_file: Some(certificate_path),
        tls_key_file: Some(key_path),
        ..NodeConfig::default()
    };
    (certificate, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_address_speaks_https_with_the_configured_certificate() {
    let directory = tempfile::tempdir().unwrap();
    let (certificate, config) = node_with_certificate(directory.path(), "tls");
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

/// `mailmesh import` and `mailmesh status` reach a node with TLS at `https://` when told which
/// certificate to trust, and refuse, saying why, when the certificate is not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_status_reach_a_node_over_https_trusting_a_ca_file() {
    let directory = tempfile::tempdir().unwrap();
    let (_, config) = node_with_certificate(directory.path(), "tls-import");
    let certificate_path = config.tls_cert_file.clone().unwrap();
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let running = mailmesh::server::start(config, mailmesh::environment::system(), stop)
        .await
        .expect("node with TLS starts");
    let address = format!("https://127.0.0.1:{}", running.http.port());

    let mbox = directory.path().join("in.mbox");
    std::fs::write(
        &mbox,
        "From alice@example.org Mon Nov 30 10:00:00 2026\nFrom: alice@example.org\nSubject: one\nStatus: RO\n\nfirst\n\n\
         From alice@example.org Mon Nov 30 11:00:00 2026\nFrom: alice@example.org\nSubject: two\n\nsecond\n",
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_mailmesh");
    let run = |arguments: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary)
                .args(arguments)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
    };
    let text = |output: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let import = |trusted: bool| {
        let mut arguments: Vec<String> = [
            "import",
            "--quiet",
            "--http",
            &address,
            "--account",
            "alice@example.org",
        ]
        .map(str::to_owned)
        .to_vec();
        if trusted {
            arguments.extend(["--ca-file".to_owned(), certificate_path.display().to_string()]);
        }
        arguments.push(mbox.display().to_string());
        run(arguments)
    };

    let untrusted = import(false).await.unwrap();
    assert!(!untrusted.status.success(), "{}", text(&untrusted));
    assert!(
        text(&untrusted).to_lowercase().contains("certificate"),
        "{}",
        text(&untrusted)
    );

    let imported = import(true).await.unwrap();
    assert!(imported.status.success(), "{}", text(&imported));
    assert!(
        text(&imported).contains("imported 2 new messages"),
        "{}",
        text(&imported)
    );

    let agent =
        mailmesh::api_client::agent_trusting(&mailmesh::api_client::Trust::from_ca_file(&certificate_path).unwrap());
    let listing = {
        let address = address.clone();
        tokio::task::spawn_blocking(move || {
            mailmesh::api_client::request(
                &agent,
                &address,
                "GET",
                "/v1/mailboxes/alice@example.org/INBOX/messages",
                &[],
                None,
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(listing.status, 200, "{}", listing.text());
    let messages = listing.json()["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(messages.len(), 2, "{}", listing.text());
    let seen = messages
        .iter()
        .filter(|message| {
            message["flags"]
                .as_array()
                .is_some_and(|flags| flags.iter().any(|flag| flag == "\\Seen"))
        })
        .count();
    assert_eq!(seen, 1, "the Status: RO message keeps \\Seen: {}", listing.text());

    let status = run(vec![
        "status".into(),
        "--json".into(),
        "--http".into(),
        address.clone(),
        "--ca-file".into(),
        certificate_path.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(
        text(&status).contains("tls-import"),
        "status names the node: {}",
        text(&status)
    );

    let _ = stop_sender.send(true);
}
