#!/usr/bin/env bash
# ci/bench/runtime, embedded path: tasks/s and p50/p99 submit -> Succeeded over HTTP against
# `agentplane dev`'s runtime with the builtin model, beside the floor (GET /healthz through the same
# client and server) measured in the same run, in a closed loop (saturation) and paced at --rate
# (default 1000 tasks/s, latency from each intent's scheduled time). Governance (issue 7): the same
# runs with governance off (no audit log, no rate limits/budgets) and on (audit log + a generous rate
# limit and budget), the ratio of their p99s (goal: governance adds < 10%), the audit log's append +
# checkpoint cost per event, and the admission step (controller::reconcile) with the policy off, on,
# and on + audit.
# Usage: ci/bench/runtime/embedded.sh [--tasks N] [--concurrency C] [--workers W] [--rounds R]
#        [--rate TASKS_PER_S] [--audit-events N] [--admissions N]
#        [--only off|policy-only|audit-only|on]
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --quiet --release -p agentplane
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir}/release/agentplane" dev-bench "$@"
