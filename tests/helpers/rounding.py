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
