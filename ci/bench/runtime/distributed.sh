#!/usr/bin/env bash
# ci/bench/runtime, distributed path: tasks/s and p50/p99 create -> Succeeded through `agentplane
# operator` + `agentplane worker` over kube-apiserver + etcd and SQS on moto, beside the floor (a
# client doing the same API creates, status applies and SQS send/receive/delete with no logic)
# measured in the same run, and the operator's CPU per task.
# Usage: ci/bench/runtime/distributed.sh [--tasks N] [--concurrency C] [--workers W]
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --quiet --release -p agentplane
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
stack_dir=$(mktemp -d -t agentplane-bench-stack.XXXXXX)
trap 'ci/stack.sh down --dir "$stack_dir" >/dev/null 2>&1 || true; rm -rf "$stack_dir"' EXIT
eval "$(ci/stack.sh up --dir "$stack_dir" --owner-pid $$)"
"${target_dir}/release/agentplane" cluster-bench "$@"
