#!/usr/bin/env bash
# Builds or installs every real peer the tests run against, once, into a
# version-keyed cache outside the repo (DESIGN.md §6).
#
#   ci/peers.sh            all peers
#   ci/peers.sh moto etcd  only these
#
# A warm run only checks binaries and stamps. Each stamp records the recipe
# (version, wrapper module contents, RECIPE_REV), so editing a wrapper or a
# version rebuilds that peer.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${AGENTPLANE_CACHE:-$HOME/.cache/agentplane}
PEERS=$CACHE/peers
WRAPPERS=$ROOT/ci/peers

MOTO_VERSION=5.2.5
SCHEMATHESIS_VERSION=4.32.5
ETCD_VERSION=v3.5.27
KUBE_VERSION=v1.35.4
TOFU_VERSION=v1.10.10
TERRAFORM_VERSION=v1.5.7
CROSSPLANE_VERSION=v2.2.1
FN_PAT_VERSION=v0.5.0
FN_AUTO_READY_VERSION=v0.7.0
HELM_VERSION=v3.22.0
PLAYWRIGHT_VERSION=1.65.1
MCP_EVERYTHING_VERSION=2026.8.31
CARGO_DEB_VERSION=3.8.0
# Container image test (xtask images): a real OCI registry and an independent client.
REGISTRY_VERSION=v3.1.2
CRANE_VERSION=v0.22.1
# Python MCP SDK: the recording and misbehaving tool servers the agentic tests run (ci/mcp/).
MCP_PYTHON_VERSION=2.3.0
# Open Policy Agent: the reference Rego implementation the regorus differential test compares with.
OPA_VERSION=v1.22.4
# llama.cpp's OpenAI-compatible server (llama-cpp-python), the edge's local model tier, and the
# gguf writer the test makes its tiny model with (edge-agent/tests/fixtures/make_tiny_gguf.py).
LLAMA_CPP_PYTHON_VERSION=0.3.36
GGUF_VERSION=0.19.0

ALL_PEERS=(mcp-everything moto schemathesis chromium playwright-core cargo-deb etcd helm crossplane fn-patch-and-transform fn-auto-ready terraform tofu kube-apiserver)
ALL_PEERS+=(registry crane)
ALL_PEERS+=(mcp-python)
ALL_PEERS+=(opa)
ALL_PEERS+=(llama-cpp)

# Go's caches live under the peer cache so one cold peer rebuild reuses the
# module downloads and compiled packages of the others.
export GOMODCACHE=$CACHE/go/mod
export GOCACHE=$CACHE/go/build
export GOTOOLCHAIN=local
export GOFLAGS=-buildvcs=false
export CGO_ENABLED=0
# Old modules pinned by some peers use go:linkname into the runtime; newer Go
# refuses that at link time unless told otherwise.
GO_LDFLAGS_BASE='-s -w -checklinkname=0'

