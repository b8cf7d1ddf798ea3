//! A minimal blocking HTTP/1.1 client for the CLI (status, demo) and the tests.
//!
//! It speaks just enough HTTP to talk to a mailmesh node: one request per connection,
//! `Content-Length` or chunked bodies. Keeping it here avoids a second HTTP stack in the binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("io error talking to {address}: {source}")]
    Io { address: String, source: std::io::Error },
    #[error("malformed response from {address}: {reason}")]
    Malformed { address: String, reason: String },
}

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body parsed as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Percent-encodes one path segment (everything but unreserved characters and '@').
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Sends one request to `address` (host:port) and reads the whole response.
pub fn request(
    address: &str,
    method: &str,
    path: &str,
    body: &[u8],
    bearer: Option<&str>,
) -> Result<HttpResponse, HttpError> {
    let io = |source| HttpError::Io {
        address: address.to_owned(),
        source,
    };
    let malformed = |reason: &str| HttpError::Malformed {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let mut stream = TcpStream::connect(address).map_err(|source| HttpError::Connect {
        address: address.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(io)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() && method != "GET" {
        head.push_str("Content-Type: application/octet-stream\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).map_err(io)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| malformed("no status line"))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            if name == "content-length" {
                content_length = value.parse().ok();
            } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).map_err(io)?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| malformed("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size.min(64 * 1024 * 1024)];
            reader.read_exact(&mut chunk).map_err(io)?;
            body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).map_err(io)?;
        }
    } else if let Some(length) = content_length {
        body.resize(length.min(512 * 1024 * 1024), 0);
        reader.read_exact(&mut body).map_err(io)?;
    } else {
        reader.read_to_end(&mut body).map_err(io)?;
    }
    Ok(HttpResponse { status, body })
}

/// The sum of every sample of a metric (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
