# The two set-up commands of README.md. Each creates .venv from pyproject.toml on
# first use (plain venv + pip, nothing installed by hand) and then runs.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

.PHONY: test lint test-min mnist bench
test: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The linter and the type checker (configured in pyproject.toml); not yet part of `make test`.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The core parity, fast-path and export tests with pyproject.toml's lower bounds pinned exactly (in .venv-min).
test-min:
	tools/test_min_versions.sh

# A new workdir a run, so that running it again never meets old checkpoints
# (ARGS="--workdir DIR --resume" continues one).
MNIST_WORKDIR ?= workdir/mnist-$(shell date +%Y%m%d-%H%M%S)
mnist: $(VENV)/.installed
	$(PY) -m examples.mnist --workdir $(MNIST_WORKDIR) $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.step_time $(ARGS)
