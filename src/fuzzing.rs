//! The bodies of the cargo-fuzz targets, one function per target, so that the nightly-only fuzz
//! crate (fuzz/fuzz_targets/*.rs, each a one-line call into here) and the stable replay of saved
//! inputs in `tests/fuzz_regressions.rs` run the same code instead of two copies that drift.
//! Nothing here is used by the node itself.

use crate::changes::ChangeState;
use crate::merkle::{MemoryTree, StoredDepth};
use crate::model::{BlobHash, Flag, MailboxKey, MessageId, MessageRecord, NodeId};
use crate::sketch::{self, Decoder, DecoderLimits, SketchCells, SketchKey};
use crate::sketch_session::{self, Asker, SessionLimits};
use crate::sync::{self, SyncLimits};
use crate::wire::{self, Gossip, Request, Response};

/// What the cargo-fuzz target `sync_message` runs on one input.
pub fn sync_message(input: &[u8]) {
    let limits = SyncLimits::default();
    if let Ok(elements) = sync::decode(input, &limits) {
        let mut tree = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..64u128 {
            tree.insert(
                (1_767_225_600_000u128 + value * 977) << 80 | value,
                *blake3::hash(&value.to_le_bytes()).as_bytes(),
            );
        }
        let _ = sync::respond(&tree, &elements, &limits);
        let _ = sync::respond(&MemoryTree::new(StoredDepth::MAILBOX), &elements, &limits);
        let _ = sync::encode(&elements);
    }
}

/// What the cargo-fuzz target `record_states` runs on one input.
pub fn record_states(input: &[u8]) {
    let limits = SyncLimits::default();
    let record = MessageRecord::new(MessageId(1), BlobHash::of(b"x"), 1, 2, NodeId(3));
    if let Ok(states) = sync::decode_states(input, &limits) {
        assert_eq!(
            sync::decode_states(&sync::encode_states(&states), &limits).ok(),
            Some(states.clone())
        );
        for state in &states {
            let _ = sync::merge_state(&record, state);
        }
    }
    if let Ok(states) = sync::decode_keyed_states(input, &limits) {
        let _ = sync::encode_keyed_states(&states);
    }
    if let Ok(states) = sync::decode_indexed_states(input, &limits) {
        let _ = sync::encode_indexed_states(&states);
    }
}

/// What the cargo-fuzz target `accounts_file` runs on one input.
pub fn accounts_file(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    if let Err((line, problem)) = crate::accounts::Accounts::check_text(&text) {
        assert!(
            line >= 1 && line <= text.lines().count().max(1),
            "line {line} for {problem}"
        );
    }
    let _ = crate::api::decode_basic(&text);
}

/// What the cargo-fuzz target `request_frame` runs on one input.
pub fn request_frame(input: &[u8]) {
    if let Ok(request) = wire::decode::<Request>(input) {
        if wire::validate_request(&request).is_ok() {
            // What a responder decodes next from the frames that carry other encodings.
            match &request {
                Request::Sketch { message, .. } => {
                    let _ = sketch_session::decode(&message.0, &SessionLimits::default());
                }
                Request::SketchSettle { states, .. } => {
                    let _ = sync::decode_keyed_states(&states.0, &SyncLimits::default());
                }
                _ => {}
            }
        }
    }
}

/// What the cargo-fuzz target `response_frame` runs on one input.
pub fn response_frame(input: &[u8]) {
    let records = match wire::decode::<Response>(input) {
        Ok(Response::Records { records, .. }) => records,
        Ok(Response::Sketch { message, records, .. }) => {
            let _ = sketch_session::decode(&message.0, &SessionLimits::default());
            records
        }
        Ok(Response::SketchSettled { records, returned, .. }) => {
            let _ = sync::decode_indexed_states(&returned.0, &SyncLimits::default());
            records
        }
        _ => return,
    };
    for record in &records {
        if wire::validate_record(record).is_ok() {
            let _ = crate::crdt::state_hash(record);
        }
    }
}

