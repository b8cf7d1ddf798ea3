//! `mailmesh import` against a real node process: a generated Maildir++ tree (flags in the file
//! names, keywords through `dovecot-keywords`, dates in the names and in an mtime) and an mbox
//! (`Status`, `X-Status`, `X-Keywords`, `From ` line dates, `>From` quoting) are imported and
//! read back over HTTP: the stored bytes equal the originals, flags and received dates are the
//! source's, and a second run, after flags changed in the source, adds nothing. An import stopped
//! with Ctrl-C and run again ends with every message once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use mailmesh::api_client::encode_segment;
use mailmesh::harness::{wait_until, LocalNode};

const ACCOUNT: &str = "alice@example.org";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mailmesh"))
}

fn start_node(directory: &Path) -> LocalNode {
    LocalNode::spawn(
        binary(),
        "import",
        &directory.join("node"),
        "import-test",
        &[],
        200,
        &[],
    )
    .unwrap()
}

fn run_import(node: &LocalNode, path: &Path, extra: &[&str]) -> Output {
    let output = Command::new(binary())
        .args(["import", "--quiet", "--http", &node.http, "--account", ACCOUNT])
        .args(extra)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "import failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The numbers of the summary line: (new, already there, failed, read).
fn summary_of(output: &Output) -> (u64, u64, u64, u64) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let numbers: Vec<u64> = line
        .split(|character: char| !character.is_ascii_digit() && character != '.')
        .filter_map(|word| word.parse().ok())
        .collect();
    assert!(line.starts_with("imported "), "no summary line in {stdout}");
    // imported N new messages (B bytes) into M mailboxes; D were already there, F failed, R read ...
    (numbers[0], numbers[3], numbers[4], numbers[5])
}

/// What a stored message should be.
#[derive(Debug, Clone)]
struct Expected {
    flags: Vec<String>,
    received_millis: u64,
}

/// One stored message as read back over HTTP.
#[derive(Debug)]
struct Stored {
    raw: Vec<u8>,
    flags: Vec<String>,
    received: String,
}

