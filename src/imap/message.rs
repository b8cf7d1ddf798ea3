//! What IMAP says about one message's bytes: ENVELOPE, BODYSTRUCTURE, and the BODY[...] sections
//! (RFC 3501 6.4.5 and 7.4.2), from mail-parser's MIME tree, and BINARY's decoded parts (RFC 3516).
//!
//! A message/rfc822 part is parsed again from its own bytes, so every offset used here is relative
//! to the bytes it was parsed from. Responses are written with [`string`], which quotes what is
//! safe to quote and sends the rest as a literal.

use mail_parser::{Address, MessageParser, MessagePart, MimeHeaders, PartType};

/// Writes an IMAP string: quoted when it is short 7-bit text, a literal otherwise.
pub fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    let quotable = bytes.len() <= 1024
        && bytes
            .iter()
            .all(|&byte| (0x01..0x80).contains(&byte) && byte != b'\r' && byte != b'\n');
    if quotable {
        out.push(b'"');
        for &byte in bytes {
            if byte == b'"' || byte == b'\\' {
                out.push(b'\\');
            }
            out.push(byte);
        }
        out.push(b'"');
    } else {
        literal(out, bytes);
    }
}

/// Writes a literal: `{length}` CRLF and the bytes.
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
}

/// Writes BINARY's data: a literal, or a literal8 (`~{length}`, RFC 3516) when it holds a NUL.
pub fn binary_literal(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.contains(&0) {
        out.push(b'~');
    }
    literal(out, bytes);
}

/// Why a part cannot be given decoded (BINARY, RFC 3516 4.3).
#[derive(Debug, PartialEq, Eq)]
pub enum BinaryError {
    /// A Content-Transfer-Encoding this server does not know (`NO [UNKNOWN-CTE]`).
    UnknownEncoding(String),
    /// The part does not decode in its own encoding.
    Corrupt(&'static str),
}

/// Writes an nstring: NIL or a string.
pub fn nstring(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => string(out, bytes),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// A parsed message and the bytes it was parsed from.
pub struct Parsed<'a> {
    raw: &'a [u8],
    message: Option<mail_parser::Message<'a>>,
}

/// A section's part path (`1.2.3`); empty is the message itself.
pub type PartPath = [u32];

/// What part of a part a section asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectionText {
    /// The whole part (for the top level: the whole message).
    Full,
    /// The header (of the message, or of the message/rfc822 part).
    Header,
    /// Only these header fields (names compared without case), or all but these.
    HeaderFields { names: Vec<String>, not: bool },
    /// The body after the header.
    Text,
    /// The part's own MIME header.
    Mime,
}

impl<'a> Parsed<'a> {
    pub fn new(raw: &'a [u8]) -> Parsed<'a> {
        Parsed {
            raw,
            message: MessageParser::default().parse(raw),
        }
    }

    fn part(&self, index: usize) -> Option<&MessagePart<'a>> {
        self.message.as_ref()?.parts.get(index)
    }

