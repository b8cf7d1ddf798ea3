//! cargo-fuzz target `record_states`: its body is `mailmesh::fuzzing::record_states`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::record_states(input));
