"""Weight penalties: coupled L2 (before the moments) or decoupled decay (after)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import sparse

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages.moments import expect_updates


class AddL2State(NamedTuple):
  """State for :func:`add_l2`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: for a scheduled weight_decay


@_registry.stage("add_l2", state=AddL2State)
def add_l2(
  weight_decay: optax.ScalarOrSchedule,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""Add :math:`\lambda\theta` to the updates.

  .. math::
      g_t \leftarrow g_t + \lambda \theta_{t-1}.

  Where it stands decides what it is. Before :func:`scale_by_moments` it is the
  gradient of an L2 penalty :math:`\tfrac{\lambda}{2}\lVert\theta\rVert^2`,
  PyTorch's coupled `weight_decay` of `torch.optim.Adam`. After
  :func:`normalize` and before :func:`scale_by_lr` it is decoupled weight decay
  (AdamW, Loshchilov & Hutter), scaled by the learning rate, exactly as
  `optax.add_decayed_weights` in `optax.adamw`.

  Args:
    weight_decay: :math:`\lambda \ge 0`: a float, a scalar array or a schedule.
    mask: A tree of booleans shaped like (a prefix of) the params, or a callable
      returning one: the penalty applies where it is True (e.g. not to biases).
      With `optax.inject_hyperparams`, name it in `static_args`.

  Returns:
    An :class:`optax.GradientTransformation`; it needs `params`.
  """
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  wd_fn = _hparams.as_schedule(weight_decay, "weight_decay")

  def init_fn(params):
    del params
    return AddL2State(count=jnp.zeros([], jnp.int32))

  # A weight_decay known to be zero now adds nothing: the stage keeps its place and
  # its state (so the chain's structure does not depend on the value, as
  # optax.inject_hyperparams needs) but neither computes nor needs the params.
  static_zero = _hparams.is_zero(weight_decay)

  def update_fn(updates, state, params=None):
    expect_updates(updates, "jadam.add_l2")
    if static_zero:
      _common.check_state("jadam.add_l2", state, AddL2State)
      return updates, AddL2State(count=optax.safe_increment(state.count))
    _refuse_rows(updates)
    if params is None:
      raise ValueError("jadam.add_l2 needs the parameters: call update(grads, state, params).")
    _common.check_state("jadam.add_l2", state, AddL2State)
    _common.check_tree("jadam.add_l2", updates, "the params", params, _common.PARAMS_HINT)
    wd = wd_fn(state.count)

    def add(g, p):
      dtype = _common.compute_dtype(g.dtype)
      lam = _hparams.cast_hyperparameter(wd, dtype)
      return (g.astype(dtype) + lam * p.astype(dtype)).astype(g.dtype)

    updates = _common.tree_map_float(add, updates, params)
    return updates, AddL2State(count=optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def _refuse_rows(updates: Any) -> None:
  """A row-sparse (`BCOO`) gradient and a weight decay that may be nonzero: PyTorch refuses the pair."""
  leaves = jax.tree_util.tree_leaves_with_path(updates, is_leaf=_common.is_update_leaf)
  where = [jax.tree_util.keystr(p) or "the root" for p, g in leaves if isinstance(g, sparse.BCOO)]
  if where:
    raise ValueError(
      f"jadam.add_l2: weight_decay is not compatible with sparse gradients (the gradient at {where[0]} is a"
      " row-sparse BCOO), as in PyTorch (Adagrad: 'weight_decay option is not compatible with sparse"
      " gradients'; SGD: 'add(sparse, dense) is not supported'). Pass weight_decay=0 (a Python number) for"
      " the tables, e.g. in their own parameter group."
    )


class DecoupledDecayState(NamedTuple):
  """State for :func:`decoupled_decay`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: for scheduled rates


_CONVENTIONS = ("torch", "keras")


@_registry.stage("decoupled_decay", state=DecoupledDecayState)
def decoupled_decay(
  weight_decay: optax.ScalarOrSchedule,
  learning_rate: optax.ScalarOrSchedule,
  *,
  convention: str = "torch",
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied to the parameters before the step, rounded as PyTorch or Keras round it.

  .. math::
      \theta' = \theta\,(1 - \alpha_t\lambda) \;\text{(torch)} \quad\text{or}\quad
      \theta' = \theta - (\theta\lambda)\,\alpha_t \;\text{(keras)}, \qquad
      \Delta \leftarrow (\theta' + \Delta) - \theta,

  where :math:`\Delta = -\alpha_t u_t` is the step that arrives. Both are
  algebraically :func:`jadam.add_l2` between :func:`jadam.normalize` and
  :func:`jadam.scale_by_lr` (as in :func:`jadam.adamw`); they differ only in
  rounding. `"torch"` is `torch.optim.AdamW`'s (and NAdam/RAdam's
  `decoupled_weight_decay`): the factor :math:`1 - \alpha\lambda` is formed in
  double on the host (for Python floats) and rounded once to the parameter's
  dtype. In float32 the additive form drifts from PyTorch by about 0.3 ulp a
  step, because PyTorch's rounded factor is off from :math:`1 - \alpha\lambda`
  in the same direction every step; this form does not. `"keras"` is Keras 3's
  base-optimizer decay, computed in the variable's dtype. The last subtraction
  is exact (the two are within a factor two), so `optax.apply_updates` lands on
  the reference's :math:`\theta' - \alpha_t u_t` bit for bit when the step
  agrees.

  Args:
    weight_decay: :math:`\lambda \ge 0`: a float, a scalar array or a schedule.
    learning_rate: :math:`\alpha`, the step's learning rate (the same value or
      schedule given to :func:`jadam.scale_by_lr`).
    convention: ``"torch"`` (default) or ``"keras"``: whose rounding to follow.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates; it
    needs `params`. Put it after :func:`jadam.scale_by_lr`.
  """
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  _hparams.check_learning_rate(learning_rate)
  if convention not in _CONVENTIONS:
    raise ValueError(f"convention must be one of {_CONVENTIONS}; got {convention!r}.")
  wd_fn = _hparams.as_schedule(weight_decay, "weight_decay")
  lr_fn = _hparams.as_schedule(learning_rate, "learning_rate")
  stage = "jadam.decoupled_decay"

  def init_fn(params):
    del params
    return DecoupledDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    expect_updates(updates, stage)
    if params is None:
      raise ValueError(f"{stage} needs the parameters: call update(grads, state, params).")
    _common.check_state(stage, state, DecoupledDecayState)
    _common.check_tree(stage, updates, "the params", params, _common.PARAMS_HINT)
    lr, wd = lr_fn(state.count), wd_fn(state.count)
    if convention == "keras":

      def shrink(p):
        return p - p * _hparams.cast_hyperparameter(wd, p.dtype) * _hparams.cast_hyperparameter(lr, p.dtype)
    else:
      if isinstance(lr, numbers.Number) and isinstance(wd, numbers.Number):
        factor = 1.0 - lr * wd  # in double, as PyTorch
      else:
        dtype = _common.float_dtype()
        factor = 1.0 - _hparams.cast_hyperparameter(lr, dtype) * _hparams.cast_hyperparameter(wd, dtype)

      def shrink(p):
        return p * jnp.asarray(factor).astype(p.dtype)

    def decay(u, p):
      return ((shrink(p) + u.astype(p.dtype)) - p).astype(u.dtype)

    return _common.tree_map_float(decay, updates, params), DecoupledDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
