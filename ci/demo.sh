#!/usr/bin/env bash
# `make demo`: builds agentplane, starts `agentplane dev` on a temporary data dir, enrolls a scripted
# device, submits signed intents, prints each task's phases and result, and stops the runtime cleanly.
# Needs only the Rust toolchain. Set AGENTPLANE_DEMO_PORT to use a port other than 8787.
set -euo pipefail

cd "$(dirname "$0")/.."
port="${AGENTPLANE_DEMO_PORT:-8787}"
addr="127.0.0.1:${port}"

echo "==> building agentplane"
cargo build --quiet -p agentplane
bin="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug/agentplane"

data_dir="$(mktemp -d)"
log="${data_dir}/agentplane.log"
join_token="demo-join-$(date +%s)-$$"
approver_token="demo-approver-$(date +%s)-$$"
pid=""

cleanup() {
    if [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null; then
        kill -TERM "${pid}" 2>/dev/null || true
        # Give the runtime a moment to drain, then make sure it is gone.
        for _ in $(seq 1 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "${pid}" 2>/dev/null || true
    fi
    rm -rf "${data_dir}"
}
trap cleanup EXIT

echo "==> starting agentplane dev on ${addr} (data dir ${data_dir})"
"${bin}" dev --listen "${addr}" --data-dir "${data_dir}" \
    --join-token "${join_token}" --approver "admin=${approver_token}" >"${log}.out" 2>"${log}" &
pid=$!

for _ in $(seq 1 100); do
    if curl -fsS "http://${addr}/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${pid}" 2>/dev/null; then
        echo "agentplane dev exited early:"; cat "${log}"; exit 1
    fi
    sleep 0.1
done
curl -fsS "http://${addr}/healthz" >/dev/null || { echo "agentplane dev did not become healthy"; cat "${log}"; exit 1; }

echo "==> running the scripted device"
"${bin}" dev-client --gateway "http://${addr}" --join-token "${join_token}" --approver-token "${approver_token}"

echo
echo "==> metrics (excerpt)"
curl -fsS "http://${addr}/metrics" | grep -E '^agentplane_(intents|task_transitions|model_calls)_total' || true

echo "==> stopping agentplane dev"
kill -TERM "${pid}"
wait "${pid}" && echo "stopped cleanly" || { echo "agentplane dev exited with $?"; tail -20 "${log}"; exit 1; }
pid=""
