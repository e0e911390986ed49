"""The fused CPU Adam kernel (jadam/_kernels): the generic path's results, in one pass."""

import functools
import os
import re
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jadam
from jadam import _step
from jadam._kernels import build as _kernels
from jadam._kernels import fused as _fused
from tests.helpers import reference
from tests.helpers import rounding as _rounding

SIZES = [(0,), (1,), (7,), (1000,), (100003,), (3, 5, 2)]

CONFIGS = {
  "adam": lambda: jadam.adam(1e-3),
  "adam_l2": lambda: jadam.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2),
  "adam_eps_root": lambda: jadam.adam(1e-2, eps=1e-7, eps_root=1e-10),
  "adamw": lambda: jadam.adamw(1e-2),
  "adamw_array_wd": lambda: jadam.adamw(1e-2, weight_decay=jnp.float32(0.1)),
  "adam_schedules": lambda: jadam.adam(
    optax.linear_schedule(1e-2, 1e-3, 20),
    b1=optax.linear_schedule(0.8, 0.9, 10),
    b2=lambda count: 0.99 + jnp.float32(9e-4) * jnp.minimum(count, 10).astype(jnp.float32),
    eps=optax.constant_schedule(1e-7),
  ),
  "adamw_schedules": lambda: jadam.adamw(
    optax.linear_schedule(1e-2, 1e-4, 30),
    weight_decay=lambda count: jnp.float32(0.01) * jnp.minimum(count, 10).astype(jnp.float32),
  ),
  # found by structure (issue 10)
  "clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-2)),
  "clip_unclipped": lambda: optax.chain(optax.clip_by_global_norm(1e6), jadam.adamw(1e-2)),
  "front_stage": lambda: optax.chain(optax.scale(0.5), jadam.adam(1e-2, weight_decay=1e-2)),
  "inject_hyperparams": lambda: optax.inject_hyperparams(jadam.adam)(learning_rate=1e-2, b1=0.8),
  "inject_adamw_schedule": lambda: optax.inject_hyperparams(jadam.adamw)(
    learning_rate=optax.linear_schedule(1e-2, 1e-3, 20), weight_decay=0.1
  ),
  "torch_adamw_two_groups": lambda: jadam.torch.AdamW(
    [{"params": "w0|w1|w2", "lr": 1e-2}, {"params": "w3|w4|w5", "weight_decay": 0.1}], lr=1e-3
  ),
  "torch_adam_groups_amsgrad": lambda: jadam.torch.Adam(
    [{"params": "w0|w1", "amsgrad": True}, {"params": "w2|w3|w4|w5", "weight_decay": 1e-2, "maximize": True}],
    lr=1e-2,
  ),
  "amsgrad": lambda: jadam.adam(1e-2, amsgrad=True),
  "adamw_amsgrad": lambda: jadam.adamw(1e-2, amsgrad=True),
  "maximize": lambda: jadam.adam(1e-2, weight_decay=1e-2, maximize=True),
  "adamw_mask": lambda: jadam.adamw(1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
  "float32_moments": lambda: jadam.adam(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32),
  # bfloat16 moments: the same stochastic rounding bits as jadam._storage.bf16
  "bf16_moments": lambda: jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
  "clip_adamw_bf16_moments": lambda: optax.chain(
    optax.clip_by_global_norm(1.0), jadam.adamw(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  ),
}


def _kernel_in(text):
  """Whether a lowered or compiled module calls the C++ kernel."""
  return "@jadam_adam_f" in text or 'custom_call_target="jadam_adam_f' in text


def _auto(tx):
  """update_and_apply's automatic choice (fused=None) as the step helpers make it: one device assumed."""
  return functools.partial(_step._apply, tx, fused=None, multi_device_ok=True)


def _f32(x):
  return float(np.float32(x))


def _linear(init, end, steps):
  """optax.linear_schedule in the rounding model's arithmetic: (init - end) (1 - min(count, steps) / steps) + end."""
  init, end = _f32(init), _f32(end)
  return lambda count: (_rounding.lift(init) - end) * (1 - _rounding.lift(min(count, steps)) / steps) + end


def _hp(**kw):
  """The model's hyperparameters of one leaf, floats as the float32 values both programs use."""
  return {k: _f32(v) if isinstance(v, float) else v for k, v in kw.items()}


# Each configuration of CONFIGS as tests/helpers/rounding.adam's keywords for leaf `name`, and what comes before Adam.
MODELS = {
  "adam": lambda name: _hp(lr=1e-3),
  "adam_l2": lambda name: _hp(lr=1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2),
  "adam_eps_root": lambda name: _hp(lr=1e-2, eps=1e-7, eps_root=1e-10),
  "adamw": lambda name: _hp(lr=1e-2, decoupled_weight_decay=1e-2),
  "adamw_array_wd": lambda name: _hp(lr=1e-2, decoupled_weight_decay=0.1),
  "adam_schedules": lambda name: _hp(
    lr=_linear(1e-2, 1e-3, 20),
    b1=_linear(0.8, 0.9, 10),
    b2=lambda count: _rounding.lift(_f32(0.99)) + _rounding.lift(_f32(9e-4)) * min(count, 10),
    eps=1e-7,
  ),
  "adamw_schedules": lambda name: _hp(
    lr=_linear(1e-2, 1e-4, 30), decoupled_weight_decay=lambda count: _rounding.lift(_f32(0.01)) * min(count, 10)
  ),
  "clip_adam": lambda name: _hp(lr=1e-2, clip=1.0),
  "clip_unclipped": lambda name: _hp(lr=1e-2, decoupled_weight_decay=1e-2, clip=1e6),
  "front_stage": lambda name: _hp(lr=1e-2, weight_decay=1e-2, scale=0.5),
  "inject_hyperparams": lambda name: _hp(lr=1e-2, b1=0.8),
  "inject_adamw_schedule": lambda name: _hp(lr=_linear(1e-2, 1e-3, 20), decoupled_weight_decay=0.1),
  "torch_adamw_two_groups": lambda name: (
    _hp(lr=1e-2, decoupled_weight_decay=1e-2)
    if name in ("w0", "w1", "w2")
    else _hp(lr=1e-3, decoupled_weight_decay=0.1)
  ),
  "torch_adam_groups_amsgrad": lambda name: (
    _hp(lr=1e-2, amsgrad=True) if name in ("w0", "w1") else _hp(lr=1e-2, weight_decay=1e-2, maximize=True)
  ),
  "amsgrad": lambda name: _hp(lr=1e-2, amsgrad=True),
  "adamw_amsgrad": lambda name: _hp(lr=1e-2, decoupled_weight_decay=1e-2, amsgrad=True),
  "maximize": lambda name: _hp(lr=1e-2, weight_decay=1e-2, maximize=True),
  "adamw_mask": lambda name: _hp(lr=1e-2, decoupled_weight_decay=1e-2 if name == "w5" else 0.0),  # w5: 3 dims
  "float32_moments": lambda name: _hp(lr=1e-2),
  "traced_hyperparameters": lambda name: _hp(lr=1e-2, b2=0.99, weight_decay=1e-3),  # the test of that name
}


def _model_grads(grads, clip=None, scale=None):
  """The gradients Adam receives, as Gaps: clipped by their global norm (tests/helpers/rounding), or scaled."""
  if clip is not None:
    return _rounding.clipped_by_global_norm(grads, clip)
  return {k: _rounding.lift(np.asarray(g, np.float64)) * (1.0 if scale is None else scale) for k, g in grads.items()}


def _paths(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_within_model(got, want, steps, what):
  """`got` and `want`, two programs' (params, state), within the rounding model's bound: the parameters and the
  moments of each leaf within `steps[name]`'s (a step of tests/helpers/rounding.adam; `name` None for one array),
  counts and common hyperparameters equal."""
  for name, step in steps.items():
    a, b = (x[0] if name is None else x[0][name] for x in (got, want))
    _rounding.assert_within(a, b, step["params"], f"{what} {name}")
  bounds = {f".{k}{'' if name is None else f'[{name!r}]'}": step[k] for name, step in steps.items() for k in _MOMENTS}
  bounds[".hyperparams['learning_rate']"] = next(iter(steps.values()))["lr"]
  got_s, want_s = _paths(got[1]), _paths(want[1])
  assert got_s.keys() == want_s.keys()
  for path, a in got_s.items():
    bound = next((b for suffix, b in bounds.items() if path.endswith(suffix)), None)
    if bound is None or not np.issubdtype(a.dtype, np.floating):
      np.testing.assert_array_equal(a, want_s[path], err_msg=f"{what} {path}")
    else:
      _rounding.assert_within(a, want_s[path], bound, f"{what} {path}")


_MOMENTS = ("mu", "nu", "nu_max")


def _model_step(hp, grads, start, t, name=None):
  """Step `t` of tests/helpers/rounding.adam with the hyperparameters `hp` for leaf `name` of `start` = (params,
  state), from the moments there, and the learning rate it used."""
  params, state = start
  p = params if name is None else params[name]
  suffix = "" if name is None else f"[{name!r}]"
  moments = {k: v for path, v in _paths(state).items() for k in _MOMENTS if path.endswith(f".{k}{suffix}")}
  (step,) = _rounding.adam([grads], np.asarray(p), start=moments, t0=t - 1, **hp)
  step["lr"] = _rounding.lift(hp["lr"](t - 1) if callable(hp["lr"]) else hp["lr"])
  return step


def _assert_one_step_within_model(config, got, want, start, grads, t):
  """`got` and `want`, two programs' (params, state) after step `t` from `start` = (params, state) and `grads`:
  within the rounding model's bound (tests/helpers/rounding.py) for `config` of MODELS. Not vacuous: for nine
  parameters in ten the bound is below a tenth of their step, so that another learning rate, decay, eps or bias
  correction would show (not with clipping, whose norm of 10^5 terms each program may sum in any order: its worst
  case, gamma_n, is 2% of the gradient)."""
  steps, ratios = {}, []
  for name, p in start[0].items():
    hp = dict(MODELS[config](name))
    g = _model_grads(grads, hp.pop("clip", None), hp.pop("scale", None))[name]
    steps[name] = _model_step(hp, g, start, t, name)
    moved = np.abs(np.asarray(want[0][name], np.float64) - np.asarray(p, np.float64))
    ratios.append((steps[name]["params"].gap / np.where(moved > 0, moved, np.inf)).ravel())
  ratios = np.concatenate(ratios)
  assert "clip" in config or np.mean(ratios < 0.1) >= 0.9, (config, t, np.mean(ratios < 0.1))
  _assert_within_model(got, want, steps, f"{config} step {t}")


def _leaves(shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {f"w{i}": jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes, strict=True))}


@pytest.fixture(scope="module", autouse=True)
def _kernel():
  if not _kernels.load():
    pytest.skip(f"the fused kernel is unavailable here: {_kernels._state.get('error')}")


def _fused_step(tx):
  """update_and_apply with the kernel, jitted but not donated, so the inputs can be reused."""
  return jax.jit(functools.partial(_step.update_and_apply, tx, fused=True))


class FusedStepTest(parameterized.TestCase):
  @parameterized.named_parameters(*CONFIGS.items())
  def test_equals_generic_step_for_step(self, make_tx):
    tx = make_tx()
    fused, jitted = _fused_step(tx), jax.jit(functools.partial(_step.update_and_apply, tx, fused=False))
    params = _leaves(SIZES)
    state = tx.init(params)
    assert _kernel_in(fused.lower(jax.tree.map(jnp.cos, params), state, params).as_text())
    for t in range(30 if self._testMethodName.endswith(("_adam", "_adamw", "adam_schedules")) else 6):
      grads = jax.tree.map(lambda p, t=t: jnp.sin(3.0 * p + t) * (1.0 + t % 3), params)
      got, got_state = fused(grads, state, params)
      updates, want_state = tx.update(grads, state, params)  # eager: op by op
      want = optax.apply_updates(params, updates)
      jit_p, jit_state = jitted(grads, state, params)
      assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
      chex.assert_trees_all_equal_shapes_and_dtypes(got_state, want_state)
      # Constant hyperparameters: the eager bits exactly. Schedules: XLA may
      # fold the scalar arithmetic differently, so within the rounding model's bound.
      config = self._testMethodName.removeprefix("test_equals_generic_step_for_step_")
      if "schedule" not in config:
        chex.assert_trees_all_equal((got, got_state), (want, want_state))
      else:
        _assert_one_step_within_model(config, (got, got_state), (want, want_state), (params, state), grads, t + 1)
      # against the jitted generic step, which XLA rewrites a little (fusion, folding); with bfloat16 moments an
      # ulp of float32 there can flip a stochastic rounding, so the eager bits above are the comparison
      if "bf16" not in config:
        _assert_one_step_within_model(config, (got, got_state), (jit_p, jit_state), (params, state), grads, t + 1)
      params, state = got, got_state  # the trajectory continues from the fused step

  def test_update_step_uses_the_kernel_in_place(self):
    tx = jadam.adam(1e-3)
    params = _leaves([s for s in SIZES if np.prod(s)])  # (an empty leaf's "copy" is free)
    hlo = jadam.make_update_step(tx).lower(params, tx.init(params), params).compile().as_text()
    assert 'custom_call_target="jadam_adam_f32"' in hlo
    assert " copy(" not in hlo
    generic = jadam.make_update_step(tx, fused=False).lower(params, tx.init(params), params)
    assert "jadam_adam" not in generic.compile().as_text()

  def test_update_step_and_train_step_run_the_kernel(self):
    def loss_fn(params, x):
      return sum(jnp.sum((p - x) ** 2) for p in jax.tree.leaves(params))

    tx = jadam.adamw(1e-2, weight_decay=1e-3)
    params = _leaves([(5,), (300, 4)])
    x = jnp.float32(0.5)
    for fused in (None, False):
      train = jadam.make_train_step(loss_fn, tx, fused=fused)
      assert ("jadam_adam_f32" in train.lower(params, tx.init(params), x).as_text()) == (fused is None)
    want_p, want_s = jax.tree.map(jnp.array, params), tx.init(params)
    got_p, got_s = jax.tree.map(jnp.array, params), tx.init(params)
    fused_train, generic_train = jadam.make_train_step(loss_fn, tx), jadam.make_train_step(loss_fn, tx, fused=False)
    for _ in range(5):
      got_p, got_s, got_loss = fused_train(got_p, got_s, x)
      want_p, want_s, want_loss = generic_train(want_p, want_s, x)
    for a, b in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s)), strict=True):
      assert a.dtype == b.dtype and a.shape == b.shape
    # the rounding model's bound over the 5 steps, the gradient 2 (p - x) carrying the parameters' gaps
    hp = _hp(lr=1e-2, decoupled_weight_decay=1e-3)
    runs = {k: _rounding.adam(lambda p, t: (p - 0.5) * 2.0, np.asarray(v), steps=5, **hp) for k, v in params.items()}
    _assert_within_model((got_p, got_s), (want_p, want_s), {k: {**r[-1], "lr": hp["lr"]} for k, r in runs.items()}, "")
    # the loss of the parameters before the last step: a sum of 1205 squares (p - x)^2
    before = [r[-2]["params"] for r in runs.values()]
    terms = [(p - 0.5) * (p - 0.5) for p in before]
    n = sum(p.value.size for p in before)
    total = sum(float(np.sum(d.value)) for d in terms)
    loss = _rounding.summed(total, total, n) + _rounding.Gap(0.0, sum(float(np.sum(d.gap)) for d in terms))
    _rounding.assert_within(got_loss, want_loss, loss, "loss")

  def test_traced_hyperparameters(self):
    @functools.partial(jax.jit, static_argnums=0)
    def step(fused, lr, b2, wd, params, state, grads):
      tx = jadam.adam(lr, b2=b2, weight_decay=wd)  # as inside optax.inject_hyperparams
      return _step.update_and_apply(tx, grads, state, params, fused=fused)

    params = _leaves([(7,), (1000,)])
    grads = jax.tree.map(jnp.cos, params)
    state = jadam.adam(weight_decay=1.0).init(params)
    hp = (jnp.float32(1e-2), jnp.float32(0.99), jnp.float32(1e-3))
    assert "jadam_adam_f32" in step.lower(True, *hp, params, state, grads).as_text()
    got, got_state = step(True, *hp, params, state, grads)
    want, want_state = step(False, *hp, params, state, grads)
    _assert_one_step_within_model(
      "traced_hyperparameters", (got, got_state), (want, want_state), (params, state), grads, 1
    )

  def test_apply_if_finite_rejects_and_accepts_as_optax_does(self):
    inner = jadam.adam(1e-2, weight_decay=1e-2)
    tx = optax.apply_if_finite(inner, 1)
    params = _leaves([(0,), (1,), (7,), (1000,), (3, 5, 2)])
    fused = _fused_step(tx)
    state, inner_state = tx.init(params), inner.init(params)
    assert _kernel_in(fused.lower(params, state, params).as_text())
    for t in range(5):
      grads = jax.tree.map(lambda p, t=t: jnp.sin(3.0 * p + t), params)
      if t in (2, 3):
        grads["w3"] = grads["w3"].at[5].set(jnp.nan if t == 2 else jnp.inf)
      got, got_state = fused(grads, state, params)
      updates, new_inner = inner.update(grads, inner_state, params)  # eager, op by op
      if t == 2:  # rejected: nothing moves (apply_updates adds zeros); t == 3: a second error in a row is accepted
        want, new_inner = jax.tree.map(lambda p: p + 0, params), inner_state
      else:
        want = optax.apply_updates(params, updates)
      chex.assert_trees_all_equal((got, got_state.inner_state), (want, new_inner))
      assert int(got_state.notfinite_count) == (1 if t == 2 else 2 if t == 3 else 0)
      assert bool(got_state.last_finite) == (t not in (2, 3))
      params, state, inner_state = got, got_state, new_inner
      params = jax.tree.map(lambda p: jnp.where(jnp.isfinite(p), p, 0.5), params)

  def test_state_interoperates_with_tx_update(self):
    tx = jadam.adam(1e-2, weight_decay=1e-2)
    params = _leaves([(7,), (1000,)])
    grads = jax.tree.map(jnp.cos, params)
    p1, s1 = _fused_step(tx)(grads, tx.init(params), params)
    updates, s2 = tx.update(grads, s1, p1)  # the generic path continues from the fused state
    p2 = optax.apply_updates(p1, updates)
    p3, s3 = _fused_step(tx)(grads, s1, p1)
    chex.assert_trees_all_equal((p2, s2), (p3, s3))

  @parameterized.named_parameters(
    ("bf16_first_moment_only", lambda: jadam.adam(mu_dtype=jnp.bfloat16), "bfloat16 for both"),
    ("bf16_amsgrad", lambda: jadam.adam(amsgrad=True, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), "amsgrad"),
    ("chained_after", lambda: optax.chain(jadam.adam(), optax.scale(0.5)), "does not end in jadam.scale_by_lr"),
    ("optax", lambda: optax.adam(1e-3), "does not end in jadam.scale_by_lr"),
    (
      "keras_decay",
      lambda: optax.chain(jadam.adam(1e-3), jadam.decoupled_decay(1e-2, 1e-3, convention="keras")),
      "convention='keras'",
    ),
    ("rmsprop", lambda: jadam.rmsprop(1e-3), "bias_correct"),
  )
  def test_other_configurations_take_the_generic_path(self, make_tx, why):
    tx = make_tx()
    params = _leaves([(7,), (3, 4)])
    with jax.numpy_dtype_promotion("standard"):
      assert not _kernel_in(jax.jit(_auto(tx)).lower(params, tx.init(params), params).as_text())
      # fused=True requires the kernel, and says why it cannot serve
      with pytest.raises(
        ValueError, match=r"fused=True, but the fused Adam kernel cannot serve this step: .*" + re.escape(why)
      ):
        jax.jit(functools.partial(_step.update_and_apply, tx, fused=True)).lower(params, tx.init(params), params)

  def test_many_small_leaves_take_the_kernel(self):
    tx = jadam.adam(1e-2)
    for n, size in ((300, 64), (300, 1 << 16), (200, 64)):
      params = [jax.ShapeDtypeStruct((size,), jnp.float32)] * n
      state = jax.eval_shape(tx.init, params)
      hlo = jax.jit(_auto(tx)).lower(params, state, params).as_text()
      # every leaf in calls of at most _LEAVES_PER_CALL leaves: the program grows by one call per chunk
      assert hlo.count("@jadam_") == -(-n // _fused._LEAVES_PER_CALL), (n, size)

  def test_other_leaves_take_the_generic_path(self):
    tx = jadam.adam(1e-2)
    for params in ({"w": jnp.ones(3), "n": jnp.arange(3)}, {"w": jnp.ones(3, jnp.bfloat16)}):
      grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
      assert not _kernel_in(jax.jit(_auto(tx)).lower(grads, tx.init(params), params).as_text())

  def test_vmap_and_grad(self):
    tx = jadam.adam(1e-2)
    params = jnp.stack([jnp.linspace(-1.0, 1.0, 9)] * 3)
    grads = jnp.cos(params) * jnp.arange(1.0, 4.0)[:, None]
    state = jax.vmap(tx.init)(params)
    # vmap of the helper: the generic path; vmap of a jitted fused step: the kernel, one row at a time
    direct = jax.vmap(_auto(tx))(grads, state, params)
    of_jit = jax.vmap(_fused_step(tx))(grads, state, params)
    want = jax.vmap(functools.partial(_step.update_and_apply, tx, fused=False))(grads, state, params)
    step = _model_step(_hp(lr=1e-2), np.asarray(grads), (params, state), 1)
    _assert_within_model(direct, want, {None: step}, "vmap of the helper")
    _assert_within_model(of_jit, want, {None: step}, "vmap of the fused step")

    def loss(lr):  # differentiating through a step: the generic path
      p, _ = _auto(jadam.adam(lr))(grads[0], tx.init(params[0]), params[0])
      return jnp.sum(p)

    # d/dlr sum(theta - lr u) = -sum(u), u = g / (|g| + eps) at the first step: the model's u, summed (9 terms)
    (u,) = _rounding.adam([np.asarray(grads[0])], np.asarray(params[0]), lr=1.0)
    total = _rounding.summed(np.sum(u["update"].value), np.sum(np.abs(u["update"].value)), 9)
    _rounding.assert_within(
      jax.grad(loss)(jnp.float32(1e-2)), total.value, total + _rounding.Gap(0.0, np.sum(u["update"].gap))
    )
    np.testing.assert_allclose(total.value, -np.sum(np.sign(grads[0])), rtol=1e-7)  # eps / |g| < 2e-8

  def test_float64_matches_reference(self):
    with jax.enable_x64(True):
      for make_tx, kwargs in (
        (lambda: jadam.adam(1e-2, weight_decay=1e-2), dict(lr=1e-2, weight_decay=1e-2)),
        (lambda: jadam.adamw(1e-2, weight_decay=1e-1), dict(lr=1e-2, decoupled_weight_decay=1e-1)),
        # found by structure
        (
          lambda: optax.chain(optax.clip_by_global_norm(3.0), jadam.adam(1e-2)),
          dict(lr=1e-2, clip=3.0),
        ),
        (lambda: jadam.adam(1e-2, amsgrad=True, maximize=True), dict(lr=1e-2, amsgrad="torch", maximize=True)),
        (lambda: jadam.torch.AdamW(lr=1e-2, weight_decay=1e-1), dict(lr=1e-2, decoupled_weight_decay=1e-1)),
        (
          lambda: optax.apply_if_finite(optax.inject_hyperparams(jadam.adam)(learning_rate=1e-2, b2=0.99), 3),
          dict(lr=1e-2, b2=0.99),
        ),
      ):
        tx = make_tx()
        grads = jax.random.normal(jax.random.key(0), (50, 1001), jnp.float64)
        params = jnp.linspace(-1.0, 1.0, 1001, dtype=jnp.float64)
        # fused=True: the kernel's own arithmetic is under test, also on an ISA path where the step helpers would
        # choose XLA for a configuration (AMSGrad on AVX2)
        step = jadam.make_update_step(tx, fused=True)
        assert "jadam_adam_f64" in step.lower(params, tx.init(params), params).as_text()
        p, state = jnp.array(params), tx.init(params)
        g64 = np.asarray(grads)
        if "clip" in kwargs:  # optax.clip_by_global_norm in float64: g / ||g|| * max_norm above max_norm
          max_norm = kwargs.pop("clip")
          norms = np.linalg.norm(g64, axis=1, keepdims=True)
          g64 = np.where(norms < max_norm, g64, g64 / norms * max_norm)
        want = reference.adam(g64, np.asarray(params), **kwargs)
        for g, w in zip(grads, want, strict=True):
          p, state = step(p, state, g)
          np.testing.assert_allclose(p, w, rtol=1e-12, atol=1e-14)

  def test_mixed_float32_and_float64_leaves(self):
    with jax.enable_x64(True):
      tx = jadam.adam(1e-2)
      params = {
        "a": jnp.linspace(-1.0, 1.0, 33, dtype=jnp.float32),
        "b": jnp.linspace(-1.0, 1.0, 17, dtype=jnp.float64),
      }
      grads = jax.tree.map(jnp.cos, params)
      hlo = (
        jax.jit(functools.partial(_step.update_and_apply, tx, fused=True))
        .lower(grads, tx.init(params), params)
        .as_text()
      )
      assert "jadam_adam_f32" in hlo and "jadam_adam_f64" in hlo
      got = _fused_step(tx)(grads, tx.init(params), params)
      updates, state = tx.update(grads, tx.init(params), params)
      chex.assert_trees_all_equal(got, (optax.apply_updates(params, updates), state))


def _run(code, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    env=env,
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    timeout=120,
  )


_FALLBACK = """
    import warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp, numpy as np, optax, jadam
    from jadam._kernels import build as _kernels
    tx = jadam.adam(1e-2)
    p = jnp.linspace(-1.0, 1.0, 100)
    step = jadam.make_update_step(tx)
    with warnings.catch_warnings(record=True) as caught:
      hlo = step.lower(p, tx.init(p), p).as_text()
      got, _ = step(jnp.array(p), tx.init(p), jnp.cos(p))
    u, _ = tx.update(jnp.cos(p), tx.init(p), p)
    from tests.helpers import rounding  # jitted and eager: within the rounding model's bound
    (model,) = rounding.adam([np.asarray(jnp.cos(p))], np.asarray(p), lr=float(np.float32(1e-2)))
    rounding.assert_within(got, optax.apply_updates(p, u), model["params"])
    warned = sum("fused CPU Adam kernel" in str(w.message) for w in caught)
    print("kernel" if "jadam_adam" in hlo else "generic", warned)
"""


def test_disabled_by_environment_falls_back_silently():
  res = _run(_FALLBACK, JADAM_NO_KERNELS="1")
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == ["generic", "0"]


def test_failed_build_falls_back_with_one_warning(tmp_path):
  if not _kernels.development():
    pytest.skip("an installed jadam builds nothing at run time")
  dev = "\n    from jadam._kernels import build\n    build.packaged = lambda: None  # the development build\n"
  res = _run(dev + _FALLBACK, CXX="/bin/false", JADAM_CACHE_DIR=str(tmp_path))
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == ["generic", "1"]
  assert not list(tmp_path.rglob("*.so"))


@pytest.mark.parametrize("helper", ["update_and_apply", "make_update_step", "make_train_step"])
def test_fused_and_donate_must_be_flags(helper):
  tx = jadam.adam(1e-3)
  params = {"w": jnp.ones(3)}
  call = {
    "update_and_apply": lambda **kw: jadam.update_and_apply(tx, params, tx.init(params), params, **kw),
    "make_update_step": lambda **kw: jadam.make_update_step(tx, **kw),
    "make_train_step": lambda **kw: jadam.make_train_step(lambda p: jnp.sum(p["w"]), tx, **kw),
  }[helper]
  with pytest.raises(TypeError, match=r"fused must be True, False or None; got 'no'"):
    call(fused="no")
  if helper != "update_and_apply":
    with pytest.raises(TypeError, match=r"donate must be a bool; got int 1"):
      call(donate=1)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_all_finite_check_matches_numpy(dtype):
  """optax.apply_if_finite's check on the kernel: every float dtype, one- and many-task sizes, the bad value
  first, last and in between; complex and integer leaves beside it take XLA's check."""
  from jadam._kernels import fused

  if not _kernels.load():
    pytest.skip(f"kernel unavailable: {_kernels.error()}")
  with jax.enable_x64(dtype == "float64"):
    check = jax.jit(fused.all_finite)
    others = {"int": jnp.arange(3), "complex": jnp.ones(2, jnp.complex64)}
    assert "jadam_all_finite" in check.lower({"x": jnp.ones(4, dtype), **others}).as_text()
    for n in (1, 1000, 3_000_001):  # the last spans several tasks, run on the thread pool
      for bad in (None, 0, n // 2, n - 1):
        for value in (np.inf, -np.inf, np.nan):
          x = np.linspace(-2.0, 2.0, n)
          if bad is not None:
            x[bad] = value
          x = jnp.asarray(x, dtype)
          want = bool(np.all(np.isfinite(np.asarray(x, np.float64))))
          assert bool(check({"x": x, **others})) == want, (n, bad, value)
          if bad is None:
            break
    assert not bool(check({"x": jnp.ones(4, dtype), "c": jnp.array([1 + 1j, np.nan], jnp.complex64)}))
