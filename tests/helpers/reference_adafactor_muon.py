"""NumPy float64 references of Adafactor and Muon (written from torch.optim's source), and a side-by-side runner.

The runner feeds both libraries the gradient `c * theta + n_t` of each leaf
(the parameters matter, so weight decay and maximize do), formed with the same
two IEEE operations on both sides.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.helpers.torch_front import torch_default_dtype


# ---------------------------------------------------------------------------------------------- references
def adafactor_step(
  theta, grad, state, t, *, lr=1e-2, beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, wd=0.0, maximize=False
):
  """One step of torch.optim.Adafactor on one float64 array; `state` is a dict (row, col) or (var); returns theta."""
  g = -grad if maximize else grad
  eps1 = np.finfo(np.float64).eps if eps1 is None else eps1
  w = float(t) ** beta2_decay
  rho = min(lr, 1 / math.sqrt(t))
  alpha = max(eps2, float(np.sqrt(np.mean(theta**2)))) * rho
  theta = theta * (1 - lr * wd)
  if g.ndim > 1:
    state["row"] = state["row"] + w * (np.mean(g * g, axis=-1, keepdims=True) - state["row"])
    state["col"] = state["col"] + w * (np.mean(g * g, axis=-2, keepdims=True) - state["col"])
    v = state["row"] * state["col"] / np.maximum(np.mean(state["row"], axis=-2, keepdims=True), eps1)
  else:
    state["var"] = state["var"] + w * (g * g - state["var"])
    v = state["var"]
  u = g / np.sqrt(np.maximum(v, eps1 * eps1))
  denom = max(1.0, float(np.sqrt(np.mean(u * u))) / d)
  return theta - alpha / denom * u


def adafactor_state(shape):
  if len(shape) > 1:
    return {"row": np.zeros((*shape[:-1], 1)), "col": np.zeros((*shape[:-2], 1, shape[-1]))}
  return {"var": np.zeros(shape)}


def newton_schulz(g, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
  a, b, c = coefficients
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / max(float(np.linalg.norm(x)), eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def muon_step(theta, grad, buf, *, lr=1e-3, wd=0.1, momentum=0.95, nesterov=True, adjust="original", **ns):
  """One step of torch.optim.Muon (Newton-Schulz in float64); returns (theta, buf)."""
  buf = momentum * buf + (1 - momentum) * grad
  u = (1 - momentum) * grad + momentum * buf if nesterov else buf
  o = newton_schulz(u, **ns)
  a, b = theta.shape
  ratio = math.sqrt(max(1, a / b)) if adjust in (None, "original") else 0.2 * math.sqrt(max(a, b))
  return theta * (1 - lr * wd) - lr * ratio * o, buf


# ---------------------------------------------------------------------------------------------- runner
def problem(shapes, steps, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  curv = {k: rng.uniform(0.1, 1.0, size=s) for k, s in shapes.items()}
  # Drawn for 256 steps whatever `steps` is, so that a run cut in two sees the noise of the whole run.
  noise = {k: rng.normal(size=(max(steps, 256), *s))[:steps] * 10.0 ** rng.uniform(-2, 1) for k, s in shapes.items()}
  return params, curv, noise


def run_torch(make_opts, shapes, steps, dtype=np.float64, *, seed=0, scheduler=None, state=None, start=0):
  """Params after each step (dict name -> array (steps, ...)). make_opts(tensors dict) -> list of optimizers.

  `state`, if given, is loaded into the (single) optimizer first; `start` skips that many noise steps. Returns
  (trajectory, optimizers).
  """
  import torch

  params0, curv, noise = problem(shapes, start + steps, seed)
  tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
  with torch_default_dtype(tdtype):
    tensors = {k: torch.tensor(v.astype(dtype), requires_grad=True) for k, v in params0.items()}
    if isinstance(state, tuple):  # (params at `start`, optimizer state dict)
      with torch.no_grad():
        for k, v in state[0].items():
          tensors[k].copy_(torch.tensor(np.asarray(v)))
    cs = {k: torch.tensor(v.astype(dtype)) for k, v in curv.items()}
    ns = {k: torch.tensor(v.astype(dtype)) for k, v in noise.items()}
    opts = make_opts(tensors)
    if isinstance(state, tuple):
      opts[0].load_state_dict(state[1])
    scheds = [scheduler(o) for o in opts] if scheduler else []
    out = {k: [] for k in shapes}
    for t in range(start, start + steps):
      with torch.no_grad():
        for k, p in tensors.items():
          p.grad = cs[k] * p + ns[k][t]
      for o in opts:
        o.step()
      for s in scheds:
        s.step()
      for k, p in tensors.items():
        out[k].append(p.detach().numpy().copy())
  return {k: np.stack(v) for k, v in out.items()}, opts


def run_jax(tx, shapes, steps, dtype=np.float64, *, seed=0, params=None, state=None, start=0, jit=True):
  """The same run with an Optax transformation: (trajectory, final params, final state)."""
  params0, curv, noise = problem(shapes, start + steps, seed)
  p = {k: jnp.asarray(v.astype(dtype)) for k, v in (params0 if params is None else params).items()}
  cs = {k: jnp.asarray(v.astype(dtype)) for k, v in curv.items()}
  s = tx.init(p) if state is None else state
  update = jax.jit(tx.update) if jit else tx.update
  out = {k: [] for k in shapes}
  for t in range(start, start + steps):
    grads = {k: cs[k] * p[k] + jnp.asarray(noise[k][t].astype(dtype)) for k in shapes}
    u, s = update(grads, s, p)
    p = optax.apply_updates(p, u)
    for k in shapes:
      out[k].append(np.asarray(p[k]))
  return {k: np.stack(v) for k, v in out.items()}, p, s


def run_numpy(step, init, shapes, steps, *, seed=0):
  """The float64 reference: step(theta, grad, state, t) -> theta, per leaf."""
  params0, curv, noise = problem(shapes, steps, seed)
  out = {}
  for k, shape in shapes.items():
    theta, state, traj = params0[k], init(shape), []
    for t in range(steps):
      theta = step(theta, curv[k] * theta + noise[k][t], state, t + 1)
      traj.append(theta)
    out[k] = np.stack(traj)
  return out


def max_rel_diff(got, want):
  """max over leaves and steps of |got - want| / max|want| (per leaf and step)."""
  worst = 0.0
  for k in want:
    scale = np.max(np.abs(want[k]), axis=tuple(range(1, want[k].ndim)), keepdims=True)
    worst = max(worst, float(np.max(np.abs(got[k] - want[k]) / scale)))
  return worst


def max_ulps(got, want):
  """max |got - want| in float32 ulps of each leaf's largest |want| over the run (normwise)."""
  worst = 0.0
  for k in want:
    w = want[k].astype(np.float32)
    ulp = np.spacing(np.max(np.abs(w)))
    worst = max(worst, float(np.max(np.abs(got[k].astype(np.float64) - w.astype(np.float64)) / ulp)))
  return worst
