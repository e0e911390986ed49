"""The rest of torch.optim.lr_scheduler against live torch: the rates, to 1e-12, over >= 3 cycles or milestones."""

import jax.numpy as jnp
import numpy as np
import pytest

import jadam
from tests.torch.test_schedulers import N, _assert_close, _jadam_lrs, _torch_lrs

torch = pytest.importorskip("torch")
S = torch.optim.lr_scheduler
jt = jadam.torch

CASES = [
  ("LambdaLR", lambda o: S.LambdaLR(o, lambda e: 0.97**e), jt.LambdaLR(0.1, lambda e: 0.97**e)),
  (
    "LambdaLR-warmup",
    lambda o: S.LambdaLR(o, lambda e: min(1.0, (e + 1) / 50)),
    jt.LambdaLR(0.1, lambda e: jnp.minimum(1.0, (e + 1) / 50)),
  ),
  ("MultiplicativeLR", lambda o: S.MultiplicativeLR(o, lambda e: 0.99), jt.MultiplicativeLR(0.1, lambda e: 0.99)),
  (
    "MultiplicativeLR-every-10",
    lambda o: S.MultiplicativeLR(o, lambda e: 0.8 if e % 10 == 0 else 1.0),
    jt.MultiplicativeLR(0.1, lambda e: jnp.where(e % 10 == 0, 0.8, 1.0)),
  ),
  (
    "ConstantLR",
    lambda o: S.ConstantLR(o, factor=0.5, total_iters=100),
    jt.ConstantLR(0.1, factor=0.5, total_iters=100),
  ),
  ("PolynomialLR", lambda o: S.PolynomialLR(o, total_iters=300, power=2.0), jt.PolynomialLR(0.1, 300, 2.0)),
  (
    "CosineAnnealingWarmRestarts",
    lambda o: S.CosineAnnealingWarmRestarts(o, T_0=30, eta_min=1e-3),
    jt.CosineAnnealingWarmRestarts(0.1, T_0=30, eta_min=1e-3),
  ),
  (
    "CosineAnnealingWarmRestarts-T_mult",
    lambda o: S.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2),
    jt.CosineAnnealingWarmRestarts(0.1, T_0=10, T_mult=2),
  ),
  (
    "CosineAnnealingWarmRestarts-T_mult-3",
    lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=3, eta_min=0.01),
    jt.CosineAnnealingWarmRestarts(0.1, T_0=4, T_mult=3, eta_min=0.01),
  ),
  (
    "CyclicLR-triangular",
    lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=40),
    jt.CyclicLR(0.01, 0.1, step_size_up=40),
  ),
  (
    "CyclicLR-triangular2",
    lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=30, step_size_down=50, mode="triangular2"),
    jt.CyclicLR(0.01, 0.1, step_size_up=30, step_size_down=50, mode="triangular2"),
  ),
  (
    "CyclicLR-exp_range",
    lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=25, mode="exp_range", gamma=0.995),
    jt.CyclicLR(0.01, 0.1, step_size_up=25, mode="exp_range", gamma=0.995),
  ),
  (
    "CyclicLR-scale_fn",
    lambda o: S.CyclicLR(o, 0.01, 0.1, step_size_up=20, scale_fn=lambda x: 0.9**x, scale_mode="cycle"),
    jt.CyclicLR(0.01, 0.1, step_size_up=20, scale_fn=lambda x: 0.9**x, scale_mode="cycle"),
  ),
  (
    "SequentialLR-warmup-cosine",
    lambda o: S.SequentialLR(
      o, [S.LinearLR(o, start_factor=0.01, total_iters=20), S.CosineAnnealingLR(o, T_max=100)], milestones=[20]
    ),
    jt.SequentialLR([jt.LinearLR(0.1, 0.01, total_iters=20), jt.CosineAnnealingLR(0.1, T_max=100)], milestones=[20]),
  ),
  (
    "SequentialLR-three",
    lambda o: S.SequentialLR(
      o,
      [S.ConstantLR(o, factor=0.2, total_iters=10), S.ExponentialLR(o, gamma=0.99), S.StepLR(o, 30, 0.5)],
      milestones=[50, 150],
    ),
    jt.SequentialLR(
      [jt.ConstantLR(0.1, factor=0.2, total_iters=10), jt.ExponentialLR(0.1, 0.99), jt.StepLR(0.1, 30, 0.5)],
      milestones=[50, 150],
    ),
  ),
  (
    "ChainedScheduler",
    lambda o: S.ChainedScheduler([S.ConstantLR(o, factor=0.1, total_iters=30), S.ExponentialLR(o, gamma=0.99)]),
    jt.ChainedScheduler([jt.ConstantLR(0.1, factor=0.1, total_iters=30), jt.ExponentialLR(0.1, 0.99)]),
  ),
  (
    "ChainedScheduler-three",
    lambda o: S.ChainedScheduler(
      [S.StepLR(o, 50, 0.5), S.LinearLR(o, 0.2, total_iters=100), S.MultiStepLR(o, [120, 200, 300], 0.7)]
    ),
    jt.ChainedScheduler(
      [jt.StepLR(0.1, 50, 0.5), jt.LinearLR(0.1, 0.2, total_iters=100), jt.MultiStepLR(0.1, [120, 200, 300], 0.7)]
    ),
  ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lr_sequence_matches_torch(case):
  _, make, schedule = case
  lr = schedule.lr
  _assert_close(_jadam_lrs(schedule), _torch_lrs(make, lr))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_per_epoch(case):
  _, make, schedule = case
  per_epoch = _torch_lrs(make, schedule.lr, n=N // 7 + 1)
  _assert_close(_jadam_lrs(schedule.per_epoch(7)), np.repeat(per_epoch, 7)[:N])
  assert schedule.per_epoch(7) != schedule


@pytest.mark.parametrize(
  "kw", [dict(), dict(mode="triangular2", step_size_down=20), dict(mode="exp_range", gamma=0.99, base_momentum=0.7)]
)
def test_cyclic_momentum_matches_torch(kw):
  _, want = _torch_lrs(lambda o: S.CyclicLR(o, 0.01, 0.1, step_size_up=40, **kw), 0.01, with_momentum=True)
  _assert_close(_jadam_lrs(jt.CyclicLR(0.01, 0.1, step_size_up=40, **kw).momentum), want)


def test_children_are_checked():
  with pytest.raises(ValueError, match="number of schedulers 2 and the number of milestones to be equal to 2"):
    jt.SequentialLR([jt.StepLR(0.1, 3), jt.StepLR(0.1, 3)], milestones=[1, 2])
  with pytest.raises(ValueError, match="does not support `ReduceLROnPlateau`"):
    jt.SequentialLR([jt.StepLR(0.1, 3), jt.ReduceLROnPlateau(0.1)], milestones=[1])
  with pytest.raises(ValueError, match="set per_epoch on the SequentialLR"):
    jt.SequentialLR([jt.StepLR(0.1, 3).per_epoch(2), jt.StepLR(0.1, 3)], milestones=[1])
  with pytest.raises(ValueError, match="CosineAnnealingLR \\(index 1\\) sets the rate rather than multiplying it"):
    jt.ChainedScheduler([jt.StepLR(0.1, 3), jt.CosineAnnealingLR(0.1, 3)])


def test_cyclic_lr_drives_sgd_momentum_as_torch():
  """A jadam.torch optimizer given a CyclicLR cycles its momentum too, as torch's CyclicLR does."""
  import jax

  from tests.helpers import torch_front as H

  steps = 150
  want = H.run_torch(
    lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9),
    steps,
    np.float64,
    scheduler=lambda o: S.CyclicLR(o, 0.01, 0.05, step_size_up=20, mode="triangular2"),
  )
  with jax.enable_x64(True):
    tx = jt.SGD(lr=jt.CyclicLR(0.01, 0.05, step_size_up=20, mode="triangular2"), momentum=0.9)
    got = H.run_jax(tx, steps, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12
