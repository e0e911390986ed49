"""Keras 3's front door: `keras.optimizers.Adam` and `AdamW` with Keras's names and arithmetic.

Keras folds the bias correction into the step size and adds its epsilon to the
uncorrected root (the paper's "more efficient" ordering, eps-hat), defaults
epsilon to 1e-7, and applies `weight_decay` in its base optimizer, before the
update: :math:`\\theta \\leftarrow \\theta - \\theta\\lambda\\alpha`. These
factories return Optax transformations made of jadam's stages, in that form.
This module never imports Keras.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._stages.moments import Moments, expect_moments, expect_updates, max_nu
from jadam._stages.penalty import decoupled_decay


class KerasMomentsState(NamedTuple):
  """State for :func:`scale_by_keras_moments`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32
  mu: optax.Updates
  nu: optax.Updates


def scale_by_keras_moments(
  beta_1: optax.ScalarOrSchedule = 0.9, beta_2: optax.ScalarOrSchedule = 0.999
) -> optax.GradientTransformation:
  r"""Adam's moments in Keras's arithmetic: increments, in the variable's dtype.

  .. math::
      m_t = m_{t-1} + (g_t - m_{t-1})(1 - \beta_1), \qquad
      v_t = v_{t-1} + (g_t^2 - v_{t-1})(1 - \beta_2).

  Algebraically :func:`jadam.scale_by_moments`; in floating point it rounds as
  `keras.optimizers.Adam` does, which keeps float32 within an ulp of Keras
  where the other form drifts. Gives :class:`jadam.Moments`.

  Args:
    beta_1: :math:`\beta_1 \in [0, 1)`: a float, a scalar array or a schedule.
    beta_2: :math:`\beta_2 \in [0, 1)`, of the same kinds.

  Returns:
    An :class:`optax.GradientTransformation` whose updates are :class:`jadam.Moments`.
  """
  _hparams.check_hyperparameter("beta_1", beta_1, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _hparams.check_hyperparameter("beta_2", beta_2, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  b1_fn, b2_fn = _hparams.as_schedule(beta_1, "beta_1"), _hparams.as_schedule(beta_2, "beta_2")

  def init_fn(params):
    zeros = _common.state_zeros(params, None, widen=True)
    return KerasMomentsState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.keras.scale_by_keras_moments")
    _common.check_state("jadam.keras.scale_by_keras_moments", state, KerasMomentsState)
    _common.check_tree("jadam.keras.scale_by_keras_moments", updates, "the state's nu", state.nu, _common.STATE_HINT)
    b1, b2 = b1_fn(state.count), b2_fn(state.count)

    def step(decay, square):
      def one(g, m):
        dtype = m.dtype
        g = g.astype(dtype)
        x = g * g if square else g
        return m + (x - m) * (1 - _hparams.cast_hyperparameter(decay, dtype))

      return one

    mu = _common.tree_map_float(step(b1, False), updates, state.mu)
    nu = _common.tree_map_float(step(b2, True), updates, state.nu)
    count = optax.safe_increment(state.count)
    moments = Moments(mu=mu, nu=nu, count=count, b1=b1, b2=b2, grad=updates)
    return moments, KerasMomentsState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


class KerasStepState(NamedTuple):
  """State for :func:`keras_step`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: for a scheduled learning rate


def keras_step(
  learning_rate: optax.ScalarOrSchedule = 0.001, epsilon: optax.ScalarOrSchedule = 1e-7
) -> optax.GradientTransformation:
  r"""Keras's Adam step, bias correction folded into the step size, rounded as Keras rounds it.

  .. math::
      \alpha_t = \frac{\alpha \sqrt{1 - \beta_2^t}}{1 - \beta_1^t}, \qquad
      \Delta_t = -\frac{m_t\,\alpha_t}{\sqrt{v_t} + \hat\epsilon},

  with :math:`\beta^t` formed by `pow` in the parameter's dtype, as Keras does.
  It is `bias_correct(into_step=True)`, `normalize(epsilon)` and
  `scale_by_lr(learning_rate)` in one line: the same algebra, but Keras's
  float32 :math:`1 - \beta^t` (less accurate than jadam's
  :math:`-\operatorname{expm1}(t\log\beta)`) changes every update's scale in the
  same direction, 21 float32 ulps of the parameters after 500 steps. With this
  stage the trajectory is Keras's to the bit in our tests.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule.
    epsilon: :math:`\hat\epsilon \ge 0`, added to the uncorrected root.

  Returns:
    An :class:`optax.GradientTransformation` from uncorrected
    :class:`jadam.Moments` to parameter-shaped updates.
  """
  _hparams.check_learning_rate(learning_rate)
  _hparams.check_hyperparameter("epsilon", epsilon, low=0.0, wide_dtype=True)
  lr_fn, eps_fn = _hparams.as_schedule(learning_rate, "learning_rate"), _hparams.as_schedule(epsilon, "epsilon")

  def init_fn(params):
    del params
    return KerasStepState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.keras.keras_step")
    _common.check_state("jadam.keras.keras_step", state, KerasStepState)
    if moments.bias_corrected:
      raise TypeError("jadam.keras.keras_step corrects the moments itself; remove jadam.bias_correct before it.")
    lr, e = lr_fn(state.count), eps_fn(state.count)

    def step(m, v, g):
      dtype = m.dtype
      t = moments.count.astype(dtype)
      b1_power = jnp.power(_hparams.cast_hyperparameter(moments.b1, dtype) + jnp.zeros([], dtype), t)
      b2_power = jnp.power(_hparams.cast_hyperparameter(moments.b2, dtype) + jnp.zeros([], dtype), t)
      alpha = _hparams.cast_hyperparameter(lr, dtype) * jnp.sqrt(1 - b2_power) / (1 - b1_power)
      return (-((m * alpha) / (jnp.sqrt(v.astype(dtype)) + _hparams.cast_hyperparameter(e, dtype)))).astype(g.dtype)

    out = _common.tree_map_float(step, moments.mu, moments.nu, moments.grad)
    return out, KerasStepState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def Adam(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  beta_1: optax.ScalarOrSchedule = 0.9,
  beta_2: optax.ScalarOrSchedule = 0.999,
  epsilon: optax.ScalarOrSchedule = 1e-7,
  amsgrad: bool = False,
  *,
  weight_decay: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
  r"""`keras.optimizers.Adam`, with Keras 3's names, defaults and arithmetic.

  .. math::
      \begin{align*}
        \theta &\leftarrow \theta - \theta\lambda\alpha_t
            && \text{(if weight\_decay: \texttt{decoupled\_decay})}\\
        m_t &= m_{t-1} + (g_t - m_{t-1})(1-\beta_1), \quad
        v_t = v_{t-1} + (g_t^2 - v_{t-1})(1-\beta_2)
            && \text{(\texttt{scale\_by\_keras\_moments})}\\
        v_t &\leftarrow \max(v^{\max}_{t-1}, v_t) && \text{(amsgrad: \texttt{max\_nu})}\\
        \theta_t &= \theta - \alpha_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
            \frac{m_t}{\sqrt{v_t} + \hat\epsilon}
            && \text{(\texttt{keras\_step})}
      \end{align*}

  :math:`\hat\epsilon` (`epsilon`, default :math:`10^{-7}`) is added to the
  uncorrected root: on the corrected scale it acts as
  :math:`\hat\epsilon/\sqrt{1-\beta_2^t}`, about 32 times larger at the
  first step than PyTorch's eps. Moments are kept in the parameter's dtype, as
  Keras keeps them in the variable's.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule of the
      step count (Keras's `LearningRateSchedule` is read at `iterations`, the
      same count).
    beta_1: :math:`\beta_1 \in [0, 1)`.
    beta_2: :math:`\beta_2 \in [0, 1)`.
    epsilon: :math:`\hat\epsilon \ge 0`.
    amsgrad: keep the maximum of the raw :math:`v_t`, as Keras does.
    weight_decay: Keras's base-optimizer decay :math:`\lambda`, or None.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  _hparams.check_flag("amsgrad", amsgrad)
  if weight_decay is not None:
    _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  decay = (
    []
    if weight_decay is None or _hparams.is_zero(weight_decay)
    else [decoupled_decay(weight_decay, learning_rate, convention="keras")]
  )
  return optax.chain(
    scale_by_keras_moments(beta_1, beta_2),
    *([max_nu()] if amsgrad else []),
    keras_step(learning_rate, epsilon),
    *decay,
  )


def AdamW(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  weight_decay: optax.ScalarOrSchedule = 0.004,
  beta_1: optax.ScalarOrSchedule = 0.9,
  beta_2: optax.ScalarOrSchedule = 0.999,
  epsilon: optax.ScalarOrSchedule = 1e-7,
  amsgrad: bool = False,
) -> optax.GradientTransformation:
  r"""`keras.optimizers.AdamW`: :func:`Adam` with Keras's default weight_decay of 0.004.

  The decay is Keras's, decoupled and scaled by the learning rate only,
  applied before the Adam step: :math:`\theta \leftarrow \theta -
  \theta\lambda\alpha_t` (not :math:`\alpha_t\lambda\theta` after it, as
  PyTorch; the same to rounding). Argument order is Keras's.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  if weight_decay is None:
    raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
  return Adam(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay=weight_decay)
