//! One LMTP session as a state machine with no IO (RFC 2033 over RFC 5321's grammar).
//!
//! The connection driver in [`super`] feeds it the bytes it reads and writes what it answers;
//! the session asks for a delivery by returning a [`Transaction`], and the driver hands each
//! recipient's copy to the mail service and writes that recipient's reply. Keeping the protocol
//! here, apart from sockets and the store, lets the fuzz target and the unit tests drive every
//! path with plain byte strings.
//!
//! Memory is bounded whatever the client sends: a command line longer than
//! [`Limits::max_command_line`] is answered `500` and skipped to its end, and message data past
//! [`Limits::max_message_bytes`] is counted and dropped (the reply after the final dot is then
//! `552 5.3.4` for every recipient).

use std::borrow::Cow;

use smtp_proto::{Error as ParseError, Request};

use crate::service::{Delivery, Recipient, ServiceError};

/// What one session may take from a client.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest message, as received (trace headers come on top).
    pub max_message_bytes: u64,
    /// Recipients accepted in one transaction (RFC 5321 asks servers to take at least 100).
    pub max_recipients: usize,
    /// The longest command line, CRLF included.
    pub max_command_line: usize,
    /// Failed commands in a row before the session is closed.
    pub max_errors: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 25 * 1024 * 1024,
            max_recipients: 100,
            max_command_line: 4096,
            max_errors: 20,
        }
    }
}

/// Who is talking, for the `Received` line.
#[derive(Clone, Debug)]
pub struct Peer {
    /// This node's name (greeting, `by` clause).
    pub server_name: String,
    /// The client's address: `[127.0.0.1]` for TCP, `local` for a unix socket.
    pub client_address: String,
}

/// How the recipients of a session's transactions fared, for the node's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Copies stored.
    pub accepted: u64,
    /// Recipients or copies refused for good (5xx).
    pub refused: u64,
    /// Recipients or copies refused for now (4xx): the MTA retries them.
    pub deferred: u64,
}

/// What the driver must do after [`Session::advance`].
#[derive(Debug)]
pub enum Next {
    /// Read more input (everything given was used, or a line is not complete yet).
    MoreInput,
    /// Deliver one copy per recipient, answer each in order, then call
    /// [`Session::transaction_done`] and go on with the rest of the input.
    Deliver(Transaction),
    /// Write the output and close the connection.
    Close,
}

/// The result of one [`Session::advance`].
#[derive(Debug)]
pub struct Progress {
    /// Input bytes used; the driver drops them from its buffer.
    pub consumed: usize,
    /// Replies to write, in order.
    pub output: Vec<u8>,
    pub next: Next,
}

/// A recipient accepted by `RCPT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The address as the client gave it (it goes into `Delivered-To`).
    pub address: String,
    pub recipient: Recipient,
}

/// A complete message and where it goes.
#[derive(Debug)]
pub struct Transaction {
    pub sender: String,
    pub recipients: Vec<Accepted>,
    /// The message exactly as received, dot-unstuffed.
    pub body: Vec<u8>,
    client_name: String,
    peer: Peer,
}

impl Transaction {
    /// The copy for recipient `index`, with `Return-Path`, `Delivered-To` and `Received` on top.
    pub fn copy_for(&self, index: usize, now_millis: u64) -> Delivery {
        let accepted = &self.recipients[index];
        let mut raw = self.trace_headers(&accepted.address, now_millis);
        raw.reserve_exact(self.body.len());
        raw.extend_from_slice(&self.body);
        Delivery {
            account: accepted.recipient.account.clone(),
            mailbox: crate::service::MailboxTarget::Path(accepted.recipient.mailbox.clone()),
            raw,
            flags: Vec::new(),
            received_millis: None,
            skip_duplicate: false,
        }
    }

