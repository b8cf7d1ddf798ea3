//! `mailmesh import`: moves a Maildir++ tree, a Maildir, an mbox file or a directory of mbox
//! files into a running node over its HTTP API, keeping each message's bytes, flags and received
//! date, as an operator leaving Dovecot or Cyrus expects.
//!
//! It streams: one message at a time is read from the source, a bounded queue (in messages and in
//! bytes) feeds a few sending threads, each with a keep-alive connection of its own, so memory
//! stays flat whatever the size of the source and several appends are in flight at once.
//!
//! It resumes: every append asks the node to skip a message whose bytes the mailbox already holds
//! (`skip_duplicate=true`), so after an interruption a re-run adds only what is missing. Flags and
//! dates travel beside the bytes (query parameters), never inside them; mbox metadata headers
//! (`Status`, `X-Status`, `X-Keywords`, ...) are taken out of the stored message, as Dovecot hides
//! them, so a message read or flagged in the source between two runs is still the same message.
//!
//! The decoders here (Maildir file names, `dovecot-keywords`, mbox metadata headers, Maildir++
//! folder names) are pure functions over bytes and strings; the IO is in [`import`].

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::api_client::{self, encode_query_value, encode_segment, ClientError};
use crate::model::{Flag, MailboxKey};

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source could not be read (missing, unreadable, not mail).
    #[error("cannot read {path}: {reason}")]
    Source { path: String, reason: String },
    /// A folder's name does not make a valid mailbox name; rename the folder or choose --mailbox.
    #[error("the folder {path} would be the mailbox {mailbox:?}, which is not a valid name: {reason}")]
    MailboxName {
        path: String,
        mailbox: String,
        reason: String,
    },
    /// The node could not be reached, even after retries; the import can be run again.
    #[error("{0}; nothing after the messages already counted was imported: run the same command again to resume")]
    Unreachable(#[from] ClientError),
    /// The node refused every append (credentials, or a node without this API); nothing more was sent.
    #[error("the node refused the import ({status}): {reason}")]
    Refused { status: u16, reason: String },
}

/// Where the received date of a Maildir message comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaildirDate {
    /// The leading unix seconds of the file name (the delivery time), else the file's mtime.
    #[default]
    FileName,
    /// The file's mtime (Dovecot sets it to the received date), else the file name.
    ModificationTime,
}

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The node's HTTP address: host:port, or https://host:port for a node with TLS.
    pub http: String,
    /// The certificates HTTPS trusts (the system's unless a CA file is named).
    pub trust: api_client::Trust,
    pub account: String,
    /// The mailbox of an mbox file or of a Maildir's root (INBOX); sub-folders keep their names.
    pub mailbox: String,
    /// The bearer token, when the node requires one.
    pub token: Option<String>,
    /// Appends in flight at once.
    pub workers: usize,
    /// At most this many bytes of read messages wait in memory (a bigger message still goes alone).
    pub queue_bytes: usize,
    pub show_progress: bool,
    pub maildir_date: MaildirDate,
    /// Set (by a Ctrl-C handler) to stop: nothing more is read, the appends in flight finish, so
    /// that no append of this run can land after a re-run has looked for it.
    pub interrupt: Arc<AtomicBool>,
}

impl ImportOptions {
    /// Defaults for a node at `http`: INBOX, 16 appends in flight (faster than 8 on a loaded
    /// 2-core machine in import_bench: 1,678 against 1,400 messages/s), 64 MiB of queued messages.
    pub fn new(http: &str, account: &str) -> ImportOptions {
        ImportOptions {
            http: http.to_owned(),
            trust: api_client::Trust::default(),
            account: account.to_owned(),
            mailbox: "INBOX".to_owned(),
            token: None,
            workers: 16,
            queue_bytes: 64 << 20,
            show_progress: false,
            maildir_date: MaildirDate::default(),
            interrupt: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What kind of folder a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Mbox,
    Maildir,
}

/// One folder of the source and the mailbox it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub mailbox: String,
    pub kind: SourceKind,
    pub path: PathBuf,
}

/// What happened to one mailbox's messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailboxSummary {
    pub mailbox: String,
    pub read: u64,
    pub imported: u64,
    pub duplicates: u64,
    pub failed: u64,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub read: u64,
    pub imported: u64,
    pub duplicates: u64,
    pub failed: u64,
    /// Read but not sent because the import was interrupted; a re-run sends them.
    pub unsent: u64,
    /// Whether the import stopped on `interrupt` before the end of the source.
    pub interrupted: bool,
    /// Bytes of the newly imported messages.
    pub bytes: u64,
    /// Keywords that are not valid IMAP keywords (or hold a comma), left off their messages.
    pub keywords_dropped: u64,
    pub mailboxes: Vec<MailboxSummary>,
    /// The first few failures, each naming the message.
    pub failures: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Decoders (pure)
// ---------------------------------------------------------------------------------------------

/// The flags and received date a Maildir file name carries (`1733000000.M1P2.host,S=12:2,FSa`).
/// Lowercase letters are keywords, looked up in the folder's `dovecot-keywords`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaildirName {
    pub flags: Vec<Flag>,
    /// Keyword letters with no line in `dovecot-keywords`.
    pub unknown_letters: Vec<char>,
    /// The leading unix seconds of the name, when it has them.
    pub delivered_seconds: Option<u64>,
}

