//! A gossip message (operation or digest): decode, then validate the record it carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::wire::{self, Gossip};

fuzz_target!(|input: &[u8]| {
    if let Ok(Gossip::Operation { record, .. }) = wire::decode::<Gossip>(input) {
        if wire::validate_record(&record).is_ok() {
            let _ = mailmesh::crdt::state_hash(&record);
        }
    }
});