    fn bytes(&self, start: u32, end: u32) -> &'a [u8] {
        let end = (end as usize).min(self.raw.len());
        let start = (start as usize).min(end);
        &self.raw[start..end]
    }

    /// The message's header, with the blank line that ends it.
    fn header(&self) -> &'a [u8] {
        match self.part(0) {
            Some(root) => self.bytes(0, root.offset_body),
            None => self.raw,
        }
    }

    fn text(&self) -> &'a [u8] {
        match self.part(0) {
            Some(root) => self.bytes(root.offset_body, self.raw.len() as u32),
            None => b"",
        }
    }

    /// The bytes of a section, or `None` when the message has no such part.
    pub fn section(&self, path: &PartPath, text: &SectionText) -> Option<Vec<u8>> {
        if path.is_empty() {
            return Some(match text {
                SectionText::Full => self.raw.to_vec(),
                SectionText::Header => self.header().to_vec(),
                SectionText::HeaderFields { names, not } => header_fields(self.header(), names, *not),
                SectionText::Text => self.text().to_vec(),
                SectionText::Mime => return None,
            });
        }
        let index = self.child_index(0, path[0])?;
        let part = self.part(index)?;
        let rest = &path[1..];
        if is_message_part(part) {
            let body = self.bytes(part.offset_body, part.offset_end);
            let inner = Parsed::new(body);
            return match (rest.is_empty(), text) {
                (true, SectionText::Full) => Some(body.to_vec()),
                (true, SectionText::Mime) => Some(self.bytes(part.offset_header, part.offset_body).to_vec()),
                _ => inner.section(rest, text),
            };
        }
        if rest.is_empty() {
            return match text {
                SectionText::Full => Some(self.bytes(part.offset_body, part.offset_end).to_vec()),
                SectionText::Mime => Some(self.bytes(part.offset_header, part.offset_body).to_vec()),
                // HEADER and TEXT apply to message/rfc822 parts only.
                _ => None,
            };
        }
        // Deeper: the part must be a multipart.
        self.nested(index, rest, text)
    }

    /// A section's content with its Content-Transfer-Encoding undone (BINARY[path]): the whole
    /// message as it is for the empty path, base64 and quoted-printable decoded, 7bit, 8bit and
    /// binary as they are. `Ok(None)` when the message has no such part.
    pub fn binary(&self, path: &PartPath) -> Result<Option<Vec<u8>>, BinaryError> {
        let Some(body) = self.section(path, &SectionText::Full) else {
            return Ok(None);
        };
        if path.is_empty() {
            return Ok(Some(body));
        }
        let encoding = self
            .section(path, &SectionText::Mime)
            .and_then(|header| header_value(&header, "Content-Transfer-Encoding"))
            .map(|value| value.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match encoding.as_str() {
            "" | "7bit" | "8bit" | "binary" => Ok(Some(body)),
            "base64" => mail_parser::decoders::base64::base64_decode(&body)
                .map(Some)
                .ok_or(BinaryError::Corrupt("the part is not valid base64")),
            "quoted-printable" => mail_parser::decoders::quoted_printable::quoted_printable_decode(&body)
                .map(Some)
                .ok_or(BinaryError::Corrupt("the part is not valid quoted-printable")),
            other => Err(BinaryError::UnknownEncoding(other.to_owned())),
        }
    }

    fn nested(&self, index: usize, path: &PartPath, text: &SectionText) -> Option<Vec<u8>> {
        let child = self.child_index(index, path[0])?;
        let part = self.part(child)?;
        let rest = &path[1..];
        if is_message_part(part) {
            let body = self.bytes(part.offset_body, part.offset_end);
            return match (rest.is_empty(), text) {
                (true, SectionText::Full) => Some(body.to_vec()),
                (true, SectionText::Mime) => Some(self.bytes(part.offset_header, part.offset_body).to_vec()),
                _ => Parsed::new(body).section(rest, text),
            };
        }
        if rest.is_empty() {
            return match text {
                SectionText::Full => Some(self.bytes(part.offset_body, part.offset_end).to_vec()),
                SectionText::Mime => Some(self.bytes(part.offset_header, part.offset_body).to_vec()),
                _ => None,
            };
        }
        self.nested(child, rest, text)
    }

    /// The index (in `parts`) of child `number` (1-based) of part `index`. A part that is not a
    /// multipart has itself as its only child (RFC 3501: a single-part message's part 1).
    fn child_index(&self, index: usize, number: u32) -> Option<usize> {
        let part = self.part(index)?;
        match &part.body {
            PartType::Multipart(children) => children
                .get((number as usize).checked_sub(1)?)
                .map(|&child| child as usize),
            _ if number == 1 && index == 0 => Some(0),
            _ => None,
        }
    }

    /// The ENVELOPE structure.
    pub fn envelope(&self, out: &mut Vec<u8>) {
        let Some(message) = &self.message else {
            out.extend_from_slice(b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)");
            return;
        };
        let raw_header = |name: &str| message.header_raw(name).map(|value| value.trim().as_bytes().to_vec());
        out.push(b'(');
        nstring(out, raw_header("Date").as_deref());
        out.push(b' ');
        nstring(out, raw_header("Subject").as_deref().map(unfold).as_deref());
        let from = message.from();
        for (index, addresses) in [
            from,
            message.sender().or(from),
            message.reply_to().or(from),
            message.to(),
            message.cc(),
            message.bcc(),
        ]
        .into_iter()
        .enumerate()
        {
            let _ = index;
            out.push(b' ');
            address_list(out, addresses);
        }
        out.push(b' ');
        nstring(out, raw_header("In-Reply-To").as_deref());
        out.push(b' ');
        nstring(out, raw_header("Message-ID").as_deref());
        out.push(b')');
    }

    /// The BODYSTRUCTURE (with extension data when `extended`; BODY is without).
    pub fn body_structure(&self, out: &mut Vec<u8>, extended: bool) {
        if self.message.is_none() {
            out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" ");
            out.extend_from_slice(format!("{} {})", self.raw.len(), count_lines(self.raw)).as_bytes());
            return;
        }
        self.part_structure(out, 0, extended, 0);
    }

    fn part_structure(&self, out: &mut Vec<u8>, index: usize, extended: bool, depth: usize) {
        let Some(part) = self.part(index) else {
            out.extend_from_slice(b"NIL");
            return;
        };
        let content_type = part.content_type();
        let (main, sub) = match content_type {
            Some(content_type) => (
                content_type.ctype().to_ascii_uppercase(),
                content_type.subtype().map(str::to_ascii_uppercase),
            ),
            None => ("TEXT".to_owned(), Some("PLAIN".to_owned())),
        };
        if let PartType::Multipart(children) = &part.body {
            out.push(b'(');
            if children.is_empty() || depth > 32 {
                // An empty multipart: show it as an empty text part, as some servers do.
                out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)");
            }
            for &child in children.iter().take(if depth > 32 { 0 } else { usize::MAX }) {
                self.part_structure(out, child as usize, extended, depth + 1);
            }
            out.push(b' ');
            string(out, sub.as_deref().unwrap_or("MIXED").as_bytes());
            if extended {
                out.push(b' ');
                parameters(out, part);
                out.push(b' ');
                extension_tail(out, part);
            }
            out.push(b')');
            return;
        }
        let body = self.bytes(part.offset_body, part.offset_end);
        out.push(b'(');
        string(out, main.as_bytes());
        out.push(b' ');
        string(
            out,
            sub.as_deref()
                .unwrap_or(if main == "TEXT" { "PLAIN" } else { "OCTET-STREAM" })
                .as_bytes(),
        );
        out.push(b' ');
        if content_type.is_none() && main == "TEXT" {
            out.extend_from_slice(b"(\"CHARSET\" \"US-ASCII\")");
        } else {
            parameters(out, part);
        }
        out.push(b' ');
        nstring(out, part.content_id().map(str::as_bytes));
        out.push(b' ');
        nstring(out, part.content_description().map(str::as_bytes));
        out.push(b' ');
        let encoding = part
            .content_transfer_encoding()
            .map(str::to_ascii_uppercase)
            .unwrap_or_else(|| "7BIT".to_owned());
        string(out, encoding.as_bytes());
        out.extend_from_slice(format!(" {}", body.len()).as_bytes());
        if is_message_part(part) && depth <= 32 {
            let inner = Parsed::new(body);
            out.push(b' ');
            inner.envelope(out);
            out.push(b' ');
            match &inner.message {
                Some(_) => inner.part_structure(out, 0, extended, depth + 1),
                None => inner.body_structure(out, extended),
            }
            out.extend_from_slice(format!(" {}", count_lines(body)).as_bytes());
        } else if main == "TEXT" {
            out.extend_from_slice(format!(" {}", count_lines(body)).as_bytes());
        }
        if extended {
            out.extend_from_slice(b" NIL ");
            extension_tail(out, part);
        }
        out.push(b')');
    }
}

