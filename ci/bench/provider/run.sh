#!/usr/bin/env bash
# Provider benchmark: how terraform-provider-agentplane compares with the providers people run
# today, each figure the median of $RUNS runs, all measured in this one run.
#
#   (a) process start -> go-plugin handshake line   ours vs Go terraform-provider-null (a binary
#       given as NULL_GO_BIN: its v3 tags are not servable by the Go module proxy) and the terraform-provider-null example of the Rust
#       `tf-provider` crate (built from crates.io here); all three under AutoMTLS
#   (b) latency of the first GetProviderSchema on a fresh process (same three)
#   (c) stripped binary size
#   (d) peak RSS of our provider during `tofu plan` of 100 queues (refreshing them from moto)
#   (e) median wall time of `tofu plan` of 50 applied queues, against the median plan of 1 queue
#       in the same moto: the 1-queue plan carries every fixed cost (tofu start, provider launch
#       and handshake, schema, provider configure), so the ratio and the per-queue figure
#       (t50 - t1) / 49 are what the provider's refresh of each queue adds. An empty config would
#       not launch the provider at all, so it would hide the provider's own fixed cost.
#
# Environment: RUNS (20), QUEUES (100), PLAN_RUNS (5 runs of each plan in (e)), ONLY=plan-time
# to run only (e), PROVIDER_BIN to measure a given provider binary instead of a fresh dist-provider
# build (the figures then describe that binary).
#
# Goals (issue "Terraform/OpenTofu provider"): (a) at or below both peers, (c) <= 20 MB,
# (d) <= 40 MB.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CACHE=${AGENTPLANE_CACHE:-$HOME/.cache/agentplane}
BENCH=$CACHE/bench/provider
RUNS=${RUNS:-20}
QUEUES=${QUEUES:-100}
PLAN_RUNS=${PLAN_RUNS:-5}
PLAN_QUEUES=50
ONLY=${ONLY:-}
TF_PROVIDER_VERSION=0.2.2

log() { printf '[bench/provider] %s\n' "$*" >&2; }
die() { printf '[bench/provider] ERROR: %s\n' "$*" >&2; exit 1; }
mkdir -p "$BENCH"
[[ -z $ONLY || $ONLY == plan-time ]] || die "ONLY=$ONLY: the only section that runs alone is plan-time"

