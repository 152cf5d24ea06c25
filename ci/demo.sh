#!/usr/bin/env bash
# `make demo`: builds agentplane and agentplane-edge, starts `agentplane dev` on a temporary data dir,
# runs an edge agent against it (enroll, a signed intent through its durable outbox, the result), then a
# scripted device through the policy paths (duplicate, approval, denial, replay), and stops cleanly.
# Needs only the Rust toolchain. Set AGENTPLANE_DEMO_PORT / AGENTPLANE_DEMO_EDGE_PORT to move the
# runtime (default 8787) or the edge agent's local UI (default 7420).
set -euo pipefail

cd "$(dirname "$0")/.."
port="${AGENTPLANE_DEMO_PORT:-8787}"
addr="127.0.0.1:${port}"
edge_addr="127.0.0.1:${AGENTPLANE_DEMO_EDGE_PORT:-7420}"

echo "==> building agentplane and agentplane-edge"
cargo build --quiet -p agentplane -p agentplane-edge
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="${target_dir}/debug/agentplane"
edge="${target_dir}/debug/agentplane-edge"

data_dir="$(mktemp -d)"
log="${data_dir}/agentplane.log"
join_token="demo-join-$(date +%s)-$$"
edge_join_token="demo-edge-join-$(date +%s)-$$"
approver_token="demo-approver-$(date +%s)-$$"
pid=""
edge_pid=""

cleanup() {
    if [[ -n "${edge_pid}" ]]; then kill -TERM "${edge_pid}" 2>/dev/null || true; fi
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
    --join-token "${join_token},${edge_join_token}" --approver "admin=${approver_token}" >"${log}.out" 2>"${log}" &
pid=$!

for _ in $(seq 1 100); do
    if curl -fsS "http://${addr}/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${pid}" 2>/dev/null; then
        echo "agentplane dev exited early:"; cat "${log}"; exit 1
    fi
    sleep 0.1
done
curl -fsS "http://${addr}/healthz" >/dev/null || { echo "agentplane dev did not become healthy"; cat "${log}"; exit 1; }

echo "==> edge agent: enroll, then a signed intent through the local outbox"
edge_data="${data_dir}/edge"
"${edge}" --data-dir "${edge_data}" enroll --gateway "http://${addr}" --token "${edge_join_token}" \
    --device-id demo-kiosk --owner alice 2>>"${log}.edge"
"${edge}" --data-dir "${edge_data}" run --listen "${edge_addr}" --poll-ms 200 2>>"${log}.edge" &
edge_pid=$!
for _ in $(seq 1 100); do
    if curl -fsS "http://${edge_addr}/" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${edge_pid}" 2>/dev/null; then echo "the edge agent exited early:"; cat "${log}.edge"; exit 1; fi
    sleep 0.1
done
echo "local UI: http://${edge_addr}"
"${edge}" --data-dir "${edge_data}" submit --type summarize --timeout-secs 60 --wait \
    --prompt "summarise: the edge keeps the UI, the cloud runs the model" 2>>"${log}.edge"
kill -TERM "${edge_pid}"
wait "${edge_pid}" || true
edge_pid=""

echo
echo "==> a scripted device through the policy paths"
"${bin}" dev-client --gateway "http://${addr}" --join-token "${join_token}" --approver-token "${approver_token}"

echo
echo "==> metrics (excerpt)"
curl -fsS "http://${addr}/metrics" | grep -E '^agentplane_(intents|task_transitions|model_calls)_total' || true

echo "==> stopping agentplane dev"
kill -TERM "${pid}"
wait "${pid}" && echo "stopped cleanly" || { echo "agentplane dev exited with $?"; tail -20 "${log}"; exit 1; }
pid=""
