"""The fused Adam step: Adam's stages, as the planner found them, run as one pass over memory.

XLA:CPU has no multi-output fusion, so the generic step makes three passes
(new m, new v, new parameters: 40 bytes a float32 parameter, where 28 would
do). Here one primitive, `adam_step_p`, updates every leaf in place, reading
g, p, m, v once and writing p, m, v once. It computes exactly what the generic
path does, operation for operation, with the scalars (learning rate, decays,
bias corrections, eps, the clip factor) formed in JAX as the stages form them,
so schedules and traced hyperparameters work unchanged.

**Planned, never guessed.** `jadam._kernels.plan` reads the stages' registry
records (every argument of each) and optax's combinators through
`jadam._kernels.optax_compat`, and hands this module a :class:`Core` only for
what the kernel computes exactly; anything else runs as its stages. Served:

- a chain ending in Adam's stages: ``[flip_sign] [add_l2] scale_by_moments
  [max_nu] bias_correct normalize [add_l2 (masked or not)] scale_by_lr
  [decoupled_decay]``; any stages in front run as they are,
  `clip_by_global_norm` directly in front becomes a kernel scalar (one
  reduction pass for the norm);
- inside `apply_if_finite` (its check, `all(isfinite(g))`, one parallel pass of
  `finite_cpu.cc`; a rejected step leaves p, m and v as they are),
  `inject_hyperparams`, `partition` (one kernel call per group's leaves);
- moments in the parameters' dtype, in bfloat16 (stochastic rounding), or in
  8 bits (`jadam.Quantized` for both, without AMSGrad: one pass per block
  dequantizes, updates and requantizes; leaves below `min_size` keep float
  moments and take the float kernel in the same step).

The scalars' layout and the mode bits come from `jadam._kernels.abi`, the one
table shared with the C++.

**Exportable.** `adam_step_p` lowers only to the C++ custom call, for this
CPU. The planner binds it inside `jadam._kernels.dispatch`'s primitive, whose
other lowerings (`jax.export`, other platforms), batching rule and derivative
run the stages themselves, so an exported module holds no jadam custom call and
a GPU or TPU lowering is the stages' XLA.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.interpreters import mlir

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._kernels import abi as _abi
from jadam._kernels import build as _build
from jadam._kernels.base import Ctx, Unserved, check_lowering, flatten_up_to, for_export, select, tracing_ok
from jadam._stages import moments as _moments
from jadam._storage import bf16 as _lowp
from jadam._storage import quantize as _quantize

# The kernel's scalar layout and mode bits, from the one ABI table (checked against adam_cpu.cc by
# tests/kernels/test_abi.py).
_N_SCALARS = _abi.N_SCALARS
_OMB1, _B1, _OMB2, _B2, _C1, _C2, _EPS_ROOT, _EPS, _NEG_LR, _WD = (
  _abi.S[k] for k in ("OMB1", "B1", "OMB2", "B2", "C1", "C2", "EPS_ROOT", "EPS", "NEG_LR", "WD")
)
_CLIP_NORM, _CLIP_MAX, _CLIP_ON, _APPLY, _FACTOR, _SIGN = (
  _abi.S[k] for k in ("CLIP_NORM", "CLIP_MAX", "CLIP_ON", "APPLY", "FACTOR", "SIGN")
)
COUPLED, DECOUPLED, NEGATE, CLIP, AMSGRAD, TORCH_DECAY = (
  _abi.MODE[k] for k in ("COUPLED", "DECOUPLED", "NEGATE", "CLIP", "AMSGRAD", "TORCH_DECAY")
)
# Leaves per custom call, so that any tree takes the kernel with a program that grows by one call per chunk:
# XLA's passes are quadratic in one call's operands (500 leaves in one call: 23 s to compile, in calls of 32:
# 1.8 s; the generic path's program, one fusion per leaf and stage, takes a minute). 32 leaves of 10K elements
# still fill a call past the kernel's threshold for running on every thread.
_LEAVES_PER_CALL = 32
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


# --- the primitive -------------------------------------------------------------
# adam_step_p.bind(scalars, count, *leaves, mode, streams, block_size): `leaves` are g, p, m, v (and AMSGrad's
# maximum) per leaf; `count` (uint32) is the step count for the stochastic rounding of bfloat16 moments, whose
# leaves' positions `streams` lists (empty where the moments have the parameters' dtype). With `block_size` > 0
# the moments are 8-bit (jadam.Quantized): the leaves are g, p, m codes, m absmax, v codes, v absmax.
def _per_leaf(mode: int, block_size: int = 0) -> int:
  if block_size:
    return 6
  return 5 if mode & AMSGRAD else 4


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


def _cpu_lowering(ctx, *args, mode, streams, block_size):
  check_lowering(ctx, adam_step_p)
  fun = functools.partial(_kernel_impl, mode=mode, streams=streams, block_size=block_size)
  return mlir.lower_fun(fun, multiple_results=True)(ctx, *args)


mlir.register_lowering(adam_step_p, _cpu_lowering, platform="cpu")


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


def _mask_tree(mask, tree):
  return mask(tree) if callable(mask) else mask


class Core(NamedTuple):
  """Adam's stages at the end of a chain, with their states' positions."""

  moments: int  # the item index of scale_by_moments
  hp: dict  # b1, b2, eps, eps_root, learning_rate; weight_decay and l2 (item index), or None
  mode: int
  clip: Any  # max_norm of a clip_by_global_norm just in front, or None
  start: int  # the first item of the core (clip included)


def run_chain(items, rebuild, core: Core, grads, params, ctx: Ctx):
  """``(new_params, new_state)`` of a flattened chain that `jadam._kernels.plan` found to end in Adam's stages."""
  new_states = [s for _, s in items]
  g = grads
  for i in range(core.start):  # stages in front of Adam's: as they are
    f, s = items[i]
    g, new = f(g, s, params)
    new_states[i] = select(ctx, new, s)
  new_params, core_states = _run_core(items, core, g, params, ctx)
  new_states[core.start :] = core_states
  return new_params, rebuild(new_states)


