//! cargo-fuzz target `sketch_symbols`: its body is `mailmesh::fuzzing::sketch_symbols`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::sketch_symbols(input));
