//! The path an appended message takes before it is stored and indexed: the lenient header
//! reader, the search text extractor and the subject sort key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = mailmesh::mail::listing(input);
    let text = mailmesh::mail::search_text(input);
    let _ = mailmesh::mail::subject_sort_key(&text.subject);
});
