//! `mailmesh import`: reads an mbox file or a Maildir folder and appends each message to a
//! running node over HTTP, skipping messages whose bytes the mailbox already holds, so running it
//! twice adds nothing the second time.

use std::io::{BufReader, Write};
use std::path::Path;

use crate::http_client::{self, encode_segment};

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {reason}")]
    Source { path: String, reason: String },
    #[error("{0}")]
    Http(#[from] http_client::HttpError),
    #[error("the node refused the mailbox: {0}")]
    Refused(String),
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub read: u64,
    pub imported: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub bytes: u64,
}

/// Reads every message of an mbox file or Maildir folder (with `cur` and `new`).
pub fn read_messages(path: &Path) -> Result<Vec<Vec<u8>>, ImportError> {
    let error = |reason: String| ImportError::Source {
        path: path.display().to_string(),
        reason,
    };
    let mut messages = Vec::new();
    if path.is_dir() {
        let iterator = mail_parser::mailbox::maildir::MessageIterator::new(path).map_err(|e| error(e.to_string()))?;
        for message in iterator {
            messages.push(message.map_err(|e| error(e.to_string()))?.unwrap_contents());
        }
    } else {
        let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
        for message in mail_parser::mailbox::mbox::MessageIterator::new(BufReader::new(file)) {
            messages.push(message.map_err(|e| error(e.to_string()))?.unwrap_contents());
        }
    }
    Ok(messages)
}

fn progress(done: u64, total: u64) {
    let width = 30;
    let filled = if total == 0 {
        width
    } else {
        (done * width as u64 / total) as usize
    };
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "\r[{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = stderr.flush();
}

/// Imports messages into `account`/`mailbox` on the node at `http` (host:port).
pub fn import(
    http: &str,
    account: &str,
    mailbox: &str,
    path: &Path,
    show_progress: bool,
) -> Result<ImportSummary, ImportError> {
    let messages = read_messages(path)?;
    let target = format!(
        "/v1/mailboxes/{}/{}/messages?skip_duplicate=true",
        encode_segment(account),
        encode_segment(mailbox)
    );
    let mut summary = ImportSummary {
        read: messages.len() as u64,
        ..ImportSummary::default()
    };
    for (index, raw) in messages.iter().enumerate() {
        if raw.is_empty() {
            summary.failed += 1;
            continue;
        }
        let response = http_client::request(http, "POST", &target, raw, None)?;
        match response.status {
            201 => {
                summary.imported += 1;
                summary.bytes += raw.len() as u64;
            }
            200 => summary.duplicates += 1,
            400 if index == 0 => {
                return Err(ImportError::Refused(
                    String::from_utf8_lossy(&response.body).into_owned(),
                ));
            }
            _ => summary.failed += 1,
        }
        if show_progress && (index % 25 == 0 || index + 1 == messages.len()) {
            progress(index as u64 + 1, messages.len() as u64);
        }
    }
    if show_progress {
        eprintln!();
    }
    Ok(summary)
}
