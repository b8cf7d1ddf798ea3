//! cargo-fuzz target `jmap_request`: its body is `mailmesh::fuzzing::jmap_request`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::jmap_request(input));
