#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder that reads bytes from outside (issue 5), with
# cargo-fuzz and libFuzzer under AddressSanitizer.
#
#   scripts/fuzz.sh [--seconds N] [TARGET ...]      (default: 600 s for each target listed below)
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz when
# missing. Seeds come from examples/fuzz_decoders.rs (all targets but change_state) and from
# fuzz/regressions/TARGET/, which holds each target's seed corpus and every saved crash. A
# crashing input lands in fuzz/artifacts/TARGET/; once fixed, copy it to fuzz/regressions/TARGET/:
# tests/fuzz_regressions.rs replays every file there through the target's body in `cargo test`.
# Prints one JSON line per target, and a summary line last.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(sync_message record_states request_frame response_frame gossip_frame appended_mail text_parsers change_state sketch_symbols accounts_file jmap_request import_source lmtp_session mailbox_snapshot imap_session)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
bash scripts/setup.sh >/dev/null
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
export CARGO_TARGET_DIR="${MAILMESH_FUZZ_TARGET_DIR:-/var/tmp/mailmesh-fuzz-target}"

# Seed corpus: valid inputs of every kind, written by the stable fuzz driver.
CARGO_TARGET_DIR="${MAILMESH_TARGET_DIR:-/var/tmp/mailmesh-target}" \
    cargo run --quiet --release --example fuzz_decoders -- --write-seeds fuzz/corpus

cargo +nightly fuzz build --release
crashed=0
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    log="fuzz/artifacts/$target/last-run.log"
    status=0
    # The saved regressions join the corpus (read-only: new inputs go to fuzz/corpus/).
    regressions=()
    [ -d "fuzz/regressions/$target" ] && regressions=("fuzz/regressions/$target")
    cargo +nightly fuzz run --release "$target" "fuzz/corpus/$target" "${regressions[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    crashes=$(find "fuzz/artifacts/$target" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
    [ "$status" -ne 0 ] && crashed=1
    echo "{\"target\":\"$target\",\"seconds\":$seconds,\"executions\":${runs:-0},\"coverage\":${coverage:-0},\"crash_files\":$crashes,\"exit\":$status}"
done
echo "{\"summary\":\"fuzz\",\"targets\":${#targets[@]},\"seconds_each\":$seconds,\"failed\":$crashed}"
exit $crashed