/// What the cargo-fuzz target `gossip_frame` runs on one input.
pub fn gossip_frame(input: &[u8]) {
    if let Ok(Gossip::Operation { record, .. }) = wire::decode::<Gossip>(input) {
        if wire::validate_record(&record).is_ok() {
            let _ = crate::crdt::state_hash(&record);
        }
    }
}

/// What the cargo-fuzz target `appended_mail` runs on one input.
pub fn appended_mail(input: &[u8]) {
    let _ = crate::mail::listing(input);
    let text = crate::mail::search_text(input);
    let _ = crate::mail::subject_sort_key(&text.subject);
}

/// What the cargo-fuzz target `text_parsers` runs on one input.
pub fn text_parsers(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let _ = text.parse::<MessageId>();
    let _ = text.parse::<Flag>();
    let _ = text.parse::<BlobHash>();
    if let Some((account, mailbox)) = text.split_once('\n') {
        let _ = MailboxKey::new(account, mailbox);
    } else {
        let _ = MailboxKey::new(&text, &text);
    }
}

/// What the cargo-fuzz target `mailbox_snapshot` runs on one input: the bytes of a replicated
/// mailbox snapshot, as a peer could send them. A snapshot that decodes must fold and resolve
/// into a tree with its INBOX, and folding it twice must change nothing.
pub fn mailbox_snapshot(input: &[u8]) {
    let Some(record) = crate::service::decode_snapshot(input) else {
        return;
    };
    let once = crate::service::fold_snapshots([record.clone()]);
    assert_eq!(crate::service::fold_snapshots([record.clone(), record]), once);
    let tree = crate::mailbox::resolve("alice@example.org", once.values());
    assert!(tree.get(tree.inbox()).is_some());
}

/// What the cargo-fuzz target `change_state` runs on one input.
pub fn change_state(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(state) = ChangeState::decode(text) {
        let again = ChangeState::decode(&state.encode()).expect("a re-encoded token decodes");
        assert_eq!(again.encode(), state.encode());
    }
}

/// What the cargo-fuzz target `sketch_symbols` runs on one input.
pub fn sketch_symbols(input: &[u8]) {
    let limits = SessionLimits::default();
    let key = SketchKey::from_bytes([7; 16]);
    let mut tree = MemoryTree::new(StoredDepth::MAILBOX);
    let mut cells = SketchCells::new(key, 64);
    for value in 0..64u128 {
        let id = (1_767_225_600_000u128 + value * 977) << 80 | value;
        let hash = *blake3::hash(&value.to_le_bytes()).as_bytes();
        tree.insert(id, hash);
        cells.insert(id, &hash);
    }
    if let Ok(message) = sketch_session::decode(input, &limits) {
        let _ = sketch_session::respond(&tree, &cells, &message, &limits);
        if let Ok((mut asker, _)) = Asker::open(&tree, &cells, &limits, 0) {
            let _ = asker.on_reply(&tree, &cells, Some(message.clone()), 0);
        }
        let _ = sketch_session::encode(&message);
    }
    if let Ok((start, theirs)) = sketch::decode_cells(input, 64) {
        let mut decoder = Decoder::new(key, DecoderLimits { max_cells: 64 });
        let end = start.saturating_add(theirs.len() as u64);
        if decoder.add_cells(start, &theirs, cells.cells(start, end)).is_ok() {
            decoder.peel(|_, _| true);
            assert!(decoder.recovered().count() as u64 <= decoder.received());
            let _ = decoder.estimate_remaining();
        }
    }
}

