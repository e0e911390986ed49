"""jadam against the NumPy float64 reference and live `torch.optim`, in float64 and float32.

Each optimizer setting of `_parity.CONFIGS` runs 500 steps of a noisy quadratic
whose gradients are fed back from the parameters. Float64 is held to 1e-12
relative; float32 is counted in ulps against torch's own float32 run, never
against a float64 answer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jadam._core import common as _common
from tests.helpers import parity as _parity

STEPS = 500
NAMES = sorted(_parity.CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_float64_matches_reference(name):
  c = _parity.CONFIGS[name]
  prob = c.problem(STEPS)
  with jax.enable_x64(True):
    got, grads = _parity.run_jax(c.jadam(), prob, np.float64, with_grads=True)
  assert got.dtype == np.float64
  want = _parity.run_reference(c.reference, prob, grads)
  assert _parity.max_rel(got, want) <= 1e-12
  # The run moved: a test of a standing trajectory could not fail.
  assert np.max(np.abs(got[-1] - prob.params)) > 1e-2


@pytest.mark.parametrize("name", ["adam", "adam_weight_decay", "adamw", "sgd_nesterov", "rmsprop_centered", "adagrad"])
def test_float64_matches_reference_open_loop(name):
  """Gradients that do not depend on the parameters: jadam and the reference see exactly the same ones."""
  c = _parity.CONFIGS[name]
  prob = c.problem(STEPS, feedback=False)
  # Without the pull of the quadratic the parameters random-walk by a few units: start them at [11, 12].
  prob = prob._replace(params=prob.params + 10)
  with jax.enable_x64(True):
    got = _parity.run_jax(c.jadam(), prob, np.float64)
  assert _parity.max_rel(got, c.reference(prob.noise, prob.params)) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_float64_matches_torch(name):
  pytest.importorskip("torch")
  c = _parity.CONFIGS[name]
  prob = c.problem(STEPS)
  with jax.enable_x64(True):
    got = _parity.run_jax(c.jadam(), prob, np.float64)
  want = _parity.run_torch(c.torch, prob, np.float64)
  assert want.dtype == np.float64
  assert _parity.max_rel(got, want) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_float32_within_ulps_of_torch(name):
  """Per step: torch starts every step from jadam's parameters and gradient; at most 2 ulps apart.

  Free-running, each library following its own float32 trajectory, the
  rounding differences add up over 500 steps but stay within 64 ulps
  (tools/report_parity.py prints both).
  """
  pytest.importorskip("torch")
  c = _parity.CONFIGS[name]
  prob = c.problem(STEPS)
  got, grads = _parity.run_jax(c.jadam(), prob, np.float32, with_grads=True)
  assert got.dtype == np.float32
  per_step = _parity.run_torch(c.torch, prob, np.float32, teacher=(got, grads))
  assert _parity.max_ulps(got, per_step) <= 2
  free = _parity.run_torch(c.torch, prob, np.float32)
  assert _parity.max_ulps(got, free) <= 64


def _torch_factor(b: float, steps: np.ndarray) -> np.ndarray:
  """torch's `1 - beta ** step`: a Python double, rounded once where it meets float32 tensors."""
  return np.asarray([1 - b ** int(t) for t in steps], np.float64).astype(np.float32)


@pytest.mark.parametrize("b", [0.9, 0.99, 0.999, 0.9999])
def test_float32_bias_correction_matches_torch_double(b):
  """`1 - b**t` in float32 stays within 5 ulps of torch's double-precision factor for 20,000 steps.

  The naive float32 `1 - b**t` (optax's) drifts by hundreds of ulps for b = 0.999.
  """
  steps = np.arange(1, 20_001)
  count = jnp.asarray(steps, jnp.int32)
  got = np.asarray(jax.jit(jax.vmap(lambda t: _common.one_minus_power(b, t)))(count))
  assert got.dtype == np.float32
  want = _torch_factor(b, steps)
  assert _parity.max_ulps(got, want) <= 5
  assert _parity.max_ulps(got[:10], want[:10]) <= 3
  naive = (1 - np.float32(b) ** steps.astype(np.float32)).astype(np.float32)
  if b >= 0.99:
    assert _parity.max_ulps(naive, want) > 3 * _parity.max_ulps(got, want)


def test_float32_bias_correction_of_scalar_array_decay():
  """A decay given as a float32 array (no host double) still tracks torch's factor closely."""
  steps = np.arange(1, 2001)
  got = np.asarray(jax.vmap(lambda t: _common.one_minus_power(jnp.float32(0.999), t))(jnp.asarray(steps, jnp.int32)))
  # float32(0.999) itself is 2.4e-8 off 0.999: compare to the factor of the rounded decay.
  want = _torch_factor(float(np.float32(0.999)), steps)
  assert _parity.max_ulps(got, want) <= 8
