"""The moment estimates of Adam's Algorithm 1 and the stages that act on them.

Every stage that produces :class:`Moments` lives here: `scale_by_moments`
(Adam's exponential averages), `scale_by_inf_moments` (Adamax's infinity
norm) and `accumulate_squares` (Adagrad's sum), and the two stages that
rewrite them before a correction: `max_nu` (AMSGrad) and `center` (centred
RMSProp). `jadam._stages.correct` corrects them; `jadam._stages.scale` divides them back
into parameter-shaped updates.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._storage import bf16 as _lowp
from jadam._storage import quantize as _quantize

Dtype = Any


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("mu", "nu", "count", "b1", "b2", "grad", "step_scale"),
  meta_fields=("bias_corrected",),
)
@dataclasses.dataclass(frozen=True)
class Moments:
  """What :func:`scale_by_moments` passes to the stages after it.

  A pytree, not a parameter-shaped tree: the stages between
  :func:`scale_by_moments` and :func:`normalize` read and rewrite it.
  `bias_corrected` is static (a pytree meta field), so a stage's update on
  `Moments` traces under `jax.jit` and branches on it in Python.
  """

  mu: optax.Updates  # m_t (or the gradient itself, for optimizers without one)
  nu: optax.Updates  # v_t
  count: jax.Array  # t, after the increment
  b1: jax.typing.ArrayLike  # decays used at step t: bias_correct reads them here
  b2: jax.typing.ArrayLike
  grad: optax.Updates  # g_t as it arrived: its dtypes are the updates' dtypes
  bias_corrected: bool = False  # static: set by bias_correct
  step_scale: jax.typing.ArrayLike | None = None  # bias_correct(into_step=True)

  def _replace(self, **changes: Any) -> Moments:
    """A copy with `changes`, as `NamedTuple._replace`."""
    return dataclasses.replace(self, **changes)


def expect_moments(updates: Any, stage: str) -> Moments:
  """Raises a `TypeError` unless `updates` are :class:`Moments`."""
  if not isinstance(updates, Moments):
    raise TypeError(
      f"{stage} expects the Moments that jadam.scale_by_moments (or"
      " jadam.accumulate_squares) produces, but received"
      f" {type(updates).__name__}. Put jadam.scale_by_moments(...) before"
      f" {stage} in the chain."
    )
  return updates


def expect_updates(updates: Any, stage: str) -> None:
  """Raises a `TypeError` if `updates` are :class:`Moments`, not a parameter-shaped tree."""
  if isinstance(updates, Moments):
    raise TypeError(
      f"{stage} expects parameter-shaped updates but received jadam.Moments, which only the stages"
      " between jadam.scale_by_moments and jadam.normalize take. Put jadam.normalize(...) (or"
      f" another stage that divides the moments) before {stage}."
    )


class ScaleByMomentsState(NamedTuple):
  """State for :func:`scale_by_moments`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken so far
  mu: optax.Updates  # None when b1 is None
  nu: optax.Updates


