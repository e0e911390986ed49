"""Plain NumPy float64 implementations of each convention, written from the formulas.

Independent of jadam, optax and torch: each function takes the gradients of a
whole run (an array of shape (steps, *shape)) and the initial parameters and
returns the parameters after every step (shape (steps, *shape)). Gradients do
not depend on the parameters here; the L2 and decoupled terms do.
"""

from __future__ import annotations

import numpy as np


def _as64(grads, params):
  return np.asarray(grads, np.float64), np.array(params, np.float64, copy=True)


def adam(
  grads,
  params,
  *,
  lr=1e-3,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  eps_root=0.0,
  weight_decay=0.0,
  decoupled_weight_decay=0.0,
  amsgrad=None,
  maximize=False,
  keras=False,
  t0=0,
):
  """Adam and its variants.

  amsgrad: None, "torch" (max over raw v, corrected at the current step) or
    "optax" (max over corrected v).
  weight_decay: coupled L2 (torch.optim.Adam).
  decoupled_weight_decay: AdamW's lambda, applied as theta -= lr * lambda * theta.
  keras: the correction folded into the step size, eps-hat outside sqrt(v).
  lr, b1, b2, eps, eps_root, weight_decay and decoupled_weight_decay may be
  callables of the step t (1-based) to model schedules read at t - 1.
  t0: steps taken before the first one here, with zero moments (a count set by
    hand, to model a very long run): the first step is t = t0 + 1.
  """
  grads, theta = _as64(grads, params)

  def f(x, t):
    return x(t - 1) if callable(x) else x

  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  vmax = np.zeros_like(theta)
  out = []
  for t, g in enumerate(grads, start=t0 + 1):
    g = -g if maximize else g
    eps_t, eps_root_t = f(eps, t), f(eps_root, t)
    g = g + f(weight_decay, t) * theta
    beta1, beta2, alpha = f(b1, t), f(b2, t), f(lr, t)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    if keras:
      vv = v
      if amsgrad:
        vmax = np.maximum(vmax, v)
        vv = vmax
      u = (np.sqrt(c2) / c1) * m / (np.sqrt(vv) + eps_t)
    else:
      if amsgrad == "torch":
        vmax = np.maximum(vmax, v)
        v_hat = vmax / c2
      elif amsgrad == "optax":
        vmax = np.maximum(vmax, v / c2)
        v_hat = vmax
      else:
        v_hat = v / c2
      u = (m / c1) / (np.sqrt(v_hat + eps_root_t) + eps_t)
    theta = theta - alpha * (u + f(decoupled_weight_decay, t) * theta)
    out.append(theta.copy())
  return np.stack(out)


def sgd(grads, params, *, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
  """torch.optim.SGD: b_1 = g_1, b_t = mu b + (1 - tau) g; nesterov g + mu b."""
  grads, theta = _as64(grads, params)
  buf = None
  out = []
  for g in grads:
    g = -g if maximize else g
    g = g + weight_decay * theta
    if momentum != 0:
      buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
      g = g + momentum * buf if nesterov else buf
    theta = theta - lr * g
    out.append(theta.copy())
  return np.stack(out)


def rmsprop(
  grads, params, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False
):
  """torch.optim.RMSprop: eps outside the root; momentum after the division."""
  grads, theta = _as64(grads, params)
  v = np.zeros_like(theta)
  gbar = np.zeros_like(theta)
  buf = np.zeros_like(theta)
  out = []
  for g in grads:
    g = -g if maximize else g
    g = g + weight_decay * theta
    v = alpha * v + (1 - alpha) * g * g
    if centered:
      gbar = alpha * gbar + (1 - alpha) * g
      avg = np.sqrt(v - gbar * gbar) + eps
    else:
      avg = np.sqrt(v) + eps
    if momentum > 0:
      buf = momentum * buf + g / avg
      theta = theta - lr * buf
    else:
      theta = theta - lr * g / avg
    out.append(theta.copy())
  return np.stack(out)


def adagrad(
  grads, params, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, maximize=False
):
  """torch.optim.Adagrad: lr / (1 + (t - 1) lr_decay), eps outside the root."""
  grads, theta = _as64(grads, params)
  s = np.full_like(theta, initial_accumulator_value)
  out = []
  for t, g in enumerate(grads, start=1):
    g = -g if maximize else g
    g = g + weight_decay * theta
    s = s + g * g
    clr = lr / (1 + (t - 1) * lr_decay)
    theta = theta - clr * g / (np.sqrt(s) + eps)
    out.append(theta.copy())
  return np.stack(out)
