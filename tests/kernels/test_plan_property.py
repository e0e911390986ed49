"""The kernel can only refuse, never compute another formula (property test of jadam._kernels.plan).

Hypothesis draws transformations the planner may or may not serve:

- chains of jadam's stages with random non-default arguments: coupled or
  decoupled (masked) L2, flip_sign, `eps_root`, `bias_correct(into_step=...)`,
  `max_nu` before or after `bias_correct` (PyTorch's or optax's AMSGrad),
  `decoupled_decay` in either convention, scheduled rates;
- wrapped in optax's combinators: `clip_by_global_norm` in front,
  `inject_hyperparams`, `apply_if_finite`, `partition`, `masked`,
  `named_chain`;
- and `jadam.torch`'s doors with random flags and parameter groups.

Each runs two steps through `jadam.update_and_apply` with the kernel allowed
(``fused=None``) and with the stages only (``fused=False``); the parameters
and every state leaf agree within float32 rounding (below). Where the planner
serves the step (``fused=True`` succeeds), a deliberately unknown argument
(one of the served stages' records given an argument the planner has never
heard of, as a stage that gained an argument would have) makes ``fused=True``
raise, naming it, and ``fused=None`` still equal the stages.

Tolerance, from the operations' rounding: each step's update is formed by the
kernel and by the stages from the same float32 inputs in at most ~12
correctly rounded operations whose order may differ (XLA contracts some
``a * b + c`` into fused multiply-adds), so they differ by at most
12 ulp(|update|) relative, i.e. 12 * 2**-23 of the leaf's largest update; the
parameters add one rounding to their float32 grid on each side (ulp(p)); and
the difference carries into the next step's moments, so it grows linearly
with the step count. State leaves (moments, maxima) follow the same bound
relative to their own largest value. Integer leaves (counts) must be equal.

Where the planner serves a chain, the jitted step is also transformed and
exported: `vmap` of it, `jax.export` of it and `jax.grad` through it run the
stages (`jadam._kernels.dispatch`), and equal the stages' step.

Size: 60 chain examples and 20 door examples (`derandomize=True`: the same
cases on every run), 2 steps each, about a minute on one core; 10 chain
examples jitted, vmapped, exported and differentiated.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jadam
from jadam._core import registry
from jadam._kernels import plan as _plan

STEPS = 2
ULPS = 12.0
EPS32 = 2.0**-23

SETTINGS = dict(
  derandomize=True,
  deadline=None,
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

P0 = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.linspace(0.5, -0.3, 5)}


def _grads(seed):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"w": jax.random.normal(keys[0], (3, 4)), "b": 0.1 * jax.random.normal(keys[1], (5,))}


# --- what is drawn ---------------------------------------------------------------------------------
def _pick(options):
  """One of `options`, drawn evenly (hypothesis's `sampled_from` does not draw its options evenly here)."""
  return st.integers(0, 2**32 - 1).map(lambda i: options[i % len(options)])


def _rate(draw, low, high, schedule_ok=True):
  value = draw(st.floats(low, high))
  if schedule_ok and draw(st.booleans()):
    return optax.exponential_decay(value, transition_steps=1, decay_rate=0.9)
  return value


@st.composite
def chains(draw):
  """A chain of jadam stages (as a factory of the learning rate, for inject_hyperparams) and its wrappers."""
  cfg = dict(
    clip=draw(_pick([None, 0.05, 10.0])),
    flip=draw(st.booleans()),
    coupled=draw(_pick([None, None, None, None, 0.0, 0.01])),
    b1=draw(st.floats(0.5, 0.95)),
    b2=draw(st.floats(0.9, 0.999)),
    b_schedule=draw(st.booleans()) and draw(st.booleans()),
    max_nu=draw(_pick([None, None, "torch", "torch", "optax"])),
    into_step=draw(_pick([False] * 7 + [True])),
    eps=draw(_pick([1e-8, 1e-3])),
    eps_root=draw(_pick([0.0, 0.0, 1e-6])),
    decoupled=draw(_pick([None, None, 0.0, 0.05])),
    mask=draw(_pick([None, "dict", "callable"])),
    decay=draw(_pick([None, None, None, "torch", "torch", "keras"])),
    decay_wd=draw(st.floats(0.0, 0.1)),
    lr=_rate(draw, 1e-3, 0.1),
  )
  kinds = ["if_finite", "if_finite", "partition", "partition", "named", "named", "masked"]  # masked: refused
  wrappers = list(dict.fromkeys(draw(st.lists(_pick(kinds), max_size=2))))
  inject = draw(st.booleans())
  return cfg, wrappers, inject


def _mask(kind):
  if kind == "dict":
    return {"w": True, "b": False}
  if kind == "callable":
    return lambda tree: jax.tree.map(lambda x: jnp.ndim(x) > 1, tree)
  return None


def _chain(cfg, learning_rate):
  b1, b2 = cfg["b1"], cfg["b2"]
  if cfg["b_schedule"]:
    b1 = optax.linear_schedule(b1, b1 * 0.9, 3)
  stages = [optax.clip_by_global_norm(cfg["clip"])] if cfg["clip"] is not None else []
  stages += [jadam.flip_sign()] if cfg["flip"] else []
  stages += [jadam.add_l2(cfg["coupled"])] if cfg["coupled"] is not None else []
  # (both a coupled and a decoupled L2 is refused; drawn rarely so that most chains reach the kernel)
  stages += [jadam.scale_by_moments(b1, b2)]
  stages += [jadam.max_nu()] if cfg["max_nu"] == "torch" else []
  stages += [jadam.bias_correct(into_step=cfg["into_step"])]
  stages += [jadam.max_nu()] if cfg["max_nu"] == "optax" else []
  stages += [jadam.normalize(cfg["eps"], eps_root=cfg["eps_root"])]
  if cfg["decoupled"] is not None:
    stages += [jadam.add_l2(cfg["decoupled"], mask=_mask(cfg["mask"]))]
  stages += [jadam.scale_by_lr(learning_rate)]
  if cfg["decay"] is not None:
    stages += [jadam.decoupled_decay(cfg["decay_wd"], 0.01, convention=cfg["decay"])]
  return optax.chain(*stages)


def _wrap(tx, wrappers):
  for w in wrappers:
    if w == "if_finite":
      tx = optax.apply_if_finite(tx, 2)
    elif w == "partition":
      tx = optax.partition({"a": tx, "z": jadam.adam(0.01)}, {"w": "a", "b": "z"})
    elif w == "masked":
      tx = optax.masked(tx, {"w": True, "b": False})
    else:
      tx = optax.named_chain(("inner", tx))
  return tx


def _build(cfg, wrappers, inject):
  if inject:
    lr = cfg["lr"] if not callable(cfg["lr"]) else 0.01
    tx = optax.inject_hyperparams(functools.partial(_chain, cfg))(learning_rate=lr)
  else:
    tx = _chain(cfg, cfg["lr"])
  return _wrap(tx, wrappers)


@st.composite
def doors(draw):
  name = draw(_pick(["Adam", "AdamW"]))
  kw = dict(
    lr=draw(st.floats(1e-3, 0.1)),
    betas=(draw(st.floats(0.5, 0.95)), draw(st.floats(0.9, 0.999))),
    eps=draw(_pick([1e-8, 1e-3])),
    weight_decay=draw(_pick([0.0, 0.01, 0.1])),
    amsgrad=draw(st.booleans()),
    maximize=draw(st.booleans()),
  )
  groups = draw(_pick([None, "one", "two"]))
  wrappers = draw(st.lists(_pick(["if_finite", "named"]), max_size=1))
  return name, kw, groups, wrappers


def _door(name, kw, groups):
  if groups is None:
    return getattr(jadam.torch, name)(**kw)
  params = [{"params": "w", "lr": kw["lr"] * 0.5}]
  if groups == "two":
    params.append({"params": "b", "weight_decay": 0.0, "betas": (0.8, 0.99)})
  return getattr(jadam.torch, name)(params, **kw)


# --- the comparison --------------------------------------------------------------------------------
def _run(tx, fused):
  params, state = P0, tx.init(P0)
  path = [(params, state)]
  for t in range(STEPS):
    params, state = jadam.update_and_apply(tx, _grads(t), state, params, fused=fused)
    path.append((params, state))
  return path


def _close(a, b, scale, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.issubdtype(np.asarray(a).dtype, np.floating):
    np.testing.assert_array_equal(a, b, err_msg=what)
    return
  tol = scale + 0 * a
  assert np.all(np.abs(a - b) <= tol), f"{what}: max |error| {np.max(np.abs(a - b)):.3g}, tolerance {np.max(tol):.3g}"


def _assert_step(t, kernel, stages, p_prev, what=""):
  """Step `t`'s ``(params, state)`` through the kernel within the bound above of the stages' (from `p_prev`)."""
  (pk, sk), (ps, ss) = kernel, stages
  assert jax.tree.structure(sk) == jax.tree.structure(ss), "the kernel's state is another tree"
  for key in pk:
    update = np.abs(np.asarray(ps[key], np.float64) - np.asarray(p_prev[key], np.float64))
    ulp_p = np.spacing(np.abs(np.asarray(ps[key], np.float32))).astype(np.float64)
    scale = t * (ULPS * EPS32 * np.max(update, initial=0.0) + 2 * ulp_p)
    _close(pk[key], ps[key], scale, f"{what}step {t}, params[{key!r}]")
  for i, (a, b) in enumerate(zip(jax.tree.leaves(sk), jax.tree.leaves(ss), strict=True)):
    big = np.max(np.abs(np.asarray(b, np.float64)), initial=0.0) if jnp.issubdtype(b.dtype, jnp.floating) else 0
    _close(a, b, t * ULPS * EPS32 * big + np.finfo(np.float32).tiny, f"{what}step {t}, state leaf {i}")


def _assert_same(kernel, stages):
  for t in range(1, STEPS + 1):
    _assert_step(t, kernel[t], stages[t], stages[t - 1][0])


def _served(tx):
  """Whether the planner serves the first step, and the names of the stage records it read."""
  read = []
  lookup = registry.lookup

  def spy(key):
    r = lookup(key)
    if r is not None:
      read.append(r.name)
    return r

  _plan._registry.lookup = spy
  try:
    jadam.update_and_apply(tx, _grads(0), tx.init(P0), P0, fused=True)
    return True, [n for n in read if n in _plan.DENSE_ARGS or n in _plan.SPARSE_ARGS]
  except ValueError as e:
    assert "fused=True, but" in str(e), e
    REASONS.append(str(e).split(": ", 1)[1][:90])
    return False, []
  finally:
    _plan._registry.lookup = lookup


def _with_unknown_argument(name):
  """`registry.lookup` as if stage `name` had gained an argument the planner does not know."""
  lookup = registry.lookup

  def patched(key):
    r = lookup(key)
    if r is None or r.name != name:
      return r
    return registry.Record(r.name, {**r.hparams, "novel_argument": 0.5}, r.defaults, r.state)

  return patched


def _check(tx, data):
  kernel, stages = _run(tx, None), _run(tx, False)
  _assert_same(kernel, stages)
  served, names = _served(tx)
  if not served:
    return False
  name = data.draw(st.sampled_from(sorted(set(names))), label="stage given an unknown argument")
  lookup = registry.lookup
  _plan._registry.lookup = _with_unknown_argument(name)
  try:
    with pytest.raises(ValueError, match=rf"jadam.{name}\(novel_argument=0.5\): the kernel does not implement"):
      jadam.update_and_apply(tx, _grads(0), tx.init(P0), P0, fused=True)
    _assert_same(_run(tx, None), stages)  # refused: the stages ran
  finally:
    _plan._registry.lookup = lookup
  return True


SERVED: dict[str, list[bool]] = {"chains": [], "doors": [], "transformed": []}
REASONS = []  # why the planner refused, for the report below


@settings(max_examples=60, **SETTINGS)
@given(case=chains(), data=st.data())
def test_chains_through_the_kernel_equal_the_stages(case, data):
  cfg, wrappers, inject = case
  SERVED["chains"].append(_check(_build(cfg, wrappers, inject), data))


@settings(max_examples=20, **SETTINGS)
@given(case=doors(), data=st.data())
def test_torch_doors_through_the_kernel_equal_the_stages(case, data):
  name, kw, groups, wrappers = case
  SERVED["doors"].append(_check(_wrap(_door(name, kw, groups), wrappers), data))


@settings(max_examples=10, **SETTINGS)
@given(case=chains())
def test_a_served_jitted_step_transformed_or_exported_equals_the_stages(case):
  """Where the planner serves a chain, the jitted step binds one primitive whose lowering on this CPU is the
  kernel, and whose batching rule (`vmap` of the jitted step), export lowering (`jax.export`, no custom call) and
  derivative (`jax.grad` through the jitted step) run the stages: each equals the stages' step (vmap and export
  within the bound above; the derivative is the stages' own, so it agrees to float32 rounding of the gradient)."""
  tx = _build(*case)
  served, _ = _served(tx)
  SERVED["transformed"].append(served)
  if not served:
    return
  state = tx.init(P0)
  kernel = jax.jit(functools.partial(jadam.update_and_apply, tx, fused=True))
  stages = jax.jit(functools.partial(jadam.update_and_apply, tx, fused=False))
  grads = [_grads(0), _grads(1)]
  assert "jadam_planned_step" in str(jax.make_jaxpr(kernel)(grads[0], state, P0))
  assert "custom_call @jadam" in kernel.lower(grads[0], state, P0).as_text()
  want = [stages(g, state, P0) for g in grads]

  batched = jax.vmap(kernel, in_axes=(0, None, None))(jax.tree.map(lambda *x: jnp.stack(x), *grads), state, P0)
  for j, w in enumerate(want):
    _assert_step(1, jax.tree.map(lambda x, j=j: x[j], batched), w, P0, f"vmap, gradient {j}: ")

  exported = jax.export.export(kernel, platforms=("cpu",))(grads[0], state, P0)
  assert "custom_call @jadam" not in exported.mlir_module()
  _assert_step(1, exported.call(grads[0], state, P0), want[0], P0, "jax.export: ")

  def loss(step, g):
    new_params, _ = step(g, state, P0)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new_params))

  got, expected = (
    jax.grad(functools.partial(loss, kernel))(grads[0]),
    jax.grad(functools.partial(loss, stages))(grads[0]),
  )
  for key in expected:
    a, b = np.asarray(got[key], np.float64), np.asarray(expected[key], np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"grad, [{key!r}]: NaN in one only")
    big = np.max(np.abs(np.nan_to_num(b)), initial=0.0)
    _close(np.nan_to_num(a), np.nan_to_num(b), ULPS * EPS32 * big + np.finfo(np.float32).tiny, f"grad, [{key!r}]")


