#!/usr/bin/env bash
# ci/bench/runtime, embedded path: tasks/s and p50/p99 submit -> Succeeded over HTTP against
# `agentplane dev`'s runtime with the builtin model, beside the floor (GET /healthz through the same
# client and server) measured in the same run.
# Usage: ci/bench/runtime/embedded.sh [--tasks N] [--concurrency C] [--workers W]
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --quiet --release -p agentplane
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir}/release/agentplane" dev-bench "$@"
