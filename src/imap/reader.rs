//! The IMAP session's input path, without IO: bytes in, whole commands (or refusals) out.
//!
//! imap-codec's fragmentizer splits the byte stream into lines and literals, so that literal
//! bytes can never be taken for a command; this reader adds the limits (a line may not grow past
//! [`Limits::max_line_bytes`], a literal past [`Limits::max_literal_bytes`]), says when a
//! synchronising literal needs its `+` continuation, and decodes complete commands with
//! imap-codec. imap-codec does not know ESEARCH's `SEARCH RETURN (...)` (RFC 4731): the reader
//! takes the return options off the line and hands them on beside the command. The fuzz target
//! `imap_session` drives it with arbitrary bytes.

use bounded_static::IntoBoundedStatic;
use imap_codec::decode::Decoder;
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::command::Command;
use imap_codec::imap_types::core::LiteralMode;
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

/// A decoded command, with what imap-codec could not carry.
#[derive(Debug)]
pub struct Request {
    pub command: Command<'static>,
    /// A SEARCH (or UID SEARCH) with `RETURN (...)`: answer with ESEARCH.
    pub search_return: Option<SearchReturn>,
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
                    })),
                    _ => Event::Refused {
                        tag: self.tag(),
                        reason: "command not understood".into(),
                        too_big: false,
                    },
                };
            }
            let decoded = self.fragmentizer.decode_message(&CommandCodec::default());
            return match decoded {
                Ok(command) => Event::Command(Box::new(Request {
                    command: command.into_static(),
                    search_return: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::command::CommandBody;

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
}
