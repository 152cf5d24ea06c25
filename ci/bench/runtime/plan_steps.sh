#!/usr/bin/env bash
# ci/bench/runtime, plan steps: the per-step overhead of the plan loop (step journal, tool gate,
# kill-switch reads, status write) against a direct MCP tool call of the same tool in the same run,
# in the embedded runtime, with server-everything over stdio and a scripted model endpoint.
# Medians over PLAN_BENCH_ROUNDS rounds (default 7); goal: < 2 ms per step; prints MISSED and exits
# non-zero when missed. Needs the mcp-everything peer (ci/peers.sh mcp-everything).
# Usage: ci/bench/runtime/plan_steps.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
exec cargo test --quiet --release -p agentplane --test agentic_plan -- \
    --ignored --exact bench_plan_step_overhead --nocapture
