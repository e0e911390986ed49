"""jadam.torch.Adadelta, Rprop and ASGD (and jadam.adadelta, rprop, asgd) against live torch, float64, 1e-12."""

import jax
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import torch_front as H
from tests.torch.test_complex import _run_jax as _run_complex_jax
from tests.torch.test_complex import _run_torch as _run_complex_torch

torch = pytest.importorskip("torch")
STEPS = 300

CASES = [
  ("Adadelta", {}),
  ("Adadelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1, maximize=True)),
  ("Rprop", {}),
  ("Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2), maximize=True)),
  ("ASGD", {}),
  ("ASGD", dict(lr=0.05, lambd=1e-2, alpha=0.6, t0=100, weight_decay=0.05)),
]
IDS = [f"{n}-{'-'.join(k) or 'default'}" for n, k in CASES]


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_matches_torch_float64(name, kwargs):
  with H.torch_default_dtype(torch.float64):  # ASGD keeps eta and mu in the default dtype
    want = H.run_torch(lambda g: getattr(torch.optim, name)(g, **kwargs), STEPS, np.float64)
  with jax.enable_x64(True):
    got = H.run_jax(getattr(jadam.torch, name)(**kwargs), STEPS, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_matches_torch_complex128(name, kwargs):
  want = _run_complex_torch(name, kwargs)
  with jax.enable_x64(True):
    got = _run_complex_jax(getattr(jadam.torch, name)(**kwargs))
  for k in want:
    scale = np.max(np.abs(want[k]), axis=tuple(range(1, want[k].ndim)), keepdims=True)
    assert np.max(np.abs(np.asarray(got[k]) - want[k]) / scale) <= 1e-12


def test_groups_and_schedule():
  """Parameter groups with their own hyperparameters, and a scheduler on ASGD's rate."""
  groups = [(["encoder/kernel", "encoder/bias"], {"lr": 0.3, "rho": 0.7})]
  want = H.run_torch(lambda g: torch.optim.Adadelta(g, lr=1.0), STEPS, np.float64, groups=groups)
  with jax.enable_x64(True):
    got = H.run_jax(jadam.torch.Adadelta([{"params": "encoder/.*", "lr": 0.3, "rho": 0.7}], lr=1.0), STEPS, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12
  with H.torch_default_dtype(torch.float64):
    want = H.run_torch(
      lambda g: torch.optim.ASGD(g, lr=0.05, t0=50),
      STEPS,
      np.float64,
      scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 40, 0.5),
    )
  with jax.enable_x64(True):
    got = H.run_jax(jadam.torch.ASGD(lr=jadam.torch.StepLR(0.05, 40, 0.5), t0=50), STEPS, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12


def test_asgd_average_is_torchs_ax():
  t = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
  with H.torch_default_dtype(torch.float64):
    opt = torch.optim.ASGD([t], lr=0.1, t0=3)
    for i in range(10):
      t.grad = torch.sin(t * (i + 1))
      opt.step()
  with jax.enable_x64(True):
    tx = jadam.asgd(0.1, t0=3)
    p = jax.numpy.asarray([1.0, -2.0])
    s = tx.init(p)
    for i in range(10):
      u, s = tx.update(jax.numpy.sin(p * (i + 1)), s, p)
      p = optax.apply_updates(p, u)
  np.testing.assert_allclose(np.asarray(s[1].ax), opt.state[t]["ax"].numpy(), rtol=1e-13)
  np.testing.assert_allclose(np.asarray(p), t.detach().numpy(), rtol=1e-13)