fn stored_messages(node: &LocalNode, mailbox: &str) -> Vec<Stored> {
    let base = format!(
        "/v1/mailboxes/{}/{}/messages",
        encode_segment(ACCOUNT),
        encode_segment(mailbox)
    );
    let mut stored = Vec::new();
    for (id, _) in node.messages(ACCOUNT, mailbox).unwrap() {
        let item = node.get(&format!("{base}/{id}")).unwrap();
        assert_eq!(item.status, 200, "{}", item.text());
        let item = item.json();
        let raw = node.get(&format!("{base}/{id}/raw")).unwrap();
        assert_eq!(raw.status, 200);
        let mut flags: Vec<String> = item["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|flag| flag.as_str().unwrap().to_owned())
            .collect();
        flags.sort();
        stored.push(Stored {
            raw: raw.body,
            flags,
            received: item["received"].as_str().unwrap().to_owned(),
        });
    }
    stored
}

fn flags(list: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = list.iter().map(|flag| flag.to_string()).collect();
    flags.sort();
    flags
}

/// A message with the quirks importers get wrong: 8-bit bytes, CRLF or LF, a body line that
/// starts with "From ".
fn message(number: usize, crlf: bool) -> Vec<u8> {
    let end = if crlf { "\r\n" } else { "\n" };
    let mut bytes = format!(
        "From: Sender {number} <sender{number}@example.org>{end}To: alice@example.org{end}Subject: message {number}{end}Message-ID: <{number}.import@example.org>{end}Content-Type: text/plain; charset=iso-8859-1{end}{end}Line one of {number}{end}"
    )
    .into_bytes();
    bytes.extend_from_slice(b"Gr\xfc\xdfe, caf\xe9");
    bytes.extend_from_slice(end.as_bytes());
    bytes.extend_from_slice(format!("From here the body goes on{end}>From an already quoted line{end}").as_bytes());
    bytes
}

/// The source: a Maildir++ tree and an mbox, with what each message should become.
struct Fixture {
    maildir: std::path::PathBuf,
    mbox: std::path::PathBuf,
    /// mailbox -> (original bytes -> expected flags and date).
    expected: BTreeMap<String, BTreeMap<Vec<u8>, Expected>>,
}

/// mboxrd quoting: one more '>' before every line that is ">*From ".
fn mbox_quote(message: &[u8]) -> Vec<u8> {
    let mut quoted = Vec::new();
    for line in message.split_inclusive(|&byte| byte == b'\n') {
        let unquoted = line.iter().position(|&byte| byte != b'>').unwrap_or(line.len());
        if line[unquoted..].starts_with(b"From ") {
            quoted.push(b'>');
        }
        quoted.extend_from_slice(line);
    }
    quoted
}

/// An mbox entry: From line, metadata headers inserted after the first header, the quoted message
/// and the separating empty line.
fn mbox_entry(from_line: &str, metadata: &str, message: &[u8]) -> Vec<u8> {
    let quoted = mbox_quote(message);
    let first_line_end = quoted.iter().position(|&byte| byte == b'\n').unwrap() + 1;
    let mut entry = format!("{from_line}\n").into_bytes();
    entry.extend_from_slice(&quoted[..first_line_end]);
    entry.extend_from_slice(metadata.as_bytes());
    entry.extend_from_slice(&quoted[first_line_end..]);
    entry.extend_from_slice(b"\n");
    entry
}

fn write_mbox(path: &Path, entries: &[(&str, &str, Vec<u8>)]) {
    let mut mbox = Vec::new();
    for (from_line, metadata, message) in entries {
        mbox.extend_from_slice(&mbox_entry(from_line, metadata, message));
    }
    std::fs::write(path, mbox).unwrap();
}

fn set_mtime(path: &Path, seconds: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(UNIX_EPOCH + Duration::from_secs(seconds)).unwrap();
}

fn fixture(directory: &Path) -> Fixture {
    let mut expected: BTreeMap<String, BTreeMap<Vec<u8>, Expected>> = BTreeMap::new();
    let mut expect = |mailbox: &str, raw: &[u8], list: &[&str], received_millis: u64| {
        expected.entry(mailbox.to_owned()).or_default().insert(
            raw.to_vec(),
            Expected {
                flags: flags(list),
                received_millis,
            },
        );
    };

    // The Maildir++ tree: the root is INBOX.
    let maildir = directory.join("Maildir");
    for folder in ["", ".Sent", ".Archive.2026", ".Entw&APw-rfe"] {
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(folder).join(sub)).unwrap();
        }
    }
    std::fs::write(maildir.join("dovecot-keywords"), "0 $Work\n1 Later\n").unwrap();
    std::fs::write(maildir.join(".Sent/dovecot-keywords"), "0 $Sent-Label\n").unwrap();
    let files: [(&str, &str, usize, bool, &[&str], u64); 8] = [
        (
            "",
            "cur/1700000000.M1P1.host,S=100:2,S",
            1,
            false,
            &["\\Seen"],
            1_700_000_000_000,
        ),
        (
            "",
            "cur/1700000100.M2P1.host:2,FRa",
            2,
            true,
            &["\\Flagged", "\\Answered", "$Work"],
            1_700_000_100_000,
        ),
        (
            "",
            "cur/1700000200.M3P1.host:2,DTb",
            3,
            false,
            &["\\Draft", "\\Deleted", "Later"],
            1_700_000_200_000,
        ),
        ("", "new/1700000300.M4P1.host", 4, true, &[], 1_700_000_300_000),
        // No seconds in the name: the received date is the file's mtime.
        (
            "",
            "cur/courier-style-name:2,S",
            5,
            false,
            &["\\Seen"],
            1_600_000_000_000,
        ),
        (
            ".Sent",
            "cur/1700000400.M6P1.host:2,Sa",
            6,
            false,
            &["\\Seen", "$Sent-Label"],
            1_700_000_400_000,
        ),
        (
            ".Archive.2026",
            "cur/1700000500.M7P1.host:2,",
            7,
            true,
            &[],
            1_700_000_500_000,
        ),
        (
            ".Entw&APw-rfe",
            "cur/1700000600.M8P1.host:2,D",
            8,
            false,
            &["\\Draft"],
            1_700_000_600_000,
        ),
    ];
    for (folder, name, number, crlf, list, received_millis) in files {
        let raw = message(number, crlf);
        let path = maildir.join(folder).join(name);
        std::fs::write(&path, &raw).unwrap();
        set_mtime(&path, 1_600_000_000);
        let mailbox = match folder {
            "" => "INBOX".to_owned(),
            other => mailmesh::import::maildir_plus_plus_mailbox(other),
        };
        expect(&mailbox, &raw, list, received_millis);
    }

    // An mbox: Status, X-Status and X-Keywords are the mbox's, not the message's.
    let mbox_directory = directory.join("mbox");
    std::fs::create_dir_all(&mbox_directory).unwrap();
    let mbox = mbox_directory.join("Lists");
    let entries = [
        (
            "From sender20@example.org Tue Mar  3 10:00:00 2026",
            "Status: RO\nX-Status: AF\nX-Keywords: $Todo Later\n",
            message(20, false),
        ),
        (
            "From sender21@example.org Wed Mar  4 11:30:05 2026",
            "Status: O\n",
            message(21, false),
        ),
        (
            "From sender22@example.org Thu Mar  5 23:59:59 2026",
            "X-Status: TD\nX-UID: 3\n",
            message(22, false),
        ),
    ];
    write_mbox(&mbox, &entries);
    expect(
        "Lists",
        &message(20, false),
        &["\\Seen", "\\Answered", "\\Flagged", "$Todo", "Later"],
        1_772_532_000_000,
    );
    expect("Lists", &message(21, false), &[], 1_772_623_805_000);
    expect(
        "Lists",
        &message(22, false),
        &["\\Draft", "\\Deleted"],
        1_772_755_199_000,
    );
    Fixture {
        maildir,
        mbox,
        expected,
    }
}

