"""jadam against the NumPy float64 reference and live `torch.optim`, in float64 and float32.

Each optimizer setting of `_parity.CONFIGS` runs 500 steps of a noisy quadratic
whose gradients are fed back from the parameters. Float64 is held to 1e-12
relative; float32 is counted in ulps against torch's own float32 run, never
against a float64 answer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jadam._core import common as _common
from tests.helpers import parity as _parity
from tests.helpers import rounding as _rounding

STEPS = 500
FREE_STEPS = 50
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


def _model(config):
  """The rounding model (tests/helpers/rounding) of `config`'s optimizer, from its NumPy reference's keywords: the
  same formulas, with the float32 hyperparameters both libraries compute with."""
  keywords = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in config.reference.keywords.items()}
  if "amsgrad" in keywords:
    keywords["amsgrad"] = keywords["amsgrad"] == "torch"
  return functools.partial(getattr(_rounding, config.reference.func.__name__), **keywords)


@pytest.mark.parametrize("name", NAMES)
def test_float32_within_rounding_of_torch(name):
  """Per step (torch starts every step from jadam's parameters and gradient), and free-running (each library on
  its own float32 trajectory), within the rounding model's bound of each other (tools/report_parity.py prints the
  distances in ulps). The steps are the sharp comparison. The free run's bound sums magnitudes where the quadratic
  contracts (and momentum oscillates), so it grows with the steps: compared over the first FREE_STEPS, where it
  stays under 3e-4 of the parameters for every configuration."""
  pytest.importorskip("torch")
  c = _parity.CONFIGS[name]
  prob = c.problem(STEPS)
  got, grads = _parity.run_jax(c.jadam(), prob, np.float32, with_grads=True)
  assert got.dtype == np.float32
  per_step = _parity.run_torch(c.torch, prob, np.float32, teacher=(got, grads))
  previous = np.concatenate([np.asarray(prob.params, np.float32)[None], got[:-1]])
  bound = _model(c)(grads, previous[0], teacher=previous)
  _rounding.assert_within(got, per_step, _rounding.Gap(0.0, np.stack([s["params"].gap for s in bound])), "step")
  free = _parity.run_torch(c.torch, prob, np.float32)
  a, b, noise = (np.asarray(x, np.float32) for x in (prob.a, prob.b, prob.noise))
  bound = _model(c)(lambda theta, t: theta * a - b + noise[t - 1], previous[0], steps=FREE_STEPS)
  bound = _rounding.Gap(0.0, np.stack([s["params"].gap for s in bound]))
  _rounding.assert_within(got[:FREE_STEPS], free[:FREE_STEPS], bound, "free")


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
