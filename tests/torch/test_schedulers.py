"""jadam.torch's schedulers against torch.optim.lr_scheduler: the learning-rate sequences, to 1e-12."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadam

torch = pytest.importorskip("torch")
S = torch.optim.lr_scheduler

N = 400  # at least three cycles, decays or plateaus of each schedule below


def _torch_lrs(make_sched, lr, n=N, metrics=None, with_momentum=False):
  """The lr (and momentum) torch uses for each of n optimizer steps, scheduler stepped after each."""
  p = torch.zeros(1, requires_grad=True)
  opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
  sched = make_sched(opt)
  lrs, moms = [], []
  for t in range(n):
    lrs.append(opt.param_groups[0]["lr"])
    moms.append(opt.param_groups[0]["momentum"])
    opt.step()
    sched.step(metrics[t]) if metrics is not None else sched.step()
  return (np.array(lrs), np.array(moms)) if with_momentum else np.array(lrs)


def _jadam_lrs(schedule, n=N):
  with jax.enable_x64(True):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)))


def _assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)))


CASES = [
  ("StepLR", lambda o: S.StepLR(o, step_size=30, gamma=0.5), jadam.torch.StepLR(0.1, step_size=30, gamma=0.5)),
  (
    "MultiStepLR",
    lambda o: S.MultiStepLR(o, milestones=[50, 120, 120, 300], gamma=0.3),
    jadam.torch.MultiStepLR(0.1, milestones=[300, 50, 120, 120], gamma=0.3),
  ),
  ("ExponentialLR", lambda o: S.ExponentialLR(o, gamma=0.99), jadam.torch.ExponentialLR(0.1, gamma=0.99)),
  ("CosineAnnealingLR", lambda o: S.CosineAnnealingLR(o, T_max=60), jadam.torch.CosineAnnealingLR(0.1, T_max=60)),
  (
    "CosineAnnealingLR-eta_min",
    lambda o: S.CosineAnnealingLR(o, T_max=50, eta_min=1e-3),
    jadam.torch.CosineAnnealingLR(0.1, T_max=50, eta_min=1e-3),
  ),
  (
    "LinearLR",
    lambda o: S.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=100),
    jadam.torch.LinearLR(0.1, start_factor=0.25, end_factor=1.0, total_iters=100),
  ),
  (
    "LinearLR-decay",
    lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=300),
    jadam.torch.LinearLR(0.1, start_factor=1.0, end_factor=0.1, total_iters=300),
  ),
  ("OneCycleLR", lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=N), jadam.torch.OneCycleLR(0.5, total_steps=N)),
  (
    "OneCycleLR-linear-three_phase",
    lambda o: S.OneCycleLR(
      o, max_lr=0.5, epochs=8, steps_per_epoch=50, anneal_strategy="linear", three_phase=True, pct_start=0.25
    ),
    jadam.torch.OneCycleLR(
      0.5, epochs=8, steps_per_epoch=50, anneal_strategy="linear", three_phase=True, pct_start=0.25
    ),
  ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lr_sequence_matches_torch(case):
  _, make, schedule = case
  _assert_close(_jadam_lrs(schedule), _torch_lrs(make, 0.1))


@pytest.mark.parametrize("case", CASES[:7], ids=[c[0] for c in CASES[:7]])
def test_per_epoch(case):
  """torch stepped once per epoch of 7 optimizer steps == jadam's schedule.per_epoch(7) of the step count."""
  _, make, schedule = case
  per_epoch = _torch_lrs(make, 0.1, n=N // 7 + 1)
  _assert_close(_jadam_lrs(schedule.per_epoch(7)), np.repeat(per_epoch, 7)[:N])
  assert schedule.per_epoch(7).steps_per_epoch == 7 and schedule.steps_per_epoch == 1


def test_one_cycle_momentum_matches_torch():
  for kw in (dict(), dict(three_phase=True, anneal_strategy="linear", base_momentum=0.8, max_momentum=0.99)):
    _, want = _torch_lrs(lambda o, kw=kw: S.OneCycleLR(o, max_lr=0.5, total_steps=N, **kw), 0.1, with_momentum=True)
    _assert_close(_jadam_lrs(jadam.torch.OneCycleLR(0.5, total_steps=N, **kw).momentum), want)


def test_rebase_scales_with_the_group_lr():
  sched = jadam.torch.CosineAnnealingLR(0.1, T_max=60, eta_min=1e-3)
  _assert_close(
    _jadam_lrs(sched.rebase(0.02)), _torch_lrs(lambda o: S.CosineAnnealingLR(o, T_max=60, eta_min=1e-3), 0.02)
  )
  one_cycle = jadam.torch.OneCycleLR(0.5, total_steps=10)
  assert one_cycle.rebase(0.01) is one_cycle  # torch's OneCycleLR ignores the group's lr


def _plateau_lrs(plateau, metrics):
  tx = plateau.transform()
  with jax.enable_x64(True):
    state = tx.init({"w": jnp.zeros(1)})
    update = jax.jit(tx.update)
    lrs = []
    for m in metrics:
      lrs.append(float(state.lr))
      _, state = update({"w": jnp.ones(1)}, state, None, value=m)
  return np.array(lrs)


def _metrics(mode):
  # Improvement, plateau, improvement, ... plus noise that a threshold must reject.
  t = np.arange(N)
  base = 1.0 / (1 + t // 37) + 1e-5 * np.cos(t)
  return list(base if mode == "min" else 2.0 - base)


PLATEAU = [
  dict(),
  dict(patience=3, factor=0.5),
  dict(patience=2, cooldown=4, factor=0.5, min_lr=1e-3),
  dict(patience=0, cooldown=1, factor=0.7, min_lr=2e-2),
  dict(patience=4, threshold=1e-2, threshold_mode="rel", factor=0.5),
  dict(patience=4, threshold=1e-3, threshold_mode="abs", factor=0.5, cooldown=2),
  dict(patience=1, factor=0.5, min_lr=0.0, eps=1e-3),
]


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize(
  "kw", PLATEAU, ids=[",".join(f"{k}={v}" for k, v in kw.items()) or "defaults" for kw in PLATEAU]
)
def test_reduce_on_plateau_matches_torch(mode, kw):
  metrics = _metrics(mode)
  want = _torch_lrs(lambda o: S.ReduceLROnPlateau(o, mode=mode, **kw), 0.1, metrics=metrics)
  got = _plateau_lrs(jadam.torch.ReduceLROnPlateau(0.1, mode=mode, **kw), metrics)
  assert len(np.unique(want)) >= 3  # the script does reduce the rate, several times
  if kw.get("min_lr"):
    assert want.min() == kw["min_lr"]  # and reaches the floor
  _assert_close(got, want)


def test_reduce_on_plateau_per_epoch_reads_only_epoch_ends():
  metrics = _metrics("min")[:60]
  want = _torch_lrs(lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5), 0.1, n=60, metrics=metrics)
  per_step = []
  for m in metrics:
    per_step += [np.nan, np.nan, m]  # only the last update of each epoch of 3 is read
  got = _plateau_lrs(jadam.torch.ReduceLROnPlateau(0.1, patience=1, factor=0.5).per_epoch(3), per_step)
  _assert_close(got, np.repeat(want, 3))


def test_scheduler_errors_match_torch():
  p = [torch.zeros(1, requires_grad=True)]
  bad = [
    (
      lambda: S.ReduceLROnPlateau(torch.optim.SGD(p), factor=1.0),
      lambda: jadam.torch.ReduceLROnPlateau(0.1, factor=1.0),
    ),
    (
      lambda: S.ReduceLROnPlateau(torch.optim.SGD(p), mode="avg"),
      lambda: jadam.torch.ReduceLROnPlateau(0.1, mode="avg"),
    ),
    (
      lambda: S.ReduceLROnPlateau(torch.optim.SGD(p), threshold_mode="x"),
      lambda: jadam.torch.ReduceLROnPlateau(0.1, threshold_mode="x"),
    ),
    (lambda: S.LinearLR(torch.optim.SGD(p), start_factor=0.0), lambda: jadam.torch.LinearLR(0.1, start_factor=0.0)),
    (lambda: S.LinearLR(torch.optim.SGD(p), end_factor=2.0), lambda: jadam.torch.LinearLR(0.1, end_factor=2.0)),
    (lambda: S.OneCycleLR(torch.optim.SGD(p), max_lr=0.1), lambda: jadam.torch.OneCycleLR(0.1)),
    (
      lambda: S.OneCycleLR(torch.optim.SGD(p), max_lr=0.1, total_steps=0),
      lambda: jadam.torch.OneCycleLR(0.1, total_steps=0),
    ),
    (
      lambda: S.OneCycleLR(torch.optim.SGD(p), max_lr=0.1, total_steps=9, pct_start=2.0),
      lambda: jadam.torch.OneCycleLR(0.1, total_steps=9, pct_start=2.0),
    ),
  ]
  for make_torch, make_jadam in bad:
    with pytest.raises(ValueError) as want:
      make_torch()
    with pytest.raises(ValueError) as got:
      make_jadam()
    assert str(got.value) == str(want.value)
  with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
    jadam.torch.StepLR(-0.1, step_size=3)
  with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
    jadam.torch.StepLR(0.1, step_size=3).per_epoch(0)
  with pytest.raises(TypeError, match="depends on a metric"):
    jadam.torch.ReduceLROnPlateau(0.1)(0)


def test_schedule_float32_and_under_jit():
  sched = jadam.torch.CosineAnnealingLR(0.1, T_max=10)
  out = jax.jit(sched)(jnp.asarray(5, jnp.int32))
  assert out.dtype == jnp.float32 and abs(float(out) - 0.05) < 1e-8
