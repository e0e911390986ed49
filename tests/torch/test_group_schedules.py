"""Groups and schedules, one rule (PyTorch's): a scheduler scales every group from that group's own initial lr."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import torch_front as H

torch = pytest.importorskip("torch")
S = torch.optim.lr_scheduler
jt = jadam.torch
STEPS = 200
ENCODER = ["encoder/kernel", "encoder/bias"]


def _compare(make_torch, scheduler, tx, groups):
  want = H.run_torch(make_torch, STEPS, np.float64, groups=groups, scheduler=scheduler)
  with jax.enable_x64(True):
    got = H.run_jax(tx, STEPS, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12


def test_scheduler_scales_each_group_from_its_own_lr():
  _compare(
    lambda g: torch.optim.Adam(g, lr=1e-2),
    lambda o: S.CosineAnnealingWarmRestarts(o, T_0=30, eta_min=1e-4),
    jt.Adam([{"params": "encoder/.*", "lr": 3e-3}], lr=jt.CosineAnnealingWarmRestarts(1e-2, T_0=30, eta_min=1e-4)),
    [(ENCODER, {"lr": 3e-3})],
  )


def test_sequential_lr_scales_each_group():
  _compare(
    lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
    lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, total_iters=10), S.CosineAnnealingLR(o, T_max=190)], [10]),
    jt.SGD(
      [{"params": "encoder/.*", "lr": 0.02}],
      lr=jt.SequentialLR([jt.LinearLR(0.1, 0.1, total_iters=10), jt.CosineAnnealingLR(0.1, T_max=190)], [10]),
      momentum=0.9,
    ),
    [(ENCODER, {"lr": 0.02})],
  )


def test_one_cycle_takes_a_max_lr_per_group():
  _compare(
    lambda g: torch.optim.AdamW(g, lr=1e-3),
    lambda o: S.OneCycleLR(o, max_lr=[0.05, 0.01], total_steps=STEPS),
    jt.AdamW([{"params": "encoder/.*", "lr": 123.0}], lr=jt.OneCycleLR([0.05, 0.01], total_steps=STEPS)),
    [(ENCODER, {"lr": 123.0})],  # the group's own lr is overwritten by OneCycleLR, in torch as here
  )


def test_cyclic_lr_takes_lists_per_group():
  _compare(
    lambda g: torch.optim.SGD(g, lr=1e-3, momentum=0.9),
    lambda o: S.CyclicLR(o, base_lr=[1e-3, 5e-3], max_lr=[1e-2, 2e-2], step_size_up=25, max_momentum=[0.9, 0.95]),
    jt.SGD(
      [{"params": "encoder/.*"}],
      lr=jt.CyclicLR([1e-3, 5e-3], [1e-2, 2e-2], step_size_up=25, max_momentum=[0.9, 0.95]),
      momentum=0.9,
    ),
    [(ENCODER, {})],
  )


def test_optax_schedule_default_scales_a_groups_float_lr():
  """An Optax schedule s as the default lr: a group with lr g gets g s(t)/s(0), torch's LambdaLR(s(t)/s(0))."""

  def schedule(count):
    return 1e-2 * 0.9 ** (jnp.asarray(count).astype(jnp.float64) / 10)  # optax's form, in float64

  _compare(
    lambda g: torch.optim.Adam(g, lr=1e-2),
    lambda o: S.LambdaLR(o, lambda e: 0.9 ** (e / 10)),
    jt.Adam([{"params": "encoder/.*", "lr": 3e-3}], lr=schedule),
    [(ENCODER, {"lr": 3e-3})],
  )


def test_errors():
  with pytest.raises(ValueError, match=r"expected 2 values for max_lr .* but got 4"):
    jt.Adam([{"params": "encoder/.*"}, {"params": "head/.*"}], lr=jt.OneCycleLR([0.1, 0.2, 0.3, 0.4], total_steps=9))
  with pytest.raises(ValueError, match=r"s\(0\) is 0.0; give the group its own schedule"):
    jt.Adam([{"params": "encoder/.*", "lr": 1e-3}], lr=optax.linear_schedule(0.0, 1e-2, 10))
  with pytest.raises(ValueError, match="one max_lr per param group"):
    jt.OneCycleLR([0.1, 0.2], total_steps=9)(jnp.asarray(0))
