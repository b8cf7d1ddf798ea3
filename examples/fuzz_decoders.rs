//! A mutation fuzzer on stable Rust for every decoder that reads bytes from outside: the sync
//! message decoder and the record states that travel with it, the sketch session decoder (with a
//! peeling decoder on the cells), the request, response and gossip frame decoders, the mail header
//! reader used on appended mail, the text parsers for IDs, flags and mailbox names, and the
//! accounts file and HTTP Basic readers, what `mailmesh import` reads (mbox text and its metadata
//! headers, Maildir names, `dovecot-keywords`, folder names), an LMTP session's input, and an IMAP session's (its reader, and the
//! MIME rendering of a message).
//!
//! `cargo run --release --example fuzz_decoders -- --seconds 600 [--target NAME] --json`
//!
//! The coverage-guided targets are under fuzz/ (cargo-fuzz, nightly; `scripts/fuzz.sh`). This
//! driver needs only stable Rust: it mutates a seed corpus of valid inputs (bit flips, byte edits,
//! insertions, deletions, splices, length-field tampering) and runs each input under
//! `catch_unwind`. A panicking input is saved under `fuzz/crashes/` and named in the output; it
//! should become a regression test.
//!
//! `--write-seeds DIR` writes the seed corpus as DIR/<cargo-fuzz target>/seed-N and exits.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use mailmesh::merkle::{MemoryTree, StoredDepth};
use mailmesh::model::{BlobHash, Flag, MailboxKey, MessageId, MessageRecord, NodeId, Stamp};
use mailmesh::sync::{self, ByteString, RecordState, SyncLimits};
use mailmesh::wire::{self, Gossip, Request, Response, WireSpace};
use mailmesh_core::sketch::{self, Decoder, DecoderLimits, SketchCells, SketchKey};
use mailmesh_core::sketch_session::{self, Asker, Message, SessionLimits};

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            0
        } else {
            (self.next() % bound as u64) as usize
        }
    }
}

fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut tree = MemoryTree::new(StoredDepth::MAILBOX);
    for value in 0..200u128 {
        tree.insert(
            (1_767_225_600_000u128 + value * 1000) << 80 | value,
            *blake3::hash(&value.to_be_bytes()).as_bytes(),
        );
    }
    let limits = SyncLimits {
        leaf_threshold: 4,
        ..SyncLimits::default()
    };
    let first = sync::initial(&tree, &limits).unwrap_or_default();
    let empty = MemoryTree::new(StoredDepth::MAILBOX);
    let (reply, _) = sync::respond(&empty, &first, &limits).unwrap_or_default();
    let small = sync::initial(&empty, &limits).unwrap_or_default();
    let sync_seeds = vec![sync::encode(&first), sync::encode(&reply), sync::encode(&small)];
    let sketch_seeds = sketch_seeds(&limits);

    let mailbox = MailboxKey::new("fuzz@example.org", "Archive/2026").expect("valid");
    let mut record = MessageRecord::new(MessageId(12345), BlobHash::of(b"x"), 1, 2, NodeId(3));
    mailmesh::crdt::apply_flag(
        &mut record,
        Flag::Seen,
        true,
        Stamp {
            time: 9,
            node: NodeId(3),
        },
    );
    mailmesh::crdt::apply_flag(
        &mut record,
        Flag::Keyword("$Junk".into()),
        false,
        Stamp {
            time: 10,
            node: NodeId(4),
        },
    );
    let frame_seeds = vec![
        wire::encode(&Request::Reconcile {
            space: WireSpace::Mailbox(mailbox.clone()),
            message: ByteString(sync::encode(&first)),
            states: ByteString(sync::encode_states(&[RecordState::of(&record)])),
            returned: ByteString(sync::encode_keyed_states(&[(7, RecordState::of(&record))])),
        }),
        wire::encode(&Request::FetchRecords {
            mailbox: mailbox.clone(),
            ids: vec![MessageId(1), MessageId(2)],
            held: vec![MessageId(3)],
        }),
        wire::encode(&Request::FetchRange {
            mailbox: mailbox.clone(),
            depth: 3,
            bits: ByteString(vec![1, 2]),
            after: None,
            limit: 10,
        }),
        wire::encode(&Request::FetchBlob {
            hash: BlobHash::of(b"x"),
            offset: 0,
            length: 100,
        }),
        wire::encode(&Response::Records {
            records: vec![record.clone()],
            more: true,
            blobs: vec![],
        }),
        wire::encode(&Response::Blob {
            bytes: Some(ByteString(b"hello".to_vec())),
            total: 5,
        }),
        wire::encode(&Request::ReconcileMailboxes {
            mailboxes: vec![wire::MailboxMessage {
                mailbox: mailbox.clone(),
                message: ByteString(sync::encode(&first)),
            }],
        }),
        wire::encode(&Response::ReconciledMailboxes {
            replies: vec![wire::MailboxReply {
                message: ByteString(sync::encode(&first)),
                records: vec![record.clone()],
                blobs: vec![ByteString(b"raw".to_vec())],
                states: ByteString(sync::encode_states(&[RecordState::of(&record)])),
                returned: ByteString::default(),
            }],
        }),
        wire::encode(&Request::Sketch {
            mailbox: mailbox.clone(),
            salt: ByteString(vec![7; wire::SKETCH_SALT_BYTES]),
            message: ByteString(sketch_seeds.first().cloned().unwrap_or_default()),
        }),
        wire::encode(&Request::SketchSettle {
            mailbox: mailbox.clone(),
            send: vec![MessageId(4)],
            states: ByteString(sync::encode_keyed_states(&[(7, RecordState::of(&record))])),
            you_lack: vec![MessageId(5)],
        }),
        wire::encode(&Response::Sketch {
            message: ByteString(sketch_seeds.get(1).cloned().unwrap_or_default()),
            records: vec![record.clone()],
            blobs: vec![ByteString(b"x".to_vec())],
        }),
        wire::encode(&Response::SketchSettled {
            records: vec![record.clone()],
            blobs: vec![],
            returned: ByteString(sync::encode_indexed_states(&[(0, RecordState::of(&record))])),
        }),
        wire::encode(&Gossip::Operation {
            mailbox: mailbox.clone(),
            record: record.clone(),
            blob: Some(ByteString(b"raw".to_vec())),
        }),
        wire::encode(&Gossip::Digest {
            peer: "12D3KooW".into(),
            name: "n".into(),
            sequence: 1,
            digest: ByteString(vec![0; 32]),
            mailboxes: 1,
            addresses: vec!["/ip4/127.0.0.1/tcp/1".into()],
            stale: false,
            clock: 1 << 20,
            acknowledged_before: 1_767_225_600_000,
            frontier: vec![(7, 1 << 20)],
        }),
    ];
    let mail_seeds = vec![
        b"From: \"Bob\" <bob@example.org>\r\nTo: a@example.org, \"C, D\" <c@example.org>\r\nSubject: =?utf-8?B?w6l0w6k=?=\r\nDate: Sun, 29 Nov 2026 08:00:00 +0000\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b--\r\n".to_vec(),
        b"Subject: Re: AW: hi\r\nFrom: =?koi8-r?B?7s/Xz9PUySDEzNEg18HT?= <n@example.ru>\r\n\r\nbody".to_vec(),
    ];
    let text_seeds = vec![
        b"01ARZ3NDEKTSV4RRFFQ69G5FAV".to_vec(),
        b"\\Seen".to_vec(),
        b"$Forwarded".to_vec(),
        b"Archive/2026".to_vec(),
    ];
    let mut expunged = RecordState::of(&record);
    expunged.expunged = Some(Stamp {
        time: 11,
        node: NodeId(5),
    });
    let state_seeds = vec![
        sync::encode_states(&[RecordState::of(&record), RecordState::default(), expunged.clone()]),
        sync::encode_keyed_states(&[(1, RecordState::of(&record)), (2, expunged.clone())]),
        sync::encode_indexed_states(&[(0, RecordState::of(&record)), (3, expunged)]),
    ];
    let accounts_seeds = vec![
        b"# site accounts\nalice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$8/nB/C6xTlzhbXYpjtjUCw$SYo5NzTjmnJOqCTWgcKvD1CFqtQ2VLIdSvQOhZcyjb4\n\nbob:{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.:1000:1000::/home/bob::\r\n".to_vec(),
        b"carol:{SHA256-CRYPT}$5$rounds=1000$8hIR1oBj/m/MYdrH$7L6jQjXclmNVH17BY0mLxTFX1zbCkEyMGqFfifIl/m0\ndave:{BLF-CRYPT}$2y$05$bbVqlDDdAJcBv65/ORmOt.wwpd44hT4XhF29D1.ApMZkkl39iaCrS\n".to_vec(),
        b"YWxpY2VAZXhhbXBsZS5vcmc6cGE6c3Mgd29yZA==".to_vec(),
    ];
    let import_seeds = vec![
        b"From a@example.org Tue Mar  3 10:00:00 2026\nFrom: a@example.org\nStatus: RO\nX-Status: AF\nX-Keywords: $Work Later\n\nbody\n>From quoted\n\nFrom b@example.org Wed Mar  4 11:30:05 2026\nX-Mozilla-Status: 0005\n\nx\n".to_vec(),
        b"1733000000.M12P34.host,S=120,W=124:2,FRSTDab".to_vec(),
        b"0 $Label1\n1 Work\n25 Last\n".to_vec(),
        b".Archive.Entw&APw-rfe".to_vec(),
    ];
    let lmtp_seeds = vec![
        b"LHLO mta.example.org\r\nMAIL FROM:<bob@example.net> SIZE=120 BODY=8BITMIME\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<unknown@example.org>\r\nRCPT TO:<busy+lists@example.org>\r\nDATA\r\nSubject: hi\r\n\r\n..dotted\r\n.\r\nRSET\r\nNOOP\r\nVRFY alice\r\nQUIT\r\n".to_vec(),
        b"LHLO x\nMAIL FROM:<>\nRCPT TO:<a@b>\nBDAT 6\nA: b\r\nBDAT 3 LAST\n\r\nxDATA\n.\n\0\xff\r\nHELP\r\n".to_vec(),
    ];
    let snapshot = |name: &str, parent: Option<u128>, deleted: bool| {
        let stamp = mailmesh::model::Stamp {
            time: 1_767_225_600_000 << 16,
            node: mailmesh::model::NodeId(3),
        };
        let mut record = mailmesh::mailbox::MailboxRecord::new(
            mailmesh::model::MailboxId(0x0193_0000_0000_0000_0000_0000_0000_0042),
            parent.map(mailmesh::model::MailboxId),
            name,
            Some(mailmesh::mailbox::Role::Archive),
            stamp,
        );
        if deleted {
            record.deleted = Some(stamp);
        }
        cbor4ii::serde::to_vec(Vec::new(), &record).unwrap_or_default()
    };
    let snapshot_seeds = vec![
        snapshot("Work", None, false),
        snapshot("INBOX", Some(7), true),
        snapshot("Entw\u{fc}rfe", Some(0x0193_0000_0000_0000_0000_0000_0000_0042), false),
    ];
    let imap_seeds = vec![
        b"\x05\x00a1 CAPABILITY\r\na2 LOGIN {5}\r\nalice \"secret\"\r\na3 SELECT INBOX\r\na4 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.10>)\r\na5 APPEND INBOX (\\Seen) {12+}\r\nSubject: x\r\n\r\na6 IDLE\r\nDONE\r\n".to_vec(),
        b"\x03\xffa AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nb SEARCH OR FROM x NOT SEEN\r\nc APPEND INBOX {99999}\r\n".to_vec(),
        b"\x07\x00s1 UID SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN\r\ns2 SEARCH RETURN () {3}\r\nALL\r\ns3 SELECT INBOX (QRESYNC (1 5 1:9 (1:3 2:4)))\r\ns4 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 4 VANISHED)\r\ns5 STORE 1 (UNCHANGEDSINCE 3) +FLAGS (\\Seen)\r\n".to_vec(),
        b"\x09\x00l1 LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (\"INBOX\" Sent/% {3+}\r\nA/*) RETURN (CHILDREN STATUS (MESSAGES UNSEEN))\r\nl2 LIST () {0}\r\n %\r\nl3 LIST (X) \"\" (\r\nf1 FETCH 1 (BINARY.PEEK[1]<0.9> BINARY.SIZE[2])\r\n".to_vec(),
        b"\x10\x00From: a@b\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nbody\r\n--z--\r\n".to_vec(),
    ];
    let jmap_seeds = vec![
        br##"{"using":["urn:ietf:params:jmap:core","urn:ietf:params:jmap:mail"],"methodCalls":[["Email/query",{"filter":{"operator":"OR","conditions":[{"to":"a","header":["X-Tag","two"]},{"hasAttachment":true,"body":"x","text":"y"}]}},"q"],["Email/get",{"#ids":{"resultOf":"q","name":"Email/query","path":"/ids"},"properties":["bodyStructure","header:To:asAddresses:all"],"bodyProperties":["partId","headers"],"fetchAllBodyValues":true,"maxBodyValueBytes":5},"g"]]}"##.to_vec(),
        br##"{"using":["urn:ietf:params:jmap:mail"],"methodCalls":[["Email/set",{"create":{"c":{"mailboxIds":{"#m":true},"from":[{"name":"Ann","email":"a@b"}],"subject":"Hi","header:X-A:asText":"v","headers":[{"name":"X-B","value":" raw\r\n folded"}],"bodyStructure":{"type":"multipart/mixed","subParts":[{"partId":"1"},{"blobId":"U1","type":"image/png","disposition":"inline","cid":"<x@y>","name":"p.png"}]},"bodyValues":{"1":{"value":"text"}}}}},"s"],["Email/query",{"collapseThreads":true,"sort":[{"property":"hasKeyword","keyword":"$seen"},{"property":"to","isAscending":false}]},"q"]]}"##.to_vec(),
        br##"{"using":["urn:ietf:params:jmap:mail"],"methodCalls":[["SearchSnippet/get",{"filter":{"operator":"AND","conditions":[{"text":"budget plan"},{"subject":"x"}]},"emailIds":["a"]},"s"],["Email/parse",{"blobIds":["PMx-1","U0"],"fetchTextBodyValues":true},"p"],["Email/queryChanges",{"sinceQueryState":"s","upToId":"x"},"c"]]}"##.to_vec(),
    ];
    vec![
        ("jmap", jmap_seeds),
        ("snapshots", snapshot_seeds),
        ("imap", imap_seeds),
        ("lmtp", lmtp_seeds),
        ("sync", sync_seeds),
        ("sketch", sketch_seeds),
        ("states", state_seeds),
        ("frames", frame_seeds),
        ("mail", mail_seeds),
        ("text", text_seeds),
        ("accounts", accounts_seeds),
        ("import", import_seeds),
    ]
}

