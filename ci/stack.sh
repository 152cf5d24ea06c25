#!/usr/bin/env bash
# Starts and stops the local stack of real peers (DESIGN.md §6): etcd,
# kube-apiserver and moto on 127.0.0.1, with fresh state in one directory.
#
#   ci/stack.sh up   [--dir DIR] [--owner-pid PID]
#   ci/stack.sh down [--dir DIR]
#   ci/stack.sh env  [--dir DIR]
#
# DIR defaults to $STACK_DIR, else .stack/ in the repo root (what `make
# stack-up`/`make stack-down` use); `--dir auto` makes a new temp dir. Ports
# are chosen free at start, so several stacks (one per test binary) can run at
# once. `up` prints stack.env on stdout, so `eval "$(ci/stack.sh up)"` works.
#
# With --owner-pid a detached watchdog runs `down` once that process exits, so
# a test binary that dies (or never runs destructors) does not leak peers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$ROOT/ci/stack.sh
CACHE=${AGENTPLANE_CACHE:-$HOME/.cache/agentplane}
PEERS_ENV=$CACHE/peers/peers.env
READY_TIMEOUT=${AGENTPLANE_STACK_TIMEOUT:-180}
declare -A PIDS=()

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
  sed -n '2,16p' "$SELF" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Peer binaries come from peers.env unless the caller already points at them.
load_peers() {
  local var
  if [[ -f $PEERS_ENV ]]; then
    local saved
    saved=$(export -p | grep -E '^declare -x AGENTPLANE_(ETCD|KUBE_APISERVER|MOTO_SERVER)=' || true)
    # shellcheck disable=SC1090
    source "$PEERS_ENV"
    eval "$saved"
  fi
  for var in AGENTPLANE_ETCD AGENTPLANE_KUBE_APISERVER AGENTPLANE_MOTO_SERVER; do
    if [[ -z ${!var:-} || ! -x ${!var} ]]; then
      die "peer binary $var=${!var:-<unset>} is missing; run 'make peers' (ci/peers.sh) first"
    fi
  done
}