/// Reads a Maildir file name: the `:2,` info after the last ':' and the leading unix seconds.
pub fn parse_maildir_name(name: &str, keywords: &[Option<String>]) -> MaildirName {
    let mut parsed = MaildirName::default();
    let digits: &str = &name[..name.bytes().take_while(u8::is_ascii_digit).count()];
    if (1..=12).contains(&digits.len()) && name[digits.len()..].starts_with('.') {
        parsed.delivered_seconds = digits.parse().ok();
    }
    let info = match name.rsplit_once(':') {
        Some((_, info)) => info,
        None => return parsed,
    };
    let letters = match info.strip_prefix("2,") {
        Some(letters) => letters,
        None => return parsed,
    };
    for letter in letters.chars() {
        let flag = match letter {
            'S' => Some(Flag::Seen),
            'R' => Some(Flag::Answered),
            'F' => Some(Flag::Flagged),
            'T' => Some(Flag::Deleted),
            'D' => Some(Flag::Draft),
            'a'..='z' => {
                let index = letter as usize - 'a' as usize;
                match keywords.get(index).and_then(Option::as_ref) {
                    // A comma cannot travel in the comma-separated flags parameter.
                    Some(keyword) => keyword.parse::<Flag>().ok().filter(|_| !keyword.contains(',')),
                    None => {
                        parsed.unknown_letters.push(letter);
                        None
                    }
                }
            }
            // 'P' (passed: resent or bounced) has no IMAP flag; others are not defined.
            _ => None,
        };
        if let Some(flag) = flag {
            if !parsed.flags.contains(&flag) {
                parsed.flags.push(flag);
            }
        }
    }
    parsed
}

/// Reads a `dovecot-keywords` file: lines `N keyword`, N from 0 to 25 standing for the letters
/// a to z. Lines that do not fit are ignored.
pub fn parse_dovecot_keywords(text: &str) -> Vec<Option<String>> {
    let mut keywords = vec![None; 26];
    for line in text.lines() {
        let Some((index, keyword)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        let (Ok(index), keyword) = (index.parse::<usize>(), keyword.trim()) else {
            continue;
        };
        if index < 26 && !keyword.is_empty() {
            keywords[index] = Some(keyword.to_owned());
        }
    }
    keywords
}

/// The flags an mbox message's metadata headers carry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MboxMetadata {
    pub flags: Vec<Flag>,
    /// Keywords in `X-Keywords` or `X-Mozilla-Keys` that cannot be IMAP keywords.
    pub keywords_dropped: u64,
}

/// Headers that mbox readers and writers keep their state in, not part of the message:
/// the ones Dovecot hides, and Thunderbird's.
const MBOX_METADATA_HEADERS: [&str; 9] = [
    "status",
    "x-status",
    "x-keywords",
    "x-uid",
    "x-imap",
    "x-imapbase",
    "x-mozilla-status",
    "x-mozilla-status2",
    "x-mozilla-keys",
];

/// Takes the mbox metadata headers out of a message's header block and reads its flags from them:
/// `Status` (R: \Seen; O, old, is no flag), `X-Status` (A: \Answered, F: \Flagged, T: \Draft,
/// D: \Deleted), `X-Keywords`, and Thunderbird's `X-Mozilla-Status` and `X-Mozilla-Keys`.
/// Returns the message without them (the same bytes when it had none).
pub fn take_mbox_metadata(message: Vec<u8>) -> (Vec<u8>, MboxMetadata) {
    let mut metadata = MboxMetadata::default();
    let mut removed: Vec<(usize, usize)> = Vec::new();
    let mut position = 0;
    // Each header field: its first line, then continuation lines starting with a space or tab.
    while position < message.len() {
        let line_end = next_line(&message, position);
        let line = &message[position..line_end];
        if line == b"\n" || line == b"\r\n" {
            break;
        }
        let mut field_end = line_end;
        while field_end < message.len() && matches!(message[field_end], b' ' | b'\t') {
            field_end = next_line(&message, field_end);
        }
        let field = &message[position..field_end];
        match field.iter().position(|&byte| byte == b':') {
            Some(colon) => {
                let name = String::from_utf8_lossy(&field[..colon]).trim().to_ascii_lowercase();
                if MBOX_METADATA_HEADERS.contains(&name.as_str()) {
                    let value = String::from_utf8_lossy(&field[colon + 1..]).into_owned();
                    read_metadata_header(&name, &value, &mut metadata);
                    removed.push((position, field_end));
                }
            }
            // Not a header line: the header block is over (a message without one).
            None => break,
        }
        position = field_end;
    }
    if removed.is_empty() {
        return (message, metadata);
    }
    let mut kept = Vec::with_capacity(message.len());
    let mut from = 0;
    for (start, end) in removed {
        kept.extend_from_slice(&message[from..start]);
        from = end;
    }
    kept.extend_from_slice(&message[from..]);
    (kept, metadata)
}

fn next_line(bytes: &[u8], from: usize) -> usize {
    match bytes[from..].iter().position(|&byte| byte == b'\n') {
        Some(offset) => from + offset + 1,
        None => bytes.len(),
    }
}

