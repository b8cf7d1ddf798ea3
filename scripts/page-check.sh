#!/usr/bin/env bash
# Checks the node's status page in headless Chromium against a live local 3-node cluster.
# Installs Debian's chromium when it is missing, builds mailmesh, then runs scripts/page_check.py
# (arguments are passed on, e.g. --screenshot PATH, --keep). Exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    echo "page-check: installing chromium" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }
fi
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
cargo build --release --bin mailmesh
exec python3 scripts/page_check.py --binary "$CARGO_TARGET_DIR/release/mailmesh" "$@"