    /// The header lines added to a copy, ending like the message's own first line does (CRLF,
    /// or a bare LF for a message written with bare LFs).
    pub fn trace_headers(&self, recipient: &str, now_millis: u64) -> Vec<u8> {
        let newline = match self.body.iter().position(|&byte| byte == b'\n') {
            Some(index) if index == 0 || self.body[index - 1] != b'\r' => "\n",
            _ => "\r\n",
        };
        let date = mail_parser::DateTime::from_timestamp((now_millis / 1000) as i64).to_rfc822();
        let recipient = header_safe(recipient);
        format!(
            "Return-Path: <{sender}>{newline}Delivered-To: {recipient}{newline}Received: from {client} ({address}){newline}\tby {server} (mailmesh) with LMTP{newline}\tfor <{recipient}>; {date}{newline}",
            sender = header_safe(&self.sender),
            client = header_safe(&self.client_name),
            address = header_safe(&self.peer.client_address),
            server = header_safe(&self.peer.server_name),
        )
        .into_bytes()
    }

    /// The reply for recipient `index` once its delivery finished.
    pub fn reply_for(&self, index: usize, result: &Result<crate::service::Delivered, ServiceError>) -> String {
        let address = printable(&self.recipients[index].address);
        match result {
            Ok(_) => format!("250 2.0.0 <{address}> Delivered\r\n"),
            Err(ServiceError::TooLarge { limit, .. }) => {
                format!("552 5.3.4 <{address}> Message too big for this system (limit {limit} bytes)\r\n")
            }
            Err(ServiceError::StorageFull(_)) => {
                format!("452 4.3.1 <{address}> Insufficient system storage, try again later\r\n")
            }
            Err(error) if error.is_temporary() => {
                format!("451 4.3.0 <{address}> Temporary failure storing the message, try again later\r\n")
            }
            Err(ServiceError::NoSuchAccount(_)) => format!("550 5.1.1 <{address}> User doesn't exist\r\n"),
            Err(error) => format!(
                "554 5.6.0 <{address}> Message refused: {}\r\n",
                printable(&error.to_string())
            ),
        }
    }
}

/// Where the session is in its input.
#[derive(Debug)]
enum Mode {
    /// Reading command lines.
    Command,
    /// Skipping the rest of an overlong command line (already answered).
    DiscardingLine,
    /// Reading the dot-terminated data after `DATA`.
    Data(DotReader),
    /// Reading the octets of a `BDAT` chunk.
    Chunk {
        remaining: u64,
        last: bool,
        refusal: Option<&'static str>,
    },
    /// A transaction is out for delivery; no input is read until it is done.
    Delivering,
    /// `QUIT` or a fatal error: nothing more is read.
    Closed,
}

/// An LMTP session's state.
#[derive(Debug)]
pub struct Session {
    peer: Peer,
    limits: Limits,
    mode: Mode,
    /// The name given with `LHLO`, once given.
    client_name: Option<String>,
    sender: Option<String>,
    recipients: Vec<Accepted>,
    body: Body,
    /// Whether the transaction's data came by `BDAT` (then `DATA` is out of sequence).
    chunking: bool,
    errors: u32,
    outcomes: Outcomes,
}

impl Session {
    pub fn new(peer: Peer, limits: Limits) -> Session {
        Session {
            body: Body::new(limits.max_message_bytes),
            peer,
            limits,
            mode: Mode::Command,
            client_name: None,
            sender: None,
            recipients: Vec::new(),
            chunking: false,
            errors: 0,
            outcomes: Outcomes::default(),
        }
    }

    /// The first line the server sends.
    pub fn greeting(&self) -> String {
        format!("220 {} LMTP mailmesh ready\r\n", printable(&self.peer.server_name))
    }

    /// The outcomes counted since the last call.
    pub fn take_outcomes(&mut self) -> Outcomes {
        std::mem::take(&mut self.outcomes)
    }