fn read_metadata_header(name: &str, value: &str, metadata: &mut MboxMetadata) {
    let mut add = |flag: Flag| {
        if !metadata.flags.contains(&flag) {
            metadata.flags.push(flag);
        }
    };
    match name {
        "status" => {
            if value.contains('R') {
                add(Flag::Seen);
            }
        }
        "x-status" => {
            for letter in value.chars() {
                match letter {
                    'A' => add(Flag::Answered),
                    'F' => add(Flag::Flagged),
                    'T' => add(Flag::Draft),
                    'D' => add(Flag::Deleted),
                    _ => {}
                }
            }
        }
        "x-mozilla-status" => {
            if let Ok(bits) = u32::from_str_radix(value.trim().trim_start_matches("0x"), 16) {
                for (bit, flag) in [
                    (0x1, Flag::Seen),
                    (0x2, Flag::Answered),
                    (0x4, Flag::Flagged),
                    (0x8, Flag::Deleted),
                ] {
                    if bits & bit != 0 {
                        add(flag);
                    }
                }
            }
        }
        "x-keywords" | "x-mozilla-keys" => {
            for word in value.split(|character: char| character.is_whitespace() || character == ',') {
                if word.is_empty() {
                    continue;
                }
                match word.parse::<Flag>() {
                    Ok(flag) => add(flag),
                    Err(_) => metadata.keywords_dropped += 1,
                }
            }
        }
        _ => {}
    }
}

/// The mbox separator: mbox writers end each message with an empty line before the next `From `
/// line; it is not part of the message.
pub fn strip_mbox_separator(mut message: Vec<u8>) -> Vec<u8> {
    let ending = if message.ends_with(b"\r\n") {
        2
    } else if message.ends_with(b"\n") {
        1
    } else {
        return message;
    };
    let before = &message[..message.len() - ending];
    if before.is_empty() || before.ends_with(b"\n") {
        message.truncate(message.len() - ending);
    }
    message
}

/// The mailbox a Maildir++ folder stands for: `.Archive.2026` is `Archive/2026`, with Dovecot's
/// modified UTF-7 (RFC 3501 section 5.1.3) decoded.
pub fn maildir_plus_plus_mailbox(folder: &str) -> String {
    let name = folder.strip_prefix('.').unwrap_or(folder);
    name.split('.').map(decode_modified_utf7).collect::<Vec<_>>().join("/")
}

