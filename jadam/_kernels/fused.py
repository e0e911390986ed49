"""The fused Adam step: Adam's stages found by structure, run as one pass over memory.

XLA:CPU has no multi-output fusion, so the generic step makes three passes
(new m, new v, new parameters: 40 bytes a float32 parameter, where 28 would
do). Here one primitive, `adam_step_p`, updates every leaf in place, reading
g, p, m, v once and writing p, m, v once. It computes exactly what the generic
path does, operation for operation, with the scalars (learning rate, decays,
bias corrections, eps, the clip factor) formed in JAX as the stages form them,
so schedules and traced hyperparameters work unchanged.

**Found by structure.** jadam's stages tag their update functions with what
they are and their hyperparameters (``update_fn.jadam_stage``); Optax's
combinators are recognised by their state types and their update functions
(`optax.chain`, `clip_by_global_norm`, `apply_if_finite`, `inject_hyperparams`,
`partition`/`masked`). :func:`plan` walks a transformation alongside its state
and either serves it or says why not (:class:`Unserved`), whoever built it:

- a chain ending in Adam's stages: ``[flip_sign] [add_l2] scale_by_moments
  [max_nu] bias_correct normalize [add_l2 (masked or not)] scale_by_lr``;
  any stages in front run as they are, `clip_by_global_norm` directly in
  front becomes a kernel scalar (one reduction pass for the norm);
- `apply_if_finite` (its check, `all(isfinite(g))`, one parallel pass of `finite_cpu.cc`; a rejected step leaves p, m and v as they are),
  `inject_hyperparams`, `partition` (one kernel call per group's leaves);
- moments in the parameters' dtype, in bfloat16 (stochastic rounding), or in
  8 bits (`jadam.Quantized` for both, without AMSGrad: one pass per block
  dequantizes, updates and requantizes; leaves below `min_size` keep float
  moments and take the float kernel in the same step);
- `jadam.sparse_adam`'s chain on row-sparse gradients: `sparse_step.py`'s
  kernel, one call per table.

**Exportable.** The primitive lowers to the C++ custom call only when lowering
for the CPU outside `jax.export`; for `jax.export` and every other platform it
lowers to the same arithmetic in plain XLA (`_xla_leaf`, `_xla_leaf_8bit`), so an exported
module holds no jadam custom call and a GPU or TPU lowering is pure XLA.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._storage import bf16 as _lowp
from jadam._stages import moments as _moments
from jadam._stages import penalty as _penalty
from jadam._storage import quantize as _quantize
from jadam._stages import scale as _scale
from jadam._kernels import build as _build

# The kernel's scalar layout (enum Scalar in adam_cpu.cc).
_N_SCALARS = 16
_OMB1, _B1, _OMB2, _B2, _C1, _C2, _EPS_ROOT, _EPS, _NEG_LR, _WD = range(10)
_CLIP_NORM, _CLIP_MAX, _CLIP_ON, _APPLY, _FACTOR, _SIGN = range(10, _N_SCALARS)
# enum Mode in adam_cpu.cc: which stages are present.
COUPLED, DECOUPLED, NEGATE, CLIP, AMSGRAD, TORCH_DECAY = 1, 2, 4, 8, 16, 32
# Leaves per custom call: XLA's fusion passes are quadratic in a call's
# operands (2,000 leaves in one call take minutes to compile).
_LEAVES_PER_CALL = 32
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
# Many small leaves: JAX's dispatch costs some microseconds a buffer, and XLA's
# own fusions run while it goes on, where the custom call runs after it. On the
# 2,000-leaf benchmark tree (10K parameters a leaf) that lost overlap outweighs
# the saved pass (fused 81 ms, XLA 71 ms, measured interleaved), so such trees
# take the generic path unless the kernel is required.
_MANY_LEAVES, _SMALL_LEAF = 256, 1 << 15


class Unserved(Exception):
  """The kernel cannot serve this transformation; the message says why."""


# --- the primitive -------------------------------------------------------------
# adam_step_p.bind(scalars, count, *leaves, mode, streams, block_size): `leaves` are g, p, m, v (and AMSGrad's
# maximum) per leaf; `count` (uint32) is the step count for the stochastic rounding of bfloat16 moments, whose
# leaves' positions `streams` lists (empty where the moments have the parameters' dtype). With `block_size` > 0
# the moments are 8-bit (jadam.Quantized): the leaves are g, p, m codes, m absmax, v codes, v absmax.
def _xla_grad(s, g, p, *, mode: int):
  """The gradient as the moments see it: clipped, negated (maximize), plus coupled L2, in XLA."""
  if mode & CLIP:
    g = jnp.where(s[_CLIP_ON] != 0, (g / s[_CLIP_NORM]) * s[_CLIP_MAX], g)
  if mode & NEGATE:
    g = -g
  if mode & COUPLED:
    g = g + s[_WD] * p
  return g


def _xla_params(s, u, p, *, mode: int):
  """The new parameters from the direction `u`: decoupled L2, the learning rate, torch's decay, a rejected step."""
  if mode & DECOUPLED:
    u = u + s[_WD] * p
  delta = s[_NEG_LR] * u
  if mode & TORCH_DECAY:
    delta = (p * s[_FACTOR] + delta) - p
  return jnp.where(s[_APPLY] != 0, p + delta, p + 0)


