"""`torch.nn.utils.clip_grad_norm_` and `clip_grad_value_` as Optax transformations, placed first in a chain."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._stages.moments import expect_updates

_NONFINITE = (
  "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be clipped. To disable"
  " this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
)


def _norm_type(norm_type: Any) -> float:
  if isinstance(norm_type, str) and norm_type.lower() == "inf":
    return math.inf
  if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
    raise TypeError(f"norm_type must be a positive number or 'inf'; got {norm_type!r}.")
  if not (float(norm_type) > 0):
    raise ValueError(f"norm_type must be positive (or inf); got {norm_type!r}.")
  return float(norm_type)


def _leaf_norm(g: jax.Array, p: float) -> jax.Array:
  """`torch.linalg.vector_norm(g, p)`: of |g| for a complex leaf, as torch."""
  a = jnp.abs(g.astype(_common.compute_dtype(g.dtype))).ravel()
  if p == math.inf:
    return jnp.max(a, initial=0.0)
  if p == 2.0:
    return jnp.sqrt(jnp.sum(a * a))
  if p == 1.0:
    return jnp.sum(a)
  return jnp.sum(a**p) ** (1.0 / p)


def total_norm(updates: optax.Updates, norm_type: Any = 2.0) -> jax.Array:
  """The norm PyTorch's `clip_grad_norm_` returns: the `norm_type`-norm of the leaves' norms."""
  p = _norm_type(norm_type)
  leaves = [g for g in jax.tree.leaves(updates) if _common.is_float_leaf(g)]
  if not leaves:
    return jnp.zeros([], _common.float_dtype())
  norms = [_leaf_norm(g, p) for g in leaves]
  dtype = max((n.dtype for n in norms), key=lambda d: jnp.dtype(d).itemsize)
  return _leaf_norm(jnp.stack([n.astype(dtype) for n in norms]), p)


def clip_grad_norm(
  max_norm: Any, norm_type: Any = 2.0, error_if_nonfinite: bool = False
) -> optax.GradientTransformation:
  r"""`torch.nn.utils.clip_grad_norm_`: scale the gradients so that their total norm is at most `max_norm`.

  .. math::
      \lVert g\rVert = \Bigl\lVert \bigl(\lVert g_1\rVert_p, \ldots, \lVert g_n\rVert_p\bigr) \Bigr\rVert_p,
      \qquad g \leftarrow g \cdot \min\Bigl(1, \frac{\text{max\_norm}}{\lVert g\rVert + 10^{-6}}\Bigr),

  PyTorch's formula, 1e-6 included (`optax.clip_by_global_norm` divides by
  the norm alone, so a ported recipe drifts by about 1e-7 relative from torch
  on every clipped step). The leaves' norms are of :math:`|g|` for complex
  leaves, as torch's `vector_norm`. Integer and `None` leaves are left out.

  Put it first in the chain, where PyTorch code calls it: between
  `loss.backward()` and `optimizer.step()`::

      tx = optax.chain(jadam.torch.clip_grad_norm(1.0), jadam.torch.AdamW(lr=3e-4))

  Args:
    max_norm: the largest total norm, >= 0: a float, a scalar array or a schedule.
    norm_type: :math:`p > 0`, or ``"inf"`` / ``math.inf`` for the largest :math:`|g|`.
    error_if_nonfinite: raise PyTorch's `RuntimeError` when the total norm is NaN
      or infinite. JAX cannot raise from inside a compiled function: the check
      is made eagerly (outside `jit`), and under `jit` it is a
      `jax.experimental.checkify.check`, so the compiled function must be wrapped in
      `checkify.checkify` (then `err.throw()` raises). Left False (the default),
      a non-finite norm scales the gradients by it, as torch does.

  Returns:
    An :class:`optax.GradientTransformation` (stateless but for a step count
    for a scheduled `max_norm`).
  """
  _hparams.check_hyperparameter("max_norm", max_norm, low=0.0)
  p = _norm_type(norm_type)
  _hparams.check_flag("error_if_nonfinite", error_if_nonfinite)
  max_fn = _hparams.as_schedule(max_norm, "max_norm")

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.torch.clip_grad_norm")
    _common.check_state("jadam.torch.clip_grad_norm", state, optax.ScaleByScheduleState)
    norm = total_norm(updates, p)
    if error_if_nonfinite:
      finite = jnp.isfinite(norm)
      if isinstance(finite, jax.core.Tracer):
        checkify.check(finite, _NONFINITE.format(p))
      elif not bool(finite):
        raise RuntimeError(_NONFINITE.format(p))
    coef = jnp.minimum(_hparams.cast_hyperparameter(max_fn(state.count), norm.dtype) / (norm + 1e-6), 1.0)
    clipped = _common.tree_map_float(lambda g: g * coef.astype(g.dtype), updates)
    return clipped, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_grad_value(clip_value: Any) -> optax.GradientTransformation:
  r"""`torch.nn.utils.clip_grad_value_`: clamp every gradient element to :math:`[-c, c]`.

  .. math::
      g \leftarrow \min(\max(g, -c), c).

  A complex leaf is clamped part by part (jadam's rule for complex parameters,
  PyTorch's `view_as_real`; torch itself refuses to clamp complex tensors).
  Put it first in the chain, as :func:`clip_grad_norm`.

  Args:
    clip_value: :math:`c \ge 0`: a float, a scalar array or a schedule.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  _hparams.check_hyperparameter("clip_value", clip_value, low=0.0)
  clip_fn = _hparams.as_schedule(clip_value, "clip_value")

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.torch.clip_grad_value")
    _common.check_state("jadam.torch.clip_grad_value", state, optax.ScaleByScheduleState)
    c = clip_fn(state.count)

    def clamp(g):
      cc = _hparams.cast_hyperparameter(c, _common.real_dtype(g.dtype))
      return _common.componentwise(lambda x: jnp.clip(x, -cc, cc), g)

    clipped = _common.tree_map_float(clamp, updates)
    return clipped, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
