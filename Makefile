# The two set-up commands of README.md. Each creates .venv from pyproject.toml on
# first use (plain venv + pip, nothing installed by hand) and then runs.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,examples,docs]"
	touch $@

.PHONY: test lint test-min mnist bench docs test-isa wheel-smoke
# The formatter's check, the linter and the type checker first: they take seconds, the tests many minutes.
test: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# The linter and the type checker alone (configured in pyproject.toml), as `make test` runs them before the tests.
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

# The documentation site (Sphinx, offline), warnings and broken cross-references as errors.
docs: $(VENV)/.installed
	$(PY) -m sphinx -b html -n -W --keep-going docs docs/_build/html

# The kernel tests, the sweep's program-versus-program tests and the rounding model's float32 tolerances as on a
# CPU without AVX-512: the kernel's AVX2 path and XLA limited to AVX2 (tests/kernels/test_isa.py, in `make test`,
# checks every path this CPU can run bitwise).
test-isa: $(VENV)/.installed
	JADAM_KERNEL_ISA=avx2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 $(PY) -m pytest -q tests/kernels/test_kernels.py tests/tuning/test_sweep.py \
	  tests/core/test_hyperparams.py tests/tuning/test_early_stopping.py tests/parity/test_rounding_model.py

# The package as a user gets it: the sdist, the wheel built from it, the wheel installed into a fresh virtual
# environment, and .ci/wheel_smoke.py run from an empty directory with an empty HOME and no compiler on PATH.
SMOKE := $(CURDIR)/workdir/wheel-smoke
wheel-smoke: $(VENV)/.installed
	rm -rf dist $(SMOKE)
	$(PY) -m build --outdir dist .
	ls -l dist
	python3 -m venv $(SMOKE)/venv
	$(SMOKE)/venv/bin/python -m pip install -q dist/jadam-*.whl
	mkdir -p $(SMOKE)/home $(SMOKE)/run
	cd $(SMOKE)/run && env -i PATH=$(SMOKE)/venv/bin HOME=$(SMOKE)/home JAX_PLATFORMS=cpu \
	  $(SMOKE)/venv/bin/python $(CURDIR)/.ci/wheel_smoke.py $(CURDIR)
