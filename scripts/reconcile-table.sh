#!/usr/bin/env bash
# Prints the reconciliation benchmark for n = 1,000,000 on every layout and difference: JSON lines,
# one per cell, each with the trie protocol, the sketch session and negentropy measured in the same
# run, each timed as build + exchange (ms). `--table` prints a Markdown table of the same figures
# instead. STORE=1 adds the trie protocol over two RocksDB stores (set N smaller to keep it short).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mailmesh-target}"
table=false
[[ "${1:-}" == "--table" ]] && table=true
cargo build --release --example reconcile_bench
run_cells() {
    for layout in clustered random two-sided; do
        for diff in 1 100 10000; do
            "$CARGO_TARGET_DIR/release/examples/reconcile_bench" --n "${N:-1000000}" --diff "$diff" --layout "$layout" \
                --json ${STORE:+--store}
        done
    done
}
if ! $table; then
    run_cells
    exit 0
fi
run_cells | python3 -c '
import json, sys
print("| layout | d | trie B (RT, build + exchange ms) | sketch B (RT, build + exchange ms, path) "
      "| negentropy B (RT, build + exchange ms) | store trie B (RT, build + exchange ms) | floor B |")
print("|---|---|---|---|---|---|---|")
for line in sys.stdin:
    r = json.loads(line)
    sketch = "-" if r.get("sketch_bytes") is None else "{:,} ({}, {} + {}, {})".format(
        r["sketch_bytes"], r["sketch_round_trips"], r["sketch_build_ms"], r["sketch_exchange_ms"], r["sketch_path"])
    negentropy = "-" if r.get("negentropy_bytes") is None else "{:,} ({}, {} + {})".format(
        r["negentropy_bytes"], r["negentropy_round_trips"], r["negentropy_build_ms"], r["negentropy_exchange_ms"])
    store = "-" if r.get("store_bytes") is None else "{:,} ({}, {} + {})".format(
        r["store_bytes"], r["store_round_trips"], r["store_build_ms"], r["store_exchange_ms"])
    print("| {} | {:,} | {:,} ({}, {} + {}) | {} | {} | {} | {:,} |".format(
        r["layout"], r["diff"], r["bytes"], r["round_trips"], r["trie_build_ms"], r["trie_exchange_ms"],
        sketch, negentropy, store, r["minimum_bytes"]))
'