/// Decodes IMAP's modified UTF-7 (`Entw&APw-rfe` is `Entwürfe`); text that is not valid
/// modified UTF-7 is kept as it is.
pub fn decode_modified_utf7(text: &str) -> String {
    use base64::Engine;
    if !text.contains('&') {
        return text.to_owned();
    }
    let alphabet =
        match base64::alphabet::Alphabet::new("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,") {
            Ok(alphabet) => alphabet,
            Err(_) => return text.to_owned(),
        };
    let engine = base64::engine::GeneralPurpose::new(
        &alphabet,
        base64::engine::GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('-') else {
            return text.to_owned();
        };
        let encoded = &after[..end];
        if encoded.is_empty() {
            out.push('&');
        } else {
            let Ok(bytes) = engine.decode(encoded) else {
                return text.to_owned();
            };
            if bytes.len() % 2 != 0 {
                return text.to_owned();
            }
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            match String::from_utf16(&units) {
                Ok(decoded) => out.push_str(&decoded),
                Err(_) => return text.to_owned(),
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The mailbox an mbox file in a directory of them stands for, from its path below that
/// directory: `inbox` is INBOX, `Archive/2026` stays, Thunderbird's `Archive.sbd/2026` is
/// `Archive/2026`.
pub fn mbox_file_mailbox(relative: &Path) -> String {
    let parts: Vec<String> = relative
        .components()
        .map(|component| {
            let part = component.as_os_str().to_string_lossy();
            decode_modified_utf7(part.strip_suffix(".sbd").unwrap_or(&part))
        })
        .collect();
    let name = parts.join("/");
    if name.eq_ignore_ascii_case("inbox") {
        "INBOX".to_owned()
    } else {
        name
    }
}

// ---------------------------------------------------------------------------------------------
// Finding the folders
// ---------------------------------------------------------------------------------------------

fn source_error(path: &Path, reason: impl ToString) -> ImportError {
    ImportError::Source {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn is_maildir(path: &Path) -> bool {
    path.join("cur").is_dir() || path.join("new").is_dir()
}

/// The folders under `path` and their mailboxes: an mbox file or a Maildir goes to `root_mailbox`;
/// a Maildir's `.Sub.Folder` directories (Maildir++) go to `Sub/Folder`; a directory of mbox files
/// gives one mailbox per file that starts with a `From ` line.
pub fn discover(path: &Path, account: &str, root_mailbox: &str) -> Result<Vec<Source>, ImportError> {
    let metadata = std::fs::metadata(path).map_err(|error| source_error(path, error))?;
    let mut sources = Vec::new();
    if metadata.is_file() {
        sources.push(Source {
            mailbox: root_mailbox.to_owned(),
            kind: SourceKind::Mbox,
            path: path.to_owned(),
        });
    } else if is_maildir(path) {
        sources.push(Source {
            mailbox: root_mailbox.to_owned(),
            kind: SourceKind::Maildir,
            path: path.to_owned(),
        });
        let mut folders = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|error| source_error(path, error))? {
            let entry = entry.map_err(|error| source_error(path, error))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() > 1 && name.starts_with('.') && name != ".." && is_maildir(&entry.path()) {
                folders.push((maildir_plus_plus_mailbox(&name), entry.path()));
            }
        }
        folders.sort();
        for (mailbox, path) in folders {
            sources.push(Source {
                mailbox,
                kind: SourceKind::Maildir,
                path,
            });
        }
    } else {
        let mut files = Vec::new();
        find_mbox_files(path, path, &mut files)?;
        files.sort();
        for (mailbox, path) in files {
            sources.push(Source {
                mailbox,
                kind: SourceKind::Mbox,
                path,
            });
        }
        if sources.is_empty() {
            return Err(source_error(
                path,
                "neither an mbox file, nor a Maildir (no cur/ or new/), nor a directory holding mbox files",
            ));
        }
    }
    for source in &sources {
        if let Err(error) = MailboxKey::new(account, &source.mailbox) {
            return Err(ImportError::MailboxName {
                path: source.path.display().to_string(),
                mailbox: source.mailbox.clone(),
                reason: error.to_string(),
            });
        }
    }
    Ok(sources)
}

fn find_mbox_files(root: &Path, directory: &Path, found: &mut Vec<(String, PathBuf)>) -> Result<(), ImportError> {
    for entry in std::fs::read_dir(directory).map_err(|error| source_error(directory, error))? {
        let entry = entry.map_err(|error| source_error(directory, error))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".msf") || name.ends_with(".lock") {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|error| source_error(&path, error))?;
        if kind.is_dir() {
            find_mbox_files(root, &path, found)?;
        } else if kind.is_file() && starts_with_from_line(&path) {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            found.push((mbox_file_mailbox(relative), path));
        }
    }
    Ok(())
}

fn starts_with_from_line(path: &Path) -> bool {
    let mut head = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut head))
        .map(|()| &head == b"From ")
        .unwrap_or(false)
}

/// The bytes the sources hold, for the progress bar.
fn total_bytes(sources: &[Source]) -> u64 {
    sources
        .iter()
        .map(|source| match source.kind {
            SourceKind::Mbox => std::fs::metadata(&source.path).map(|m| m.len()).unwrap_or(0),
            SourceKind::Maildir => ["cur", "new"]
                .iter()
                .filter_map(|sub| std::fs::read_dir(source.path.join(sub)).ok())
                .flatten()
                .filter_map(|entry| entry.ok()?.metadata().ok())
                .filter(|metadata| metadata.is_file())
                .map(|metadata| metadata.len())
                .sum(),
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Reading and sending
// ---------------------------------------------------------------------------------------------

/// One message on its way to the node.
struct Job {
    source: usize,
    raw: Vec<u8>,
    flags: Vec<Flag>,
    received_millis: Option<u64>,
    /// How far the progress bar moves when it is done.
    source_bytes: u64,
    /// Names the message in failures: a file, or an mbox and its message number.
    origin: String,
}

/// Caps the bytes of messages read but not yet sent. A message larger than the whole budget is
/// let through once nothing else is waiting, so it cannot wait forever.
struct ByteBudget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

impl ByteBudget {
    fn take(&self, bytes: usize, stop: &AtomicBool) {
        let mut used = self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while *used > 0 && *used + bytes > self.limit && !stop.load(Ordering::Relaxed) {
            used = self
                .freed
                .wait_timeout(used, Duration::from_millis(100))
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        *used += bytes;
    }

    fn give_back(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *used = used.saturating_sub(bytes);
        self.freed.notify_all();
    }
}

/// The messages being appended right now, by content. The node's duplicate check and its append
/// are two steps, so two appends of the same bytes at once could both be stored; a message waits
/// while the same bytes are in flight, and is then skipped by the node as present.
#[derive(Default)]
struct InFlight {
    hashes: Mutex<std::collections::HashSet<blake3::Hash>>,
    finished: Condvar,
}

impl InFlight {
    fn enter(&self, hash: blake3::Hash) {
        let mut hashes = self.hashes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while hashes.contains(&hash) {
            hashes = self
                .finished
                .wait(hashes)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        hashes.insert(hash);
    }

    fn leave(&self, hash: &blake3::Hash) {
        let mut hashes = self.hashes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        hashes.remove(hash);
        self.finished.notify_all();
    }
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    imported: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
    unsent: AtomicU64,
}

/// What the threads share.
struct Shared {
    options: ImportOptions,
    /// Per source: the append path without its per-message parameters.
    targets: Vec<String>,
    per_source: Vec<Counters>,
    total: Counters,
    bytes: AtomicU64,
    keywords_dropped: AtomicU64,
    failures: Mutex<Vec<String>>,
    fatal: Mutex<Option<ImportError>>,
    stop: AtomicBool,
    budget: ByteBudget,
    in_flight: InFlight,
    bar: indicatif::ProgressBar,
}

impl Shared {
    fn count(&self, source: usize, pick: impl Fn(&Counters) -> &AtomicU64) {
        pick(&self.per_source[source]).fetch_add(1, Ordering::Relaxed);
        pick(&self.total).fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&self, source: usize, reason: String) {
        self.count(source, |counters| &counters.failed);
        let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if failures.len() < 20 {
            failures.push(reason);
        }
    }

    /// A message that was read but cannot be sent.
    fn fail_unread(&self, source: usize, reason: String) {
        self.count(source, |counters| &counters.read);
        self.fail(source, reason);
    }

    fn stop_with(&self, error: ImportError) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        fatal.get_or_insert(error);
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether to stop reading and sending: a fatal error, or an interrupt.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.options.interrupt.load(Ordering::Relaxed)
    }

    fn refresh_message(&self) {
        self.bar.set_message(format!(
            "{} read, {} new, {} already there, {} failed",
            self.total.read.load(Ordering::Relaxed),
            self.total.imported.load(Ordering::Relaxed),
            self.total.duplicates.load(Ordering::Relaxed),
            self.total.failed.load(Ordering::Relaxed),
        ));
    }
}

/// The outcome of one append.
enum Sent {
    New,
    Duplicate,
    Rejected(String),
    /// Not sent: the import is stopping.
    Unsent,
}

/// Statuses worth trying again: the node is busy, restarting, or briefly out of space.
fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504 | 507)
}

const ATTEMPTS: u32 = 6;

fn append_path(target: &str, job: &Job) -> String {
    let mut path = target.to_owned();
    let flags: Vec<String> = job.flags.iter().map(|flag| encode_query_value(flag.as_str())).collect();
    if !flags.is_empty() {
        path.push_str("&flags=");
        path.push_str(&flags.join(","));
    }
    if let Some(millis) = job.received_millis {
        path.push_str(&format!("&received={millis}"));
    }
    path
}

fn send(agent: &ureq::Agent, shared: &Shared, job: &Job) -> Result<Sent, ImportError> {
    let options = &shared.options;
    let path = append_path(&shared.targets[job.source], job);
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        let outcome = api_client::request(agent, &options.http, "POST", &path, &job.raw, options.token.as_deref());
        let retry_reason = match outcome {
            Ok(response) => match response.status {
                201 => return Ok(Sent::New),
                200 => return Ok(Sent::Duplicate),
                401 | 403 | 404 | 405 => {
                    return Err(ImportError::Refused {
                        status: response.status,
                        reason: response.text(),
                    })
                }
                status if is_retryable(status) => {
                    if attempt >= ATTEMPTS && status == 500 {
                        // The node failed on this message, not in general: go on with the rest.
                        return Ok(Sent::Rejected(format!("{status}: {}", response.text().trim())));
                    }
                    if attempt >= ATTEMPTS {
                        return Err(ImportError::Refused {
                            status,
                            reason: format!("{} (after {ATTEMPTS} attempts)", response.text()),
                        });
                    }
                    format!("{status}")
                }
                status => return Ok(Sent::Rejected(format!("{status}: {}", response.text().trim()))),
            },
            Err(error) => {
                if attempt >= ATTEMPTS {
                    return Err(error.into());
                }
                error.to_string()
            }
        };
        tracing::debug!(origin = %job.origin, attempt, reason = %retry_reason, "append failed; trying again");
        if shared.stopping() {
            return Ok(Sent::Unsent);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(5));
        attempt += 1;
    }
}

fn work(shared: &Shared, queue: &Mutex<std::sync::mpsc::Receiver<Job>>) {
    let agent = api_client::agent_trusting(&shared.options.trust);
    loop {
        let job = {
            let receiver = queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match receiver.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let outcome = if shared.stopping() {
            Ok(Sent::Unsent)
        } else {
            let hash = blake3::hash(&job.raw);
            shared.in_flight.enter(hash);
            let outcome = send(&agent, shared, &job);
            shared.in_flight.leave(&hash);
            outcome
        };
        match outcome {
            Ok(Sent::New) => {
                shared.count(job.source, |counters| &counters.imported);
                shared.bytes.fetch_add(job.raw.len() as u64, Ordering::Relaxed);
            }
            Ok(Sent::Duplicate) => shared.count(job.source, |counters| &counters.duplicates),
            Ok(Sent::Rejected(reason)) => shared.fail(job.source, format!("{}: {reason}", job.origin)),
            Ok(Sent::Unsent) => shared.count(job.source, |counters| &counters.unsent),
            Err(error) => shared.stop_with(error),
        }
        shared.budget.give_back(job.raw.len());
        shared.bar.inc(job.source_bytes);
        shared.refresh_message();
    }
}

/// Hands one message to the senders; false once the import has stopped.
fn enqueue(shared: &Shared, sender: &std::sync::mpsc::SyncSender<Job>, job: Job) -> bool {
    if shared.stopping() {
        return false;
    }
    shared.count(job.source, |counters| &counters.read);
    shared.budget.take(job.raw.len(), &shared.stop);
    sender.send(job).is_ok()
}

/// Counts the bytes read through it, for the progress of an mbox.
struct CountingReader<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.count.set(self.count.get() + read as u64);
        Ok(read)
    }
}

fn read_mbox(shared: &Shared, index: usize, source: &Source, sender: &std::sync::mpsc::SyncSender<Job>) {
    let file = match std::fs::File::open(&source.path) {
        Ok(file) => file,
        Err(error) => return shared.fail(index, format!("{}: {error}", source.path.display())),
    };
    let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let counting = CountingReader {
        inner: file,
        count: count.clone(),
    };
    let mut messages = mail_parser::mailbox::mbox::MessageIterator::new(BufReader::with_capacity(256 << 10, counting));
    let mut reported = 0u64;
    let mut number = 0u64;
    loop {
        let message = match messages.next() {
            None => break,
            Some(Err(error)) => {
                shared.fail(
                    index,
                    format!("{} after message {number}: {error}", source.path.display()),
                );
                break;
            }
            Some(Ok(message)) => message,
        };
        number += 1;
        let received_seconds = message.internal_date();
        let (raw, metadata) = take_mbox_metadata(strip_mbox_separator(message.unwrap_contents()));
        shared
            .keywords_dropped
            .fetch_add(metadata.keywords_dropped, Ordering::Relaxed);
        let position = count.get();
        let job = Job {
            source: index,
            raw,
            flags: metadata.flags,
            received_millis: (received_seconds > 0).then(|| received_seconds * 1000),
            source_bytes: position - reported,
            origin: format!("{} message {number}", source.path.display()),
        };
        reported = position;
        if job.raw.is_empty() {
            shared.fail_unread(index, format!("{}: empty", job.origin));
            continue;
        }
        if !enqueue(shared, sender, job) {
            return;
        }
    }
}

/// A Maildir file's metadata and bytes; None when it is not a file or is gone.
fn read_message_file(path: &Path) -> std::io::Result<Option<(std::fs::Metadata, Vec<u8>)>> {
    let gone = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::NotFound => Ok(None),
        _ => Err(error),
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) => return gone(error),
    };
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Ok(None);
    }
    let mut raw = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0).min(64 << 20));
    file.read_to_end(&mut raw)?;
    Ok(Some((metadata, raw)))
}