    /// Uses as much of `input` as it can. `resolve` looks up a `RCPT` address.
    pub fn advance(
        &mut self,
        input: &[u8],
        resolve: &mut dyn FnMut(&str) -> Result<Recipient, ServiceError>,
    ) -> Progress {
        let mut output = Vec::new();
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            match &mut self.mode {
                Mode::Closed => return progress(consumed, output, Next::Close),
                Mode::Delivering => {
                    // The driver must finish the transaction first; nothing is read meanwhile.
                    return progress(consumed, output, Next::MoreInput);
                }
                Mode::DiscardingLine => match rest.iter().position(|&byte| byte == b'\n') {
                    Some(index) => {
                        consumed += index + 1;
                        self.mode = Mode::Command;
                    }
                    None => return progress(input.len(), output, Next::MoreInput),
                },
                Mode::Data(reader) => {
                    let (used, finished) = reader.feed(rest, &mut self.body);
                    consumed += used;
                    if !finished {
                        return progress(consumed, output, Next::MoreInput);
                    }
                    if let Some(transaction) = self.end_of_data(&mut output) {
                        return progress(consumed, output, Next::Deliver(transaction));
                    }
                }
                Mode::Chunk {
                    remaining,
                    last,
                    refusal,
                } => {
                    let take = (*remaining).min(rest.len() as u64) as usize;
                    if refusal.is_none() {
                        self.body.push(&rest[..take]);
                    }
                    consumed += take;
                    *remaining -= take as u64;
                    if *remaining > 0 {
                        return progress(consumed, output, Next::MoreInput);
                    }
                    let (last, refusal) = (*last, *refusal);
                    self.mode = Mode::Command;
                    if let Some(reply) = refusal {
                        output.extend_from_slice(reply.as_bytes());
                    } else if last {
                        if let Some(transaction) = self.end_of_data(&mut output) {
                            return progress(consumed, output, Next::Deliver(transaction));
                        }
                    } else {
                        output.extend_from_slice(
                            format!("250 2.0.0 {} octets received\r\n", self.body.received).as_bytes(),
                        );
                    }
                }
                Mode::Command => {
                    let Some(index) = rest.iter().position(|&byte| byte == b'\n') else {
                        if rest.len() >= self.limits.max_command_line {
                            output.extend_from_slice(b"500 5.5.2 Line too long\r\n");
                            self.mode = Mode::DiscardingLine;
                            if self.count_error() {
                                return self.too_many_errors(input.len(), output);
                            }
                            continue;
                        }
                        return progress(consumed, output, Next::MoreInput);
                    };
                    let line = &rest[..=index];
                    consumed += index + 1;
                    if line.len() > self.limits.max_command_line {
                        output.extend_from_slice(b"500 5.5.2 Line too long\r\n");
                        if self.count_error() {
                            return self.too_many_errors(consumed, output);
                        }
                        continue;
                    }
                    let reply = self.on_command(line, resolve);
                    output.extend_from_slice(reply.as_bytes());
                    if matches!(self.mode, Mode::Closed) {
                        return progress(consumed, output, Next::Close);
                    }
                    if self.errors >= self.limits.max_errors {
                        return self.too_many_errors(consumed, output);
                    }
                }
            }
        }
    }

    /// Called by the driver once every recipient of the transaction was answered.
    pub fn transaction_done(&mut self) {
        self.reset_transaction();
        self.mode = Mode::Command;
    }

    /// Records the outcome of one copy's delivery, for [`Session::take_outcomes`].
    pub fn count_delivery(&mut self, result: &Result<crate::service::Delivered, ServiceError>) {
        match result {
            Ok(_) => self.outcomes.accepted += 1,
            Err(error) if error.is_temporary() => self.outcomes.deferred += 1,
            Err(_) => self.outcomes.refused += 1,
        }
    }

    fn count_error(&mut self) -> bool {
        self.errors += 1;
        self.errors >= self.limits.max_errors
    }

    fn too_many_errors(&mut self, consumed: usize, mut output: Vec<u8>) -> Progress {
        output.extend_from_slice(b"421 4.7.0 Too many errors, closing the connection\r\n");
        self.mode = Mode::Closed;
        progress(consumed, output, Next::Close)
    }

    fn reset_transaction(&mut self) {
        self.sender = None;
        self.recipients.clear();
        self.body = Body::new(self.limits.max_message_bytes);
        self.chunking = false;
    }

    /// The data is complete: answer now (too large) or hand the transaction out.
    fn end_of_data(&mut self, output: &mut Vec<u8>) -> Option<Transaction> {
        if self.body.overflowed() {
            for accepted in &self.recipients {
                output.extend_from_slice(
                    format!(
                        "552 5.3.4 <{}> Message too big for this system (limit {} bytes)\r\n",
                        printable(&accepted.address),
                        self.limits.max_message_bytes
                    )
                    .as_bytes(),
                );
            }
            self.outcomes.refused += self.recipients.len() as u64;
            self.reset_transaction();
            self.mode = Mode::Command;
            return None;
        }
        let body = std::mem::replace(&mut self.body, Body::new(self.limits.max_message_bytes));
        let transaction = Transaction {
            sender: self.sender.take().unwrap_or_default(),
            recipients: std::mem::take(&mut self.recipients),
            body: body.bytes,
            client_name: self.client_name.clone().unwrap_or_default(),
            peer: self.peer.clone(),
        };
        self.mode = Mode::Delivering;
        Some(transaction)
    }

    fn on_command(&mut self, line: &[u8], resolve: &mut dyn FnMut(&str) -> Result<Recipient, ServiceError>) -> String {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(error) => {
                self.errors += 1;
                return refusal_for(&error);
            }
        };
        let reply = self.on_request(request, resolve);
        // Syntax and sequence errors count toward closing; refused recipients do not.
        if reply.starts_with("50") {
            self.errors += 1;
        } else {
            self.errors = 0;
        }
        reply
    }

    fn on_request(
        &mut self,
        request: Request<Cow<'_, str>>,
        resolve: &mut dyn FnMut(&str) -> Result<Recipient, ServiceError>,
    ) -> String {
        match request {
            Request::Lhlo { host } => {
                self.reset_transaction();
                self.client_name = Some(printable(&host));
                format!(
                    "250-{}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SIZE {}\r\n250 CHUNKING\r\n",
                    printable(&self.peer.server_name),
                    self.limits.max_message_bytes
                )
            }
            Request::Ehlo { .. } | Request::Helo { .. } => "500 5.5.1 This is an LMTP server: say LHLO\r\n".into(),
            Request::Mail { from } => {
                if self.client_name.is_none() {
                    return "503 5.5.1 Say LHLO first\r\n".into();
                }
                if self.sender.is_some() {
                    return "503 5.5.1 Sender already given (RSET to start over)\r\n".into();
                }
                if from.size as u64 > self.limits.max_message_bytes {
                    return format!(
                        "552 5.3.4 Message size exceeds the limit of {} bytes\r\n",
                        self.limits.max_message_bytes
                    );
                }
                self.sender = Some(from.address.into_owned());
                "250 2.1.0 Sender OK\r\n".into()
            }
            Request::Rcpt { to } => {
                if self.sender.is_none() {
                    return "503 5.5.1 Need MAIL before RCPT\r\n".into();
                }
                if self.chunking {
                    return "503 5.5.1 RCPT after BDAT\r\n".into();
                }
                if self.recipients.len() >= self.limits.max_recipients {
                    self.outcomes.deferred += 1;
                    return "452 4.5.3 Too many recipients in one transaction\r\n".into();
                }
                let address = to.address.into_owned();
                match resolve(&address) {
                    Ok(recipient) => {
                        self.recipients.push(Accepted { address, recipient });
                        "250 2.1.5 Recipient OK\r\n".into()
                    }
                    Err(ServiceError::NoSuchAccount(_)) => {
                        self.outcomes.refused += 1;
                        format!("550 5.1.1 <{}> User doesn't exist\r\n", printable(&address))
                    }
                    Err(error) if error.is_temporary() => {
                        self.outcomes.deferred += 1;
                        format!("451 4.3.0 <{}> Temporary lookup failure\r\n", printable(&address))
                    }
                    Err(_) => {
                        self.outcomes.refused += 1;
                        format!("553 5.1.3 <{}> Not a deliverable address\r\n", printable(&address))
                    }
                }
            }
            Request::Data => {
                if self.sender.is_none() {
                    return "503 5.5.1 Need MAIL before DATA\r\n".into();
                }
                if self.chunking {
                    return "503 5.5.1 DATA after BDAT\r\n".into();
                }
                if self.recipients.is_empty() {
                    return "554 5.5.1 No valid recipients\r\n".into();
                }
                self.mode = Mode::Data(DotReader::default());
                "354 2.0.0 Send the message, end with <CRLF>.<CRLF>\r\n".into()
            }
            Request::Bdat { chunk_size, is_last } => {
                // The chunk's octets follow the command whatever the answer, so they are read
                // (and dropped when refused) before the reply.
                let refusal = if self.sender.is_none() {
                    Some("503 5.5.1 Need MAIL before BDAT\r\n")
                } else if self.recipients.is_empty() {
                    Some("554 5.5.1 No valid recipients\r\n")
                } else {
                    None
                };
                if refusal.is_none() {
                    self.chunking = true;
                } else {
                    self.errors += 1;
                }
                self.mode = Mode::Chunk {
                    remaining: chunk_size as u64,
                    last: is_last,
                    refusal,
                };
                String::new()
            }
            Request::Rset => {
                self.reset_transaction();
                "250 2.0.0 OK\r\n".into()
            }
            Request::Noop { .. } => "250 2.0.0 OK\r\n".into(),
            Request::Quit => {
                self.mode = Mode::Closed;
                format!(
                    "221 2.0.0 {} closing the connection\r\n",
                    printable(&self.peer.server_name)
                )
            }
            Request::Vrfy { .. } => "252 2.5.0 Cannot VRFY a user, but will take a message for delivery\r\n".into(),
            Request::Help { .. } => {
                "214 2.0.0 Commands: LHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP (RFC 2033)\r\n".into()
            }
            Request::StartTls
            | Request::Auth { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => "502 5.5.1 Command not implemented\r\n".into(),
        }
    }
}

