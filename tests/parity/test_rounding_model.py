"""tests/helpers/rounding: its bounds hold for a third float32 program and are tight enough to catch a wrong one.

The third program is Adam written op by op in NumPy float32 (no fusion, no reassociation: another rounding of
the same formulas than XLA's). A program with a deliberate error (the bias correction one step late, the learning
rate 1% off, no bias correction, the weight decay decoupled instead of coupled) must fall outside the bound.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import rounding as _rounding

F32 = np.float32


def _adam_float32(grads, params, *, lr, wd, error=None):
  """PyTorch's Adam in NumPy float32, operation by operation; the corrections as jadam forms them (from the
  Python floats 0.9 and 0.999, in double)."""
  lr, wd, b1, b2, eps = F32(lr), F32(wd), F32(0.9), F32(0.999), F32(1e-8)
  theta = np.asarray(params, F32).copy()
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  for t, g in enumerate(np.asarray(grads, F32), start=1):
    g = g + wd * theta if error != "decoupled" else g
    m = b1 * m + (F32(1) - b1) * g
    v = b2 * v + (F32(1) - b2) * g * g
    s = t + 1 if error == "late_correction" else t
    c1, c2 = (F32(-math.expm1(s * math.log(b))) for b in (0.9, 0.999))
    if error == "no_correction":
      c1 = c2 = F32(1)
    u = (m / c1) / (np.sqrt(v / c2) + eps)
    u = u + wd * theta if error == "decoupled" else u
    theta = theta - (lr * F32(1.01) if error == "lr" else lr) * u
  return theta


def _jadam(grads, params, lr, wd):
  tx = jadam.adam(jnp.float32(lr), weight_decay=wd)
  theta, state = jnp.asarray(params), tx.init(jnp.asarray(params))
  for g in grads:
    u, state = jax.jit(tx.update)(jnp.asarray(g), state, theta)
    theta = optax.apply_updates(theta, u)
  return np.asarray(theta)


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 3e-2])
def test_bound_holds_for_numpy_and_catches_errors(lr):
  rng = np.random.default_rng(9)
  grads = np.asarray(rng.normal(size=(20, 64)), F32)
  params = np.asarray(rng.uniform(1, 2, 64), F32)
  bound = _rounding.of_alias(jadam.adam, dict(learning_rate=F32(lr), weight_decay=0.1))(grads, params)[-1]["params"]
  got = _jadam(grads, params, F32(lr), 0.1)
  _rounding.assert_within(_adam_float32(grads, params, lr=lr, wd=0.1), got, bound, "NumPy float32")
  for error in ("late_correction", "lr", "no_correction", "decoupled"):
    wrong = np.abs(_adam_float32(grads, params, lr=lr, wd=0.1, error=error).astype(np.float64) - got)
    assert np.any(wrong > bound.gap), error


def test_gap_arithmetic():
  """The rules on numbers whose gaps are known: a sum, a product, a quotient, a root, a maximum."""
  u4 = 4 * 2.0**-24  # one operation, two programs
  a, b = _rounding.Gap(2.0, 1e-6), _rounding.Gap(-0.5, 1e-7)
  np.testing.assert_allclose((a + b).gap, 1e-6 + 1e-7 + u4 * 1.5)
  np.testing.assert_allclose((a * b).gap, 2.0 * 1e-7 + 0.5 * 1e-6 + 1e-13 + u4 * 1.0)
  np.testing.assert_allclose((a / b).gap, (1e-6 + 4.0 * 1e-7) / (0.5 - 1e-7) + u4 * 4.0)
  np.testing.assert_allclose(_rounding.sqrt(_rounding.Gap(4.0, 1e-6)).gap, 1e-6 / 4 + u4 * 2)
  np.testing.assert_allclose(_rounding.sqrt(_rounding.Gap(0.0, 1e-6)).gap, 1e-3)
  assert _rounding.maximum(a, b).gap == 1e-6
  assert _rounding.given(0.5).gap == 0.0 and _rounding.given(0.1).gap == abs(float(F32(0.1)) - 0.1)
  with pytest.raises(AssertionError, match="divisor"):
    a / _rounding.Gap(1e-7, 1e-6)


def test_adam_step_bound_holds_whatever_the_gradients():
  """The Cauchy-Schwarz bound on |m^ / sqrt(v^)| that caps a gap where a gradient is lost in its own: 1 at the
  first step (the update is sign(g)), and never exceeded, even by gradients that change scale by decades."""
  assert _rounding._largest(0.9, 0.999, 1, None) == pytest.approx(1.0, rel=2e-3)
  rng = np.random.default_rng(0)
  for b1, b2 in ((0.9, 0.999), (0.8, 0.99), (0.0, 0.9)):
    g = rng.normal(size=(60, 1000)) * 10.0 ** rng.uniform(-6, 3, (60, 1000))
    m = v = 0.0
    for t in range(1, 61):
      m, v = b1 * m + (1 - b1) * g[t - 1], b2 * v + (1 - b2) * g[t - 1] ** 2
      q = (m / (1 - b1**t)) / np.sqrt(v / (1 - b2**t))
      assert np.max(np.abs(q)) <= _rounding._largest(b1, b2, t, None), (b1, b2, t)
