"""The stages that turn moments into a step: divide (`normalize`, `normalize_inf`), add momentum, flip, scale by lr."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import sparse

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages.moments import expect_moments, expect_updates


@_registry.stage("normalize", state=optax.EmptyState)
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
  _hparams.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  _hparams.check_hyperparameter("eps_root", eps_root, low=0.0, wide_dtype=True)
  eps_fn, eps_root_fn = _hparams.as_schedule(eps, "eps"), _hparams.as_schedule(eps_root, "eps_root")

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
      root, eps_ = _hparams.cast_hyperparameter(e_root, real), _hparams.cast_hyperparameter(e, real)

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

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken so far


@_registry.stage("scale_by_lr", state=ScaleByLrState)
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
  _hparams.check_learning_rate(learning_rate)
  lr_fn = _hparams.as_schedule(learning_rate, "learning_rate")

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
      return (-_hparams.cast_hyperparameter(lr, dtype) * u.astype(dtype)).astype(u.dtype)

    def scale_or_zero(u):
      if isinstance(u, sparse.BCOO):  # a row-sparse update (jadam.sparse_adam): scale its values, keep its rows
        return u.__class__(
          (scale(u.data), u.indices), shape=u.shape, indices_sorted=u.indices_sorted, unique_indices=u.unique_indices
        )
      if _common.is_float_leaf(u):
        return scale(u)
      if u is None or jnp.result_type(u) == jax.dtypes.float0:
        return u  # no gradient, or jax.grad's float0 for an integer input: already nothing
      return jnp.zeros_like(u)  # an integer or boolean leaf does not move

    return jax.tree.map(scale_or_zero, updates, is_leaf=_common.is_update_leaf), ScaleByLrState(
      count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)


class MomentumState(NamedTuple):
  """State for :func:`momentum`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken so far
  trace: optax.Updates