fn progress(consumed: usize, output: Vec<u8>, next: Next) -> Progress {
    Progress { consumed, output, next }
}

/// The reply to a command line that does not parse.
fn refusal_for(error: &ParseError) -> String {
    match error {
        ParseError::UnknownCommand => "500 5.5.2 Command unrecognized\r\n".into(),
        ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}\r\n"),
        ParseError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax\r\n".into(),
        ParseError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax\r\n".into(),
        ParseError::InvalidParameter { param } => format!("501 5.5.4 Invalid value for {param}\r\n"),
        ParseError::UnsupportedParameter { param } => {
            format!("555 5.5.4 Unsupported parameter {}\r\n", printable(param))
        }
        _ => "500 5.5.2 Syntax error\r\n".into(),
    }
}

/// Text from a client made safe to echo in a one-line reply: printable ASCII, at most 256 chars.
fn printable(text: &str) -> String {
    text.chars()
        .take(256)
        .map(|character| {
            if character.is_ascii_graphic() || character == ' ' {
                character
            } else {
                '?'
            }
        })
        .collect()
}

/// Text from a client made safe inside a header field: no control characters, at most 256 chars.
fn header_safe(text: &str) -> String {
    text.chars()
        .take(256)
        .filter(|character| !character.is_control())
        .collect()
}