def _xla_leaf(s, count, g, p, m, v, vmax, *, mode: int, stream: int | None):
  """The kernel's arithmetic for one leaf, in XLA: the export and non-CPU lowering."""
  gi = _xla_grad(s, g, p, mode=mode)
  mi = s[_OMB1] * gi + s[_B1] * m.astype(gi.dtype)
  vi = s[_OMB2] * (gi * gi) + s[_B2] * v.astype(gi.dtype)
  if stream is not None:  # bfloat16 moments: stored rounded stochastically, read back as stored (jadam._storage.bf16)
    mi = _lowp.round_to_bfloat16(mi, count, 2 * stream)
    vi = _lowp.round_to_bfloat16(vi, count, 2 * stream + 1)
  vx = jnp.maximum(vi, vmax) if mode & AMSGRAD else vi
  # divisions as the stages write them: XLA makes them reciprocal products as it does there
  u = (mi.astype(gi.dtype) / s[_C1]) / (jnp.sqrt(vx.astype(gi.dtype) / s[_C2] + s[_EPS_ROOT]) + s[_EPS])
  ok = s[_APPLY] != 0
  out = [_xla_params(s, u, p, mode=mode), jnp.where(ok, mi, m), jnp.where(ok, vi, v)]
  if mode & AMSGRAD:
    out.append(jnp.where(ok, vx, vmax))
  return out


def _xla_leaf_8bit(s, g, p, mc, ma, vc, va, *, mode: int, block_size: int):
  """The 8-bit kernel's arithmetic for one leaf, in XLA: jadam._storage.quantize's dequantize, update, requantize."""
  gi = _xla_grad(s, g, p, mode=mode)
  m = _quantize.dequantize(_quantize.QuantizedArray(mc, ma), block_size, signed=True)
  v = _quantize.dequantize(_quantize.QuantizedArray(vc, va), block_size, signed=False)
  mi = s[_OMB1] * gi + s[_B1] * m
  vi = s[_OMB2] * (gi * gi) + s[_B2] * v
  # the step reads the float32 moments, not the requantized ones (as scale_by_moments passes them on)
  u = (mi / s[_C1]) / (jnp.sqrt(vi / s[_C2] + s[_EPS_ROOT]) + s[_EPS])
  ok = s[_APPLY] != 0
  qm = _quantize.quantize(mi, block_size, signed=True)
  qv = _quantize.quantize(vi, block_size, signed=False)
  keep = lambda new, old: jnp.where(ok, new, old)
  return [
    _xla_params(s, u, p, mode=mode),
    keep(qm.codes, mc),
    keep(qm.absmax, ma),
    keep(qv.codes, vc),
    keep(qv.absmax, va),
  ]


def _per_leaf(mode: int, block_size: int = 0) -> int:
  if block_size:
    return 6
  return 5 if mode & AMSGRAD else 4


def _xla_impl(scalars, count, *leaves, mode: int, streams: tuple[int, ...], block_size: int):
  k = _per_leaf(mode, block_size)
  out = []
  for j in range(0, len(leaves), k):
    if block_size:
      out += _xla_leaf_8bit(scalars, *leaves[j : j + k], mode=mode, block_size=block_size)
      continue
    g, p, m, v, *rest = leaves[j : j + k]
    stream = streams[j // k] if streams else None
    out += _xla_leaf(scalars, count, g, p, m, v, rest[0] if rest else None, mode=mode, stream=stream)
  return out


def _kernel_impl(scalars, count, *leaves, mode: int, streams: tuple[int, ...], block_size: int):
  k = _per_leaf(mode, block_size)
  n = len(leaves) // k
  out_types = [
    jax.ShapeDtypeStruct(leaves[k * j + i].shape, leaves[k * j + i].dtype) for j in range(n) for i in range(1, k)
  ]
  head = [scalars]
  attrs = {"mode": np.int32(mode)}
  if block_size:  # 8-bit moments: codes and scales per leaf, blocks of block_size flat elements
    target = _build.TARGETS["8bit"]
    attrs["block_size"] = np.int64(block_size)
  elif streams:  # the hash offsets of each leaf's two streams, as _lowp.hash_bits forms them
    target = _build.TARGETS["bfloat16"]
    offsets = [_lowp.stream_offset(st) for j in streams for st in (2 * j, 2 * j + 1)]
    head.append(jnp.concatenate([jnp.reshape(count, (1,)), jnp.asarray(offsets, jnp.uint32)]))
  else:
    target = _build.TARGETS[jnp.dtype(scalars.dtype).name]
  aliases = {len(head) + k * j + 1 + i: (k - 1) * j + i for j in range(n) for i in range(k - 1)}
  call = jax.ffi.ffi_call(target, out_types, input_output_aliases=aliases, vmap_method="sequential")
  return call(*head, *leaves, **attrs)


adam_step_p = jex_core.Primitive("jadam_adam_step")
adam_step_p.multiple_results = True


@adam_step_p.def_abstract_eval
def _abstract_eval(scalars, count, *leaves, mode, streams, block_size):
  del scalars, count, streams
  k = _per_leaf(mode, block_size)
  return [
    jax.core.ShapedArray(leaves[j + i].shape, leaves[j + i].dtype)
    for j in range(0, len(leaves), k)
    for i in range(1, k)
  ]


@adam_step_p.def_impl
def _impl(*args, mode, streams, block_size):
  return jax.jit(functools.partial(adam_step_p.bind, mode=mode, streams=streams, block_size=block_size))(*args)


def for_export(ctx) -> bool:
  """Whether this lowering is `jax.export`'s (which refuses custom calls without compatibility guarantees)."""
  params = getattr(ctx.module_context, "lowering_parameters", None)
  return params is None or bool(getattr(params, "for_export", True))


def _cpu_lowering(ctx, *args, mode, streams, block_size):
  impl = _xla_impl if for_export(ctx) or not _build.loaded() else _kernel_impl
  fun = functools.partial(impl, mode=mode, streams=streams, block_size=block_size)
  return mlir.lower_fun(fun, multiple_results=True)(ctx, *args)


mlir.register_lowering(adam_step_p, mlir.lower_fun(_xla_impl, multiple_results=True))
mlir.register_lowering(adam_step_p, _cpu_lowering, platform="cpu")


def _batch(args, dims, *, mode, streams, block_size):
  axes = list(dims)  # None where not mapped
  out = jax.vmap(functools.partial(_xla_impl, mode=mode, streams=streams, block_size=block_size), in_axes=axes)(*args)
  return out, [0] * len(out)


batching.primitive_batchers[adam_step_p] = _batch


# --- optax.apply_if_finite's check ----------------------------------------------
# all_finite_p.bind(*leaves): `jnp.all(jnp.isfinite(x))` over all the leaves (floating point, real), one bool.
_FINITE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16))