def test_the_property_tests_reached_both_outcomes():
  """The chains drew both served and refused cases (else they say little); every door drawn is served; some
  of the jitted, vmapped, exported and differentiated chains were served."""
  chains, doors, transformed = SERVED["chains"], SERVED["doors"], SERVED["transformed"]
  print(f"chains: {sum(chains)} of {len(chains)} served; doors: {sum(doors)} of {len(doors)} served")
  print(f"transformed: {sum(transformed)} of {len(transformed)} served")
  for reason in sorted(set(REASONS)):
    print(f"  refused {REASONS.count(reason)}x: {reason}")
  if chains:  # run in the same session, after the properties
    assert any(chains) and not all(chains), (sum(chains), len(chains))
  if doors:
    assert all(doors), (sum(doors), len(doors))
  if transformed:
    assert any(transformed), len(transformed)


def test_a_known_refusal_names_its_argument():
  tx = _chain(
    dict(
      clip=None,
      flip=False,
      coupled=None,
      b1=0.9,
      b2=0.999,
      b_schedule=False,
      max_nu=None,
      into_step=False,
      eps=1e-8,
      eps_root=0.0,
      decoupled=None,
      mask=None,
      decay="keras",
      decay_wd=0.01,
      lr=0.01,
    ),
    0.01,
  )
  with pytest.raises(ValueError, match=r"jadam.decoupled_decay\(convention='keras'\): the kernel does not implement"):
    jadam.update_and_apply(tx, _grads(0), tx.init(P0), P0, fused=True)
