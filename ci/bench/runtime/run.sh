#!/usr/bin/env bash
# ci/bench/runtime: every path of the runtime benchmark. Today the embedded path (agentplane dev);
# the distributed path (kube-apiserver + SQS) joins here with the distributed runtime.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/embedded.sh" "$@"
