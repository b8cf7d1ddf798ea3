#!/usr/bin/env bash
# Real Postfix delivering over LMTP to a real four-node mailmesh cluster (issue 13, item 2).
# Installs Debian's postfix when it is missing (preseeded "No configuration": nothing of the
# system's mail setup is configured or started), builds mailmesh, then runs
# scripts/postfix_lmtp.py, which starts a private Postfix instance under a temporary directory
# (`postfix -c DIR`, SMTP and LMTP on loopback ports and a unix socket only) and checks a normal
# delivery, a bounce, a multi-recipient message, two kinds of deferral (a 4xx, a node down) and
# the lmtp:unix: transport. Arguments are passed on (e.g. --keep). Needs root. Exits non-zero
# when a check fails. About 10 s once mailmesh is built.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v postfix >/dev/null || ! command -v postqueue >/dev/null; then
    echo "postfix-lmtp: installing postfix" >&2
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postfix >/dev/null \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postfix >/dev/null; }
fi
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo build --release --bin mailmesh
exec $SUDO python3 scripts/postfix_lmtp.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
