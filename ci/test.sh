#!/usr/bin/env bash
# `make test`: every stage CI runs, each timed. Integration tests start their own real peers through
# ci/stack.sh (via the agentplane-testsupport crate), so the peers must be built first.
set -euo pipefail
cd "$(dirname "$0")/.."

# CI runs in a fresh clone each time; keep Cargo's build outputs in the peer cache (keyed by the
# toolchain) so a warm CI recompiles only what changed, as a developer's ./target does.
if [ "${CI:-}" = "true" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    rustc_version=$(rustc --version | awk '{print $2}')
    export CARGO_TARGET_DIR="${AGENTPLANE_CACHE:-$HOME/.cache/agentplane}/cargo-target/rustc-${rustc_version}"
    echo "==> CARGO_TARGET_DIR=${CARGO_TARGET_DIR}"
    # Incremental artefacts only pay off for edit-compile loops; in CI they just grow the cache.
    export CARGO_INCREMENTAL=0
    rm -rf "${CARGO_TARGET_DIR}/debug/incremental"
    # Superseded outputs of our own crates pile up with every change (a gigabyte or two a landing):
    # drop all but the newest few of each. Dependency outputs pile up more slowly, as dependencies
    # change; past 20 GB even after that, start the cache afresh.
    if [ -d "${CARGO_TARGET_DIR}" ]; then
        python3 ci/prune_target.py "${CARGO_TARGET_DIR}"
    fi
    if [ -d "${CARGO_TARGET_DIR}" ] && [ "$(du -sm "${CARGO_TARGET_DIR}" | cut -f1)" -gt 20000 ]; then
        echo "==> ${CARGO_TARGET_DIR} is over 20 GB; starting it afresh"
        rm -rf "${CARGO_TARGET_DIR}"
    fi
fi

timings=()
stage() {
    local name=$1
    shift
    local start=$SECONDS
    echo "==> ${name}"
    "$@"
    timings+=("$(printf '%-28s %5ds' "$name" $((SECONDS - start)))")
}
log=$(mktemp)
report() {
    echo "==> stage timings"
    printf '    %s\n' "${timings[@]}"
    # One closing line over every test binary, so a reader need not add up cargo's per-binary lines.
    # Benchmarks are #[ignore]d with a reason starting "a benchmark" (ci/bench runs them in release);
    # they are named apart, and every other ignored test counts as skipped.
    awk '/^test result:/ { p += $4; f += $6; i += $8 }
         / \.\.\. ignored, a benchmark/ { b += 1; names = names " " $2 }
         END { printf "tests: %d passed, %d failed, %d skipped", p, f, i - b
               if (b) printf "; %d benchmark(s) left to ci/bench:%s", b, names
               printf "\n" }' "$log"
    rm -f "$log"
}
trap report EXIT

stage "peers (ci/peers.sh)" ci/peers.sh
stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
stage "cargo build (tests)" cargo test --workspace --locked --no-run
run_tests() {
    cargo test --workspace --locked --no-fail-fast -- --color never 2>&1 | tee "$log"
}
stage "cargo test" run_tests
