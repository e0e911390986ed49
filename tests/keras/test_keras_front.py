"""jadam.keras against Keras 3 on its JAX backend: float32 and float64 trajectories, in ulps."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import reference
from tests.helpers import torch_front as H

keras = pytest.importorskip("keras")
STEPS = 500


def _run_keras(make, dtype):
  """Keras's optimizer, functionally (stateless_apply), on the harness's problem."""
  if keras.backend.backend() != "jax":
    pytest.skip("needs KERAS_BACKEND=jax")
  params0, curv, noise = H.problem(STEPS)
  with jax.numpy_dtype_promotion("standard"):  # Keras is not written for strict promotion
    variables = [keras.Variable(params0[k].astype(dtype), dtype=np.dtype(dtype).name) for k in H.PATHS]
    opt = make()
    opt.build(variables)
    cs = [jnp.asarray(curv[k].astype(dtype)) for k in H.PATHS]
    ns = [jnp.asarray(noise[k].astype(dtype)) for k in H.PATHS]

    @jax.jit
    def run(tv, ov):
      def step(carry, n_t):
        tv, ov = carry
        grads = [c * p + n for c, p, n in zip(cs, tv, n_t, strict=True)]
        tv, ov = opt.stateless_apply(ov, grads, tv)
        return (tv, ov), tv

      return jax.lax.scan(step, (tv, ov), ns)[1]

    out = run([v.value for v in variables], [v.value for v in opt.variables])
  return {k: np.asarray(v) for k, v in zip(H.PATHS, out, strict=True)}


# Keras keeps its learning rate in a float32 variable; jadam gets that same number.
LR = float(np.float32(1e-3))
CASES = [
  ("Adam", {}),
  ("Adam", dict(amsgrad=True)),
  ("Adam", dict(beta_1=0.8, beta_2=0.99, epsilon=1e-3)),
  ("Adam", dict(weight_decay=0.05)),
  ("AdamW", {}),
  ("AdamW", dict(weight_decay=0.1, amsgrad=True)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in CASES])
def test_matches_keras(case, dtype):
  name, kw = case
  with jax.enable_x64(dtype == np.float64):
    want = _run_keras(lambda: getattr(keras.optimizers, name)(learning_rate=LR, **kw), dtype)
    got = H.run_jax(getattr(jadam.keras, name)(learning_rate=LR, **kw), STEPS, dtype)
  if dtype == np.float64:
    assert H.max_rel_diff(got, want) <= 1e-12
  # Measured: 0 ulps, bit for bit, in both dtypes; allow one.
  assert H.max_ulps(got, want) <= 1.0


def test_float64_matches_numpy_reference():
  """The Keras form (eps-hat, correction in the step) against tests/helpers/reference.py's, without Keras."""
  with jax.enable_x64(True):
    grads = jax.random.normal(jax.random.key(0), (200, 5), jnp.float64)
    params = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)
    tx = jadam.keras.Adam(learning_rate=1e-2, epsilon=1e-7)
    state = tx.init(params)
    update = jax.jit(tx.update)
    want = reference.adam(np.asarray(grads), np.asarray(params), lr=1e-2, eps=1e-7, keras=True)
    for g, w in zip(grads, want, strict=True):
      u, state = update(g, state, params)
      params = params + u
      np.testing.assert_allclose(np.asarray(params), w, rtol=1e-12)


def test_defaults_and_errors():
  import inspect

  adam, adamw = inspect.signature(jadam.keras.Adam).parameters, inspect.signature(jadam.keras.AdamW).parameters
  k_adam = inspect.signature(keras.optimizers.Adam).parameters
  k_adamw = inspect.signature(keras.optimizers.AdamW).parameters
  for ours, theirs in ((adam, k_adam), (adamw, k_adamw)):
    for name in ("learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay"):
      assert ours[name].default == theirs[name].default, name
  with pytest.raises(ValueError, match="weight_decay=None"):
    jadam.keras.AdamW(weight_decay=None)
  with pytest.raises(ValueError, match="epsilon"):
    jadam.keras.Adam(epsilon=-1.0)
  with pytest.raises(TypeError, match="keras_step corrects the moments itself"):
    tx = optax.chain(jadam.keras.scale_by_keras_moments(), jadam.bias_correct(), jadam.keras.keras_step())
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