/// What the cargo-fuzz target `jmap_request` runs on one input: a JMAP request body through
/// the shape check, then every call's result references against the echoes of the calls before,
/// and the argument readers of the mail methods that need no service (Email/query's filter and
/// sort, Email/set's keyword patches and creations (each written as a message and parsed back),
/// Email/get's properties and body arguments, Email/parse's
/// part blobIds, SearchSnippet/get's filter, the EventSource query string).
pub fn jmap_request(input: &[u8]) {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(input) else {
        return;
    };
    if let Ok((_, calls)) = crate::jmap::check_request(&request) {
        let mut responses = Vec::new();
        for call in calls {
            if let Ok(arguments) = crate::jmap::resolve_references(&call.arguments, &responses) {
                jmap_arguments(&call.name, &arguments);
                responses.push(serde_json::json!([call.name, arguments, call.call_id]));
            }
        }
    }
    if let Some(path) = request.get("path").and_then(|path| path.as_str()) {
        let _ = crate::jmap::evaluate_pointer(&request, path);
    }
}

/// What JMAP reads out of a stored message, on any bytes: the body properties, every header form,
/// the thread id, a part's blob and the search snippet marking. Run by `examples/fuzz_decoders`
/// in its `mail` group.
pub fn jmap_message(input: &[u8]) {
    use crate::jmap::{body, snippet};
    let id = crate::model::MessageId(1);
    let _ = crate::service::threads::thread_id(input, id);
    let options = body::BodyOptions {
        properties: body::BODY_PROPERTIES.iter().map(|name| (*name).to_owned()).collect(),
        fetch_text: true,
        fetch_html: true,
        fetch_all: true,
        max_bytes: 7,
    };
    if let Some(message) = mail_parser::MessageParser::default().parse(input) {
        for property in body::BODY_EMAIL_PROPERTIES {
            let _ = body::body_property(&message, "Mx", property, &options);
        }
        let _ = body::message_headers(&message);
        for form in [
            "asRaw",
            "asText",
            "asAddresses",
            "asGroupedAddresses",
            "asMessageIds",
            "asDate",
            "asURLs",
        ] {
            for all in ["", ":all"] {
                let property = format!("header:X-Any:{form}{all}");
                if let Ok(header) = body::parse_header_property(&property) {
                    let _ = body::header_value(&message, &header);
                }
            }
        }
        for index in 0..message.parts.len().min(8) {
            let _ = body::part_blob(input, index);
        }
    }
    let words: std::collections::HashSet<String> = ["plan".to_owned(), "a".to_owned()].into();
    let text = String::from_utf8_lossy(input);
    let _ = snippet::mark(&text, &words);
    let _ = snippet::preview(&text, &words);
}

fn jmap_arguments(name: &str, arguments: &serde_json::Map<String, serde_json::Value>) {
    use crate::jmap::{email, push};
    match name {
        "Email/query" | "Email/queryChanges" => {
            let _ = email::query_request(arguments);
        }
        "Mailbox/query" | "Mailbox/queryChanges" => {
            let _ = crate::jmap::mailbox::mailbox_query(arguments);
            let _ = crate::jmap::query_window(arguments);
        }
        "Email/set" => {
            // Each creation written as a message, its blobs found (the bytes of a small one).
            for creation in arguments
                .get("create")
                .and_then(|create| create.as_object())
                .into_iter()
                .flat_map(|create| create.values())
            {
                let mut blobs = |blob_id: &str| -> Result<Option<Vec<u8>>, serde_json::Value> {
                    Ok((!blob_id.is_empty()).then(|| blob_id.as_bytes().to_vec()))
                };
                if let Ok(draft) = crate::jmap::create::build(creation, &mut blobs) {
                    let _ = mail_parser::MessageParser::default().parse(&draft.raw);
                }
            }
            let current = std::collections::BTreeSet::from(["$seen".to_owned()]);
            for patch in arguments
                .get("update")
                .and_then(|update| update.as_object())
                .into_iter()
                .flat_map(|update| update.values())
                .filter_map(|patch| patch.as_object())
            {
                if let Ok((keywords, _)) = email::patched_keywords(&current, patch, "M") {
                    for keyword in keywords {
                        let _ = email::flag_of(&keyword);
                    }
                }
            }
        }
        "Email/get" => {
            let _ = crate::jmap::ids_argument(arguments);
            for property in arguments
                .get("properties")
                .and_then(|properties| properties.as_array())
                .into_iter()
                .flatten()
                .filter_map(|property| property.as_str())
            {
                let _ = email::parse_header_property(property);
            }
            let _ = crate::jmap::body::body_options(arguments);
        }
        "Email/parse" => {
            let _ = crate::jmap::body::body_options(arguments);
            for blob_id in arguments
                .get("blobIds")
                .and_then(|ids| ids.as_array())
                .into_iter()
                .flatten()
                .filter_map(|id| id.as_str())
            {
                let _ = crate::jmap::body::split_part_blob_id(blob_id);
            }
        }
        "SearchSnippet/get" => {
            let _ = crate::jmap::snippet::marked_words(arguments.get("filter"));
        }
        "EventSource" => {
            let query = arguments
                .iter()
                .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                .collect();
            let _ = push::parse_request(&query);
        }
        _ => {}
    }
}

