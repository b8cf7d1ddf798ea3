//! cargo-fuzz target `sync_message`: its body is `mailmesh::fuzzing::sync_message`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::sync_message(input));