/// The message as it arrives, kept up to the limit; past it only counted.
#[derive(Debug)]
struct Body {
    bytes: Vec<u8>,
    received: u64,
    limit: u64,
}

impl Body {
    fn new(limit: u64) -> Body {
        Body {
            bytes: Vec::new(),
            received: 0,
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.received = self.received.saturating_add(bytes.len() as u64);
        if self.received <= self.limit {
            self.bytes.extend_from_slice(bytes);
        } else if !self.bytes.is_empty() {
            // Over the limit: what was kept is useless now, give the memory back at once.
            self.bytes = Vec::new();
        }
    }

    fn overflowed(&self) -> bool {
        self.received > self.limit
    }
}

/// Where the reader of dot-terminated data is within a line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum DotState {
    /// At the start of a line.
    #[default]
    LineStart,
    /// The line began with a dot (not yet passed on).
    AfterDot,
    /// The line began with a dot and a CR.
    AfterDotCr,
    /// Inside a line.
    InLine,
}

/// Reads the data after `DATA`: lines end in CRLF (a bare LF is taken as a line end too), a
/// leading dot is removed (RFC 5321 4.5.2), and a line holding a lone dot ends the message.
#[derive(Debug, Default)]
struct DotReader {
    state: DotState,
}

impl DotReader {
    /// Feeds bytes into `body`; returns how many were used and whether the end was reached.
    fn feed(&mut self, input: &[u8], body: &mut Body) -> (usize, bool) {
        let mut index = 0;
        while index < input.len() {
            match self.state {
                DotState::InLine => {
                    // Pass on the rest of the line in one piece.
                    match input[index..].iter().position(|&byte| byte == b'\n') {
                        Some(offset) => {
                            body.push(&input[index..=index + offset]);
                            index += offset + 1;
                            self.state = DotState::LineStart;
                        }
                        None => {
                            body.push(&input[index..]);
                            index = input.len();
                        }
                    }
                }
                DotState::LineStart => {
                    if input[index] == b'.' {
                        self.state = DotState::AfterDot;
                        index += 1;
                    } else {
                        self.state = DotState::InLine;
                    }
                }
                DotState::AfterDot => match input[index] {
                    b'\r' => {
                        self.state = DotState::AfterDotCr;
                        index += 1;
                    }
                    b'\n' => return (index + 1, true),
                    _ => self.state = DotState::InLine, // the dot is dropped
                },
                DotState::AfterDotCr => {
                    if input[index] == b'\n' {
                        return (index + 1, true);
                    }
                    // ".\r" then more: the dot is dropped, the CR is message data.
                    body.push(b"\r");
                    self.state = DotState::InLine;
                }
            }
        }
        (index, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(limits: Limits) -> Session {
        Session::new(
            Peer {
                server_name: "node-1".into(),
                client_address: "[127.0.0.1]".into(),
            },
            limits,
        )
    }

    fn directory(address: &str) -> Result<Recipient, ServiceError> {
        match address {
            "alice@example.org" => Ok(Recipient {
                account: "alice@example.org".into(),
                mailbox: "INBOX".into(),
            }),
            "alice+lists@example.org" => Ok(Recipient {
                account: "alice@example.org".into(),
                mailbox: "lists".into(),
            }),
            "busy@example.org" => Err(ServiceError::Unavailable("store closing".into())),
            _ => Err(ServiceError::NoSuchAccount(address.into())),
        }
    }

    /// Runs `input` through a session, delivering with `deliver`; returns everything written.
    fn run(
        session: &mut Session,
        input: &[u8],
        deliver: &mut dyn FnMut(Delivery) -> Result<crate::service::Delivered, ServiceError>,
    ) -> String {
        let mut written = Vec::new();
        let mut offset = 0;
        loop {
            let progress = session.advance(&input[offset..], &mut directory);
            offset += progress.consumed;
            written.extend_from_slice(&progress.output);
            match progress.next {
                Next::MoreInput => break,
                Next::Close => break,
                Next::Deliver(transaction) => {
                    for index in 0..transaction.recipients.len() {
                        let result = deliver(transaction.copy_for(index, 1_764_576_000_000));
                        session.count_delivery(&result);
                        written.extend_from_slice(transaction.reply_for(index, &result).as_bytes());
                    }
                    session.transaction_done();
                }
            }
        }
        String::from_utf8_lossy(&written).into_owned()
    }

    fn delivered() -> crate::service::Delivered {
        crate::service::Delivered {
            id: crate::model::MessageId(1),
            mailbox: crate::model::MailboxId(1),
            blob: crate::model::BlobHash::of(b"x"),
            size: 1,
            duplicate: false,
        }
    }

    #[test]
    fn a_pipelined_transaction_answers_each_recipient_after_the_data() {
        let mut session = session(Limits::default());
        let mut copies = Vec::new();
        let output = run(
            &mut session,
            b"LHLO mta.example.org\r\nMAIL FROM:<bob@example.net> SIZE=40 BODY=8BITMIME\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<alice+lists@example.org>\r\nDATA\r\nSubject: hi\r\n\r\n..dotted\r\n.\r\nQUIT\r\n",
            &mut |delivery| {
                copies.push(delivery);
                Ok(delivered())
            },
        );
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines[0], "250-node-1");
        assert!(lines.contains(&"250-PIPELINING") && lines.contains(&"250 CHUNKING"));
        let after_lhlo: Vec<&str> = lines.iter().skip(6).copied().collect();
        assert_eq!(after_lhlo[0], "250 2.1.0 Sender OK");
        assert_eq!(after_lhlo[1], "250 2.1.5 Recipient OK");
        assert!(after_lhlo[2].starts_with("550 5.1.1 <nobody@example.org>"));
        assert_eq!(after_lhlo[3], "250 2.1.5 Recipient OK");
        assert!(after_lhlo[4].starts_with("354 "));
        assert_eq!(after_lhlo[5], "250 2.0.0 <alice@example.org> Delivered");
        assert_eq!(after_lhlo[6], "250 2.0.0 <alice+lists@example.org> Delivered");
        assert!(after_lhlo[7].starts_with("221 "));
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[1].mailbox, crate::service::MailboxTarget::Path("lists".into()));
        let text = String::from_utf8(copies[0].raw.clone()).unwrap();
        assert!(text.starts_with("Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.org\r\nReceived: from mta.example.org ([127.0.0.1])\r\n\tby node-1 (mailmesh) with LMTP\r\n\tfor <alice@example.org>; "), "{text}");
        assert!(text.ends_with("+0000\r\nSubject: hi\r\n\r\n.dotted\r\n"), "{text}");
        assert_eq!(
            session.take_outcomes(),
            Outcomes {
                accepted: 2,
                refused: 1,
                deferred: 0
            }
        );
    }