/// What the cargo-fuzz target `import_source` runs on one input: the decoders `mailmesh import`
/// applies to files it is given (mbox text and its metadata headers, Maildir names,
/// `dovecot-keywords`, folder names).
pub fn import_source(input: &[u8]) {
    use crate::import;
    let (kept, metadata) = import::take_mbox_metadata(input.to_vec());
    assert!(kept.len() <= input.len());
    if kept.len() == input.len() {
        assert_eq!(kept, input, "a message without metadata headers keeps its bytes");
        assert!(metadata.flags.is_empty());
    }
    assert!(import::strip_mbox_separator(input.to_vec()).len() <= input.len());
    for message in mail_parser::mailbox::mbox::MessageIterator::new(input).flatten() {
        let _ = import::take_mbox_metadata(import::strip_mbox_separator(message.unwrap_contents()));
    }
    let text = String::from_utf8_lossy(input);
    let keywords = import::parse_dovecot_keywords(&text);
    assert_eq!(keywords.len(), 26);
    let _ = import::parse_maildir_name(&text, &keywords);
    let _ = import::maildir_plus_plus_mailbox(&text);
    let _ = import::mbox_file_mailbox(std::path::Path::new(&*text));
}

/// What the cargo-fuzz target `lmtp_session` runs on one input: the whole input as an LMTP
/// client's bytes, fed in pieces whose size the first byte chooses, with deliveries answered
/// `250`. The session must use only what it was given, keep its buffer and message within the
/// limits, and answer in whole reply lines.
pub fn lmtp_session(input: &[u8]) {
    use crate::lmtp::session::{Limits, Next, Peer, Session};
    use crate::service::{Delivered, Recipient, ServiceError};
    let limits = Limits {
        max_message_bytes: 4096,
        max_recipients: 8,
        max_command_line: 512,
        max_errors: 64,
    };
    let mut session = Session::new(
        Peer {
            server_name: "fuzz".into(),
            client_address: "[127.0.0.1]".into(),
        },
        limits,
    );
    let mut resolve = |address: &str| {
        if address.contains("unknown") {
            Err(ServiceError::NoSuchAccount(address.into()))
        } else if address.contains("busy") {
            Err(ServiceError::Unavailable("busy".into()))
        } else {
            Ok(Recipient {
                account: address.into(),
                mailbox: "INBOX".into(),
            })
        }
    };
    let check_replies = |output: &[u8]| {
        if output.is_empty() {
            return;
        }
        assert!(output.ends_with(b"\r\n"), "a reply without its line end");
        for line in output[..output.len() - 2].split(|&byte| byte == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(
                line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit),
                "not a reply line"
            );
            assert!(!line.contains(&b'\r'), "a bare CR inside a reply");
        }
    };
    let piece = 1 + input.first().copied().unwrap_or(0) as usize;
    let mut buffer = Vec::new();
    for bytes in input.chunks(piece) {
        buffer.extend_from_slice(bytes);
        loop {
            let progress = session.advance(&buffer, &mut resolve);
            assert!(progress.consumed <= buffer.len());
            buffer.drain(..progress.consumed);
            check_replies(&progress.output);
            match progress.next {
                Next::MoreInput => break,
                Next::Close => return,
                Next::Deliver(transaction) => {
                    assert!(transaction.body.len() as u64 <= limits.max_message_bytes);
                    assert!(!transaction.recipients.is_empty());
                    for index in 0..transaction.recipients.len() {
                        let copy = transaction.copy_for(index, 1_764_576_000_000);
                        assert!(copy.raw.ends_with(&transaction.body));
                        let delivered = Ok(Delivered {
                            id: MessageId(1),
                            mailbox: crate::model::MailboxId(1),
                            blob: BlobHash::of(&copy.raw),
                            size: copy.raw.len() as u64,
                            duplicate: false,
                        });
                        check_replies(transaction.reply_for(index, &delivered).as_bytes());
                    }
                    session.transaction_done();
                }
            }
        }
        assert!(
            buffer.len() < limits.max_command_line,
            "the session left too much unread"
        );
    }
}

