//! cargo-fuzz target `appended_mail`: its body is `mailmesh::fuzzing::appended_mail`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::appended_mail(input));