/// The key and the two replicas (a 200-record tree and one lacking every third record) the sketch
/// target works with.
fn sketch_replicas() -> (SketchKey, [(MemoryTree, SketchCells); 2]) {
    let key = SketchKey::from_bytes([7; 16]);
    let mut full = (MemoryTree::new(StoredDepth::MAILBOX), SketchCells::new(key, 64));
    let mut partial = full.clone();
    for value in 0..200u128 {
        let id = (1_767_225_600_000u128 + value * 1000) << 80 | value;
        let hash = *blake3::hash(&value.to_be_bytes()).as_bytes();
        full.0.insert(id, hash);
        full.1.insert(id, &hash);
        if value % 3 != 0 {
            partial.0.insert(id, hash);
            partial.1.insert(id, &hash);
        }
    }
    (key, [full, partial])
}

fn sketch_seeds(limits: &SyncLimits) -> Vec<Vec<u8>> {
    let session_limits = SessionLimits {
        sync: *limits,
        ..SessionLimits::default()
    };
    let (_, [(full, full_cells), (partial, partial_cells)]) = sketch_replicas();
    let mut seeds = Vec::new();
    if let Ok((_, open)) = Asker::open(&partial, &partial_cells, &session_limits, 0) {
        seeds.push(sketch_session::encode(&open));
        if let Ok((Some(reply), _)) = sketch_session::respond(&full, &full_cells, &open, &session_limits) {
            seeds.push(sketch_session::encode(&reply));
        }
    }
    for message in [
        Message::More { start: 24, end: 60 },
        Message::Settled {
            you_lack: vec![1, 2 << 100],
        },
        Message::YouLack(vec![3]),
        Message::Cells {
            length: 64,
            start: 3,
            cells: full_cells.cells(3, 9).to_vec(),
        },
    ] {
        seeds.push(sketch_session::encode(&message));
    }
    seeds.push(sketch::encode_cells(0, full_cells.cells(0, 12)));
    seeds
}

