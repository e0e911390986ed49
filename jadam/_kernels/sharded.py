r"""The fused step on sharded inputs: the kernel on each device's shard, no gather.

A custom call is not partitioned by XLA: given sharded operands, GSPMD gathers
them onto every device and runs the call on the whole arrays. Adam's update is
elementwise, though: for a parameter sharded like its gradient and moments,

.. math::
    \theta_t[S] = \operatorname{step}(g_t[S], \theta_{t-1}[S], m_{t-1}[S], v_{t-1}[S])

for every shard :math:`S`, with the scalars (learning rate, bias corrections,
clip factor) the same on every device. So the planner's step is traced as it
is, in the global view, and then evaluated with each kernel call
(`jadam._kernels.fused.adam_step_p`) run under `jax.shard_map` over the
inputs' mesh, in/out specs from their `PartitionSpec`\ s; everything else
(stages in front, the schedules, `clip_by_global_norm`'s norm: one scalar
all-reduce) stays in the global view, partitioned by XLA as before.

Per leaf, the layout decides:

- FSDP (g, :math:`\theta`, m, v sharded alike, any axis) and data parallel
  (all replicated): local, no collective.
- ZeRO-1 (moments sharded, :math:`\theta` replicated): the step runs on the
  moments' shards (slicing the replicated :math:`\theta` and g is local) and
  the new :math:`\theta` is gathered back to its replicated layout, the one
  all-gather ZeRO-1 is made of.
- bfloat16 moments on a sharded leaf (their stochastic rounding hashes each
  value's index in the whole leaf), 8-bit moments whose blocks straddle
  shards, shards of uneven size: the kernel does not serve the step, which
  runs as its stages in the global view (`jadam._kernels.dispatch`), partitioned
  by XLA without gathering; with ``fused=True`` the step refuses, naming why.

`optax.apply_if_finite`'s check becomes XLA's reduction (a boolean all-reduce),
row-sparse tables take the generic path. Inside `shard_map` the arrays are
already local and the kernel is not ours to place; inside a user's `jit` on a
mesh of `AxisType.Auto` axes the inputs' layout is only decided when XLA
partitions the program, so the step cannot be planned per shard there: the step
helpers (:func:`jadam.make_update_step`, :func:`jadam.make_train_step`) read
the layout from their concrete arguments and pass it in, and under
`AxisType.Explicit` it is in the tracers' types.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jadam._kernels import fused as _fused
from jadam._kernels.base import Unserved, single_device

_UNKNOWN = object()  # a leaf's layout that XLA decides later (a tracer of an Auto mesh)


class Layout(NamedTuple):
  """Where a step's inputs live: their mesh and a tree of `PartitionSpec` per input (P() where on one device)."""

  mesh: Any  # jax.sharding.Mesh, or the AbstractMesh of explicit sharding
  grads: Any  # a tree of PartitionSpec like the gradients (None: like the parameters)
  state: Any
  params: Any


# --- where the inputs live ---------------------------------------------------------
def in_shard_map() -> bool:
  """Inside `shard_map` (or an unknown jax): the per-device program is the caller's, not ours to replace."""
  try:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)
  except Exception:  # noqa: BLE001 - an unknown jax: be safe
    return True


def of_arrays(tree: Any) -> tuple[Any, Any] | None:
  """(mesh, tree of specs) of concrete arrays on one mesh of several devices; None if on one device or unclear."""
  mesh, specs = None, []
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if isinstance(x, jax.core.Tracer):
      return None
    if sharding is None or single_device(x):  # NumPy arrays, Python scalars: placed by jit
      specs.append(P())
      continue
    if not isinstance(sharding, NamedSharding) or (mesh is not None and sharding.mesh != mesh):
      return None
    mesh = sharding.mesh
    specs.append(sharding.spec)
  if mesh is None:
    return None
  return mesh, jax.tree.unflatten(jax.tree.structure(tree), specs)


def _leaf_layout(x: Any) -> tuple[Any, Any]:
  """(mesh, spec) of one leaf; (None, None) where on one device; spec `_UNKNOWN` where XLA decides it later."""
  sharding: Any = getattr(x, "sharding", None)
  if not isinstance(x, jax.core.Tracer):
    if sharding is None or single_device(x):
      return None, None
    if isinstance(sharding, NamedSharding):
      return sharding.mesh, sharding.spec
    return sharding, _UNKNOWN
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None, None
  if not all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return mesh, _UNKNOWN  # an Auto axis: the spec in the type is not the layout
  return mesh, sharding.spec