    #[test]
    fn bare_line_feeds_end_lines_and_the_message() {
        let mut session = session(Limits::default());
        let mut raw = Vec::new();
        let output = run(
            &mut session,
            b"LHLO x\nMAIL FROM:<>\nRCPT TO:<alice@example.org>\nDATA\nA: b\n\n.x\n..\n.\nNOOP\n",
            &mut |delivery| {
                raw = delivery.raw;
                Ok(delivered())
            },
        );
        assert!(output.ends_with("Delivered\r\n250 2.0.0 OK\r\n"), "{output}");
        let text = String::from_utf8(raw).unwrap();
        assert!(
            text.starts_with("Return-Path: <>\nDelivered-To: alice@example.org\n"),
            "{text}"
        );
        assert!(text.ends_with("\nA: b\n\nx\n.\n"), "{text}");
    }

    #[test]
    fn an_oversized_message_is_dropped_while_read_and_refused_per_recipient() {
        let limits = Limits {
            max_message_bytes: 1000,
            ..Limits::default()
        };
        let mut session = session(limits);
        let mut input = b"LHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<alice+lists@example.org>\r\nDATA\r\n".to_vec();
        let opening = run(&mut session, &input, &mut |_| panic!("nothing is delivered"));
        assert!(opening.ends_with("354 2.0.0 Send the message, end with <CRLF>.<CRLF>\r\n"));
        // Stream 100 kB in pieces: the session never holds more than the limit.
        input = Vec::new();
        for _ in 0..1000 {
            let progress = session.advance(&[b'y'; 100], &mut directory);
            assert_eq!(progress.consumed, 100);
            assert!(progress.output.is_empty());
            assert!(session.body.bytes.len() <= 1000);
        }
        input.extend_from_slice(b"\r\n.\r\nRSET\r\n");
        let output = run(&mut session, &input, &mut |_| panic!("nothing is delivered"));
        assert_eq!(
            output,
            "552 5.3.4 <alice@example.org> Message too big for this system (limit 1000 bytes)\r\n552 5.3.4 <alice+lists@example.org> Message too big for this system (limit 1000 bytes)\r\n250 2.0.0 OK\r\n"
        );
        // A declared size over the limit is refused at MAIL.
        let output = run(
            &mut session,
            b"MAIL FROM:<a@b.c> SIZE=5000\r\n",
            &mut |_| unreachable!(),
        );
        assert!(output.starts_with("552 5.3.4"), "{output}");
    }

