"""jadam.torch against the live torch.optim: float64 to 1e-12 over 500 steps, float32 in ulps."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import jadam
from tests.helpers import torch_front as H

torch = pytest.importorskip("torch")

STEPS = 500

CASES = [
  ("Adam", {}),
  ("Adam", dict(weight_decay=0.1)),
  ("Adam", dict(amsgrad=True)),
  ("Adam", dict(maximize=True)),
  ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, amsgrad=True, maximize=True)),
  ("Adam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
  ("Adam", dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=True)),
  ("AdamW", {}),
  ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
  ("AdamW", dict(maximize=True)),
  ("SGD", dict(lr=1e-2)),
  ("SGD", dict(lr=1e-2, momentum=0.9)),
  ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.5)),
  ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
  ("SGD", dict(lr=1e-2, momentum=0.5, dampening=0.1, weight_decay=0.01, maximize=True)),
  ("RMSprop", {}),
  ("RMSprop", dict(alpha=0.9, eps=1e-4)),
  ("RMSprop", dict(centered=True)),
  ("RMSprop", dict(momentum=0.9)),
  ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5, weight_decay=0.01, maximize=True)),
  ("Adagrad", {}),
  ("Adagrad", dict(lr_decay=0.01)),
  ("Adagrad", dict(initial_accumulator_value=0.1, eps=1e-6)),
  ("Adagrad", dict(lr_decay=0.01, weight_decay=0.01, maximize=True)),
  ("Adamax", {}),
  ("Adamax", dict(weight_decay=0.01)),
  ("Adamax", dict(betas=(0.8, 0.99), eps=1e-3, maximize=True)),
  ("NAdam", {}),
  ("NAdam", dict(weight_decay=0.01)),
  ("NAdam", dict(momentum_decay=0.01)),
  ("NAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
  ("NAdam", dict(weight_decay=0.01, maximize=True, betas=(0.8, 0.99))),
  ("RAdam", {}),
  ("RAdam", dict(weight_decay=0.01)),
  ("RAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
  ("RAdam", dict(eps=1e-3, maximize=True, betas=(0.8, 0.99))),
]


def _name(case):
  name, kw = case
  return name + "".join(f"-{k}={v}" for k, v in kw.items())


def _torch_opt(name, kw):
  return lambda groups: getattr(torch.optim, name)(groups, foreach=False, **kw)


@pytest.mark.parametrize("case", CASES, ids=map(_name, CASES))
def test_float64_matches_torch(case):
  name, kw = case
  want = H.run_torch(_torch_opt(name, kw), STEPS, np.float64)
  with jax.enable_x64(True):
    got = H.run_jax(getattr(jadam.torch, name)(**kw), STEPS, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12


FLOAT32 = [c for c in CASES if c[1] in ({},) or "decoupled_weight_decay" in c[1] or c[0] == "SGD"]


@pytest.mark.parametrize("case", FLOAT32, ids=map(_name, FLOAT32))
def test_float32_within_ulps_of_torch(case):
  name, kw = case
  steps = 200
  want = H.run_torch(_torch_opt(name, kw), steps, np.float32)
  got = H.run_jax(getattr(jadam.torch, name)(**kw), steps, np.float32)
  first = H.max_ulps({k: v[:1] for k, v in got.items()}, {k: v[:1] for k, v in want.items()})
  assert first <= 1.0
  # A few ulps per step would allow 600; the drift measured is at most ~20.
  assert H.max_ulps(got, want) <= 2 + 0.1 * steps


# Param groups: (torch groups as (paths, overrides), jadam groups).
ENC_KERNEL = ["encoder/kernel"]
BIASES = ["encoder/bias", "head/bias"]
GROUP_CASES = [
  (
    "Adam",
    dict(lr=1e-3, weight_decay=0.01),
    [(ENC_KERNEL, dict(lr=1e-2, weight_decay=0.1)), (BIASES, dict(weight_decay=0.0, amsgrad=True))],
  ),
  ("AdamW", dict(lr=1e-3), [(ENC_KERNEL, dict(lr=3e-3, weight_decay=0.5)), (BIASES, dict(weight_decay=0.0))]),
  (
    "SGD",
    dict(lr=1e-2, momentum=0.9),
    [(ENC_KERNEL, dict(lr=1e-3, nesterov=True)), (BIASES, dict(momentum=0.0, weight_decay=0.1))],
  ),
  (
    "NAdam",
    dict(lr=2e-3),
    [(ENC_KERNEL, dict(weight_decay=0.1, decoupled_weight_decay=True)), (BIASES, dict(lr=1e-2, betas=(0.8, 0.99)))],
  ),
  (
    "RAdam",
    dict(lr=1e-3, weight_decay=0.01),
    [(ENC_KERNEL, dict(lr=1e-2)), (BIASES, dict(weight_decay=0.0, decoupled_weight_decay=True))],
  ),
  ("RMSprop", dict(lr=1e-3), [(ENC_KERNEL, dict(centered=True, momentum=0.5)), (BIASES, dict(lr=1e-2))]),
  ("Adagrad", dict(lr=1e-2), [(ENC_KERNEL, dict(lr_decay=0.1)), (BIASES, dict(lr=1e-1))]),
  ("Adamax", dict(lr=2e-3), [(ENC_KERNEL, dict(weight_decay=0.1)), (BIASES, dict(lr=1e-2))]),
]


def _jadam_groups(torch_groups):
  selectors = {tuple(ENC_KERNEL): "encoder/kernel", tuple(BIASES): lambda path, leaf: leaf.ndim == 1}
  return [{"params": selectors[tuple(paths)], **kw} for paths, kw in torch_groups]


@pytest.mark.parametrize("case", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_param_groups_match_torch(case):
  name, kw, groups = case
  want = H.run_torch(_torch_opt(name, kw), STEPS, np.float64, groups)
  with jax.enable_x64(True):
    got = H.run_jax(getattr(jadam.torch, name)(_jadam_groups(groups), **kw), STEPS, np.float64)
  assert H.max_rel_diff(got, want) <= 1e-12


def test_optimizer_with_schedulers_matches_torch():
  S = torch.optim.lr_scheduler
  cases = [
    (
      _torch_opt("Adam", dict(lr=1e-2)),
      lambda o: S.StepLR(o, step_size=50, gamma=0.5),
      jadam.torch.Adam(lr=jadam.torch.StepLR(1e-2, step_size=50, gamma=0.5)),
      None,
    ),
    # A scheduler as the default lr follows each group's own lr, as torch's does.
    (
      _torch_opt("AdamW", dict(lr=1e-2)),
      lambda o: S.CosineAnnealingLR(o, T_max=100, eta_min=1e-4),
      jadam.torch.AdamW(
        [{"params": "encoder/.*", "lr": 1e-3}], lr=jadam.torch.CosineAnnealingLR(1e-2, T_max=100, eta_min=1e-4)
      ),
      [(["encoder/bias", "encoder/kernel"], dict(lr=1e-3))],
    ),
    # OneCycleLR cycles SGD's momentum too.
    (
      _torch_opt("SGD", dict(lr=1e-2, momentum=0.9)),
      lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
      jadam.torch.SGD(lr=jadam.torch.OneCycleLR(0.05, total_steps=STEPS), momentum=0.9),
      None,
    ),
    (
      _torch_opt("Adam", dict(lr=1e-2)),
      lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=STEPS, three_phase=True),
      jadam.torch.Adam(lr=jadam.torch.OneCycleLR(0.05, total_steps=STEPS, three_phase=True)),
      None,
    ),
    (
      _torch_opt("NAdam", dict(lr=1e-2)),
      lambda o: S.LinearLR(o, start_factor=0.1, total_iters=100),
      jadam.torch.NAdam(lr=jadam.torch.LinearLR(1e-2, start_factor=0.1, total_iters=100)),
      None,
    ),
    (
      _torch_opt("RAdam", dict(lr=1e-2)),
      lambda o: S.ExponentialLR(o, gamma=0.99),
      jadam.torch.RAdam(lr=jadam.torch.ExponentialLR(1e-2, gamma=0.99)),
      None,
    ),
    # Stepped once per epoch of 10 optimizer steps.
    (
      _torch_opt("Adagrad", dict(lr=1e-1)),
      None,
      jadam.torch.Adagrad(lr=jadam.torch.MultiStepLR(1e-1, milestones=[3, 7, 7], gamma=0.5).per_epoch(10)),
      "epochs",
    ),
  ]
  for make, sched, tx, groups in cases:
    if groups == "epochs":
      want = _run_torch_epochs(make, lambda o: S.MultiStepLR(o, milestones=[3, 7, 7], gamma=0.5), 10)
      groups = None
    else:
      want = H.run_torch(make, STEPS, np.float64, groups, scheduler=sched)
    with jax.enable_x64(True):
      got = H.run_jax(tx, STEPS, np.float64)
    assert H.max_rel_diff(got, want) <= 1e-12


def _run_torch_epochs(make, sched, steps_per_epoch):
  """run_torch with scheduler.step() once every steps_per_epoch optimizer steps."""
  counter = {"n": 0}

  class PerEpoch:
    def __init__(self, opt):
      self.inner = sched(opt)

    def step(self, *args):
      counter["n"] += 1
      if counter["n"] % steps_per_epoch == 0:
        self.inner.step(*args)

  return H.run_torch(make, STEPS, np.float64, scheduler=PerEpoch)


def _plateau_metrics():
  # Improves, plateaus, improves: several reductions, cooldowns and the floor.
  t = np.arange(STEPS)
  return list(1.0 / (1 + (t // 40)) + 0.01 * np.sin(t))


@pytest.mark.parametrize(
  "name,kw",
  [
    ("Adam", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("SGD", dict(lr=1e-2, momentum=0.9)),
  ],
)
def test_reduce_on_plateau_in_optimizer_matches_torch(name, kw):
  metrics = _plateau_metrics()
  rule = dict(patience=5, cooldown=3, factor=0.5, min_lr=1e-4)
  want = H.run_torch(
    _torch_opt(name, kw),
    STEPS,
    np.float64,
    scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **rule),
    metrics=metrics,
  )
  plateau = jadam.torch.ReduceLROnPlateau(kw.pop("lr"), **rule)
  with jax.enable_x64(True):
    got = H.run_jax(getattr(jadam.torch, name)(lr=plateau, **kw), STEPS, np.float64, metrics=metrics)
  assert H.max_rel_diff(got, want) <= 1e-12


def test_reduce_on_plateau_with_param_groups_matches_torch():
  """One rule, every group's rate reduced from its own lr down to the shared min_lr, as torch's scheduler does."""
  metrics = _plateau_metrics()
  rule = dict(patience=3, cooldown=2, factor=0.5, min_lr=2e-4)
  torch_groups = [(ENC_KERNEL, dict(lr=1e-3)), (BIASES, dict(weight_decay=0.1))]
  want = H.run_torch(
    _torch_opt("RAdam", dict(lr=1e-2)),
    STEPS,
    np.float64,
    torch_groups,
    scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **rule),
    metrics=metrics,
  )
  tx = jadam.torch.RAdam(
    [{"params": "encoder/kernel", "lr": 1e-3}, {"params": lambda p, x: x.ndim == 1, "weight_decay": 0.1}],
    lr=jadam.torch.ReduceLROnPlateau(1e-2, **rule),
  )
  with jax.enable_x64(True):
    got = H.run_jax(tx, STEPS, np.float64, metrics=metrics)
  assert H.max_rel_diff(got, want) <= 1e-12


# Errors: the same exception type and message as torch's.
BAD = [
  ("Adam", dict(lr=-0.001)),
  ("Adam", dict(eps=-1.0)),
  ("Adam", dict(betas=(1.0, 0.999))),
  ("Adam", dict(betas=(0.9, -0.1))),
  ("Adam", dict(weight_decay=-0.1)),
  ("AdamW", dict(lr=float("nan"))),
  ("SGD", dict(lr=-1.0)),
  ("SGD", dict(momentum=-0.5)),
  ("SGD", dict(nesterov=True)),
  ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=True)),
  ("RMSprop", dict(alpha=-0.1)),
  ("RMSprop", dict(momentum=-0.1)),
  ("Adagrad", dict(lr_decay=-0.1)),
  ("Adagrad", dict(initial_accumulator_value=-0.1)),
  ("Adamax", dict(betas=(0.9, 1.5))),
  ("NAdam", dict(momentum_decay=-1.0)),
  ("RAdam", dict(eps=-1e-8)),
]


@pytest.mark.parametrize("case", BAD, ids=map(_name, BAD))
def test_errors_match_torch(case):
  name, kw = case
  with pytest.raises(Exception) as want:
    getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kw)
  with pytest.raises(type(want.value)) as got:
    getattr(jadam.torch, name)(**kw)
  assert str(got.value) == str(want.value)


def test_group_errors():
  params = H.nest({k: np.zeros(2, np.float32) for k in H.PATHS})
  overlap = jadam.torch.Adam([{"params": "encoder/.*"}, {"params": lambda p, x: p.endswith("bias")}])
  with pytest.raises(ValueError, match="more than one parameter group: 'encoder/bias'"):
    overlap.init(params)
  with pytest.raises(ValueError, match="selects no parameter"):
    jadam.torch.Adam([{"params": "encoder"}]).init(params)
  with pytest.raises(ValueError, match="does not take"):
    jadam.torch.Adam([{"params": "encoder/.*", "momentum": 0.9}])
  with pytest.raises(ValueError, match="has no 'params'"):
    jadam.torch.SGD([{"lr": 0.1}])
  with pytest.raises(ValueError, match="not a valid regular expression"):
    jadam.torch.SGD([{"params": "encoder/(", "lr": 0.1}])
  with pytest.raises(TypeError, match=r"Pass hyperparameters by name, e.g. Adam\(lr=0.001\)"):
    jadam.torch.Adam(1e-3)
  with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
    jadam.torch.Adam([{"params": "encoder/.*", "lr": -0.1}])
  with pytest.raises(ValueError, match="cycle_momentum"):
    jadam.torch.Adagrad(lr=jadam.torch.OneCycleLR(0.1, total_steps=10))
  with pytest.raises(TypeError, match="value=metric"):
    tx = jadam.torch.Adam(lr=jadam.torch.ReduceLROnPlateau(1e-3))
    tx.update(params, tx.init(params), params)


def test_params_pytree_is_one_group():
  params = H.nest({k: np.ones(2, np.float32) for k in H.PATHS})
  a, b = jadam.torch.Adam(params, lr=0.1), jadam.torch.Adam(lr=0.1)
  ua, _ = a.update(params, a.init(params), params)
  ub, _ = b.update(params, b.init(params), params)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), ua, ub))


def test_jadam_torch_never_imports_torch():
  code = (
    "import sys, jadam; jadam.torch.Adam(); jadam.keras.Adam();"
    " assert 'torch' not in sys.modules and 'keras' not in sys.modules, sorted(sys.modules)"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_groups_on_a_flax_nnx_model():
  """NNX's Variable boxes are not part of the path: 'head/bias', not 'head/bias/value'."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.encoder = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

  model = Model(nnx.Rngs(0))
  paths = [jadam.torch.path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert paths == ["encoder/bias", "encoder/kernel", "head/bias", "head/kernel"]
  tx = jadam.torch.Adam([{"params": "encoder/.*", "lr": 1e-4}, {"params": "head/bias", "lr": 0.0}], lr=1e-3)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: (m.head(m.encoder(np.ones((1, 3), np.float32))) ** 2).sum())(model)
  opt.update(model, grads)
  step = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), nnx.state(model, nnx.Param), before)
  # Adam's first step is lr * sign(g): each group moved by its own lr.
  np.testing.assert_allclose(float(step["encoder"]["kernel"]), 1e-4, rtol=1e-3)  # float32 params of order 1
  np.testing.assert_allclose(float(step["head"]["kernel"]), 1e-3, rtol=1e-3)
  assert float(step["head"]["bias"]) == 0.0