fn run_target(target: &str, input: &[u8]) {
    match target {
        "sketch" => {
            let limits = SessionLimits::default();
            let (key, [(full, full_cells), (partial, partial_cells)]) = sketch_replicas();
            if let Ok(message) = sketch_session::decode(input, &limits) {
                // Whatever decodes must be safe to answer, on either side of a session.
                let _ = sketch_session::respond(&full, &full_cells, &message, &limits);
                if let Ok((mut asker, _)) = Asker::open(&partial, &partial_cells, &limits, 0) {
                    let _ = asker.on_reply(&partial, &partial_cells, Some(message.clone()), 0);
                }
                let _ = sketch_session::encode(&message);
            }
            if let Ok((start, theirs)) = sketch::decode_cells(input, 64) {
                let mut decoder = Decoder::new(key, DecoderLimits { max_cells: 64 });
                let end = start.saturating_add(theirs.len() as u64);
                if decoder
                    .add_cells(start, &theirs, partial_cells.cells(start, end))
                    .is_ok()
                {
                    decoder.peel(|_, _| true);
                    assert!(decoder.recovered().count() as u64 <= decoder.received());
                    let _ = decoder.estimate_remaining();
                }
            }
        }
        "sync" => {
            if let Ok(elements) = sync::decode(input, &SyncLimits::default()) {
                // Whatever decodes must also be safe to answer.
                let tree = MemoryTree::new(StoredDepth::MAILBOX);
                let _ = sync::respond(&tree, &elements, &SyncLimits::default());
                let _ = sync::encode(&elements);
            }
        }
        "states" => {
            let limits = SyncLimits::default();
            if let Ok(states) = sync::decode_states(input, &limits) {
                let _ = sync::encode_states(&states);
            }
            if let Ok(states) = sync::decode_keyed_states(input, &limits) {
                let _ = sync::encode_keyed_states(&states);
            }
            if let Ok(states) = sync::decode_indexed_states(input, &limits) {
                let _ = sync::encode_indexed_states(&states);
            }
        }
        "frames" => {
            // The cargo-fuzz targets' own bodies, sketch frames' inner messages included.
            mailmesh::fuzzing::request_frame(input);
            mailmesh::fuzzing::response_frame(input);
            mailmesh::fuzzing::gossip_frame(input);
        }
        "import" => mailmesh::fuzzing::import_source(input),
        "accounts" => {
            let text = String::from_utf8_lossy(input);
            let _ = mailmesh::accounts::Accounts::check_text(&text);
            let _ = mailmesh::api::decode_basic(&text);
        }
        "lmtp" => mailmesh::fuzzing::lmtp_session(input),
        "snapshots" => mailmesh::fuzzing::mailbox_snapshot(input),
        "imap" => mailmesh::fuzzing::imap_session(input),
        "jmap" => mailmesh::fuzzing::jmap_request(input),
        "mail" => {
            mailmesh::fuzzing::jmap_message(input);
            let _ = mailmesh::mail::listing(input);
            let text = mailmesh::mail::search_text(input);
            let _ = mailmesh::mail::subject_sort_key(&text.subject);
        }
        _ => {
            let text = String::from_utf8_lossy(input);
            let _ = text.parse::<MessageId>();
            let _ = text.parse::<Flag>();
            let _ = text.parse::<BlobHash>();
            let _ = MailboxKey::new(&text, &text);
        }
    }
}