def _all_finite_xla(*leaves):
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite_kernel(*leaves):
  flag = jax.ffi.ffi_call(_build.ALL_FINITE_TARGET, jax.ShapeDtypeStruct((1,), jnp.uint8))(*leaves)
  return flag[0] != 0


all_finite_p = jex_core.Primitive("jadam_all_finite")
all_finite_p.def_abstract_eval(lambda *leaves: jax.core.ShapedArray((), jnp.bool_))
all_finite_p.def_impl(lambda *leaves: jax.jit(all_finite_p.bind)(*leaves))
mlir.register_lowering(all_finite_p, mlir.lower_fun(_all_finite_xla, multiple_results=False))


def _all_finite_cpu_lowering(ctx, *leaves):
  impl = _all_finite_xla if for_export(ctx) or not _build.loaded() else _all_finite_kernel
  return mlir.lower_fun(impl, multiple_results=False)(ctx, *leaves)


mlir.register_lowering(all_finite_p, _all_finite_cpu_lowering, platform="cpu")


def all_finite(tree: Any) -> jax.Array:
  """``jnp.all(jnp.isfinite(x))`` over every leaf of `tree`, as `optax.apply_if_finite` checks its gradients.

  The float32, float64, bfloat16 and float16 leaves are read once, in parallel, by a CPU kernel
  (`finite_cpu.cc`; XLA:CPU reduces on one thread); other leaves (complex, integer) by XLA. A boolean, so
  the answer does not depend on the order of the reduction.
  """
  leaves = jax.tree.leaves(tree)
  fast = [x for x in leaves if jnp.result_type(x) in _FINITE_DTYPES and tracing_ok(x) and np.size(x)]
  fast_ids = {id(x) for x in fast}
  rest = [x for x in leaves if id(x) not in fast_ids]
  checks = [all_finite_p.bind(*fast)] if fast else []
  checks += [jnp.all(jnp.isfinite(x)) for x in rest]
  return jnp.all(jnp.array(checks)) if checks else jnp.array(True)


# --- recognising the structure -------------------------------------------------
def _closure(fn: Any) -> dict[str, Any]:
  code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
  if code is None:
    return {}
  out = {}
  for name, cell in zip(code.co_freevars, cells):
    try:
      out[name] = cell.cell_contents
    except ValueError:  # an empty cell
      pass
  return out


def _is(fn: Any, module: str, qualname: str) -> bool:
  return getattr(fn, "__module__", "").startswith(module) and getattr(fn, "__qualname__", "") == qualname


def _unwrap(fn: Any) -> Any:
  """Through Optax's extra-args adapter: the update function it calls."""
  while _is(fn, "optax", "with_extra_args_support.<locals>.update"):
    fn = _closure(fn)["tx"].update
  return fn


def _stage(fn: Any) -> tuple[str, dict] | None:
  tag = getattr(fn, "jadam_stage", None)
  return tag if isinstance(tag, tuple) and len(tag) == 2 else None


def _is_chain(fn: Any) -> bool:
  return _is(fn, "optax", "chain.<locals>.update_fn") and "update_fns" in _closure(fn)


