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
    /// The From: header's addresses, so a list view's sender needs no read of the message.
    /// `Unknown` in listings kept by builds before this field (a reindex fills it in).
    #[serde(default)]
    pub from_addresses: KeptAddresses,
}

/// An address header's addresses, groups flattened, as a listing keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeptAddresses {
    /// Not kept: read the message.
    #[default]
    Unknown,
    /// The message has no such header.
    Absent,
    List(Vec<ListedAddress>),
}

/// One address of a header: its display name (trimmed, `None` when empty) and its address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedAddress {
    pub name: Option<String>,
    pub email: String,
}

impl ListedAddress {
    pub(crate) fn of(address: &mail_parser::Addr<'_>) -> ListedAddress {
        ListedAddress {
            name: address
                .name()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty()),
            email: address.address().unwrap_or_default().trim().to_owned(),
        }
    }
}

/// The addresses of an address header (RFC 8621 §4.1.2.3's Addresses form: groups flattened),
/// `Absent` when there is no such header.
pub fn addresses_of(address: Option<&mail_parser::Address<'_>>) -> KeptAddresses {
    match address {
        None => KeptAddresses::Absent,
        Some(mail_parser::Address::List(list)) => KeptAddresses::List(list.iter().map(ListedAddress::of).collect()),
        Some(mail_parser::Address::Group(groups)) => KeptAddresses::List(
            groups
                .iter()
                .flat_map(|group| group.addresses.iter())
                .map(ListedAddress::of)
                .collect(),
        ),
    }
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
        from_addresses: addresses_of(message.from()),
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
    let mut body = String::new();
    collect_text(&message, 0, &mut body);
    if body.trim().is_empty() {
        // A header block with no blank line after it leaves the body inside the "headers": search
        // the raw text rather than lose its words.
        body = String::from_utf8_lossy(raw).into_owned();
    }
    let body = truncate(&body, SEARCH_BODY_BYTES);
    SearchText {
        from: format!("{from_name} {from_address}"),
        to: to.join(" "),
        subject: message.subject().unwrap_or_default().to_owned(),
        body,
    }
}

/// The most levels of attached messages (message/rfc822, digest parts) read for search.
const SEARCH_NESTING: usize = 8;