def _given(layout: Layout, grads, state, params) -> list[Any] | None:
  """The specs `layout` gives the leaves of (grads, state, params), in their order; None where it does not fit."""
  g = layout.grads if layout.grads is not None else layout.params
  out: list[Any] = []
  try:
    for specs, tree in ((g, grads), (layout.state, state), (layout.params, params)):
      out += jax.tree.structure(tree).flatten_up_to(specs)  # type: ignore[attr-defined]
  except (ValueError, TypeError):
    return None
  return out


def where(grads: Any, state: Any, params: Any, *, layout: Layout | None, one_device_ok: bool) -> tuple[Any, list]:
  """(mesh, one spec per leaf of (grads, state, params)) for the per-shard step; (None, []) for one device.

  `one_device_ok`: the caller vouches that tracers with no mesh live on one device (``fused=True``, or a
  step helper that saw its concrete arguments there). Raises `Unserved` where the layout cannot be known.
  """
  if in_shard_map():
    raise Unserved("inside shard_map: the arrays are the caller's shards")
  if jax.device_count() == 1:
    return None, []
  leaves = jax.tree.leaves((grads, state, params))
  if layout is not None:
    specs = _given(layout, grads, state, params)
    if specs is None or len(specs) != len(leaves):
      raise Unserved("the inputs are not shaped as the step helper's layout")
    return layout.mesh, specs
  found = [_leaf_layout(x) for x in leaves]
  if any(spec is _UNKNOWN for _, spec in found):
    raise Unserved(
      "several devices, and the inputs' layout is unknown here (inside a jit on a mesh of Auto axes it is only"
      " decided when XLA partitions the program: call jadam.make_update_step or make_train_step at top level,"
      " or shard with AxisType.Explicit; outside, use NamedShardings)"
    )
  meshes = {mesh for mesh, _ in found if mesh is not None}
  if not meshes:
    if one_device_ok or all(not isinstance(x, jax.core.Tracer) for x in leaves):
      return None, []
    raise Unserved("several devices: a custom call is not partitioned (pass fused=True if the inputs live on one)")
  if len(meshes) > 1:
    raise Unserved("inputs on several meshes")
  return meshes.pop(), [spec for _, spec in found]


