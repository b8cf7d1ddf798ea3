//! The IMAP session's input path, without IO: bytes in, whole commands (or refusals) out.
//!
//! imap-codec's fragmentizer splits the byte stream into lines and literals, so that literal
//! bytes can never be taken for a command; this reader adds the limits (a line may not grow past
//! [`Limits::max_line_bytes`], a literal past [`Limits::max_literal_bytes`]), says when a
//! synchronising literal needs its `+` continuation, and decodes complete commands with
//! imap-codec. imap-codec does not know ESEARCH's `SEARCH RETURN (...)` (RFC 4731), nor the
//! extended LIST of LIST-EXTENDED (RFC 5258) and LIST-STATUS (RFC 5819): its `ext_list_extended`
//! feature only has the response items. So the reader takes the return options off a SEARCH
//! line, and reads an extended LIST itself ([`ListOptions`]), handing imap-codec a plain LIST of
//! the reference and the first pattern; both travel beside the command. The fuzz target
//! `imap_session` drives it with arbitrary bytes.

use bounded_static::IntoBoundedStatic;
use imap_codec::decode::Decoder;
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::command::Command;
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::imap_types::status::StatusDataItemName;
use imap_codec::CommandCodec;

/// Sizes the reader accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest line (without its literals).
    pub max_line_bytes: usize,
    /// The largest literal (an APPEND's message).
    pub max_literal_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            max_literal_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What ESEARCH's `RETURN (...)` asks for (RFC 4731); `RETURN ()` means ALL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchReturn {
    pub min: bool,
    pub max: bool,
    pub count: bool,
    pub all: bool,
}

/// What an extended LIST asks for beyond a basic one (RFC 5258 selection and return options,
/// RFC 6154's SPECIAL-USE, RFC 5819's `RETURN (STATUS (...))`), and every pattern it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Selection SUBSCRIBED: only subscribed mailboxes (implies [`Self::return_subscribed`]).
    pub subscribed: bool,
    /// Selection SPECIAL-USE: only mailboxes with a special use.
    pub special_use: bool,
    /// Selection RECURSIVEMATCH: also parents with a selected descendant, with CHILDINFO.
    pub recursive_match: bool,
    /// Return SUBSCRIBED: the `\Subscribed` attribute.
    pub return_subscribed: bool,
    /// Return CHILDREN (always answered: `\HasChildren` or `\HasNoChildren`).
    pub return_children: bool,
    /// Return SPECIAL-USE (always answered).
    pub return_special_use: bool,
    /// Return STATUS: these items in a STATUS response after each selectable mailbox.
    pub status: Vec<StatusDataItemName>,
    /// The patterns, raw (`LIST "" ("INBOX" "Sent/%")`); the command carries the first.
    pub patterns: Vec<Vec<u8>>,
}

/// A decoded command, with what imap-codec could not carry.
#[derive(Debug)]
pub struct Request {
    pub command: Command<'static>,
    /// A SEARCH (or UID SEARCH) with `RETURN (...)`: answer with ESEARCH.
    pub search_return: Option<SearchReturn>,
    /// An extended LIST: its options and patterns (the command is a LIST of the first pattern).
    pub list: Option<ListOptions>,
}

/// What the reader found next.
#[derive(Debug)]
pub enum Event {
    /// More bytes are needed.
    NeedMore,
    /// The client waits for `+` before it sends a synchronising literal.
    Continue,
    /// A complete command.
    Command(Box<Request>),
    /// A complete line read as raw text (an AUTHENTICATE response or IDLE's DONE), without CRLF.
    Line(Vec<u8>),
    /// A command that cannot be used; the session goes on. `too_big` when a literal was refused.
    Refused {
        tag: Option<String>,
        reason: String,
        too_big: bool,
    },
    /// A line grew past the limit: answer BAD and close, since where it ends is unknown.
    LineTooLong,
}

/// Splits input into commands.
pub struct Reader {
    fragmentizer: Fragmentizer,
    limits: Limits,
    /// Bytes enqueued since the last complete fragment.
    pending: usize,
    /// A literal's bytes come next.
    in_literal: bool,
    /// A refused non-synchronising literal: its bytes are read and dropped.
    refused_literal: bool,
}