def _flatten(fn: Any, state: Any, grads: Any, params: Any) -> tuple[list[tuple[Any, Any]], Callable[[list[Any]], Any]]:
  """Nested chains as one list of (update function, state), and how to rebuild the state from new ones.

  A jadam alias (`_common.named_chain`) is opened after its own checks (its
  state's stage types; no `None` gradient where the params hold arrays).
  """
  fn = _unwrap(fn)
  chained = getattr(fn, "jadam_chain", None)
  if chained is not None:
    inner, check = chained
    check(grads, state, params)
    fn = _unwrap(inner.update)
  if not _is_chain(fn):
    return [(fn, state)], lambda new: new[0]
  fns = _closure(fn)["update_fns"]
  if not isinstance(state, tuple) or len(state) != len(fns):
    raise Unserved("a chain's state does not match its stages (call init first)")
  parts = [_flatten(f, s, grads, params) for f, s in zip(fns, state)]

  def rebuild(new):
    out, k = [], 0
    for items, back in parts:
      out.append(back(new[k : k + len(items)]))
      k += len(items)
    return tuple(out)

  return [x for items, _ in parts for x in items], rebuild


class _Ctx(NamedTuple):
  apply: Any  # None, or a traced bool: whether the step is taken (apply_if_finite)
  require: bool  # fused=True: keep many small leaves on the kernel too


def select(ctx: _Ctx, new: Any, old: Any) -> Any:
  if ctx.apply is None:
    return new
  return jax.tree.map(lambda n, o: jnp.where(ctx.apply, n, o), new, old)


def _run(fn: Any, state: Any, grads: Any, params: Any, ctx: _Ctx) -> tuple[Any, Any]:
  """``(new_params, new_state)`` of ``fn`` then ``optax.apply_updates``, through the kernel, or raises Unserved."""
  fn = _unwrap(fn)
  if _is(fn, "jadam.torch", "grouped.<locals>.update_fn"):  # jadam.torch's groups: a check, then partition
    inner = _closure(fn)
    if params is not None and "name" in inner:
      _common.check_tree(f"jadam.torch.{inner['name']}", grads, "the params", params, _common.PARAMS_HINT)
    return _run(inner["tx"].update, state, grads, params, ctx)
  if isinstance(state, optax.ApplyIfFiniteState) and _is(fn, "optax", "apply_if_finite.<locals>.update"):
    return _run_if_finite(fn, state, grads, params, ctx)
  if _is_inject(fn, state):
    return _run_inject(fn, state, grads, params, ctx)
  if isinstance(state, optax.PartitionState) and _is(fn, "optax", "partition.<locals>.update_fn"):
    return _run_partition(fn, state, grads, params, ctx)
  items, rebuild = _flatten(fn, state, grads, params)
  if len(items) == 1 and items[0][0] is not fn:
    return _run(items[0][0], items[0][1], grads, params, ctx)
  return _run_chain(items, rebuild, grads, params, ctx)


def _run_if_finite(fn, state, grads, params, ctx):
  env = _closure(fn)
  inner, max_errors = env["inner"], env["max_consecutive_errors"]
  # optax.apply_if_finite's own arithmetic, as it does it
  isfinite = all_finite(grads)  # optax's jnp.all(jnp.isfinite(...)) over the leaves, as one parallel pass
  notfinite_count = jnp.where(isfinite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count))
  ok = jnp.logical_or(isfinite, notfinite_count > max_errors)
  inner_ctx = ctx._replace(apply=ok if ctx.apply is None else jnp.logical_and(ctx.apply, ok))
  new_params, inner_state = _run(inner.update, state.inner_state, grads, params, inner_ctx)
  new_state = optax.ApplyIfFiniteState(
    notfinite_count=notfinite_count,
    last_finite=isfinite,
    total_notfinite=jnp.where(isfinite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
    inner_state=inner_state,
  )
  # an enclosing apply_if_finite that rejects the step keeps this one's counters too
  kept = select(ctx, new_state._replace(inner_state=None), state._replace(inner_state=None))
  return new_params, kept._replace(inner_state=inner_state)


def _is_inject(fn, state) -> bool:
  fields = ("count", "hyperparams", "hyperparams_states", "inner_state")
  return (
    getattr(fn, "__module__", "").startswith("optax")
    and getattr(type(state), "_fields", None) == fields
    and {"inner_factory", "sched_hps", "other_hps"} <= set(_closure(fn))
  )


def _run_inject(fn, state, grads, params, ctx):
  env = _closure(fn)
  convert = fn.__globals__.get("_convert_floats")
  if convert is None:
    raise Unserved("an unknown version of optax.inject_hyperparams")
  dtype = env.get("hyperparam_dtype")
  if dtype is None:
    dtype = optax.tree.dtype(params, "highest")
  # optax.inject_hyperparams's update, as it does it
  hparams = {k: convert(v, dtype) for k, v in state.hyperparams.items()}
  hparams.update({k: convert(f(state.hyperparams_states[k]), dtype) for k, f in env["sched_hps"].items()})
  hp_states = {k: f.update(state.hyperparams_states[k]) for k, f in env["sched_hps"].items()}
  inner = env["inner_factory"](**env["other_hps"], **hparams)
  new_params, inner_state = _run(inner.update, state.inner_state, grads, params, ctx)
  new = type(state)(
    count=optax.safe_increment(state.count), hyperparams=hparams, hyperparams_states=hp_states, inner_state=inner_state
  )
  kept = select(ctx, new._replace(inner_state=None), state._replace(inner_state=None))
  return new_params, kept._replace(inner_state=inner_state)


def _mask_tree(mask, tree):
  return mask(tree) if callable(mask) else mask


def _masked(tree, mask_tree):
  return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask_tree, tree)