/// Appends the text of every part at any depth: text of any subtype (RFC 2045 reads a bare
/// `text` as text/plain), HTML turned into text, attached messages with their From and Subject,
/// and attachment file names. Stops once the search limit is reached.
fn collect_text(message: &mail_parser::Message<'_>, depth: usize, out: &mut String) {
    use mail_parser::{MimeHeaders, PartType};
    let push = |out: &mut String, text: &str| {
        if out.len() < SEARCH_BODY_BYTES && !text.trim().is_empty() {
            out.push_str(text);
            out.push('\n');
        }
    };
    for part in &message.parts {
        if out.len() >= SEARCH_BODY_BYTES {
            return;
        }
        match &part.body {
            PartType::Text(text) => push(out, text),
            PartType::Html(html) => push(out, &mail_parser::decoders::html::html_to_text(html)),
            PartType::Message(attached) if depth < SEARCH_NESTING => {
                let (name, address) = address_text(attached.from());
                push(out, &format!("{name} {address}"));
                push(out, attached.subject().unwrap_or_default());
                collect_text(attached, depth + 1, out);
            }
            _ => {}
        }
        if let Some(name) = part.attachment_name() {
            push(out, name);
        }
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
    fn a_listing_keeps_every_from_address_and_old_listings_read_as_unknown() {
        let raw = b"From: \"Bob Smith \" <bob@example.org>, carol@example.org\r\nSubject: x\r\n\r\nbody";
        assert_eq!(
            listing(raw).from_addresses,
            KeptAddresses::List(vec![
                ListedAddress {
                    name: Some("Bob Smith".into()),
                    email: "bob@example.org".into()
                },
                ListedAddress {
                    name: None,
                    email: "carol@example.org".into()
                },
            ])
        );
        let group = b"From: Team: dave@example.org, erin@example.org;\r\n\r\nbody";
        assert!(matches!(listing(group).from_addresses, KeptAddresses::List(list) if list.len() == 2));
        assert_eq!(
            listing(b"Subject: no sender\r\n\r\nbody").from_addresses,
            KeptAddresses::Absent
        );
        // A listing written before the field existed: three fields only.
        #[derive(Serialize)]
        struct OldListing {
            date_millis: Option<u64>,
            from: String,
            subject: String,
        }
        let old = OldListing {
            date_millis: None,
            from: "Bob".into(),
            subject: "s".into(),
        };
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &old).unwrap();
        let read: Listing = cbor4ii::serde::from_slice(&bytes).unwrap();
        assert_eq!(read.from, "Bob");
        assert_eq!(read.from_addresses, KeptAddresses::Unknown);
    }

    fn body_of(raw: &str) -> String {
        search_text(raw.as_bytes()).body.to_lowercase()
    }

    #[test]
    fn search_reads_a_forwarded_message_and_its_headers() {
        let raw = "From: a@example.org\r\nSubject: Fwd\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: Quentin <q@example.org>\r\nSubject: zeppelin schedule\r\n\r\nthe airship leaves at noon\r\n--b--\r\n";
        let body = body_of(raw);
        for word in ["see below", "airship", "zeppelin", "quentin"] {
            assert!(body.contains(word), "{word:?} missing from {body:?}");
        }
    }

    #[test]
    fn search_reads_every_part_of_a_digest() {
        let raw = "From: list@example.org\r\nSubject: Digest\r\nMIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: first\r\n\r\nmarmalade recipe\r\n--d\r\n\r\nSubject: second\r\n\r\nquince harvest\r\n--d--\r\n";
        let body = body_of(raw);
        assert!(body.contains("marmalade") && body.contains("quince"), "{body:?}");
    }

    #[test]
    fn search_reads_text_without_a_subtype_html_and_attachment_names() {
        let bare = "From: a@example.org\r\nSubject: bare\r\nContent-Type: text\r\n\r\nplatypus sighting\r\n";
        assert!(body_of(bare).contains("platypus"));
        let html = "From: a@example.org\r\nSubject: html\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=h\r\n\r\n--h\r\nContent-Type: text/html\r\n\r\n<p>wombat <b>census</b></p>\r\n--h\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"budget-2027.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--h--\r\n";
        let body = body_of(html);
        assert!(body.contains("wombat") && body.contains("census"), "{body:?}");
        assert!(!body.contains("<b>"), "HTML tags were indexed: {body:?}");
        assert!(body.contains("budget-2027.pdf"), "{body:?}");
    }

    #[test]
    fn search_makes_a_best_effort_on_a_header_block_without_a_blank_line() {
        let raw = "From: a@example.org\r\nSubject: broken\r\nthis line has narwhal words\r\n";
        assert!(body_of(raw).contains("narwhal"));
    }

    #[test]
    fn attached_messages_nested_beyond_the_limit_do_not_recurse_forever() {
        let nested = |levels: usize| {
            let mut raw = "Subject: innermost\r\n\r\ndeepest words\r\n".to_owned();
            for level in 0..levels {
                raw = format!("Subject: layer{level}\r\nContent-Type: message/rfc822\r\n\r\n{raw}");
            }
            search_text(raw.as_bytes())
        };
        // Within the limit, the innermost message's words are found.
        let shallow = nested(3);
        assert!(shallow.body.contains("deepest words"), "{:?}", shallow.body);
        // Far beyond it, the reading stops at the limit: the outer layers only.
        let deep = nested(50);
        assert!(!deep.body.contains("deepest words"), "{:?}", deep.body);
        assert!(deep.body.contains("layer48"), "{:?}", deep.body);
        assert!(!deep.body.contains("layer20"), "{:?}", deep.body);
    }

    #[test]
    fn subject_keys_drop_reply_prefixes() {
        assert_eq!(subject_sort_key("Re: RE: Fwd: Budget"), b"budget".to_vec());
        assert_eq!(subject_sort_key("AW: Re[2]: Plan"), b"plan".to_vec());
        assert_eq!(subject_sort_key("Remember the milk"), b"remember the milk".to_vec());
        assert!(subject_sort_key(&"x".repeat(200)).len() <= SORT_KEY_BYTES);
    }
}
