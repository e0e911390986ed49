"""Fuzzing against the NumPy float64 references: random pytrees, dtypes and hyperparameters (hypothesis).

Each example draws a pytree (nested dicts, lists and tuples up to depth 3,
with None leaves, int32 leaves and float leaves of shapes (), (3,), (2, 3),
(0,), (0, 4)), a float dtype per leaf (float32, bfloat16, float16, and
float64 under x64), an optimizer's hyperparameters in their valid ranges and a
few steps of gradients, runs jadam eagerly (no compile per tree) and compares
every step's update of every float leaf with the float64 reference of
tests/helpers/reference.py, run on the same rounded inputs.

Tolerances are per dtype and step, relative to each update plus the largest
update of the leaf: float64 1e-12; float32 a few ulps; float16 and bfloat16 a
few of their half-ulps, because jadam keeps the first moment (and the momentum
trace) in the parameter's dtype, as PyTorch does. To that come the spacing of
the dtype's smallest numbers and of the reference's own float64 parameters
(its updates are differences of parameters), and, for optimizers with a first
moment, the subnormal spacing relative to that moment (float16 state). Coupled L2 is folded into
the reference's gradients from jadam's own parameter trajectory: in bfloat16
the two trajectories drift apart by rounding, and through the normalisation
that drift would be amplified near g + lambda theta = 0, which says nothing
about the optimizer.

`derandomize=True` fixes the examples (hypothesis's seed is derived from the
test), so a failure reproduces; `max_examples=200` per property.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jadam
from tests.helpers import reference
from tests.helpers import reference_extra as _reference_extra

SETTINGS = settings(
  max_examples=200,
  derandomize=True,
  deadline=None,
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SHAPES = [(), (3,), (2, 3), (3,), (2, 3), (0,), (0, 4)]  # zero-size ones less often
# Relative tolerance per dtype and step (see the module docstring).
RTOL = {"float64": 1e-12, "float32": 5e-7, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _uniform(options):
  """One of `options`, drawn evenly: `sampled_from` inside a large draw favours its first options."""
  return st.integers(0, 2**32 - 1).map(lambda i: options[i % len(options)])


# --- pytrees -------------------------------------------------------------------------------------


class Leaf:
  """What one leaf will be: `kind` is a float dtype's name, "int32" or "none". Not a pytree node."""

  def __init__(self, kind, shape):
    self.kind, self.shape = kind, shape

  def __repr__(self):
    return f"Leaf({self.kind!r}, {self.shape})"


def _tree(kinds, depth=3):
  """A tree of `Leaf` specs: nested dicts, lists and tuples, at most `depth` deep."""
  leaf = st.builds(Leaf, _uniform(kinds), _uniform(SHAPES))
  if depth == 0:
    return leaf
  child = _tree(kinds, depth - 1)
  return st.one_of(
    leaf,
    st.dictionaries(st.sampled_from("abcd"), child, min_size=1, max_size=3),
    st.lists(child, min_size=1, max_size=3),
    st.tuples(child, child),
  )


def _build(spec, rng, what):
  """Arrays from a spec tree: params (uniform in [-1, 1]) or a gradient of `scale` (normal)."""

  def one(s):
    kind, shape = s.kind, s.shape
    if kind == "none":
      return None
    if kind == "int32":
      return (
        jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
        if what == "params"
        else jnp.ones(shape, jnp.int32)  # an integer "gradient" that must not move its parameter
      )
    x = rng.uniform(-1.0, 1.0, shape) if what == "params" else what * rng.normal(size=shape)
    return jnp.asarray(x, kind)

  return jax.tree.map(one, spec)


def _is_float(x):
  return x is not None and jnp.issubdtype(x.dtype, jnp.floating)


MANTISSA = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}


def _ulp(x, dtype):
  """The spacing of `dtype`'s numbers at |x| (float64 arithmetic; subnormals ignored)."""
  exponent = np.frexp(np.abs(np.asarray(x, np.float64)))[1]
  return np.ldexp(1.0, exponent - 1 - MANTISSA[dtype.name])


