"""jadam.torch.ASGD under ReduceLROnPlateau and jadam.torch.Rprop with a scheduler, against live torch, float64.

ASGD's rate enters only its own step size, one step late (PyTorch stores `eta` at the end of each step
from that step's lr); Rprop reads the rate once, to start its step sizes, so a scheduler changes only
the first rate (LinearLR's start factor) and nothing after it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jadam
from tests.helpers import torch_front as H

torch = pytest.importorskip("torch")
S = torch.optim.lr_scheduler
STEPS = 150
# float64 parity: both libraries take the same IEEE operations in a different grouping (ASGD's
# p(1 - lambda eta) - eta g, a power); a few ulps per step over 150 steps stays far below 1e-12.
TOL = 1e-12


def _metrics(steps: int = STEPS) -> np.ndarray:
  """A loss that improves, then plateaus for stretches of 30 steps (the rate must fall at least twice)."""
  t = np.arange(steps)
  return 1.0 / (1 + t // 30) + 1e-6 * np.cos(t)


def _torch_lrs(make_opt, make_sched, metrics) -> list[float]:
  """The group lr of each step of a torch run (the scheduler fed `metrics`)."""
  p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
  opt = make_opt([p])
  sched = make_sched(opt)
  lrs = []
  for m in metrics:
    lrs.append(opt.param_groups[0]["lr"])
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step(m)
  return lrs


ASGD_CASES = [
  ("defaults", dict(lr=0.05, t0=20), dict(patience=3, factor=0.5)),
  ("decay", dict(lr=0.1, lambd=1e-2, alpha=0.6, t0=10, weight_decay=0.05), dict(patience=2, factor=0.3, cooldown=3)),
  ("maximize", dict(lr=0.02, lambd=1e-1, maximize=True), dict(patience=5, factor=0.5, min_lr=4e-3)),
]


@pytest.mark.parametrize("name, kwargs, plateau", ASGD_CASES, ids=[c[0] for c in ASGD_CASES])
def test_asgd_on_plateau_matches_torch(name, kwargs, plateau):
  lrs = _torch_lrs(lambda g: torch.optim.ASGD(g, **kwargs), lambda o: S.ReduceLROnPlateau(o, **plateau), _metrics())
  assert len(set(lrs)) >= 3, lrs  # the rate is reduced at least twice
  with H.torch_default_dtype(torch.float64):  # ASGD keeps eta and mu in the default dtype
    want = H.run_torch(
      lambda g: torch.optim.ASGD(g, **kwargs),
      STEPS,
      np.float64,
      scheduler=lambda o: S.ReduceLROnPlateau(o, **plateau),
      metrics=_metrics(),
    )
  with jax.enable_x64(True):
    lr = jadam.torch.ReduceLROnPlateau(kwargs["lr"], **plateau)
    tx = jadam.torch.ASGD(lr=lr, **{k: v for k, v in kwargs.items() if k != "lr"})
    got = H.run_jax(tx, STEPS, np.float64, metrics=_metrics())
  assert H.max_rel_diff(got, want) <= TOL


def test_asgd_on_plateau_differs_from_a_rate_read_at_once():
  """A large lambd makes the rate matter in eta; the plateau changes the trajectory, and jadam follows it."""
  plateau = dict(patience=3, factor=0.5)
  with H.torch_default_dtype(torch.float64):
    want = H.run_torch(
      lambda g: torch.optim.ASGD(g, lr=0.05, lambd=0.5, t0=20),
      STEPS,
      np.float64,
      scheduler=lambda o: S.ReduceLROnPlateau(o, **plateau),
      metrics=_metrics(),
    )
    plain = H.run_torch(lambda g: torch.optim.ASGD(g, lr=0.05, lambd=0.5, t0=20), STEPS, np.float64)
  with jax.enable_x64(True):
    got = H.run_jax(
      jadam.torch.ASGD(lr=jadam.torch.ReduceLROnPlateau(0.05, **plateau), lambd=0.5, t0=20),
      STEPS,
      np.float64,
      metrics=_metrics(),
    )
  assert H.max_rel_diff(got, want) <= TOL
  assert H.max_rel_diff(plain, want) > 1e-6  # the plateau did change the trajectory


def test_asgd_on_plateau_param_groups():
  """A group's own lr is the plateau's starting rate for that group, as PyTorch's scheduler scales each group."""
  groups = [(["encoder/kernel", "encoder/bias"], {"lr": 0.1})]
  plateau = dict(patience=3, factor=0.5)
  with H.torch_default_dtype(torch.float64):
    want = H.run_torch(
      lambda g: torch.optim.ASGD(g, lr=0.05, t0=30),
      STEPS,
      np.float64,
      groups=groups,
      scheduler=lambda o: S.ReduceLROnPlateau(o, **plateau),
      metrics=_metrics(),
    )
  with jax.enable_x64(True):
    tx = jadam.torch.ASGD(
      [{"params": "encoder/.*", "lr": 0.1}], lr=jadam.torch.ReduceLROnPlateau(0.05, **plateau), t0=30
    )
    got = H.run_jax(tx, STEPS, np.float64, metrics=_metrics())
  assert H.max_rel_diff(got, want) <= TOL


