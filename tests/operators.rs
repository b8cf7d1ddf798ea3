//! What operators see: `mailmesh status` as a health check, the status page and its data,
//! the health endpoints, and the reconciliation trace.

use std::process::Command;
use std::time::Duration;

use mailmesh::harness::{digests_agree, sample_message, wait_until, LocalNode};

fn binary() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_mailmesh"))
}

fn status(node: &LocalNode) -> (i32, String) {
    let output = Command::new(binary())
        .args(["status", "--http", &node.http])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn status_exits_zero_when_peers_agree_and_one_when_a_peer_lags() {
    let directory = tempfile::tempdir().unwrap();
    let debug = [("RUST_LOG", "info,mailmesh=debug")];
    let first = LocalNode::spawn_with_environment(
        binary(),
        "north",
        &directory.path().join("north"),
        "test-ops",
        &[],
        200,
        &[],
        &debug,
    )
    .unwrap();
    let mut second = LocalNode::spawn_with_environment(
        binary(),
        "south",
        &directory.path().join("south"),
        "test-ops",
        &[first.listen_address().unwrap()],
        200,
        &[],
        &debug,
    )
    .unwrap();
    first
        .append("ops@example.org", "INBOX", &sample_message("o@example.org", "one", "x"))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || digests_agree(&[&first, &second])
            && status(&first).0 == 0)
        .is_some(),
        "{}",
        status(&first).1
    );
    let (code, text) = status(&first);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("south") && text.contains("agrees") && text.contains("rates"),
        "{text}"
    );
    let json = Command::new(binary())
        .args(["status", "--json", "--http", &first.http])
        .output()
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["peers"][0]["agrees"], true);
    assert!(parsed["rates_per_second"]["gossip_bytes"].is_number());

    // The page and its data, and the health endpoints.
    let page = first.get("/").unwrap();
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("mailmesh"));
    assert_eq!(first.get("/v1/page-data").unwrap().status, 200);
    assert_eq!(first.get("/healthz").unwrap().status, 200);
    assert_eq!(second.get("/readyz").unwrap().status, 200);

    // A peer that stops answering (frozen) while we take writes no longer agrees: exit 1.
    let south_pid = find_pid(&directory.path().join("south"));
    Command::new("kill")
        .args(["-STOP", &south_pid.to_string()])
        .status()
        .unwrap();
    first
        .append("ops@example.org", "INBOX", &sample_message("o@example.org", "two", "y"))
        .unwrap();
    let lagging = wait_until(Duration::from_secs(30), || status(&first).0 == 1);
    Command::new("kill")
        .args(["-CONT", &south_pid.to_string()])
        .status()
        .unwrap();
    assert!(
        lagging.is_some(),
        "status kept exiting 0 while a peer lagged: {}",
        status(&first).1
    );
    assert!(
        wait_until(Duration::from_secs(30), || status(&first).0 == 0).is_some(),
        "{}",
        status(&first).1
    );

    // South misses a write while down; catching up is a traced mailbox reconciliation.
    second.kill();
    first
        .append(
            "ops@example.org",
            "INBOX",
            &sample_message("o@example.org", "three", "z"),
        )
        .unwrap();
    second.restart().unwrap();
    assert!(wait_until(Duration::from_secs(30), || digests_agree(&[&first, &second])).is_some());
    // Whichever side ran the session traced the mailbox reconciliation with its figures.
    let traced = wait_until(Duration::from_secs(10), || {
        ["north", "south"].iter().any(|name| {
            let log = std::fs::read_to_string(directory.path().join(name).join("node.log")).unwrap_or_default();
            log.lines()
                .any(|line| line.contains("reconcile{") && line.contains("mailbox=") && line.contains("rounds="))
        })
    });
    assert!(traced.is_some(), "no reconcile span in either log");
}

/// The PID of the node process whose command line names this data directory.
fn find_pid(data_dir: &std::path::Path) -> u32 {
    let wanted = data_dir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(command) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let command = String::from_utf8_lossy(&command).replace('\0', " ");
        if command.contains(" node ") && command.contains(&wanted) {
            return pid;
        }
    }
    panic!("no node process for {wanted}");
}

/// What a client can read of one mailbox: every sort and order, the counters, the change log's
/// sets and a few searches. `mailmesh reindex` must leave all of it as it was.
fn readable_state(node: &LocalNode, account: &str, mailbox: &str, since: u64) -> Vec<(String, serde_json::Value)> {
    let base = LocalNode::mailbox_path(account, mailbox);
    let mut seen = Vec::new();
    let mut read = |path: String| {
        let response = node.get(&path).unwrap();
        assert_eq!(response.status, 200, "{path}");
        seen.push((path, response.json()));
    };
    for sort in ["received", "date", "from", "subject", "size"] {
        for order in ["asc", "desc"] {
            read(format!("{base}/messages?sort={sort}&order={order}&limit=1000"));
            read(format!("{base}/messages?sort={sort}&order={order}&position=7&limit=5"));
        }
    }
    for word in ["quarterly", "lunch", "nothingmatchesthis"] {
        read(format!("{base}/messages?search={word}&sort=received&limit=1000"));
    }
    let mut entry = node.get(&base).unwrap().json();
    entry.as_object_mut().unwrap().remove("root");
    seen.push(("entry".into(), entry));
    // The change log: its sets, not its node-local modseq numbers, which a rebuild may renumber.
    let changes = node.get(&format!("{base}/changes?since={since}")).unwrap().json();
    let sorted = |key: &str| {
        let mut ids: Vec<String> = changes[key]
            .as_array()
            .map(|ids| ids.iter().map(|id| id.to_string()).collect())
            .unwrap_or_default();
        ids.sort();
        serde_json::json!(ids)
    };
    for key in ["created", "updated", "expunged"] {
        seen.push((format!("changes {key}"), sorted(key)));
    }
    seen
}

