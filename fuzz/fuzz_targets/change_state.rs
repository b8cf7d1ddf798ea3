//! cargo-fuzz target `change_state`: its body is `mailmesh::fuzzing::change_state`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::change_state(input));
