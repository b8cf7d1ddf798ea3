//! Reading what queries need out of raw RFC 5322 messages, leniently.
//!
//! Broken mail is stored and indexed with whatever could be read: a message without a Date gets
//! its received time, one without a From sorts first, undecodable charsets come through as
//! mail-parser decodes them (lossy where it must). Nothing here refuses a message.

use serde::{Deserialize, Serialize};

/// The most bytes of a sort key kept (longer keys tie-break by message ID).
pub const SORT_KEY_BYTES: usize = 64;
/// The most bytes of body text given to the search index.
pub const SEARCH_BODY_BYTES: usize = 64 * 1024;

/// What listings and sorts show of a message; kept per record in the node-local store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The Date: header in milliseconds since the epoch, if it parsed.
    pub date_millis: Option<u64>,
    /// The From: display name, else its address.
    pub from: String,
    /// The Subject: header as written.
    pub subject: String,
}

/// Text for the search index.
#[derive(Clone, Debug, Default)]
pub struct SearchText {
    pub from: String,
    pub to: String,
    pub subject: String,
    pub body: String,
}

fn parse(raw: &[u8]) -> Option<mail_parser::Message<'_>> {
    mail_parser::MessageParser::default().parse(raw)
}

fn address_text(address: Option<&mail_parser::Address<'_>>) -> (String, String) {
    match address.and_then(|address| address.first()) {
        Some(first) => {
            let name = first.name().unwrap_or_default().trim().to_owned();
            let mailbox = first.address().unwrap_or_default().trim().to_owned();
            (name, mailbox)
        }
        None => (String::new(), String::new()),
    }
}

/// The listing of a raw message.
pub fn listing(raw: &[u8]) -> Listing {
    let Some(message) = parse(raw) else {
        return Listing::default();
    };
    let (name, address) = address_text(message.from());
    let date_millis = message
        .date()
        .and_then(|date| u64::try_from(date.to_timestamp()).ok())
        .map(|seconds| seconds * 1000);
    Listing {
        date_millis,
        from: if name.is_empty() { address } else { name },
        subject: message.subject().unwrap_or_default().trim().to_owned(),
    }
}

/// The searchable text of a raw message.
pub fn search_text(raw: &[u8]) -> SearchText {
    let Some(message) = parse(raw) else {
        // Not parseable at all: search the bytes as text.
        return SearchText {
            body: truncate(&String::from_utf8_lossy(raw), SEARCH_BODY_BYTES),
            ..SearchText::default()
        };
    };
    let (from_name, from_address) = address_text(message.from());
    let to: Vec<String> = message
        .to()
        .map(|address| {
            address
                .clone()
                .into_list()
                .into_iter()
                .map(|addr| {
                    format!(
                        "{} {}",
                        addr.name().unwrap_or_default(),
                        addr.address().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let body = message
        .body_text(0)
        .map(|text| truncate(&text, SEARCH_BODY_BYTES))
        .unwrap_or_default();
    SearchText {
        from: format!("{from_name} {from_address}"),
        to: to.join(" "),
        subject: message.subject().unwrap_or_default().to_owned(),
        body,
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Case-folded sort key for names and subjects, at most [`SORT_KEY_BYTES`] bytes, without NUL.
pub fn text_sort_key(text: &str) -> Vec<u8> {
    let folded: String = text
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c == '\0' { ' ' } else { c })
        .collect();
    truncate(&folded, SORT_KEY_BYTES).into_bytes()
}

/// A subject without reply and forward prefixes (Re:, Fwd:, Fw:, AW:, WG:, SV:, also "Re[2]:"),
/// case-folded, as a sort key.
pub fn subject_sort_key(subject: &str) -> Vec<u8> {
    let mut rest = subject.trim();
    loop {
        let lower = rest.to_ascii_lowercase();
        let mut stripped = None;
        for prefix in ["re", "fwd", "fw", "aw", "wg", "sv", "vs", "tr"] {
            if let Some(after) = lower.strip_prefix(prefix) {
                let after_counter = match after.strip_prefix('[') {
                    Some(inner) => inner.find(']').map(|end| &inner[end + 1..]).unwrap_or(after),
                    None => after,
                };
                if let Some(tail) = after_counter.strip_prefix(':') {
                    stripped = Some(rest.len() - tail.len());
                    break;
                }
            }
        }
        match stripped {
            Some(offset) => rest = rest[offset..].trim_start(),
            None => break,
        }
    }
    text_sort_key(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_headers_of_ordinary_mail() {
        let raw = b"From: \"Bob Smith\" <bob@example.org>\r\nTo: alice@example.org\r\nSubject: Re: Invoice 42\r\nDate: Sun, 29 Nov 2026 08:00:00 +0000\r\n\r\nPlease pay the invoice.\r\n";
        let listing = listing(raw);
        assert_eq!(listing.from, "Bob Smith");
        assert_eq!(listing.subject, "Re: Invoice 42");
        assert_eq!(listing.date_millis, Some(1_795_939_200_000));
        let text = search_text(raw);
        assert!(text.body.contains("invoice"));
        assert!(text.to.contains("alice@example.org"));
    }

    #[test]
    fn broken_mail_is_read_leniently() {
        for raw in [
            &b""[..],
            b"\xff\xfe\x00garbage",
            b"Subject: =?x-unknown?Q?abc?=\r\n",
            b"From: <>\r\nDate: yesterday\r\n\r\nbody",
        ] {
            let listing = listing(raw);
            let _ = search_text(raw);
            assert!(listing.date_millis.is_none() || raw.is_empty());
        }
        let latin1 =
            b"From: =?iso-8859-1?Q?J=F6rg?= <j@example.de>\r\nSubject: =?iso-8859-1?Q?Gr=FC=DFe?=\r\n\r\nHallo";
        let listing = listing(latin1);
        assert_eq!(listing.from, "J\u{f6}rg");
        assert_eq!(listing.subject, "Gr\u{fc}\u{df}e");
        let eight_bit = b"From: Ren\xc3\xa9 <r@example.fr>\r\nSubject: caf\xc3\xa9\r\n\r\nx";
        assert_eq!(super::listing(eight_bit).subject, "caf\u{e9}");
    }

    #[test]
    fn subject_keys_drop_reply_prefixes() {
        assert_eq!(subject_sort_key("Re: RE: Fwd: Budget"), b"budget".to_vec());
        assert_eq!(subject_sort_key("AW: Re[2]: Plan"), b"plan".to_vec());
        assert_eq!(subject_sort_key("Remember the milk"), b"remember the milk".to_vec());
        assert!(subject_sort_key(&"x".repeat(200)).len() <= SORT_KEY_BYTES);
    }
}
