"""Complex parameters: PyTorch's rule (a complex number is its real and imaginary parts, `view_as_real`).

jadam.torch's optimizers against live torch on complex128 parameters in float64, to 1e-12 over 100 steps;
the core aliases on the rule itself and on a complex problem.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import torch_front as _torch_front_harness

STEPS = 100
SHAPES = {"a": (3, 2), "b": (4,)}

# (jadam.torch name, kwargs): the flags that take other code paths, and weight decay.
CASES = [
  ("Adam", dict(amsgrad=True, weight_decay=0.1)),
  ("AdamW", dict(weight_decay=0.1, maximize=True)),
  ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1)),
  ("RMSprop", dict(centered=True, momentum=0.5, weight_decay=0.05)),
  ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1)),
  ("NAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
  ("RAdam", dict(weight_decay=0.1)),
  ("Adamax", dict(weight_decay=0.1)),
]


def _problem(seed=0):
  rng = np.random.default_rng(seed)

  def cplx(*s):
    return rng.normal(size=s) + 1j * rng.normal(size=s)

  params = {k: cplx(*s) for k, s in SHAPES.items()}
  curv = {k: rng.uniform(0.1, 1.0, size=s) for k, s in SHAPES.items()}
  noise = {k: cplx(STEPS, *s) for k, s in SHAPES.items()}
  return params, curv, noise


def _run_torch(name, kwargs):
  torch = pytest.importorskip("torch")
  params, curv, noise = _problem()
  with _torch_front_harness.torch_default_dtype(torch.float64):  # NAdam's mu_product is in the default dtype
    tensors = {k: torch.tensor(v, dtype=torch.complex128, requires_grad=True) for k, v in params.items()}
    opt = getattr(torch.optim, name)(list(tensors.values()), **kwargs)
    out = {k: [] for k in SHAPES}
    for t in range(STEPS):
      with torch.no_grad():
        for k, p in tensors.items():
          p.grad = torch.tensor(curv[k]) * p + torch.tensor(noise[k][t])
      opt.step()
      for k, p in tensors.items():
        out[k].append(p.detach().numpy().copy())
  return {k: np.stack(v) for k, v in out.items()}


def _run_jax(tx):
  params, curv, noise = _problem()
  params = {k: jnp.asarray(v, jnp.complex128) for k, v in params.items()}
  curv = {k: jnp.asarray(v, jnp.complex128) for k, v in curv.items()}  # real values: exact products

  def step(carry, n_t):
    params, state = carry
    grads = {k: curv[k] * params[k] + n_t[k] for k in params}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params

  ns = {k: jnp.asarray(v, jnp.complex128) for k, v in noise.items()}
  return jax.jit(lambda p, s: jax.lax.scan(step, (p, s), ns)[1])(params, tx.init(params))


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{'-'.join(k) or 'default'}" for n, k in CASES])
def test_torch_front_matches_torch_on_complex128(name, kwargs):
  want = _run_torch(name, kwargs)
  with jax.enable_x64(True):
    got = _run_jax(getattr(jadam.torch, name)(**kwargs))
  for k in SHAPES:
    g = np.asarray(got[k])
    assert g.dtype == np.complex128
    scale = np.max(np.abs(want[k]), axis=tuple(range(1, want[k].ndim)), keepdims=True)
    assert np.max(np.abs(g - want[k]) / scale) <= 1e-12, (k, np.max(np.abs(g - want[k]) / scale))


def test_the_rule_is_per_component():
  """Adagrad's first step on g = 1 + 2j is -lr (sign of each part), as torch's view_as_real gives."""
  g = jnp.asarray([1 + 2j], jnp.complex64)
  tx = jadam.adagrad(1.0)
  updates, _ = tx.update(g, tx.init(g), g)
  np.testing.assert_allclose(updates, [-1 - 1j], rtol=1e-6)
  tx = jadam.adam(1.0)
  updates, state = tx.update(g, tx.init(g), g)
  np.testing.assert_allclose(updates, [-1 - 1j], rtol=1e-6)
  np.testing.assert_allclose(state[1].nu, [(1 - 0.999) * (1 + 4j)], rtol=1e-6)  # (re^2, im^2), not |g|^2


def test_complex_mu_dtype_is_accepted():
  with jax.enable_x64(True):
    params = {"z": jnp.ones(3, jnp.complex128), "x": jnp.ones(2, jnp.float32)}
    state = jadam.adam(mu_dtype="complex64").init(params)
    assert state[1].mu["z"].dtype == jnp.complex64 and state[1].mu["x"].dtype == jnp.float32
    state = jadam.adam(mu_dtype=jnp.float32).init(params)
    assert state[1].mu["z"].dtype == jnp.complex64
  with pytest.raises(TypeError, match=r"no complex type of that width"):
    jadam.adam(mu_dtype=jnp.bfloat16).init(params)


ALIASES = {
  "adam": lambda: jadam.adam(0.05),
  "adamw": lambda: jadam.adamw(0.05, weight_decay=1e-4),
  "sgd": lambda: jadam.sgd(0.05, momentum=0.9),
  "rmsprop": lambda: jadam.rmsprop(0.01, centered=True),
  "adagrad": lambda: jadam.adagrad(0.5),
  "adamax": lambda: jadam.adamax(0.05),
  "nadam": lambda: jadam.nadam(0.05),
  "radam": lambda: jadam.radam(0.05),
  "adam-amsgrad": lambda: jadam.adam(0.05, amsgrad=True),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_aliases_converge_on_a_complex_least_squares(name):
  """min |A z - y|^2 over complex z: the real gradient (torch's convention) is 2 A^H (A z - y)."""
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(6, 3)) + 1j * rng.normal(size=(6, 3)), jnp.complex64)
  z_star = jnp.asarray([1 - 2j, 0.5 + 0.5j, -1 + 0.25j], jnp.complex64)
  y = a @ z_star

  def loss(z):
    return jnp.sum(jnp.abs(a @ z - y) ** 2)

  def grad(z):
    return jnp.conj(jax.grad(loss)(z))  # jax gives the conjugate of the steepest-ascent direction

  tx = ALIASES[name]()
  z = jnp.zeros(3, jnp.complex64)

  def step(carry, _):
    z, s = carry
    u, s = tx.update(grad(z), s, z)
    return (optax.apply_updates(z, u), s), None

  (z, _), _ = jax.jit(lambda z, s: jax.lax.scan(step, (z, s), length=1500))(z, tx.init(z))
  assert float(loss(z)) < 1e-3 * float(loss(jnp.zeros(3, jnp.complex64))), float(loss(z))
