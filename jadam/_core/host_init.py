"""An optimizer's first state for concrete parameters, its constant leaves filled on the host.

Eager `init` makes each zero moment with its own XLA program: one compilation
per distinct leaf shape (500 leaves of distinct shapes take half a minute on
one CPU core), and ``jax.jit(init)`` compiles one fusion per leaf, as slowly.
Most of a first state is constants broadcast to the parameters' shapes
(``jnp.zeros_like(p)``, ``jnp.full_like(p, c)``): :func:`init` traces `init`
once, fills each ``broadcast_in_dim`` of a constant with NumPy and places it as
the eager operation would (on the parameters' device, committed where they
are, as ``zeros_like`` commits; constant outputs such as counts uncommitted),
and binds every other operation eagerly, as eager `init` does. The state is
the same pytree, with the same values, dtypes and placement.

Only where every parameter is a concrete array on one and the same device
(a `SingleDeviceSharding`), outside any transformation; elsewhere (sharded parameters, under `jit`,
`eval_shape`, `vmap`), `init` runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


class _Fill:
  """A constant broadcast to a shape, not yet made: a NumPy scalar and the shape."""

  def __init__(self, value: np.ndarray, shape: tuple[int, ...]):
    self.value, self.shape = value, shape

  def array(self) -> np.ndarray:
    return np.full(self.shape, self.value, self.value.dtype)


def init(fn: Callable[[Any], Any], params: Any) -> Any:
  """``fn(params)``, the same state, with its broadcast constants made on the host where `params` allow it."""
  where = _placement(params)
  if where is None:
    return fn(params)
  try:
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(params)
  except Exception:  # noqa: BLE001 -- an init that needs concrete values: eager, which raises what is genuine
    return fn(params)
  if any(v.aval.weak_type for v in closed.jaxpr.outvars):  # a weak-typed leaf: only eager init makes one
    return fn(params)
  outs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(params), where)
  return jax.tree.unflatten(jax.tree.structure(shape), outs)


def _placement(params: Any) -> tuple[jax.Device, bool] | None:
  """The one device of every leaf of `params` and whether they are committed to it; None elsewhere."""
  leaves = jax.tree.leaves(params)
  if not leaves or not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves):
    return None
  if isinstance(jnp.zeros((), jnp.int32), jax.core.Tracer):  # inside a transformation (closed-over parameters)
    return None
  if not all(isinstance(x.sharding, jax.sharding.SingleDeviceSharding) for x in leaves):
    return None  # a mesh's sharding, even of one device: eager init places each leaf as its parameter
  devices = {d for x in leaves for d in x.devices()}
  committed = {x.committed for x in leaves}
  if len(devices) != 1 or len(committed) != 1:
    return None
  return devices.pop(), committed.pop()


def _evaluate(jaxpr: Any, consts: list, args: list, where: tuple[jax.Device, bool]) -> list:
  """The jaxpr's outputs: host fills placed on `where`, the rest as eager evaluation gives them."""
  env: dict = {}

  def read(v: Any) -> Any:
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts, strict=True):
    env[v] = x
  for v, x in zip(jaxpr.invars, args, strict=True):
    env[v] = x
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    fill = _as_fill(eqn, values)
    if fill is not None:
      env[eqn.outvars[0]] = fill
      continue
    values = [_place(x, where) if isinstance(x, _Fill) else x for x in values]
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # jax < 0.7: (subfuns, params)
      values, params = [*params[0], *values], params[1]
    out = eqn.primitive.bind(*values, **params)
    for v, x in zip(eqn.outvars, out if eqn.primitive.multiple_results else [out], strict=True):
      env[v] = x
  # a constant output (a count) is made without a parameter, uncommitted as eager init makes it
  return [
    _place(read(v), (where[0], False) if isinstance(v, jex_core.Literal) else where, v.aval) for v in jaxpr.outvars
  ]


def _as_fill(eqn: Any, values: list) -> _Fill | None:
  """A `broadcast_in_dim` of a constant scalar (no sharding asked) as a :class:`_Fill`, else None."""
  if eqn.primitive.name != "broadcast_in_dim" or eqn.params.get("sharding") is not None:
    return None
  (x,) = values
  if isinstance(x, jax.Array) or np.ndim(x) != 0:
    return None
  aval = eqn.outvars[0].aval
  return _Fill(np.asarray(x, aval.dtype), tuple(aval.shape))


def _place(x: Any, where: tuple[jax.Device, bool], aval: Any = None) -> Any:
  """`x` as a device array where the eager operation would have put it (a NumPy value, a fill or a literal)."""
  if isinstance(x, jax.Array):
    return x
  device, committed = where
  host = x.array() if isinstance(x, _Fill) else np.asarray(x, None if aval is None else aval.dtype)
  return jax.device_put(_unaligned(host), device if committed else None)


def _unaligned(host: np.ndarray) -> np.ndarray:
  """`host`'s values one element off their allocation's alignment, so that `device_put` copies them.

  On the CPU, `device_put` of an aligned NumPy array may wrap its memory
  (zero-copy); a buffer the device does not own cannot be donated, so the first
  donated step would copy the state instead of updating it in place.
  """
  out = np.empty(host.size + 1, host.dtype)[1:].reshape(host.shape)
  out[...] = host
  return out
