"""Shared machinery of the parity tests: a noisy problem, runners, error measures.

The problem is a noisy separable quadratic, g_t = a * theta_{t-1} - b + noise_t
(elementwise, so every library rounds it the same way), with parameters drawn
from [1, 2] so relative differences mean something. With `feedback=False` the
gradients are the noise alone. Each runner returns the parameters after every
step, shape (steps, n).

`CONFIGS` names each optimizer setting once, with how to build it in jadam, in
torch and in the NumPy reference; the parity tests, tools/make_golden.py and
tools/report_parity.py all read it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam
from tests.helpers import reference


class Problem(NamedTuple):
  params: np.ndarray  # (n,) float64, uniform in [1, 2]
  a: np.ndarray  # (n,) curvature in [0.5, 1.5] (negated for a concave problem)
  b: np.ndarray  # (n,) a times the optimum, which lies in [1, 2] too
  noise: np.ndarray  # (steps, n)
  feedback: bool


def problem(
  steps: int = 500, n: int = 8, *, seed: int = 0, feedback: bool = True, scale: float = 1.0, sign: float = 1.0
) -> Problem:
  """The problem; `sign=-1` makes it concave, for `maximize=True` to climb to the same optimum."""
  rng = np.random.default_rng(seed)
  a = sign * scale * rng.uniform(0.5, 1.5, n)
  return Problem(
    params=rng.uniform(1.0, 2.0, n),
    a=a,
    b=a * rng.uniform(1.0, 2.0, n),
    noise=scale * rng.normal(size=(steps, n)),
    feedback=feedback,
  )


def _grad(prob: Problem, theta, a, b, noise):
  return a * theta - b + noise if prob.feedback else noise


# --- runners ---------------------------------------------------------------------------------


def _previous(prob: Problem, thetas: np.ndarray) -> np.ndarray:
  """The parameters before each step: the initial ones, then `thetas[:-1]`."""
  return np.concatenate([np.asarray(prob.params, thetas.dtype)[None], thetas[:-1]])


def run_jax(tx: optax.GradientTransformation, prob: Problem, dtype, *, with_grads: bool = False, teacher=None):
  """Runs `tx` (jadam or optax) for all steps in one jitted `lax.scan`.

  `teacher=(thetas, grads)` of another run forces each step to start from that
  run's parameters and gradient, so the result measures one step's error.
  """
  p0, a, b = (jnp.asarray(x, dtype) for x in (prob.params, prob.a, prob.b))
  if teacher is None:
    xs = (jnp.asarray(prob.noise, dtype), None, None)
  else:
    xs = (jnp.asarray(prob.noise, dtype), jnp.asarray(_previous(prob, teacher[0])), jnp.asarray(teacher[1]))

  def step(carry, x):
    theta, state = carry
    n, forced_theta, forced_g = x
    if forced_theta is not None:
      theta, g = forced_theta, forced_g
    else:
      g = _grad(prob, theta, a, b, n)
    u, state = tx.update(g, state, theta)
    theta = optax.apply_updates(theta, u)
    return (theta, state), (theta, g)

  @jax.jit
  def run():
    _, (thetas, grads) = jax.lax.scan(step, (p0, tx.init(p0)), xs)
    return thetas, grads

  thetas, grads = jax.device_get(run())
  return (np.asarray(thetas), np.asarray(grads)) if with_grads else np.asarray(thetas)


def run_optax(tx: optax.GradientTransformation, prob: Problem, dtype, **kwargs):
  """`run_jax` under standard promotion: optax forms float ** int32, which strict promotion refuses."""
  with jax.numpy_dtype_promotion("standard"):
    return run_jax(tx, prob, dtype, **kwargs)


def run_torch(make: Callable[[list], Any], prob: Problem, dtype, *, teacher=None):
  """Runs a `torch.optim` optimizer, `make([param])`, on the same problem (`teacher` as in `run_jax`)."""
  import torch

  tdtype = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]

  def as_t(x):
    return torch.tensor(np.asarray(x, np.dtype(dtype)), dtype=tdtype)

  theta = as_t(prob.params)
  a, b, noise = as_t(prob.a), as_t(prob.b), as_t(prob.noise)
  if teacher is not None:
    forced_theta, forced_g = as_t(_previous(prob, teacher[0])), as_t(teacher[1])
  opt = make([theta])
  out = []
  for t, n in enumerate(noise):
    with torch.no_grad():
      if teacher is None:
        theta.grad = _grad(prob, theta, a, b, n).clone()
      else:
        theta.copy_(forced_theta[t])
        theta.grad = forced_g[t].clone()
    opt.step()
    out.append(theta.detach().clone().numpy())
  return np.stack(out)


def run_reference(ref: Callable[..., np.ndarray], prob: Problem, grads: np.ndarray) -> np.ndarray:
  """The NumPy float64 reference, fed the gradients another run saw.

  The reference takes a fixed gradient sequence; with feedback, give it the
  gradients of the run under test: if that run is right, the reference then
  retraces its parameters exactly.
  """
  return ref(np.asarray(grads, np.float64), prob.params)


# --- measures --------------------------------------------------------------------------------


def max_rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want) / np.abs(want)))


def _ordered(x) -> np.ndarray:
  """float32 bit patterns as integers that count ulps across zero."""
  i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(i < 0, -(2**31) - i, i)


def ulps(got, want) -> np.ndarray:
  """Distance between two float32 arrays in units in the last place."""
  assert np.asarray(got).dtype == np.float32 and np.asarray(want).dtype == np.float32
  return np.abs(_ordered(got) - _ordered(want))


def max_ulps(got, want) -> int:
  return int(np.max(ulps(got, want)))


# --- the optimizer settings ------------------------------------------------------------------


class Config(NamedTuple):
  jadam: Callable[[], optax.GradientTransformation]
  torch: Callable[[list], Any]  # params -> torch.optim.Optimizer
  reference: Callable[..., np.ndarray]  # (grads, params) -> thetas
  optax: Callable[[], optax.GradientTransformation] | None = None
  sign: float = 1.0  # -1: run on the concave problem (maximize)

  def problem(self, steps: int = 500, **kwargs) -> Problem:
    return problem(steps, sign=self.sign, **kwargs)


def _t(name: str, **kw):
  def make(params):
    import torch

    return getattr(torch.optim, name)(params, **kw)

  return make


LR = 1e-2
CONFIGS: dict[str, Config] = {
  "adam": Config(
    lambda: jadam.adam(LR),
    _t("Adam", lr=LR),
    functools.partial(reference.adam, lr=LR),
    lambda: optax.adam(LR),
  ),
  "adam_weight_decay": Config(
    lambda: jadam.adam(LR, weight_decay=0.1),
    _t("Adam", lr=LR, weight_decay=0.1),
    functools.partial(reference.adam, lr=LR, weight_decay=0.1),
  ),
  "adam_amsgrad": Config(
    lambda: jadam.adam(LR, amsgrad=True),
    _t("Adam", lr=LR, amsgrad=True),
    functools.partial(reference.adam, lr=LR, amsgrad="torch"),
  ),
  "adam_maximize": Config(
    lambda: jadam.adam(LR, maximize=True),
    _t("Adam", lr=LR, maximize=True),
    functools.partial(reference.adam, lr=LR, maximize=True),
    sign=-1.0,
  ),
  "adam_amsgrad_weight_decay": Config(
    lambda: jadam.adam(LR, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05, amsgrad=True),
    _t("Adam", lr=LR, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True),
    functools.partial(reference.adam, lr=LR, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05, amsgrad="torch"),
  ),
  "adamw": Config(
    lambda: jadam.adamw(LR, weight_decay=0.1),
    _t("AdamW", lr=LR, weight_decay=0.1),
    functools.partial(reference.adam, lr=LR, decoupled_weight_decay=0.1),
    lambda: optax.adamw(LR, weight_decay=0.1),
  ),
  "adamw_amsgrad_maximize": Config(
    lambda: jadam.adamw(LR, b1=0.8, weight_decay=0.05, amsgrad=True, maximize=True),
    _t("AdamW", lr=LR, betas=(0.8, 0.999), weight_decay=0.05, amsgrad=True, maximize=True),
    functools.partial(reference.adam, lr=LR, b1=0.8, decoupled_weight_decay=0.05, amsgrad="torch", maximize=True),
    sign=-1.0,
  ),
  "sgd": Config(
    lambda: jadam.sgd(LR),
    _t("SGD", lr=LR),
    functools.partial(reference.sgd, lr=LR),
  ),
  "sgd_momentum_dampening": Config(
    lambda: jadam.sgd(LR, momentum=0.9, dampening=0.3, weight_decay=0.01),
    _t("SGD", lr=LR, momentum=0.9, dampening=0.3, weight_decay=0.01),
    functools.partial(reference.sgd, lr=LR, momentum=0.9, dampening=0.3, weight_decay=0.01),
  ),
  "sgd_dampening_without_momentum": Config(  # torch ignores dampening when momentum is 0
    lambda: jadam.sgd(LR, momentum=0.0, dampening=0.5),
    _t("SGD", lr=LR, momentum=0.0, dampening=0.5),
    functools.partial(reference.sgd, lr=LR, momentum=0.0, dampening=0.5),
  ),
  "sgd_maximize": Config(
    lambda: jadam.sgd(LR, momentum=0.5, weight_decay=0.01, maximize=True),
    _t("SGD", lr=LR, momentum=0.5, weight_decay=0.01, maximize=True),
    functools.partial(reference.sgd, lr=LR, momentum=0.5, weight_decay=0.01, maximize=True),
    sign=-1.0,
  ),
  "sgd_nesterov": Config(
    lambda: jadam.sgd(LR, momentum=0.9, nesterov=True),
    _t("SGD", lr=LR, momentum=0.9, nesterov=True),
    functools.partial(reference.sgd, lr=LR, momentum=0.9, nesterov=True),
  ),
  "rmsprop": Config(
    lambda: jadam.rmsprop(LR),
    _t("RMSprop", lr=LR),
    functools.partial(reference.rmsprop, lr=LR),
  ),
  "rmsprop_centered": Config(
    lambda: jadam.rmsprop(LR, centered=True, weight_decay=0.01),
    _t("RMSprop", lr=LR, centered=True, weight_decay=0.01),
    functools.partial(reference.rmsprop, lr=LR, centered=True, weight_decay=0.01),
  ),
  "rmsprop_momentum": Config(
    lambda: jadam.rmsprop(1e-3, momentum=0.9),
    _t("RMSprop", lr=1e-3, momentum=0.9),
    functools.partial(reference.rmsprop, lr=1e-3, momentum=0.9),
  ),
  "rmsprop_centered_momentum": Config(
    lambda: jadam.rmsprop(1e-3, alpha=0.9, centered=True, momentum=0.5),
    _t("RMSprop", lr=1e-3, alpha=0.9, centered=True, momentum=0.5),
    functools.partial(reference.rmsprop, lr=1e-3, alpha=0.9, centered=True, momentum=0.5),
  ),
  "rmsprop_maximize": Config(
    lambda: jadam.rmsprop(LR, centered=True, maximize=True),
    _t("RMSprop", lr=LR, centered=True, maximize=True),
    functools.partial(reference.rmsprop, lr=LR, centered=True, maximize=True),
    sign=-1.0,
  ),
  "adagrad_maximize": Config(
    lambda: jadam.adagrad(LR, weight_decay=0.01, maximize=True),
    _t("Adagrad", lr=LR, weight_decay=0.01, maximize=True),
    functools.partial(reference.adagrad, lr=LR, weight_decay=0.01, maximize=True),
    sign=-1.0,
  ),
  "adagrad": Config(
    lambda: jadam.adagrad(LR),
    _t("Adagrad", lr=LR),
    functools.partial(reference.adagrad, lr=LR),
  ),
  "adagrad_lr_decay_initial_accumulator": Config(
    lambda: jadam.adagrad(LR, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    _t("Adagrad", lr=LR, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    functools.partial(reference.adagrad, lr=LR, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
  ),
}

# jadam settings that optax implements too (optax's own float32 arithmetic is the reference).
OPTAX_CONFIGS = {name: c for name, c in CONFIGS.items() if c.optax is not None}
