# Set-up and entry points. `make run` and `make test` each create the virtual environment on a fresh
# machine first (torch is pinned and installed on its own so pip never pulls a multi-GB CUDA build
# here; elsewhere pass TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup run simulate test lint bench report serve-parity clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ServeGym needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev,export,sweep,tensorboard]"
	touch $(STAMP)

# The main job on the built-in default scenario (the Azure conversation trace on 4x H100 + 4x A100):
# train a router (a residual on PRISM's score, then MaskablePPO), then compare it with the baselines on held-out
# windows. Hydra overrides go in ARGS="...".
run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) experiments/train.py $(ARGS)

# Simulate the default scenario under one policy and print its summary.
simulate: $(STAMP)
	$(PY) experiments/simulate.py $(ARGS)

# Simulated vs live: a cluster's engine twins behind the router, each policy in turn, the same workload
# window in the simulator; prints both side by side (docs/serving.md). Arguments in ARGS="...".
serve-parity: $(STAMP)
	$(PY) -m servegym.serving.parity $(ARGS)

# Held-out accuracy of the performance model on real GPU measurements.
report: $(STAMP)
	$(PY) -m servegym.perfmodel report --plot outputs/perfmodel_report.png --csv outputs/perfmodel_report.csv

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check servegym perfmodel envs agents serving experiments tests
	$(PY) -m ruff format --check servegym perfmodel envs agents serving experiments tests

bench: $(STAMP)
	$(PY) -m servegym.perfmodel bench
	$(PY) -m servegym.envs.sim.bench
	$(PY) -m servegym.envs.bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
