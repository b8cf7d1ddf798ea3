//! The reconciliation message decoder, then answering whatever decodes against a small tree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::merkle::{MemoryTree, StoredDepth};
use mailmesh::sync::{self, SyncLimits};

fuzz_target!(|input: &[u8]| {
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
});
