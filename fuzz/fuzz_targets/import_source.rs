//! cargo-fuzz target `import_source`: its body is `mailmesh::fuzzing::import_source`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::import_source(input));
