#!/usr/bin/env bash
# IMAP figures on real nodes (issue 15, item 5), printed as JSON: an IDLE session seeing an append
# made on another node, then on a mailbox of 100,000 messages (imported with `mailmesh import`) the
# first and a later SELECT, `UID FETCH 1:* (FLAGS)`, `UID SORT (REVERSE ARRIVAL) UTF-8 ALL`, and
# SELECT (QRESYNC ...) after 10 changes (bytes from the server).
# Arguments are passed on to scripts/imap_bench.py (e.g. --messages 20000). About 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo build --release --bin mailmesh
exec python3 scripts/imap_bench.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
