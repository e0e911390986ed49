"""How far apart two float32 programs that compute the same Adam steps can be, from the rounding of their operations.

Two programs that compute the same formulas (a vmapped sweep and one configuration alone, jit and eager, the
fused kernel and XLA) may round differently: XLA orders a reduction, fuses a multiply-add or folds a constant
differently for another batch shape or another CPU (AVX-512 or AVX2). Each result stays within a few roundings of
the exact one, so the two programs' results are within twice that of each other; what matters is how the
roundings of one step propagate into the next. The model follows, per element and in float64, a bound on the
two programs' difference in every quantity of Adam's step:

- each operation rounds to nearest, ``|fl(x) - x| <= u |x|``, with ``u = 2**-24`` (float32), counted twice
  (``_R = 2u`` per program and operation), so that a rewrite that adds a rounding (a reciprocal for a division,
  a fused multiply-add undone) stays covered; two programs: twice that again;
- sums of ``n`` products (a matrix product, a mean) differ by at most ``n _R`` times the sum of the magnitudes of
  their terms in each program, whatever the order of summation (the standard bound gamma_n, Higham 2002, 3.1);
- through each formula, a difference propagates with the formula's derivative: ``m/c`` by ``1/c``,
  ``sqrt(v)`` by ``1/(2 sqrt(v))`` (and never by more than ``sqrt`` of the difference itself, where v is 0),
  ``a / b`` by ``1/b`` and ``|a/b| / b``, max by 1;
- the bias corrections ``1 - b^t`` are formed in float32 by each program (through ``expm1``): a few ulps each.

References:
  N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM 2002, chapters 2-3.
"""

from __future__ import annotations

import inspect

import numpy as np

_U = 2.0**-24  # float32's unit roundoff
_R = 2 * _U  # one operation of one program, with room for one extra rounding from a rewrite
_C = 8 * _U  # one bias correction 1 - b^t (expm1(t log b)) of one program