fn modification_millis(metadata: &std::fs::Metadata) -> Option<u64> {
    let modified = metadata.modified().ok()?;
    let millis = modified.duration_since(UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(millis).ok().filter(|&millis| millis > 0)
}

fn read_maildir(shared: &Shared, index: usize, source: &Source, sender: &std::sync::mpsc::SyncSender<Job>) {
    let keywords = std::fs::read_to_string(source.path.join("dovecot-keywords"))
        .map(|text| parse_dovecot_keywords(&text))
        .unwrap_or_default();
    let mut unknown_letters_reported = false;
    for sub in ["new", "cur"] {
        let directory = source.path.join(sub);
        let entries = match std::fs::read_dir(&directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return shared.fail(index, format!("{}: {error}", directory.display())),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => return shared.fail(index, format!("{}: {error}", directory.display())),
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let (metadata, raw) = match read_message_file(&path) {
                Ok(Some(read)) => read,
                // Moved from new/ to cur/ or expunged by a client while we read: a re-run finds it.
                Ok(None) => continue,
                Err(error) => {
                    shared.fail_unread(index, format!("{}: {error}", path.display()));
                    continue;
                }
            };
            let parsed = parse_maildir_name(&name, &keywords);
            if !parsed.unknown_letters.is_empty() && !unknown_letters_reported {
                unknown_letters_reported = true;
                tracing::warn!(
                    folder = %source.path.display(),
                    letters = ?parsed.unknown_letters,
                    "keyword letters with no line in dovecot-keywords are left off"
                );
            }
            let from_name = parsed
                .delivered_seconds
                .filter(|&s| s > 0)
                .map(|seconds| seconds * 1000);
            let from_mtime = modification_millis(&metadata);
            let received_millis = match shared.options.maildir_date {
                MaildirDate::FileName => from_name.or(from_mtime),
                MaildirDate::ModificationTime => from_mtime.or(from_name),
            };
            let job = Job {
                source: index,
                source_bytes: raw.len() as u64,
                raw,
                flags: parsed.flags,
                received_millis,
                origin: path.display().to_string(),
            };
            if job.raw.is_empty() {
                shared.fail_unread(index, format!("{}: empty file", job.origin));
                continue;
            }
            if !enqueue(shared, sender, job) {
                return;
            }
        }
    }
}

fn progress_bar(total: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)\n{prefix} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Imports every folder under `path` (see [`discover`]) into `options.account` on the node.
pub fn import(options: &ImportOptions, path: &Path) -> Result<ImportSummary, ImportError> {
    let sources = discover(path, &options.account, &options.mailbox)?;
    import_sources(options, &sources)
}

/// The special-use role (RFC 6154, RFC 8621) a folder's last level names, as Dovecot's
/// default namespace and the common clients (Thunderbird, Outlook, Apple Mail) name them.
pub fn role_of_folder(mailbox: &str) -> Option<&'static str> {
    let last = mailbox.rsplit('/').next().unwrap_or(mailbox).to_lowercase();
    match last.as_str() {
        "sent" | "sent items" | "sent messages" | "sent mail" => Some("sent"),
        "drafts" | "draft" => Some("drafts"),
        "trash" | "deleted items" | "deleted messages" | "bin" => Some("trash"),
        "junk" | "spam" | "junk e-mail" | "junk email" => Some("junk"),
        "archive" | "archives" => Some("archive"),
        _ => None,
    }
}

