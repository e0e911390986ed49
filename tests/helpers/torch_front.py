"""Run a `torch.optim` optimizer and a jadam transformation side by side on the same gradients.

The gradient of leaf `k` at step `t` is `c_k * theta_k + n_{k,t}`: it depends on
the parameters (so weight decay, maximize and the trajectory matter) and is
formed with the same two IEEE operations in both libraries, so identical
parameters give identical gradients.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"encoder": {"kernel": (4, 3), "bias": (3,)}, "head": {"kernel": (3, 2), "bias": (2,)}}
PATHS = ["encoder/bias", "encoder/kernel", "head/bias", "head/kernel"]  # jax's sorted order


def problem(steps: int, seed: int = 0):
  """Initial params, per-leaf curvatures c and gradient noise, as float64 NumPy trees (flat by path)."""
  rng = np.random.default_rng(seed)
  shapes = {"encoder/kernel": (4, 3), "encoder/bias": (3,), "head/kernel": (3, 2), "head/bias": (2,)}
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  curv = {k: rng.uniform(0.1, 1.0, size=s) for k, s in shapes.items()}
  noise = {k: rng.normal(size=(steps, *s)) for k, s in shapes.items()}
  return params, curv, noise


def nest(flat):
  out = {}
  for path, v in flat.items():
    a, b = path.split("/")
    out.setdefault(a, {})[b] = v
  return out


@contextlib.contextmanager
def torch_default_dtype(dtype):
  import torch

  old = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    yield
  finally:
    torch.set_default_dtype(old)


def run_torch(make_opt, steps, dtype, groups=None, *, scheduler=None, metrics=None, seed=0):
  """Params (flat dict path -> array (steps, ...)) after each step of torch.

  make_opt(param_groups) builds the optimizer; groups: list of (paths, overrides).
  scheduler(opt) builds a scheduler stepped after each optimizer step (with
  metrics[t] if given).
  """
  import torch

  params0, curv, noise = problem(steps, seed)
  tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
  with torch_default_dtype(tdtype):
    tensors = {k: torch.tensor(v.astype(dtype), requires_grad=True) for k, v in params0.items()}
    cs = {k: torch.tensor(v.astype(dtype)) for k, v in curv.items()}
    ns = {k: torch.tensor(v.astype(dtype)) for k, v in noise.items()}
    if groups is None:
      param_groups = [tensors[k] for k in PATHS]
    else:
      used = set()
      param_groups = []
      for paths, overrides in groups:
        param_groups.append({"params": [tensors[k] for k in paths], **overrides})
        used |= set(paths)
      rest = [tensors[k] for k in PATHS if k not in used]
      if rest:
        param_groups.append({"params": rest})
    opt = make_opt(param_groups)
    sched = scheduler(opt) if scheduler else None
    out = {k: [] for k in PATHS}
    for t in range(steps):
      with torch.no_grad():
        for k, p in tensors.items():
          p.grad = cs[k] * p + ns[k][t]
      opt.step()
      if sched is not None:
        sched.step(metrics[t]) if metrics is not None else sched.step()
      for k, p in tensors.items():
        out[k].append(p.detach().numpy().copy())
  return {k: np.stack(v) for k, v in out.items()}


def run_jax(tx, steps, dtype, *, metrics=None, seed=0):
  """The same run with an Optax transformation; returns the same layout as run_torch."""
  params0, curv, noise = problem(steps, seed)
  params = nest({k: jnp.asarray(v.astype(dtype)) for k, v in params0.items()})
  cs = nest({k: jnp.asarray(v.astype(dtype)) for k, v in curv.items()})
  ns = nest({k: jnp.asarray(v.astype(dtype)) for k, v in noise.items()})

  values = jnp.asarray(np.zeros(steps) if metrics is None else np.asarray(metrics), dtype)

  @jax.jit
  def run(params, state):
    def step(carry, xs):
      params, state = carry
      n_t, value = xs
      grads = jax.tree.map(lambda c, p, n: c * p + n, cs, params, n_t)
      extra = {} if metrics is None else {"value": value}
      updates, state = tx.update(grads, state, params, **extra)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
      return (params, state), params

    return jax.lax.scan(step, (params, state), (ns, values))[1]

  trajectory = run(params, tx.init(params))
  return {k: np.asarray(trajectory[k.split("/")[0]][k.split("/")[1]]) for k in PATHS}


def max_rel_diff(got, want):
  """max over leaves and steps of |got - want| / max|want| (per leaf and step)."""
  worst = 0.0
  for k in PATHS:
    scale = np.max(np.abs(want[k]), axis=tuple(range(1, want[k].ndim)), keepdims=True)
    worst = max(worst, float(np.max(np.abs(got[k] - want[k]) / scale)))
  return worst


def max_ulps(got, want):
  """max over leaves, steps and elements of |got - want| in float32 ulps of the leaf's scale.

  The scale is the leaf's largest |want| in the run.

  Normwise, not elementwise: an element crossing zero has an ulp of 1e-45, and
  counting in it would measure the crossing, not the optimizer.
  """
  worst = 0.0
  for k in PATHS:
    w = want[k].astype(np.float32)
    scale = np.max(np.abs(w))
    ulp = np.spacing(scale)
    worst = max(worst, float(np.max(np.abs(got[k].astype(np.float64) - w.astype(np.float64)) / ulp)))
  return worst


# --- non-finite gradients: the pattern of NaN / inf / finite parameters ---------------------------------------------
NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def nonfinite_gradients(size: int, steps: int = 4, seed: int = 0):
  """`(params0, {case: [gradient per step]})`, float32: a NaN, +inf or -inf in one element or in all, at the first
  step (before any moment exists) or the second (after one clean step)."""
  rng = np.random.default_rng(seed)
  params0 = rng.normal(size=size).astype(np.float32)
  clean = [rng.normal(size=size).astype(np.float32) for _ in range(steps)]
  cases = {}
  for name, value in NONFINITE.items():
    for where in ("one", "all"):
      for at in (0, 1):
        grads = [g.copy() for g in clean]
        if where == "one":
          grads[at][size // 2] = value
        else:
          grads[at][:] = value
        cases[f"{name} in {where} at step {at}"] = grads
  return params0, cases


def pattern(x):
  """0 finite, 1 infinite, 2 NaN, elementwise."""
  x = np.asarray(x)
  return np.where(np.isnan(x), 2, np.where(np.isinf(x), 1, 0))


def torch_patterns(make_opt, params0, grads, *, sparse=False):
  """The pattern of torch's parameters after each step."""
  import torch

  p = torch.nn.Parameter(torch.tensor(params0))
  opt = make_opt([p])
  out = []
  for g in grads:
    grad = torch.tensor(g)
    p.grad = grad.to_sparse() if sparse else grad
    opt.step()
    out.append(pattern(p.detach().numpy()))
  return out


def jax_patterns(step, init, params0, grads, *, sparse=False):
  """The same with a jadam step ``step(grads, state, params) -> (params, state)``."""
  from jax.experimental.sparse import BCOO

  params = {"w": jnp.asarray(params0)}
  state = init(params)
  out = []
  for g in grads:
    if sparse:
      rows = np.arange(g.shape[0])
      leaf = BCOO((jnp.asarray(g), jnp.asarray(rows)[:, None]), shape=g.shape)
    else:
      leaf = jnp.asarray(g)
    params, state = step({"w": leaf}, state, params)
    out.append(pattern(params["w"]))
  return out
