#!/usr/bin/env bash
# The declared minimum versions, tested: a virtual environment with every lower
# bound of pyproject.toml's [project] dependencies pinned exactly (`jax>=0.8` ->
# `jax==0.8`), then the core parity, fast-path and export tests in it.
#
#   tools/test_min_versions.sh            (or `make test-min`; MIN_VENV=DIR to place the venv)
#
# The pins are read from pyproject.toml each run, never written down twice; the
# venv is rebuilt when they change. torch and keras are not installed: the tests
# that need them skip, the NumPy float64 references and the goldens still run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MIN_VENV:-.venv-min}
PYTHON=${PYTHON:-python3}

# Each `name>=X` of [project].dependencies becomes `name==X`, and so do chex's and flax's
# bounds in the test and examples extras; pytest and hypothesis come with the test extra's bounds.
pins=$("$PYTHON" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
  project = tomllib.load(f)["project"]
pins = []
for spec in project["dependencies"]:
  m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", spec)
  if m is None:
    raise SystemExit(f"pyproject.toml: {spec!r} has no plain lower bound (name>=X) to pin")
  pins.append(f"{m[1]}=={m[2]}")
test_tools = ("pytest", "hypothesis")
pins += [s for s in project["optional-dependencies"]["test"] if re.split(r"[<>=!~ ]", s, maxsplit=1)[0] in test_tools]
# chex (the test extra) and flax (the examples extra: the export test lowers the MNIST step) at their lower bounds too
for extra, name in (("test", "chex"), ("examples", "flax")):
  for spec in project["optional-dependencies"][extra]:
    m = re.fullmatch(rf"\s*({name})\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", spec)
    if m:
      pins.append(f"{m[1]}=={m[2]}")
print(" ".join(pins))
EOF
)
echo "test-min: $pins"

if [ ! -f "$VENV/.pins" ] || [ "$(cat "$VENV/.pins")" != "$pins" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086  # one argument per pin
  "$VENV/bin/python" -m pip install -q $pins
  echo "$pins" >"$VENV/.pins"
fi
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|optax|flax|chex|numpy) '

# The NumPy float64 parity, the committed torch goldens, the fused kernel against
# the stages (bit for bit: the test that set the jax minimum), the
# fast path and export (lowered for CUDA; the TPU lowerings are the same code path).
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=5 \
  tests/core/test_smoke.py \
  tests/parity/test_golden.py \
  tests/parity/test_torch_parity.py \
  tests/step/test_fast.py \
  tests/step/test_export.py \
  tests/kernels/test_kernels.py \
  -k "not tpu"
