//! cargo-fuzz target `mailbox_snapshot`: its body is `mailmesh::fuzzing::mailbox_snapshot`, which
//! `tests/fuzz_regressions.rs` also runs over the saved inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailmesh::fuzzing::mailbox_snapshot(input));
