"""Hyperparameters: the checks every factory runs, and a value or a schedule as a function of the step.

Every jadam factory, every front door (`jadam.torch`, `jadam.keras`) and the
sweep read their hyperparameters through this module, so that what counts as a
schedule, a valid learning rate or a value known now is decided in one place.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.typing.ArrayLike]


def is_schedule(value: Any) -> bool:
  """Whether `value` is a schedule (a callable of the step count) rather than a number or an array.

  jax arrays and NumPy arrays are never schedules; everything else callable is,
  including the `jadam.torch` schedulers.
  """
  return callable(value) and not isinstance(value, (jax.Array, np.ndarray))


def concrete_value(value: Any) -> float | None:
  """`value` as a Python float if it is known now (not traced), else None."""
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    try:
      return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
      return None
  return None


def check_hyperparameter(
  name: str,
  value: Any,
  *,
  low: float = -math.inf,
  high: float = math.inf,
  low_open: bool = False,
  high_open: bool = False,
  allow_none: bool = False,
  wide_dtype: bool = False,
) -> None:
  """Raises a clear error for a hyperparameter that cannot be right.

  Only what is known at construction is checked: a Python number or a concrete
  scalar array. Tracers (under `optax.inject_hyperparams` inside `jit`) and
  schedules are accepted as they are; branching on them would fail to trace.

  Args:
    name: the argument's name, as the user wrote it.
    value: its value.
    low, high: the allowed interval; `low_open`/`high_open` exclude the ends.
    allow_none: whether `None` is a valid value.
    wide_dtype: if set, an array of a float dtype narrower than float32 is
      refused: bfloat16 rounds 0.999 to 1.0 and float16 rounds 1e-8 to 0.
  """
  if value is None and allow_none:
    return
  if is_schedule(value):
    return  # a schedule: checked by what it returns, not here
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, jax.Array, np.ndarray, np.generic)):
    raise TypeError(
      f"{name} must be a float, a scalar array or a schedule (a callable of"
      f" the step count); got {type(value).__name__} {value!r}."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if np.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar; got an array of shape {np.shape(value)}.")
    dtype = jnp.dtype(value.dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"{name} must be a real number; got dtype {dtype}.")
    if wide_dtype and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
      raise TypeError(
        f"{name} arrived as {dtype}, which cannot hold it (bfloat16 rounds"
        " 0.999 to 1.0, float16 rounds 1e-8 to 0). Keep hyperparameters in"
        " float32 or wider: with optax.inject_hyperparams pass"
        " hyperparam_dtype=jnp.float32."
      )
  x = concrete_value(value)
  if x is None:
    return
  too_low = x <= low if low_open else x < low
  too_high = x >= high if high_open else x > high
  # No hyperparameter means anything at infinity: an infinite rate or eps is a NaN update later.
  if not math.isfinite(x) or too_low or too_high:
    lo = "(" if low_open or low == -math.inf else "["
    hi = ")" if high_open or high == math.inf else "]"
    raise ValueError(f"Invalid {name}: {x!r}; it must lie in {lo}{low}, {high}{hi}.")


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
  """Raises a clear error unless `value` is a learning rate: a float, a scalar array or a schedule, at least 0."""
  check_hyperparameter(name, value, low=0.0)


def check_flag(name: str, value: Any) -> None:
  """Raises a `TypeError` unless `value` is a bool (flags choose the chain in Python: 1 or "yes" would slip by)."""
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}.")


def as_schedule(value: optax.ScalarOrSchedule, name: str = "a hyperparameter") -> Schedule:
  """A hyperparameter as a function of the step count (jax's `make_schedule`).

  A Python float stays a Python float, so that `1 - b` is formed in double
  precision on the host, as PyTorch does, before it meets the parameters. A
  schedule is checked, at trace time, to return a scalar: an array would
  broadcast into the parameters and change their shape.
  """
  if is_schedule(value):

    def checked(count):
      out = value(count)
      if np.ndim(out) != 0:
        raise ValueError(
          f"The schedule given as {name} returned an array of shape {np.shape(out)}; a schedule must return a scalar."
        )
      return out

    return checked
  return lambda count: value


def cast_hyperparameter(value: jax.typing.ArrayLike, dtype: jnp.dtype) -> jax.Array | complex:
  """`value` ready to meet an array of `dtype` under strict dtype promotion.

  Python numbers stay weakly typed (and exact in double until they meet the
  array); arrays are cast, since float32 * float64 is an error under strict
  promotion.
  """
  # NumPy scalars register as numbers.Number but are strongly typed:
  # np.float32 meeting a float64 array is refused, so they are cast too.
  if isinstance(value, numbers.Number) and not isinstance(value, np.generic):
    return value
  return jnp.asarray(value).astype(dtype)


def is_zero(value: Any) -> bool:
  """True only for a Python number equal to 0: a stage that would add nothing may be left out.

  Arrays and schedules are never zero here (they may change under
  `optax.inject_hyperparams`), so no Python branch ever reads a traced value.
  """
  return isinstance(value, numbers.Number) and not isinstance(value, bool) and value == 0