class _Leaves(NamedTuple):
  """The flat leaves of one step, by role (lists as long as the parameters'; None where a role is absent)."""

  g: list
  p: list
  m: list  # the first moment (8-bit: its codes)
  v: list  # the second moment (8-bit: its codes)
  x: list  # AMSGrad's maximum
  ma: list  # 8-bit: the first moment's scales
  va: list  # 8-bit: the second moment's scales


def _gather(core: Core, states, grads, params, block_size: int) -> tuple[_Leaves, Any]:
  """The step's leaves, flattened as the parameters, and the parameters' treedef; else Unserved."""
  mstate = states[core.moments]
  ps, treedef = jax.tree.flatten(params)
  none = [None] * len(ps)
  try:
    flat = functools.partial(flatten_up_to, treedef)
    if block_size:  # 8-bit moments: codes and scales; leaves below min_size keep float moments in the codes' tree
      ms, vs, mas, vas = (flat(x) for x in (mstate.mu.codes, mstate.nu.codes, mstate.mu.absmax, mstate.nu.absmax))
    else:
      ms, vs, mas, vas = flat(mstate.mu), flat(mstate.nu), none, none
    xs = flat(states[core.hp["max_nu"]].nu_max) if core.mode & AMSGRAD else none
    gs = flat(grads)
  except (ValueError, TypeError) as e:
    raise Unserved(f"the gradients or the moments are not shaped like the parameters ({e})") from None
  return _Leaves(gs, ps, ms, vs, xs, mas, vas), treedef


def _check_leaf(leaves: list, bf16: bool) -> None:
  """A leaf with float moments: g, p, m, v (and AMSGrad's maximum) as the kernel takes them, else Unserved."""
  shape, dtype = jnp.shape(leaves[1]), jnp.result_type(leaves[1])
  if dtype not in _DTYPES or (bf16 and dtype != jnp.float32):
    raise Unserved(f"a {dtype} parameter: the kernel serves float32 and float64 leaves (float32 with bfloat16 moments)")
  want = [dtype, dtype, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)] if bf16 else [dtype] * len(leaves)
  if any(jnp.shape(x) != shape or jnp.result_type(x) != w for x, w in zip(leaves, want, strict=True)):
    raise Unserved(
      f"a leaf whose gradient or moments differ from the parameter's {dtype}{list(shape)} (moment dtypes"
      " other than the parameters' or bfloat16 for both)"
    )


