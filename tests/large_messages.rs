//! A message larger than one response frame replicates: its blob is paged across requests and
//! verified against its hash on arrival.

use std::time::Duration;

use mailmesh::harness::{digests_agree, wait_until, LocalNode};

#[test]
fn a_nine_mebibyte_message_replicates_in_pages() {
    let directory = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mailmesh"));
    let first = LocalNode::spawn(
        binary,
        "large-a",
        &directory.path().join("a"),
        "test-large",
        &[],
        200,
        &[],
    )
    .unwrap();
    let second = LocalNode::spawn(
        binary,
        "large-b",
        &directory.path().join("b"),
        "test-large",
        &[first.listen_address().unwrap()],
        200,
        &[],
    )
    .unwrap();
    let mut raw =
        b"From: big@example.org\r\nSubject: attachment\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
    let mut state: u64 = 0x1234_5678;
    while raw.len() < 9 * 1024 * 1024 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        raw.push(b'A' + (state >> 59) as u8);
        if raw.len() % 76 == 0 {
            raw.extend_from_slice(b"\r\n");
        }
    }
    let id = first.append("big@example.org", "INBOX", &raw).unwrap();
    let path = format!(
        "{}/messages/{id}/raw",
        LocalNode::mailbox_path("big@example.org", "INBOX")
    );
    let arrived = wait_until(Duration::from_secs(60), || {
        second
            .get(&path)
            .map(|response| response.status == 200)
            .unwrap_or(false)
    });
    assert!(
        arrived.is_some(),
        "the 9 MiB message did not reach the second node; digests {} vs {}",
        first.digest().unwrap_or_default(),
        second.digest().unwrap_or_default()
    );
    let copy = second.get(&path).unwrap().body;
    assert_eq!(copy.len(), raw.len());
    assert!(copy == raw, "the copy differs from the original");
    assert!(wait_until(Duration::from_secs(30), || digests_agree(&[&first, &second])).is_some());
}