# free_ports N: N distinct ports the kernel considers free right now. All
# sockets stay bound until every port is picked, so the N are distinct.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# wait_for NAME PID LOG CMD...: polls CMD until it succeeds, failing early if
# the peer process has exited.
wait_for() {
  local name=$1 pid=$2 logf=$3 deadline
  shift 3
  deadline=$(($(date +%s) + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$logf" >&2 || true
      return 1
    fi
    if (($(date +%s) > deadline)); then
      tail -n 30 "$logf" >&2 || true
      log "$name not ready after ${READY_TIMEOUT}s"
      return 1
    fi
    sleep 0.2
  done
}

# start NAME BINARY ARGS...: detached from the caller's terminal and stdio (a
# test harness waiting on our stdout must not wait on the peers too).
start() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
  echo "$name $! $1" >>"$DIR/pids"
  PIDS[$name]=$!
}

make_pki() {
  local pki=$DIR/pki
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -keyout ca.key -out ca.crt -subj /CN=agentplane-stack-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    # rustls refuses a CA certificate as the server's own, so the apiserver
    # gets a leaf signed by the CA above.
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout serving.key -out serving.csr -subj /CN=kube-apiserver
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
      'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc' >serving.ext
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile serving.ext -out serving.crt
    openssl ecparam -name prime256v1 -genkey -noout -out sa.key
    openssl ec -in sa.key -pubout -out sa.pub
    chmod 600 ./*.key
  ) >"$DIR/logs/pki.log" 2>&1 || { cat "$DIR/logs/pki.log" >&2; die "generating certificates failed"; }
}

write_files() {
  local ca_b64
  ca_b64=$(base64 -w0 <"$DIR/pki/ca.crt")
  umask 077
  cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: agentplane-stack
    cluster:
      server: https://127.0.0.1:$KUBE_PORT
      certificate-authority-data: $ca_b64
users:
  - name: admin
    user:
      token: $ADMIN_TOKEN
contexts:
  - name: agentplane-stack
    context:
      cluster: agentplane-stack
      user: admin
      namespace: default
current-context: agentplane-stack
EOF
  cat >"$DIR/stack.env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AGENTPLANE_STACK_DIR=$DIR
export AGENTPLANE_KUBE_SERVER=https://127.0.0.1:$KUBE_PORT
export AGENTPLANE_KUBE_TOKEN=$ADMIN_TOKEN
export AGENTPLANE_KUBE_CA=$DIR/pki/ca.crt
export AGENTPLANE_ETCD_ENDPOINT=http://127.0.0.1:$ETCD_PORT
EOF
  umask 022
}

kube_ready() {
  [[ $(curl -sS --max-time 2 --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    "https://127.0.0.1:$KUBE_PORT/readyz") == ok ]]
}

etcd_ready() {
  curl -sS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'
}

moto_ready() {
  [[ $(curl -sS --max-time 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$MOTO_PORT/moto-api/") == 200 ]]
}

# One attempt at bringing all three peers up on freshly chosen ports.
try_up() {
  local etcd_peer_port
  read -r ETCD_PORT etcd_peer_port KUBE_PORT MOTO_PORT < <(free_ports 4)
  : >"$DIR/pids"

  start moto "$AGENTPLANE_MOTO_SERVER" -H 127.0.0.1 -p "$MOTO_PORT"

  # Test state is thrown away, so fsync buys nothing but time.
  start etcd "$AGENTPLANE_ETCD" --name stack --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "stack=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync --log-level warn
  wait_for etcd "${PIDS[etcd]}" "$DIR/logs/etcd.log" etcd_ready || return 1

  start kube-apiserver "$AGENTPLANE_KUBE_APISERVER" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$KUBE_PORT" \
    --cert-dir "$DIR/kube-certs" \
    --tls-cert-file "$DIR/pki/serving.crt" --tls-private-key-file "$DIR/pki/serving.key" \
    --client-ca-file "$DIR/pki/ca.crt" \
    --token-auth-file "$DIR/tokens.csv" \
    --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$DIR/pki/sa.pub" \
    --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true --profiling=false --v=1
  wait_for kube-apiserver "${PIDS[kube-apiserver]}" "$DIR/logs/kube-apiserver.log" kube_ready || return 1
  wait_for moto "${PIDS[moto]}" "$DIR/logs/moto.log" moto_ready || return 1
}

cmd_up() {
  local start_time attempt
  start_time=$(now)
  load_peers
  if [[ $DIR == auto ]]; then
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/agentplane-stack.XXXXXX")
  fi
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  if [[ -s $DIR/pids ]] && any_alive; then
    die "a stack is already running in $DIR (ci/stack.sh down --dir $DIR)"
  fi
  rm -rf "${DIR:?}"/{etcd,kube-certs,logs,pki,pids,stack.env,kubeconfig,tokens.csv}
  mkdir -p "$DIR/logs"
  make_pki
  ADMIN_TOKEN=$(openssl rand -hex 24)
  (umask 077 && echo "$ADMIN_TOKEN,agentplane-admin,agentplane-admin,\"system:masters\"" >"$DIR/tokens.csv")

  # Whatever stops `up` half way (an error, Ctrl-C, a killed caller) must not
  # leave peers running that nobody has the pids of.
  trap 'stop_all' EXIT
  trap 'exit 130' INT TERM HUP

  # A port picked free can be taken by another stack before our peer binds
  # it; such a start fails fast, so it is retried on new ports.
  for attempt in 1 2 3; do
    if try_up; then
      break
    fi
    stop_all
    ((attempt < 3)) || die "stack failed to start; logs in $DIR/logs"
    log "start attempt $attempt failed; retrying on new ports"
    rm -rf "$DIR/etcd" "$DIR/kube-certs"
  done
  write_files

  if [[ -n ${OWNER_PID:-} ]]; then
    kill -0 "$OWNER_PID" 2>/dev/null || { stop_all; die "owner process $OWNER_PID is not running"; }
    # shellcheck disable=SC2016 # expanded by the watchdog's own bash
    setsid bash -c '
      while kill -0 "$1" 2>/dev/null && [[ -f "$2/pids" ]]; do sleep 1; done
      [[ -f "$2/pids" ]] && exec "$3" down --dir "$2" --from-watchdog
    ' watchdog "$OWNER_PID" "$DIR" "$SELF" </dev/null >>"$DIR/logs/watchdog.log" 2>&1 &
    # Its cmdline holds DIR, which is what `down` checks before killing it.
    echo "watchdog $! $DIR" >>"$DIR/pids"
  fi
  trap - EXIT INT TERM HUP

  log "up in $(elapsed "$start_time")s: kube https://127.0.0.1:$KUBE_PORT, etcd :$ETCD_PORT, moto http://127.0.0.1:$MOTO_PORT, dir $DIR"
  cat "$DIR/stack.env"
}

# is_ours PID EXE: the pid still runs the program we started (pids get reused).
is_ours() {
  local pid=$1 exe=$2
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$exe"
}

# running PID: not yet exited. An exited child of a non-reaping init stays a
# zombie with an empty cmdline, so this looks at the state, not the cmdline.
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

any_alive() {
  local name pid exe
  while read -r name pid exe; do
    is_ours "$pid" "$exe" && return 0
  done <"$DIR/pids"
  return 1
}

# Stops the peers listed in the pids file (not the watchdog when it is the caller).
stop_all() {
  local name pid exe deadline pids=()
  [[ -f $DIR/pids ]] || return 0
  while read -r name pid exe; do
    [[ $name == watchdog && -n ${FROM_WATCHDOG:-} ]] && continue
    if is_ours "$pid" "$exe"; then
      # The state is thrown away, and kube-apiserver's graceful shutdown
      # stalls for long once etcd is gone, so it gets no grace at all.
      if [[ $name == kube-apiserver ]]; then
        kill -KILL "$pid" 2>/dev/null || true
      else
        kill -TERM "$pid" 2>/dev/null || true
      fi
      pids+=("$pid:$exe")
    fi
  done <"$DIR/pids"
  deadline=$(($(date +%s) + 15))
  for entry in "${pids[@]}"; do
    pid=${entry%%:*}
    exe=${entry#*:}
    while running "$pid" && (($(date +%s) < deadline)); do sleep 0.1; done
    if running "$pid"; then
      log "$pid ($exe) ignored SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$DIR/pids"
}

cmd_down() {
  [[ -d $DIR ]] || { log "no stack in $DIR"; return 0; }
  DIR=$(cd "$DIR" && pwd)
  [[ -f $DIR/stack.env || -f $DIR/pids ]] || die "$DIR does not look like a stack directory; not touching it"
  stop_all
  rm -rf "${DIR:?}"
  log "down: $DIR"
}

cmd_env() {
  [[ -f $DIR/stack.env ]] || die "no stack.env in $DIR (is the stack up?)"
  cat "$DIR/stack.env"
}

main() {
  [[ $# -ge 1 ]] || usage
  local cmd=$1
  shift
  DIR=${STACK_DIR:-$ROOT/.stack}
  OWNER_PID=
  FROM_WATCHDOG=
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
      --owner-pid) OWNER_PID=${2:?--owner-pid needs a value}; shift 2 ;;
      --from-watchdog) FROM_WATCHDOG=1; shift ;;
      -h | --help) usage ;;
      *) die "unknown argument '$1'" ;;
    esac
  done
  case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    *) usage ;;
  esac
}

main "$@"
