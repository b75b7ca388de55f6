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
# What building the extension needs (--no-build-isolation fetches none of it).
BUILD_DEPS ?= numpy "setuptools>=77" wheel ninja
TEST_DEPS ?= "pytest>=8" $(TRITON_SPEC)
# The trainer's dependencies, pyproject.toml's [train] extra (none of them pulls a torch).
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
# One stamp per layer: `make demo` stops at the trainer's (no verl, TRL, triton
# or pytest: about the size of torch), `make test` needs them all.
BASE_STAMP := $(VENV)/.riskpo-base
TRAIN_STAMP := $(VENV)/.riskpo-train
DEPS_STAMP := $(VENV)/.riskpo-deps
# Nothing installed after torch may replace it (verl and its dependencies would
# accept a newer one): every later install is constrained to it.
PIN := -c $(VENV)/torch-pin.txt
# Re-run on every call: ninja rebuilds only what changed in csrc/.
BUILD := $(PIP) install -q --no-build-isolation --no-deps -e .

.PHONY: test demo install install-train bench-advantages clean

$(BASE_STAMP): Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PIP) install -q $(PIN) $(BUILD_DEPS)
	touch $@

$(TRAIN_STAMP): $(BASE_STAMP)
	$(PIP) install -q $(PIN) $(TRAIN_DEPS)
	touch $@

$(DEPS_STAMP): $(TRAIN_STAMP)
	$(PIP) install -q $(PIN) $(TEST_DEPS)
	$(PIP) install -q $(PIN) $(INTEGRATION_DEPS)
	touch $@

# Everything the tests need, and the extension built in place.
install: $(DEPS_STAMP)
	$(BUILD)

# The trainer's dependencies only, and the extension built in place.
install-train: $(TRAIN_STAMP)
	$(BUILD)

# The whole suite, the sdist -> wheel -> fresh venv check included (tests/test_packaging.py).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The project's main job: RiskPO against GRPO on the embedded task (runs/demo/).
demo: install-train
	$(PY) -m riskpo_train.demo

bench-advantages: install
	$(PY) benchmarks/bench_advantages.py

clean:
	rm -rf build *.egg-info riskpo_kernels/_C*.so riskpo_kernels/_C_build.json