/// Gives each folder that names a role (see [`role_of_folder`]) that role, unless a mailbox of
/// the account holds it already: the mailbox is created with the role, or the role is set on the
/// existing mailbox. A role the node refuses is logged and the import goes on.
fn assign_roles(options: &ImportOptions, sources: &[Source]) -> Result<(), ImportError> {
    let agent = api_client::agent_trusting(&options.trust);
    let base = format!("/v1/accounts/{}/mailboxes", encode_segment(&options.account));
    let token = options.token.as_deref();
    let listed = api_client::request(&agent, &options.http, "GET", &base, &[], token)?;
    if listed.status != 200 {
        return Err(ImportError::Refused {
            status: listed.status,
            reason: listed.text(),
        });
    }
    let existing = listed.json()["mailboxes"].as_array().cloned().unwrap_or_default();
    let mut held: Vec<String> = existing
        .iter()
        .filter_map(|mailbox| mailbox["role"].as_str().map(str::to_owned))
        .collect();
    for source in sources {
        let Some(role) = role_of_folder(&source.mailbox) else {
            continue;
        };
        if held.iter().any(|taken| taken == role) {
            continue;
        }
        let present = existing
            .iter()
            .find(|mailbox| mailbox["mailbox"].as_str() == Some(source.mailbox.as_str()));
        let response = match present {
            Some(mailbox) if mailbox["role"].is_string() => continue,
            Some(_) => {
                let path = format!("{base}/{}", encode_segment(&source.mailbox));
                let body = serde_json::json!({ "role": role }).to_string();
                api_client::request(&agent, &options.http, "PATCH", &path, body.as_bytes(), token)?
            }
            None => {
                let body = serde_json::json!({ "name": source.mailbox, "role": role }).to_string();
                api_client::request(&agent, &options.http, "POST", &base, body.as_bytes(), token)?
            }
        };
        if matches!(response.status, 200 | 201) {
            held.push(role.to_owned());
        } else {
            tracing::warn!(mailbox = %source.mailbox, role, status = response.status, "the node did not take the role: {}", response.text().trim());
        }
    }
    Ok(())
}

