"""A planned step as one primitive: the kernel where it runs, the stages everywhere else.

The planner (`jadam._kernels.plan`) decides at trace time that a kernel serves a
step. Whether the traced program then runs on this CPU is decided later, when
it is lowered or transformed: `jax.export` wants no custom call, another
platform (``jax.export(..., platforms=("cuda",))``) has no kernel, and `vmap`
or `jvp` of a jitted step transform a program already traced. So the planner
binds :data:`planned_step_p` with two ways to compute the same outputs from the
same operands:

- ``kernel``, the planner's step traced to a jaxpr (it binds the CPU kernels'
  primitives): the lowering of a program for this CPU that is not exported;
- ``stages``, the transformation's own ``update`` and ``apply_updates``, the
  step the kernel must equal: every other lowering, `vmap`'s batching rule and
  the derivative.

Nothing here states a formula: the fallback is the stages themselves. They are
traced only where they are lowered or transformed, so a step that runs the
kernel pays for one trace, not two. That is sound because the stages read
nothing the kernel's trace does not: the planner reads every argument of the
stages it serves and runs the others as they are. Where that trace finds values
traced outside the step (a transformation built inside `jit` from traced
hyperparameters), they become operands of the primitive, and the stages are
traced at once with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from jadam._kernels.base import Unserved, for_export, tracing_ok


class Stages:
  """The generic step on the primitive's operands, checked to return the kernel's outputs' tree and types.

  A primitive's parameter: compared and hashed by identity.
  """

  def __init__(self, fn: Callable[..., Any], out_tree: Any, out_avals: Sequence[Any]):
    self.fn, self.out_tree, self.out_avals = fn, out_tree, list(out_avals)

  def __call__(self, *args: Any) -> list[Any]:
    leaves, tree = jax.tree.flatten(self.fn(*args))
    if tree != self.out_tree:
      raise TypeError(f"the stages' step returns {tree}, the kernel's {self.out_tree}")
    for x, want in zip(leaves, self.out_avals, strict=True):
      if (jax.numpy.shape(x), jax.numpy.result_type(x)) != (want.shape, want.dtype):
        raise TypeError(f"the stages' step returns a {jax.typeof(x)} where the kernel's returns a {want}")
    return leaves

  def __repr__(self) -> str:
    return "<the stages' step>"


def _split(args: Sequence[Any], n_kernel: int, n_stages: int) -> tuple[list[Any], list[Any]]:
  """The kernel's operands and the stages', from the primitive's (kernel's hoisted, stages' hoisted, shared)."""
  shared = list(args[n_kernel + n_stages :])
  return list(args[:n_kernel]) + shared, list(args[n_kernel : n_kernel + n_stages]) + shared


def _on_stages(stages: Stages, n_kernel: int, n_stages: int) -> Callable[..., list[Any]]:
  """The stages' step on the primitive's operands (those hoisted for the kernel's trace left out)."""

  def run(*args: Any) -> list[Any]:
    return stages(*_split(args, n_kernel, n_stages)[1])

  return run


planned_step_p = jex_core.Primitive("jadam_planned_step")
planned_step_p.multiple_results = True


@planned_step_p.def_abstract_eval
def _abstract_eval(*avals, kernel, stages, n_kernel, n_stages):
  del avals, stages, n_kernel, n_stages
  return kernel.out_avals


@planned_step_p.def_impl
def _impl(*args, kernel, stages, n_kernel, n_stages):
  del stages
  return jex_core.jaxpr_as_fun(kernel)(*_split(args, n_kernel, n_stages)[0])


def _runs_kernel(ctx: Any) -> bool:
  """Whether this lowering is for this CPU alone, and not `jax.export`'s."""
  platforms = ctx.platforms or ctx.module_context.platforms
  return tuple(platforms) == ("cpu",) and not for_export(ctx)


def _lowering(ctx, *args, kernel, stages, n_kernel, n_stages):
  if _runs_kernel(ctx):
    fn = lambda *a: jex_core.jaxpr_as_fun(kernel)(*_split(a, n_kernel, n_stages)[0])  # noqa: E731
  else:
    fn = _on_stages(stages, n_kernel, n_stages)
  return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