fn expected_received(millis: u64) -> String {
    mailmesh::api::rfc3339(millis)
}

/// Checks every mailbox holds exactly the expected messages, byte for byte, with their flags and
/// received dates.
fn check_mailboxes(node: &LocalNode, fixture: &Fixture) {
    for (mailbox, messages) in &fixture.expected {
        let stored = stored_messages(node, mailbox);
        assert_eq!(stored.len(), messages.len(), "{mailbox}: {stored:?}");
        for message in &stored {
            let expected = messages.get(&message.raw).unwrap_or_else(|| {
                panic!(
                    "{mailbox} holds bytes that are not an original:\n{}",
                    String::from_utf8_lossy(&message.raw)
                )
            });
            assert_eq!(message.flags, expected.flags, "{mailbox}: flags of {message:?}");
            assert_eq!(
                message.received,
                expected_received(expected.received_millis),
                "{mailbox}: received date of {message:?}"
            );
        }
    }
}

fn import_tree_and_mbox() {
    let directory = tempfile::tempdir().unwrap();
    let node = start_node(directory.path());
    let fixture = fixture(directory.path());

    let first = run_import(&node, &fixture.maildir, &[]);
    assert_eq!(
        summary_of(&first),
        (8, 0, 0, 8),
        "{}",
        String::from_utf8_lossy(&first.stdout)
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    for line in [
        "INBOX: 5 read, 5 new",
        "Sent: 1 read, 1 new",
        "Archive/2026: 1 read, 1 new",
        "Entwürfe: 1 read",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in {stdout}");
    }
    // Folders that name a special use get that role (RFC 6154), so IMAP and JMAP clients find
    // their Sent folder.
    let mailboxes = node.get("/v1/accounts/alice%40example.org/mailboxes").unwrap().json();
    let roles: Vec<(String, Option<String>)> = mailboxes["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mailbox| {
            (
                mailbox["mailbox"].as_str().unwrap().to_owned(),
                mailbox["role"].as_str().map(str::to_owned),
            )
        })
        .filter(|(_, role)| role.is_some())
        .collect();
    assert_eq!(
        roles,
        [
            ("INBOX".to_owned(), Some("inbox".to_owned())),
            ("Sent".to_owned(), Some("sent".to_owned()))
        ],
        "{mailboxes}"
    );
    // A directory of mbox files: each file a mailbox named after it.
    let mbox = run_import(&node, fixture.mbox.parent().unwrap(), &[]);
    assert_eq!(
        summary_of(&mbox),
        (3, 0, 0, 3),
        "{}",
        String::from_utf8_lossy(&mbox.stdout)
    );
    check_mailboxes(&node, &fixture);

    // Flags change in the source between runs (a client read and flagged mail): still the same
    // messages, so nothing new.
    let old = fixture.maildir.join("cur/1700000000.M1P1.host,S=100:2,S");
    std::fs::rename(&old, fixture.maildir.join("cur/1700000000.M1P1.host,S=100:2,FS")).unwrap();
    let new = fixture.maildir.join("new/1700000300.M4P1.host");
    std::fs::rename(&new, fixture.maildir.join("cur/1700000300.M4P1.host:2,S")).unwrap();
    let bytes = std::fs::read(&fixture.mbox).unwrap();
    let at = bytes.windows(10).position(|window| window == b"Status: O\n").unwrap();
    let changed = [&bytes[..at], b"Status: RO\nX-Status: A\n", &bytes[at + 10..]].concat();
    std::fs::write(&fixture.mbox, changed).unwrap();
    let second = run_import(&node, &fixture.maildir, &[]);
    assert_eq!(
        summary_of(&second),
        (0, 8, 0, 8),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    let second = run_import(&node, &fixture.mbox, &["--mailbox", "Lists"]);
    assert_eq!(
        summary_of(&second),
        (0, 3, 0, 3),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    // The stored flags are those of the first run: an import adds messages, it does not sync flags.
    check_mailboxes(&node, &fixture);
}

#[test]
fn an_import_keeps_bytes_flags_and_received_dates_and_a_second_run_adds_nothing() {
    import_tree_and_mbox();
}

#[test]
fn an_import_stopped_with_ctrl_c_completes_on_a_second_run() {
    let directory = tempfile::tempdir().unwrap();
    let node = start_node(directory.path());
    let mbox = directory.path().join("big.mbox");
    let total = 3000;
    let entries: Vec<(String, Vec<u8>)> = (0..total)
        .map(|number| {
            (
                format!("From x@example.org Tue Mar  3 10:{:02}:00 2026", number % 60),
                message(1000 + number, false),
            )
        })
        .collect();
    let mut bytes = Vec::new();
    for (from_line, message) in &entries {
        bytes.extend_from_slice(&mbox_entry(from_line, "Status: RO\n", message));
    }
    std::fs::write(&mbox, bytes).unwrap();

    let child = Command::new(binary())
        .args([
            "import",
            "--quiet",
            "--http",
            &node.http,
            "--account",
            ACCOUNT,
            "--mailbox",
            "Big",
        ])
        .arg(&mbox)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let count = || {
        node.get(&format!("/v1/mailboxes/{}/Big", encode_segment(ACCOUNT)))
            .map(|response| response.json()["count"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(60), || count() > 0).expect("the import never started");
    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Stopped by the signal (130) with the appends in flight finished, or done before it came.
    match output.status.code() {
        Some(130) => assert!(stderr.contains("interrupted: "), "{stderr}"),
        Some(0) => {}
        other => panic!("the interrupted import exited with {other:?}: {stderr}"),
    }
    let before = count();
    if output.status.code() == Some(130) {
        let (imported, duplicates, _, _) = summary_of(&output);
        assert_eq!(
            imported + duplicates,
            before,
            "every append it counted is stored, no more"
        );
    }

    let rerun = run_import(&node, &mbox, &["--mailbox", "Big"]);
    let (imported, duplicates, failed, read) = summary_of(&rerun);
    assert_eq!(read, total as u64);
    assert_eq!(failed, 0);
    assert_eq!(imported + duplicates, total as u64);
    // What the first run stored is skipped, and nothing is stored twice.
    assert_eq!(duplicates, before);
    assert_eq!(
        count(),
        total as u64,
        "{imported} imported, {duplicates} skipped, {before} before"
    );
    assert_eq!(node.messages(ACCOUNT, "Big").unwrap().len(), total);
}

#[test]
fn the_same_message_many_times_in_one_source_is_stored_once() {
    let directory = tempfile::tempdir().unwrap();
    let node = start_node(directory.path());
    let mbox = directory.path().join("repeated.mbox");
    let mut bytes = Vec::new();
    for number in 0..40 {
        // Runs of one message, as a mail loop or a re-delivered batch leaves them.
        let raw = message(2000 + number / 10, false);
        bytes.extend_from_slice(&mbox_entry("From x@example.org Tue Mar  3 10:00:00 2026", "", &raw));
    }
    std::fs::write(&mbox, bytes).unwrap();
    let output = run_import(&node, &mbox, &["--mailbox", "Repeated", "--workers", "16"]);
    assert_eq!(
        summary_of(&output),
        (4, 36, 0, 40),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(node.messages(ACCOUNT, "Repeated").unwrap().len(), 4);
}
