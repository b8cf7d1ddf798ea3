//! The blocking HTTP client of a node's API, for the CLI (`status`, `import`) and the test harness.
//!
//! It was a hand-written HTTP/1.1 client (one request per connection); it is now a thin layer over
//! ureq, a maintained client, so that keep-alive, chunked bodies and header parsing are somebody's
//! tested code. What is left here is what every caller wants the same way: an error status is an
//! answer to look at, not an error; the bearer token; percent-encoded path segments.

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
/// give each thread that sends concurrently an agent of its own.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// Sends one request to `address` (host:port) and reads the whole answer.
pub fn request(
    agent: &ureq::Agent,
    address: &str,
    method: &str,
    path: &str,
    body: &[u8],
    bearer: Option<&str>,
) -> Result<Response, ClientError> {
    let uri = format!("http://{address}{path}");
    let mut builder = ureq::http::Request::builder().method(method).uri(&uri);
    if let Some(token) = bearer {
        builder = builder.header("Authorization", format!("Bearer {token}"));
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
    fn sums_a_metric_over_its_label_sets() {
        let text = "# HELP x\nmailmesh_a_total{kind=\"x\"} 2\nmailmesh_a_total{kind=\"y\"} 3\nmailmesh_ab 7\n";
        assert_eq!(metric_sum(text, "mailmesh_a_total"), 5.0);
    }
}
