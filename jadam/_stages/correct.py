"""The corrections: what turns raw moments into the estimates a step divides.

`bias_correct` (Adam's :math:`1 - \\beta^t`), `nesterov_correct` (NAdam's
momentum schedule and look-ahead) and `rectify` (RAdam's variance
rectification, which also divides). Each reads the decays and :math:`t` from
the :class:`jadam.Moments` it receives, never from arguments of its own.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages.moments import expect_moments


@_registry.stage("bias_correct", state=optax.EmptyState)
def bias_correct(*, into_step: bool = False) -> optax.GradientTransformation:
  r"""Correct the moments for their zero initialisation.

  .. math::
      \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad
      \hat v_t = \frac{v_t}{1 - \beta_2^t}.

  The decays and :math:`t` are read from the :class:`Moments` it receives, so
  they cannot disagree with those :func:`scale_by_moments` used (schedules
  included). :math:`1 - \beta^t` is computed as
  :math:`-\operatorname{expm1}(t \log\beta)`, which keeps float32 within an ulp
  or two of PyTorch's double-precision factor.

  Args:
    into_step: Fold the correction into the step size instead, as Keras and
      the paper's "more efficient" ordering do:
      :math:`u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \hat\epsilon}`.
      The moments go on uncorrected, so :func:`normalize`'s eps is Keras's
      eps-hat: it acts as :math:`\hat\epsilon / \sqrt{1-\beta_2^t}` on the
      corrected scale.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    :class:`Moments`; stateless.
  """

  _hparams.check_flag("into_step", into_step)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.bias_correct")
    if moments.bias_corrected:
      raise TypeError("jadam.bias_correct received moments that are already bias-corrected; use it once.")
    c1 = _common.one_minus_power(moments.b1, moments.count)
    c2 = _common.one_minus_power(moments.b2, moments.count)
    if into_step:
      return moments._replace(bias_corrected=True, step_scale=jnp.sqrt(c2) / c1), state
    mu = _common.tree_map_float(lambda m: _divide(m, c1), moments.mu)
    nu = _common.tree_map_float(lambda v: _divide(v, c2), moments.nu)
    return moments._replace(mu=mu, nu=nu, bias_corrected=True), state

  return optax.GradientTransformation(init_fn, update_fn)


def _divide(x: jax.Array, c: jax.Array) -> jax.Array:
  """`x / c` for a real scalar `c`, part by part on a complex `x` (a complex division would round otherwise)."""
  return _common.componentwise(lambda a: a / c.astype(a.dtype), x)


def _power(b: jax.typing.ArrayLike, exponent: jax.Array) -> jax.Array:
  """:math:`b^x` as :math:`\\exp(x \\log b)`, with :math:`\\log b` in double on the host for a float `b`.

  :math:`b = 0` (a valid :math:`\\beta_2`) gives :math:`\\log b = -\\infty` and :math:`0^x = 0` for the
  exponents :math:`x > 0` used here; `math.log(0)` would raise.
  """
  dtype = _common.float_dtype()
  if isinstance(b, numbers.Number):
    log_b = math.log(b) if b > 0 else -math.inf
  else:
    log_b = jnp.log(jnp.asarray(b).astype(dtype))
  return jnp.exp(exponent.astype(dtype) * log_b)


class NesterovCorrectState(NamedTuple):
  """State for :func:`nesterov_correct`."""

  mu_product: jax.Array  # shape=(), the default float dtype: prod_{i<=t} mu_i


@_registry.stage("nesterov_correct", state=NesterovCorrectState)
def nesterov_correct(momentum_decay: optax.ScalarOrSchedule = 4e-3) -> optax.GradientTransformation:
  r"""NAdam's momentum schedule, Nesterov look-ahead and bias correction.

  .. math::
      \begin{align*}
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right), \qquad
        \Pi_t = \textstyle\prod_{i \le t} \mu_i,\\
        \hat m_t &= \frac{1 - \mu_t}{1 - \Pi_t}\, g_t
                  + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\, m_t, \qquad
        \hat v_t = \frac{v_t}{1 - \beta_2^t},
      \end{align*}

  where :math:`\psi` is `momentum_decay`, :math:`g_t` the gradient that reached
  :func:`jadam.scale_by_moments` and :math:`\beta_1, \beta_2, t` are read from
  the :class:`Moments`. It replaces :func:`jadam.bias_correct` in NAdam; follow
  it with :func:`jadam.normalize`. This is PyTorch's `NAdam`, whose
  :math:`\Pi_t` is kept in the default float dtype (float32 unless x64).

  Args:
    momentum_decay: :math:`\psi \ge 0`: a float, a scalar array or a schedule.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    bias-corrected :class:`Moments`.

  References:
    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR 2016 workshop.
  """
  _hparams.check_hyperparameter("momentum_decay", momentum_decay, low=0.0)
  psi_fn = _hparams.as_schedule(momentum_decay, "momentum_decay")

  def init_fn(params):
    del params
    return NesterovCorrectState(mu_product=jnp.ones([], _common.float_dtype()))

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.nesterov_correct")
    _common.check_state("jadam.nesterov_correct", state, NesterovCorrectState)
    if moments.bias_corrected:
      raise TypeError("jadam.nesterov_correct replaces jadam.bias_correct; use one of them.")
    dtype = _common.float_dtype()
    t = moments.count.astype(dtype)
    psi = psi_fn(moments.count - 1)
    b1 = _hparams.cast_hyperparameter(moments.b1, dtype)
    mu = b1 * (1.0 - 0.5 * _power(0.96, t * psi))
    mu_next = b1 * (1.0 - 0.5 * _power(0.96, (t + 1) * psi))
    mu_product = state.mu_product * mu
    coef_g = (1.0 - mu) / (1.0 - mu_product)
    coef_m = mu_next / (1.0 - mu_product * mu_next)
    c2 = _common.one_minus_power(moments.b2, moments.count)

    def look_ahead(g, m):
      dt = m.dtype
      return coef_g.astype(dt) * g.astype(dt) + coef_m.astype(dt) * m

    mu_hat = _common.tree_map_float(look_ahead, moments.grad, moments.mu)
    nu_hat = _common.tree_map_float(lambda v: _divide(v, c2), moments.nu)
    out = moments._replace(mu=mu_hat, nu=nu_hat, bias_corrected=True)
    return out, NesterovCorrectState(mu_product=mu_product)

  return optax.GradientTransformation(init_fn, update_fn)


@_registry.stage("rectify", state=optax.EmptyState)
def rectify(eps: optax.ScalarOrSchedule = 1e-8) -> optax.GradientTransformation:
  r"""RAdam's rectified direction: Adam's once the variance is tractable, SGD with momentum before.

  .. math::
      \begin{align*}
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t},\\
        u_t &= \begin{cases}
          \hat m_t\, r_t\, \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon},
          \quad r_t = \sqrt{\dfrac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                                  {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
            & \rho_t > 5,\\
          \hat m_t & \text{otherwise,}
        \end{cases}
      \end{align*}

  with :math:`\hat m_t = m_t / (1 - \beta_1^t)` and :math:`\epsilon` added to
  the uncorrected root, as PyTorch's `RAdam` does. The decays and :math:`t` are
  read from the :class:`Moments` of :func:`jadam.scale_by_moments` (uncorrected:
  use it instead of :func:`jadam.bias_correct`).

  Args:
    eps: :math:`\epsilon \ge 0`: a float, a scalar array or a schedule.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    parameter-shaped updates; stateless.

  References:
    Liu et al., `On the Variance of the Adaptive Learning Rate and Beyond
    <https://arxiv.org/abs/1908.03265>`_, ICLR 2020.
  """
  _hparams.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  eps_fn = _hparams.as_schedule(eps, "eps")

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.rectify")
    if moments.bias_corrected:
      raise TypeError("jadam.rectify corrects the moments itself; do not put jadam.bias_correct before it.")
    dtype = _common.float_dtype()
    t = moments.count.astype(dtype)
    b2 = _hparams.cast_hyperparameter(moments.b2, dtype)
    c1 = _common.one_minus_power(moments.b1, moments.count)
    c2 = _common.one_minus_power(moments.b2, moments.count)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    rho_t = rho_inf - 2.0 * t * _power(moments.b2, t) / c2
    tractable = rho_t > 5.0
    rho_safe = jnp.where(tractable, rho_t, rho_inf)  # keeps the untaken branch finite
    rect = jnp.sqrt((rho_safe - 4) * (rho_safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_safe))
    e = eps_fn(moments.count - 1)

    def direction(m, v, g):
      dt = _common.compute_dtype(m.dtype)
      real = _common.real_dtype(dt)
      e_ = _hparams.cast_hyperparameter(e, real)

      def one(m, v):  # on real numbers: each part of a complex leaf alone
        m_hat = m / c1.astype(real)
        adaptive = jnp.sqrt(c2).astype(real) / (jnp.sqrt(v) + e_)
        return m_hat * jnp.where(tractable, adaptive * rect.astype(real), jnp.ones([], real))

      return _common.componentwise(one, m.astype(dt), v.astype(dt)).astype(g.dtype)

    return _common.tree_map_float(direction, moments.mu, moments.nu, moments.grad), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
