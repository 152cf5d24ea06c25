#!/usr/bin/env bash
# ci/bench/runtime: every path of the runtime benchmark: the embedded runtime (agentplane dev), the
# plan loop's per-step overhead (embedded), and the distributed one (operator + worker over
# kube-apiserver and SQS on moto).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/embedded.sh"
"$here/plan_steps.sh"
"$here/distributed.sh"
