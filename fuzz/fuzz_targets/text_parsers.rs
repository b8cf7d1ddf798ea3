//! Text that arrives in HTTP paths, queries and bodies: message IDs, flags, blob hashes and
//! mailbox names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailmesh::model::{BlobHash, Flag, MailboxKey, MessageId};

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    let _ = text.parse::<MessageId>();
    let _ = text.parse::<Flag>();
    let _ = text.parse::<BlobHash>();
    if let Some((account, mailbox)) = text.split_once('\n') {
        let _ = MailboxKey::new(account, mailbox);
    } else {
        let _ = MailboxKey::new(&text, &text);
    }
});
