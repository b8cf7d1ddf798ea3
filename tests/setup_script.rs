//! The fresh-machine setup must find libclang itself and never take Debian's libclang-cpp for it
//! (a fresh machine of this kind ships only `libclang-cpp.so.14`, and bindgen cannot load that).
//! These tests run `scripts/lib/libclang.sh` over fake library directories, so they say the same
//! thing whether or not this machine has libclang-dev installed.

use std::path::Path;
use std::process::Command;

/// Runs `libclang_in` over `directory` and returns what it printed, or None when it found nothing.
fn detect(directory: &Path) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/libclang.sh");
    let output = Command::new("bash")
        .arg("-c")
        .arg("source \"$1\" && libclang_in \"$2\"")
        .arg("bash")
        .arg(&script)
        .arg(directory)
        .output()
        .expect("bash runs");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn directory_with(files: &[&str]) -> tempfile::TempDir {
    let directory = tempfile::tempdir().unwrap();
    for file in files {
        std::fs::write(directory.path().join(file), b"").unwrap();
    }
    directory
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let directory = directory_with(&[
        "libclang-cpp.so.14",
        "libclang-cpp.so",
        "libLLVM-14.so.1",
        "libclangBasic.a",
    ]);
    assert_eq!(detect(directory.path()), None);
}

#[test]
fn each_libclang_spelling_debian_ships_is_found() {
    for name in [
        "libclang.so",
        "libclang.so.1",
        "libclang-14.so.1",
        "libclang-14.0.6.so",
        "libclang-16.so",
    ] {
        let directory = directory_with(&["libclang-cpp.so.14", name]);
        let found = detect(directory.path()).unwrap_or_else(|| panic!("{name} was not found"));
        assert!(found.ends_with(name), "{name}: found {found}");
    }
}

#[test]
fn an_empty_or_missing_directory_finds_nothing() {
    let directory = directory_with(&[]);
    assert_eq!(detect(directory.path()), None);
    assert_eq!(detect(&directory.path().join("absent")), None);
}