/// Imports the given folders.
pub fn import_sources(options: &ImportOptions, sources: &[Source]) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    assign_roles(options, sources)?;
    let workers = options.workers.max(1);
    let targets = sources
        .iter()
        .map(|source| {
            format!(
                "/v1/mailboxes/{}/{}/messages?skip_duplicate=true",
                encode_segment(&options.account),
                encode_segment(&source.mailbox)
            )
        })
        .collect();
    let shared = Shared {
        options: options.clone(),
        targets,
        per_source: sources.iter().map(|_| Counters::default()).collect(),
        total: Counters::default(),
        bytes: AtomicU64::new(0),
        keywords_dropped: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        fatal: Mutex::new(None),
        stop: AtomicBool::new(false),
        budget: ByteBudget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            limit: options.queue_bytes.max(1),
        },
        in_flight: InFlight::default(),
        bar: progress_bar(total_bytes(sources), options.show_progress),
    };
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Job>(workers * 4);
    let queue = Mutex::new(receiver);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| work(&shared, &queue));
        }
        for (index, source) in sources.iter().enumerate() {
            if shared.stopping() {
                break;
            }
            shared.bar.set_prefix(source.mailbox.clone());
            match source.kind {
                SourceKind::Mbox => read_mbox(&shared, index, source, &sender),
                SourceKind::Maildir => read_maildir(&shared, index, source, &sender),
            }
        }
        drop(sender);
    });
    shared.bar.finish_and_clear();
    if let Some(error) = shared
        .fatal
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
    {
        return Err(error);
    }
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let summary = ImportSummary {
        read: load(&shared.total.read),
        imported: load(&shared.total.imported),
        duplicates: load(&shared.total.duplicates),
        failed: load(&shared.total.failed),
        unsent: load(&shared.total.unsent),
        interrupted: shared.options.interrupt.load(Ordering::Relaxed),
        bytes: load(&shared.bytes),
        keywords_dropped: load(&shared.keywords_dropped),
        mailboxes: sources
            .iter()
            .zip(&shared.per_source)
            .map(|(source, counters)| MailboxSummary {
                mailbox: source.mailbox.clone(),
                read: load(&counters.read),
                imported: load(&counters.imported),
                duplicates: load(&counters.duplicates),
                failed: load(&counters.failed),
            })
            .collect(),
        failures: shared
            .failures
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    };
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "import finished");
    Ok(merge_same_mailboxes(summary))
}

