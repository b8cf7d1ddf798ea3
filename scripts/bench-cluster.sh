#!/usr/bin/env bash
# Cluster-scale benchmark (issue 6): builds mailmesh, then runs scripts/bench_cluster.py, which
# starts real nodes on 127.0.0.1 and prints one JSON object as its last line.
#
#   scripts/bench-cluster.sh --nodes 3 --mailboxes 10 --messages 500 --json
#   scripts/bench-cluster.sh --nodes 8 --mailboxes 10000 --messages 20000 --latency-ms 100 --json
#
# Every option is bench_cluster.py's (--help lists them). Set MAILMESH_BINARY to skip the build.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
if [ -z "${MAILMESH_BINARY:-}" ]; then
    cargo build --release --bin mailmesh >&2
    MAILMESH_BINARY="$CARGO_TARGET_DIR/release/mailmesh"
fi
exec python3 scripts/bench_cluster.py --binary "$MAILMESH_BINARY" "$@"
