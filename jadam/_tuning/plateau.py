"""The plateau rule: "did this metric improve?" and PyTorch's ReduceLROnPlateau, in the core.

PyTorch's `ReduceLROnPlateau` calls a value better than the best so far only
if it beats it by a threshold, relative or absolute, in the direction of
`mode`. Keras's `EarlyStopping` with `min_delta` is the absolute form. Both
:class:`jadam.torch.ReduceLROnPlateau` and :func:`jadam.early_stopping` call
:func:`is_better`, so the two can never disagree on what an improvement is.

:class:`PlateauRule` is the whole of ReduceLROnPlateau's rule (patience,
cooldown, factor, floor), as an Optax transformation fed the metric.
:class:`jadam.torch.ReduceLROnPlateau` wraps it with PyTorch's signature, and
:func:`jadam.sweep` runs it once per configuration; neither restates it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam._core import common as _common


def check_mode(mode: str, threshold_mode: str) -> None:
  """Raises `ValueError` for a `mode` other than "min"/"max" or a `threshold_mode` other than "rel"/"abs"."""
  if mode not in ("min", "max"):
    raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}.")
  if threshold_mode not in ("rel", "abs"):
    raise ValueError(f"threshold_mode must be 'rel' or 'abs'; got {threshold_mode!r}.")


def worst(mode: str) -> float:
  """The best value before any was seen: +inf when minimizing, -inf when maximizing."""
  return math.inf if mode == "min" else -math.inf


def is_better(
  value: jax.Array | float, best: jax.Array | float, *, mode: str, threshold: float, threshold_mode: str
) -> jax.Array | bool:
  r"""Whether `value` improves on `best`: PyTorch's ``ReduceLROnPlateau.is_better``.

  .. math::
      \text{min, rel: } v < b(1 - \tau), \quad \text{min, abs: } v < b - \tau, \quad
      \text{max, rel: } v > b(1 + \tau), \quad \text{max, abs: } v > b + \tau.

  A NaN value is never better. Elementwise, so it works on a vector of metrics.
  """
  if mode == "min" and threshold_mode == "rel":
    return value < best * (1.0 - threshold)
  if mode == "min":
    return value < best - threshold
  if threshold_mode == "rel":
    return value > best * (threshold + 1.0)
  return value > best + threshold


def rule_of(plateau: object) -> PlateauRule | None:
  """The :class:`PlateauRule` of `plateau`: itself, or the `.rule` of a front door's scheduler; else None."""
  rule = plateau if isinstance(plateau, PlateauRule) else getattr(plateau, "rule", None)
  return rule if isinstance(rule, PlateauRule) else None


class ReduceLROnPlateauState(NamedTuple):
  """State of ``PlateauRule.transform`` (and of :meth:`jadam.torch.ReduceLROnPlateau.transform`)."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: optimizer steps taken
  lr: jax.Array  # the current learning rate
  best: jax.Array
  num_bad_epochs: jax.Array  # int32
  cooldown_counter: jax.Array  # int32


@dataclasses.dataclass(frozen=True)
class PlateauRule:
  r"""PyTorch's `ReduceLROnPlateau` rule, without the learning rate it starts from.

  Fed one metric per epoch:

  - the metric is *better* than the best so far by :func:`is_better`;
  - otherwise the count of bad epochs grows; during a cooldown it is held at 0;
  - once it exceeds `patience`, :math:`\eta \leftarrow \max(f\eta, \eta_{\min})`
    if that lowers :math:`\eta` by more than `eps`, and a cooldown of
    `cooldown` epochs starts.

  Args:
    mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps:
      PyTorch's, with its defaults and its error messages.
  """

  mode: str = "min"
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  threshold_mode: str = "rel"
  cooldown: int = 0
  min_lr: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    if self.factor >= 1.0:
      raise ValueError("Factor should be < 1.0.")
    if self.mode not in ("min", "max"):
      raise ValueError("mode " + str(self.mode) + " is unknown!")
    if self.threshold_mode not in ("rel", "abs"):
      raise ValueError("threshold mode " + str(self.threshold_mode) + " is unknown!")

  def is_better(self, value: jax.Array | float, best: jax.Array | float) -> jax.Array | bool:
    """:func:`is_better` with this rule's mode and threshold."""
    return is_better(value, best, mode=self.mode, threshold=self.threshold, threshold_mode=self.threshold_mode)

  def init(self, lr: jax.typing.ArrayLike) -> ReduceLROnPlateauState:
    """The state before any metric: learning rate `lr`, the worst best, no bad epochs, no cooldown."""
    dtype = _common.float_dtype()
    zero = jnp.zeros([], jnp.int32)
    return ReduceLROnPlateauState(
      count=zero,
      lr=jnp.asarray(lr, dtype),
      best=jnp.asarray(worst(self.mode), dtype),
      num_bad_epochs=zero,
      cooldown_counter=zero,
    )

  def feed(self, state: ReduceLROnPlateauState, value: jax.typing.ArrayLike) -> ReduceLROnPlateauState:
    """The state after one epoch ended with metric `value` (a scalar); `count` is left as it is."""
    current = jnp.asarray(value).astype(state.best.dtype)
    better = self.is_better(current, state.best)
    best = jnp.where(better, current, state.best)
    bad = jnp.where(better, 0, state.num_bad_epochs + 1)
    in_cooldown = state.cooldown_counter > 0
    cooldown_counter = jnp.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
    bad = jnp.where(in_cooldown, 0, bad)
    reduce = bad > self.patience
    new_lr = jnp.maximum(state.lr * self.factor, jnp.asarray(self.min_lr, state.lr.dtype))
    lr = jnp.where(jnp.logical_and(reduce, state.lr - new_lr > self.eps), new_lr, state.lr)
    cooldown_counter = jnp.where(reduce, self.cooldown, cooldown_counter)
    bad = jnp.where(reduce, 0, bad)
    return ReduceLROnPlateauState(state.count, lr, best, bad.astype(jnp.int32), cooldown_counter.astype(jnp.int32))

  def transform(
    self, lr: jax.typing.ArrayLike = 1.0, *, steps_per_epoch: int = 1, name: str = "ReduceLROnPlateau"
  ) -> optax.GradientTransformationExtraArgs:
    """Scale updates by the current learning rate, then feed `value` (read on each epoch's last update).

    Args:
      lr: the initial learning rate.
      steps_per_epoch: updates per epoch; the metric passed with the others is ignored.
      name: what error messages call the transformation.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose update takes the metric
      as ``update(updates, state, params, value=metric)``.
    """

    def init_fn(params):
      del params
      return self.init(lr)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
      del params, extra_args
      _common.check_state(name, state, ReduceLROnPlateauState)
      if value is None:
        raise TypeError("ReduceLROnPlateau needs the metric: call update(grads, state, params, value=metric).")

      def scale(u):
        dtype = _common.compute_dtype(u.dtype)
        return (state.lr.astype(dtype) * u.astype(dtype)).astype(u.dtype)

      if np.ndim(value) != 0:  # it would broadcast into the learning rate, then into the parameters
        raise ValueError(
          f"ReduceLROnPlateau's value (the metric) must be a scalar; got an array of shape {np.shape(value)}."
          " Pass the loss itself, e.g. value=loss.mean()."
        )
      updates = _common.tree_map_float(scale, updates)
      count = optax.safe_increment(state.count)
      fed = self.feed(state, value)._replace(count=count)
      held = state._replace(count=count)
      epoch_end = count % steps_per_epoch == 0
      return updates, jax.tree.map(lambda a, b: jnp.where(epoch_end, a, b), fed, held)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
