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

  Args:
    state: ``m, v, vmax`` and their gaps ``dm, dv, dvmax`` (float64 arrays), updated in place; start from zeros.
    g, dg: the gradient (float64) and the bound on the two programs' difference in it.
    theta, dtheta: the parameters before the step and the bound on their difference.
    t: the step, from 1.
    lr, b1, b2, eps, eps_root, weight_decay: the hyperparameters (the float32 values the programs use).
    decoupled: weight decay added to the update (AdamW) rather than to the gradient (coupled L2).
    amsgrad: PyTorch's AMSGrad (the maximum of the raw second moments).

  Returns:
    ``(theta_new, dtheta_new)``.
  """
  pair = 2  # two programs, each within its own roundings of the exact value
  if weight_decay and not decoupled:  # add_l2: g + wd theta
    dg = dg + weight_decay * dtheta + pair * 2 * _R * (np.abs(g) + np.abs(weight_decay * theta))
    g = g + weight_decay * theta
  m, v = state["m"], state["v"]
  dm = b1 * state["dm"] + (1 - b1) * dg + pair * 3 * _R * (b1 * np.abs(m) + (1 - b1) * np.abs(g))
  dv = b2 * state["dv"] + (1 - b2) * (2 * np.abs(g) * dg + dg**2) + pair * 4 * _R * (b2 * v + (1 - b2) * g * g)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  state.update(m=m, v=v, dm=dm, dv=dv)
  if amsgrad:
    state["vmax"] = np.maximum(state["vmax"], v)
    state["dvmax"] = np.maximum(state["dvmax"], dv)
    v, dv = state["vmax"], state["dvmax"]
  c1, c2 = 1 - b1**t, 1 - b2**t
  mh, vh = m / c1, v / c2
  dmh = dm / c1 + np.abs(mh) * pair * (_C + _R)
  dvh = dv / c2 + vh * pair * (_C + 2 * _R)  # and + eps_root
  r = np.sqrt(vh + eps_root)
  dr = np.minimum(dvh / (2 * np.where(r > 0, r, np.inf)), np.sqrt(dvh)) + pair * _R * r
  den = r + eps
  dden = dr + pair * _R * den
  q = mh / den
  dq = dmh / den + np.abs(q) * dden / den + pair * _R * np.abs(q)
  if weight_decay and decoupled:
    dq = dq + weight_decay * dtheta + pair * 2 * _R * (np.abs(q) + np.abs(weight_decay * theta))
    q = q + weight_decay * theta
  step = -lr * q
  theta_new = theta + step
  dtheta_new = dtheta + lr * dq + pair * _R * (np.abs(step) + np.abs(theta_new))
  return theta_new, dtheta_new


def zeros_state(shape) -> dict:
  z = np.zeros(shape)
  return {"m": z, "v": z, "vmax": z, "dm": z, "dv": z, "dvmax": z}
