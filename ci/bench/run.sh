#!/usr/bin/env bash
# `make bench`: every whole-system benchmark under ci/bench/<name>/run.sh, each printing its figures and
# the ratio to the baseline it measures in the same run. `ci/bench/run.sh runtime edge` runs a subset.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for script in "$here"/*/run.sh; do
        [ -e "$script" ] || continue
        names+=("$(basename "$(dirname "$script")")")
    done
fi
[ ${#names[@]} -gt 0 ] || { echo "no benchmarks under $here/*/run.sh" >&2; exit 1; }

# A bench that misses a goal exits non-zero after printing its figures; the others still run, and
# this script fails at the end naming them.
failed=()
for name in "${names[@]}"; do
    script="$here/$name/run.sh"
    [ -x "$script" ] || { echo "no benchmark named $name ($script)" >&2; exit 1; }
    start=$SECONDS
    echo "==> bench $name"
    rc=0
    "$script" || rc=$?
    echo "==> bench $name took $((SECONDS - start))s (exit $rc)"
    [ "$rc" -eq 0 ] || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> MISSED goals or failed: ${failed[*]}" >&2
    exit 1
fi