log() { printf '[peers] %s\n' "$*" >&2; }
die() { printf '[peers] ERROR: %s\n' "$*" >&2; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Bump to rebuild every peer after changing how they are built (flags, steps).
RECIPE_REV=1

# recipe_key NAME VERSION: what the stamp must match for a cached build to count.
recipe_key() {
  local name=$1 version=$2
  {
    echo "$name $version"
    if [[ -d $WRAPPERS/$name ]]; then
      (cd "$WRAPPERS/$name" && find . -type f | LC_ALL=C sort | xargs sha256sum)
    fi
    echo "$RECIPE_REV $GO_LDFLAGS_BASE"
  } | sha256sum | cut -d' ' -f1
}

# is_warm DIR BIN KEY
is_warm() {
  [[ -x $1/$2 && -f $1/.stamp && "$(cat "$1/.stamp")" == "$3" ]]
}

# go_wrapper_build NAME DIR OUT PKG MODULE VERSION [LDFLAGS]: builds PKG inside a
# scratch copy of the wrapper module ci/peers/NAME with -mod=readonly (its
# committed go.sum is complete, so nothing resolves differently later), after
# checking the wrapper pins MODULE at the VERSION this script
# advertises, so the two cannot drift apart.
go_wrapper_build() {
  local name=$1 dir=$2 out=$3 pkg=$4 module=$5 version=$6 ldflags=${7:-}
  local work
  [[ -f $WRAPPERS/$name/go.mod ]] || { echo "no wrapper module $WRAPPERS/$name/go.mod"; return 1; }
  if ! grep -qE "^(require)?[[:space:]]*${module//./\\.} ${version//./\\.}([[:space:]]|$)" "$WRAPPERS/$name/go.mod"; then
    echo "$WRAPPERS/$name/go.mod does not require $module $version"
    return 1
  fi
  work=$(mktemp -d "$CACHE/build.$name.XXXXXX")
  cp -r "$WRAPPERS/$name/." "$work/"
  local rc=0
  (cd "$work" && nice -n 10 go build -mod=readonly -trimpath -ldflags "$GO_LDFLAGS_BASE $ldflags" -o "$dir/$out" "$pkg") || rc=$?
  rm -rf "$work"
  return $rc
}

# go_install_build DIR OUT MODPKG@VERSION [LDFLAGS]: modules whose own go.mod
# builds as is (no replace directives), so `go install pkg@version` pins
# exactly the upstream dependency versions.
go_install_build() {
  local dir=$1 out=$2 target=$3 ldflags=${4:-}
  local gobin
  gobin=$(mktemp -d "$CACHE/gobin.XXXXXX")
  local rc=0
  { GOBIN=$gobin nice -n 10 go install -trimpath -ldflags "$GO_LDFLAGS_BASE $ldflags" "$target" &&
    mv "$gobin/$(basename "${target%@*}")" "$dir/$out"; } || rc=$?
  rm -rf "$gobin"
  return $rc
}

# pip_venv_build DIR NAME REQUIREMENT ENTRY: a PyPI peer in its own venv, every transitive
# dependency pinned by ci/peers/NAME/constraints.txt, its entry point linked as DIR/ENTRY.
pip_venv_build() {
  local dir=$1 name=$2 requirement=$3 entry=$4
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
    -c "$WRAPPERS/$name/constraints.txt" "$requirement"
  ln -sf "venv/bin/$entry" "$dir/$entry"
}

build_moto() {
  pip_venv_build "$1" moto "moto[server]==$MOTO_VERSION" moto_server
}

# The venv's interpreter is the entry: tests run our own server scripts (ci/mcp/*.py) with it.
build_mcp_python() {
  pip_venv_build "$1" mcp-python "mcp==$MCP_PYTHON_VERSION" python
  # A symlink outside the venv's bin/ does not find the venv's pyvenv.cfg (the interpreter then runs
  # without the SDK): the entry is a wrapper that execs the venv's own interpreter instead.
  rm -f "$1/python"
  printf '#!/bin/sh\nexec "%s/venv/bin/python" "$@"\n' "$1" >"$1/python"
  chmod +x "$1/python"
}

# Compiles llama.cpp from the sdist (CPU only). GGML_NATIVE=OFF builds for the generic x86-64
# AVX2 baseline instead of this CPU's exact features, so the cached venv runs on any machine of
# the kind; the build runs niced on the two cores. The entry is the venv's interpreter: tests run
# `python -m llama_cpp.server` and the gguf script with it.
build_llama_cpp() {
  local dir=$1
  python3 -m venv "$dir/venv"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
    -c "$WRAPPERS/llama-cpp/constraints.txt" \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" "gguf==$GGUF_VERSION"
  # A script, not a symlink: Python finds its venv from the path it was started by, and a link
  # outside venv/bin would start the base interpreter without the venv's packages.
  rm -f "$dir/python"
  printf '#!/bin/sh\nexec "%s/venv/bin/python" "$@"\n' "$dir" >"$dir/python"
  chmod 755 "$dir/python"
}

build_schemathesis() {
  pip_venv_build "$1" schemathesis "schemathesis==$SCHEMATHESIS_VERSION" st
}

# Debian's chromium, for the edge UI test (headless). A system package, not a cache entry: the
# "build" links the installed binary into the cache so peers.env can name it like any other peer.
build_chromium() {
  local dir=$1
  if [[ ! -x /usr/bin/chromium ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "chromium is missing: run 'apt-get install -y chromium' as root"; return 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  ln -sf /usr/bin/chromium "$dir/chromium"
}

# playwright-core drives the system chromium; it never downloads a browser of its own.
build_playwright_core() {
  local dir=$1
  cp "$WRAPPERS/playwright-core/package.json" "$WRAPPERS/playwright-core/package-lock.json" "$dir/"
  (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
  ln -sf node_modules/.bin/playwright-core "$dir/playwright-core"
}

# The MCP reference test server (npm), for the plan loop's tool tests; it serves stdio and, with the
# `streamableHttp` argument, streamable HTTP on $PORT.
build_mcp_everything() {
  local dir=$1
  cp "$WRAPPERS/mcp-everything/package.json" "$WRAPPERS/mcp-everything/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --silent)
  ln -sf node_modules/.bin/mcp-server-everything "$dir/mcp-server-everything"
}

# cargo-deb (crates.io) packages the edge agent as a .deb; built with the Rust toolchain here.
build_cargo_deb() {
  local dir=$1
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --root "$dir" --quiet
  ln -sf bin/cargo-deb "$dir/cargo-deb"
}

build_etcd() {
  # The checksum database behind the module proxy does not answer for some
  # etcd 3.5 submodules; the wrapper's committed go.sum pins them instead
  # (this only matters when go.sum is regenerated with `go mod tidy`).
  GONOSUMDB=go.etcd.io/etcd go_wrapper_build etcd "$1" etcd ./ go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
}

build_kube_apiserver() {
  local v=${KUBE_VERSION#v} p=k8s.io/component-base/version
  local major=${v%%.*} minor
  minor=${v#*.}; minor=${minor%%.*}
  go_wrapper_build kube-apiserver "$1" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes "$KUBE_VERSION" \
    "-X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor \
     -X $p.gitTreeState=clean -X $p.gitCommit=0000000000000000000000000000000000000000 \
     -X $p.buildDate=1970-01-01T00:00:00Z \
     -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION \
     -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
}

build_tofu() {
  go_wrapper_build tofu "$1" tofu github.com/opentofu/opentofu/cmd/tofu \
    github.com/opentofu/opentofu "$TOFU_VERSION" \
    "-X github.com/opentofu/opentofu/version.dev=no"
}

build_terraform() {
  # 1.5.7 marks a release by an empty Prerelease, its default; no ldflags needed.
  go_wrapper_build terraform "$1" terraform github.com/hashicorp/terraform \
    github.com/hashicorp/terraform "$TERRAFORM_VERSION"
}

build_crossplane() {
  go_wrapper_build crossplane "$1" crossplane github.com/crossplane/crossplane/v2/cmd/crank \
    github.com/crossplane/crossplane/v2 "$CROSSPLANE_VERSION" \
    "-X github.com/crossplane/crossplane/v2/internal/version.version=$CROSSPLANE_VERSION"
}

build_fn_patch_and_transform() {
  go_wrapper_build fn-patch-and-transform "$1" function-patch-and-transform \
    github.com/crossplane-contrib/function-patch-and-transform \
    github.com/crossplane-contrib/function-patch-and-transform "$FN_PAT_VERSION"
}

build_fn_auto_ready() {
  go_wrapper_build fn-auto-ready "$1" function-auto-ready github.com/crossplane/function-auto-ready \
    github.com/crossplane/function-auto-ready "$FN_AUTO_READY_VERSION"
}

build_helm() {
  go_install_build "$1" helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
}

# The distribution registry (the reference OCI registry, `registry serve CONFIG`) and crane
# (go-containerregistry's CLI): the image test pushes with one and pulls by digest, so the layout
# our builder writes is checked by code that is not ours. Both modules build as published.
build_registry() {
  go_install_build "$1" registry "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" \
    "-X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION"
}

build_crane() {
  go_install_build "$1" crane "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
}

# opa's main package is its module root and its go.mod has no replace directives, so it builds as
# published; the version ldflag makes `opa version` report the pinned release.
build_opa() {
  go_install_build "$1" opa "github.com/open-policy-agent/opa@$OPA_VERSION" \
    "-X github.com/open-policy-agent/opa/v1/version.Version=${OPA_VERSION#v}"
}

# peer_info NAME -> "VERSION BINARY ENVVAR"
peer_info() {
  case $1 in
    moto) echo "$MOTO_VERSION moto_server AGENTPLANE_MOTO_SERVER" ;;
    schemathesis) echo "$SCHEMATHESIS_VERSION st AGENTPLANE_SCHEMATHESIS" ;;
    chromium) echo "debian chromium AGENTPLANE_CHROMIUM" ;;
    playwright-core) echo "$PLAYWRIGHT_VERSION playwright-core AGENTPLANE_PLAYWRIGHT_CORE" ;;
    mcp-everything) echo "$MCP_EVERYTHING_VERSION mcp-server-everything AGENTPLANE_MCP_EVERYTHING" ;;
    cargo-deb) echo "$CARGO_DEB_VERSION cargo-deb AGENTPLANE_CARGO_DEB" ;;
    etcd) echo "$ETCD_VERSION etcd AGENTPLANE_ETCD" ;;
    kube-apiserver) echo "$KUBE_VERSION kube-apiserver AGENTPLANE_KUBE_APISERVER" ;;
    tofu) echo "$TOFU_VERSION tofu AGENTPLANE_TOFU" ;;
    terraform) echo "$TERRAFORM_VERSION terraform AGENTPLANE_TERRAFORM" ;;
    crossplane) echo "$CROSSPLANE_VERSION crossplane AGENTPLANE_CROSSPLANE" ;;
    fn-patch-and-transform) echo "$FN_PAT_VERSION function-patch-and-transform AGENTPLANE_FN_PATCH_AND_TRANSFORM" ;;
    fn-auto-ready) echo "$FN_AUTO_READY_VERSION function-auto-ready AGENTPLANE_FN_AUTO_READY" ;;
    helm) echo "$HELM_VERSION helm AGENTPLANE_HELM" ;;
    registry) echo "$REGISTRY_VERSION registry AGENTPLANE_REGISTRY" ;;
    crane) echo "$CRANE_VERSION crane AGENTPLANE_CRANE" ;;
    mcp-python) echo "$MCP_PYTHON_VERSION python AGENTPLANE_MCP_PYTHON" ;;
    opa) echo "$OPA_VERSION opa AGENTPLANE_OPA" ;;
    llama-cpp) echo "$LLAMA_CPP_PYTHON_VERSION python AGENTPLANE_LLAMA_PYTHON" ;;
    *) return 1 ;;
  esac
}

