"""Hyperparameters: floats, jax scalars, schedules, optax.inject_hyperparams, and the errors for bad ones."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import parity as _parity
from tests.helpers import reference
from tests.helpers import rounding as _rounding

# Schedules as plain math of a float step, so NumPy (the reference) and jax read the same numbers.
SCHEDULES = {
  "learning_rate": lambda t: 1e-2 * 0.995**t,
  "b1": lambda t: 0.8 + 0.15 * (1 - 0.99**t),
  "b2": lambda t: 0.99 + 0.009 * (1 - 0.98**t),
  "eps": lambda t: 1e-3 * 0.97**t + 1e-8,
  "weight_decay": lambda t: 0.1 * 0.99**t,
}
REFERENCE_NAME = {"learning_rate": "lr", "b1": "b1", "b2": "b2", "eps": "eps", "weight_decay": "weight_decay"}


def _jax_schedule(fn):
  return lambda count: fn(jnp.asarray(count).astype(jnp.float64))


def _np_schedule(fn):
  return lambda t: fn(float(t))


@pytest.mark.parametrize("names", [[n] for n in SCHEDULES] + [list(SCHEDULES)], ids=list(SCHEDULES) + ["all"])
def test_schedules_match_reference_float64(names):
  prob = _parity.problem(300)
  with jax.enable_x64(True):
    tx = jadam.adam(**{n: _jax_schedule(SCHEDULES[n]) for n in names})
    got, grads = _parity.run_jax(tx, prob, np.float64, with_grads=True)
  want = reference.adam(grads, prob.params, **{REFERENCE_NAME[n]: _np_schedule(SCHEDULES[n]) for n in names})
  assert _parity.max_rel(got, want) <= 1e-12
  # ... and the schedule matters: the constant at step 0 gives another trajectory.
  constant = reference.adam(grads, prob.params, **{REFERENCE_NAME[n]: SCHEDULES[n](0.0) for n in names})
  assert _parity.max_rel(got, constant) > 1e-9


def test_adamw_scheduled_decoupled_weight_decay_matches_reference():
  prob = _parity.problem(300)
  with jax.enable_x64(True):
    tx = jadam.adamw(_jax_schedule(SCHEDULES["learning_rate"]), weight_decay=_jax_schedule(SCHEDULES["weight_decay"]))
    got, grads = _parity.run_jax(tx, prob, np.float64, with_grads=True)
  want = reference.adam(
    grads,
    prob.params,
    lr=_np_schedule(SCHEDULES["learning_rate"]),
    decoupled_weight_decay=_np_schedule(SCHEDULES["weight_decay"]),
  )
  assert _parity.max_rel(got, want) <= 1e-12


def _first_at_zero(first, later):
  return lambda count: jnp.where(count == 0, first, later).astype(jnp.float32)


@pytest.mark.parametrize("name", ["learning_rate", "b1", "b2", "eps", "weight_decay"])
def test_schedule_is_read_at_step_zero_on_first_update(name):
  """A schedule that is 0 (1e3 for eps) at count 0 and otherwise the default shows which count was read.

  The formulas beside are float32 programs of the same first step (m = (1 - b1) g, sqrt(v) = |g|, with the exact
  0.1 for 1 - b1): within the rounding model's bound of jadam's step, with b1 = 0.9 possibly held in double.
  """
  first, later = {"eps": (1e3, 1e-8), "weight_decay": (1.0, 0.0)}.get(name, (0.0, 0.5))
  params = jnp.asarray([1.0, 2.0, 3.0], jnp.float32)
  g = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  tx = jadam.adam(**{"learning_rate": 1e-2, name: _first_at_zero(first, later)})
  updates, state = jax.jit(tx.update)(g, tx.init(params), params)
  mu, nu = state[-4].mu, state[-4].nu  # ScaleByMomentsState
  if name == "learning_rate":
    chex.assert_trees_all_equal(updates, jnp.zeros(3))
  elif name == "b1":  # 0 m + (1 - 0) g: exact in any order, with or without a fused multiply-add
    chex.assert_trees_all_equal(mu, g)
  elif name == "b2":  # 0 v + (1 - 0) g^2: the one rounding of g^2, whatever the order
    chex.assert_trees_all_equal(nu, g * g)
  else:
    hp = {"eps": 1e3} if name == "eps" else {"weight_decay": 1.0}  # wd = 1 at step 0: g + theta
    (model,) = _rounding.of_alias(jadam.adam, dict(learning_rate=1e-2, **hp), given_names=("b1",))([g], params)
    if name == "eps":
      _rounding.assert_within(updates, -1e-2 * g / (jnp.abs(g) + 1e3), model["update"], "eps")
    else:
      _rounding.assert_within(mu, 0.1 * (g + params), model["mu"], "weight_decay")


def test_optax_schedule_and_jax_scalars_are_accepted():
  params = jnp.linspace(1.0, 2.0, 4, dtype=jnp.float32)
  g = jnp.full(4, 0.5, jnp.float32)
  sched = optax.linear_schedule(1e-2, 0.0, 10)
  a = jadam.adam(sched, b1=jnp.float32(0.9), b2=jnp.asarray(0.999, jnp.float32), eps=jnp.float32(1e-8))
  b = jadam.adam(1e-2)
  ua, _ = jax.jit(a.update)(g, a.init(params), params)
  ub, _ = jax.jit(b.update)(g, b.init(params), params)
  # float32 arrays against Python floats (which the correction takes in double): the rounding model's bound
  (model,) = _rounding.of_alias(jadam.adam, dict(learning_rate=1e-2), given_names=True)([g], params)
  _rounding.assert_within(ua, ub, model["update"])


INJECTABLE = {
  "adam": (
    jadam.adam,
    dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.1, amsgrad=True),
  ),
  "adamw": (jadam.adamw, dict(learning_rate=1e-2, weight_decay=0.1)),
  "sgd": (jadam.sgd, dict(learning_rate=1e-2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01)),
  "rmsprop": (jadam.rmsprop, dict(learning_rate=1e-2, alpha=0.99, momentum=0.5, centered=True)),
  "adagrad": (jadam.adagrad, dict(learning_rate=1e-2, lr_decay=0.01, initial_accumulator_value=0.1)),
}


@pytest.mark.parametrize("x64", [False, True], ids=["f32", "x64"])
@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_inject_hyperparams(name, x64):
  factory, kwargs = INJECTABLE[name]
  with jax.enable_x64(x64):
    params = jnp.linspace(1.0, 2.0, 4, dtype=jnp.float32)
    grads = [jnp.asarray(np.random.default_rng(i).normal(size=4), jnp.float32) for i in range(10)]
    plain = factory(**kwargs)
    injected = optax.inject_hyperparams(factory)(**kwargs)
    p_plain, p_inj = params, params
    s_plain, s_inj = plain.init(params), injected.init(params)
    step_plain, step_inj = jax.jit(plain.update), jax.jit(injected.update)
    for g in grads:
      u, s_plain = step_plain(g, s_plain, p_plain)
      p_plain = optax.apply_updates(p_plain, u)
      v, s_inj = step_inj(g, s_inj, p_inj)
      p_inj = optax.apply_updates(p_inj, v)
    # injected float32 (float64 under x64) arrays against Python floats: the rounding model's bound
    model = _rounding.of_alias(factory, kwargs, given_names=True)(grads, params)
    _rounding.assert_within(p_inj, p_plain, model[-1]["params"], name)
    # Changing the injected learning rate mid-run changes the step by that factor: a power of two scales every
    # rounding that the learning rate enters exactly, so the same compiled step gives exactly a quarter.
    g = grads[0]
    u1, _ = step_inj(g, s_inj, p_inj)
    s_inj.hyperparams["learning_rate"] = jnp.asarray(s_inj.hyperparams["learning_rate"] * 0.25)
    u2, _ = step_inj(g, s_inj, p_inj)
    chex.assert_trees_all_equal(u2, 0.25 * u1)
    assert np.max(np.abs(np.asarray(u2 - u1))) > 0


def test_inject_hyperparams_bf16_params_need_float32_hyperparams():
  """bf16 params make optax cast injected hyperparameters to bf16 (0.999 -> 1.0): jadam refuses, by name."""
  params = jnp.linspace(1.0, 2.0, 4, dtype=jnp.bfloat16)
  with pytest.raises(TypeError, match="b1 arrived as bfloat16.*hyperparam_dtype"):
    optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3).init(params)
  tx = optax.inject_hyperparams(jadam.adam, hyperparam_dtype=jnp.float32)(learning_rate=1e-3)
  g = jnp.full(4, 0.5, jnp.bfloat16)
  state = tx.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(g, state, params)
  assert updates.dtype == jnp.bfloat16
  chex.assert_tree_all_finite(updates)


def test_inject_hyperparams_with_a_schedule():
  tx = optax.inject_hyperparams(jadam.adam)(learning_rate=optax.linear_schedule(1e-2, 0.0, 4))
  params = jnp.ones(3, jnp.float32)
  state = tx.init(params)
  lrs = []
  for _ in range(5):
    _, state = jax.jit(tx.update)(jnp.ones(3, jnp.float32), state, params)
    lrs.append(float(state.hyperparams["learning_rate"]))
  # optax's float32 (init - end) (1 - count / 4) + end against the exact values: the rounding model's bound
  for count, lr in enumerate(lrs):
    want = _rounding.given(1e-2) * (1 - _rounding.Gap(count) / 4)
    _rounding.assert_within(lr, want.value, want, f"count {count}")


# --- bad input -------------------------------------------------------------------------------

BAD = [
  (dict(learning_rate=-1e-3), ValueError, "learning_rate.*-0.001"),
  (dict(learning_rate=float("nan")), ValueError, "learning_rate.*nan"),
  (dict(learning_rate=jnp.float32(-1.0)), ValueError, "learning_rate.*-1.0"),
  (dict(b1=1.0), ValueError, "b1.*1.0"),
  (dict(b1=-0.1), ValueError, "b1.*-0.1"),
  (dict(b2=1.5), ValueError, "b2.*1.5"),
  (dict(b2=float("nan")), ValueError, "b2.*nan"),
  (dict(eps=-1e-8), ValueError, "eps.*-1e-08"),
  (dict(eps_root=-1.0), ValueError, "eps_root.*-1.0"),
  (dict(weight_decay=-0.1), ValueError, "weight_decay.*-0.1"),
  (dict(learning_rate="1e-3"), TypeError, "learning_rate.*str"),
  (dict(b1=[0.9]), TypeError, "b1.*list"),
  (dict(learning_rate=jnp.ones(3)), ValueError, "learning_rate.*shape"),
  (dict(b1=jnp.asarray(0.9, jnp.bfloat16)), TypeError, "b1.*bfloat16"),
  (dict(b2=jnp.asarray(0.999, jnp.bfloat16)), TypeError, "b2.*bfloat16"),
  (dict(eps=jnp.asarray(1e-8, jnp.float16)), TypeError, "eps.*float16"),
  (dict(amsgrad=1), TypeError, "amsgrad"),
  (dict(maximize="yes"), TypeError, "maximize"),
]


@pytest.mark.parametrize(
  "kwargs, error, match", BAD, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"[:40] for k, _, _ in BAD]
)
def test_adam_rejects_bad_hyperparameters_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    jadam.adam(**kwargs)


@pytest.mark.parametrize(
  "make, error, match",
  [
    (lambda: jadam.adamw(weight_decay=-1.0), ValueError, "weight_decay"),
    (lambda: jadam.adamw(learning_rate=-1.0), ValueError, "learning_rate"),
    (lambda: jadam.sgd(learning_rate=-1.0), ValueError, "learning_rate"),
    (lambda: jadam.sgd(momentum=1.5), ValueError, "momentum"),
    (lambda: jadam.sgd(momentum=0.9, dampening=0.5, nesterov=True), ValueError, "[Nn]esterov"),
    (lambda: jadam.sgd(nesterov=True), ValueError, "[Nn]esterov"),
    (lambda: jadam.rmsprop(alpha=1.0), ValueError, "b2|alpha"),
    (lambda: jadam.rmsprop(eps=-1.0), ValueError, "eps"),
    (lambda: jadam.rmsprop(centered="no"), TypeError, "centered"),
    (lambda: jadam.adagrad(lr_decay=-1.0), ValueError, "lr_decay"),
    (lambda: jadam.adagrad(initial_accumulator_value=-1.0), ValueError, "initial_accumulator_value"),
    (lambda: jadam.adagrad(eps=float("nan")), ValueError, "eps"),
    (lambda: jadam.scale_by_moments(mu_dtype=jnp.int32), TypeError, "mu_dtype"),
  ],
)
def test_other_aliases_reject_bad_hyperparameters(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_error_message_names_argument_and_value():
  with pytest.raises(ValueError) as info:
    jadam.adam(learning_rate=-0.5)
  assert "learning_rate" in str(info.value) and "-0.5" in str(info.value)
  with pytest.raises(TypeError) as info:
    jadam.adam(b2="0.999")
  assert "b2" in str(info.value) and "'0.999'" in str(info.value)


def test_schedule_and_traced_values_are_not_checked_at_construction():
  """Schedules are accepted as they are (checked by use); jit-traced scalars too (no Python branching)."""
  jadam.adam(learning_rate=lambda c: -1.0)

  @jax.jit
  def build_and_step(lr, b1):
    tx = jadam.adam(lr, b1=b1, weight_decay=lr)
    p = jnp.ones(2, jnp.float32)
    return tx.update(p, tx.init(p), p)[0]

  u = build_and_step(jnp.float32(1e-2), jnp.float32(0.9))
  assert math.isclose(float(u[0]), -1e-2, rel_tol=1e-5)


KINDS_CASES = {
  "adam": (jadam.adam, dict(learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-3, eps_root=1e-4, weight_decay=0.1)),
  "adamw": (jadam.adamw, dict(learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-3, weight_decay=0.1)),
  "sgd": (jadam.sgd, dict(learning_rate=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1)),
  "rmsprop": (jadam.rmsprop, dict(learning_rate=1e-2, alpha=0.9, eps=1e-3, weight_decay=0.1, momentum=0.5)),
  "adagrad": (jadam.adagrad, dict(learning_rate=1e-2, lr_decay=0.1, weight_decay=0.1, eps=1e-3)),
}
KINDS = {
  "float": lambda v: v,
  "jax_scalar": lambda v: jnp.asarray(v, jnp.float32),
  "numpy_scalar": lambda v: np.float32(v),
  "schedule": lambda v: lambda count: jnp.asarray(v, jnp.float32),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("alias", sorted(KINDS_CASES))
def test_every_hyperparameter_takes_a_float_a_jax_scalar_or_a_schedule(alias, kind):
  """Each numeric argument given as `kind` (one at a time) gives the same steps as all floats."""
  factory, kwargs = KINDS_CASES[alias]
  params = jnp.asarray([1.0, 1.5, 2.0], jnp.float32)
  grads = [jnp.asarray([0.5, -1.0, 2.0], jnp.float32), jnp.asarray([-0.3, 0.2, 1.0], jnp.float32)]

  def run(tx):
    state, p, out = tx.init(params), params, []
    for g in grads:
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
      out.append(u)
    return out

  want = run(factory(**kwargs))
  for name, value in kwargs.items():
    got = run(factory(**{**kwargs, name: KINDS[kind](value)}))
    # a float32 value against a Python float (the correction takes it in double): the rounding model's bound
    model = _rounding.of_alias(factory, kwargs, given_names=(name,))(grads, params)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
      _rounding.assert_within(a, b, model[t]["update"], f"{alias}({name}={kind}) step {t + 1}")


@pytest.mark.parametrize("kind", ["numpy_float32", "jax_float32"])
def test_float32_scalar_hyperparameters_with_float64_params(kind):
  """A float32 scalar hyperparameter meets float64 params under strict promotion: it must be cast, not promoted."""
  make = {"numpy_float32": np.float32, "jax_float32": jnp.float32}[kind]
  with jax.enable_x64(True):
    params = jnp.asarray([1.0, 1.5, 2.0], jnp.float64)
    for factory, kwargs in KINDS_CASES.values():
      tx = factory(**{k: make(v) for k, v in kwargs.items()})
      u, _ = tx.update(params - 1.2, tx.init(params), params)
      assert u.dtype == jnp.float64
      chex.assert_tree_all_finite(u)


def test_injected_zero_momentum_ignores_dampening_as_torch():
  """Under inject_hyperparams momentum=0 is an array, so the stage (not the alias) must drop the dampening."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    grads, p0 = rng.normal(size=(20, 3)), rng.uniform(1, 2, 3)
    tx = optax.inject_hyperparams(jadam.sgd)(learning_rate=1e-2, momentum=0.0, dampening=0.5)
    theta = jnp.asarray(p0)
    state, step = tx.init(theta), jax.jit(tx.update)
    for g, want in zip(grads, reference.sgd(grads, p0, lr=1e-2, momentum=0.0, dampening=0.5), strict=True):
      u, state = step(jnp.asarray(g), state, theta)
      theta = optax.apply_updates(theta, u)
      chex.assert_trees_all_close(theta, want, rtol=1e-12, atol=0)