    #[test]
    fn an_overlong_line_is_refused_and_the_session_goes_on() {
        let limits = Limits {
            max_command_line: 64,
            ..Limits::default()
        };
        let mut session = session(limits);
        // Arrives in pieces: the first 100 bytes with no line end.
        let progress = session.advance(&[b'A'; 100], &mut directory);
        assert_eq!(progress.consumed, 100);
        assert_eq!(progress.output, b"500 5.5.2 Line too long\r\n");
        let output = run(&mut session, b"AAAAAAAA\r\nNOOP\r\n", &mut |_| unreachable!());
        assert_eq!(output, "250 2.0.0 OK\r\n");
        // A complete overlong line in one piece.
        let mut line = vec![b'N'; 80];
        line.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(
            run(&mut session, &line, &mut |_| unreachable!()),
            "500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
        );
    }

    #[test]
    fn temporary_failures_answer_4xx_and_sequence_errors_5xx() {
        let mut session = session(Limits::default());
        let output = run(
            &mut session,
            b"MAIL FROM:<a@b.c>\r\nHELO x\r\nLHLO x\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<busy@example.org>\r\nDATA\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nx\r\n.\r\nVRFY alice\r\nHELP\r\nSTARTTLS\r\n\0\0garbage\r\n",
            &mut |_| Err(ServiceError::StorageFull("disk full".into())),
        );
        let lines: Vec<&str> = output.lines().collect();
        let codes: Vec<&str> = lines.iter().map(|line| &line[..3]).collect();
        assert_eq!(
            codes,
            [
                "503", "500", "250", "250", "250", "250", "250", "250", "503", "503", "250", "451", "554", "250",
                "354", "452", "252", "214", "502", "500"
            ],
            "{output}"
        );
        assert!(lines[15].starts_with("452 4.3.1 <alice@example.org>"));
        assert_eq!(
            session.take_outcomes(),
            Outcomes {
                accepted: 0,
                refused: 0,
                deferred: 2
            }
        );
    }

