#!/usr/bin/env bash
# A real JMAP client against a real two-node mailmesh cluster (issue 14): jmapc from PyPI over
# HTTPS (with a certificate the check makes), with deliveries over LMTP and a flag set over IMAP.
# Session, Mailbox/set, Email/query paging, Email/changes, moves, destroy, upload and
# Email/import, the EventSource push of a delivery to the other node, and an Email state from one
# node answered by the other. Makes a virtualenv with jmapc and cryptography (beside the build, at
# $CARGO_TARGET_DIR/jmap-clients-venv; jmapc is GPL-3.0, installed to test with, never shipped),
# builds mailmesh, then runs scripts/jmap_clients.py in that virtualenv (arguments are passed on,
# e.g. --keep). Exits non-zero when a check fails. About 10 s once mailmesh is built.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
VENV="$CARGO_TARGET_DIR/jmap-clients-venv"
JMAPC_VERSION="0.4.0"
CRYPTOGRAPHY_VERSION="50.0.2"
if ! "$VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('jmapc') != '$JMAPC_VERSION' or m.version('cryptography') != '$CRYPTOGRAPHY_VERSION')" 2>/dev/null; then
    echo "jmap-clients: installing jmapc $JMAPC_VERSION and cryptography $CRYPTOGRAPHY_VERSION into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "jmapc==$JMAPC_VERSION" "cryptography==$CRYPTOGRAPHY_VERSION"
fi
cargo build --release --bin mailmesh
exec "$VENV/bin/python" scripts/jmap_clients.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
