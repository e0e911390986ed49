"""What the planner and the kernels' primitives share: refusal, the step's context, and which values they take."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Unserved(Exception):
  """The kernel cannot serve this transformation; the message says why (the stages then run as they are)."""


class Ctx(NamedTuple):
  apply: Any  # None, or a traced bool: whether the step is taken (apply_if_finite)
  require: bool  # fused=True: the kernel even where this CPU's ISA path runs XLA faster


def select(ctx: Ctx, new: Any, old: Any) -> Any:
  """`new` where the step is taken, `old` where an enclosing `apply_if_finite` rejects it."""
  if ctx.apply is None:
    return new
  return jax.tree.map(lambda n, o: jnp.where(ctx.apply, n, o), new, old)


def tracing_ok(x: Any) -> bool:
  """Concrete arrays and `jit`'s tracers only: under `grad`, `vmap` and the like, go generic."""
  if not isinstance(x, jax.core.Tracer):
    return isinstance(x, (jax.Array, np.ndarray))
  try:
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return type(x) is partial_eval.DynamicJaxprTracer


def for_export(ctx) -> bool:
  """Whether this lowering is `jax.export`'s (which refuses custom calls without compatibility guarantees)."""
  params = getattr(ctx.module_context, "lowering_parameters", None)
  return params is None or bool(getattr(params, "for_export", True))


def check_lowering(ctx: Any, primitive: Any) -> None:
  """A kernel's primitive lowers to its custom call only: never for `jax.export` (the planner binds it inside
  `jadam._kernels.dispatch`'s primitive, which lowers the stages there)."""
  if for_export(ctx):
    raise NotImplementedError(
      f"{primitive.name} lowers only to the CPU kernel, not for jax.export; bind it through jadam._kernels.dispatch"
    )


def flatten_up_to(treedef: Any, tree: Any) -> list[Any]:
  """The subtrees of `tree` at the leaves of `treedef` (``PyTreeDef.flatten_up_to``, which jaxlib ships untyped).

  Raises `ValueError` or `TypeError` where `treedef` is not a prefix of `tree`'s structure.
  """
  return list(treedef.flatten_up_to(tree))


def single_device(x: Any) -> bool:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return True
  return type(sharding) is jax.sharding.SingleDeviceSharding or len(sharding.device_set) == 1
