//! The blocking HTTP client of a node's API, for the CLI (`status`, `import`) and the test harness.
//!
//! It was a hand-written HTTP/1.1 client (one request per connection); it is now a thin layer over
//! ureq, a maintained client, so that keep-alive, chunked bodies and header parsing are somebody's
//! tested code. What is left here is what every caller wants the same way: an error status is an
//! answer to look at, not an error; the bearer token; percent-encoded path segments; HTTPS to a
//! node with `tls_cert_file` set, trusting the system's roots or a CA file the operator names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The largest response body read (a raw message can be large).
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there, or the connection was refused or timed out: is the node running?
    #[error("cannot reach {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// The connection broke or the answer was not HTTP.
    #[error("talking to {address}: {reason}")]
    Transport { address: String, reason: String },
    /// The CA file named to trust the node's certificate cannot be used.
    #[error("the CA file {path}: {reason}")]
    Trust { path: PathBuf, reason: String },
}

/// The certificates an HTTPS client trusts: those of a CA file (a self-signed node certificate,
/// or a private CA), else the system's bundle (`SSL_CERT_FILE`, else
/// /etc/ssl/certs/ca-certificates.crt). Plain `http://` addresses never look at it.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
}

impl Trust {
    /// Trusts only the certificates in the PEM file at `path`.
    pub fn from_ca_file(path: &Path) -> Result<Trust, ClientError> {
        let refuse = |reason: String| ClientError::Trust {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read(path).map_err(|error| refuse(error.to_string()))?;
        let certificates = read_certificates(&text).map_err(refuse)?;
        if certificates.is_empty() {
            return Err(refuse("it holds no PEM certificate".to_owned()));
        }
        Ok(Trust {
            roots: Some(Arc::new(certificates)),
        })
    }

    fn roots(&self) -> ureq::tls::RootCerts {
        static SYSTEM: std::sync::OnceLock<Arc<Vec<ureq::tls::Certificate<'static>>>> = std::sync::OnceLock::new();
        let roots = self.roots.clone().unwrap_or_else(|| {
            SYSTEM
                .get_or_init(|| {
                    let path = std::env::var_os("SSL_CERT_FILE")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
                    let certificates = std::fs::read(path)
                        .ok()
                        .and_then(|text| read_certificates(&text).ok())
                        .unwrap_or_default();
                    Arc::new(certificates)
                })
                .clone()
        });
        ureq::tls::RootCerts::Specific(roots)
    }
}

fn read_certificates(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item.map_err(|error| error.to_string())? {
            ureq::tls::PemItem::Certificate(certificate) => certificates.push(certificate),
            _ => continue,
        }
    }
    Ok(certificates)
}

/// The URL of `path` on the node at `address`: `host:port` and `http://host:port` speak plain
/// HTTP, `https://host:port` speaks HTTPS.
pub fn url(address: &str, path: &str) -> String {
    let base = address.trim_end_matches('/');
    if base.starts_with("http://") || base.starts_with("https://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    }
}

/// An answer: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body parsed as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Everything but unreserved characters and '@' is escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// Everything but unreserved characters is escaped in a query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes one path segment ("Archive/2026" becomes "Archive%2F2026").
pub fn encode_segment(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// Percent-encodes one query value.
pub fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// An agent with the settings every caller wants: 4xx and 5xx are answers, a 60 s limit on each
/// read (a stalled node), no redirects. An agent keeps its connections alive between requests;
/// give each thread that sends concurrently an agent of its own. HTTPS trusts the system's roots.
pub fn agent() -> ureq::Agent {
    agent_trusting(&Trust::default())
}

/// An agent like [`agent`] whose HTTPS trusts `trust` (TLS by rustls on ring, the provider the
/// node's own TLS uses).
pub fn agent_trusting(trust: &Trust) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .root_certs(trust.roots())
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// Sends one request to `address` (see [`url`]) with the operator's bearer token, if any, and
/// reads the whole answer.
pub fn request(
    agent: &ureq::Agent,
    address: &str,
    method: &str,
    path: &str,
    body: &[u8],
    bearer: Option<&str>,
) -> Result<Response, ClientError> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    request_with_authorization(agent, address, method, path, body, authorization.as_deref())
}

/// The same with any `Authorization` header value (`Basic …` for an account's login).
pub fn request_with_authorization(
    agent: &ureq::Agent,
    address: &str,
    method: &str,
    path: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> Result<Response, ClientError> {
    let uri = url(address, path);
    let mut builder = ureq::http::Request::builder().method(method).uri(&uri);
    if let Some(authorization) = authorization {
        builder = builder.header("Authorization", authorization);
    }
    let transport = |reason: String| ClientError::Transport {
        address: address.to_owned(),
        reason,
    };
    let result = if body.is_empty() && matches!(method, "GET" | "HEAD" | "DELETE") {
        let request = builder.body(()).map_err(|error| transport(error.to_string()))?;
        agent.run(request)
    } else {
        let request = builder
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .map_err(|error| transport(error.to_string()))?;
        agent.run(request)
    };
    let mut answer = result.map_err(|error| classify(address, error))?;
    let status = answer.status().as_u16();
    let body = answer
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BYTES)
        .read_to_vec()
        .map_err(|error| classify(address, error))?;
    Ok(Response { status, body })
}

fn classify(address: &str, error: ureq::Error) -> ClientError {
    let unreachable = match &error {
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
        ),
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        _ => false,
    };
    if unreachable {
        ClientError::Unreachable {
            address: address.to_owned(),
            reason: error.to_string(),
        }
    } else {
        ClientError::Transport {
            address: address.to_owned(),
            reason: error.to_string(),
        }
    }
}

/// The sum of every sample of a metric (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_segments_and_query_values() {
        assert_eq!(encode_segment("Archive/2026"), "Archive%2F2026");
        assert_eq!(encode_segment("bob@example.org"), "bob@example.org");
        assert_eq!(encode_segment("Entwürfe"), "Entw%C3%BCrfe");
        assert_eq!(encode_query_value("\\Seen"), "%5CSeen");
        assert_eq!(encode_query_value("$label"), "%24label");
    }

    #[test]
    fn an_address_with_a_scheme_keeps_it_and_one_without_speaks_plain_http() {
        assert_eq!(url("127.0.0.1:4800", "/v1/status"), "http://127.0.0.1:4800/v1/status");
        assert_eq!(
            url("https://mail.example:4800/", "/v1/status"),
            "https://mail.example:4800/v1/status"
        );
        assert_eq!(url("http://[::1]:4800", "/x"), "http://[::1]:4800/x");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = Trust::from_ca_file(&path).unwrap_err();
        assert!(error.to_string().contains("empty.pem"), "{error}");
        assert!(error.to_string().contains("no PEM certificate"), "{error}");
        let missing = Trust::from_ca_file(&directory.path().join("missing.pem")).unwrap_err();
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
    }

    #[test]
    fn sums_a_metric_over_its_label_sets() {
        let text = "# HELP x\nmailmesh_a_total{kind=\"x\"} 2\nmailmesh_a_total{kind=\"y\"} 3\nmailmesh_ab 7\n";
        assert_eq!(metric_sum(text, "mailmesh_a_total"), 5.0);
    }
}