ensure_peer() {
  local name=$1 version bin var dir key start
  read -r version bin var < <(peer_info "$name") || die "unknown peer '$name' (known: ${ALL_PEERS[*]})"
  dir=$PEERS/$name-$version
  key=$(recipe_key "$name" "$version")
  start=$(now)
  if is_warm "$dir" "$bin" "$key"; then
    log "$name $version: cached ($(elapsed "$start")s)"
    return 0
  fi
  check_tools "$name"
  log "$name $version: building into $dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  # A subshell outside any `if`, so errexit holds inside the build function.
  local rc=0
  set +e
  (set -e && "build_${name//-/_}" "$dir") >"$dir/build.log" 2>&1
  rc=$?
  set -e
  if ((rc != 0)); then
    tail -n 40 "$dir/build.log" >&2
    die "$name $version failed to build (full log: $dir/build.log)"
  fi
  [[ -x $dir/$bin ]] || die "$name $version: build finished but $dir/$bin is missing"
  echo "$key" >"$dir/.stamp"
  log "$name $version: built in $(elapsed "$start")s"
}

write_env() {
  local env=$PEERS/peers.env tmp name version bin var dir
  tmp=$(mktemp "$PEERS/peers.env.XXXXXX")
  echo "# Written by ci/peers.sh; paths of the real peers the tests run." >"$tmp"
  for name in "${ALL_PEERS[@]}"; do
    read -r version bin var < <(peer_info "$name")
    dir=$PEERS/$name-$version
    # Peers not built in this run stay listed if an earlier run built them;
    # the stamp is written only after a build succeeded.
    if [[ -x $dir/$bin && -f $dir/.stamp ]]; then
      echo "export $var=$dir/$bin" >>"$tmp"
    fi
  done
  chmod 644 "$tmp"
  mv "$tmp" "$env"
}

