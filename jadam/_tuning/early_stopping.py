"""Early stopping as a pure state: stop after `patience` epochs without improvement."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._tuning import plateau as _plateau


class EarlyStoppingState(NamedTuple):
  """State of :func:`early_stopping`; every field a scalar array (a vector under `vmap`)."""

  epoch: jax.Array  # int32: metrics seen so far
  best: jax.Array  # the best metric so far (inf, or -inf in mode "max", before the first)
  num_bad_epochs: jax.Array  # int32: epochs since the last improvement
  stopped_epoch: jax.Array  # int32: the epoch whose metric stopped the run; 0 while it runs


class EarlyStopping(NamedTuple):
  """``init() -> state`` and ``update(state, value) -> state``, both pure."""

  init: Callable[[], EarlyStoppingState]
  update: Callable[[EarlyStoppingState, jax.typing.ArrayLike], EarlyStoppingState]


def early_stopping(
  patience: int, min_delta: float = 0.0, *, mode: str = "min", threshold_mode: str = "abs"
) -> EarlyStopping:
  r"""Stop when the metric has not improved for `patience` epochs in a row.

  The usual counter (Keras's `EarlyStopping`, the PyTorch Lightning callback):
  keep the best metric so far and the number :math:`k` of epochs since it
  improved; stop at the first epoch where :math:`k` reaches `patience`.
  "Improved" is PyTorch `ReduceLROnPlateau`'s rule, the same code
  (:func:`jadam.torch.ReduceLROnPlateau` uses it), with `min_delta` as its
  threshold :math:`\tau`:

  .. math::
      \text{better}(v) = \begin{cases}
        v < b - \tau & \text{mode min, threshold\_mode abs (default)} \\
        v < b(1 - \tau) & \text{mode min, rel} \\
        v > b + \tau \;\text{or}\; v > b(1 + \tau) & \text{mode max}
      \end{cases}

  A NaN metric never improves. Once stopped, the state no longer changes:
  ``state.stopped_epoch`` keeps the (1-based) epoch that stopped it, and is 0
  while the run goes on. Pure and branch-free, so it runs under `jit`, and
  under `vmap` one state per configuration (:func:`jadam.sweep` does that).

  Args:
    patience: epochs without improvement before stopping (0: stop at the
      first epoch that does not improve).
    min_delta: :math:`\tau \ge 0`, the least change that counts as an
      improvement (absolute, or relative with ``threshold_mode="rel"``).
    mode: "min" for a loss, "max" for an accuracy.
    threshold_mode: "abs" (Keras's `min_delta`) or "rel" (PyTorch's default
      for `ReduceLROnPlateau`).

  Returns:
    An :class:`EarlyStopping` of pure ``init`` and ``update`` functions.

  Examples:
    >>> import jadam
    >>> stopper = jadam.early_stopping(patience=2)
    >>> state = stopper.init()
    >>> for loss in [1.0, 0.8, 0.9, 0.85, 0.7]:
    ...   state = stopper.update(state, loss)
    >>> int(state.stopped_epoch), round(float(state.best), 6)
    (4, 0.8)
  """
  if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
    raise ValueError(f"patience must be an integer >= 0; got {patience!r}.")
  _hparams.check_hyperparameter("min_delta", min_delta, low=0.0)
  if _hparams.is_schedule(min_delta):
    raise TypeError("min_delta must be a number, not a schedule.")
  _plateau.check_mode(mode, threshold_mode)
  patience = int(patience)

  def init_fn() -> EarlyStoppingState:
    zero = jnp.zeros([], jnp.int32)
    best = jnp.asarray(_plateau.worst(mode), _common.float_dtype())
    return EarlyStoppingState(epoch=zero, best=best, num_bad_epochs=zero, stopped_epoch=zero)

  def update_fn(state: EarlyStoppingState, value: jax.typing.ArrayLike) -> EarlyStoppingState:
    _common.check_state("jadam.early_stopping", state, EarlyStoppingState)
    if np.ndim(value) != 0:
      raise ValueError(f"early_stopping takes one metric a call; got an array of shape {np.shape(value)} (vmap it).")
    value = jnp.asarray(value).astype(state.best.dtype)
    better = _plateau.is_better(value, state.best, mode=mode, threshold=min_delta, threshold_mode=threshold_mode)
    epoch = state.epoch + 1
    bad = jnp.where(better, 0, state.num_bad_epochs + 1).astype(jnp.int32)
    stop = jnp.logical_and(jnp.logical_not(better), bad >= patience)
    new = EarlyStoppingState(
      epoch=epoch,
      best=jnp.where(better, value, state.best),
      num_bad_epochs=bad,
      stopped_epoch=jnp.where(stop, epoch, 0).astype(jnp.int32),
    )
    running = state.stopped_epoch == 0
    return jax.tree.map(lambda a, b: jnp.where(running, a, b), new, state)

  return EarlyStopping(init_fn, update_fn)