fn mutate(random: &mut Random, corpus: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let mut output = input.to_vec();
    for _ in 0..1 + random.below(4) {
        match random.below(7) {
            0 if !output.is_empty() => {
                let index = random.below(output.len());
                output[index] ^= 1 << random.below(8);
            }
            1 if !output.is_empty() => {
                let index = random.below(output.len());
                output[index] = [0, 0xff, 0x7f, 0x80, 0x1f, 0x5b, 0x9f, 0xbf][random.below(8)];
            }
            2 => {
                let index = random.below(output.len() + 1);
                let count = 1 + random.below(16);
                for _ in 0..count {
                    output.insert(index, random.next() as u8);
                }
            }
            3 if !output.is_empty() => {
                let start = random.below(output.len());
                let end = (start + 1 + random.below(32)).min(output.len());
                output.drain(start..end);
            }
            4 => {
                let other = &corpus[random.below(corpus.len())];
                if !other.is_empty() {
                    let start = random.below(other.len());
                    let end = (start + 1 + random.below(64)).min(other.len());
                    let at = random.below(output.len() + 1);
                    output.splice(at..at, other[start..end].iter().copied());
                }
            }
            5 if !output.is_empty() => {
                // CBOR length tampering: make a header claim a huge length.
                let index = random.below(output.len());
                output[index] = [0x5b, 0x9b, 0x7b, 0xbb, 0x1b][random.below(5)];
                for _ in 0..8 {
                    output.insert((index + 1).min(output.len()), 0xff);
                }
            }
            _ => {
                let length = random.below(output.len() + 1);
                output.truncate(length);
            }
        }
    }
    output
}