def _check_leaves(lv: _Leaves, block_size: int, bf16: bool) -> list[bool]:
  """Which leaves have 8-bit moments; Unserved where a leaf is not one the kernel serves."""
  eight = [False] * len(lv.p)
  for i, leaves in enumerate(zip(*lv, strict=True)):
    present = [x for x in leaves if x is not None]
    if not all(tracing_ok(x) for x in present):
      raise Unserved("under a transformation other than jit (grad, vmap, ...) or with a non-array leaf")
    if block_size:
      eight[i] = _check_8bit_leaf(lv.g[i], lv.p[i], lv.m[i], lv.v[i], lv.ma[i], lv.va[i], block_size)
      if eight[i]:
        continue
      present = present[:4]
    _check_leaf(present, bf16)
  return eight


def _decayed(core: Core, grads, params, n: int) -> list[bool]:
  """The leaves a masked decoupled add_l2 decays (the others take the kernel without decay)."""
  if core.hp.get("mask") is None:
    return [True] * n
  mask_tree = _mask_tree(core.hp["mask"], grads)
  flat = []
  for m, sub in zip(jax.tree.leaves(mask_tree), flatten_up_to(jax.tree.structure(mask_tree), params), strict=True):
    flat += [bool(m)] * len(jax.tree.leaves(sub))
  if len(flat) != n:
    raise Unserved("the decay mask does not match the parameters")
  return flat


def _run_core(items, core: Core, grads, params, ctx):
  states = [s for _, s in items]
  block_size = _quantized_block_size(core, states[core.moments])
  lv, treedef = _gather(core, states, grads, params, block_size)
  # bfloat16 moments, both stored with jadam._storage.bf16's stochastic rounding: the float32 kernel's bfloat16 variant
  bf16 = not block_size and all(_lowp.stochastic_store(core.hp[k]) for k in ("mu_dtype", "nu_dtype"))
  if bf16 and core.mode & AMSGRAD:
    raise Unserved("bfloat16 moments with amsgrad")
  eight = _check_leaves(lv, block_size, bf16)
  n = len(lv.p)
  decayed = _decayed(core, grads, params, n)
  counts = _counts(core, states)
  new = _Leaves(*(list(x) for x in lv))
  g_norm = optax.tree.norm(grads) if core.mode & CLIP else None
  for dtype in _DTYPES:
    for with_decay in (True, False):
      for q in (False, True):  # one call per format: float moments, then 8-bit ones
        idx = [
          i
          for i, p in enumerate(lv.p)
          if jnp.result_type(p) == dtype and decayed[i] == with_decay and eight[i] == q and np.prod(jnp.shape(p))
        ]
        if idx:
          mode = core.mode if with_decay else core.mode & ~DECOUPLED
          scalars = _scalars(core, counts, dtype, ctx, g_norm, mode)
          if not tracing_ok(scalars):
            raise Unserved("a hyperparameter under grad or vmap")
          _call(lv, new, idx, scalars, counts, mode, block_size if q else 0, bf16)
  return jax.tree.unflatten(treedef, new.p), _new_states(core, states, new, treedef, counts, block_size, ctx)


def _call(lv: _Leaves, new: _Leaves, idx: list[int], scalars, counts: dict, mode: int, bs: int, bf16: bool) -> None:
  """The kernel over the leaves `idx` (one format, dtype and mode), in calls of _LEAVES_PER_CALL; fills `new`."""
  k = _per_leaf(mode, bs)
  roles = ("g", "p", "m", "ma", "v", "va") if bs else ("g", "p", "m", "v") + (("x",) if mode & AMSGRAD else ())
  outs = roles[1:]  # the kernel returns every role but the gradient, in order
  for start in range(0, len(idx), _LEAVES_PER_CALL):
    chunk = idx[start : start + _LEAVES_PER_CALL]
    args = [scalars, jnp.asarray(counts["moments"]).astype(jnp.uint32)]
    args += [getattr(lv, r)[i] for i in chunk for r in roles]
    out = adam_step_p.bind(*args, mode=mode, streams=tuple(chunk) if bf16 else (), block_size=bs)
    for j, i in enumerate(chunk):
      for r, value in zip(outs, out[(k - 1) * j : (k - 1) * (j + 1)], strict=True):
        getattr(new, r)[i] = value


