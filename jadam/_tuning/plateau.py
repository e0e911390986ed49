"""The one rule for "did this metric improve?", shared by ReduceLROnPlateau and early stopping.

PyTorch's `ReduceLROnPlateau` calls a value better than the best so far only
if it beats it by a threshold, relative or absolute, in the direction of
`mode`. Keras's `EarlyStopping` with `min_delta` is the absolute form. Both
jadam schedulers and :func:`jadam.early_stopping` call :func:`is_better`, so
the two can never disagree on what an improvement is.
"""

from __future__ import annotations

import math

import jax


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
  value: jax.typing.ArrayLike, best: jax.typing.ArrayLike, *, mode: str, threshold: float, threshold_mode: str
) -> jax.Array:
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
