//! The accounts file reader (Dovecot passwd-file lines) and the HTTP Basic credentials decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    if let Err((line, problem)) = mailmesh::accounts::Accounts::check_text(&text) {
        assert!(line >= 1 && line <= text.lines().count().max(1), "line {line} for {problem}");
    }
    let _ = mailmesh::api::decode_basic(&text);
});
