"""The fused CPU step for :func:`jadam.adam` and :func:`jadam.adamw`: one pass over memory.

XLA:CPU has no multi-output fusion, so the generic step makes three passes
(new m, new v, new parameters: 40 bytes a float32 parameter, where 28 would
do). Here one XLA FFI custom call (`jadam/_kernels/adam_cpu.cc`) updates every
leaf in place, reading g, p, m, v once and writing p, m, v once. It computes
exactly what the generic path does, operation for operation, with the scalars
(learning rate, decays, bias corrections, eps) formed in JAX as the stages
form them, so schedules and traced hyperparameters work unchanged.

:func:`jadam.adam` and :func:`jadam.adamw` stay plain Optax transformations;
they record their recipe here (:func:`remember`), keyed weakly by their update
function, and the step helpers of `jadam._step` look it up (:func:`step`).
Anything else, or any configuration the kernel does not cover, goes the
generic way.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _common, _moments, _penalty, _scale
from jadam._kernels import build as _build

# The kernel's scalar layout (enum Scalar in adam_cpu.cc).
_N_SCALARS = 10
PLAIN, COUPLED, DECOUPLED = 0, 1, 2  # enum Mode: where weight_decay enters
# Leaves per custom call: XLA's fusion passes are quadratic in a call's
# operands (2,000 leaves in one call take minutes to compile).
_LEAVES_PER_CALL = 32
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
# Many small leaves: JAX's dispatch costs some microseconds a buffer, and XLA's
# own fusions run while it goes on, where the custom call runs after it. On the
# 2,000-leaf benchmark tree (10K parameters a leaf) that lost overlap outweighs
# the saved pass (fused 81 ms, XLA 71 ms, measured interleaved), so such trees
# take the generic path.
_MANY_LEAVES, _SMALL_LEAF = 256, 1 << 15


class Recipe(NamedTuple):
  """What the kernel needs to know of an adam/adamw chain, and where its state lives."""

  learning_rate: _common.Schedule
  b1: _common.Schedule
  b2: _common.Schedule
  eps: _common.Schedule
  eps_root: _common.Schedule
  weight_decay: _common.Schedule | None
  mode: int  # PLAIN, COUPLED or DECOUPLED
  n_states: int  # the chain's state: a tuple of this length
  moments: int  # index of the ScaleByMomentsState
  lr: int  # index of the ScaleByLrState
  l2: int | None  # index of the AddL2State


_RECIPES: weakref.WeakKeyDictionary[Callable[..., Any], Recipe] = weakref.WeakKeyDictionary()


def remember(tx: optax.GradientTransformation, recipe: Recipe) -> optax.GradientTransformation:
  """Records `recipe` for `tx` (keyed weakly by `tx.update`); returns `tx` unchanged."""
  _RECIPES[tx.update] = recipe
  return tx


def recipe_of(tx: Any) -> Recipe | None:
  update = getattr(tx, "update", None)
  try:
    return _RECIPES.get(update) if update is not None else None
  except TypeError:  # not weakly referenceable: not ours
    return None


def _tracing_ok(x: Any) -> bool:
  """Concrete arrays and `jit`'s tracers only: under `grad`, `vmap` and the like, go generic."""
  if not isinstance(x, jax.core.Tracer):
    return isinstance(x, (jax.Array, np.ndarray))
  try:
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return type(x) is partial_eval.DynamicJaxprTracer


def _in_mesh_context() -> bool:
  """Inside `shard_map` or a mesh context, the per-device program is not ours to replace."""
  try:
    return not jax.sharding.get_abstract_mesh().empty
  except Exception:  # noqa: BLE001 - an unknown jax: be safe
    return True


def _scalars(recipe: Recipe, state: tuple, dtype: jnp.dtype):
  """The kernel's scalars in `dtype`, formed as the generic stages form them, and the new counts."""
  moments = state[recipe.moments]
  count = moments.count
  beta1, beta2 = recipe.b1(count), recipe.b2(count)  # scale_by_moments
  new_count = optax.safe_increment(count)
  c1 = _common.one_minus_power(beta1, new_count)  # bias_correct
  c2 = _common.one_minus_power(beta2, new_count)
  step = new_count - 1  # normalize
  e, e_root = recipe.eps(step), recipe.eps_root(step)
  lr_count = state[recipe.lr].count
  lr = recipe.learning_rate(lr_count)  # scale_by_lr
  wd, l2_count = 0.0, None
  if recipe.l2 is not None:
    l2_count = state[recipe.l2].count
    wd = recipe.weight_decay(l2_count)  # add_l2

  cast = lambda x: _common.cast_hyperparameter(x, dtype)
  d1, d2 = cast(beta1), cast(beta2)
  values = [1 - d1, d1, 1 - d2, d2, c1, c2, cast(e_root), cast(e), -cast(lr), cast(wd)]
  scalars = jnp.stack([jnp.asarray(x).astype(dtype) for x in values])
  assert scalars.shape == (_N_SCALARS,)
  counts = (new_count, optax.safe_increment(lr_count), None if l2_count is None else optax.safe_increment(l2_count))
  return scalars, counts