# shellcheck disable=SC1091
[[ -f $CACHE/peers/peers.env ]] && . "$CACHE/peers/peers.env"
[[ -x ${AGENTPLANE_TOFU:-} ]] || die "OpenTofu not built; run ci/peers.sh tofu"
[[ -x ${AGENTPLANE_MOTO_SERVER:-} ]] || die "moto not built; run ci/peers.sh moto"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "n/a" && b != "n/a" && b > 0) printf "%.2f", a / b; else print "n/a" }'; }
field() {
    local v
    v=$(sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2")
    echo "${v:-n/a}"
}

# --- builds ------------------------------------------------------------------------------
if [[ -n ${PROVIDER_BIN:-} ]]; then
    [[ -x $PROVIDER_BIN ]] || die "PROVIDER_BIN=$PROVIDER_BIN is not an executable"
    OURS=$(realpath "$PROVIDER_BIN")
    log "measuring the given provider $OURS"
else
    # The provider as shipped (`make provider`): the dist-provider profile, size over speed.
    log "building our provider (dist-provider profile)"
    (cd "$ROOT" && cargo build --profile dist-provider --quiet -p terraform-provider-agentplane \
        --bin terraform-provider-agentplane)
    OURS=$ROOT/target/dist-provider/terraform-provider-agentplane
fi

# --- moto and workspaces for (d) and (e) -------------------------------------------------------
ws=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$AGENTPLANE_MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$ws/moto.log" 2>&1 &
moto_pid=$!
cleanup() { kill "$moto_pid" 2>/dev/null || true; rm -rf "$ws"; }
trap cleanup EXIT
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
pkg=$ws/mirror/registry.terraform.io/agentplane/agentplane/$version/linux_amd64
mkdir -p "$pkg"
ln -s "$OURS" "$pkg/terraform-provider-agentplane_v$version"
cat >"$ws/cli.tfrc" <<TFRC
provider_installation {
  filesystem_mirror {
    path    = "$ws/mirror"
    include = ["registry.terraform.io/agentplane/agentplane"]
  }
}
TFRC
tofu_in() { local dir=$1; shift; (cd "$dir" && TF_CLI_CONFIG_FILE=$ws/cli.tfrc CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1 "$AGENTPLANE_TOFU" "$@"); }
# new_workspace DIR COUNT NAME_PREFIX: an initialised workspace of COUNT queues.
new_workspace() {
    mkdir -p "$1"
    cat >"$1/main.tf" <<TF
terraform {
  required_providers {
    agentplane = { source = "registry.terraform.io/agentplane/agentplane" }
  }
}
provider "agentplane" {
  region     = "us-east-1"
  access_key = "testing"
  secret_key = "testing"
  endpoints {
    sqs = "http://127.0.0.1:$port"
    kms = "http://127.0.0.1:$port"
  }
}
resource "agentplane_queue" "q" {
  count = $2
  name  = "$3-\${count.index}"
  tags  = { bench = "provider" }
}
TF
    tofu_in "$1" init -input=false -no-color >/dev/null
}
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
now_ms() { date +%s%3N; }
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done

# --- (e) -------------------------------------------------------------------------------------
log "plan time: $PLAN_QUEUES queues vs 1 queue, $PLAN_RUNS runs each"
for n in 1 "$PLAN_QUEUES"; do
    new_workspace "$ws/plan$n" "$n" "plan$n"
    tofu_in "$ws/plan$n" apply -input=false -no-color -auto-approve -parallelism=10 >/dev/null
done
# Interleaved, so load from elsewhere on the machine falls on both series alike.
for _ in $(seq "$PLAN_RUNS"); do
    for n in 1 "$PLAN_QUEUES"; do
        start=$(now_ms)
        tofu_in "$ws/plan$n" plan -input=false -no-color -refresh=true >"$ws/plan$n.out"
        echo $(($(now_ms) - start)) >>"$ws/plan$n.ms"
        grep -q "No changes" "$ws/plan$n.out" || die "plan of $n applied queues was not empty"
    done
done
plan1_ms=$(median <"$ws/plan1.ms")
plan50_ms=$(median <"$ws/plan$PLAN_QUEUES.ms")
for n in 1 "$PLAN_QUEUES"; do
    tofu_in "$ws/plan$n" destroy -input=false -no-color -auto-approve -parallelism=10 >/dev/null
done
report_plan_time() {
    printf '  %-40s %10s\n' "(e) tofu plan of $PLAN_QUEUES queues [ms]" "$plan50_ms"
    printf '  %-40s %10s\n' "    tofu plan of 1 queue (baseline) [ms]" "$plan1_ms"
    printf '  %-40s %10s\n' "    per extra queue [ms]" "$(awk -v a="$plan50_ms" -v b="$plan1_ms" -v n="$PLAN_QUEUES" 'BEGIN { printf "%.1f", (a - b) / (n - 1) }')"
}
if [[ $ONLY == plan-time ]]; then
    printf '\nprovider plan time (median of %s runs, %s)\n' "$PLAN_RUNS" "$OURS"
    report_plan_time
    printf '  plan %s queues vs 1 queue: %s\n' "$PLAN_QUEUES" "$(ratio "$plan50_ms" "$plan1_ms")"
    exit 0
fi

# --- (d) -------------------------------------------------------------------------------------
log "peak RSS during tofu plan of $QUEUES queues"
new_workspace "$ws/rss" "$QUEUES" bench
tofu() { tofu_in "$ws/rss" "$@"; }
tofu apply -input=false -no-color -auto-approve -parallelism=10 >/dev/null
# Poll every provider process's VmHWM (kernel-tracked peak RSS) while the plan runs.
python3 - "$ws/rss/peak" <<'PY' &
import os, sys, time
peak = 0
stop = sys.argv[1] + ".stop"
while not os.path.exists(stop):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("terraform-provi"):
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    time.sleep(0.005)
open(sys.argv[1], "w").write(str(peak))
PY
poller=$!
tofu plan -input=false -no-color -refresh=true >"$ws/rss/plan.out"
touch "$ws/rss/peak.stop"
wait "$poller"
peak_kb=$(cat "$ws/rss/peak")
grep -q "No changes" "$ws/rss/plan.out" || die "plan of $QUEUES applied queues was not empty"
tofu destroy -input=false -no-color -auto-approve -parallelism=10 >/dev/null

# --- builds for (a)-(c) ---------------------------------------------------------------------
log "building the probe (release)"
(cd "$ROOT" && cargo build --release --quiet -p terraform-provider-agentplane --example plugin_probe)
PROBE=$ROOT/target/release/examples/plugin_probe

# The Go null provider's v3 tags have no /v3 module path, so the Go module proxy serves none of
# them and it cannot be built from a registry here; pass a binary you built from its v3 source as
# NULL_GO_BIN to put it in the table, otherwise its column says it was not measured.
NULL_GO=${NULL_GO_BIN:-}
if [[ -n $NULL_GO && ! -x $NULL_GO ]]; then
    die "NULL_GO_BIN=$NULL_GO is not an executable"
fi

NULL_RS=$BENCH/null-rs-$TF_PROVIDER_VERSION/terraform-provider-null
if [[ ! -x $NULL_RS ]]; then
    log "building the tf-provider $TF_PROVIDER_VERSION terraform-provider-null example from crates.io"
    work=$(mktemp -d)
    (
        cd "$work"
        cargo init --quiet --name fetch-tf-provider
        cargo add --quiet "tf-provider@=$TF_PROVIDER_VERSION"
        cargo fetch --quiet
    )
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/tf-provider-$TF_PROVIDER_VERSION.crate | head -1)
    tar -xzf "$crate" -C "$work"
    # Its build script runs tonic-build, which needs protoc: use the vendored one our build has.
    protoc=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc | head -1)
    (cd "$work/tf-provider-$TF_PROVIDER_VERSION" && PROTOC=$protoc cargo build --quiet --release \
        --example terraform-provider-null --target-dir "$BENCH/tf-provider-target")
    mkdir -p "$(dirname "$NULL_RS")"
    cp "$BENCH/tf-provider-target/release/examples/terraform-provider-null" "$NULL_RS"
    strip "$NULL_RS" 2>/dev/null || true
    rm -rf "$work"
