//! Durability at the system call. A kill -9 leaves the page cache intact, so every kill -9 test
//! would still pass if the node stopped syncing its write-ahead log. This test watches the node
//! with strace instead: N appends made one after another (each waits for its 201, so group commit
//! cannot fold them together) must cost at least N syncs of a RocksDB WAL file (`*.log`). With
//! `sync_writes` off it sees none and fails.
//!
//! strace comes from `scripts/setup.sh`; without it the test fails and says so, rather than
//! passing without looking.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use mailmesh::harness::{sample_message, LocalNode};

const APPENDS: usize = 20;

fn count_wal_syncs(trace: &str) -> usize {
    trace
        .lines()
        .filter(|line| line.contains("fdatasync(") || line.contains("fsync("))
        .filter(|line| line.contains(".log>"))
        .filter(|line| !line.contains("= -1"))
        .count()
}

#[test]
fn every_acknowledged_append_waited_for_a_wal_sync() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|output| output.status.success()),
        "strace is missing: run scripts/setup.sh (it installs strace) before the tests"
    );
    let directory = tempfile::tempdir().unwrap();
    let node = LocalNode::spawn(
        &PathBuf::from(env!("CARGO_BIN_EXE_mailmesh")),
        "durable",
        &directory.path().join("node"),
        "test-durability",
        &[],
        200,
        &[],
    )
    .expect("node starts");
    let pid = node.pid().expect("running");
    let trace_path = directory.path().join("trace.txt");
    // -f with -p attaches to every thread of the process; -y names each fd's file.
    let mut tracer = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace_path)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace starts");
    // Wait until the kernel shows strace as the tracer of every thread of the node.
    let traced = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("TracerPid:"))
                    .is_some_and(|tracer| tracer.trim() != "0")
            })
        })
    };
    assert!(
        mailmesh::harness::wait_until(Duration::from_secs(20), traced).is_some(),
        "strace did not attach to every thread of the node"
    );

    for index in 0..APPENDS {
        node.append(
            "durable@example.org",
            "INBOX",
            &sample_message("bob@example.org", &format!("Durable {index}"), "Kept after power loss."),
        )
        .expect("append acknowledged");
    }
    let _ = Command::new("kill").arg("-INT").arg(tracer.id().to_string()).status();
    let _ = tracer.wait();
    let trace = std::fs::read_to_string(&trace_path).expect("trace written");
    let syncs = count_wal_syncs(&trace);
    assert!(
        syncs >= APPENDS,
        "{APPENDS} acknowledged appends made one at a time caused only {syncs} WAL syncs; trace:\n{}",
        trace.lines().take(40).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_sync_counter_reads_strace_lines() {
    let trace = "123 fdatasync(12</tmp/n/store/000004.log>) = 0\n\
                 124 fsync(13</tmp/n/store/MANIFEST-000005>) = 0\n\
                 125 fdatasync(12</tmp/n/store/000004.log>) = -1 EIO (Input/output error)\n\
                 126 fsync(14</tmp/n/store/000009.log>) = 0\n";
    assert_eq!(count_wal_syncs(trace), 2);
}
