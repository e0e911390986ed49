#!/usr/bin/env bash
# The checks that matter on an accelerator, under 8 minutes: run from the repository root on the machine itself.
#
#   bash benchmarks/device_check.sh            # the default JAX backend (a GPU or TPU where there is one)
#   BUDGET=120 SIZES=1e6 STEPS=4 bash benchmarks/device_check.sh   # a shorter run (benchmark seconds, sizes)
#
# 1. the step helpers, sharding and export on the default backend (pure XLA there: the CPU kernel never enters);
# 2. benchmarks.step_time on the default backend: jadam vs optax.adam vs torch's fused Adam (on the same GPU when
#    torch sees one), step time, GB/s and the fraction of the triad bandwidth.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${BUDGET:-270}
$PY -c "import jax; print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())"
status=0
timeout 180 $PY -m pytest -q -x -p no:cacheprovider tests/step/test_fast.py tests/step/test_export.py tests/step/test_sharding.py || status=$?
timeout "$BUDGET" $PY -m benchmarks.step_time --only vector,configs --sizes "${SIZES:-1e7,5e7}" \
  --config-sizes "${SIZES:-1e7,5e7}" \
  --steps "${STEPS:-12}" || status=$?
exit $status