@_registry.stage("scale_by_moments", state=ScaleByMomentsState)
def scale_by_moments(
  b1: optax.ScalarOrSchedule | None = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  *,
  mu_dtype: Dtype | None = None,
  nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""Track moving averages of the gradient and of its square.

  .. math::
      m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad m_0 = v_0 = 0.

  The averages are computed in the leaf's dtype widened to at least float32,
  with :math:`1 - \beta` formed in double when :math:`\beta` is a Python float
  (as PyTorch does), and stored in `mu_dtype` / `nu_dtype`.

  Non-finite values follow PyTorch's arithmetic: where :math:`m_{t-1}` is
  infinite, :math:`m_t` is PyTorch's ``m.lerp_(g, 1 - b1)`` (NaN for
  :math:`\beta_1 > 1/2`: an infinite gradient makes its parameter infinite,
  then NaN, as in `torch.optim.RAdam`). An 8-bit :math:`v`
  (:class:`jadam.Quantized`) adds :math:`((1 - \beta_2) g) g`, PyTorch's
  ``addcmul`` order, which stays finite wherever :math:`v` can (:math:`g^2`
  overflows float32 from :math:`|g| = 1.8 \cdot 10^{19}`); see
  ``jadam._storage.quantize.quantize`` for how a block keeps a NaN or an
  inf in its own value.

  Args:
    b1: Decay of the first moment: a float in [0, 1), a scalar array or a
      schedule. ``None`` keeps no first moment: :math:`m_t = g_t` and no state
      (RMSProp).
    b2: Decay of the second moment, of the same kinds.
    mu_dtype: Storage dtype of :math:`m`; by default the parameter's dtype.
    nu_dtype: Storage dtype of :math:`v`; by default the parameter's dtype
      widened to at least float32, because bfloat16 rounds :math:`0.999 v` back
      to :math:`v` (its spacing below 1 is 1/256), so a bfloat16 :math:`v`
      never decays under round-to-nearest. An explicit ``jnp.bfloat16`` for
      either moment is stored with unbiased stochastic rounding (deterministic
      bits from the element index and the step; see
      ``jadam._storage.bf16.round_to_bfloat16``), so it decays as
      :math:`\beta^t` on average at 2 bytes a value. A :class:`jadam.Quantized`
      spec stores the moment in 8 bits, one uint8 code per value and one float32
      scale per block, as bitsandbytes does (signed map for :math:`m`, unsigned
      for :math:`v`; see :func:`jadam.adam8bit`).

  Returns:
    An :class:`optax.GradientTransformation` whose updates are :class:`Moments`
    (not parameter-shaped): follow it with :func:`bias_correct`,
    :func:`max_nu`, :func:`center` or :func:`normalize`. See
    :func:`jadam.adam` for the whole algorithm.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014, Algorithm 1.
  """
  _hparams.check_hyperparameter("b1", b1, low=0.0, high=1.0, high_open=True, allow_none=True, wide_dtype=True)
  _hparams.check_hyperparameter("b2", b2, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _quantize.check_dtype("mu_dtype", mu_dtype)
  _quantize.check_dtype("nu_dtype", nu_dtype)
  b1_fn = None if b1 is None else _hparams.as_schedule(b1, "b1")
  b2_fn = _hparams.as_schedule(b2, "b2")

  def zeros(params, dtype, widen):
    if isinstance(dtype, _quantize.Quantized):
      return _quantize.zeros(params, dtype, widen=widen)
    return _common.state_zeros(params, dtype, widen=widen)

  def init_fn(params):
    mu = None if b1 is None else zeros(params, mu_dtype, widen=False)
    return ScaleByMomentsState(count=jnp.zeros([], jnp.int32), mu=mu, nu=zeros(params, nu_dtype, widen=True))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.scale_by_moments")
    _common.check_state("jadam.scale_by_moments", state, ScaleByMomentsState)
    nu_old = _quantize.load(state.nu, nu_dtype, signed=False)  # 8-bit moments: dequantized, updated, requantized
    _common.check_tree("jadam.scale_by_moments", updates, "the state's nu", nu_old, _common.STATE_HINT)
    beta2 = b2_fn(state.count)  # step t reads the schedule at t - 1, as optax does
    if isinstance(nu_dtype, _quantize.Quantized):  # 8-bit leaves: ((1 - b2) g) g (see _ema_leaf)
      nu = _common.tree_map_float(
        lambda g, v, c: _ema_leaf(g, v, beta2, square=True, scaled=_quantize.is_codes(c)),
        updates,
        nu_old,
        state.nu.codes,
      )
    else:
      nu = _ema(updates, nu_old, beta2, square=True)
    beta1: jax.typing.ArrayLike
    if b1_fn is None:
      beta1, mu, mu_state = 0.0, updates, None
    else:
      beta1 = b1_fn(state.count)
      mu = _ema(updates, _quantize.load(state.mu, mu_dtype, signed=True), beta1, square=False)

      def again_mu(g, m):
        return _ema_leaf(g, m, beta1, square=False)

      mu_state, mu = _store(updates, mu, state.mu, state.count, 0, mu_dtype, again_mu)

    def again_nu(g, v):  # called for 8-bit leaves only
      return _ema_leaf(g, v, beta2, square=True, scaled=True)

    nu_state, nu = _store(updates, nu, state.nu, state.count, 1, nu_dtype, again_nu)
    count = optax.safe_increment(state.count)
    moments = Moments(mu=mu, nu=nu, count=count, b1=beta1, b2=beta2, grad=updates)
    return moments, ScaleByMomentsState(count=count, mu=mu_state, nu=nu_state)

  return optax.GradientTransformation(init_fn, update_fn)


# --- Low-precision storage -------------------------------------------
def _store(updates, values, state, count, stream, dtype, again=None):
  """`(stored, passed_on)`: `values` cast to the state's dtypes, and what the next stages read.

  An explicit bfloat16 `dtype` rounds stochastically: round-to-nearest would
  freeze a bfloat16 second moment (0.999 v rounds to v), unbiased rounding
  (``jadam._storage.bf16.round_to_bfloat16``) decays it as 0.999^t on average.
  The next stages then read the stored value, widened back, so the step sees
  what the state holds and XLA keeps no float32 copy of the moment in memory.
  Default dtypes (None) keep plain casts and pass `values` on unchanged, and
  so does a :class:`jadam.Quantized` format (8-bit codes, as bitsandbytes: the
  step reads the float32 moments that were just requantized).
  """
  if isinstance(dtype, _quantize.Quantized):
    return _quantize.store(updates, values, state, dtype, signed=stream == 0, recompute=again)
  if _lowp.stochastic_store(dtype):
    stored = _lowp.store(updates, values, state, count, stream)
    return stored, _common.tree_map_float(lambda v, s: s.astype(v.dtype), values, stored)
  return _common.tree_map_float(lambda g, v, s: v.astype(s.dtype), updates, values, state, keep=2), values


# --- end low-precision storage -------------------------------------------------


def _ema(updates: optax.Updates, moment: optax.Updates, decay: jax.typing.ArrayLike, *, square: bool) -> optax.Updates:
  """:math:`(1 - d) g^k + d\\,m` in the widened dtype, `None` where the gradient is `None`."""
  return _common.tree_map_float(lambda g, m: _ema_leaf(g, m, decay, square=square), updates, moment)


def _ema_leaf(
  g: jax.Array, m: jax.Array, decay: jax.typing.ArrayLike, *, square: bool, scaled: bool = False
) -> jax.Array:
  dtype = _common.compute_dtype(g.dtype)
  g = g.astype(dtype)
  d = _hparams.cast_hyperparameter(decay, dtype)
  if square and scaled:
    # An 8-bit v (a real leaf): (1 - d) g^2 as ((1 - d) g) g, PyTorch's addcmul order, which stays finite wherever
    # v can hold it (|g| up to about 5.8e20 for d = 0.999; g * g overflows from 1.8e19), so that one huge but
    # finite gradient cannot make its block's scale inf (and the block NaN). The fused kernel computes the same.
    return ((1 - d) * g) * g + d * m.astype(dtype)
  # A complex g is squared part by part (PyTorch's view_as_real rule; see _common.componentwise).
  x = _common.componentwise(lambda a: a * a, g) if square else g
  if square:
    return (1 - d) * x + d * m.astype(dtype)
  return first_moment(x, m.astype(dtype), 1 - d, d)


def first_moment(g: jax.Array, m: jax.Array, w: jax.typing.ArrayLike, d: jax.typing.ArrayLike) -> jax.Array:
  """:math:`w g + d m` (:math:`w = 1 - d`); where `m` is not finite, PyTorch's ``m.lerp_(g, w)``.

  The lerp (``m + w (g - m)`` for :math:`w < 1/2`, else ``g - (g - m)(1 - w)``) gives NaN for an infinite `m`
  where the sum keeps it infinite: an infinite gradient makes its parameter infinite, then NaN, as in PyTorch
  (`torch.optim.RAdam` shows it). Elsewhere the sum, bit for bit; the fused kernel computes the same.
  """
  lerp = jnp.where(jnp.less(w, 0.5), m + w * (g - m), g - (g - m) * (1 - w))
  return jnp.where(jnp.isfinite(m), w * g + d * m, lerp)


class MaxNuState(NamedTuple):
  """State for :func:`max_nu`."""

  nu_max: optax.Updates


@_registry.stage("max_nu", state=MaxNuState)
def max_nu(*, nu_dtype: Dtype | None = None) -> optax.GradientTransformation:
  r"""AMSGrad: replace the second moment by its running maximum.

  .. math::
      \hat v^{\max}_t = \max(\hat v^{\max}_{t-1}, v_t).

  Its place in the chain decides which AMSGrad it is: before
  :func:`bias_correct` it keeps the maximum of the raw :math:`v_t` and the
  maximum is corrected with the current step (PyTorch's `amsgrad=True`); after
  it, the maximum of the corrected :math:`\hat v_t` (`optax.amsgrad`).

  Args:
    nu_dtype: Storage dtype of the maximum; by default the parameter's dtype
      widened to at least float32.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    :class:`Moments`.

  References:
    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, 2018.
  """
  _common.check_dtype("nu_dtype", nu_dtype)

  def init_fn(params):
    return MaxNuState(nu_max=_common.state_zeros(params, nu_dtype, widen=True))

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.max_nu")
    _common.check_state("jadam.max_nu", state, MaxNuState)
    _common.check_tree("jadam.max_nu", moments.nu, "the state's nu_max", state.nu_max, _common.STATE_HINT)
    nu = _common.tree_map_float(
      lambda v, s: _common.componentwise(jnp.maximum, v, s.astype(v.dtype)), moments.nu, state.nu_max
    )
    nu_max = _common.tree_map_float(lambda v, s: v.astype(s.dtype), nu, state.nu_max, keep=1)
    return moments._replace(nu=nu), MaxNuState(nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByInfMomentsState(NamedTuple):
  """State for :func:`scale_by_inf_moments`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken so far
  mu: optax.Updates
  nu: optax.Updates  # u_t, the weighted infinity norm


@_registry.stage("scale_by_inf_moments", state=ScaleByInfMomentsState)
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
  _hparams.check_hyperparameter("b1", b1, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _hparams.check_hyperparameter("b2", b2, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _hparams.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  _common.check_dtype("mu_dtype", mu_dtype)
  b1_fn, b2_fn = _hparams.as_schedule(b1, "b1"), _hparams.as_schedule(b2, "b2")
  eps_fn = _hparams.as_schedule(eps, "eps")

  def init_fn(params):
    return ScaleByInfMomentsState(
      count=jnp.zeros([], jnp.int32),
      mu=_common.state_zeros(params, mu_dtype, widen=False),
      nu=_common.state_zeros(params, None, widen=True),
    )

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.scale_by_inf_moments")
    _common.check_state("jadam.scale_by_inf_moments", state, ScaleByInfMomentsState)
    _common.check_tree("jadam.scale_by_inf_moments", updates, "the state's nu", state.nu, _common.STATE_HINT)
    beta1, beta2, e = b1_fn(state.count), b2_fn(state.count), eps_fn(state.count)
    mu = _ema(updates, state.mu, beta1, square=False)

    def norm(g, u):
      dtype = _common.compute_dtype(g.dtype)
      real = _common.real_dtype(dtype)
      b, eps_ = _hparams.cast_hyperparameter(beta2, real), _hparams.cast_hyperparameter(e, real)
      return _common.componentwise(lambda x, y: jnp.maximum(b * y, jnp.abs(x) + eps_), g.astype(dtype), u.astype(dtype))

    nu = _common.tree_map_float(norm, updates, state.nu)
    count = optax.safe_increment(state.count)

    def keep(new, old):
      return _common.tree_map_float(lambda g, x, s: x.astype(s.dtype), updates, new, old, keep=2)

    moments = Moments(mu=mu, nu=nu, count=count, b1=beta1, b2=0.0, grad=updates)
    return moments, ScaleByInfMomentsState(count=count, mu=keep(mu, state.mu), nu=keep(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


@_registry.stage("center", state=optax.EmptyState)
def center() -> optax.GradientTransformation:
  r"""Centre the second moment on the first, as centred RMSProp does.

  .. math::
      (m_t, v_t) \;\to\; (g_t,\; v_t - m_t^2),

  so that the stage that divides gives :math:`g_t / (\sqrt{v_t - m_t^2} + \epsilon)`:
  the gradient over an estimate of its standard deviation.

  Returns:
    An :class:`optax.GradientTransformation` from :class:`Moments` to
    :class:`Moments`; stateless.

  References:
    Graves, `Generating Sequences With Recurrent Neural Networks
    <https://arxiv.org/abs/1308.0850>`_, 2013, eq. (38)-(40).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    moments = expect_moments(updates, "jadam.center")
    nu = _common.tree_map_float(
      lambda v, m: _common.componentwise(lambda x, y: x - y * y, v, m), moments.nu, moments.mu
    )
    mu = _common.tree_map_float(lambda g, v: g.astype(v.dtype), moments.grad, nu)
    return moments._replace(mu=mu, nu=nu), state

  return optax.GradientTransformation(init_fn, update_fn)


class AccumulateSquaresState(NamedTuple):
  """State for :func:`accumulate_squares`."""

  count: jax.Array  # type: ignore[assignment]  # shape=(), int32
  sum_of_squares: optax.Updates


@_registry.stage("accumulate_squares", state=AccumulateSquaresState)
def accumulate_squares(
  initial_accumulator_value: jax.typing.ArrayLike = 0.0, *, nu_dtype: Dtype | None = None
) -> optax.GradientTransformation:
  r"""Adagrad's second moment: the running sum of squared gradients.

  .. math::
      v_t = v_{t-1} + g_t^2, \qquad v_0 = \text{initial\_accumulator\_value},

  passed on as :class:`Moments` with :math:`m_t = g_t` and decays of zero, so
  that :func:`bias_correct` would be the identity after it.

  Args:
    initial_accumulator_value: :math:`v_0` (PyTorch's name), >= 0.
    nu_dtype: Storage dtype of the sum; by default the parameter's dtype
      widened to at least float32.

  Returns:
    An :class:`optax.GradientTransformation` whose updates are :class:`Moments`.

  References:
    Duchi, Hazan & Singer, `Adaptive Subgradient Methods
    <https://jmlr.org/papers/v12/duchi11a.html>`_, JMLR 2011.
  """
  _hparams.check_hyperparameter("initial_accumulator_value", initial_accumulator_value, low=0.0)
  if _hparams.is_schedule(initial_accumulator_value):
    raise TypeError("initial_accumulator_value must be a number, not a schedule.")
  _common.check_dtype("nu_dtype", nu_dtype)

  def init_fn(params):
    def start(p):
      if not _common.is_float_leaf(p):
        return p
      dtype = _common.state_dtype(p, nu_dtype, widen=True)
      v0 = _hparams.cast_hyperparameter(initial_accumulator_value, _common.real_dtype(dtype))
      if jnp.issubdtype(dtype, jnp.complexfloating):
        v0 = jax.lax.complex(jnp.asarray(v0, _common.real_dtype(dtype)), jnp.asarray(v0, _common.real_dtype(dtype)))
      return jnp.full_like(p, v0, dtype)  # a complex parameter starts both parts' sums at v0, as torch

    return AccumulateSquaresState(count=jnp.zeros([], jnp.int32), sum_of_squares=jax.tree.map(start, params))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, "jadam.accumulate_squares")
    _common.check_state("jadam.accumulate_squares", state, AccumulateSquaresState)
    _common.check_tree(
      "jadam.accumulate_squares", updates, "the state's sum_of_squares", state.sum_of_squares, _common.STATE_HINT
    )

    def add(g, s):
      g = g.astype(_common.compute_dtype(g.dtype))
      return s.astype(g.dtype) + _common.componentwise(lambda a: a * a, g)

    nu = _common.tree_map_float(add, updates, state.sum_of_squares)
    stored = _common.tree_map_float(lambda g, v, s: v.astype(s.dtype), updates, nu, state.sum_of_squares, keep=2)
    count = optax.safe_increment(state.count)
    moments = Moments(mu=updates, nu=nu, count=count, b1=0.0, b2=0.0, grad=updates)
    return moments, AccumulateSquaresState(count=count, sum_of_squares=stored)

  return optax.GradientTransformation(init_fn, update_fn)
