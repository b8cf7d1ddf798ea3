//! cargo-fuzz target `imap_session`: its body is `mailmesh::fuzzing::imap_session`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::imap_session(input));