# The newest go directive among the wrappers (crossplane's); with
# GOTOOLCHAIN=local an older Go would fail deep inside a build instead.
MIN_GO=1.25.9

check_tools() {
  local name=$1 tool
  case $name in
    moto | schemathesis | mcp-python | llama-cpp) tool=python3 ;;
    chromium) tool=bash ;;
    playwright-core | mcp-everything) tool=npm ;;
    cargo-deb) tool=cargo ;;
    *) tool=go ;;
  esac
  command -v "$tool" >/dev/null || die "$name needs '$tool' on PATH"
  if [[ $tool == go ]]; then
    local have
    have=$(go env GOVERSION) || die "cannot run 'go env GOVERSION'"
    have=${have#go}
    [[ $(printf '%s\n%s\n' "$MIN_GO" "$have" | sort -V | head -n1) == "$MIN_GO" ]] ||
      die "Go $have is older than the $MIN_GO these peers need"
  elif [[ $tool == python3 ]]; then
    python3 -c 'import venv, ensurepip' 2>/dev/null ||
      die "python3 cannot create venvs (on Debian/Ubuntu: apt-get install python3-venv)"
    if [[ $name == llama-cpp ]]; then
      command -v cmake >/dev/null && command -v g++ >/dev/null ||
        die "llama-cpp compiles llama.cpp: it needs cmake and g++ (apt-get install cmake g++)"
    fi
  fi
}

main() {
  case ${1:-} in
    -h | --help)
      sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      echo "peers: ${ALL_PEERS[*]}"
      return 0
      ;;
  esac
  mkdir -p "$PEERS" "$GOMODCACHE" "$GOCACHE"
  local names=("$@") total
  [[ ${#names[@]} -gt 0 ]] || names=("${ALL_PEERS[@]}")
  for name in "${names[@]}"; do
    peer_info "$name" >/dev/null || die "unknown peer '$name' (known: ${ALL_PEERS[*]})"
  done
  total=$(now)
  # peers.env is rewritten after every peer (and on failure), so a peer that
  # built is usable at once and a later failure does not hide it.
  trap write_env EXIT
  for name in "${names[@]}"; do
    ensure_peer "$name"
    write_env
  done
  trap - EXIT
  log "wrote $PEERS/peers.env; total: $(elapsed "$total")s"
}

main "$@"
