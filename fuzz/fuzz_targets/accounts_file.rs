//! cargo-fuzz target `accounts_file`: its body is `mailmesh::fuzzing::accounts_file`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::accounts_file(input));