@_registry.stage("momentum", state=MomentumState)
def momentum(
  decay: optax.ScalarOrSchedule = 0.9,
  *,
  dampening: optax.ScalarOrSchedule = 0.0,
  nesterov: bool = False,
  accumulator_dtype=None,
  ema: bool = False,
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
    ema: `torch.optim.Muon`'s momentum instead, an exponential moving average
      with `torch.lerp`'s rounding: :math:`b_t = \mu b_{t-1} + (1-\mu) u_t`
      from :math:`b_0 = 0` (no undamped first step), and Nesterov's
      :math:`(1-\mu) u_t + \mu b_t` (dampening must be 0: the average damps
      by :math:`1 - \mu` itself). The state is the same :class:`MomentumState`.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates.

  References:
    Sutskever et al., `On the importance of initialization and momentum
    <https://proceedings.mlr.press/v28/sutskever13.html>`_, ICML 2013.
  """
  _hparams.check_hyperparameter("momentum", decay, low=0.0, high=1.0)
  _hparams.check_hyperparameter("dampening", dampening, low=0.0, high=1.0)
  _hparams.check_flag("nesterov", nesterov)
  _common.check_dtype("accumulator_dtype", accumulator_dtype)
  if nesterov and _hparams.concrete_value(dampening) not in (None, 0.0):
    raise ValueError("Nesterov momentum requires zero dampening.")
  _hparams.check_flag("ema", ema)
  if ema:
    return _ema_momentum(decay, dampening, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
  decay_fn, damp_fn = _hparams.as_schedule(decay, "momentum"), _hparams.as_schedule(dampening, "dampening")

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
      m = _hparams.cast_hyperparameter(mu, dtype)
      new = m * b.astype(dtype) + (1 - _hparams.cast_hyperparameter(tau, dtype)) * g
      # mu = 0 is no momentum at all in PyTorch: dampening does not apply
      # (a traced mu, under optax.inject_hyperparams, cannot be tested in Python).
      return jnp.where(first | (m == 0), g, new)

    trace = _common.tree_map_float(accumulate, updates, state.trace)
    out = trace
    if nesterov:
      out = _common.tree_map_float(
        lambda g, b: g.astype(b.dtype) + _hparams.cast_hyperparameter(mu, b.dtype) * b, updates, trace
      )
    out = _common.tree_map_float(lambda g, u: u.astype(g.dtype), updates, out)
    stored = _common.tree_map_float(lambda g, b, s: b.astype(s.dtype), updates, trace, state.trace, keep=2)
    return out, MomentumState(count=optax.safe_increment(state.count), trace=stored)

  return optax.GradientTransformation(init_fn, update_fn)


@_registry.stage("flip_sign", state=optax.EmptyState)
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


@_registry.stage("normalize_inf", state=optax.EmptyState)
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


class ScaleByDeltaState(NamedTuple):
  """State for :func:`scale_by_delta`."""

  acc_delta: optax.Updates  # the running average of the squared steps, E[dx^2]


@_registry.stage("scale_by_delta", state=ScaleByDeltaState)
def scale_by_delta(
  rho: optax.ScalarOrSchedule = 0.9, eps: optax.ScalarOrSchedule = 1e-6
) -> optax.GradientTransformation:
  r"""Adadelta's step: the gradient scaled by the ratio of two root mean squares.

  .. math::
      \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \qquad
      u_t = \rho\, u_{t-1} + (1 - \rho)\, \Delta_t^2, \qquad u_0 = 0,

  with :math:`v_t` the second moment that :func:`jadam.scale_by_moments` (with
  ``b1=None, b2=rho``) passes on, in PyTorch's order of operations.

  Args:
    rho: :math:`\rho \in [0, 1]`: a float, a scalar array or a schedule.
    eps: :math:`\epsilon \ge 0`, inside both roots.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`jadam.Moments` to
    parameter-shaped updates :math:`\Delta_t` (follow with
    :func:`scale_by_lr`).

  References:
    Zeiler, `ADADELTA: An Adaptive Learning Rate Method <https://arxiv.org/abs/1212.5701>`_, 2012.
  """
  _hparams.check_hyperparameter("rho", rho, low=0.0, high=1.0, wide_dtype=True)
  _hparams.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  rho_fn, eps_fn = _hparams.as_schedule(rho, "rho"), _hparams.as_schedule(eps, "eps")

  def init_fn(params):
    return ScaleByDeltaState(acc_delta=_common.state_zeros(params, None, widen=True))

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.scale_by_delta")
    _common.check_state("jadam.scale_by_delta", state, ScaleByDeltaState)
    _common.check_tree(
      "jadam.scale_by_delta", moments.grad, "the state's acc_delta", state.acc_delta, _common.STATE_HINT
    )
    step = moments.count - 1
    r, e = rho_fn(step), eps_fn(step)

    def both(g, v, a):
      dtype = _common.compute_dtype(g.dtype)
      real = _common.real_dtype(dtype)
      rr, ee = _hparams.cast_hyperparameter(r, real), _hparams.cast_hyperparameter(e, real)

      def one(g, v, a):
        delta = jnp.sqrt(a + ee) / jnp.sqrt(v + ee) * g
        return delta, rr * a + (1 - rr) * (delta * delta)

      if jnp.iscomplexobj(g):
        (dr, ar), (di, ai) = one(*(jnp.real(x) for x in (g, v, a))), one(*(jnp.imag(x) for x in (g, v, a)))
        return jax.lax.complex(dr, di), jax.lax.complex(ar, ai)
      return one(g, v, a)

    def cast(x):
      return x.astype(_common.compute_dtype(x.dtype))

    pairs = _common.tree_map_float(
      lambda g, v, a: both(cast(g), v.astype(cast(g).dtype), a.astype(cast(g).dtype)),
      moments.grad,
      moments.nu,
      state.acc_delta,
    )

    def is_pair(x):
      return type(x) is tuple  # not a NamedTuple such as optax.MaskedNode

    deltas = jax.tree.map(lambda g, x: x[0].astype(g.dtype) if is_pair(x) else x, moments.grad, pairs, is_leaf=is_pair)
    acc = jax.tree.map(lambda s, x: x[1].astype(s.dtype) if is_pair(x) else s, state.acc_delta, pairs, is_leaf=is_pair)
    return deltas, ScaleByDeltaState(acc_delta=acc)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRpropState(NamedTuple):
  """State for :func:`scale_by_rprop`."""

  prev: optax.Updates  # the previous gradient, zeroed where its sign flipped
  step_size: optax.Updates  # each element's step size


def _torch_sign(x: jax.Array) -> jax.Array:
  """PyTorch's `sign`: 1, -1 or 0, and 0 for NaN (`jnp.sign` gives NaN), so that Rprop skips a NaN gradient."""
  return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


@_registry.stage("scale_by_rprop", state=ScaleByRpropState)
def scale_by_rprop(
  learning_rate: jax.typing.ArrayLike = 1e-2,
  etas: tuple[float, float] = (0.5, 1.2),
  step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> optax.GradientTransformation:
  r"""Rprop's step: each element's own step size, grown while its gradient keeps its sign.

  .. math::
      \begin{align*}
        s_t &= \operatorname{clip}\bigl(s_{t-1}\,\eta(g_t g_{t-1}),\; s_{\min},\; s_{\max}\bigr), \qquad
        \eta(x) = \eta_+ \text{ if } x > 0,\ \eta_- \text{ if } x < 0,\ 1 \text{ otherwise},\\
        g_t &\leftarrow 0 \text{ where } g_t g_{t-1} < 0, \qquad
        \Delta_t = \operatorname{sign}(g_t)\, s_t, \qquad s_0 = \text{learning\_rate},
      \end{align*}

  as `torch.optim.Rprop` does (the zeroed gradient is the one remembered).
  :math:`\operatorname{sign}` is PyTorch's, 0 for NaN: an element whose
  gradient is NaN does not move and keeps its step size (its NaN is remembered,
  so the next step's :math:`\eta` is 1 too), as in PyTorch; an infinite
  gradient has its sign.

  Args:
    learning_rate: the initial step size :math:`s_0 > 0`: a number (PyTorch
      reads the learning rate once, to start the step sizes).
    etas: :math:`(\eta_-, \eta_+)`, with :math:`0 < \eta_- < 1 < \eta_+`.
    step_sizes: :math:`(s_{\min}, s_{\max})`.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates
    (positive :math:`\Delta_t`: follow with ``scale_by_lr(1.0)``).

  References:
    Riedmiller & Braun, `A direct adaptive method for faster backpropagation learning: the RPROP
    algorithm <https://doi.org/10.1109/ICNN.1993.298623>`_, 1993.
  """
  _hparams.check_learning_rate(learning_rate)
  if _hparams.is_schedule(learning_rate):
    raise TypeError("learning_rate must be a number for Rprop (it only sets the initial step sizes), not a schedule.")
  minus, plus = etas
  lo, hi = step_sizes

  def init_fn(params):
    def start(p):
      if not _common.is_float_leaf(p):
        return p
      real = _common.real_dtype(p.dtype)
      s0 = jnp.asarray(learning_rate).astype(real)
      # A complex parameter is two real ones: both parts start at the same step size (as torch).
      return jnp.full_like(p, jax.lax.complex(s0, s0) if jnp.iscomplexobj(p) else s0)

    return ScaleByRpropState(prev=_common.state_zeros(params, None, widen=False), step_size=jax.tree.map(start, params))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.scale_by_rprop")
    _common.check_state("jadam.scale_by_rprop", state, ScaleByRpropState)
    _common.check_tree("jadam.scale_by_rprop", updates, "the state's prev", state.prev, _common.STATE_HINT)

    def one(g, prev, size):
      sign = _torch_sign(g * prev)
      factor = jnp.where(sign > 0, plus, jnp.where(sign < 0, minus, 1.0)).astype(g.dtype)
      size = jnp.clip(size * factor, lo, hi)
      g = jnp.where(sign < 0, jnp.zeros_like(g), g)
      return _torch_sign(g) * size, g, size

    def leaf(g, prev, size):
      parts = [
        one(*(f(x) for x in (g, prev, size))) for f in ((jnp.real, jnp.imag) if jnp.iscomplexobj(g) else (lambda x: x,))
      ]
      if len(parts) == 1:
        return parts[0]
      return tuple(jax.lax.complex(a, b) for a, b in zip(*parts, strict=True))

    out = _common.tree_map_float(
      lambda g, p, s: leaf(g, p.astype(g.dtype), s.astype(g.dtype)), updates, state.prev, state.step_size
    )

    def is_triple(x):
      return type(x) is tuple  # not a NamedTuple such as optax.MaskedNode

    def pick(i, old):
      return jax.tree.map(lambda o, x: x[i].astype(o.dtype) if is_triple(x) else o, old, out, is_leaf=is_triple)

    return pick(0, updates), ScaleByRpropState(prev=pick(1, state.prev), step_size=pick(2, state.step_size))

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAsgdState(NamedTuple):
  """State for :func:`scale_by_asgd`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken so far
  ax: optax.Updates  # the averaged parameters (PyTorch's state["ax"]): evaluate with these


@_registry.stage("scale_by_asgd", state=ScaleByAsgdState)
def scale_by_asgd(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  lambd: float = 1e-4,
  alpha: float = 0.75,
  t0: float = 1e6,
) -> optax.GradientTransformation:
  r"""Averaged SGD's step and average, as `torch.optim.ASGD`.

  .. math::
      \begin{align*}
        \theta_t &= \theta_{t-1}(1 - \lambda\eta_t) - \eta_t g_t, \qquad
        \eta_1 = \alpha_0, \quad \eta_{t+1} = \frac{\alpha_0}{(1 + \lambda \alpha_0 t)^{a}},\\
        \bar\theta_t &= \bar\theta_{t-1} + \mu_t(\theta_t - \bar\theta_{t-1}), \qquad
        \mu_t = 1 / \max(1, t - 1 - t_0) \;(\bar\theta_t = \theta_t \text{ while } \mu_t = 1),
      \end{align*}

  with :math:`\alpha_0` the learning rate (read, when scheduled, at the count
  of the step before, as PyTorch reads the group's rate when it sets
  :math:`\eta` for the next step). The average :math:`\bar\theta` is kept in the
  state (`ax`) for evaluation, as PyTorch keeps it; the parameters follow
  :math:`\theta_t`.

  Args:
    learning_rate: :math:`\alpha_0 \ge 0`: a float, a scalar array or a schedule.
    lambd: the decay term :math:`\lambda`.
    alpha: the power :math:`a` of the rate's decay.
    t0: the step at which averaging starts.

  Returns:
    An :class:`optax.GradientTransformation` whose updates are
    :math:`\theta_{t-1} - \theta_t` (positive: follow with ``scale_by_lr(1.0)``),
    0 where the two are equal, so that an infinite parameter stays infinite
    (not :math:`\infty - \infty`) as in PyTorch; it needs `params`.

  References:
    Polyak & Juditsky, `Acceleration of Stochastic Approximation by Averaging
    <https://doi.org/10.1137/0330046>`_, 1992.
  """
  _hparams.check_learning_rate(learning_rate)
  for name, x in (("lambd", lambd), ("alpha", alpha), ("t0", t0)):
    _hparams.check_hyperparameter(name, x)
  lr_fn = _hparams.as_schedule(learning_rate, "learning_rate")
  stage = "jadam.scale_by_asgd"

  def init_fn(params):
    return ScaleByAsgdState(count=jnp.zeros([], jnp.int32), ax=_common.state_zeros(params, None, widen=False))

  def update_fn(updates, state, params=None):
    expect_updates(updates, stage)
    if params is None:
      raise ValueError(f"{stage} needs the parameters: call update(grads, state, params).")
    _common.check_state(stage, state, ScaleByAsgdState)
    _common.check_tree(stage, updates, "the params", params, _common.PARAMS_HINT)
    dtype = _common.float_dtype()
    c = state.count
    prev_lr = _hparams.cast_hyperparameter(lr_fn(jnp.maximum(c - 1, 0)), dtype)
    lam, a = _hparams.cast_hyperparameter(lambd, dtype), _hparams.cast_hyperparameter(alpha, dtype)
    tc = c.astype(dtype)
    eta = jnp.where(c == 0, _hparams.cast_hyperparameter(lr_fn(c), dtype), prev_lr / (1 + lam * prev_lr * tc) ** a)
    mu = 1 / jnp.maximum(tc - _hparams.cast_hyperparameter(t0, dtype), 1.0)  # t - 1 - t0 at step t = c + 1
    shrink = 1 - lam * eta

    # Real scalars cast to a complex leaf's dtype multiply each part exactly (their imaginary part is 0).
    def new_param(g, p):
      return p * shrink.astype(p.dtype) - eta.astype(p.dtype) * g.astype(p.dtype)

    def average(g, p, ax):
      new = new_param(g, p).astype(ax.dtype)
      return jnp.where(mu == 1, new, ax + (new - ax) * mu.astype(ax.dtype))

    def direction(g, p):
      new = new_param(g, p)
      # 0 where the parameter does not change: also where it is an infinity that stays (p - p would be NaN), as
      # PyTorch's in-place p * (1 - lambda eta) - eta g keeps it infinite; elsewhere p - new, bit for bit as before
      return jnp.where(new == p, jnp.zeros_like(p), p - new).astype(g.dtype)

    direction = _common.tree_map_float(direction, updates, params)
    ax = _common.tree_map_float(average, updates, params, state.ax, keep=2)
    return direction, ScaleByAsgdState(count=optax.safe_increment(c), ax=ax)

  return optax.GradientTransformation(init_fn, update_fn)


# --- Muon's momentum --------------------------------------------------
def _ema_momentum(
  decay: optax.ScalarOrSchedule, dampening: optax.ScalarOrSchedule, *, nesterov: bool, accumulator_dtype=None
) -> optax.GradientTransformation:
  r"""`jadam.momentum(..., ema=True)`: `torch.optim.Muon`'s momentum, with `torch.lerp`'s rounding.

  .. math::
      b_t = b_{t-1} + (1 - \mu)(u_t - b_{t-1}), \quad b_0 = 0, \qquad
      u_t \leftarrow \begin{cases} u_t + \mu (b_t - u_t) & \text{nesterov} \\ b_t & \text{otherwise.}\end{cases}

  The same :class:`MomentumState` as :func:`momentum` (PyTorch's `momentum_buffer`).
  """
  if _hparams.concrete_value(dampening) not in (None, 0.0) or callable(dampening):
    raise ValueError("momentum(..., ema=True) takes no dampening: the average damps by 1 - momentum itself.")
  decay_fn = _hparams.as_schedule(decay, "momentum")
  stage = "jadam.momentum"

  def init_fn(params):
    return MomentumState(
      count=jnp.zeros([], jnp.int32), trace=_common.state_zeros(params, accumulator_dtype, widen=False)
    )

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, stage)
    _common.check_state(stage, state, MomentumState)
    _common.check_tree(stage, updates, "the state's trace", state.trace, _common.STATE_HINT)
    mu = decay_fn(state.count)

    def accumulate(g, b):
      dtype = _common.compute_dtype(g.dtype)
      m = _hparams.cast_hyperparameter(mu, dtype)
      # 1 - mu in double for a Python float, as torch's `buf.lerp_(grad, 1 - momentum)`.
      return _common.torch_lerp(b.astype(dtype), g.astype(dtype), 1 - m)

    trace = _common.tree_map_float(accumulate, updates, state.trace)
    out = trace
    if nesterov:
      out = _common.tree_map_float(
        lambda g, b: _common.torch_lerp(g.astype(b.dtype), b, _hparams.cast_hyperparameter(mu, b.dtype)), updates, trace
      )
    out = _common.tree_map_float(lambda g, u: u.astype(g.dtype), updates, out)
    stored = _common.tree_map_float(lambda g, b, s: b.astype(s.dtype), updates, trace, state.trace, keep=2)
    return out, MomentumState(count=optax.safe_increment(state.count), trace=stored)

  return optax.GradientTransformation(init_fn, update_fn)
