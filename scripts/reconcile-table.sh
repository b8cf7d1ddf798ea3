#!/usr/bin/env bash
# Prints the reconciliation benchmark for n = 1,000,000 on every layout and difference (JSON lines).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo build --release --example reconcile_bench
for layout in clustered random two-sided; do
    for diff in 1 100 10000; do
        "$CARGO_TARGET_DIR/release/examples/reconcile_bench" --n "${N:-1000000}" --diff "$diff" --layout "$layout" --json
    done
done