fn is_message_part(part: &MessagePart<'_>) -> bool {
    part.content_type().is_some_and(|content_type| {
        content_type.ctype().eq_ignore_ascii_case("message")
            && content_type
                .subtype()
                .is_some_and(|sub| sub.eq_ignore_ascii_case("rfc822") || sub.eq_ignore_ascii_case("global"))
    })
}

fn parameters(out: &mut Vec<u8>, part: &MessagePart<'_>) {
    attribute_list(
        out,
        part.content_type().and_then(|content_type| content_type.attributes()),
    );
}

/// A parameter list, `("NAME" "value" ...)`, or NIL.
fn attribute_list(out: &mut Vec<u8>, attributes: Option<&[mail_parser::Attribute<'_>]>) {
    match attributes {
        Some(attributes) if !attributes.is_empty() => {
            out.push(b'(');
            for (index, attribute) in attributes.iter().enumerate() {
                if index > 0 {
                    out.push(b' ');
                }
                string(out, attribute.name.to_ascii_uppercase().as_bytes());
                out.push(b' ');
                string(out, attribute.value.as_bytes());
            }
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
}

/// The extension data every body part ends with: disposition, language and location.
fn extension_tail(out: &mut Vec<u8>, part: &MessagePart<'_>) {
    disposition(out, part);
    out.push(b' ');
    language(out, part);
    out.push(b' ');
    nstring(out, part.content_location().map(str::as_bytes));
}

fn disposition(out: &mut Vec<u8>, part: &MessagePart<'_>) {
    match part.content_disposition() {
        Some(disposition) => {
            out.push(b'(');
            string(out, disposition.ctype().to_ascii_uppercase().as_bytes());
            out.push(b' ');
            attribute_list(out, disposition.attributes());
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
}

fn language(out: &mut Vec<u8>, part: &MessagePart<'_>) {
    match part.content_language().as_text() {
        Some(text) => string(out, text.as_bytes()),
        None => out.extend_from_slice(b"NIL"),
    }
}

fn address_list(out: &mut Vec<u8>, addresses: Option<&Address<'_>>) {
    let mut items: Vec<(Option<String>, Option<String>)> = Vec::new();
    match addresses {
        Some(Address::List(list)) => {
            for address in list {
                items.push((
                    address.name.as_deref().map(str::to_owned),
                    address.address.as_deref().map(str::to_owned),
                ));
            }
        }
        Some(Address::Group(groups)) => {
            for group in groups {
                for address in &group.addresses {
                    items.push((
                        address.name.as_deref().map(str::to_owned),
                        address.address.as_deref().map(str::to_owned),
                    ));
                }
            }
        }
        None => {}
    }
    if items.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (name, address) in items {
        out.push(b'(');
        nstring(out, name.as_deref().map(encode_word).as_deref());
        out.extend_from_slice(b" NIL ");
        let (mailbox, host) = match address.as_deref().and_then(|address| address.rsplit_once('@')) {
            Some((mailbox, host)) => (Some(mailbox.to_owned()), Some(host.to_owned())),
            None => (address, None),
        };
        nstring(out, mailbox.as_deref().map(str::as_bytes));
        out.push(b' ');
        nstring(out, host.as_deref().map(str::as_bytes));
        out.push(b')');
    }
    out.push(b')');
}

/// A display name as 7-bit text: as it is when ASCII, else an RFC 2047 encoded word.
fn encode_word(name: &str) -> Vec<u8> {
    if name.is_ascii() {
        return name.as_bytes().to_vec();
    }
    use base64::Engine;
    format!("=?utf-8?b?{}?=", base64::engine::general_purpose::STANDARD.encode(name)).into_bytes()
}

/// A header value on one line (folding removed).
fn unfold(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .copied()
        .filter(|&byte| byte != b'\r' && byte != b'\n')
        .collect()
}

fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&byte| byte == b'\n').count()
}

/// The header fields named (or all but those named), each with its continuation lines, and the
/// blank line that ends a header.
pub fn header_fields(header: &[u8], names: &[String], not: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in header.split_inclusive(|&byte| byte == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !line.starts_with(b" ") && !line.starts_with(b"\t") {
            let name = line.split(|&byte| byte == b':').next().unwrap_or_default();
            let named = names
                .iter()
                .any(|wanted| wanted.as_bytes().eq_ignore_ascii_case(name.trim_ascii()));
            keep = named != not;
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The value of a header field of a message (first occurrence, unfolded), for SEARCH.
pub fn header_value(raw: &[u8], name: &str) -> Option<String> {
    let header_end = find_header_end(raw);
    let fields = header_fields(&raw[..header_end], &[name.to_owned()], false);
    if fields.len() <= 2 {
        return None;
    }
    let text = String::from_utf8_lossy(&fields);
    let value = text.split_once(':').map(|(_, value)| value).unwrap_or_default();
    Some(value.replace(['\r', '\n'], ""))
}

fn find_header_end(raw: &[u8]) -> usize {
    raw.windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|position| position + 4)
        .or_else(|| {
            raw.windows(2)
                .position(|window| window == b"\n\n")
                .map(|position| position + 2)
        })
        .unwrap_or(raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &[u8] = b"From: Ann <ann@example.org>\r\nTo: bob@example.org\r\nSubject: Hello\r\nMessage-ID: <1@x>\r\n\r\nBody line\r\n";
    const MULTIPART: &[u8] = b"From: ann@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nfirst part\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--b1--\r\n";

    #[test]
    fn strings_are_quoted_or_sent_as_literals() {
        let mut out = Vec::new();
        string(&mut out, b"a \"b\" \\c");
        assert_eq!(out, b"\"a \\\"b\\\" \\\\c\"");
        out.clear();
        string(&mut out, b"two\r\nlines");
        assert_eq!(out, b"{10}\r\ntwo\r\nlines");
    }

    #[test]
    fn sections_of_a_simple_message() {
        let parsed = Parsed::new(SIMPLE);
        assert_eq!(parsed.section(&[], &SectionText::Full).unwrap(), SIMPLE);
        let header = parsed.section(&[], &SectionText::Header).unwrap();
        assert!(
            header.ends_with(b"Message-ID: <1@x>\r\n\r\n"),
            "{}",
            String::from_utf8_lossy(&header)
        );
        assert_eq!(parsed.section(&[], &SectionText::Text).unwrap(), b"Body line\r\n");
        assert_eq!(parsed.section(&[1], &SectionText::Full).unwrap(), b"Body line\r\n");
        let fields = SectionText::HeaderFields {
            names: vec!["subject".into()],
            not: false,
        };
        assert_eq!(parsed.section(&[], &fields).unwrap(), b"Subject: Hello\r\n\r\n");
        assert_eq!(parsed.section(&[2], &SectionText::Full), None);
    }

    #[test]
    fn sections_of_a_multipart_message() {
        let parsed = Parsed::new(MULTIPART);
        assert_eq!(parsed.section(&[1], &SectionText::Full).unwrap(), b"first part");
        assert_eq!(
            parsed.section(&[1], &SectionText::Mime).unwrap(),
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        let inner_header = parsed.section(&[2], &SectionText::Header).unwrap();
        assert_eq!(inner_header, b"Subject: inner\r\n\r\n");
        assert_eq!(parsed.section(&[2, 1], &SectionText::Full).unwrap(), b"inner body");
    }

    #[test]
    fn binary_undoes_the_transfer_encoding_of_a_part() {
        let message = b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECaGk=\r\n--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\ncaf=C3=A9 =\r\nau lait\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n--b--\r\n";
        let parsed = Parsed::new(message);
        assert_eq!(parsed.binary(&[1]).unwrap().unwrap(), b"\x00\x01\x02hi");
        assert_eq!(parsed.binary(&[2]).unwrap().unwrap(), "café au lait".as_bytes());
        assert_eq!(parsed.binary(&[3]).unwrap().unwrap(), b"plain");
        assert_eq!(
            parsed.binary(&[4]),
            Err(BinaryError::UnknownEncoding("x-uuencode".into()))
        );
        assert_eq!(parsed.binary(&[5]), Ok(None));
        assert_eq!(parsed.binary(&[]).unwrap().unwrap(), message);
        // A single-part message's part 1 is its body, encoded as its header says.
        let single = Parsed::new(b"Subject: x\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n");
        assert_eq!(single.binary(&[1]).unwrap().unwrap(), b"hello");
        let mut out = Vec::new();
        binary_literal(&mut out, b"a\x00b");
        assert_eq!(out, b"~{3}\r\na\x00b");
    }

    #[test]
    fn envelope_and_body_structure() {
        let mut out = Vec::new();
        Parsed::new(SIMPLE).envelope(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "(NIL \"Hello\" ((\"Ann\" NIL \"ann\" \"example.org\")) ((\"Ann\" NIL \"ann\" \"example.org\")) \
             ((\"Ann\" NIL \"ann\" \"example.org\")) ((NIL NIL \"bob\" \"example.org\")) NIL NIL NIL \"<1@x>\")"
        );
        let mut out = Vec::new();
        Parsed::new(MULTIPART).body_structure(&mut out, false);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 10 0)"),
            "{text}"
        );
        assert!(text.contains("(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\""), "{text}");
        assert!(text.ends_with(" \"MIXED\")"), "{text}");
    }
}
