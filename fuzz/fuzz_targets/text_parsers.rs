//! cargo-fuzz target `text_parsers`: its body is `mailmesh::fuzzing::text_parsers`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::text_parsers(input));
