#!/usr/bin/env bash
# Many seeded fault runs of scripts/chaos.py, then their totals (scripts/chaos_check.py --totals).
#
#   sudo scripts/chaos-runs.sh [RUNS=10] [DURATION_SECONDS=90] [FIRST_SEED=1] [-- extra chaos.py flags]
#
# Each run prints one JSON summary line; they are appended to $CHAOS_WORKDIR/runs.jsonl (default
# /var/tmp/mailmesh-chaos) and the last line printed is the totals. Runs with a problem keep their
# work dir (history.jsonl, final.json, findings.json, logs/) and are listed with their seeds.
# The totals include the change-feed clients (--feed-clients, default 4): calls, answers, 410s,
# resyncs, final views that differ from the converged listing (feed_mismatches), IDs created twice.
# Bounded: RUNS runs, each ending by itself (duration + at most the convergence deadline).
set -u
runs=${1:-10}
duration=${2:-90}
first_seed=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")" && pwd)
workdir=${CHAOS_WORKDIR:-/var/tmp/mailmesh-chaos}
mkdir -p "$workdir"
results="$workdir/runs.jsonl"
: > "$results"
trap 'python3 "$here/chaos.py" --cleanup >/dev/null; exit 130' INT TERM
for ((run = 0; run < runs; run++)); do
    seed=$((first_seed + run))
    python3 "$here/chaos.py" --seed "$seed" --duration "$duration" --workdir "$workdir" "$@" \
        2>>"$workdir/runs.log" | tee -a "$results"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
        echo "{\"seed\":$seed,\"error\":\"chaos.py exited with $status; see $workdir/runs.log\"}" >&2
    fi
    python3 "$here/chaos.py" --cleanup >/dev/null
done
python3 "$here/chaos_check.py" --totals "$results"
