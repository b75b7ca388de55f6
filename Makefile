# Two commands on a fresh machine: `make test` and `make demo`.
#
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project's
# machines have on disk; a GPU user sets e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# The extension is always built with --no-build-isolation, against that torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
TEST_DEPS ?= "pytest>=8" ninja numpy "setuptools>=64" wheel
# The trainer's dependencies (none of them pulls a torch).
TRAIN_DEPS ?= "transformers>=5.5.3,<5.11,!=5.6.0" tokenizers tqdm pyyaml matplotlib "math-verify>=0.8" pyarrow
# The trainers our adapters plug into (riskpo_kernels.integrations), tested
# against the real packages. verl 0.9.1 caps transformers below 5.11, so the
# whole environment runs the newest transformers both accept (TRAIN_DEPS).
# cachetools, uvicorn and fastapi: verl 0.9.1's ray_trainer imports them
# without declaring them.
INTEGRATION_DEPS ?= "verl==0.9.1" "trl==1.16.0" cachetools uvicorn fastapi
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.riskpo-deps

.PHONY: test demo install bench-advantages clean

$(DEPS_STAMP): Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(TRITON_SPEC) $(TEST_DEPS) $(TRAIN_DEPS)
	# Nothing below may replace the torch installed above (verl and its
	# dependencies would accept a newer one): pin it for this one command.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PIP) install -q -c $(VENV)/torch-pin.txt $(INTEGRATION_DEPS)
	touch $@

# Re-run on every call: ninja rebuilds only what changed in csrc/.
install: $(DEPS_STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The project's main job: RiskPO against GRPO on the embedded task (runs/demo/).
demo: install
	$(PY) -m riskpo_train.demo

bench-advantages: install
	$(PY) benchmarks/bench_advantages.py

clean:
	rm -rf build *.egg-info riskpo_kernels/_C*.so