impl Reader {
    pub fn new(limits: Limits) -> Reader {
        let most = limits
            .max_literal_bytes
            .saturating_add(limits.max_line_bytes as u32)
            .saturating_add(1024);
        Reader {
            fragmentizer: Fragmentizer::new(most),
            limits,
            pending: 0,
            in_literal: false,
            refused_literal: false,
        }
    }

    /// Adds bytes read from the client.
    pub fn enqueue(&mut self, bytes: &[u8]) {
        self.pending += bytes.len();
        self.fragmentizer.enqueue_bytes(bytes);
    }

    /// The next event; `raw` reads the next line as text instead of as a command.
    pub fn next(&mut self, raw: bool) -> Event {
        loop {
            let Some(fragment) = self.fragmentizer.progress() else {
                if !self.in_literal && self.pending > self.limits.max_line_bytes {
                    return Event::LineTooLong;
                }
                return Event::NeedMore;
            };
            self.pending = 0;
            match fragment {
                FragmentInfo::Line { announcement, .. } => {
                    self.in_literal = false;
                    if let Some(LiteralAnnouncement { mode, length }) = announcement {
                        if raw {
                            // No literal belongs in a raw line: refuse it whole.
                            self.fragmentizer.poison_message();
                        }
                        if length > self.limits.max_literal_bytes {
                            if mode == LiteralMode::Sync {
                                let tag = self.tag();
                                self.fragmentizer.skip_message();
                                return Event::Refused {
                                    tag,
                                    reason: format!("literal of {length} bytes is over the limit"),
                                    too_big: true,
                                };
                            }
                            self.refused_literal = true;
                            self.fragmentizer.poison_message();
                        }
                        self.in_literal = true;
                        if mode == LiteralMode::Sync {
                            return Event::Continue;
                        }
                        continue;
                    }
                }
                FragmentInfo::Literal { .. } => {
                    self.in_literal = false;
                    continue;
                }
            }
            if !self.fragmentizer.is_message_complete() {
                continue;
            }
            if raw {
                let mut line = self.fragmentizer.message_bytes().to_vec();
                if self.fragmentizer.is_message_poisoned() {
                    return Event::Refused {
                        tag: None,
                        reason: "unexpected literal".into(),
                        too_big: false,
                    };
                }
                while line.last().is_some_and(|&byte| byte == b'\n' || byte == b'\r') {
                    line.pop();
                }
                return Event::Line(line);
            }
            if std::mem::take(&mut self.refused_literal) {
                return Event::Refused {
                    tag: self.tag(),
                    reason: "literal over the limit".into(),
                    too_big: true,
                };
            }
            if let Some((line, search_return)) = strip_search_return(self.fragmentizer.message_bytes()) {
                return match CommandCodec::default().decode(&line) {
                    Ok((rest, command)) if rest.is_empty() => Event::Command(Box::new(Request {
                        command: command.into_static(),
                        search_return: Some(search_return),
                        list: None,
                    })),
                    _ => Event::Refused {
                        tag: self.tag(),
                        reason: "command not understood".into(),
                        too_big: false,
                    },
                };
            }
            match read_list_extended(self.fragmentizer.message_bytes()) {
                ListLine::Plain => {}
                ListLine::Invalid(reason) => {
                    return Event::Refused {
                        tag: self.tag(),
                        reason,
                        too_big: false,
                    }
                }
                ListLine::Extended { line, options } => {
                    return match CommandCodec::default().decode(&line) {
                        Ok((rest, command)) if rest.is_empty() => Event::Command(Box::new(Request {
                            command: command.into_static(),
                            search_return: None,
                            list: Some(options),
                        })),
                        _ => Event::Refused {
                            tag: self.tag(),
                            reason: "LIST not understood".into(),
                            too_big: false,
                        },
                    };
                }
            }
            let decoded = self.fragmentizer.decode_message(&CommandCodec::default());
            return match decoded {
                Ok(command) => Event::Command(Box::new(Request {
                    command: command.into_static(),
                    search_return: None,
                    list: None,
                })),
                Err(error) => {
                    let reason = match error {
                        imap_codec::fragmentizer::DecodeMessageError::MessageTooLong { .. } => {
                            "command over the size limit".to_owned()
                        }
                        _ => "command not understood".to_owned(),
                    };
                    Event::Refused {
                        tag: self.tag(),
                        reason,
                        too_big: false,
                    }
                }
            };
        }
    }