# --- hyperparameters, optimizers and their references --------------------------------------------

LR = st.floats(1e-6, 0.1)
EPS = st.floats(1e-10, 1e-2)
WD = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))
BETA = st.floats(0.0, 0.999)


def _hp(**fields):
  return st.fixed_dictionaries(fields)


# name: (hyperparameters, jadam, reference, whether weight_decay is coupled L2, most steps)
ALIASES = {
  "adam": (
    _hp(
      lr=LR,
      b1=BETA,
      b2=st.floats(0.0, 0.9999),
      eps=EPS,
      eps_root=st.one_of(st.just(0.0), st.floats(1e-12, 1e-3)),
      wd=WD,
      amsgrad=st.booleans(),
      maximize=st.booleans(),
    ),
    lambda h: jadam.adam(
      h["lr"],
      h["b1"],
      h["b2"],
      h["eps"],
      eps_root=h["eps_root"],
      weight_decay=h["wd"],
      amsgrad=h["amsgrad"],
      maximize=h["maximize"],
    ),
    lambda g, p, h: reference.adam(
      g,
      p,
      lr=h["lr"],
      b1=h["b1"],
      b2=h["b2"],
      eps=h["eps"],
      eps_root=h["eps_root"],
      amsgrad="torch" if h["amsgrad"] else None,
    ),
    True,
    5,
  ),
  "adamw": (
    _hp(lr=LR, b1=BETA, b2=st.floats(0.0, 0.9999), eps=EPS, wd=WD, amsgrad=st.booleans(), maximize=st.booleans()),
    lambda h: jadam.adamw(
      h["lr"], h["b1"], h["b2"], h["eps"], weight_decay=h["wd"], amsgrad=h["amsgrad"], maximize=h["maximize"]
    ),
    lambda g, p, h: reference.adam(
      g,
      p,
      lr=h["lr"],
      b1=h["b1"],
      b2=h["b2"],
      eps=h["eps"],
      decoupled_weight_decay=h["wd"],
      amsgrad="torch" if h["amsgrad"] else None,
    ),
    False,
    5,
  ),
  "sgd": (
    st.one_of(
      _hp(
        lr=LR,
        momentum=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        dampening=st.floats(0.0, 1.0),
        wd=WD,
        nesterov=st.just(False),
        maximize=st.booleans(),
      ),
      _hp(
        lr=LR,
        momentum=st.floats(0.01, 1.0),
        dampening=st.just(0.0),
        wd=WD,
        nesterov=st.just(True),
        maximize=st.booleans(),
      ),
    ),
    lambda h: jadam.sgd(
      h["lr"], h["momentum"], h["dampening"], weight_decay=h["wd"], nesterov=h["nesterov"], maximize=h["maximize"]
    ),
    lambda g, p, h: reference.sgd(
      g, p, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"], nesterov=h["nesterov"]
    ),
    True,
    5,
  ),
  "rmsprop": (
    # Centred: v - gbar^2 = alpha (1 - alpha) g^2 at the first step cancels catastrophically for alpha near 0
    # (in PyTorch too), so a centred alpha is 0 or >= 0.1.
    st.one_of(
      _hp(
        lr=LR,
        alpha=BETA,
        eps=EPS,
        wd=WD,
        momentum=st.one_of(st.just(0.0), st.floats(0.01, 0.99)),
        centered=st.just(False),
        maximize=st.booleans(),
      ),
      _hp(
        lr=LR,
        alpha=st.one_of(st.just(0.0), st.floats(0.1, 0.999)),
        eps=EPS,
        wd=WD,
        momentum=st.one_of(st.just(0.0), st.floats(0.01, 0.99)),
        centered=st.just(True),
        maximize=st.booleans(),
      ),
    ),
    lambda h: jadam.rmsprop(
      h["lr"],
      h["alpha"],
      h["eps"],
      weight_decay=h["wd"],
      momentum=h["momentum"],
      centered=h["centered"],
      maximize=h["maximize"],
    ),
    lambda g, p, h: reference.rmsprop(
      g, p, lr=h["lr"], alpha=h["alpha"], eps=h["eps"], momentum=h["momentum"], centered=h["centered"]
    ),
    True,
    5,
  ),
  "adagrad": (
    _hp(
      lr=LR,
      lr_decay=st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
      wd=WD,
      initial_accumulator_value=st.floats(0.0, 1.0),
      eps=EPS,
      maximize=st.booleans(),
    ),
    lambda h: jadam.adagrad(
      h["lr"], h["lr_decay"], h["wd"], h["initial_accumulator_value"], h["eps"], maximize=h["maximize"]
    ),
    lambda g, p, h: reference.adagrad(
      g, p, lr=h["lr"], lr_decay=h["lr_decay"], initial_accumulator_value=h["initial_accumulator_value"], eps=h["eps"]
    ),
    True,
    5,
  ),
  "adamax": (
    _hp(lr=LR, b1=BETA, b2=BETA, eps=EPS, wd=WD, maximize=st.booleans()),
    lambda h: jadam.adamax(h["lr"], h["b1"], h["b2"], h["eps"], weight_decay=h["wd"], maximize=h["maximize"]),
    lambda g, p, h: _reference_extra.adamax(g, p, lr=h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"]),
    True,
    5,
  ),
  "nadam": (
    _hp(
      lr=LR,
      b1=BETA,
      b2=st.floats(0.0, 0.9999),
      eps=EPS,
      wd=WD,
      momentum_decay=st.floats(0.0, 0.01),
      decoupled=st.booleans(),
      maximize=st.booleans(),
    ),
    lambda h: jadam.nadam(
      h["lr"],
      h["b1"],
      h["b2"],
      h["eps"],
      weight_decay=h["wd"],
      momentum_decay=h["momentum_decay"],
      decoupled_weight_decay=h["decoupled"],
      maximize=h["maximize"],
    ),
    lambda g, p, h: _reference_extra.nadam(
      g,
      p,
      lr=h["lr"],
      b1=h["b1"],
      b2=h["b2"],
      eps=h["eps"],
      weight_decay=h["wd"] if h["decoupled"] else 0.0,
      momentum_decay=h["momentum_decay"],
      decoupled=h["decoupled"],
    ),
    "unless decoupled",
    5,
  ),
  "radam": (
    _hp(lr=LR, b1=BETA, b2=st.floats(0.0, 0.9999), eps=EPS, wd=WD, decoupled=st.booleans(), maximize=st.booleans()),
    lambda h: jadam.radam(
      h["lr"],
      h["b1"],
      h["b2"],
      h["eps"],
      weight_decay=h["wd"],
      decoupled_weight_decay=h["decoupled"],
      maximize=h["maximize"],
    ),
    lambda g, p, h: _reference_extra.radam(
      g,
      p,
      lr=h["lr"],
      b1=h["b1"],
      b2=h["b2"],
      eps=h["eps"],
      weight_decay=h["wd"] if h["decoupled"] else 0.0,
      decoupled=h["decoupled"],
    ),
    "unless decoupled",
    8,  # rectified from step 6 on
  ),
}
LEAST_STEPS = {"radam": 4}  # most radam examples reach the rectified steps


def _radam_threshold_is_clear(b2, steps, x64):
  """RAdam switches at rho_t = 5, a discontinuity: skip examples whose rho_t is within rounding of it."""
  if b2 == 0:
    return True
  rho_inf = 2 / (1 - b2) - 1
  eps = np.finfo(np.float64 if x64 else np.float32).eps
  return all(abs(rho_inf - 2 * t * b2**t / (1 - b2**t) - 5) > 8 * eps * rho_inf + 1e-9 for t in range(1, steps + 1))


# --- the check -----------------------------------------------------------------------------------


def _assert_unmoved(p0, updates, later):
  """A leaf jadam does not optimize (an int): zero updates of its dtype, and it stays where it was."""
  for u, p in zip(updates, later, strict=True):
    assert u.dtype == p0.dtype
    np.testing.assert_array_equal(np.asarray(u), np.zeros_like(np.asarray(p0)))
    np.testing.assert_array_equal(np.asarray(p), np.asarray(p0))


def _check(data, names):
  x64 = data.draw(st.booleans(), "x64")
  floats = ["float32", "bfloat16", "float16"] + (["float64"] if x64 else [])
  # The root is a dict, as a parameter tree is: a bare None would be no parameters at all.
  spec = data.draw(
    st.dictionaries(st.sampled_from("xyz"), _tree(floats + ["int32", "none"], depth=2), min_size=1, max_size=3), "tree"
  )
  name = data.draw(_uniform(names), "optimizer")
  hp_strategy, make, ref, coupled, most = ALIASES[name]
  h = data.draw(hp_strategy, "hyperparameters")
  steps = data.draw(_uniform(range(LEAST_STEPS.get(name, 1), most + 1)), "steps")
  scale = data.draw(_uniform([1.0, 1e-3, 1e2, 0.1, 10.0, 0.0]), "gradient scale")
  seed = data.draw(st.integers(0, 2**32 - 1), "seed")
  if name == "radam":
    assume(_radam_threshold_is_clear(h["b2"], steps, x64))
  coupled = coupled is True or (coupled == "unless decoupled" and not h["decoupled"])
  rng = np.random.default_rng(seed)

  with jax.enable_x64(x64):
    params = _build(spec, rng, "params")
    grads = [_build(spec, rng, scale) for _ in range(steps)]
    tx = make(h)
    state0 = state = tx.init(params)
    path, updates = [params], []
    for g in grads:
      u, state = tx.update(g, state, path[-1])
      chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)  # no retrace under jit, no drift
      updates.append(u)
      path.append(optax.apply_updates(path[-1], u))

    def is_none(x):
      return x is None

    def leaves(tree):
      return jax.tree_util.tree_leaves(tree, is_leaf=is_none)

    assert jax.tree.structure(updates[-1], is_leaf=is_none) == jax.tree.structure(params, is_leaf=is_none)
    for i, p0 in enumerate(leaves(params)):
      got = [leaves(u)[i] for u in updates]
      if p0 is None:
        assert all(u is None for u in got)
        continue
      if not _is_float(p0):  # int leaves do not move: a zero update of their dtype
        _assert_unmoved(p0, got, [leaves(p)[i] for p in path[1:]])
        continue
      assert all(u.dtype == p0.dtype for u in got), (name, p0.dtype, [u.dtype for u in got])
      dtype = np.dtype(p0.dtype)
      if name == "rmsprop" and h["centered"] and h["alpha"] == 0 and h["eps"] < float(jnp.finfo(dtype).tiny):
        # v - gbar^2 is exactly 0, so the step is lr g / eps: with eps below the dtype's normal range (float16)
        # it is g / 0 = inf in that dtype, as in PyTorch, where the float64 reference stays finite.
        continue
      sign = -1.0 if h.get("maximize") else 1.0
      g64 = np.stack([sign * np.asarray(leaves(g)[i], np.float64) for g in grads])
      if coupled and h["wd"]:
        # jadam's add_l2: g + lambda theta_{t-1} on its own trajectory, rounded to the leaf's dtype.
        thetas = np.stack([np.asarray(leaves(p)[i], np.float64) for p in path[:-1]])
        g64 = np.asarray(jnp.asarray(g64 + h["wd"] * thetas, dtype), np.float64)
      p64 = np.asarray(p0, np.float64)
      thetas_ref = ref(g64, p64, h)
      want = np.diff(np.concatenate([p64[None], thetas_ref]), axis=0)
      have = np.stack([np.asarray(u, np.float64) for u in got])
      scale_of_leaf = np.max(np.abs(want), initial=0.0)
      # ... plus the spacing of the smallest numbers (float16's subnormals are 6e-8 apart: an lr of 1e-6 lives
      # there) and of the reference's parameters, whose differences are its updates.
      tol = RTOL[dtype.name] * steps * (np.abs(want) + scale_of_leaf)
      tol = tol + steps * (float(jnp.finfo(dtype).smallest_subnormal) + 4 * _ulp(thetas_ref, np.dtype(np.float64)))
      if name == "rmsprop" and h["centered"]:
        # v - gbar^2 cancels: its rounding error is the dtype's, relative to v, so relative to the variance it is
        # v / (v - gbar^2) times larger (alpha (1 - alpha) at the first step; worse where L2 makes g nearly constant).
        v, gbar, conds = np.zeros_like(p64), np.zeros_like(p64), []
        for g in g64:
          v = h["alpha"] * v + (1 - h["alpha"]) * g * g
          gbar = h["alpha"] * gbar + (1 - h["alpha"]) * g
          var = v - gbar * gbar
          conds.append(np.where(var > 0, v / np.where(var > 0, var, 1.0), 1.0))
        tol = tol * np.maximum.accumulate(np.maximum(np.stack(conds), 1.0), axis=0)
      if "b1" in h:
        # The first moment is kept in the leaf's dtype (float16 here, as torch does): where it is small enough to be
        # subnormal, each step rounds it to the subnormals' spacing, an error relative to m_t that the bias
        # correction and the normalisation carry into the update (b1 near 1, small gradients).
        m, ms = np.zeros_like(p64), []
        for g in g64:
          m = h["b1"] * m + (1 - h["b1"]) * g
          ms.append(np.abs(m))
        ms = np.stack(ms)
        rel = float(jnp.finfo(dtype).smallest_subnormal) / np.where(ms > 0, ms, np.inf)
        tol = tol + steps * rel * (np.abs(want) + scale_of_leaf)
      if not coupled and name in ("nadam", "radam"):
        # PyTorch's decoupled decay, theta (1 - lr lambda) + step rounded in the leaf's dtype
        # (jadam.decoupled_decay): the update is a difference of two parameters, on their grid. The stage
        # is there for a zero decay too (the flag decides the chain, not the number).
        tol = tol + steps * _ulp(np.stack([np.asarray(leaves(p)[i], np.float64) for p in path[1:]]), dtype)
      bad = np.abs(have - want) > tol
      # An update beyond the dtype's range is an infinity of the same sign in that dtype (float16's 65504 is
      # reached by lr g / eps when a centred variance is exactly 0).
      bad &= ~((np.abs(want) > float(jnp.finfo(dtype).max)) & np.isinf(have) & (np.sign(have) == np.sign(want)))
      assert not np.any(bad), (
        f"{name} {dtype} leaf {i} shape {p0.shape}: max |error| {np.max(np.abs(have - want)):.3g},"
        f" update scale {scale_of_leaf:.3g}\n{have[bad][:4]} vs {want[bad][:4]}"
      )


@SETTINGS
@given(data=st.data())
def test_adam_on_random_trees_matches_the_reference(data):
  _check(data, ["adam"])


# Hypothesis draws about half its examples near the "simplest" choice (the first optimizer listed), so the
# other optimizers are split in two properties to give each a fair share of examples.
@SETTINGS
@given(data=st.data())
def test_adamw_sgd_rmsprop_adagrad_on_random_trees_match_their_references(data):
  _check(data, ["adamw", "sgd", "rmsprop", "adagrad"])


@SETTINGS
@given(data=st.data())
def test_radam_nadam_adamax_on_random_trees_match_their_references(data):
  _check(data, ["radam", "nadam", "adamax"])