def _run_partition(fn, state, grads, params, ctx):
  env = _closure(fn)
  transforms, param_labels = env["transforms"], env["param_labels"]
  if params is None:
    raise Unserved("the kernel needs the parameters")
  labels = param_labels(grads) if callable(param_labels) else param_labels
  new_params, inner_states = params, {}
  for group, tx in transforms.items():
    mask_tree = jax.tree.map(lambda label, g=group: label == g, labels)
    masked_state = state.inner_states[group]
    if not isinstance(masked_state, optax.MaskedState):
      raise Unserved("a partition's state is not MaskedStates")
    group_params, inner = _run(
      tx.update, masked_state.inner_state, _masked(grads, mask_tree), _masked(params, mask_tree), ctx
    )
    new_params = jax.tree.map(lambda m, new, old: new if m else old, mask_tree, group_params, new_params)
    inner_states[group] = optax.MaskedState(inner_state=inner)
  return new_params, optax.PartitionState(inner_states)


class _Core(NamedTuple):
  """Adam's stages at the end of a chain, with their states' positions."""

  moments: int  # the item index of scale_by_moments
  hp: dict  # b1, b2, eps, eps_root, learning_rate; weight_decay and l2 (item index), or None
  mode: int
  clip: Any  # max_norm of a clip_by_global_norm just in front, or None
  start: int  # the first item of the core (clip included)


def _parse_core(items) -> _Core:
  kinds = [(_stage(f) or (None, {}))[0] for f, _ in items]

  def tag(i):
    return _stage(items[i][0])[1]

  def add_l2_at(i):
    """add_l2's hyperparameters and mask at item i (plain or in optax.masked), or None."""
    f, s = items[i]
    if kinds[i] == "add_l2":
      return tag(i), None
    if _is(f, "optax", "masked.<locals>.update_fn") and isinstance(s, optax.MaskedState):
      env = _closure(f)
      inner = _unwrap(env["inner"].update)
      if (_stage(inner) or (None,))[0] == "add_l2":
        return _stage(inner)[1], env["mask"]
    return None

  i = len(items) - 1
  hp, mode = {}, 0
  if i >= 0 and kinds[i] == "decoupled_decay":
    if tag(i)["convention"] != "torch":
      raise Unserved(f"decoupled_decay(convention={tag(i)['convention']!r}): the kernel has PyTorch's rounding")
    hp.update(decay_wd=tag(i)["weight_decay"], decay_lr=tag(i)["learning_rate"], decay=i)
    mode |= TORCH_DECAY
    i -= 1
  if i < 0 or kinds[i] != "scale_by_lr":
    raise Unserved("the transformation does not end in jadam.scale_by_lr (Adam's last stage)")
  hp.update(learning_rate=tag(i)["learning_rate"], lr=i)
  decay = add_l2_at(i - 1) if i >= 1 else None
  i -= 1
  if decay is not None:
    hp.update(weight_decay=decay[0]["weight_decay"], l2=i, mask=decay[1])
    mode |= DECOUPLED
    i -= 1
  if i < 0 or kinds[i] != "normalize":
    raise Unserved("no jadam.normalize before scale_by_lr: not Adam's stages")
  hp.update(eps=tag(i)["eps"], eps_root=tag(i)["eps_root"])
  i -= 1
  if i < 0 or kinds[i] != "bias_correct" or tag(i)["into_step"]:
    raise Unserved("no jadam.bias_correct() (into_step=False) before normalize")
  i -= 1
  if i >= 0 and kinds[i] == "max_nu":
    mode |= AMSGRAD
    hp["max_nu"] = i
    i -= 1
  if i < 0 or kinds[i] != "scale_by_moments" or tag(i)["b1"] is None:
    raise Unserved("no jadam.scale_by_moments (with b1) before bias_correct")
  moments = i
  hp.update(b1=tag(i)["b1"], b2=tag(i)["b2"], mu_dtype=tag(i)["mu_dtype"], nu_dtype=tag(i)["nu_dtype"])
  i -= 1
  if i >= 0 and add_l2_at(i) is not None:
    if mode & DECOUPLED or add_l2_at(i)[1] is not None:
      raise Unserved("both a coupled and a decoupled add_l2, or a masked coupled add_l2")
    hp.update(weight_decay=add_l2_at(i)[0]["weight_decay"], l2=i, mask=None)
    mode |= COUPLED
    i -= 1
  if i >= 0 and kinds[i] == "flip_sign":
    mode |= NEGATE
    i -= 1
  clip = None
  if i >= 0 and _is(items[i][0], "optax", "clip_by_global_norm.<locals>.update_fn"):
    clip = _closure(items[i][0])["max_norm"]
    mode |= CLIP
    i -= 1
  return _Core(moments=moments, hp=hp, mode=mode, clip=clip, start=i + 1)