    fn tag(&self) -> Option<String> {
        self.fragmentizer.decode_tag().map(|tag| tag.inner().to_owned())
    }
}

/// `tag [UID ]SEARCH RETURN (options) criteria`: the line without `RETURN (options) ` and the
/// options; `None` for every other line (and for unknown options, which then fail to decode).
fn strip_search_return(message: &[u8]) -> Option<(Vec<u8>, SearchReturn)> {
    let tag_end = message.iter().position(|&byte| byte == b' ')?;
    let mut at = tag_end + 1;
    let rest = |at: usize| message.get(at..).unwrap_or_default();
    let starts =
        |at: usize, word: &[u8]| rest(at).len() >= word.len() && rest(at)[..word.len()].eq_ignore_ascii_case(word);
    if starts(at, b"UID ") {
        at += 4;
    }
    if !starts(at, b"SEARCH RETURN (") {
        return None;
    }
    let options_start = at + b"SEARCH RETURN (".len();
    let close = options_start + rest(options_start).iter().position(|&byte| byte == b')')?;
    let mut search_return = SearchReturn::default();
    for option in message[options_start..close]
        .split(|&byte| byte == b' ')
        .filter(|word| !word.is_empty())
    {
        match option.to_ascii_uppercase().as_slice() {
            b"MIN" => search_return.min = true,
            b"MAX" => search_return.max = true,
            b"COUNT" => search_return.count = true,
            b"ALL" => search_return.all = true,
            _ => return None,
        }
    }
    if search_return == SearchReturn::default() {
        search_return.all = true;
    }
    let mut line = message[..at + b"SEARCH".len()].to_vec();
    // Past `)`: a space, then the criteria (with the charset, if any).
    line.extend_from_slice(rest(close + 1));
    Some((line, search_return))
}

/// How a line reads as an extended LIST.
enum ListLine {
    /// Not a LIST, or a basic one (imap-codec decodes it).
    Plain,
    /// An extended LIST: a basic LIST of the reference and the first pattern, and the rest.
    Extended { line: Vec<u8>, options: ListOptions },
    /// An extended LIST with an option this server must refuse (RFC 5258 3: BAD).
    Invalid(String),
}

