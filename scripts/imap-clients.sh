#!/usr/bin/env bash
# Real IMAP clients against a real two-node mailmesh cluster (issue 15, item 4): Python's imaplib,
# replication into a selected session (IDLE and NOOP), and mbsync (Debian's isync) syncing two
# ways with a local Maildir, with a node restart between syncs, CONDSTORE/QRESYNC resync and
# subscriptions across the two nodes, and offlineimap. Installs isync and offlineimap3 when missing,
# builds mailmesh, then runs scripts/imap_clients.py (arguments are passed on, e.g. --keep).
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
cargo build --release --bin mailmesh
exec python3 scripts/imap_clients.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