#[test]
fn reindex_rebuilds_the_same_listings_counts_changes_and_search_and_keeps_the_peer_id() {
    let directory = tempfile::tempdir().unwrap();
    let mut node = LocalNode::spawn(
        binary(),
        "solo",
        &directory.path().join("solo"),
        "test-reindex",
        &[],
        200,
        &[],
    )
    .unwrap();
    let (account, mailbox) = ("reindex@example.org", "INBOX");
    let subjects = ["Quarterly report", "Re: Lunch", "Fwd: budget", "AW: Termin", "plain"];
    let mut ids = Vec::new();
    for index in 0..40 {
        let raw = sample_message(
            &format!("Sender {} <s{index}@example.org>", (b'A' + (index % 7) as u8) as char),
            &format!("{} {index}", subjects[index % subjects.len()]),
            &format!("body {index} {}", if index % 3 == 0 { "lunch" } else { "other" }),
        );
        ids.push(node.append(account, mailbox, &raw).unwrap());
    }
    let message = |id: &str| format!("{}/messages/{id}", LocalNode::mailbox_path(account, mailbox));
    // A client's modseq after the appends: what changed after it must read the same afterwards.
    let since = node
        .get(&format!(
            "{}/changes?since=0",
            LocalNode::mailbox_path(account, mailbox)
        ))
        .unwrap()
        .json()["modseq"]
        .as_u64()
        .unwrap();
    for id in ids.iter().step_by(4) {
        let response = node
            .send(
                "POST",
                &format!("{}/flags", message(id)),
                br#"{"add":["\\Seen","$Work"]}"#,
            )
            .unwrap();
        assert_eq!(response.status, 200);
    }
    for id in ids.iter().skip(1).step_by(9) {
        assert_eq!(node.send("DELETE", &message(id), &[]).unwrap().status, 204);
    }
    let peer_id = node.status().unwrap()["peer_id"].clone();
    let before = readable_state(&node, account, mailbox, since);
    assert!(
        before
            .iter()
            .any(|(path, value)| path.contains("search=lunch") && value["total"].as_u64() > Some(0)),
        "the searches must find something for the comparison to mean anything"
    );
    for key in ["changes updated", "changes expunged"] {
        let (_, ids) = before.iter().find(|(path, _)| path == key).unwrap();
        assert!(
            ids.as_array().is_some_and(|ids| !ids.is_empty()),
            "{key} is empty: {ids}"
        );
    }

    node.terminate();
    let output = Command::new(binary())
        .args(["reindex", "--data-dir"])
        .arg(&node.data_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "reindex failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("reindexed"));
    node.restart().unwrap();

    assert_eq!(
        node.status().unwrap()["peer_id"],
        peer_id,
        "the peer ID changed across a restart"
    );
    // Listings, counters and search read exactly as before.
    let after = readable_state(&node, account, mailbox, since);
    assert_eq!(before.len(), after.len());
    for ((path, old), (_, new)) in before
        .iter()
        .zip(&after)
        .filter(|((path, _), _)| !path.starts_with("changes"))
    {
        assert_eq!(old, new, "{path} differs after reindex");
    }
    // Modseqs are node-local and the rebuild renumbers them, so a client's modseq from before is
    // answered "cannot calculate" (resync), never with an empty list that would hide changes;
    // a state read after the rebuild works again.
    let changes_url = |since: u64| format!("{}/changes?since={since}", LocalNode::mailbox_path(account, mailbox));
    let stale = node.get(&changes_url(since)).unwrap().json();
    assert_eq!(
        stale["cannot_calculate"], true,
        "a pre-reindex modseq was answered {stale}"
    );
    let fresh = node.get(&changes_url(0)).unwrap().json();
    assert_eq!(fresh["cannot_calculate"], false, "{fresh}");
    let live = fresh["created"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        live as u64,
        before.iter().find(|(path, _)| path == "entry").unwrap().1["count"]
            .as_u64()
            .unwrap()
    );
    let now = fresh["modseq"].as_u64().unwrap();
    assert!(
        now > since,
        "the rebuilt log must number above every modseq issued before"
    );
    let later = node.get(&changes_url(now)).unwrap().json();
    assert_eq!(
        (
            later["cannot_calculate"].clone(),
            later["updated"].as_array().map(Vec::len)
        ),
        (serde_json::json!(false), Some(0))
    );
}
