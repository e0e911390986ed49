"""NumPy float64 references of Adamax, NAdam and RAdam, written from the papers and PyTorch's docs.

Same conventions as tests/helpers/reference.py: gradients of a whole run (steps, *shape)
and initial params in, params after every step out. Independent of jadam and torch.
"""

from __future__ import annotations

import numpy as np


def adamax(grads, params, *, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, maximize=False):
  """m = b1 m + (1 - b1) g; u = max(b2 u, |g| + eps); theta -= lr / (1 - b1^t) * m / u."""
  grads, theta = np.asarray(grads, np.float64), np.array(params, np.float64)
  m = np.zeros_like(theta)
  u = np.zeros_like(theta)
  out = []
  for t, g in enumerate(grads, start=1):
    g = (-g if maximize else g) + weight_decay * theta
    m = b1 * m + (1 - b1) * g
    u = np.maximum(b2 * u, np.abs(g) + eps)
    theta = theta - lr / (1 - b1**t) * m / u
    out.append(theta.copy())
  return np.stack(out)


def nadam(
  grads,
  params,
  *,
  lr=2e-3,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  weight_decay=0.0,
  momentum_decay=4e-3,
  decoupled=False,
  maximize=False,
):
  """Dozat's NAdam with mu_t = b1 (1 - 0.5 * 0.96^(t psi)), as torch.optim.NAdam documents it."""
  grads, theta = np.asarray(grads, np.float64), np.array(params, np.float64)
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  prod = 1.0
  out = []
  for t, g in enumerate(grads, start=1):
    g = -g if maximize else g
    if decoupled:
      theta = theta * (1 - lr * weight_decay)
    else:
      g = g + weight_decay * theta
    mu = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    prod *= mu
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v / (1 - b2**t)) + eps
    theta = theta - lr * (1 - mu) / (1 - prod) * g / denom - lr * mu_next / (1 - prod * mu_next) * m / denom
    out.append(theta.copy())
  return np.stack(out)


def radam(grads, params, *, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, maximize=False):
  """Liu et al.'s RAdam: rectified Adam once rho_t > 5, SGD with momentum before."""
  grads, theta = np.asarray(grads, np.float64), np.array(params, np.float64)
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  out = []
  rho_inf = 2 / (1 - b2) - 1
  for t, g in enumerate(grads, start=1):
    g = -g if maximize else g
    if decoupled:
      theta = theta * (1 - lr * weight_decay)
    else:
      g = g + weight_decay * theta
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho > 5:
      r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
      theta = theta - lr * m_hat * r * np.sqrt(1 - b2**t) / (np.sqrt(v) + eps)
    else:
      theta = theta - lr * m_hat
    out.append(theta.copy())
  return np.stack(out)
