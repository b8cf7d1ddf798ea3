//! The sketch session decoder (opening cells, cell batches, key lists, embedded trie messages),
//! then both sides of a session answering whatever decodes, with a decoder peeling the cells.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::merkle::{MemoryTree, StoredDepth};
use mailmesh_core::sketch::{self, Decoder, DecoderLimits, SketchCells, SketchKey};
use mailmesh_core::sketch_session::{self, Asker, SessionLimits};

fuzz_target!(|input: &[u8]| {
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
    // The raw cell decoder and the peeling decoder on whatever cells decode.
    if let Ok((start, theirs)) = sketch::decode_cells(input, 64) {
        let mut decoder = Decoder::new(key, DecoderLimits { max_cells: 64 });
        let end = start.saturating_add(theirs.len() as u64);
        if decoder.add_cells(start, &theirs, cells.cells(start, end)).is_ok() {
            decoder.peel(|_, _| true);
            assert!(decoder.recovered().count() as u64 <= decoder.received());
            let _ = decoder.estimate_remaining();
        }
    }
});
