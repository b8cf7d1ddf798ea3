//! The record-state decoders (states that go with a `Differ`, and merged states sent back), then
//! re-encoding and merging whatever decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::model::{BlobHash, MessageId, MessageRecord, NodeId};
use mailmesh::sync::{self, SyncLimits};

fuzz_target!(|input: &[u8]| {
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
});
