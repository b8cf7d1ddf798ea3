//! One short real partition in `cargo test`: `scripts/chaos.py` runs three `mailmesh node`
//! processes in their own network namespaces, cuts the cluster in halves (links moved between
//! bridges, not a loopback trick) while clients append, deliver over LMTP, flag, expunge, move and
//! create, rename and delete mailboxes on every node, heals, waits for convergence and runs its
//! checker. The test asserts the checker's verdict: nothing acknowledged lost, nothing destroyed
//! listed again, every node the same.
//!
//! Namespaces need root and iproute2; without them (or without python3) the test says why on
//! stderr and passes without running, so `cargo test` stays green on a laptop or in a container.

use std::path::Path;
use std::process::Command;

/// The names of this test's namespaces begin with this, not with the `mmc-` of chaos batches
/// (whose clean-up between runs removes that whole family).
const PREFIX_FAMILY: &str = "mmt-";

/// Why this machine cannot run the partition, or None when it can.
fn missing_requirement() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for network namespaces".into());
    }
    if Command::new("python3").arg("--version").output().is_err() {
        return Some("needs python3".into());
    }
    let probe = format!("{PREFIX_FAMILY}probe{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(error) => return Some(format!("needs iproute2 (`ip`): {error}")),
        Ok(output) if !output.status.success() => {
            return Some(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

#[test]
fn a_real_partition_in_halves_loses_nothing_and_converges() {
    if let Some(reason) = missing_requirement() {
        eprintln!("SKIPPED a_real_partition_in_halves_loses_nothing_and_converges: {reason}");
        return;
    }
    let workdir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/chaos.py");
    let output = Command::new("python3")
        .env("CHAOS_PREFIX_FAMILY", PREFIX_FAMILY)
        .arg(&script)
        .args([
            "--seed",
            "1",
            "--duration",
            "8",
            "--nodes",
            "3",
            "--only-faults",
            "halves",
        ])
        .args(["--feed-clients", "1", "--converge-deadline", "90"])
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_mailmesh"))
        .arg("--workdir")
        .arg(workdir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("chaos.py printed no summary; stderr:\n{stderr}"));
    assert!(
        output.status.success(),
        "the checker found problems {}: {summary}\nstderr:\n{stderr}",
        summary["problems"]
    );
    for count in ["lost", "resurrected", "divergent", "duplicates"] {
        assert_eq!(summary[count], 0, "{count}: {summary}");
    }
    assert_eq!(
        summary["faults"]["halves"], 1,
        "the run must have split the cluster: {summary}"
    );
    assert!(summary["acknowledged"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["converged"], true, "{summary}");
}
