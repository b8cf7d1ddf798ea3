//! cargo-fuzz target `lmtp_session`: its body is `mailmesh::fuzzing::lmtp_session`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::lmtp_session(input));
