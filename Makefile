# Two entry points that do all set-up on a fresh machine with nothing but Python:
#   make bench   create .venv, install with the baselines, run the main benchmark offline
#   make test    create .venv, install with the test extras, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATASET ?= glove-6b-50d
METHODS ?= bruteforce,faiss-flat,faiss-hnsw,hnswlib
BENCH_ARGS ?=
OUT    ?= results

.PHONY: bench test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[bench]'
	touch $@

venv: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-bench
	$(BIN)/annlib-bench --dataset $(DATASET) --methods $(METHODS) --out $(OUT) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
