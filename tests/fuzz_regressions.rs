//! Replays every input under `fuzz/regressions/<target>/` through the code its cargo-fuzz target
//! runs, so a crash found by `scripts/fuzz.sh` and fixed stays fixed in `cargo test` on stable Rust.
//!
//! Each folder holds at least the seed corpus of its target (written by
//! `cargo run --release --example fuzz_decoders -- --write-seeds fuzz/regressions`, plus hand-made
//! change-state tokens). A crash input found later is copied from `fuzz/artifacts/<target>/` into
//! the same folder. Each target's body is one function in `mailmesh::fuzzing`, which the cargo-fuzz targets
//! call too, so both run the same code; the test
//! `every_fuzz_target_has_a_replayer_and_inputs` fails when a target is added to fuzz/Cargo.toml
//! without a replayer and inputs here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use mailmesh::fuzzing::TARGETS;

fn regressions_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("regressions")
}

/// The files of one target's folder, sorted so failures are reported in a stable order.
fn inputs_of(target: &str) -> Vec<PathBuf> {
    let folder = regressions_folder().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", folder.display()))
        .map(|entry| entry.expect("a readable folder entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_target_has_a_replayer_and_inputs() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
        .expect("fuzz/Cargo.toml is readable");
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|name| *name != "mailmesh-fuzz")
        .collect();
    assert!(!declared.is_empty(), "no [[bin]] targets found in fuzz/Cargo.toml");
    for name in &declared {
        assert!(
            TARGETS.iter().any(|(target, _)| target == name),
            "fuzz target {name} has no replayer in tests/fuzz_regressions.rs"
        );
    }
    for (target, _) in TARGETS {
        assert!(
            declared.contains(target),
            "replayer {target} has no target in fuzz/Cargo.toml"
        );
        assert!(
            !inputs_of(target).is_empty(),
            "fuzz/regressions/{target}/ holds no inputs; add at least the seed corpus"
        );
    }
}

#[test]
fn no_saved_fuzz_input_panics() {
    // Panics are collected and reported below with their files; keep the default hook's output
    // so the panic message of each failure is still printed.
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, replay) in TARGETS {
        for path in inputs_of(target) {
            let input = std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| replay(&input))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(replayed > 0, "no inputs were replayed");
    assert!(failures.is_empty(), "these saved fuzz inputs panic: {failures:#?}");
}
