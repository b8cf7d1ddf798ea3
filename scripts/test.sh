#!/usr/bin/env bash
# Runs every test: installs libclang when missing, then `cargo test --release` (unit, binary and
# integration tests; the crate has no doc tests). The release profile is shared with the demo and
# the benchmarks, so RocksDB's C++ is built once. Ends with one line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The benchmarks and the stable fuzzer are examples, which `cargo test --tests` does not build:
# build them too, so a change that breaks one fails here rather than in the next benchmark run.
if [ "$status" -eq 0 ]; then
    cargo build --release --examples 2>&1 | tail -n 3
    status=${PIPESTATUS[0]}
fi
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i; if ($(i+1) ~ /^ignored;/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
