r"""Adafactor's stages: factored second moments, update clipping by RMS, steps relative to the parameters' scale.

:func:`scale_by_factored_moments` produces :class:`jadam.Moments` whose second
moment is rebuilt from a row and a column average (Shazeer & Stern's factored
estimate), so the existing :func:`jadam.normalize` divides by its root; then
:func:`clip_by_rms` bounds the update's RMS, :func:`scale_by_param_rms`
multiplies by the parameters' RMS, and :func:`scale_by_relative_step` applies
Adafactor's step size. :func:`jadam.adafactor` is
the chain, with `torch.optim.Adafactor`'s semantics.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages.moments import Moments, expect_updates
from jadam._stages.scale import ScaleByLrState, scale_by_lr


class ScaleByFactoredMomentsState(NamedTuple):
  """State for :func:`scale_by_factored_moments`, with PyTorch's names and shapes.

  A parameter of two or more dimensions has `row_var` (its shape with the last
  axis 1) and `col_var` (the next-to-last axis 1) and `None` for `variance`; a
  vector or scalar has `variance` (its own shape) and `None` for the others.
  """

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken so far
  row_var: optax.Updates  # R_t, shape (..., m, 1), per >= 2-D parameter
  col_var: optax.Updates  # C_t, shape (..., 1, n)
  variance: optax.Updates  # V_t, per vector or scalar parameter


def _is_none(x: Any) -> bool:
  return x is None


def _is_tuple(x: Any) -> bool:
  return type(x) is tuple  # not a NamedTuple such as optax.MaskedNode


def _unzip(tree: Any, n: int) -> tuple[Any, ...]:
  """A tree of n-tuples (at its leaves) as n trees."""
  return tuple(jax.tree.map(lambda t, i=i: t[i], tree, is_leaf=_is_tuple) for i in range(n))


@_registry.stage("scale_by_factored_moments", state=ScaleByFactoredMomentsState)
def scale_by_factored_moments(
  beta2_decay: optax.ScalarOrSchedule = -0.8,
  *,
  eps: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
  r"""Adafactor's second moment: factored into row and column averages for matrices, full for vectors.

  With :math:`w_t = t^{\tau}` (:math:`\tau` is `beta2_decay`, so
  :math:`\hat\beta_{2,t} = 1 - w_t` and :math:`w_1 = 1`), for a parameter of
  two or more dimensions (the last two factored, the leading ones batched):

  .. math::
      \begin{align*}
        R_t &= R_{t-1} + w_t\bigl(\operatorname{mean}_{\text{cols}}(g_t^2) - R_{t-1}\bigr), \qquad
        C_t = C_{t-1} + w_t\bigl(\operatorname{mean}_{\text{rows}}(g_t^2) - C_{t-1}\bigr),\\
        \hat V_t &= \max\Bigl(\frac{R_t C_t}{\max(\operatorname{mean}_{\text{rows}}(R_t),\ \epsilon_1)},\
            \epsilon_1^2\Bigr),
      \end{align*}

  and for a vector or scalar :math:`V_t = V_{t-1} + w_t(g_t^2 - V_{t-1})`,
  :math:`\hat V_t = \max(V_t, \epsilon_1^2)`; :math:`R_0 = C_0 = V_0 = 0`. The
  averages are `torch.lerp`'s (``torch_lerp`` in ``jadam._core.common``), as
  `torch.optim.Adafactor` updates them. :math:`\epsilon_1` enters where
  PyTorch puts it: as a floor under the row factors' mean and, squared, under
  :math:`\hat V_t` (so :func:`jadam.normalize` with ``eps=0`` divides by
  :math:`\max(\sqrt{\hat V_t}, \epsilon_1)`), not added to :math:`g^2` as the
  paper and Optax do.

  Args:
    beta2_decay: :math:`\tau \le 0`: a float, a scalar array or a schedule.
    eps: :math:`\epsilon_1 \ge 0`, of the same kinds, or ``None`` for the
      machine epsilon of each parameter's dtype (PyTorch's default).

  Returns:
    An :class:`optax.GradientTransformation` whose updates are
    :class:`jadam.Moments` with :math:`m_t = g_t` and :math:`v_t = \hat V_t`
    (already unbiased: they carry decays 0, so :func:`jadam.bias_correct` is a
    no-op); follow with ``jadam.normalize(0.0)``.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _hparams.check_hyperparameter("beta2_decay", beta2_decay, high=0.0, wide_dtype=True)
  _hparams.check_hyperparameter("eps", eps, low=0.0, allow_none=True, wide_dtype=True)
  decay_fn = _hparams.as_schedule(beta2_decay, "beta2_decay")
  eps_fn = None if eps is None else _hparams.as_schedule(eps, "eps")
  stage = "jadam.scale_by_factored_moments"

  def init_fn(params):
    def zeros(p):
      if not _common.is_float_leaf(p):
        return None, None, jnp.zeros_like(p)
      if jnp.iscomplexobj(p):
        raise TypeError(f"{stage}: Adafactor does not support complex parameters (as torch.optim.Adafactor).")
      dtype = _common.state_dtype(p, None, widen=True)
      if p.ndim >= 2:
        return jnp.zeros((*p.shape[:-1], 1), dtype), jnp.zeros((*p.shape[:-2], 1, p.shape[-1]), dtype), None
      return None, None, jnp.zeros(p.shape, dtype)

    row, col, var = _unzip(jax.tree.map(zeros, params), 3)
    return ScaleByFactoredMomentsState(count=jnp.zeros([], jnp.int32), row_var=row, col_var=col, variance=var)

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, stage)
    _common.check_state(stage, state, ScaleByFactoredMomentsState)
    full = jax.tree.map(
      lambda r, c, v: v if r is None else jax.ShapeDtypeStruct((*r.shape[:-1], c.shape[-1]), r.dtype),
      state.row_var,
      state.col_var,
      state.variance,
      is_leaf=_is_none,
    )
    _common.check_tree(stage, updates, "the state's moments", full, _common.STATE_HINT)
    wide = _common.float_dtype()
    t = optax.safe_increment(state.count).astype(wide)
    tau = decay_fn(state.count)
    w = jnp.power(t, _hparams.cast_hyperparameter(tau, wide))
    e = None if eps_fn is None else eps_fn(state.count)

    def one(g, r, c, v):
      if not _common.is_float_leaf(g):
        return g, r, c, v
      dtype = _common.compute_dtype(g.dtype)
      e1 = float(jnp.finfo(g.dtype).eps) if e is None else e  # torch: finfo(param.dtype).eps
      e1 = _hparams.cast_hyperparameter(e1, dtype)
      g = g.astype(dtype)
      square = g * g
      if r is not None:
        r = _common.torch_lerp(r.astype(dtype), jnp.mean(square, axis=-1, keepdims=True), w)
        c = _common.torch_lerp(c.astype(dtype), jnp.mean(square, axis=-2, keepdims=True), w)
        estimate = (r * c) / jnp.maximum(jnp.mean(r, axis=-2, keepdims=True), e1)
      else:
        v = _common.torch_lerp(v.astype(dtype), square, w)
        estimate = v
      return jnp.maximum(estimate, e1 * e1), r, c, v

    out = jax.tree.map(one, updates, state.row_var, state.col_var, state.variance, is_leaf=_is_none)
    nu, row, col, var = _unzip(out, 4)

    def keep(new, old):  # the new statistics in the state's dtypes, None where the leaf has none of that kind
      return jax.tree.map(lambda n, o: None if o is None else n.astype(o.dtype), new, old, is_leaf=_is_none)

    count = optax.safe_increment(state.count)
    moments = Moments(mu=updates, nu=nu, count=count, b1=0.0, b2=0.0, grad=updates)
    new_state = ScaleByFactoredMomentsState(
      count=count,
      row_var=keep(row, state.row_var),
      col_var=keep(col, state.col_var),
      variance=keep(var, state.variance),
    )
    return moments, new_state

  return optax.GradientTransformation(init_fn, update_fn)