def test_asgd_on_plateau_needs_the_metric():
  tx = jadam.torch.ASGD(lr=jadam.torch.ReduceLROnPlateau(0.05))
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match="needs the metric"):
    tx.update({"w": jnp.ones(3)}, tx.init(params), params)


RPROP_CASES = [
  ("StepLR", lambda o: S.StepLR(o, 3, 0.1), lambda lr: jadam.torch.StepLR(lr, 3, 0.1), None),
  ("LinearLR", lambda o: S.LinearLR(o, start_factor=0.5, total_iters=10), None, None),
  (
    "Plateau",
    lambda o: S.ReduceLROnPlateau(o, patience=0),
    lambda lr: jadam.torch.ReduceLROnPlateau(lr, patience=0),
    1,
  ),
]


def _jadam_linear(lr):
  return jadam.torch.LinearLR(lr, start_factor=0.5, total_iters=10)


@pytest.mark.parametrize("name, torch_sched, jadam_sched, metric", RPROP_CASES, ids=[c[0] for c in RPROP_CASES])
def test_rprop_with_a_scheduler_matches_torch(name, torch_sched, jadam_sched, metric):
  jadam_sched = jadam_sched or _jadam_linear
  metrics = _metrics() if metric else None
  want = H.run_torch(lambda g: torch.optim.Rprop(g, lr=0.05), STEPS, np.float64, scheduler=torch_sched, metrics=metrics)
  with jax.enable_x64(True):
    with pytest.warns(UserWarning, match="reads the rate only once"):
      tx = jadam.torch.Rprop(lr=jadam_sched(0.05))
    got = H.run_jax(tx, STEPS, np.float64, metrics=metrics)
  assert H.max_rel_diff(got, want) <= TOL
  plain = H.run_torch(lambda g: torch.optim.Rprop(g, lr=0.05), STEPS, np.float64)
  if name == "LinearLR":  # its rate at step 0 is 0.025: the step sizes start there
    assert H.max_rel_diff(plain, want) > 1e-6
  else:  # the scheduler has no effect at all in PyTorch
    assert H.max_rel_diff(plain, want) == 0.0


def test_rprop_with_a_number_does_not_warn():
  with warnings_as_errors():
    jadam.torch.Rprop(lr=0.05)


class warnings_as_errors:
  def __enter__(self):
    import warnings

    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("error")

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


class JitVariantsTest(chex.TestCase):
  """The two schedule paths, jitted and not, step for step against torch."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("asgd_plateau", "ASGD"), ("rprop_linear", "Rprop"))
  def test_matches_torch(self, name):
    steps, metrics = 40, _metrics(40) * 0 + 1.0  # a flat metric: the plateau reduces the rate every 2 steps
    plateau = dict(patience=1, factor=0.5)
    if name == "ASGD":
      with H.torch_default_dtype(torch.float64):
        want = H.run_torch(
          lambda g: torch.optim.ASGD(g, lr=0.1, lambd=0.3, t0=5),
          steps,
          np.float64,
          scheduler=lambda o: S.ReduceLROnPlateau(o, **plateau),
          metrics=metrics,
        )
    else:
      want = H.run_torch(
        lambda g: torch.optim.Rprop(g, lr=0.05),
        steps,
        np.float64,
        scheduler=lambda o: S.LinearLR(o, 0.5, total_iters=4),
      )
    with jax.enable_x64(True):
      if name == "ASGD":
        tx = jadam.torch.ASGD(lr=jadam.torch.ReduceLROnPlateau(0.1, **plateau), lambd=0.3, t0=5)
      else:
        with pytest.warns(UserWarning):
          tx = jadam.torch.Rprop(lr=jadam.torch.LinearLR(0.05, 0.5, total_iters=4))
      params0, curv, noise = H.problem(steps)
      params = H.nest({k: jnp.asarray(v) for k, v in params0.items()})
      cs = H.nest({k: jnp.asarray(v) for k, v in curv.items()})
      update = self.variant(lambda g, s, p, m: tx.update(g, s, p, value=m))
      state = tx.init(params)
      for t in range(steps):
        grads = jax.tree.map(
          lambda c, p, n: c * p + n, cs, params, H.nest({k: jnp.asarray(v[t]) for k, v in noise.items()})
        )
        updates, state = update(grads, state, params, jnp.asarray(metrics[t]))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k in H.PATHS:
          a, b = k.split("/")
          np.testing.assert_allclose(
            np.asarray(params[a][b]), want[k][t], rtol=0, atol=TOL * np.max(np.abs(want[k][t]))
          )
