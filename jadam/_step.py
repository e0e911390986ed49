r"""The fast training step: update and apply in one compiled function, buffers donated.

An optimizer step is memory-bound: per float32 parameter it must read
:math:`g, \theta, m, v` and write :math:`\theta, m, v`, 28 bytes. What decides
its speed is how many passes over memory the compiled program makes, and
whether it writes into the old buffers or allocates new ones. Two habits cost
5-7x: computing the update in one `jit` and applying it in another (the update
tree is written to memory and read back), and not donating the parameters and
the state (XLA must keep the old arrays alive and copy). :func:`update_and_apply`
is the one-function form; :func:`make_update_step` compiles it with the
parameters and the state donated, and :func:`make_train_step` with the loss's
gradient too.

One more pitfall: JAX pairs donated inputs with outputs of the same shape and
dtype *in order*. A step written ``step(grads, state, params) -> (params,
state)`` pairs the new parameters with the old first moment, the new first
moment with the old second moment, and so on; XLA must then copy to avoid
overwriting what it still reads (4 extra copies, 3-4x slower on CPU). Take the
donated arguments in the order of the outputs: ``(params, state, ...) ->
(params, state, ...)``, as the helpers here do.

On CPU, XLA cannot fuse the three results of an Adam step (new m, v and
parameters) into one loop: it makes three passes, 40 bytes a parameter. Where
a transformation's structure is Adam's (jadam's stages, possibly inside
`optax.chain`, `clip_by_global_norm`, `apply_if_finite`, `inject_hyperparams`
or `partition`: see `jadam._kernels.plan`) the helpers here therefore call a
compiled single-pass kernel instead, with the same results and the same state;
everything else takes the generic path. `jax.export`, lowerings for other
platforms, and `vmap` or `jax.grad` of a jitted step run the stages themselves
(`jadam._kernels.dispatch`). On several devices the kernel runs on each device's
shard (`jadam._kernels.sharded`: FSDP, data parallel, ZeRO-1), with no gather;
the helpers read the layout from their concrete arguments.

Row-sparse gradients (`jadam.sparse_adam` on `BCOO` gradients, see
`jadam._stages.sparse`) have a kernel of their own on CPU (`jadam._kernels.sparse_step`):
one call per table groups the ids, sums the duplicates and updates each
touched row of the table and its moments in place, where the generic path is a
dozen small gathers, scatters and a sort. Where it cannot serve, the generic
row-sparse path (:func:`jadam.apply_updates`'s scatter) runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from jadam._core import hparams as _hparams
from jadam._kernels import base as _base
from jadam._kernels import plan as _plan
from jadam._kernels import sharded as _sharded
from jadam._stages import sparse as _sparse


def _check_tx(tx: Any) -> None:
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    called = " (the factory: call it, e.g. jadam.adam(1e-3))" if callable(tx) else ""
    raise TypeError(f"tx must be an optax.GradientTransformation; got {tx!r}{called}.")


def _check_fused(fused: Any) -> None:
  """`fused` is True, False or None (a string would read as True)."""
  if fused is not None and not isinstance(fused, bool):
    raise TypeError(f"fused must be True, False or None; got {fused!r}.")


def update_and_apply(
  tx: optax.GradientTransformation,
  grads: optax.Updates,
  state: optax.OptState,
  params: optax.Params,
  *,
  fused: bool | None = None,
) -> tuple[optax.Params, optax.OptState]:
  r"""One optimizer step, :math:`\theta_t = \theta_{t-1} + \Delta\theta_t`, as one traced function.

  ``tx.update`` followed by ``optax.apply_updates``: call it inside the same
  `jax.jit` as the gradient, with `params` and `state` donated, so that XLA
  fuses the update into the writes of the new parameters and reuses the old
  buffers. Any Optax transformation works.

  Where `tx` is Adam by structure (see the README's "The fast path": jadam's
  stages, also inside `optax.chain`, `clip_by_global_norm`, `apply_if_finite`,
  `inject_hyperparams`, `partition`; float32 or float64 leaves, bfloat16
  or 8-bit (:class:`jadam.Quantized`, without AMSGrad) moments) and the backend is the CPU, the step is one
  compiled kernel that reads and writes each buffer once, with the same new parameters and state as
  ``tx.update`` + ``optax.apply_updates``; on inputs sharded over a mesh it runs
  on each device's shard, with no gather (see ``fused``); under `vmap`, `grad`,
  `shard_map`, on other backends, or where the kernel cannot be built, the
  generic path runs.
  Row-sparse (`BCOO`) gradients are added by a scatter into the touched rows
  (:func:`jadam.apply_updates`), :math:`O(k d)`; where `tx` is
  :func:`jadam.sparse_adam` by structure (also inside the combinators above),
  on the CPU one kernel call per table does the whole step in place.

  Args:
    tx: an :class:`optax.GradientTransformation`.
    grads: the gradient, shaped like `params`.
    state: `tx`'s state.
    params: the parameters.
    fused: None (default) uses the fused kernels where they apply: on one
      device, or on each shard where the inputs' layout is known (concrete
      arrays with `NamedSharding`\ s, or tracers under `AxisType.Explicit`
      sharding; inside a `jit` on a mesh of `Auto` axes it is only decided
      when XLA partitions the program, so the generic path runs there, and
      the step helpers, which see their concrete arguments, are the way to the
      kernel). True requires it (inside a `jit` with no mesh on a multi-device
      host, for callers that know the inputs live on one device) and raises a
      `ValueError` saying why where it cannot serve (a sharded leaf it cannot
      split, an unknown layout); False never.

  Returns:
    ``(new_params, new_state)``; each new parameter keeps its dtype.

  Examples:
    >>> import functools, jax, jax.numpy as jnp, jadam
    >>> tx = jadam.adam(1e-3)
    >>> @functools.partial(jax.jit, donate_argnums=(1, 2))  # outputs' order
    ... def step(grads, params, state):
    ...   return jadam.update_and_apply(tx, grads, state, params)
    >>> params = {"w": jnp.ones(3)}
    >>> params, state = step({"w": jnp.ones(3)}, params, tx.init(params))
    >>> params["w"]
    Array([0.999, 0.999, 0.999], dtype=float32)
  """
  _check_tx(tx)
  _check_fused(fused)
  return _apply(tx, grads, state, params, fused=fused, multi_device_ok=bool(fused))


def _apply(tx, grads, state, params, *, fused: bool | None, multi_device_ok: bool, layout=None):
  """update_and_apply, with the one-device check left to the caller where `multi_device_ok`.

  `layout` (a step helper's): where the inputs live on a mesh, for the kernel per shard.
  """
  if fused is not False:
    try:
      return _plan.step(tx, grads, state, params, multi_device_ok=multi_device_ok, require=bool(fused), layout=layout)
    except _base.Unserved as e:
      if fused:
        raise ValueError(f"fused=True, but the fused Adam kernel cannot serve this step: {e}.") from None
  return _plan.stages_step(tx, grads, state, params)  # row-sparse (BCOO) gradients: a scatter, O(k d)


class _Step:
  """A jitted step that takes the fused kernel on one device or on each shard of a mesh, else the generic path.

  Each is a `jax.jit` function of ``make(use_kernel, layout)``: one for inputs on one device
  (`layout` None), one per layout on a mesh (a `jadam._kernels.sharded.Layout`, read from the
  concrete arguments: inside the trace XLA has not decided it yet, and the kernel needs it to run per
  shard), and one for several devices in a layout it cannot read (False: the generic path, or
  fused=True's error). `lower` and the other attributes follow the same choice, so
  ``step.lower(...).compile()`` shows what a call would run.
  """

  def __init__(self, make: Callable[..., Callable[..., Any]], donate: tuple[int, ...], grads_at: int | None):
    self._make, self._donate, self._grads_at = make, donate, grads_at
    self._fused = jax.jit(make(True, None), donate_argnums=donate)
    self._sharded: dict[Any, Callable[..., Any]] = {}
    functools.update_wrapper(self, make(True, None))

  def _pick(self, args):
    if jax.device_count() == 1 or all(_base.single_device(x) for x in jax.tree.leaves(args)):
      return self._fused
    grads = args[self._grads_at] if self._grads_at is not None else None
    found = _sharded.of_arrays((args[0], args[1], grads))
    if found is None:  # not NamedShardings on one mesh: the kernel cannot be placed (fused=True says why)
      return self._sharded_fn(False)
    mesh, (params, state, grads) = found
    return self._sharded_fn(_sharded.Layout(mesh=mesh, grads=grads, state=state, params=params))

  def _sharded_fn(self, layout):
    leaves, treedef = jax.tree.flatten(layout, is_leaf=_is_spec)
    key = (tuple(leaves), treedef)
    if key not in self._sharded:
      self._sharded[key] = jax.jit(self._make(True, layout), donate_argnums=self._donate)
    return self._sharded[key]

  def __call__(self, *args):
    return self._pick(args)(*args)

  def lower(self, *args, **kwargs):
    return self._pick(args).lower(*args, **kwargs)

  def trace(self, *args, **kwargs):
    return self._pick(args).trace(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._fused, name)


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _jit_step(tx, make: Callable[..., Callable[..., Any]], donate: bool, fused: bool | None, grads_at: int | None):
  _check_fused(fused)
  _hparams.check_flag("donate", donate)
  donate_argnums = (0, 1) if donate else ()
  if fused is False:
    return jax.jit(make(False, None), donate_argnums=donate_argnums)
  return _Step(make, donate_argnums, grads_at)


def make_update_step(
  tx: optax.GradientTransformation, *, donate: bool = True, fused: bool | None = None
) -> Callable[..., Any]:
  r"""A jitted ``step(params, state, grads) -> (params, state)``: :func:`update_and_apply`, donated.

  For gradients computed elsewhere (accumulated, all-reduced, clipped by hand).
  `params` and `state` are donated in the order of the outputs, so XLA writes
  the new values into the old buffers without copies; do not read them after
  the call.

  Args:
    tx: an :class:`optax.GradientTransformation`.
    donate: donate `params` and `state` (the fast path); set False to keep them.
    fused: None (default) takes :func:`update_and_apply`'s fused kernel where
      it applies, on one device or on each shard of the inputs' mesh (the
      layout read from the arguments at each call; a step with a leaf it
      cannot split runs as its stages); True requires it (a `ValueError` at the first
      call where it cannot serve); False always the generic path.

  Returns:
    The jitted step function.

  Examples:
    >>> import jax.numpy as jnp, jadam
    >>> tx = jadam.adam(1e-3)
    >>> step = jadam.make_update_step(tx)
    >>> params = {"w": jnp.ones(3)}
    >>> params, state = step(params, tx.init(params), {"w": jnp.ones(3)})
    >>> params["w"]
    Array([0.999, 0.999, 0.999], dtype=float32)
  """
  _check_tx(tx)

  def make(use_kernel, layout):
    def step(params, state, grads):
      kernel, one_device = fused if use_kernel else False, use_kernel and layout is None
      return _apply(tx, grads, state, params, fused=kernel, multi_device_ok=one_device, layout=layout or None)

    return step

  return _jit_step(tx, make, donate, fused, grads_at=2)


def make_train_step(
  loss_fn: Callable[..., jax.Array],
  tx: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  donate: bool = True,
  fused: bool | None = None,
) -> Callable[..., Any]:
  r"""A jitted ``step(params, state, *batch) -> (params, state, loss[, aux])``.

  .. math::
      g_t = \nabla_\theta L(\theta_{t-1}; \text{batch}), \qquad
      (\theta_t, s_t) = \texttt{update\_and\_apply}(tx, g_t, s_{t-1}, \theta_{t-1}),

  all in one `jax.jit`, with `params` and `state` donated (their old buffers
  are reused for the new ones, so they must not be read after the call).

  Args:
    loss_fn: ``loss_fn(params, *batch)``, returning a scalar loss, or
      ``(loss, aux)`` when `has_aux`.
    tx: an :class:`optax.GradientTransformation`.
    has_aux: whether `loss_fn` returns ``(loss, aux)``.
    donate: donate `params` and `state` (the fast path); set False to keep them.
    fused: as for :func:`make_update_step`.

  Returns:
    The jitted step function.
  """
  _check_tx(tx)
  _hparams.check_flag("has_aux", has_aux)
  grad_fn = _sparse.value_and_grad_of(loss_fn, has_aux)  # jax.value_and_grad, or jadam.value_and_sparse_grad's

  def make(use_kernel, layout):
    def step(params, state, *batch):
      value, grads = grad_fn(params, *batch)
      kernel, one_device = fused if use_kernel else False, use_kernel and layout is None
      params, state = _apply(tx, grads, state, params, fused=kernel, multi_device_ok=one_device, layout=layout or None)
      if has_aux:
        loss, aux = value
        return params, state, loss, aux
      return params, state, value

    return step

  return _jit_step(tx, make, donate, fused, grads_at=None)
