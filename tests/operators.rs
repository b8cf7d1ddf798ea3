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