def adam_step_gap(
  state: dict,
  g: np.ndarray,
  dg: np.ndarray,
  theta: np.ndarray,
  dtheta: np.ndarray,
  *,
  t: int,
  lr: float,
  b1: float,
  b2: float,
  eps: float,
  eps_root: float = 0.0,
  weight_decay: float = 0.0,
  decoupled: bool = False,
  amsgrad: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """One Adam step in float64 (PyTorch's form, as jadam's stages compute it) and the bound on two float32 programs'
  difference after it.

  A difference in a gradient reaches the update through both moments, and the two paths partly cancel (at the
  first step the update is sign(g) whatever |g|): the bound sums, over the steps s so far, the magnitude of the
  update's derivative with respect to g_s times the bound on g_s's difference, so that the cancellation within
  each derivative is kept. The moments' own roundings, the bias corrections' and the update's are independent
  sources, bounded by magnitudes.

  Args:
    state: from :func:`zeros_state`, updated in place.
    g, dg: the gradient (float64) and the bound on the two programs' difference in it.
    theta, dtheta: the parameters before the step and the bound on their difference.
    t: the step, from 1.
    lr, b1, b2, eps, eps_root, weight_decay: the hyperparameters (the float32 values the programs use; `lr` the
      schedule's value at this step).
    decoupled: weight decay added to the update (AdamW) rather than to the gradient (coupled L2).
    amsgrad: PyTorch's AMSGrad (the maximum of the raw second moments; its derivative is bounded without the
      cancellation, the maximum coming from any earlier step).

  Returns:
    ``(theta_new, dtheta_new)``.
  """
  pair = 2  # two programs, each within its own roundings of the exact value
  if weight_decay and not decoupled:  # add_l2: g + wd theta
    dg = dg + weight_decay * dtheta + pair * 2 * _R * (np.abs(g) + np.abs(weight_decay * theta))
    g = g + weight_decay * theta
  state["sources"].append((g, dg))
  m, v = state["m"], state["v"]
  # the moments' own roundings (the gradient's differences are carried by `sources`)
  state["rm"] = b1 * state["rm"] + pair * 3 * _R * (b1 * np.abs(m) + (1 - b1) * np.abs(g))
  state["rv"] = b2 * state["rv"] + pair * 4 * _R * (b2 * v + (1 - b2) * g * g)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  state.update(m=m, v=v)
  vv = v
  if amsgrad:
    state["vmax"] = np.maximum(state["vmax"], v)
    vv = state["vmax"]
  c1, c2 = 1 - b1**t, 1 - b2**t
  mh, vh = m / c1, vv / c2
  r = np.sqrt(vh + eps_root)
  den = r + eps
  q = mh / den
  safe_r = np.where(r > 0, r, np.inf)
  # d q / d g_s: through m, (1 - b1) b1^(t-s) / (c1 den); through v, -q (1 - b2) b2^(t-s) g_s / (c2 r den)
  dq = np.zeros_like(q)
  for s, (gs, dgs) in enumerate(state["sources"], start=1):
    through_m = (1 - b1) * b1 ** (t - s) / (c1 * den)
    through_v = q * (1 - b2) * b2 ** (t - s) * gs / (c2 * safe_r * den)
    deriv = np.abs(through_m) + np.abs(through_v) if amsgrad else np.abs(through_m - through_v)
    second = np.abs(q) * (1 - b2) * b2 ** (t - s) * dgs**2 / (c2 * safe_r * den)  # the (d g_s)^2 of g_s^2
    dq = dq + deriv * dgs + second
  # the other sources: the moments' roundings, the corrections' and the update's own operations
  dmh = state["rm"] / c1 + np.abs(mh) * pair * (_C + _R)
  dvh = state["rv"] / c2 + vh * pair * (_C + 2 * _R)
  dr = np.minimum(dvh / (2 * safe_r), np.sqrt(dvh)) + pair * _R * r
  dq = dq + dmh / den + np.abs(q) * (dr + pair * _R * den) / den + pair * _R * np.abs(q)
  if weight_decay and decoupled:
    dq = dq + weight_decay * dtheta + pair * 2 * _R * (np.abs(q) + np.abs(weight_decay * theta))
    q = q + weight_decay * theta
  step = -lr * q
  theta_new = theta + step
  # the learning rate, a schedule's value formed in float32 by each program: a few ulps, as a correction
  dtheta_new = dtheta + lr * dq + pair * (_C + _R) * np.abs(step) + pair * _R * np.abs(theta_new)
  return theta_new, dtheta_new


def zeros_state(shape) -> dict:
  """Adam's float64 moments and the gaps' bookkeeping, before the first step."""
  z = np.zeros(shape)
  return {"m": z, "v": z, "vmax": z, "rm": z, "rv": z, "sources": []}


# --- running error bounds: the same rules, operation by operation --------------------------------------------------

_P = 2 * _R  # one operation: each of the two programs within _R of the exact result


class Gap:
  r"""A quantity as two float32 programs compute it: its exact value (float64, from the programs' common inputs)
  and a bound, elementwise, on how far apart the two programs' results for it may be.

  Arithmetic on gaps applies the rules of the module docstring to each operation (a running error bound, Higham
  2002, 3.3): with :math:`d` the gap of an operand and :math:`P = 2 \cdot 2u`,

  .. math::
      d(a \pm b) &= d_a + d_b + P\,|a \pm b|, \qquad d(ab) = |a| d_b + |b| d_a + d_a d_b + P\,|ab|, \\
      d(a / b) &= \frac{d_a + |a/b|\, d_b}{|b| - d_b} + P\,|a/b|, \qquad
      d(\sqrt a) = \min\Big(\frac{d_a}{2\sqrt a}, \sqrt{d_a}\Big) + P \sqrt a, \qquad
      d(\max(a, b)) = \max(d_a, d_b).

  A rounding is relative to the operation's result, so a fused multiply-add (one rounding of :math:`ab + c`
  instead of two) is covered by the product's term, and reordering a product or replacing a division by a
  reciprocal by the room for one extra rounding in :math:`u`'s factor 2. The bound ignores cancellation between
  two paths of one difference (the sum of magnitudes, never their difference): it holds, a little loose.

  Numbers and arrays met in an operation are common inputs, the same float32 values in both programs: gap 0.
  """

  __array_ufunc__ = None  # ndarray (op) Gap: numpy defers to Gap's reflected operator

  def __init__(self, value, gap=0.0):
    self.value = np.asarray(value, np.float64)
    self.gap = np.asarray(gap, np.float64) + np.zeros_like(self.value)

  def __repr__(self):
    return f"Gap(value={self.value!r}, gap={self.gap!r})"

  def _sum(self, other, sign):
    other = lift(other)
    value = self.value + sign * other.value
    return Gap(value, self.gap + other.gap + _P * np.abs(value))

  def __add__(self, other):
    return self._sum(other, 1.0)

  def __sub__(self, other):
    return self._sum(other, -1.0)

  def __radd__(self, other):
    return lift(other)._sum(self, 1.0)

  def __rsub__(self, other):
    return lift(other)._sum(self, -1.0)

  def __mul__(self, other):
    other = lift(other)
    a, b, da, db = self.value, other.value, self.gap, other.gap
    return Gap(a * b, np.abs(a) * db + np.abs(b) * da + da * db + _P * np.abs(a * b))

  __rmul__ = __mul__

  def __truediv__(self, other):
    other = lift(other)
    margin = np.abs(other.value) - other.gap
    assert np.all(margin > 0), "a divisor within its own gap of zero: no bound"
    q = self.value / other.value
    return Gap(q, (self.gap + np.abs(q) * other.gap) / margin + _P * np.abs(q))

  def __rtruediv__(self, other):
    return lift(other) / self

  def __neg__(self):
    return Gap(-self.value, self.gap)


def lift(x) -> Gap:
  """`x` as a :class:`Gap`: a common input (gap 0) unless it is one already."""
  return x if isinstance(x, Gap) else Gap(x)


def sqrt(x) -> Gap:
  """The square root, through :math:`\\sqrt{a + d} - \\sqrt a \\le \\min(d / (2\\sqrt a), \\sqrt d)`."""
  x = lift(x)
  r = np.sqrt(x.value)
  through = np.where(r > 0, x.gap / (2 * np.where(r > 0, r, 1.0)), np.inf)
  return Gap(r, np.minimum(through, np.sqrt(x.gap)) + _P * r)


def maximum(x, y) -> Gap:
  """The elementwise maximum: exact, and 1-Lipschitz in each argument."""
  x, y = lift(x), lift(y)
  return Gap(np.maximum(x.value, y.value), np.maximum(x.gap, y.gap))


def given(x: float) -> Gap:
  """A Python float that one program may round to float32 and the other use in double.

  jadam takes the logarithm of a Python-float decay in double for the bias correction, but of a float32 array in
  float32; `optax.inject_hyperparams` and a schedule hand the stages float32 arrays. The gap is the float32
  rounding of `x` itself, which the formulas then carry (through :math:`1 - \\beta`, it is :math:`10^3` times
  larger relative to :math:`1 - \\beta_2` than to :math:`\\beta_2`).
  """
  return Gap(x, abs(float(np.float32(x)) - x))


def correction(b, t: int, *, power: bool = False) -> Gap:
  r"""The bias correction :math:`1 - b^t`, which each program forms within `_C` of its exact value (as
  ``-expm1(t log b)``), plus the decay's own gap times :math:`t b^{t-1}`.

  `power`: one of the programs forms it as ``1 - b**t`` in float32 (optax): ``b**t``, as ``exp(t log b)``, within
  :math:`(2 + t |\log b|)` roundings of :math:`b^t` (the rounding of log b grows t-fold), and the subtraction is
  exact (Sterbenz) or rounds once, relative to :math:`c`. For b = 0.999 at t = 1 that is 2000 ulps of c: why
  optax's float32 trajectories drift from torch's.
  """
  b = lift(b)
  c = 1 - b.value**t
  gap = t * b.value ** (t - 1) * b.gap + 2 * _C * np.abs(c)
  if power:
    gap = gap + (2 + t * abs(np.log(b.value))) * _R * b.value**t + _R * np.abs(c)
  return Gap(c, gap)


def _at(x, t):
  """A hyperparameter at step t (from 1): a schedule is read at t - 1, as jadam's stages read it."""
  return lift(x(t - 1) if callable(x) else x)


def _given_zero(x) -> bool:
  return not callable(x) and not isinstance(x, Gap) and x == 0


def _steps(grads, steps, t0=0):
  """The steps t of a run: all the given gradients, or `steps` of a gradient function."""
  return range(t0 + 1, t0 + (len(grads) if steps is None else steps) + 1)


def _gradient(grads, theta, t, t0=0):
  """Step t's gradient: the given one (a common input or a Gap), or the function's, of the parameters and t."""
  return grads(theta, t) if callable(grads) else grads[t - t0 - 1]


def _penalise(g, theta, weight_decay, maximize, t):
  g = -lift(g) if maximize else lift(g)
  return g if _given_zero(weight_decay) else g + _at(weight_decay, t) * theta


def adam(
  grads,
  params,
  *,
  lr,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  eps_root=0.0,
  weight_decay=0.0,
  decoupled_weight_decay=0.0,
  amsgrad=False,
  maximize=False,
  steps=None,
  start=None,
  t0=0,
  teacher=None,
  power=False,
) -> list[dict[str, Gap]]:
  r"""PyTorch's Adam (tests/helpers/reference.adam's formulas, `amsgrad` PyTorch's), operation by operation on
  :class:`Gap`: what two float32 programs running it may differ by after each step.

  .. math::
      g \leftarrow \pm g + \lambda\theta, \quad m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
      v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
      u = -\alpha \Big(\frac{m / c_1}{\sqrt{v / c_2 + \epsilon_r} + \epsilon} + \lambda_d \theta\Big), \quad
      \theta \leftarrow \theta + u,

  with :math:`c_i = 1 - \beta_i^t` from :func:`correction`. The gradients are the programs' common inputs (or
  Gaps, where the programs form them differently, e.g. a clipping factor), or a function of the parameters (a
  Gap) run for `steps` steps, for a gradient that the parameters' gaps reach; they reach the update through
  the weight decay too. `start` (``{"mu", "nu", "nu_max"}``, common inputs) and `t0` continue a run from a state
  that both programs share, after `t0` steps. `teacher`, the parameters each step starts from (common inputs):
  every step is then measured alone, as tests/helpers/parity.run_jax's `teacher` runs it. `power`: one program
  forms the corrections as optax does (:func:`correction`). Every hyperparameter is a float (the same float32
  value in both programs: pass ``float(np.float32(x))``), a :class:`Gap` (:func:`given`) or a schedule of the
  count returning either.

  Returns:
    For each step, ``{"update", "params", "mu", "nu", "nu_max"}`` as Gaps.
  """
  theta = lift(params)
  zeros = np.zeros_like(theta.value)
  start = start or {}
  m, v, vmax = (lift(start.get(k, zeros)) for k in ("mu", "nu", "nu_max"))
  out = []
  for t in _steps(grads, steps, t0):
    theta = theta if teacher is None else lift(teacher[t - t0 - 1])
    g = _penalise(_gradient(grads, theta, t, t0), theta, weight_decay, maximize, t)
    beta1, beta2 = _at(b1, t), _at(b2, t)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    vmax = maximum(vmax, v) if amsgrad else v
    vhat = vmax / correction(beta2, t, power=power)
    if not _given_zero(eps_root):
      vhat = vhat + _at(eps_root, t)
    u = _normalised(m / correction(beta1, t, power=power), sqrt(vhat) + _at(eps, t), _largest(b1, b2, t, start))
    if not _given_zero(decoupled_weight_decay):
      u = u + _at(decoupled_weight_decay, t) * theta
    update = -(_at(lr, t) * u)
    theta = theta + update
    out.append({"update": update, "params": theta, "mu": m, "nu": v, "nu_max": vmax})
  return out


def _largest(b1, b2, t, start) -> float:
  r"""How large Adam's normalised step :math:`|\hat m / (\sqrt{\hat v} + \epsilon)|` can be at step t, from zero
  moments with constant decays: :math:`\hat m = \sum_s a_s g_s` and :math:`\hat v = \sum_s b_s g_s^2`, so by
  Cauchy-Schwarz at most :math:`\sqrt{\sum_s a_s^2 / b_s}` whatever the gradients (inf where that does not apply)."""
  if start or any(callable(b) or isinstance(b, Gap) for b in (b1, b2)):
    return np.inf
  s = np.arange(1, t + 1)
  a = (1 - b1) * b1 ** (t - s) / (1 - b1**t)
  b = (1 - b2) * b2 ** (t - s) / (1 - b2**t)
  return float(np.sqrt(np.sum(a * a / b))) * (1 + 1e-3)  # and room for each program's roundings of it


def _normalised(num: Gap, den: Gap, largest: float) -> Gap:
  """num / den by the division's rule where the divisor is clear of its gap; where it is not (a gradient lost in
  its own gap), or where the rule gives more, two values of magnitude `largest` at most: 2 `largest` apart."""
  clear = np.abs(den.value) > den.gap
  divisor = Gap(np.where(clear, den.value, 1.0), np.where(clear, den.gap, 0.0))
  safe = Gap(num.value, np.where(clear, num.gap, 0.0)) / divisor
  value = np.where(clear, safe.value, num.value / np.where(den.value != 0, den.value, 1.0))
  return Gap(value, np.minimum(np.where(clear, safe.gap, np.inf), 2 * largest))


def sgd(
  grads,
  params,
  *,
  lr,
  momentum=0.0,
  dampening=0.0,
  weight_decay=0.0,
  nesterov=False,
  maximize=False,
  steps=None,
  teacher=None,
) -> list[dict[str, Gap]]:
  r"""PyTorch's SGD as :func:`adam` does Adam: :math:`b_1 = g_1`, :math:`b_t = \mu b + (1 - \tau) g`, the update
  :math:`-\alpha (g + \mu b)` (nesterov) or :math:`-\alpha b`; `steps` and `teacher` as in :func:`adam`. Returns
  ``{"update", "params"}`` per step."""
  theta, buf, out = lift(params), None, []
  for t in _steps(grads, steps):
    theta = theta if teacher is None else lift(teacher[t - 1])
    g = _penalise(_gradient(grads, theta, t), theta, weight_decay, maximize, t)
    if not _given_zero(momentum):
      mu = _at(momentum, t)
      buf = g if buf is None else mu * buf + (1 - _at(dampening, t)) * g
      g = g + mu * buf if nesterov else buf
    update = -(_at(lr, t) * g)
    theta = theta + update
    out.append({"update": update, "params": theta})
  return out


def rmsprop(
  grads,
  params,
  *,
  lr,
  alpha=0.99,
  eps=1e-8,
  weight_decay=0.0,
  momentum=0.0,
  centered=False,
  maximize=False,
  steps=None,
  teacher=None,
) -> list[dict[str, Gap]]:
  r"""PyTorch's RMSprop: :math:`v \leftarrow \alpha v + (1 - \alpha) g^2`, :math:`u = g / (\sqrt{v - \bar g^2}
  + \epsilon)` (:math:`\bar g` the mean of g if centered), then momentum :math:`b \leftarrow \mu b + u`.
  Returns ``{"update", "params"}`` per step."""
  theta = lift(params)
  v = gbar = buf = Gap(np.zeros_like(theta.value))
  out = []
  for t in _steps(grads, steps):
    theta = theta if teacher is None else lift(teacher[t - 1])
    g = _penalise(_gradient(grads, theta, t), theta, weight_decay, maximize, t)
    a = _at(alpha, t)
    v = a * v + (1 - a) * (g * g)
    if centered:
      gbar = a * gbar + (1 - a) * g
      u = g / (sqrt(v - gbar * gbar) + _at(eps, t))
    else:
      u = g / (sqrt(v) + _at(eps, t))
    if not _given_zero(momentum):
      buf = _at(momentum, t) * buf + u
      u = buf
    update = -(_at(lr, t) * u)
    theta = theta + update
    out.append({"update": update, "params": theta})
  return out


def adagrad(
  grads,
  params,
  *,
  lr,
  lr_decay=0.0,
  weight_decay=0.0,
  initial_accumulator_value=0.0,
  eps=1e-10,
  maximize=False,
  steps=None,
  teacher=None,
) -> list[dict[str, Gap]]:
  r"""PyTorch's Adagrad: :math:`s \leftarrow s + g^2`, update :math:`-\alpha / (1 + (t - 1)\eta) \cdot g /
  (\sqrt s + \epsilon)`. Returns ``{"update", "params"}`` per step."""
  theta = lift(params)
  s = lift(initial_accumulator_value) + Gap(np.zeros_like(theta.value))
  out = []
  for t in _steps(grads, steps):
    theta = theta if teacher is None else lift(teacher[t - 1])
    g = _penalise(_gradient(grads, theta, t), theta, weight_decay, maximize, t)
    s = s + g * g
    rate = _at(lr, t) / (1 + (t - 1) * _at(lr_decay, t))
    update = -(rate * (g / (sqrt(s) + _at(eps, t))))
    theta = theta + update
    out.append({"update": update, "params": theta})
  return out


def assert_within(got, want, bound: Gap, what: str = "") -> None:
  """`got` and `want` (the two programs' results, any float dtype) within `bound`'s gap, elementwise."""
  gap = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  excess = gap - bound.gap
  assert np.all(excess <= 0), f"{what}: |got - want| up to {np.max(gap):.3g}, bound {np.max(bound.gap):.3g}"


_ALIASES = {  # jadam's alias -> (its model here, its argument names that the model spells differently)
  "adam": (adam, {}),
  "adamw": (adam, {"weight_decay": "decoupled_weight_decay"}),
  "sgd": (sgd, {}),
  "rmsprop": (rmsprop, {}),
  "adagrad": (adagrad, {}),
}


def of_alias(factory, kwargs: dict, *, given_names=()):
  """The model of ``factory(**kwargs)`` (jadam.adam, adamw, sgd, rmsprop or adagrad; its own defaults for the
  arguments not in `kwargs`, read from its signature), as a function of ``(grads, params)``.

  Every float is the float32 value both programs use, except those named in `given_names` (``True``: all), which
  one program may hold in double (:func:`given`).
  """
  model, renamed = _ALIASES[factory.__name__]
  arguments = {k: p.default for k, p in inspect.signature(factory).parameters.items() if k not in ("mask",)}
  arguments.update(kwargs)
  accepted = inspect.signature(model).parameters
  hp = {}
  for name, value in arguments.items():
    key = {"learning_rate": "lr", **renamed}.get(name, name)
    if key not in accepted or value is None:  # dtypes; no momentum
      continue
    if isinstance(value, bool) or callable(value):
      hp[key] = value
    elif given_names is True or name in given_names:
      hp[key] = given(float(value))
    else:
      hp[key] = float(np.float32(value))
  return lambda grads, params, **kw: model(grads, params, **hp, **kw)


def summed(value, magnitude, n: int) -> Gap:
  """A sum of `n` terms (a norm, a mean, a loss) that each program may add in any order: within `n` roundings of
  the sum of the terms' magnitudes (Higham's gamma_n), whatever the order or the vector width."""
  return Gap(value, n * _P * np.asarray(magnitude, np.float64))


def clipped_by_global_norm(grads: dict, max_norm: float) -> dict:
  r"""`optax.clip_by_global_norm`'s :math:`g / \|g\| \cdot m` (or `g` itself below `max_norm`), leaf by leaf as
  Gaps: each program sums the squares of all the leaves in its own order (:func:`summed`, over every element).

  The bound asserts that the norm is not within its gap of `max_norm`, where the programs might disagree on
  clipping at all.
  """
  gs = {k: lift(np.asarray(g, np.float64)) for k, g in grads.items()}
  squares = sum(float(np.sum(g.value**2)) for g in gs.values())
  norm = sqrt(summed(squares, squares, sum(g.value.size for g in gs.values())))
  assert abs(norm.value - max_norm) > norm.gap, "the programs may disagree on whether to clip"
  return gs if norm.value < max_norm else {k: g / norm * max_norm for k, g in gs.items()}
