//! A response frame from a peer: decode, then the checks applied to every record it carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::wire::{self, Response};

fuzz_target!(|input: &[u8]| {
    if let Ok(Response::Records { records, .. }) = wire::decode::<Response>(input) {
        for record in &records {
            if wire::validate_record(record).is_ok() {
                let _ = mailmesh::crdt::state_hash(record);
            }
        }
    }
});