fi

# --- (a) + (b) --------------------------------------------------------------------------------
log "probing handshake and GetProviderSchema, $RUNS runs each"
ours=$("$PROBE" "$OURS" "$RUNS")
go_null=""
if [[ -n $NULL_GO ]]; then
    go_null=$("$PROBE" "$NULL_GO" "$RUNS")
else
    log "Go null provider not measured (set NULL_GO_BIN to include it)"
fi
rs_null=$("$PROBE" "$NULL_RS" "$RUNS")

# --- (c) -------------------------------------------------------------------------------------
size() { if [[ -n $1 ]]; then stat -c %s "$1"; fi; }
mb() { awk -v b="$1" 'BEGIN { if (b == "") print "n/a"; else printf "%.1f", b / 1048576 }'; }

# --- report ----------------------------------------------------------------------------------
hs_ours=$(field handshake_ms "$ours"); hs_go=$(field handshake_ms "$go_null"); hs_rs=$(field handshake_ms "$rs_null")
sc_ours=$(field schema_ms "$ours"); sc_go=$(field schema_ms "$go_null"); sc_rs=$(field schema_ms "$rs_null")
printf '\nprovider benchmark (median of %s runs, AutoMTLS)\n' "$RUNS"
printf '  %-40s %10s %10s %10s\n' "" "ours" "null (Go)" "null (Rust)"
printf '  %-40s %10s %10s %10s\n' "(a) start -> handshake line [ms]" "$hs_ours" "$hs_go" "$hs_rs"
printf '  %-40s %10s %10s %10s\n' "(b) first GetProviderSchema [ms]" "$sc_ours" "$sc_go" "$sc_rs"
printf '  %-40s %10s %10s %10s\n' "(c) stripped binary [MB]" "$(mb "$(size "$OURS")")" "$(mb "$(size "$NULL_GO")")" "$(mb "$(size "$NULL_RS")")"
printf '  %-40s %10s\n' "(d) peak RSS, tofu plan of $QUEUES queues [MB]" "$(awk -v k="$peak_kb" 'BEGIN { printf "%.1f", k / 1024 }')"
report_plan_time
printf '\nratios (ours / baseline; < 1 is better)\n'
printf '  handshake vs Go null:   %s\n' "$(ratio "$hs_ours" "$hs_go")"
printf '  handshake vs Rust null: %s\n' "$(ratio "$hs_ours" "$hs_rs")"
printf '  schema vs Go null:      %s\n' "$(ratio "$sc_ours" "$sc_go")"
printf '  schema vs Rust null:    %s\n' "$(ratio "$sc_ours" "$sc_rs")"
printf '  binary vs 20 MB goal:   %s\n' "$(ratio "$(size "$OURS")" $((20 * 1048576)))"
printf '  RSS vs 40 MB goal:      %s\n' "$(ratio "$peak_kb" $((40 * 1024)))"
printf '  plan %s queues vs 1:    %s\n' "$PLAN_QUEUES" "$(ratio "$plan50_ms" "$plan1_ms")"

# --- goals -----------------------------------------------------------------------------------
# Every figure is printed above; a missed size goal fails the run loudly.
size_goal=$((20 * 1048576))
ours_size=$(size "$OURS")
if ((ours_size > size_goal)); then
    printf '\nMISSED: (c) stripped binary %s MB (%s bytes) is over the 20 MB goal\n' "$(mb "$ours_size")" "$ours_size"
    exit 1
fi
printf '\ngoal met: (c) stripped binary %s MB <= 20 MB\n' "$(mb "$ours_size")"
