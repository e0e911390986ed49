"""The fused SparseAdam step: `jadam.sparse_adam`'s stages found by structure, one kernel call per table.

The generic row-sparse step (`jadam._stages.sparse`) is a dozen small XLA operations
per table: a sort of the ids and a binary search to coalesce them, a
scatter-add of the values, gathers of the touched rows of m, v and the table,
the arithmetic, and three scatters back. Each is a loop over a (k, d) block
with its own dispatch; together they take longer than PyTorch's SparseAdam.
Here one primitive, `sparse_adam_step_p`, does a table's whole step in place
(the C++ handler in `sparse_adam_cpu.cc`): it groups the ids by row, sums the
duplicates and updates each touched row of the table, m and v once. Its
results are the generic path's run op by op, bit for bit (the same operations
in the same order, each rounded); a jitted generic step is within an ulp or
two, XLA's CPU backend contracting some a * b + c into fused multiply-adds. The
scalars (1 - b1, 1 - b2, the folded bias correction, eps, -lr) are formed in
JAX as the stages form them, so schedules, `inject_hyperparams` and traced
hyperparameters work unchanged.

**Planned.** `jadam._kernels.plan` hands :func:`run_chain` a chain whose last
stages its registry records say are ``[flip_sign] scale_by_sparse_moments
rowwise(bias_correct(into_step=True)) rowwise(normalize) scale_by_lr``
(`jadam.sparse_adam`), with every argument one the kernel implements; any
stages in front run as they are. Anything else runs as its stages.

**Exportable.** As for the dense kernel, the primitive lowers only to the
custom call, for this CPU; the planner binds it inside
`jadam._kernels.dispatch`'s primitive, which lowers the stages (the generic
path's gathers and scatters) for `jax.export` and other platforms, so an
exported module holds no jadam custom call.
"""

from __future__ import annotations

import functools
from typing import Any

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
from jadam._kernels.base import Unserved, check_lowering, flatten_up_to, select, tracing_ok
from jadam._stages import sparse as _sparse

# The kernel's scalar layout, from the one ABI table (checked against sparse_adam_cpu.cc by tests/kernels/test_abi.py).
_OMB1, _OMB2, _SCALE, _EPS_ROOT, _EPS, _NEG_LR, _SIGN, _APPLY = (
  _abi.SPARSE[k] for k in ("OMB1", "OMB2", "SCALE", "EPS_ROOT", "EPS", "NEG_LR", "SIGN", "APPLY")
)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
_STAGE = "jadam.scale_by_sparse_moments"


# --- the primitive -------------------------------------------------------------
# sparse_adam_step_p.bind(scalars, ids, data, p, m, v, unique) -> (p, m, v): one table's step; `ids` are the
# gradient's row ids as int32 (outside [0, V): padding), `data` its (k, ...) values, `unique` its flag.
def _kernel_impl(scalars, ids, data, p, m, v, *, unique: bool):
  target = _build.SPARSE_TARGETS[jnp.dtype(p.dtype).name]
  out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (p, m, v)]
  call = jax.ffi.ffi_call(target, out_types, input_output_aliases={3: 0, 4: 1, 5: 2}, vmap_method="sequential")
  return call(scalars, ids, data, p, m, v, unique=np.int32(unique))


sparse_adam_step_p = jex_core.Primitive("jadam_sparse_adam_step")
sparse_adam_step_p.multiple_results = True


@sparse_adam_step_p.def_abstract_eval
def _abstract_eval(scalars, ids, data, p, m, v, *, unique):
  del scalars, ids, data, unique
  return [jax.core.ShapedArray(x.shape, x.dtype) for x in (p, m, v)]


@sparse_adam_step_p.def_impl
def _impl(*args, unique):
  return jax.jit(functools.partial(sparse_adam_step_p.bind, unique=unique))(*args)


def _cpu_lowering(ctx, *args, unique):
  check_lowering(ctx, sparse_adam_step_p)
  return mlir.lower_fun(functools.partial(_kernel_impl, unique=unique), multiple_results=True)(ctx, *args)


mlir.register_lowering(sparse_adam_step_p, _cpu_lowering, platform="cpu")