/// Reads `tag LIST [(selection)] reference (pattern | (patterns)) [RETURN (options)]` (RFC 5258
/// 6, RFC 5819 4). A line that does not parse as one is left to imap-codec, which refuses it.
fn read_list_extended(message: &[u8]) -> ListLine {
    let Some(tag_end) = message.iter().position(|&byte| byte == b' ') else {
        return ListLine::Plain;
    };
    let mut words = Words {
        bytes: message,
        at: tag_end + 1,
    };
    if !words.keyword(b"LIST ") {
        return ListLine::Plain;
    }
    let mut extended = false;
    let mut options = ListOptions::default();
    let mut selection = Vec::new();
    if words.peek() == Some(b'(') {
        extended = true;
        let Some(atoms) = words.atom_list() else {
            return ListLine::Plain;
        };
        selection = atoms;
        if !words.keyword(b" ") {
            return ListLine::Plain;
        }
    }
    let Some(reference) = words.string() else {
        return ListLine::Plain;
    };
    if !words.keyword(b" ") {
        return ListLine::Plain;
    }
    if words.peek() == Some(b'(') {
        extended = true;
        words.at += 1;
        loop {
            let Some(pattern) = words.string() else {
                return ListLine::Plain;
            };
            options.patterns.push(pattern);
            if words.keyword(b")") {
                break;
            }
            if !words.keyword(b" ") {
                return ListLine::Plain;
            }
        }
    } else {
        let Some(pattern) = words.string() else {
            return ListLine::Plain;
        };
        options.patterns.push(pattern);
    }
    let mut returns = Vec::new();
    let mut status = None;
    if words.keyword(b" RETURN (") {
        extended = true;
        loop {
            if words.keyword(b")") {
                break;
            }
            let Some(atom) = words.atom() else {
                return ListLine::Plain;
            };
            if atom.eq_ignore_ascii_case(b"STATUS") {
                words.keyword(b" ");
                let Some(items) = words.atom_list() else {
                    return ListLine::Plain;
                };
                status = Some(items);
            } else {
                returns.push(atom);
            }
            words.keyword(b" ");
        }
    }
    if !extended {
        return ListLine::Plain;
    }
    if !matches!(words.rest(), b"\r\n" | b"\n") {
        return ListLine::Plain;
    }
    let upper = |atom: &[u8]| String::from_utf8_lossy(atom).to_ascii_uppercase();
    for atom in &selection {
        match upper(atom).as_str() {
            "SUBSCRIBED" => options.subscribed = true,
            "SPECIAL-USE" => options.special_use = true,
            // This node has no remote mailboxes to add (RFC 2193).
            "REMOTE" => {}
            "RECURSIVEMATCH" => options.recursive_match = true,
            other => return ListLine::Invalid(format!("unknown LIST selection option {other}")),
        }
    }
    // RFC 5258 3.1: never alone; SUBSCRIBED is the one base option that CHILDINFO can name here.
    if options.recursive_match && !options.subscribed {
        return ListLine::Invalid("RECURSIVEMATCH needs the SUBSCRIBED selection option".into());
    }
    for atom in &returns {
        match upper(atom).as_str() {
            "SUBSCRIBED" => options.return_subscribed = true,
            "CHILDREN" => options.return_children = true,
            "SPECIAL-USE" => options.return_special_use = true,
            other => return ListLine::Invalid(format!("unknown LIST return option {other}")),
        }
    }
    options.return_subscribed |= options.subscribed;
    for item in status.unwrap_or_default() {
        options.status.push(match upper(&item).as_str() {
            "MESSAGES" => StatusDataItemName::Messages,
            "RECENT" => StatusDataItemName::Recent,
            "UIDNEXT" => StatusDataItemName::UidNext,
            "UIDVALIDITY" => StatusDataItemName::UidValidity,
            "UNSEEN" => StatusDataItemName::Unseen,
            "DELETED" => StatusDataItemName::Deleted,
            "HIGHESTMODSEQ" => StatusDataItemName::HighestModSeq,
            other => return ListLine::Invalid(format!("unknown STATUS item {other}")),
        });
    }
    // imap-codec reads the reference and the first pattern, whatever bytes they hold, as literals.
    let mut line = message[..tag_end].to_vec();
    line.extend_from_slice(b" LIST ");
    for (index, text) in [&reference, &options.patterns[0]].into_iter().enumerate() {
        if index > 0 {
            line.push(b' ');
        }
        line.extend_from_slice(format!("{{{}+}}\r\n", text.len()).as_bytes());
        line.extend_from_slice(text);
    }
    line.extend_from_slice(b"\r\n");
    ListLine::Extended { line, options }
}

