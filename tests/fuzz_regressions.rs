//! Replays every input under `fuzz/regressions/<target>/` through the code its cargo-fuzz target
//! runs, so a crash found by `scripts/fuzz.sh` and fixed stays fixed in `cargo test` on stable Rust.
//!
//! Each folder holds at least the seed corpus of its target (written by
//! `cargo run --release --example fuzz_decoders -- --write-seeds fuzz/regressions`, plus hand-made
//! change-state tokens). A crash input found later is copied from `fuzz/artifacts/<target>/` into
//! the same folder. The bodies below repeat the bodies of `fuzz/fuzz_targets/*.rs` (those are
//! `no_main` binaries of a separate nightly-only crate and cannot be called from here); the test
//! `every_fuzz_target_has_a_replayer_and_inputs` fails when a target is added to fuzz/Cargo.toml
//! without a replayer and inputs here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use mailmesh::changes::ChangeState;
use mailmesh::merkle::{MemoryTree, StoredDepth};
use mailmesh::model::{BlobHash, Flag, MailboxKey, MessageId, MessageRecord, NodeId};
use mailmesh::sync::{self, SyncLimits};
use mailmesh::wire::{self, Gossip, Request, Response};
use mailmesh_core::sketch::{self, Decoder, DecoderLimits, SketchCells, SketchKey};
use mailmesh_core::sketch_session::{self, Asker, SessionLimits};

/// The body of `fuzz/fuzz_targets/sync_message.rs`.
fn sync_message(input: &[u8]) {
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

/// The body of `fuzz/fuzz_targets/record_states.rs`.
fn record_states(input: &[u8]) {
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

/// The body of `fuzz/fuzz_targets/accounts_file.rs`.
fn accounts_file(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    if let Err((line, problem)) = mailmesh::accounts::Accounts::check_text(&text) {
        assert!(
            line >= 1 && line <= text.lines().count().max(1),
            "line {line} for {problem}"
        );
    }
    let _ = mailmesh::api::decode_basic(&text);
}

/// The body of `fuzz/fuzz_targets/request_frame.rs`.
fn request_frame(input: &[u8]) {
    if let Ok(request) = wire::decode::<Request>(input) {
        let _ = wire::validate_request(&request);
    }
}

/// The body of `fuzz/fuzz_targets/response_frame.rs`.
fn response_frame(input: &[u8]) {
    if let Ok(Response::Records { records, .. }) = wire::decode::<Response>(input) {
        for record in &records {
            if wire::validate_record(record).is_ok() {
                let _ = mailmesh::crdt::state_hash(record);
            }
        }
    }
}

/// The body of `fuzz/fuzz_targets/gossip_frame.rs`.
fn gossip_frame(input: &[u8]) {
    if let Ok(Gossip::Operation { record, .. }) = wire::decode::<Gossip>(input) {
        if wire::validate_record(&record).is_ok() {
            let _ = mailmesh::crdt::state_hash(&record);
        }
    }
}

/// The body of `fuzz/fuzz_targets/appended_mail.rs`.
fn appended_mail(input: &[u8]) {
    let _ = mailmesh::mail::listing(input);
    let text = mailmesh::mail::search_text(input);
    let _ = mailmesh::mail::subject_sort_key(&text.subject);
}

/// The body of `fuzz/fuzz_targets/text_parsers.rs`.
fn text_parsers(input: &[u8]) {
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

/// The body of `fuzz/fuzz_targets/change_state.rs`.
fn change_state(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(state) = ChangeState::decode(text) {
        let again = ChangeState::decode(&state.encode()).expect("a re-encoded token decodes");
        assert_eq!(again.encode(), state.encode());
    }
}

/// The body of `fuzz/fuzz_targets/sketch_symbols.rs`.
fn sketch_symbols(input: &[u8]) {
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

/// Every cargo-fuzz target and the replayer of its body.
const TARGETS: &[(&str, fn(&[u8]))] = &[
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
];

fn regressions_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("regressions")
}

/// The files of one target's folder, sorted so failures are reported in a stable order.
fn inputs_of(target: &str) -> Vec<PathBuf> {
    let folder = regressions_folder().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", folder.display()))
        .map(|entry| entry.expect("a readable folder entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_target_has_a_replayer_and_inputs() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
        .expect("fuzz/Cargo.toml is readable");
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|name| *name != "mailmesh-fuzz")
        .collect();
    assert!(!declared.is_empty(), "no [[bin]] targets found in fuzz/Cargo.toml");
    for name in &declared {
        assert!(
            TARGETS.iter().any(|(target, _)| target == name),
            "fuzz target {name} has no replayer in tests/fuzz_regressions.rs"
        );
    }
    for (target, _) in TARGETS {
        assert!(
            declared.contains(target),
            "replayer {target} has no target in fuzz/Cargo.toml"
        );
        assert!(
            !inputs_of(target).is_empty(),
            "fuzz/regressions/{target}/ holds no inputs; add at least the seed corpus"
        );
    }
}

#[test]
fn no_saved_fuzz_input_panics() {
    // Panics are collected and reported below with their files; keep the default hook's output
    // so the panic message of each failure is still printed.
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, replay) in TARGETS {
        for path in inputs_of(target) {
            let input = std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| replay(&input))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(replayed > 0, "no inputs were replayed");
    assert!(failures.is_empty(), "these saved fuzz inputs panic: {failures:#?}");
}