mlir.register_lowering(planned_step_p, _lowering)


def _batch(args, dims, *, kernel, stages, n_kernel, n_stages):
  del kernel
  out = jax.vmap(_on_stages(stages, n_kernel, n_stages), in_axes=list(dims))(*args)
  return out, [0] * len(out)


batching.primitive_batchers[planned_step_p] = _batch


def _jvp(primals, tangents, *, kernel, stages, n_kernel, n_stages):
  del kernel
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  return jax.jvp(_on_stages(stages, n_kernel, n_stages), list(primals), tangents)


ad.primitive_jvps[planned_step_p] = _jvp


def _is_operand(x: Any) -> bool:
  """Arrays and tracers: the primitive's operands (Python and NumPy scalars stay as they are, static)."""
  return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _trace(fn: Callable[..., Any], operands: list[Any]) -> tuple[jex_core.ClosedJaxpr, list[Any], Any]:
  """`fn` traced on `operands`: its jaxpr taking the tracers it closes over first, those tracers, its out tree."""
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*operands)
  jaxpr, consts = closed.jaxpr, closed.consts
  traced = [isinstance(c, jax.core.Tracer) for c in consts]
  hoisted = [v for v, t in zip(jaxpr.constvars, traced, strict=True) if t]
  names = jaxpr.debug_info.arg_names
  debug_info = jaxpr.debug_info._replace(arg_names=None if names is None else ("",) * len(hoisted) + tuple(names))
  jaxpr = jaxpr.replace(
    constvars=[v for v, t in zip(jaxpr.constvars, traced, strict=True) if not t],
    invars=hoisted + list(jaxpr.invars),
    debug_info=debug_info,
  )
  kept = [c for c, t in zip(consts, traced, strict=True) if not t]
  return (
    jex_core.ClosedJaxpr(jaxpr, kept),
    [c for c, t in zip(consts, traced, strict=True) if t],
    jax.tree.structure(shapes),
  )


def planned_step(kernel: Callable[..., Any], stages: Callable[..., Any], *args: Any) -> Any:
  """``kernel(*args)``, bound as one primitive whose other lowerings and transformations run ``stages(*args)``.

  `kernel` is the planner's step (it raises :class:`Unserved` where it cannot
  serve); `stages` the generic one, with the same outputs. Outside any trace
  (eager), `kernel` runs as it is. Array leaves of `args` are the primitive's
  operands; other leaves (Python numbers, None) are passed to both as they are.
  """
  flat, in_tree = jax.tree.flatten(args)
  is_op = [_is_operand(x) for x in flat]
  operands = [x for x, o in zip(flat, is_op, strict=True) if o]
  if not all(tracing_ok(x) for x in operands):
    raise Unserved("under a transformation other than jit (grad, vmap, ...)")

  def on_operands(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*ops: Any) -> Any:
      it = iter(ops)
      return fn(*jax.tree.unflatten(in_tree, [next(it) if o else x for x, o in zip(flat, is_op, strict=True)]))

    return run

  closed, k_hoisted, out_tree = _trace(on_operands(kernel), operands)
  if not k_hoisted and not any(isinstance(x, jax.core.Tracer) for x in operands):
    return kernel(*args)  # eager: nothing is traced, nothing will be lowered (and eager checks run)
  if not all(tracing_ok(x) for x in k_hoisted):
    raise Unserved("a hyperparameter under grad or vmap")
  if closed.effects:
    raise Unserved(f"the kernel's step has effects ({closed.effects})")
  s_hoisted: list[Any] = []
  if k_hoisted:  # the transformation holds values traced outside the step: trace the stages now, with them
    s_closed, s_hoisted, s_tree = _trace(on_operands(stages), operands)
    fn = lambda *a: jax.tree.unflatten(s_tree, jex_core.jaxpr_as_fun(s_closed)(*a))  # noqa: E731
  else:
    fn = on_operands(stages)
  out = planned_step_p.bind(
    *k_hoisted,
    *s_hoisted,
    *operands,
    kernel=closed,
    stages=Stages(fn, out_tree, closed.out_avals),
    n_kernel=len(k_hoisted),
    n_stages=len(s_hoisted),
  )
  return jax.tree.unflatten(out_tree, out)
