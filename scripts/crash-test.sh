#!/usr/bin/env bash
# Kills a node with SIGKILL at random points while it takes appends, and checks that nothing it
# acknowledged is lost. Arguments go to scripts/crash_test.py (e.g. --kills 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo build --release --bin mailmesh
exec python3 scripts/crash_test.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
