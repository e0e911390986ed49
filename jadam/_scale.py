"""The stages that turn moments into a step: divide (`normalize`, `normalize_inf`), add momentum, flip, scale by the learning rate."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _common
from jadam._moments import expect_moments, expect_updates


def normalize(
  eps: optax.ScalarOrSchedule = 1e-8, *, eps_root: optax.ScalarOrSchedule = 0.0
) -> optax.GradientTransformation:
  r"""Divide the first moment by the root of the second: Adam's direction.

  .. math::
      u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{\text{root}}} + \epsilon}.

  :math:`\epsilon` is added outside the root, as PyTorch, Optax and the paper
  do; :math:`\epsilon_{\text{root}}` inside it, as Optax offers (it keeps the
  gradient of the update finite when differentiating through it). The
  division is done in float32 or wider and the result cast to each gradient's
  dtype, so float16 parameters with a zero gradient get 0, not 0/0.

  Args:
    eps: :math:`\epsilon \ge 0`: a float, a scalar array or a schedule.
    eps_root: :math:`\epsilon_{\text{root}} \ge 0`, of the same kinds.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    parameter-shaped updates. It uses `count` from the moments for schedules.
  """
  _common.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  _common.check_hyperparameter("eps_root", eps_root, low=0.0, wide_dtype=True)
  eps_fn, eps_root_fn = _common.as_schedule(eps, "eps"), _common.as_schedule(eps_root, "eps_root")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.normalize")
    step = moments.count - 1  # the count before the increment, as everywhere
    e, e_root = eps_fn(step), eps_root_fn(step)

    def divide(m, v, g):
      dtype = _common.compute_dtype(m.dtype)
      real = _common.real_dtype(dtype)
      root, eps_ = _common.cast_hyperparameter(e_root, real), _common.cast_hyperparameter(e, real)

      def one(m, v):  # on real numbers: each part of a complex leaf alone (PyTorch's view_as_real)
        u = m / (jnp.sqrt(v + root) + eps_)
        if moments.step_scale is not None:
          u = u * jnp.asarray(moments.step_scale).astype(real)
        return u

      return _common.componentwise(one, m.astype(dtype), v.astype(dtype)).astype(g.dtype)

    return _common.tree_map_float(divide, moments.mu, moments.nu, moments.grad), state

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByLrState(NamedTuple):
  """State for :func:`scale_by_lr`."""

  count: jax.Array  # shape=(), int32: steps taken so far


def scale_by_lr(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  r"""Multiply the updates by :math:`-\alpha_t`, the learning rate, for `optax.apply_updates`.

  .. math::
      \Delta\theta_t = -\alpha_t\, u_t.

  Args:
    learning_rate: :math:`\alpha \ge 0`: a float, a scalar array or a schedule
      of the step count (read at the count before this step, as
      `optax.scale_by_learning_rate` does).

  Returns:
    An :class:`optax.GradientTransformation`; updates keep each leaf's dtype.
    Integer and boolean leaves get a zero update of their dtype (they do not
    move); `None` and float0 leaves go through as they came.
  """
  _common.check_hyperparameter("learning_rate", learning_rate, low=0.0)
  lr_fn = _common.as_schedule(learning_rate, "learning_rate")

  def init_fn(params):
    del params
    return ScaleByLrState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.scale_by_lr")
    _common.check_state("jadam.scale_by_lr", state, ScaleByLrState)
    lr = lr_fn(state.count)

    def scale(u):
      dtype = _common.compute_dtype(u.dtype)
      return (-_common.cast_hyperparameter(lr, dtype) * u.astype(dtype)).astype(u.dtype)

    def scale_or_zero(u):
      if _common.is_float_leaf(u):
        return scale(u)
      if u is None or jnp.result_type(u) == jax.dtypes.float0:
        return u  # no gradient, or jax.grad's float0 for an integer input: already nothing
      return jnp.zeros_like(u)  # an integer or boolean leaf does not move

    return jax.tree.map(scale_or_zero, updates, is_leaf=lambda x: x is None), ScaleByLrState(
      count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)


class MomentumState(NamedTuple):
  """State for :func:`momentum`."""

  count: jax.Array  # shape=(), int32: steps taken so far
  trace: optax.Updates


def momentum(
  decay: optax.ScalarOrSchedule = 0.9,
  *,
  dampening: optax.ScalarOrSchedule = 0.0,
  nesterov: bool = False,
  accumulator_dtype=None,
) -> optax.GradientTransformation:
  r"""Heavy-ball (or Nesterov) momentum with PyTorch's dampening.

  .. math::
      b_1 = u_1, \qquad b_t = \mu\, b_{t-1} + (1 - \tau)\, u_t, \qquad
      u_t \leftarrow \begin{cases} u_t + \mu\, b_t & \text{nesterov} \\ b_t & \text{otherwise.}\end{cases}

  :math:`\mu = 0` passes the updates through, dampening or not, as PyTorch
  does. With :math:`\tau = 0` this is `optax.trace` (:math:`b_0 = 0`), which jadam
  would reuse, but `optax.trace` takes neither a dampening :math:`\tau` (whose
  first step PyTorch leaves undamped) nor a scheduled :math:`\mu`.

  Args:
    decay: :math:`\mu \in [0, 1]`: a float, a scalar array or a schedule.
    dampening: :math:`\tau \in [0, 1]`, of the same kinds.
    nesterov: Nesterov's variant; as in PyTorch it needs dampening 0.
    accumulator_dtype: Storage dtype of :math:`b`; by default the parameter's.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates.

  References:
    Sutskever et al., `On the importance of initialization and momentum
    <https://proceedings.mlr.press/v28/sutskever13.html>`_, ICML 2013.
  """
  _common.check_hyperparameter("momentum", decay, low=0.0, high=1.0)
  _common.check_hyperparameter("dampening", dampening, low=0.0, high=1.0)
  _common.check_flag("nesterov", nesterov)
  _common.check_dtype("accumulator_dtype", accumulator_dtype)
  if nesterov and _common.concrete_value(dampening) not in (None, 0.0):
    raise ValueError("Nesterov momentum requires zero dampening.")
  decay_fn, damp_fn = _common.as_schedule(decay, "momentum"), _common.as_schedule(dampening, "dampening")

  def init_fn(params):
    zeros = jax.tree.map(
      lambda p: jnp.zeros_like(
        p, _common.state_dtype(p, accumulator_dtype, widen=False) if _common.is_float_leaf(p) else None
      ),
      params,
    )
    return MomentumState(count=jnp.zeros([], jnp.int32), trace=zeros)

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.momentum")
    _common.check_state("jadam.momentum", state, MomentumState)
    _common.check_tree("jadam.momentum", updates, "the state's trace", state.trace, _common.STATE_HINT)
    mu, tau = decay_fn(state.count), damp_fn(state.count)
    first = state.count == 0

    def accumulate(g, b):
      dtype = _common.compute_dtype(g.dtype)
      g = g.astype(dtype)
      m = _common.cast_hyperparameter(mu, dtype)
      new = m * b.astype(dtype) + (1 - _common.cast_hyperparameter(tau, dtype)) * g
      # mu = 0 is no momentum at all in PyTorch: dampening does not apply
      # (a traced mu, under optax.inject_hyperparams, cannot be tested in Python).
      return jnp.where(first | (m == 0), g, new)

    trace = _common.tree_map_float(accumulate, updates, state.trace)
    out = trace
    if nesterov:
      out = _common.tree_map_float(
        lambda g, b: g.astype(b.dtype) + _common.cast_hyperparameter(mu, b.dtype) * b, updates, trace
      )
    out = _common.tree_map_float(lambda g, u: u.astype(g.dtype), updates, out)
    stored = _common.tree_map_float(lambda g, b, s: b.astype(s.dtype), updates, trace, state.trace, keep=2)
    return out, MomentumState(count=optax.safe_increment(state.count), trace=stored)

  return optax.GradientTransformation(init_fn, update_fn)


def flip_sign() -> optax.GradientTransformation:
  r"""Negate the updates, PyTorch's `maximize=True`.

  .. math::
      g_t \leftarrow -g_t.

  Unlike `optax.scale(-1)`, integer and `None` leaves pass through untouched.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates;
    stateless.
  """

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.flip_sign")
    return _common.tree_map_float(jnp.negative, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def normalize_inf() -> optax.GradientTransformation:
  r"""Divide the first moment by the infinity norm: Adamax's direction.

  .. math::
      u_t = \hat m_t / u_t,

  with :math:`u_t` from :func:`scale_by_inf_moments` (which already holds
  :math:`\epsilon`). Computed in float32 or wider, cast to each gradient's dtype.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    parameter-shaped updates; stateless.
  """

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.normalize_inf")

    def divide(m, u, g):
      dtype = _common.compute_dtype(m.dtype)
      real = _common.real_dtype(dtype)

      def one(m, u):  # on real numbers: each part of a complex leaf alone
        out = m / u
        if moments.step_scale is not None:
          out = out * jnp.asarray(moments.step_scale).astype(real)
        return out

      return _common.componentwise(one, m.astype(dtype), u.astype(dtype)).astype(g.dtype)

    return _common.tree_map_float(divide, moments.mu, moments.nu, moments.grad), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