/// The cargo-fuzz targets under fuzz/ that each seed group feeds.
fn fuzz_targets_for(group: &str) -> &'static [&'static str] {
    match group {
        "sync" => &["sync_message"],
        "sketch" => &["sketch_symbols"],
        "states" => &["record_states"],
        "frames" => &["request_frame", "response_frame", "gossip_frame"],
        "mail" => &["appended_mail"],
        "accounts" => &["accounts_file"],
        "import" => &["import_source"],
        "lmtp" => &["lmtp_session"],
        "snapshots" => &["mailbox_snapshot"],
        "imap" => &["imap_session"],
        "jmap" => &["jmap_request"],
        _ => &["text_parsers"],
    }
}

fn write_seed_corpus(directory: &str) -> std::io::Result<()> {
    for (group, inputs) in seeds() {
        for target in fuzz_targets_for(group) {
            let folder = std::path::Path::new(directory).join(target);
            std::fs::create_dir_all(&folder)?;
            for (index, input) in inputs.iter().enumerate() {
                std::fs::write(folder.join(format!("seed-{index}")), input)?;
            }
        }
    }
    Ok(())
}

fn main() {
    let mut seconds = 60u64;
    let mut only: Option<String> = None;
    let mut json = false;
    let mut write_seeds: Option<String> = None;
    let mut arguments = std::env::args().skip(1);
    while let Some(flag) = arguments.next() {
        match flag.as_str() {
            "--seconds" => seconds = arguments.next().and_then(|v| v.parse().ok()).unwrap_or(60),
            "--target" => only = arguments.next(),
            "--json" => json = true,
            "--write-seeds" => write_seeds = arguments.next(),
            other => {
                eprintln!("fuzz_decoders: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    if let Some(directory) = write_seeds {
        if let Err(error) = write_seed_corpus(&directory) {
            eprintln!("fuzz_decoders: cannot write seeds under {directory}: {error}");
            std::process::exit(1);
        }
        return;
    }
    std::panic::set_hook(Box::new(|_| {})); // panics are reported below, with their inputs
    let mut report = serde_json::Map::new();
    let mut crashes_total = 0;
    for (target, seed_corpus) in seeds() {
        if only.as_deref().is_some_and(|name| name != target) {
            continue;
        }
        let mut random = Random(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        let mut corpus = seed_corpus.clone();
        let started = Instant::now();
        let mut executions = 0u64;
        let mut crashes = Vec::new();
        while started.elapsed() < Duration::from_secs(seconds) {
            let base = corpus[random.below(corpus.len())].clone();
            let input = mutate(&mut random, &corpus, &base);
            executions += 1;
            if catch_unwind(AssertUnwindSafe(|| run_target(target, &input))).is_err() {
                let name = format!("{target}-{}", &blake3::hash(&input).to_hex()[..16]);
                let _ = std::fs::create_dir_all("fuzz/crashes");
                let _ = std::fs::write(format!("fuzz/crashes/{name}"), &input);
                crashes.push(name);
            } else if corpus.len() < 4096 && random.below(64) == 0 {
                corpus.push(input); // keep some mutants as new bases
            }
        }
        crashes_total += crashes.len();
        report.insert(
            target.to_owned(),
            serde_json::json!({ "seconds": seconds, "executions": executions, "crashes": crashes }),
        );
    }
    let output = serde_json::Value::Object(report);
    if json {
        println!("{output}");
    } else {
        println!("{}", serde_json::to_string_pretty(&output).unwrap_or_default());
    }
    if crashes_total > 0 {
        std::process::exit(1);
    }
}
