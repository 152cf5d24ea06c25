# agentplane: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

# Real peers are built once into this cache, keyed by version (see ci/peers.sh).
export AGENTPLANE_CACHE ?= $(HOME)/.cache/agentplane
# Upstream CRDs used as fixtures; outside users point this at their own copy (see README).
export AGENTPLANE_CRDS ?= $(abspath $(CURDIR)/../shared/crds)

.PHONY: help demo test peers stack-up stack-down bench deb images provider crdgen fmt lint

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

demo: ## Run the embedded runtime and an edge device end to end: a signed task, its phases, its result
	ci/demo.sh

test: ## The whole suite: format, lints, unit tests and real-peer integration tests
	ci/test.sh

peers: ## Build or install the real peers (OpenTofu, Terraform, etcd, kube-apiserver, Crossplane, moto) once
	ci/peers.sh

stack-up: peers ## Start etcd + kube-apiserver + moto on 127.0.0.1 (state in .stack/)
	ci/stack.sh up

stack-down: ## Stop what stack-up started
	ci/stack.sh down

bench: ## Run the whole-system benchmarks under ci/bench/
	ci/bench/run.sh

deb: ## Build the edge agent's .deb (cargo-deb) into target/debian/
	ci/peers.sh cargo-deb
	cargo build --release -p agentplane-edge
	. "$${AGENTPLANE_CACHE:-$$HOME/.cache/agentplane}/peers/peers.env" && "$$AGENTPLANE_CARGO_DEB" -p agentplane-edge --no-build

provider: ## Build the Terraform provider as shipped (dist-provider profile) into target/dist-provider/
	cargo build --profile dist-provider -p terraform-provider-agentplane --bin terraform-provider-agentplane

images: ## Build the agentplane and agentplane-edge OCI images (layouts + SBOM) into target/images/
	cargo run -q -p xtask -- images --profile release --out target/images

crdgen: ## Regenerate charts/agentplane/crds from the api crate
	cargo run -q -p agentplane -- crdgen --out charts/agentplane/crds

fmt: ## Format the Rust sources
	cargo fmt --all

lint: ## Format check and clippy, as CI runs them
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
