#!/usr/bin/env bash
# Runs every test: installs libclang when missing, then `cargo test --release`.
# The release profile is shared with the demo and the benchmarks, so RocksDB's C++ is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo test --release "$@"