/// What the cargo-fuzz target `imap_session` runs on one input: the whole input as an IMAP
/// client's bytes, fed to the session's reader in pieces whose size the first byte chooses, in
/// command mode or raw-line mode as the second byte's bits say; then the same bytes as a message
/// whose ENVELOPE, BODYSTRUCTURE, sections and BINARY decodings are rendered (extended LIST
/// lines go through the reader's own LIST-EXTENDED parser). The reader must never panic, must
/// stop at a line over the limit, and every rendered section must lie inside the message.
pub fn imap_session(input: &[u8]) {
    use crate::imap::message::{Parsed, SectionText};
    use crate::imap::reader::{Event, Limits, Reader};
    let (Some(&chunk), Some(&modes)) = (input.first(), input.get(1)) else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let limits = Limits {
        max_line_bytes: 1024,
        max_literal_bytes: 2048,
    };
    let mut reader = Reader::new(limits);
    let mut events = 0usize;
    'feed: for (index, piece) in input[2..].chunks(chunk).enumerate() {
        reader.enqueue(piece);
        loop {
            let raw = modes & (1 << (index % 8)) != 0;
            match reader.next(raw) {
                Event::NeedMore => break,
                Event::LineTooLong => break 'feed,
                Event::Line(line) => assert!(line.len() <= input.len()),
                Event::Continue | Event::Command(_) | Event::Refused { .. } => {}
            }
            events += 1;
            assert!(events <= input.len() + 1, "the reader made events from nothing");
        }
    }
    let parsed = Parsed::new(input);
    let mut out = Vec::new();
    parsed.envelope(&mut out);
    parsed.body_structure(&mut out, true);
    for path in [&[][..], &[1], &[2], &[1, 1], &[2, 1, 3]] {
        for text in [
            SectionText::Full,
            SectionText::Header,
            SectionText::Text,
            SectionText::Mime,
        ] {
            if let Some(section) = parsed.section(path, &text) {
                assert!(section.len() <= input.len() + 2, "a section is larger than its message");
            }
        }
        // BINARY's decoding: base64 only shrinks; quoted-printable may turn bare LFs into CRLFs.
        if let Ok(Some(decoded)) = parsed.binary(path) {
            assert!(decoded.len() <= 2 * input.len() + 2, "a decoded part is too large");
        }
    }
}

/// Every cargo-fuzz target and the replayer of its body.
/// Every cargo-fuzz target by name, with the function it runs.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("sync_message", sync_message),
    ("record_states", record_states),
    ("request_frame", request_frame),
    ("response_frame", response_frame),
    ("gossip_frame", gossip_frame),
    ("appended_mail", appended_mail),
    ("text_parsers", text_parsers),
    ("change_state", change_state),
    ("sketch_symbols", sketch_symbols),
    ("accounts_file", accounts_file),
    ("jmap_request", jmap_request),
    ("import_source", import_source),
    ("lmtp_session", lmtp_session),
    ("mailbox_snapshot", mailbox_snapshot),
    ("imap_session", imap_session),
];
