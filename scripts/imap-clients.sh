#!/usr/bin/env bash
# Real IMAP clients against a real two-node mailmesh cluster (issue 15, item 4): Python's imaplib,
# replication into a selected session (IDLE and NOOP), and mbsync (Debian's isync) syncing two
# ways with a local Maildir, with a node restart between syncs, CONDSTORE/QRESYNC resync and
# subscriptions across the two nodes, offlineimap, LIST-EXTENDED, and imapclient from PyPI. Installs
# isync and offlineimap3 when missing, makes a virtualenv with imapclient (beside the build, at
# $CARGO_TARGET_DIR/imap-clients-venv), builds mailmesh, then runs scripts/imap_clients.py in that
# virtualenv (arguments are passed on, e.g. --keep).
# Exits non-zero when a check fails. About 15 s once mailmesh is built.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v mbsync >/dev/null; then
    echo "imap-clients: installing isync (mbsync)" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq isync >/dev/null \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq isync >/dev/null; }
fi
if ! command -v offlineimap >/dev/null; then
    echo "imap-clients: installing offlineimap3" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq offlineimap3 >/dev/null \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq offlineimap3 >/dev/null; }
fi
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
VENV="$CARGO_TARGET_DIR/imap-clients-venv"
IMAPCLIENT_VERSION="4.1.0"
if ! "$VENV/bin/python" -c "import imapclient, sys; sys.exit(imapclient.__version__ != '$IMAPCLIENT_VERSION')" 2>/dev/null; then
    echo "imap-clients: installing imapclient $IMAPCLIENT_VERSION into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "imapclient==$IMAPCLIENT_VERSION"
fi
cargo build --release --bin mailmesh
exec "$VENV/bin/python" scripts/imap_clients.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