def _check_states(items, core: _Core) -> None:
  want = {core.moments: _moments.ScaleByMomentsState, core.hp["lr"]: _scale.ScaleByLrState}
  if "max_nu" in core.hp:
    want[core.hp["max_nu"]] = _moments.MaxNuState
  for i, cls in want.items():
    if not isinstance(items[i][1], cls):
      raise Unserved(f"the state of {_stage(items[i][0])[0]} is {type(items[i][1]).__name__}, not {cls.__name__}")
  if "decay" in core.hp and not isinstance(items[core.hp["decay"]][1], _penalty.DecoupledDecayState):
    raise Unserved("decoupled_decay's state is not DecoupledDecayState")
  if "l2" in core.hp:
    s = items[core.hp["l2"]][1]
    s = s.inner_state if isinstance(s, optax.MaskedState) else s
    if not isinstance(s, _penalty.AddL2State):
      raise Unserved(f"add_l2's state is {type(s).__name__}")


def _run_chain(items, rebuild, grads, params, ctx):
  from jadam._kernels import sparse_step  # pylint: disable=g-import-not-at-top (it imports this module)

  if sparse_step.is_sparse_chain(items):  # jadam.sparse_adam's stages: the row-sparse kernel
    return sparse_step.run_chain(items, rebuild, grads, params, ctx)
  core = _parse_core(items)
  _check_states(items, core)
  if params is None:
    raise Unserved("the kernel needs the parameters (update(grads, state, params))")
  new_states = [s for _, s in items]
  g = grads
  for i in range(core.start):  # stages in front of Adam's: as they are
    f, s = items[i]
    g, new = f(g, s, params)
    new_states[i] = select(ctx, new, s)
  new_params, core_states = _run_core(items, core, g, params, ctx)
  new_states[core.start :] = core_states
  return new_params, rebuild(new_states)


def tracing_ok(x: Any) -> bool:
  """Concrete arrays and `jit`'s tracers only: under `grad`, `vmap` and the like, go generic."""
  if not isinstance(x, jax.core.Tracer):
    return isinstance(x, (jax.Array, np.ndarray))
  try:
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return type(x) is partial_eval.DynamicJaxprTracer