# --- the step, traced in the global view, each kernel call run per shard ------------
def run(mesh: Any, specs: list, fn: Any, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
  """``fn(grads, state, params)`` (the planner's step), with each kernel call on the shards of `mesh`."""
  try:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(grads, state, params)
  except TypeError as e:  # a leaf that is not an array (make_jaxpr takes arrays only)
    raise Unserved(f"a state leaf that is not an array ({e})") from None
  _check_flat(closed.jaxpr)
  known = dict(zip(closed.jaxpr.invars, specs, strict=True))
  args = jax.tree.leaves((grads, state, params))
  outs = _eval(closed.jaxpr, closed.consts, args, known, _Mesh(mesh))
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


_KERNELS = ("jadam_adam_step", "jadam_all_finite", "jadam_sparse_adam_step")


def _check_flat(jaxpr: Any) -> None:
  """The kernels' calls are at the top of the jaxpr (where `_eval` sees them), none in a nested one."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "jadam_sparse_adam_step":
      raise Unserved("row-sparse tables on several devices: the sparse kernel takes the whole table")
    for sub in _jaxprs_in(eqn.params):
      _check_nested(sub, eqn.primitive.name)


def _jaxprs_in(params: dict) -> list:
  """The jaxprs among an equation's parameters (jit's, cond's branches, ...)."""
  out = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else [value]:
      if hasattr(v, "jaxpr") and hasattr(v, "consts"):
        out.append(v.jaxpr)
      elif hasattr(v, "eqns"):
        out.append(v)
  return out


def _check_nested(jaxpr: Any, where: str) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _KERNELS:
      raise Unserved(f"a kernel call ({eqn.primitive.name}) nested in {where}: not planned per shard")
    for sub in _jaxprs_in(eqn.params):
      _check_nested(sub, where)


class _Mesh(NamedTuple):
  mesh: Any

  @property
  def explicit(self) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in self.mesh.axis_types)

  def size(self, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(self.mesh.shape[n] for n in names if n is not None)

  def to(self, x: Any, spec: P) -> Any:
    """`x` laid out as `spec` (a local slice from replicated; a gather to replicated)."""
    if self.explicit:
      return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _eval(jaxpr: Any, consts: list, args: list, known: dict, mesh: _Mesh) -> list:
  """`jax.core.eval_jaxpr`, with `adam_step_p` per shard and `all_finite_p` as XLA's reduction."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is _fused.adam_step_p:
      specs = [known.get(v) if not isinstance(v, jax.extend.core.Literal) else None for v in eqn.invars]
      outs = _adam_step(mesh, invals, specs, dict(eqn.params))
    elif eqn.primitive is _fused.all_finite_p:
      outs = [jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in invals]))]  # local sums, one all-reduce
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update((v, o) for v, o in zip(eqn.outvars, outs, strict=True) if not isinstance(v, jax.extend.core.DropVar))
  return [read(v) for v in jaxpr.outvars]


def _full(spec: Any, ndim: int) -> tuple:
  entries = tuple(spec) if spec is not None else ()
  return entries + (None,) * (ndim - len(entries))


def _leaf_spec(mesh: _Mesh, shape: tuple[int, ...], specs: list, block_size: int, streams: bool) -> tuple[P, str]:
  """The spec one leaf's kernel runs under, and '' or why that leaf takes the XLA arithmetic instead.

  `specs` are its operands' known specs (g, p, m, ... ; None where unknown): the moments' layout wins
  (ZeRO-1 shards them, not the parameter), then the parameter's.
  """
  ndim = len(shape)
  order = [2, 1, 0]  # m, p, g
  chosen = next((specs[i] for i in order if specs[i] is not None and any(_full(specs[i], ndim))), None)
  spec = _full(chosen, ndim)
  if not any(spec):
    return P(), ""
  for size, entry in zip(shape, spec, strict=True):
    if entry is not None and size % mesh.size(entry):
      return P(), f"an axis of {size} is not a multiple of the {mesh.size(entry)} shards it is split into"
  if streams:
    return P(), "bfloat16 moments: their stochastic rounding hashes each value's index in the whole leaf"
  if block_size:
    local_last = shape[-1] // mesh.size(spec[-1])
    if shape[-1] % block_size or local_last % block_size:
      return P(), f"8-bit moments whose blocks of {block_size} straddle the shards of a {list(shape)} leaf"
    for i in (3, 5):  # the scales: laid out as the leaf, per row of blocks
      if specs[i] is not None and _full(specs[i], ndim) != spec:
        return P(), "8-bit scales laid out otherwise than their moments"
  return P(*spec), ""


def _adam_step(mesh: _Mesh, invals: list, specs: list, params: dict) -> list:
  """One `adam_step_p` call, each leaf on its shards; `Unserved` if a leaf cannot be split.

  `params` are the call's (mode, streams, block_size, ...), passed on as they are.
  """
  k = _fused._per_leaf(params["mode"], params.get("block_size", 0))
  scalars, count, leaves, leaf_specs = invals[0], invals[1], invals[2:], specs[2:]
  n = len(leaves) // k
  layout: list[P] = []
  for j in range(n):
    shape = jnp.shape(leaves[k * j + 1])
    spec, why = _leaf_spec(mesh, shape, leaf_specs[k * j : k * (j + 1)], params.get("block_size", 0),
                           bool(params.get("streams", ())))  # fmt: skip
    if why:  # the whole step then runs as its stages: XLA's one statement of the formula is theirs
      raise Unserved(f"a {list(shape)} leaf on several devices: {why}")
    layout.append(spec)
  in_specs = (P(), P(), *[spec for spec in layout for _ in range(k)])
  out_specs = tuple(spec for spec in layout for _ in range(k - 1))

  def body(s, c, *xs):
    return tuple(_fused.adam_step_p.bind(s, c, *xs, **params))

  if mesh.explicit:  # the operands' types must say the layout shard_map takes (a local slice where replicated)
    leaves = [x if _full(jax.typeof(x).sharding.spec, x.ndim) == _full(s, x.ndim) else mesh.to(x, s)
              for x, s in zip(leaves, in_specs[2:], strict=True)]  # fmt: skip
  res = jax.shard_map(body, mesh=mesh.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
    scalars, count, *leaves
  )
  outs: list = []
  for j in range(n):
    for r in range(k - 1):
      value = res[(k - 1) * j + r]
      before = leaf_specs[k * j + 1 + r]
      if before is not None and _full(before, value.ndim) != _full(layout[j], value.ndim):
        value = mesh.to(value, P(*_full(before, value.ndim)))  # ZeRO-1: the parameter back to its layout
      outs.append(value)
  return outs