def _call(dtype: jnp.dtype, scalars, gs, ps, ms, vs, mode: int):
  """The custom calls over the leaves (all of `dtype`), `_LEAVES_PER_CALL` at a time."""
  target = _build.TARGETS[dtype.name]
  new_p, new_m, new_v = list(ps), list(ms), list(vs)
  live = [i for i, p in enumerate(ps) if p.size]  # empty leaves: nothing to do
  for start in range(0, len(live), _LEAVES_PER_CALL):
    idx = live[start : start + _LEAVES_PER_CALL]
    args = [scalars]
    for i in idx:
      args += [gs[i], ps[i], ms[i], vs[i]]
    out_types = [jax.ShapeDtypeStruct(ps[i].shape, dtype) for i in idx for _ in range(3)]
    aliases = {1 + 4 * j + 1 + k: 3 * j + k for j in range(len(idx)) for k in range(3)}
    out = jax.ffi.ffi_call(target, out_types, input_output_aliases=aliases, vmap_method="sequential")(
      *args, mode=np.int32(mode)
    )
    for j, i in enumerate(idx):
      new_p[i], new_m[i], new_v[i] = out[3 * j : 3 * j + 3]
  return new_p, new_m, new_v


def step(
  tx: optax.GradientTransformation, grads: Any, state: Any, params: Any, *, multi_device_ok: bool
) -> tuple[Any, Any] | None:
  """The fused step ``(new_params, new_state)``, or None where the generic path must run.

  `multi_device_ok` is set by callers that have checked the inputs live on one
  device (a custom call is not partitioned by GSPMD: it would gather them).
  """
  recipe = recipe_of(tx)
  if recipe is None or jax.default_backend() != "cpu" or _in_mesh_context():
    return None
  if not isinstance(state, tuple) or len(state) != recipe.n_states:
    return None
  moments = state[recipe.moments]
  if not isinstance(moments, _moments.ScaleByMomentsState) or not isinstance(state[recipe.lr], _scale.ScaleByLrState):
    return None
  if recipe.l2 is not None and not isinstance(state[recipe.l2], _penalty.AddL2State):
    return None
  ps, treedef = jax.tree.flatten(params)
  try:
    gs = treedef.flatten_up_to(grads)
    ms = treedef.flatten_up_to(moments.mu)
    vs = treedef.flatten_up_to(moments.nu)
  except (ValueError, TypeError):
    return None
  for leaves in zip(gs, ps, ms, vs):
    if not all(_tracing_ok(x) for x in leaves):
      return None
    shape, dtype = jnp.shape(leaves[0]), jnp.result_type(leaves[0])
    if dtype not in _DTYPES or any(jnp.shape(x) != shape or jnp.result_type(x) != dtype for x in leaves):
      return None
  if len(ps) > _MANY_LEAVES and sum(int(np.prod(jnp.shape(p))) for p in ps) < _SMALL_LEAF * len(ps):
    return None
  if not multi_device_ok and not _one_device(ps + gs + ms + vs):
    return None
  if not _build.load():
    return None

  new_p, new_m, new_v = list(ps), list(ms), list(vs)
  counts = None
  for dtype in _DTYPES:
    idx = [i for i, p in enumerate(ps) if jnp.result_type(p) == dtype]
    if not idx:
      continue
    scalars, counts = _scalars(recipe, state, dtype)
    if not _tracing_ok(scalars):  # a hyperparameter under grad or vmap
      return None
    pick = lambda xs: [xs[i] for i in idx]
    outs = _call(dtype, scalars, pick(gs), pick(ps), pick(ms), pick(vs), recipe.mode)
    for k, i in enumerate(idx):
      new_p[i], new_m[i], new_v[i] = outs[0][k], outs[1][k], outs[2][k]
  if counts is None:  # no leaves at all
    return None
  new_count, lr_count, l2_count = counts
  new_state = list(state)
  new_state[recipe.moments] = moments._replace(
    count=new_count, mu=jax.tree.unflatten(treedef, new_m), nu=jax.tree.unflatten(treedef, new_v)
  )
  new_state[recipe.lr] = state[recipe.lr]._replace(count=lr_count)
  if recipe.l2 is not None:
    new_state[recipe.l2] = state[recipe.l2]._replace(count=l2_count)
  return jax.tree.unflatten(treedef, new_p), type(state)(new_state) if type(state) is not tuple else tuple(new_state)


def _one_device(leaves: list[Any]) -> bool:
  """Whether the computation runs on one device: one device in all, or concrete arrays on one."""
  if jax.device_count() == 1:
    return True
  return all(not isinstance(x, jax.core.Tracer) and single_device(x) for x in leaves)


def single_device(x: Any) -> bool:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return True
  return type(sharding) is jax.sharding.SingleDeviceSharding or len(sharding.device_set) == 1