def _run_core(items, core: _Core, grads, params, ctx):
  states = [s for _, s in items]
  mstate = states[core.moments]
  ps, treedef = jax.tree.flatten(params)
  # 8-bit moments (jadam.Quantized for both, one block size): codes and scales; leaves below min_size keep float
  # moments in the codes' tree and take the float kernel
  block_size = _quantized_block_size(core, mstate)
  try:
    gs = treedef.flatten_up_to(grads)
    if block_size:
      ms, vs = treedef.flatten_up_to(mstate.mu.codes), treedef.flatten_up_to(mstate.nu.codes)
      mas, vas = treedef.flatten_up_to(mstate.mu.absmax), treedef.flatten_up_to(mstate.nu.absmax)
    else:
      ms, vs = treedef.flatten_up_to(mstate.mu), treedef.flatten_up_to(mstate.nu)
      mas = vas = [None] * len(ps)
    xs = treedef.flatten_up_to(states[core.hp["max_nu"]].nu_max) if core.mode & AMSGRAD else [None] * len(ps)
  except (ValueError, TypeError) as e:
    raise Unserved(f"the gradients or the moments are not shaped like the parameters ({e})") from None
  # bfloat16 moments, both stored with jadam._storage.bf16's stochastic rounding: the float32 kernel's bfloat16 variant
  bf16 = not block_size and all(_lowp.stochastic_store(core.hp[k]) for k in ("mu_dtype", "nu_dtype"))
  if bf16 and core.mode & AMSGRAD:
    raise Unserved("bfloat16 moments with amsgrad")
  eight = [False] * len(ps)  # which leaves have 8-bit moments
  for i, leaves in enumerate(zip(gs, ps, ms, vs, xs, mas, vas)):
    leaves = [x for x in leaves if x is not None]
    if not all(tracing_ok(x) for x in leaves):
      raise Unserved("under a transformation other than jit (grad, vmap, ...) or with a non-array leaf")
    shape, dtype = jnp.shape(leaves[1]), jnp.result_type(leaves[1])
    if block_size:
      eight[i] = _check_8bit_leaf(gs[i], ps[i], ms[i], vs[i], mas[i], vas[i], block_size)
      if eight[i]:
        continue
      leaves = leaves[:4]
    if dtype not in _DTYPES or (bf16 and dtype != jnp.float32):
      raise Unserved(
        f"a {dtype} parameter: the kernel serves float32 and float64 leaves (float32 with bfloat16 moments)"
      )
    want = [dtype, dtype, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)] if bf16 else [dtype] * len(leaves)
    if any(jnp.shape(x) != shape or jnp.result_type(x) != w for x, w in zip(leaves, want)):
      raise Unserved(
        f"a leaf whose gradient or moments differ from the parameter's {dtype}{list(shape)} (moment dtypes"
        " other than the parameters' or bfloat16 for both)"
      )
  if not ctx.require and len(ps) > _MANY_LEAVES and sum(int(np.prod(jnp.shape(p))) for p in ps) < _SMALL_LEAF * len(ps):
    raise Unserved(f"{len(ps)} small leaves: the generic path is faster there")

  # the masks of a masked decoupled add_l2: leaves outside it take the kernel without decay
  decayed = [True] * len(ps)
  if core.hp.get("mask") is not None:
    mask_tree = _mask_tree(core.hp["mask"], grads)
    flat = []
    for m, sub in zip(jax.tree.leaves(mask_tree), jax.tree.structure(mask_tree).flatten_up_to(params)):
      flat += [bool(m)] * len(jax.tree.leaves(sub))
    decayed = flat
    if len(decayed) != len(ps):
      raise Unserved("the decay mask does not match the parameters")

  counts = _counts(core, states)
  new_p, new_m, new_v, new_x = list(ps), list(ms), list(vs), list(xs)
  new_ma, new_va = list(mas), list(vas)
  g_norm = optax.tree.norm(grads) if core.mode & CLIP else None
  for dtype in _DTYPES:
    for with_decay in (True, False):
      for q in (False, True):  # one call per format: float moments, then 8-bit ones
        idx = [
          i
          for i, p in enumerate(ps)
          if jnp.result_type(p) == dtype and decayed[i] == with_decay and eight[i] == q and np.prod(jnp.shape(p))
        ]
        if not idx:
          continue
        mode = core.mode if with_decay else core.mode & ~DECOUPLED
        scalars = _scalars(core, counts, dtype, ctx, g_norm, mode)
        if not tracing_ok(scalars):
          raise Unserved("a hyperparameter under grad or vmap")
        bs = block_size if q else 0
        k = _per_leaf(mode, bs)
        for start in range(0, len(idx), _LEAVES_PER_CALL):
          chunk = idx[start : start + _LEAVES_PER_CALL]
          args = [scalars, jnp.asarray(counts["moments"]).astype(jnp.uint32)]
          for i in chunk:
            if q:
              args += [gs[i], ps[i], ms[i], mas[i], vs[i], vas[i]]
            else:
              args += [gs[i], ps[i], ms[i], vs[i]] + ([xs[i]] if mode & AMSGRAD else [])
          out = adam_step_p.bind(*args, mode=mode, streams=tuple(chunk) if bf16 else (), block_size=bs)
          for j, i in enumerate(chunk):
            res = out[(k - 1) * j : (k - 1) * (j + 1)]
            if q:
              new_p[i], new_m[i], new_ma[i], new_v[i], new_va[i] = res
              continue
            new_p[i], new_m[i], new_v[i] = res[:3]
            if mode & AMSGRAD:
              new_x[i] = res[3]

  unflat = functools.partial(jax.tree.unflatten, treedef)
  out = list(states)
  sel = lambda new, old: select(ctx, new, old)
  if block_size:
    mu = _quantize.QuantizedMoment(codes=unflat(new_m), absmax=unflat(new_ma))
    nu = _quantize.QuantizedMoment(codes=unflat(new_v), absmax=unflat(new_va))
  else:
    mu, nu = unflat(new_m), unflat(new_v)
  out[core.moments] = mstate._replace(count=sel(counts["new"], mstate.count), mu=mu, nu=nu)
  if core.mode & AMSGRAD:
    out[core.hp["max_nu"]] = _moments.MaxNuState(nu_max=unflat(new_x))
  lr_i = core.hp["lr"]
  out[lr_i] = states[lr_i]._replace(count=sel(optax.safe_increment(states[lr_i].count), states[lr_i].count))
  if "l2" in core.hp:
    l2_i = core.hp["l2"]
    s = states[l2_i]
    inner = s.inner_state if isinstance(s, optax.MaskedState) else s
    inner = inner._replace(count=sel(optax.safe_increment(inner.count), inner.count))
    out[l2_i] = optax.MaskedState(inner_state=inner) if isinstance(s, optax.MaskedState) else inner
  if "decay" in core.hp:
    d = states[core.hp["decay"]]
    out[core.hp["decay"]] = d._replace(count=sel(optax.safe_increment(d.count), d.count))
  return unflat(new_p), out[core.start :]


def _quantized_block_size(core: _Core, mstate) -> int:
  """The block size of 8-bit moments (both jadam.Quantized, one block size), 0 for dtypes; else Unserved."""
  mu_dtype, nu_dtype = core.hp["mu_dtype"], core.hp["nu_dtype"]
  quantized = [isinstance(d, _quantize.Quantized) for d in (mu_dtype, nu_dtype)]
  if not any(quantized):
    if not all(d is None or isinstance(d, (str, type, np.dtype)) for d in (mu_dtype, nu_dtype)):
      raise Unserved(f"moments stored in a format other than a dtype ({mu_dtype}, {nu_dtype})")
    return 0
  if not all(quantized) or mu_dtype.block_size != nu_dtype.block_size:
    raise Unserved("8-bit moments for one moment only, or with two block sizes")
  if core.mode & AMSGRAD:
    raise Unserved("8-bit moments with amsgrad")
  if not all(isinstance(x, _quantize.QuantizedMoment) for x in (mstate.mu, mstate.nu)):
    raise Unserved("8-bit moments whose state is not a QuantizedMoment (call init first)")
  return mu_dtype.block_size


