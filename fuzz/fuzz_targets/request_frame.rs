//! A request frame from a peer: decode, then the validation every request passes before use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::wire::{self, Request};

fuzz_target!(|input: &[u8]| {
    if let Ok(request) = wire::decode::<Request>(input) {
        let _ = wire::validate_request(&request);
    }
});