def run_chain(items, rebuild, core: dict, grads, params, ctx) -> tuple[Any, Any]:
  """``(new_params, new_state)`` of a sparse_adam chain (`jadam._kernels.plan.parse_sparse`), one kernel call per
  table, or raises Unserved."""
  new_states = [s for _, s in items]
  g = grads
  for i in range(core["start"]):  # stages in front of sparse_adam's: as they are
    f, s = items[i]
    g, new = f(g, s, params)
    new_states[i] = select(ctx, new, s)
  new_params, new_states[core["moments"]], new_states[core["lr"]] = _run_core(
    core, g, new_states[core["moments"]], new_states[core["lr"]], params, ctx
  )
  return new_params, rebuild(new_states)


def _run_core(core: dict, grads, mstate, lr_state, params, ctx):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_common.is_update_leaf)
  try:
    ps = flatten_up_to(treedef, params)
    counts, mus, nus = (flatten_up_to(treedef, x) for x in (mstate.count, mstate.mu, mstate.nu))
  except (ValueError, TypeError) as e:
    raise Unserved(f"the gradients, the state and the parameters are different trees ({e})") from None
  sel = functools.partial(select, ctx)
  lr = core["learning_rate"](lr_state.count)
  new_p, new_counts, new_m, new_v = list(ps), list(counts), list(mus), list(nus)
  for j, ((path, g), p, t, m, v) in enumerate(zip(leaves, ps, counts, mus, nus, strict=True)):
    if g is None or not _common.is_float_leaf(m):
      continue  # left as it is, as scale_by_sparse_moments leaves it
    _sparse.check_gradient(_STAGE, jax.tree_util.keystr(path) or "the root", g, m)  # the generic path's errors
    arrays = (g.data, g.indices, p, m, v)
    if not all(tracing_ok(x) for x in arrays):
      raise Unserved("under a transformation other than jit (grad, vmap, ...) or with a non-array leaf")
    dtype = jnp.result_type(p)
    if dtype not in _DTYPES or any(jnp.result_type(x) != dtype for x in (g.data, m, v)) or jnp.shape(p) != g.shape:
      raise Unserved(
        f"a {dtype}{list(jnp.shape(p))} table with {jnp.result_type(g.data)} values and {jnp.result_type(m)}"
        " moments: the kernel serves float32 and float64 tables whose values and moments have their dtype"
      )
    scalars = _scalars(core, t, lr, dtype, ctx)
    if not tracing_ok(scalars):
      raise Unserved("a hyperparameter under grad or vmap")
    if g.data.shape[0]:  # an empty gradient changes nothing but the count
      ids = _sparse.row_ids(g.indices[:, 0], g.shape[0])  # as _sparse.coalesce reads them: padding before int32
      new_p[j], new_m[j], new_v[j] = sparse_adam_step_p.bind(
        scalars, ids, g.data, p, m, v, unique=bool(g.unique_indices)
      )
    new_counts[j] = sel(optax.safe_increment(t), t)
  unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
  new_mstate = _sparse.ScaleBySparseMomentsState(count=unflat(new_counts), mu=unflat(new_m), nu=unflat(new_v))
  new_lr_state = lr_state._replace(count=sel(optax.safe_increment(lr_state.count), lr_state.count))
  return unflat(new_p), new_mstate, new_lr_state


def _scalars(core: dict, count, lr, dtype, ctx):
  """The kernel's scalars for one table in `dtype`, formed as the generic stages form them."""
  beta1, beta2 = core["b1"](count), core["b2"](count)  # scale_by_sparse_moments, at the table's own count
  cast = functools.partial(_hparams.cast_hyperparameter, dtype=dtype)
  new_count = optax.safe_increment(count)
  c1 = _common.one_minus_power(beta1, new_count)  # bias_correct(into_step=True)
  c2 = _common.one_minus_power(beta2, new_count)
  scale = jnp.sqrt(c2) / c1
  step = new_count - 1  # normalize
  e, e_root = core["eps"](step), core["eps_root"](step)
  apply = 1.0 if ctx.apply is None else ctx.apply
  values = dict(OMB1=1 - cast(beta1), OMB2=1 - cast(beta2), SCALE=scale, EPS_ROOT=cast(e_root), EPS=cast(e))
  values.update(NEG_LR=-cast(lr), SIGN=-1.0 if core["negate"] else 1.0, APPLY=apply)
  return jnp.stack([jnp.asarray(values[name]).astype(dtype) for _, name in _abi.SPARSE_SCALARS])
