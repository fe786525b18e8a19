# requant: the two commands a new user needs are `make flow-run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install test flow-run bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

# The main job on embedded defaults: a synthetic Kimi-K2.6-layout upstream,
# converted with the seed card's recipe, then verified against its manifest.
flow-run: install
	rm -rf $(OUT)/upstream-tiny $(OUT)/kimi-k2.6-mxfp4
	$(BIN)/requant synth $(OUT)/upstream-tiny --profile tiny --seed 0
	$(BIN)/requant convert $(OUT)/upstream-tiny $(OUT)/kimi-k2.6-mxfp4 --recipe kimi-k2.6-mxfp4 --local
	$(BIN)/requant verify $(OUT)/kimi-k2.6-mxfp4
	@echo "checkpoint: $(OUT)/kimi-k2.6-mxfp4"

bench: install
	$(BIN)/requant bench --out bench-results $(BENCH_ARGS)

clean:
	rm -rf $(OUT) bench-results
