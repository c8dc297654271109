# frugal_dist — every target builds its own .venv first; nothing needs to be installed by hand.
#   make train   the main job: a short real pre-training run on the embedded corpus (CPU, gloo)
#   make test    the whole test suite (what .ci/run runs)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; the GPU images bring their own torch (2.11) and skip this file.
TORCH_CPU ?= torch==2.13.0
NPROC  ?= 2
# DeepSpeed version of the GPU machines' wheel; MPI (mpich wheel) for mpirun launches.
DEEPSPEED ?= 0.19.8

.PHONY: venv train test lint bench clean

$(VENV)/.stamp: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=python3.x, >= 3.10)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev,hf,fairscale]"
	$(PY) -m pip install -q "deepspeed==$(DEEPSPEED)" mpich mpi4py
	touch $@

venv: $(VENV)/.stamp

train: venv
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launchers/train.py --config configs/tiny-cpu.yaml

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: venv
	$(VENV)/bin/ruff check frugal_dist launchers tests benchmarks
	$(VENV)/bin/ruff format --check frugal_dist launchers tests benchmarks

bench: venv
	$(PY) benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