    #[test]
    fn bdat_chunks_make_one_message() {
        let mut session = session(Limits::default());
        let mut raw = Vec::new();
        let output = run(
            &mut session,
            b"LHLO x\r\nBDAT 3\r\nabcMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.org>\r\nBDAT 6\r\nA: b\r\nBDAT 4 LAST\r\n\r\nx.QUIT\r\n",
            &mut |delivery| {
                raw = delivery.raw;
                Ok(delivered())
            },
        );
        let codes: Vec<&str> = output.lines().map(|line| &line[..4]).collect();
        assert_eq!(codes[6..], ["503 ", "250 ", "250 ", "250 ", "250 ", "221 "], "{output}");
        assert!(raw.ends_with(b"\r\nA: b\r\n\r\nx."));
    }

    #[test]
    fn too_many_recipients_and_too_many_errors() {
        let limits = Limits {
            max_recipients: 2,
            max_errors: 3,
            ..Limits::default()
        };
        let mut session = session(limits);
        let output = run(
            &mut session,
            b"LHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<alice@example.org>\r\nRSET\r\nfoo\r\nbar\r\nbaz\r\nNOOP\r\n",
            &mut |_| unreachable!(),
        );
        let codes: Vec<&str> = output.lines().skip(6).map(|line| &line[..3]).collect();
        assert_eq!(
            codes,
            ["250", "250", "250", "452", "250", "500", "500", "500", "421"],
            "{output}"
        );
    }
}