/// A cursor over a command line for [`read_list_extended`].
struct Words<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Words<'_> {
    fn rest(&self) -> &[u8] {
        self.bytes.get(self.at..).unwrap_or_default()
    }

    fn peek(&self) -> Option<u8> {
        self.rest().first().copied()
    }

    /// Skips `word` (without case) if it comes next.
    fn keyword(&mut self, word: &[u8]) -> bool {
        let rest = self.rest();
        if rest.len() >= word.len() && rest[..word.len()].eq_ignore_ascii_case(word) {
            self.at += word.len();
            true
        } else {
            false
        }
    }

    /// An atom (a list-mailbox's characters, `%` and `*` included).
    fn atom(&mut self) -> Option<Vec<u8>> {
        let length = self
            .rest()
            .iter()
            .take_while(|&&byte| byte > b' ' && byte < 0x7f && !b"(){\"\\".contains(&byte))
            .count();
        if length == 0 {
            return None;
        }
        let atom = self.rest()[..length].to_vec();
        self.at += length;
        Some(atom)
    }

    /// `(atom atom ...)`, possibly empty.
    fn atom_list(&mut self) -> Option<Vec<Vec<u8>>> {
        if !self.keyword(b"(") {
            return None;
        }
        let mut atoms = Vec::new();
        loop {
            if self.keyword(b")") {
                return Some(atoms);
            }
            atoms.push(self.atom()?);
            if !self.keyword(b" ") && self.peek() != Some(b')') {
                return None;
            }
        }
    }

    /// An astring or list-mailbox: an atom, a quoted string or a literal.
    fn string(&mut self) -> Option<Vec<u8>> {
        match self.peek()? {
            b'"' => {
                let mut text = Vec::new();
                let mut at = self.at + 1;
                loop {
                    match *self.bytes.get(at)? {
                        b'"' => break,
                        b'\\' => {
                            text.push(*self.bytes.get(at + 1)?);
                            at += 2;
                        }
                        b'\r' | b'\n' => return None,
                        byte => {
                            text.push(byte);
                            at += 1;
                        }
                    }
                }
                self.at = at + 1;
                Some(text)
            }
            b'{' => {
                let rest = self.rest();
                let close = rest.iter().position(|&byte| byte == b'}')?;
                let digits = rest[1..close].strip_suffix(b"+").unwrap_or(&rest[1..close]);
                let length: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
                let after = rest.get(close + 1..)?;
                let start = close
                    + 1
                    + if after.starts_with(b"\r\n") {
                        2
                    } else if after.starts_with(b"\n") {
                        1
                    } else {
                        return None;
                    };
                let text = rest.get(start..start.checked_add(length)?)?.to_vec();
                self.at += start + length;
                Some(text)
            }
            _ => self.atom(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::command::CommandBody;
    use imap_codec::imap_types::mailbox::ListMailbox;

    fn limits() -> Limits {
        Limits {
            max_line_bytes: 100,
            max_literal_bytes: 10,
        }
    }

    #[test]
    fn a_command_comes_out_whole() {
        let mut reader = Reader::new(limits());
        reader.enqueue(b"a1 NOO");
        assert!(matches!(reader.next(false), Event::NeedMore));
        reader.enqueue(b"P\r\n");
        match reader.next(false) {
            Event::Command(request) => {
                assert_eq!(request.command.tag.inner(), "a1");
                assert!(matches!(request.command.body, CommandBody::Noop));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn synchronising_literals_wait_for_continuation_and_big_ones_are_refused() {
        let mut reader = Reader::new(limits());
        reader.enqueue(b"a2 LOGIN {3}\r\n");
        assert!(matches!(reader.next(false), Event::Continue));
        reader.enqueue(b"ann \"secret\"\r\n");
        assert!(matches!(reader.next(false), Event::Command(_)));
        reader.enqueue(b"a3 APPEND INBOX {11}\r\na4 NOOP\r\n");
        match reader.next(false) {
            Event::Refused { tag, too_big, .. } => {
                assert_eq!(tag.as_deref(), Some("a3"));
                assert!(too_big);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(reader.next(false), Event::Command(request) if request.command.tag.inner() == "a4"));
    }

    #[test]
    fn a_big_non_synchronising_literal_is_read_and_dropped() {
        let mut reader = Reader::new(limits());
        reader.enqueue(b"a5 APPEND INBOX {12+}\r\nA4 NOOP\r\nxx\r\na6 NOOP\r\n");
        assert!(matches!(reader.next(false), Event::Refused { too_big: true, .. }));
        assert!(matches!(reader.next(false), Event::Command(request) if request.command.tag.inner() == "a6"));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut reader = Reader::new(limits());
        reader.enqueue(&[b'a'; 200]);
        assert!(matches!(reader.next(false), Event::LineTooLong));
    }

    #[test]
    fn garbage_is_refused_with_its_tag_and_raw_lines_come_as_text() {
        let mut reader = Reader::new(limits());
        reader.enqueue(b"t1 FROBNICATE\r\nDONE\r\n");
        assert!(matches!(reader.next(false), Event::Refused { tag: Some(tag), .. } if tag == "t1"));
        assert!(matches!(reader.next(true), Event::Line(line) if line == b"DONE"));
    }

    #[test]
    fn search_return_options_are_taken_off_the_line() {
        let mut reader = Reader::new(limits());
        reader.enqueue(b"s1 UID SEARCH RETURN (MIN COUNT) UNSEEN\r\ns2 SEARCH RETURN () ALL\r\n");
        match reader.next(false) {
            Event::Command(request) => {
                assert!(matches!(request.command.body, CommandBody::Search { uid: true, .. }));
                let options = request.search_return.expect("ESEARCH options");
                assert!(options.min && options.count && !options.max && !options.all);
            }
            other => panic!("{other:?}"),
        }
        match reader.next(false) {
            Event::Command(request) => assert_eq!(
                request.search_return,
                Some(SearchReturn {
                    all: true,
                    ..SearchReturn::default()
                })
            ),
            other => panic!("{other:?}"),
        }
        reader.enqueue(b"s3 SEARCH RETURN (SAVE) ALL\r\n");
        assert!(matches!(reader.next(false), Event::Refused { tag: Some(tag), .. } if tag == "s3"));
    }

    fn limits_for_lists() -> Limits {
        Limits {
            max_line_bytes: 1000,
            max_literal_bytes: 100,
        }
    }

    #[test]
    fn an_extended_list_comes_with_its_options_and_every_pattern() {
        let mut reader = Reader::new(limits_for_lists());
        reader.enqueue(
            b"l1 LIST (SUBSCRIBED RECURSIVEMATCH remote) \"\" (\"INBOX\" Sent/% {4+}\r\nA\"b*) RETURN (CHILDREN STATUS (MESSAGES UNSEEN) SPECIAL-USE)\r\n",
        );
        match reader.next(false) {
            Event::Command(request) => {
                match &request.command.body {
                    CommandBody::List {
                        mailbox_wildcard: ListMailbox::String(pattern),
                        ..
                    } => assert_eq!(pattern.as_ref(), b"INBOX"),
                    other => panic!("{other:?}"),
                }
                let options = request.list.expect("LIST-EXTENDED options");
                assert!(options.subscribed && options.recursive_match && options.return_subscribed);
                assert!(options.return_children && options.return_special_use && !options.special_use);
                assert_eq!(
                    options.status,
                    vec![StatusDataItemName::Messages, StatusDataItemName::Unseen]
                );
                assert_eq!(
                    options.patterns,
                    vec![b"INBOX".to_vec(), b"Sent/%".to_vec(), b"A\"b*".to_vec()]
                );
            }
            other => panic!("{other:?}"),
        }
        reader.enqueue(b"l2 LIST \"\" \"*\"\r\nl3 LIST \"\" % RETURN ()\r\n");
        assert!(matches!(reader.next(false), Event::Command(request) if request.list.is_none()));
        assert!(matches!(reader.next(false), Event::Command(request) if request.list.is_some()));
    }

    #[test]
    fn unknown_list_options_and_a_lone_recursivematch_are_refused() {
        let mut reader = Reader::new(limits_for_lists());
        reader.enqueue(b"b1 LIST (RECURSIVEMATCH) \"\" *\r\nb2 LIST (FROB) \"\" *\r\nb3 LIST \"\" * RETURN (STATUS (SIZE))\r\nb4 LIST () \"\" (\r\n");
        for tag in ["b1", "b2", "b3", "b4"] {
            assert!(
                matches!(reader.next(false), Event::Refused { tag: Some(found), too_big: false, .. } if found == tag),
                "{tag}"
            );
        }
    }
}