@_registry.stage("clip_by_rms", state=optax.ScaleByScheduleState)
def clip_by_rms(threshold: optax.ScalarOrSchedule = 1.0) -> optax.GradientTransformation:
  r"""Scale each leaf's update down so that its root mean square is at most `threshold`.

  .. math::
      \hat u = \frac{u}{\max\bigl(1,\ \operatorname{RMS}(u) / d\bigr)}, \qquad
      \operatorname{RMS}(u) = \sqrt{\operatorname{mean}(u^2)},

  Adafactor's update clipping (`torch.optim.Adafactor`'s `d`). It is
  `optax.clip_by_block_rms` computed in float32 or wider, leaving integer and
  `None` leaves alone, and with a schedulable threshold.

  Args:
    threshold: :math:`d > 0`: a float, a scalar array or a schedule.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates; it
    keeps a step count for the schedule.
  """
  _hparams.check_hyperparameter("threshold", threshold, low=0.0, low_open=True)
  d_fn = _hparams.as_schedule(threshold, "threshold")
  stage = "jadam.clip_by_rms"

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, stage)
    d = d_fn(state.count)

    def clip(u):
      dtype = _common.compute_dtype(u.dtype)
      x = u.astype(dtype)
      denom = jnp.maximum(1.0, jnp.sqrt(jnp.mean(x * x)) / _hparams.cast_hyperparameter(d, dtype))
      return (x / denom).astype(u.dtype)

    return _common.tree_map_float(clip, updates), optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(
    lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update_fn
  )


