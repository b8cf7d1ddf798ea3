//! cargo-fuzz target `request_frame`: its body is `mailmesh::fuzzing::request_frame`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::request_frame(input));