def _check_8bit_leaf(g, p, mc, vc, ma, va, block_size: int) -> bool:
  """Whether a leaf has 8-bit moments the kernel serves (False: float moments, checked as jadam.adam's)."""
  codes = [jnp.result_type(c) == jnp.uint8 for c in (mc, vc)]
  if not any(codes):
    return False
  shape, dtype = jnp.shape(p), jnp.result_type(p)
  if not all(codes):
    raise Unserved(f"a {dtype}{list(shape)} leaf with one moment in 8 bits and the other not")
  if dtype != jnp.float32 or jnp.result_type(g) != jnp.float32:
    raise Unserved(f"a {dtype} parameter with 8-bit moments: the kernel serves float32 ones")
  want = _quantize.absmax_shape(shape, block_size)
  if any(jnp.shape(x) != shape for x in (g, mc, vc)) or any(
    jnp.shape(a) != want or jnp.result_type(a) != jnp.float32 for a in (ma, va)
  ):
    raise Unserved(f"8-bit moments not shaped as a {list(shape)} parameter's (block size {block_size})")
  return True


def _counts(core: _Core, states) -> dict:
  count = states[core.moments].count
  out = {"moments": count, "new": optax.safe_increment(count), "lr": states[core.hp["lr"]].count}
  if "l2" in core.hp:
    s = states[core.hp["l2"]]
    out["l2"] = (s.inner_state if isinstance(s, optax.MaskedState) else s).count
  if "decay" in core.hp:
    out["decay"] = states[core.hp["decay"]].count
  return out


def _scalars(core: _Core, counts: dict, dtype, ctx: _Ctx, g_norm, mode: int):
  """The kernel's scalars in `dtype`, formed as the generic stages form them."""
  hp = core.hp
  count, new_count = counts["moments"], counts["new"]
  beta1, beta2 = hp["b1"](count), hp["b2"](count)  # scale_by_moments
  c1 = _common.one_minus_power(beta1, new_count)  # bias_correct
  c2 = _common.one_minus_power(beta2, new_count)
  step = new_count - 1  # normalize
  e, e_root = hp["eps"](step), hp["eps_root"](step)
  lr = hp["learning_rate"](counts["lr"])  # scale_by_lr
  wd = hp["weight_decay"](counts["l2"]) if "l2" in hp else 0.0  # add_l2
  cast = lambda x: _hparams.cast_hyperparameter(x, dtype)
  d1, d2 = cast(beta1), cast(beta2)
  norm, max_norm, clip_on = 1.0, 1.0, 0.0
  if mode & CLIP:  # optax.clip_by_global_norm: select(norm < max_norm, g, (g / norm) * max_norm)
    norm, max_norm = g_norm.astype(dtype), core.clip
    clip_on = jnp.logical_not(jnp.squeeze(g_norm < core.clip))
  apply = 1.0 if ctx.apply is None else ctx.apply
  factor = 1.0
  if mode & TORCH_DECAY:  # decoupled_decay(convention="torch"), as it forms its factor
    dlr, dwd = hp["decay_lr"](counts["decay"]), hp["decay_wd"](counts["decay"])
    if isinstance(dlr, numbers.Number) and isinstance(dwd, numbers.Number):
      factor = 1.0 - dlr * dwd  # in double, as PyTorch
    else:
      fd = _common.float_dtype()
      factor = 1.0 - _hparams.cast_hyperparameter(dlr, fd) * _hparams.cast_hyperparameter(dwd, fd)
    factor = jnp.asarray(factor).astype(dtype)
  values = [1 - d1, d1, 1 - d2, d2, c1, c2, cast(e_root), cast(e), -cast(lr), cast(wd), norm, max_norm, clip_on, apply]
  values += [factor, -1.0 if mode & NEGATE else 1.0]
  return jnp.stack([jnp.asarray(x).astype(dtype) for x in values])


def _in_mesh_context() -> bool:
  """Inside `shard_map` or a mesh context, the per-device program is not ours to replace."""
  try:
    return not jax.sharding.get_abstract_mesh().empty
  except Exception:  # noqa: BLE001 - an unknown jax: be safe
    return True


def step(
  tx: optax.GradientTransformation, grads: Any, state: Any, params: Any, *, multi_device_ok: bool, require: bool
) -> tuple[Any, Any]:
  """The fused step ``(new_params, new_state)``; raises :class:`Unserved` where the generic path must run.

  `multi_device_ok` is set by callers that have checked the inputs live on one
  device (a custom call is not partitioned by GSPMD: it would gather them).
  `require` (``fused=True``) also serves trees of many small leaves.
  """
  if jax.default_backend() != "cpu":
    raise Unserved(f"the default backend is {jax.default_backend()}; the kernel runs on the CPU")
  if _in_mesh_context():
    raise Unserved("inside shard_map or a mesh context")
  if not multi_device_ok and not _one_device(jax.tree.leaves((grads, state, params))):
    raise Unserved("several devices: a custom call is not partitioned (pass fused=True if the inputs live on one)")
  if not _build.load():
    raise Unserved(f"the kernel is unavailable: {_build.error()}")
  return _run(tx.update, state, grads, params, _Ctx(apply=None, require=require))


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