@_registry.stage("scale_by_param_rms", state=optax.ScaleByScheduleState)
def scale_by_param_rms(min_scale: optax.ScalarOrSchedule = 1e-3) -> optax.GradientTransformation:
  r"""Multiply each leaf's update by the root mean square of its parameter, at least `min_scale`.

  .. math::
      u \leftarrow \max\bigl(\epsilon_2,\ \operatorname{RMS}(\theta_{t-1})\bigr)\, u,

  Adafactor's relative step (`torch.optim.Adafactor`'s :math:`\epsilon_2`,
  Optax's `multiply_by_parameter_scale` with `eps_scale`). It is
  `optax.scale_by_param_block_rms` computed in float32 or wider, leaving
  integer and `None` leaves alone, and with a schedulable floor.

  Args:
    min_scale: :math:`\epsilon_2 \ge 0`: a float, a scalar array or a schedule.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates; it
    needs `params`.
  """
  _hparams.check_hyperparameter("min_scale", min_scale, low=0.0)
  scale_fn = _hparams.as_schedule(min_scale, "min_scale")
  stage = "jadam.scale_by_param_rms"

  def update_fn(updates, state, params=None):
    expect_updates(updates, stage)
    if params is None:
      raise ValueError(f"{stage} needs the parameters: call update(grads, state, params).")
    _common.check_tree(stage, updates, "the params", params, _common.PARAMS_HINT)
    floor = scale_fn(state.count)

    def scale(u, p):
      dtype = _common.compute_dtype(u.dtype)
      x = p.astype(dtype)
      factor = jnp.maximum(_hparams.cast_hyperparameter(floor, dtype), jnp.sqrt(jnp.mean(x * x)))
      return (u.astype(dtype) * factor).astype(u.dtype)

    new_state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
    return _common.tree_map_float(scale, updates, params), new_state

  return optax.GradientTransformation(
    lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update_fn
  )


def relative_step(learning_rate: optax.ScalarOrSchedule = 1e-2) -> _hparams.Schedule:
  r"""Adafactor's step size as PyTorch computes it: :math:`\rho_t = \min(\alpha_t, 1/\sqrt{t})`.

  A schedule of the step count (:math:`t` is the count plus one, as
  :func:`jadam.scale_by_lr` reads schedules at the count before the step), for
  ``jadam.scale_by_lr(relative_step(lr))``. The paper and Optax use 0.01 where
  PyTorch uses the learning rate :math:`\alpha_t` (itself a float, an array or
  a schedule).

  Args:
    learning_rate: :math:`\alpha \ge 0`.

  Returns:
    A function of the step count.
  """
  _hparams.check_hyperparameter("learning_rate", learning_rate, low=0.0)
  lr_fn = _hparams.as_schedule(learning_rate, "learning_rate")

  def schedule(count):
    dtype = _common.float_dtype()
    t = (jnp.asarray(count) + 1).astype(dtype)
    lr = lr_fn(count)
    lr = jnp.asarray(lr, dtype) if isinstance(lr, numbers.Number) else jnp.asarray(lr).astype(dtype)
    return jnp.minimum(lr, 1 / jnp.sqrt(t))

  return schedule


@_registry.stage("scale_by_relative_step", state=ScaleByLrState)
def scale_by_relative_step(learning_rate: optax.ScalarOrSchedule = 1e-2) -> optax.GradientTransformation:
  r"""Multiply the updates by :math:`-\rho_t = -\min(\alpha_t, 1/\sqrt{t})`, Adafactor's step size in PyTorch.

  .. math::
      \Delta\theta_t = -\min(\alpha_t, 1/\sqrt{t})\, u_t.

  :func:`jadam.scale_by_lr` of ``relative_step``'s schedule (its state is
  :class:`jadam.ScaleByLrState`).

  Args:
    learning_rate: :math:`\alpha \ge 0`: a float, a scalar array or a schedule.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates.
  """
  return scale_by_lr(relative_step(learning_rate))
