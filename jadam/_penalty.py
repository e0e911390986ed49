"""Weight penalties: coupled L2 (before the moments) or decoupled decay (after)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _common, _moments


class AddL2State(NamedTuple):
  """State for :func:`add_l2`."""

  count: jax.Array  # shape=(), int32: for a scheduled weight_decay


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
  _common.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  wd_fn = _common.as_schedule(weight_decay)

  def init_fn(params):
    del params
    return AddL2State(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    _moments.expect_updates(updates, "jadam.add_l2")
    if params is None:
      raise ValueError(
          "jadam.add_l2 needs the parameters: call update(grads, state, params)."
      )
    _common.check_state("jadam.add_l2", state, AddL2State)
    _common.check_tree("jadam.add_l2", updates, "the params", params, _common.PARAMS_HINT)
    wd = wd_fn(state.count)

    def add(g, p):
      dtype = _common.compute_dtype(g.dtype)
      lam = _common.cast_hyperparameter(wd, dtype)
      return (g.astype(dtype) + lam * p.astype(dtype)).astype(g.dtype)

    updates = _common.tree_map_float(add, updates, params)
    return updates, AddL2State(count=optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
