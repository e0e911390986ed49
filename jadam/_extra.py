"""The stages that Adamax, NAdam and RAdam add to Adam's, and their recipes.

Each is one line of its paper that Adam's stages cannot express:

- :func:`scale_by_inf_moments` and :func:`normalize_inf`: Adamax's exponentially
  weighted infinity norm in place of the second moment;
- :func:`nesterov_correct`: NAdam's momentum schedule and Nesterov look-ahead;
- :func:`rectify`: RAdam's variance rectification.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam import _common, _moments
from jadam._alias import _front, _is_zero
from jadam._moments import Moments, bias_correct, scale_by_moments
from jadam._scale import normalize, scale_by_lr

Dtype = Any


class ScaleByInfMomentsState(NamedTuple):
  """State for :func:`scale_by_inf_moments`."""

  count: jax.Array  # shape=(), int32: steps taken so far
  mu: optax.Updates
  nu: optax.Updates  # u_t, the weighted infinity norm


def scale_by_inf_moments(
    b1: optax.ScalarOrSchedule = 0.9,
    b2: optax.ScalarOrSchedule = 0.999,
    eps: optax.ScalarOrSchedule = 1e-8,
    *,
    mu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""Adamax's moments: the first moment and an exponentially weighted infinity norm.

  .. math::
      m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
      u_t = \max(\beta_2 u_{t-1},\; |g_t| + \epsilon), \qquad m_0 = u_0 = 0.

  :math:`\epsilon` is added inside the maximum, as PyTorch does, so that
  :math:`u_t > 0` whenever :math:`\epsilon > 0`. The norm is not biased towards
  zero, so the :class:`Moments` carry :math:`\beta_2 = 0` for it and
  :func:`jadam.bias_correct` corrects only :math:`m_t`. Follow with
  :func:`normalize_inf`, which divides by :math:`u_t` itself (not a root).

  Args:
    b1: Decay of the first moment, in [0, 1): a float, a scalar array or a schedule.
    b2: Decay of the infinity norm, in [0, 1), of the same kinds.
    eps: :math:`\epsilon \ge 0`, of the same kinds.
    mu_dtype: Storage dtype of :math:`m`; by default the parameter's.

  Returns:
    An :class:`optax.GradientTransformation` whose updates are :class:`Moments`.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014, Algorithm 2.
  """
  _common.check_hyperparameter("b1", b1, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _common.check_hyperparameter("b2", b2, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _common.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  _moments._check_dtype("mu_dtype", mu_dtype)
  b1_fn, b2_fn, eps_fn = _common.as_schedule(b1), _common.as_schedule(b2), _common.as_schedule(eps)

  def init_fn(params):
    return ScaleByInfMomentsState(
        count=jnp.zeros([], jnp.int32),
        mu=_moments._zeros(params, mu_dtype, widen=False),
        nu=_moments._zeros(params, None, widen=True),
    )

  def update_fn(updates, state, params=None):
    del params
    _moments.expect_updates(updates, "jadam.scale_by_inf_moments")
    _common.check_state("jadam.scale_by_inf_moments", state, ScaleByInfMomentsState)
    _common.check_tree("jadam.scale_by_inf_moments", updates, "the state's nu", state.nu, _common.STATE_HINT)
    beta1, beta2, e = b1_fn(state.count), b2_fn(state.count), eps_fn(state.count)
    mu = _moments._ema(updates, state.mu, beta1, square=False)

    def norm(g, u):
      dtype = _common.compute_dtype(g.dtype)
      decayed = _common.cast_hyperparameter(beta2, dtype) * u.astype(dtype)
      return jnp.maximum(decayed, jnp.abs(g.astype(dtype)) + _common.cast_hyperparameter(e, dtype))

    nu = _common.tree_map_float(norm, updates, state.nu)
    count = optax.safe_increment(state.count)
    keep = lambda new, old: _common.tree_map_float(lambda g, x, s: x.astype(s.dtype), updates, new, old, keep=2)
    moments = Moments(mu=mu, nu=nu, count=count, b1=beta1, b2=0.0, grad=updates)
    return moments, ScaleByInfMomentsState(count=count, mu=keep(mu, state.mu), nu=keep(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


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
    moments = _moments.expect_moments(updates, "jadam.normalize_inf")

    def divide(m, u, g):
      dtype = _common.compute_dtype(m.dtype)
      out = m.astype(dtype) / u.astype(dtype)
      if moments.step_scale is not None:
        out = out * jnp.asarray(moments.step_scale).astype(dtype)
      return out.astype(g.dtype)

    return _common.tree_map_float(divide, moments.mu, moments.nu, moments.grad), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


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
  _common.check_hyperparameter("momentum_decay", momentum_decay, low=0.0)
  psi_fn = _common.as_schedule(momentum_decay)

  def init_fn(params):
    del params
    return NesterovCorrectState(mu_product=jnp.ones([], _common.float_dtype()))

  def update_fn(updates, state, params=None):
    del params
    moments = _moments.expect_moments(updates, "jadam.nesterov_correct")
    _common.check_state("jadam.nesterov_correct", state, NesterovCorrectState)
    if moments.bias_corrected:
      raise TypeError("jadam.nesterov_correct replaces jadam.bias_correct; use one of them.")
    dtype = _common.float_dtype()
    t = moments.count.astype(dtype)
    psi = psi_fn(moments.count - 1)
    b1 = _common.cast_hyperparameter(moments.b1, dtype)
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
    nu_hat = _common.tree_map_float(lambda v: v / c2.astype(v.dtype), moments.nu)
    out = moments._replace(mu=mu_hat, nu=nu_hat, bias_corrected=True)
    return out, NesterovCorrectState(mu_product=mu_product)

  return optax.GradientTransformation(init_fn, update_fn)


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
  _common.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  eps_fn = _common.as_schedule(eps)

  def update_fn(updates, state, params=None):
    del params
    moments = _moments.expect_moments(updates, "jadam.rectify")
    if moments.bias_corrected:
      raise TypeError("jadam.rectify corrects the moments itself; do not put jadam.bias_correct before it.")
    dtype = _common.float_dtype()
    t = moments.count.astype(dtype)
    b2 = _common.cast_hyperparameter(moments.b2, dtype)
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
      m_hat = m.astype(dt) / c1.astype(dt)
      adaptive = jnp.sqrt(c2).astype(dt) / (jnp.sqrt(v.astype(dt)) + _common.cast_hyperparameter(e, dt))
      scale = jnp.where(tractable, adaptive * rect.astype(dt), jnp.ones([], dt))
      return (m_hat * scale).astype(g.dtype)

    return _common.tree_map_float(direction, moments.mu, moments.nu, moments.grad), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class DecoupledDecayState(NamedTuple):
  """State for :func:`decoupled_decay`."""

  count: jax.Array  # shape=(), int32: for scheduled rates


def decoupled_decay(
    weight_decay: optax.ScalarOrSchedule, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
  r"""PyTorch's decoupled weight decay, :math:`\theta \leftarrow \theta(1 - \alpha_t\lambda)` before the step.

  .. math::
      \Delta \leftarrow \bigl(\theta \cdot (1 - \alpha_t\lambda) + \Delta\bigr) - \theta,

  where :math:`\Delta = -\alpha_t u_t` is the step that arrives. It is
  algebraically :func:`jadam.add_l2` between :func:`jadam.normalize` and
  :func:`jadam.scale_by_lr` (as in :func:`jadam.adamw`), but rounds as
  `torch.optim.AdamW` does: the factor :math:`1 - \alpha\lambda` is formed in
  double on the host (for Python floats) and rounded once to the parameter's
  dtype, and the last subtraction is exact (the two are within a factor two).
  In float32 the additive form drifts from PyTorch by about 0.3 ulp a step,
  because PyTorch's rounded factor is off from :math:`1 - \alpha\lambda` in
  the same direction every step; this form does not.

  Args:
    weight_decay: :math:`\lambda \ge 0`: a float, a scalar array or a schedule.
    learning_rate: :math:`\alpha`, the step's learning rate (the same value or
      schedule given to :func:`jadam.scale_by_lr`).

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates; it
    needs `params`. Put it after :func:`jadam.scale_by_lr`.
  """
  _common.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  _common.check_hyperparameter("learning_rate", learning_rate, low=0.0)
  wd_fn, lr_fn = _common.as_schedule(weight_decay), _common.as_schedule(learning_rate)

  def init_fn(params):
    del params
    return DecoupledDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    _moments.expect_updates(updates, "jadam.decoupled_decay")
    if params is None:
      raise ValueError("jadam.decoupled_decay needs the parameters: call update(grads, state, params).")
    _common.check_state("jadam.decoupled_decay", state, DecoupledDecayState)
    _common.check_tree("jadam.decoupled_decay", updates, "the params", params, _common.PARAMS_HINT)
    lr, wd = lr_fn(state.count), wd_fn(state.count)
    if isinstance(lr, numbers.Number) and isinstance(wd, numbers.Number):
      factor = 1.0 - lr * wd  # in double, as PyTorch
    else:
      dtype = _common.float_dtype()
      factor = 1.0 - _common.cast_hyperparameter(lr, dtype) * _common.cast_hyperparameter(wd, dtype)

    def decay(u, p):
      dtype = p.dtype
      shrunk = p * jnp.asarray(factor).astype(dtype)
      return ((shrunk + u.astype(dtype)) - p).astype(u.dtype)

    return _common.tree_map_float(decay, updates, params), DecoupledDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _tail(
    direction: list[optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    decoupled_weight_decay: bool,
) -> list[optax.GradientTransformation]:
  """The step, then PyTorch's decoupled decay if asked for."""
  decay = [decoupled_decay(weight_decay, learning_rate)] if decoupled_weight_decay and not _is_zero(weight_decay) else []
  return [*direction, scale_by_lr(learning_rate), *decay]


def adamax(
    learning_rate: optax.ScalarOrSchedule = 2e-3,
    b1: optax.ScalarOrSchedule = 0.9,
    b2: optax.ScalarOrSchedule = 0.999,
    eps: optax.ScalarOrSchedule = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    maximize: bool = False,
    mu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""Adamax, with the semantics and defaults of `torch.optim.Adamax`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} && \text{(\texttt{add\_l2})}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)
            && \text{(\texttt{scale\_by\_inf\_moments})}\\
        \theta_t &= \theta_{t-1} - \frac{\alpha_t}{1 - \beta_1^t}\, \frac{m_t}{u_t}
            && \text{(\texttt{bias\_correct}, \texttt{normalize\_inf}, \texttt{scale\_by\_lr})}
      \end{align*}

  Unlike `optax.adamax`, :math:`\epsilon` is inside the maximum (PyTorch's
  choice) and the default learning rate is PyTorch's :math:`2\cdot10^{-3}`.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    weight_decay: coupled L2 :math:`\lambda \ge 0`.
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014, Algorithm 2.
  """
  return optax.chain(
      *_front(maximize, weight_decay),
      scale_by_inf_moments(b1, b2, eps, mu_dtype=mu_dtype),
      bias_correct(),
      normalize_inf(),
      scale_by_lr(learning_rate),
  )


def nadam(
    learning_rate: optax.ScalarOrSchedule = 2e-3,
    b1: optax.ScalarOrSchedule = 0.9,
    b2: optax.ScalarOrSchedule = 0.999,
    eps: optax.ScalarOrSchedule = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    momentum_decay: optax.ScalarOrSchedule = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    mu_dtype: Dtype | None = None,
    nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""NAdam, with the semantics and defaults of `torch.optim.NAdam`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1}
            && \text{(coupled L2 unless decoupled)}\\
        m_t, v_t &\text{ as in Adam} && \text{(\texttt{scale\_by\_moments})}\\
        \hat m_t &= \frac{1-\mu_t}{1-\Pi_t} g_t + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}} m_t,
        \quad \hat v_t = \frac{v_t}{1-\beta_2^t}
            && \text{(\texttt{nesterov\_correct})}\\
        \theta_t &= [(1 - \alpha_t\lambda)]\,\theta_{t-1} - \alpha_t\frac{\hat m_t}{\sqrt{\hat v_t}+\epsilon}
            && \text{(\texttt{normalize}, \texttt{scale\_by\_lr}, [\texttt{decoupled\_decay}])}
      \end{align*}

  with :math:`\mu_t = \beta_1(1 - \frac12 0.96^{t\psi})` (see
  :func:`nesterov_correct`). Unlike `optax.nadam`, the momentum follows
  Dozat's decay schedule, as PyTorch's does.

  Args:
    learning_rate: :math:`\alpha` (PyTorch's default :math:`2\cdot10^{-3}`).
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    weight_decay: :math:`\lambda \ge 0`.
    momentum_decay: :math:`\psi \ge 0`.
    decoupled_weight_decay: apply :math:`\lambda` as AdamW does (NAdamW).
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m`.
    nu_dtype: Storage dtype of :math:`v`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Dozat, ICLR 2016 workshop.
  """
  _common.check_flag("decoupled_weight_decay", decoupled_weight_decay)
  return optax.chain(
      *_front(maximize, 0.0 if decoupled_weight_decay else weight_decay),
      scale_by_moments(b1, b2, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
      *_tail([nesterov_correct(momentum_decay), normalize(eps)], learning_rate, weight_decay, decoupled_weight_decay),
  )


def radam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: optax.ScalarOrSchedule = 0.9,
    b2: optax.ScalarOrSchedule = 0.999,
    eps: optax.ScalarOrSchedule = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    mu_dtype: Dtype | None = None,
    nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""RAdam, with the semantics and defaults of `torch.optim.RAdam`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1}
            && \text{(coupled L2 unless decoupled)}\\
        m_t, v_t &\text{ as in Adam} && \text{(\texttt{scale\_by\_moments})}\\
        u_t &= \hat m_t\, r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}
            \text{ if } \rho_t > 5 \text{ else } \hat m_t
            && \text{(\texttt{rectify})}\\
        \theta_t &= [(1 - \alpha_t\lambda)]\,\theta_{t-1} - \alpha_t u_t
            && \text{(\texttt{scale\_by\_lr}, [\texttt{decoupled\_decay}])}
      \end{align*}

  See :func:`rectify` for :math:`\rho_t` and :math:`r_t`. :math:`\epsilon` is
  added to the uncorrected root, as in PyTorch (Optax's `radam` adds it to the
  corrected one and has a threshold of 5 as well).

  Args:
    learning_rate: :math:`\alpha`.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    weight_decay: :math:`\lambda \ge 0`.
    decoupled_weight_decay: apply :math:`\lambda` as AdamW does.
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m`.
    nu_dtype: Storage dtype of :math:`v`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Liu et al., ICLR 2020.
  """
  _common.check_flag("decoupled_weight_decay", decoupled_weight_decay)
  return optax.chain(
      *_front(maximize, 0.0 if decoupled_weight_decay else weight_decay),
      scale_by_moments(b1, b2, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
      *_tail([rectify(eps)], learning_rate, weight_decay, decoupled_weight_decay),
  )
