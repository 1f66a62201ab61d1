# Set-up and checks. `make demo` and `make test` work on a fresh machine: each builds .venv first.
# TORCH is the torch requirement installed into the venv; the default is the CPU build. On a GPU machine
# that already has CUDA torch, use `make test-gpu` with that python instead.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-gpu lint bench mutate

$(BIN)/sparseblocks: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" triton==3.6.0
	$(BIN)/pip install --quiet -e ".[test,bench]" ruff==0.8.6
	touch $@

demo: $(BIN)/sparseblocks
	$(BIN)/sparseblocks demo

# Kernels run on the CPU through Triton's interpreter; GPU-marked tests skip themselves without a GPU.
test: $(BIN)/sparseblocks
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 tests

lint: $(BIN)/sparseblocks
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

# Mutation testing, not part of CI: one-line mutations of the format, pruning, checkpoints, patcher and ops, each
# run against its tests; prints the kill rate and the survivors. All of them take hours on 2 CPU cores; the default,
# 100 drawn at random, under an hour. Chosen files: MUTATE_ARGS="--sample 40 src/sparseblocks/format.py"
MUTATE_ARGS ?= --sample 100 --seed 0
mutate: $(BIN)/sparseblocks
	$(BIN)/python tools/mutate.py $(MUTATE_ARGS)

# On a CUDA machine (e.g. the device tool), with its own python: PYTHONPATH=src python3 -m pytest -m gpu tests
test-gpu:
	PYTHONPATH=src $(PYTHON) -m pytest -q -m gpu tests

# The quick grids of the GPU benchmarks, on a CUDA machine with its own python (results in benchmarks/results/<gpu>/,
# then the report): make bench PYTHON=python3
bench:
	PYTHONPATH=src $(PYTHON) -m sparseblocks.cli bench spmm --quick --name spmm_quick
	PYTHONPATH=src $(PYTHON) -m sparseblocks.cli bench mlp --quick --name mlp_quick
	PYTHONPATH=src $(PYTHON) -m sparseblocks.cli bench decode --quick --name decode_quick
	PYTHONPATH=src $(PYTHON) -m sparseblocks.cli bench train --quick --sections linear,mlp,train_step --name train_quick
	PYTHONPATH=src $(PYTHON) -m sparseblocks.cli report
