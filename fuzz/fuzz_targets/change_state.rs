//! The change-feed state token decoder (tokens come from JMAP and HTTP clients), then a round trip
//! of whatever decodes: re-encoding must give a token that decodes to the same cursor and bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::changes::ChangeState;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(state) = ChangeState::decode(text) {
        let again = ChangeState::decode(&state.encode()).expect("a re-encoded token decodes");
        assert_eq!(again.encode(), state.encode());
    }
});
