#!/usr/bin/env bash
# Builds mailmesh and runs the local three-node demo cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo build --release --bin mailmesh
exec "$CARGO_TARGET_DIR/release/mailmesh" demo "$@"