/// Two folders can map to one mailbox (`inbox` and `INBOX`); the summary lists it once.
fn merge_same_mailboxes(mut summary: ImportSummary) -> ImportSummary {
    let mut merged: Vec<MailboxSummary> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    for entry in summary.mailboxes.drain(..) {
        match position.get(&entry.mailbox) {
            Some(&index) => {
                let target = &mut merged[index];
                target.read += entry.read;
                target.imported += entry.imported;
                target.duplicates += entry.duplicates;
                target.failed += entry.failed;
            }
            None => {
                position.insert(entry.mailbox.clone(), merged.len());
                merged.push(entry);
            }
        }
    }
    summary.mailboxes = merged;
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_named_for_a_special_use_get_its_role() {
        assert_eq!(role_of_folder("Sent"), Some("sent"));
        assert_eq!(role_of_folder("Sent Items"), Some("sent"));
        assert_eq!(role_of_folder("Archive/Deleted Items"), Some("trash"));
        assert_eq!(role_of_folder("spam"), Some("junk"));
        assert_eq!(role_of_folder("Archive/2026"), None);
        assert_eq!(role_of_folder("Sentimental"), None);
    }

    fn keywords() -> Vec<Option<String>> {
        parse_dovecot_keywords("0 $Label1\n1 Work\nbad line\n30 TooFar\n3 NonJunk\n")
    }

    #[test]
    fn reads_flags_keywords_and_seconds_from_a_maildir_name() {
        let parsed = parse_maildir_name("1733000000.M12P34.host,S=120,W=124:2,FRSTDab", &keywords());
        assert_eq!(
            parsed.flags,
            vec![
                Flag::Flagged,
                Flag::Answered,
                Flag::Seen,
                Flag::Deleted,
                Flag::Draft,
                Flag::Keyword("$Label1".into()),
                Flag::Keyword("Work".into()),
            ]
        );
        assert_eq!(parsed.delivered_seconds, Some(1_733_000_000));
        assert!(parsed.unknown_letters.is_empty());
    }

    #[test]
    fn a_maildir_name_without_info_or_seconds_has_neither() {
        let parsed = parse_maildir_name("message-without-time", &keywords());
        assert_eq!(parsed, MaildirName::default());
        let parsed = parse_maildir_name("1733000000.M1.host", &keywords());
        assert!(parsed.flags.is_empty());
        assert_eq!(parsed.delivered_seconds, Some(1_733_000_000));
        // An unknown info version, the passed flag, and a letter with no keyword line.
        let parsed = parse_maildir_name("17.x:1,S", &keywords());
        assert!(parsed.flags.is_empty());
        let parsed = parse_maildir_name("17.x:2,Pc", &keywords());
        assert!(parsed.flags.is_empty());
        assert_eq!(parsed.unknown_letters, vec!['c']);
    }

    #[test]
    fn reads_dovecot_keywords() {
        let keywords = keywords();
        assert_eq!(keywords.len(), 26);
        assert_eq!(keywords[0].as_deref(), Some("$Label1"));
        assert_eq!(keywords[3].as_deref(), Some("NonJunk"));
        assert_eq!(keywords[2], None);
    }

    #[test]
    fn takes_mbox_metadata_out_and_reads_its_flags() {
        let message = b"From: a@example.org\nStatus: RO\nX-Status: AF\nX-Keywords: $Work, Later bad\"word\n  Folded\nSubject: hi\nX-UID: 7\n\nStatus: R in the body stays\n".to_vec();
        let (kept, metadata) = take_mbox_metadata(message);
        assert_eq!(
            kept,
            b"From: a@example.org\nSubject: hi\n\nStatus: R in the body stays\n".to_vec()
        );
        assert_eq!(
            metadata.flags,
            vec![
                Flag::Seen,
                Flag::Answered,
                Flag::Flagged,
                Flag::Keyword("$Work".into()),
                Flag::Keyword("Later".into()),
                Flag::Keyword("Folded".into()),
            ]
        );
        assert_eq!(metadata.keywords_dropped, 1);
        let (_, metadata) = take_mbox_metadata(b"X-Status: TD\r\nStatus: O\r\n\r\nbody".to_vec());
        assert_eq!(metadata.flags, vec![Flag::Draft, Flag::Deleted]);
        let (_, metadata) = take_mbox_metadata(b"X-Mozilla-Status: 0005\nX-Mozilla-Keys: $label1\n\n".to_vec());
        assert_eq!(
            metadata.flags,
            vec![Flag::Seen, Flag::Flagged, Flag::Keyword("$label1".into())]
        );
    }

    #[test]
    fn a_message_without_metadata_keeps_its_bytes() {
        for message in [
            &b"Subject: x\r\n\r\nbody"[..],
            b"no header block at all\n",
            b"",
            b"Subject: no blank line",
        ] {
            let (kept, metadata) = take_mbox_metadata(message.to_vec());
            assert_eq!(kept, message);
            assert!(metadata.flags.is_empty());
        }
    }

    #[test]
    fn strips_only_the_mbox_separator_line() {
        assert_eq!(strip_mbox_separator(b"a\n\n".to_vec()), b"a\n");
        assert_eq!(strip_mbox_separator(b"a\r\n\r\n".to_vec()), b"a\r\n");
        assert_eq!(strip_mbox_separator(b"a\r\n\n".to_vec()), b"a\r\n");
        assert_eq!(strip_mbox_separator(b"a\n".to_vec()), b"a\n");
        assert_eq!(strip_mbox_separator(b"a".to_vec()), b"a");
    }

    #[test]
    fn names_maildir_plus_plus_folders_and_mbox_files() {
        assert_eq!(maildir_plus_plus_mailbox(".Sent"), "Sent");
        assert_eq!(maildir_plus_plus_mailbox(".Archive.2026"), "Archive/2026");
        assert_eq!(maildir_plus_plus_mailbox(".Entw&APw-rfe"), "Entwürfe");
        assert_eq!(decode_modified_utf7("A&-B"), "A&B");
        assert_eq!(decode_modified_utf7("broken&AP"), "broken&AP");
        assert_eq!(mbox_file_mailbox(Path::new("inbox")), "INBOX");
        assert_eq!(mbox_file_mailbox(Path::new("Archive.sbd/2026")), "Archive/2026");
        assert_eq!(mbox_file_mailbox(Path::new("Sent")), "Sent");
    }

    #[test]
    fn append_paths_carry_flags_and_the_received_date() {
        let job = Job {
            source: 0,
            raw: b"x".to_vec(),
            flags: vec![Flag::Seen, Flag::Flagged, Flag::Keyword("$label".into())],
            received_millis: Some(1_733_000_000_000),
            source_bytes: 1,
            origin: String::new(),
        };
        assert_eq!(
            append_path("/v1/mailboxes/a/INBOX/messages?skip_duplicate=true", &job),
            "/v1/mailboxes/a/INBOX/messages?skip_duplicate=true&flags=%5CSeen,%5CFlagged,%24label&received=1733000000000"
        );
    }
}