def _counted(state, ctx: Ctx):
  """A stage's state with its count incremented (kept where the step is rejected)."""
  return state._replace(count=select(ctx, optax.safe_increment(state.count), state.count))


def _new_states(core: Core, states, new: _Leaves, treedef, counts: dict, block_size: int, ctx: Ctx) -> list:
  """The kernel's stages' new states, from the moments' new leaves and the counts."""
  unflat = functools.partial(jax.tree.unflatten, treedef)
  out = list(states)
  if block_size:
    mu = _quantize.QuantizedMoment(codes=unflat(new.m), absmax=unflat(new.ma))
    nu = _quantize.QuantizedMoment(codes=unflat(new.v), absmax=unflat(new.va))
  else:
    mu, nu = unflat(new.m), unflat(new.v)
  mstate = states[core.moments]
  out[core.moments] = mstate._replace(count=select(ctx, counts["new"], mstate.count), mu=mu, nu=nu)
  if core.mode & AMSGRAD:
    out[core.hp["max_nu"]] = _moments.MaxNuState(nu_max=unflat(new.x))
  out[core.hp["lr"]] = _counted(states[core.hp["lr"]], ctx)
  if "l2" in core.hp:
    s = states[core.hp["l2"]]
    masked = isinstance(s, optax.MaskedState)
    inner = _counted(s.inner_state if masked else s, ctx)
    out[core.hp["l2"]] = optax.MaskedState(inner_state=inner) if masked else inner
  if "decay" in core.hp:
    out[core.hp["decay"]] = _counted(states[core.hp["decay"]], ctx)
  return out[core.start :]


def _quantized_block_size(core: Core, mstate) -> int:
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


def _counts(core: Core, states) -> dict:
  count = states[core.moments].count
  out = {"moments": count, "new": optax.safe_increment(count), "lr": states[core.hp["lr"]].count}
  if "l2" in core.hp:
    s = states[core.hp["l2"]]
    out["l2"] = (s.inner_state if isinstance(s, optax.MaskedState) else s).count
  if "decay" in core.hp:
    out["decay"] = states[core.hp["decay"]].count
  return out


def _scalars(core: Core, counts: dict, dtype, ctx: Ctx, g_norm, mode: int):
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

  def cast(x: Any) -> Any:
    return _hparams.cast_hyperparameter(x, dtype)

  d1, d2 = cast(beta1), cast(beta2)
  norm: Any = 1.0
  max_norm: Any = 1.0
  clip_on: Any = 0.0
  if mode & CLIP:  # optax.clip_by_global_norm: select(norm < max_norm, g, (g / norm) * max_norm)
    norm, max_norm = g_norm.astype(dtype), core.clip
    clip_on = jnp.logical_not(jnp.squeeze(g_norm < core.clip))
  apply = 1.0 if ctx.apply is None else ctx.apply
  factor: Any = 1.0
  if mode & TORCH_DECAY:  # decoupled_decay(convention="torch"), as it forms its factor
    dlr, dwd = hp["decay_lr"](counts["decay"]), hp["decay_wd"](counts["decay"])
    if isinstance(dlr, numbers.Real) and isinstance(dwd, numbers.Real):
      factor = 1.0 - float(dlr) * float(dwd)  # in double, as PyTorch
    else:
      fd = _common.float_dtype()
      factor = 1.0 - _hparams.cast_hyperparameter(dlr, fd) * _hparams.cast_hyperparameter(dwd, fd)
    factor = jnp.asarray(factor).astype(dtype)
  values = dict(OMB1=1 - d1, B1=d1, OMB2=1 - d2, B2=d2, C1=c1, C2=c2, EPS_ROOT=cast(e_root), EPS=cast(e))
  values.update(NEG_LR=-cast(lr), WD=cast(wd), CLIP_NORM=norm, CLIP_MAX=max_norm, CLIP_ON=clip_on, APPLY=apply)
  values.update(FACTOR=factor, SIGN=-1.0 if mode & NEGATE else 1.0)
  return jnp.stack([jnp.asarray(values[name]).astype(dtype) for _, name in _abi.SCALARS])
