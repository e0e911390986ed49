"""Moving a run between PyTorch and jadam: `jadam.torch.load_state_dict` / `state_dict`, exact in float64.

The gradient of each parameter is `c * theta + n_t` (elementwise, formed alike
in both libraries), in PyTorch's layout for torch and transposed for jadam, so
a run continued on the other side must follow the uninterrupted one to rounding.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jadam.torch as jt  # noqa: E402
from jadam.torch import TorchName  # noqa: E402

# PyTorch's layout, in PyTorch's parameter order; jadam's leaves are the Flax names, kernels transposed.
SHAPES = {"enc.weight": (3, 4), "enc.bias": (3,), "head.weight": (2, 3), "head.bias": (2,)}
NAMES = {
  "enc/kernel": TorchName("enc.weight", (1, 0)),
  "enc/bias": TorchName("enc.bias"),
  "head/kernel": TorchName("head.weight", (1, 0)),
  "head/bias": TorchName("head.bias"),
}
RTOL = 1e-12


@pytest.fixture(autouse=True)
def _float64():
  old = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  with jax.enable_x64(True):
    yield
  torch.set_default_dtype(old)


def problem(shapes, steps, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  curv = {k: rng.uniform(0.1, 1.0, size=s) for k, s in shapes.items()}
  noise = {k: rng.normal(size=(steps, *s)) for k, s in shapes.items()}
  return params, curv, noise


def to_jax(flat, names, lead=0):
  """Torch-layout arrays by torch name -> nested jadam dict (perm applied after `lead` leading axes)."""
  out = {}
  for path, tn in names.items():
    a = flat[tn.name]
    if tn.perm is not None:
      a = np.transpose(a, (*range(lead), *(lead + p for p in tn.perm)))
    node = out
    *head, last = path.split("/")
    for h in head:
      node = node.setdefault(h, {})
    node[last] = jnp.asarray(a)
  return out


def to_torch(tree, names):
  out = {}
  for path, tn in names.items():
    node = tree
    for h in path.split("/"):
      node = node[h]
    a = np.asarray(node)
    out[tn.name] = np.transpose(a, np.argsort(tn.perm)) if tn.perm is not None else a
  return out


class TorchRun:
  """A torch optimizer over tensors named as in `shapes`, stepped with the problem's gradients."""

  def __init__(self, make, params, groups=None, scheduler=None):
    self.tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    if groups is None:
      pg = list(self.tensors.values())
    else:
      used, pg = set(), []
      for names, overrides in groups:
        pg.append({"params": [self.tensors[k] for k in self.tensors if k in names], **overrides})
        used |= set(names)
      rest = [t for k, t in self.tensors.items() if k not in used]
      if rest:
        pg.append({"params": rest})
    self.opt = make(pg)
    self.sched = scheduler(self.opt) if scheduler else None

  def run(self, curv, noise, t0, t1, metrics=None):
    cs = {k: torch.tensor(v) for k, v in curv.items()}
    for t in range(t0, t1):
      with torch.no_grad():
        for k, p in self.tensors.items():
          p.grad = cs[k] * p + torch.tensor(noise[k][t])
      self.opt.step()
      if self.sched is not None:
        self.sched.step(metrics[t]) if metrics is not None else self.sched.step()
    return {k: p.detach().numpy().copy() for k, p in self.tensors.items()}


def run_jax(tx, params, state, curv, noise, t0, t1, names, metrics=None):
  cs = to_jax(curv, names)
  ns = to_jax({k: v[t0:t1] for k, v in noise.items()}, names, lead=1)
  values = jnp.asarray(np.zeros(t1 - t0) if metrics is None else np.asarray(metrics[t0:t1]))

  @jax.jit
  def run(params, state):
    def step(carry, xs):
      params, state = carry
      n_t, value = xs
      grads = jax.tree.map(lambda c, p, n: c * p + n, cs, params, n_t)
      extra = {} if metrics is None else {"value": value}
      updates, state = tx.update(grads, state, params, **extra)
      return (jax.tree.map(lambda p, u: p + u, params, updates), state), None

    return jax.lax.scan(step, (params, state), (ns, values))[0]

  return run(params, state)


def assert_close(got, want, rtol=RTOL):
  for k in want:
    scale = np.max(np.abs(want[k]))
    err = np.max(np.abs(got[k] - want[k])) / scale
    assert err <= rtol, f"{k}: relative error {err:.3g} > {rtol}"


# (id, torch optimizer, its kwargs, jadam.torch's): every optimizer and flag.
CASES = [
  ("adam", torch.optim.Adam, dict(lr=0.05, weight_decay=0.01), jt.Adam),
  ("adam-amsgrad", torch.optim.Adam, dict(lr=0.05, amsgrad=True), jt.Adam),
  ("adamw", torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1), jt.AdamW),
  ("adamw-amsgrad", torch.optim.AdamW, dict(lr=0.05, amsgrad=True), jt.AdamW),
  ("sgd", torch.optim.SGD, dict(lr=0.05), jt.SGD),
  ("sgd-momentum", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), jt.SGD),
  ("sgd-nesterov", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), jt.SGD),
  ("rmsprop", torch.optim.RMSprop, dict(lr=0.01), jt.RMSprop),
  ("rmsprop-centered-momentum", torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5), jt.RMSprop),
  ("adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1), jt.Adagrad),
  ("nadam", torch.optim.NAdam, dict(lr=0.02), jt.NAdam),
  ("nadam-decoupled", torch.optim.NAdam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True), jt.NAdam),
  ("radam", torch.optim.RAdam, dict(lr=0.02, weight_decay=0.01), jt.RAdam),
  ("adamax", torch.optim.Adamax, dict(lr=0.02), jt.Adamax),
  ("adadelta", torch.optim.Adadelta, dict(lr=0.5, rho=0.8, weight_decay=0.01), jt.Adadelta),
  ("rprop", torch.optim.Rprop, dict(lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-4, 0.3)), jt.Rprop),
  ("asgd", torch.optim.ASGD, dict(lr=0.02, lambd=1e-3, alpha=0.7, t0=20, weight_decay=0.01), jt.ASGD),
  ("asgd-maximize", torch.optim.ASGD, dict(lr=0.01, t0=1e6, maximize=True), jt.ASGD),
]
N = 60  # steps on each side (Adam runs 100 + 100 below)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_to_jadam_to_torch(case):
  """torch N steps -> jadam N steps -> torch N steps equals torch's uninterrupted 3N; the round trip is bitwise."""
  _, cls, kw, front = case
  n = 100 if case[0] == "adam" else N
  params0, curv, noise = problem(SHAPES, 3 * n)
  if kw.get("maximize"):
    curv = {k: -c for k, c in curv.items()}
  ref = TorchRun(lambda pg: cls(pg, **kw), params0)
  want = ref.run(curv, noise, 0, 3 * n)

  first = TorchRun(lambda pg: cls(pg, **kw), params0)
  mid = first.run(curv, noise, 0, n)
  sd = first.opt.state_dict()
  tx = front(**kw)
  params = to_jax(mid, NAMES)
  state = jt.load_state_dict(tx, params, sd, names=NAMES)

  # Round trip: torch -> jadam -> torch gives the same tensors, bit for bit.
  back = jt.state_dict(tx, state, params, names=NAMES)
  assert set(back["state"]) == set(sd["state"])
  for i, entry in sd["state"].items():
    assert set(back["state"][i]) == set(entry)
    for key, t in entry.items():
      assert back["state"][i][key].dtype == t.dtype and torch.equal(back["state"][i][key], t), (i, key)
  for g, h in zip(back["param_groups"], sd["param_groups"], strict=True):
    assert g == h

  # Continue in jadam, then hand back to torch.
  params, state = run_jax(tx, params, state, curv, noise, n, 2 * n, NAMES)
  got_jax = to_torch(params, NAMES)
  assert_close(got_jax, TorchRun(lambda pg: cls(pg, **kw), params0).run(curv, noise, 0, 2 * n))
  last = TorchRun(lambda pg: cls(pg, **kw), got_jax)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  assert_close(last.run(curv, noise, 2 * n, 3 * n), want)
  # ... and so does its state (ASGD's average ax, Rprop's step sizes, every moment).
  end, ref_end = last.opt.state_dict()["state"], ref.opt.state_dict()["state"]
  for i, entry in ref_end.items():
    assert set(end[i]) == set(entry)
    assert_close({k: end[i][k].numpy() for k in entry}, {k: t.numpy() for k, t in entry.items() if t.abs().max() > 0})


def test_jadam_from_scratch_to_torch():
  """jadam 100 steps from init -> torch 100 more equals torch's uninterrupted 200."""
  params0, curv, noise = problem(SHAPES, 200)
  kw = dict(lr=0.05, amsgrad=True, weight_decay=0.01)
  want = TorchRun(lambda pg: torch.optim.Adam(pg, **kw), params0).run(curv, noise, 0, 200)
  tx = jt.Adam(**kw)
  params = to_jax(params0, NAMES)
  params, state = run_jax(tx, params, tx.init(params), curv, noise, 0, 100, NAMES)
  run = TorchRun(lambda pg: torch.optim.Adam(pg, **kw), to_torch(params, NAMES))
  run.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  assert_close(run.run(curv, noise, 100, 200), want)


def test_fresh_state_dicts():
  """Before any step: PyTorch's empty state loads as tx.init, and tx.init's state dict is PyTorch's."""
  params0, _, _ = problem(SHAPES, 1)
  run = TorchRun(lambda pg: torch.optim.Adam(pg, lr=0.1), params0)
  tx = jt.Adam(lr=0.1)
  params = to_jax(params0, NAMES)
  state = jt.load_state_dict(tx, params, run.opt.state_dict(), names=NAMES)
  jax.tree.map(np.testing.assert_array_equal, state, tx.init(params))
  assert jt.state_dict(tx, state, params, names=NAMES) == run.opt.state_dict()


def test_groups_and_scheduler():
  """Two param groups, a cosine schedule rebased per group, both directions."""
  params0, curv, noise = problem(SHAPES, 150)
  kw = dict(lr=0.05, weight_decay=0.01)
  groups = [({"enc.weight", "enc.bias"}, {"lr": 0.02, "betas": (0.8, 0.99)})]

  def make(pg):
    return torch.optim.AdamW(pg, **kw)

  def sched(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=70, eta_min=0.001)

  want = TorchRun(make, params0, groups, sched).run(curv, noise, 0, 150)
  tx = jt.AdamW(
    [{"params": "enc/.*", "lr": 0.02, "betas": (0.8, 0.99)}],
    lr=jt.CosineAnnealingLR(lr=0.05, T_max=70, eta_min=0.001),
    weight_decay=0.01,
  )
  first = TorchRun(make, params0, groups, sched)
  mid = first.run(curv, noise, 0, 50)
  params = to_jax(mid, NAMES)
  state = jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES, scheduler=first.sched.state_dict())
  params, state = run_jax(tx, params, state, curv, noise, 50, 100, NAMES)
  last = TorchRun(make, to_torch(params, NAMES), groups, sched)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  last.sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, last.sched.state_dict()))
  assert last.sched.get_last_lr() == [g["lr"] for g in last.opt.param_groups]
  assert last.sched.last_epoch == 100
  assert_close(last.run(curv, noise, 100, 150), want)


def test_reduce_on_plateau_mid_patience():
  """ReduceLROnPlateau with reductions behind it and bad epochs pending at the hand-over."""
  steps = 150
  params0, curv, noise = problem(SHAPES, steps)
  metrics = [1.0 / (1 + t // 17) for t in range(steps)]
  kw = dict(lr=0.05)
  pkw = dict(factor=0.5, patience=5, cooldown=2)

  def make(pg):
    return torch.optim.Adam(pg, **kw)

  def sched(opt):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **pkw)

  want = TorchRun(make, params0, None, sched).run(curv, noise, 0, steps, metrics)
  first = TorchRun(make, params0, None, sched)
  mid = first.run(curv, noise, 0, 46, metrics)
  ssd = first.sched.state_dict()
  assert 0 < ssd["num_bad_epochs"] <= pkw["patience"] and first.opt.param_groups[0]["lr"] < kw["lr"]
  tx = jt.Adam(lr=jt.ReduceLROnPlateau(lr=0.05, **pkw))
  params = to_jax(mid, NAMES)
  state = jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES, scheduler=ssd)
  params, state = run_jax(tx, params, state, curv, noise, 46, 95, NAMES, metrics)
  last = TorchRun(make, to_torch(params, NAMES), None, sched)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  last.sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, last.sched.state_dict()))
  assert 0 < last.sched.num_bad_epochs <= pkw["patience"] and last.sched.last_epoch == 95
  assert_close(last.run(curv, noise, 95, steps, metrics), want)


ASGD_PLATEAU = dict(factor=0.5, patience=1, min_lr=0.02)  # a flat metric: the rate falls at scheduler steps 3, 5, 7


@pytest.mark.parametrize(
  "handover, last_lr",
  [(5, 0.05), (6, 0.025), (7, 0.025)],
  ids=["right_after_a_reduction", "between_reductions", "right_after_the_min_lr_clamp"],
)
def test_asgd_on_plateau_both_ways(handover, last_lr):
  """ASGD's step size reads the rate of the step before, which only its saved eta holds: torch -> jadam at the
  hand-over, jadam -> torch 20 steps later, against the uninterrupted torch run (the lr of each step checked)."""
  steps = 40
  params0, curv, noise = problem(SHAPES, steps)
  metrics = [1.0] * steps
  kw = dict(lr=0.1, lambd=0.3, alpha=0.75, t0=5, weight_decay=0.01)

  def make(pg):
    return torch.optim.ASGD(pg, **kw)

  def sched(opt):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **ASGD_PLATEAU)

  want = TorchRun(make, params0, None, sched).run(curv, noise, 0, steps, metrics)
  first = TorchRun(make, params0, None, sched)
  lrs = [first.opt.param_groups[0]["lr"]]
  for t in range(handover):
    first.run(curv, noise, t, t + 1, metrics)
    lrs.append(first.opt.param_groups[0]["lr"])
  assert lrs[handover - 1] == last_lr  # the rate of the last step before the hand-over
  assert lrs == [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02][: handover + 1]
  sd, ssd = first.opt.state_dict(), first.sched.state_dict()
  tx = jt.ASGD(lr=jt.ReduceLROnPlateau(lr=0.1, **ASGD_PLATEAU), lambd=0.3, alpha=0.75, t0=5, weight_decay=0.01)
  params = to_jax({k: p.detach().numpy() for k, p in first.tensors.items()}, NAMES)
  state = jt.load_state_dict(tx, params, sd, names=NAMES, scheduler=ssd)
  assert float(state.last_lr) == pytest.approx(last_lr, rel=1e-15)
  back = jt.state_dict(tx, state, params, names=NAMES)  # torch -> jadam -> torch: the same numbers
  for i, entry in sd["state"].items():
    for key, value in entry.items():
      np.testing.assert_allclose(back["state"][i][key].numpy(), value.numpy(), rtol=1e-15, atol=0)
  assert back["param_groups"][0]["lr"] == sd["param_groups"][0]["lr"]
  params, state = run_jax(tx, params, state, curv, noise, handover, handover + 20, NAMES, metrics)
  last = TorchRun(make, to_torch(params, NAMES), None, sched)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  last.sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, last.sched.state_dict()))
  assert_close(last.run(curv, noise, handover + 20, steps, metrics), want)


def test_asgd_on_plateau_refuses_an_eta_no_rate_gives():
  params0, curv, noise = problem(SHAPES, 5)
  run = TorchRun(
    lambda pg: torch.optim.ASGD(pg, lr=0.1, lambd=0.3),
    params0,
    None,
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **ASGD_PLATEAU),
  )
  run.run(curv, noise, 0, 5, [1.0] * 5)
  sd = run.opt.state_dict()
  for entry in sd["state"].values():
    entry["eta"] = entry["eta"] * 3  # above the eta of any rate between the current lr and lr / factor
  tx = jt.ASGD(lr=jt.ReduceLROnPlateau(lr=0.1, **ASGD_PLATEAU), lambd=0.3)
  with pytest.raises(ValueError, match="eta=.* which no rate"):
    jt.load_state_dict(tx, to_jax(params0, NAMES), sd, names=NAMES, scheduler=run.sched.state_dict())


def test_cnn_flax_names_transposes_kernels():
  """A Conv2d + Linear torch module and its Flax NNX twin: OIHW <-> HWIO and (out, in) <-> (in, out)."""
  nnx = pytest.importorskip("flax.nnx")

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(2, 4, 3)
      self.fc = torch.nn.Linear(16, 3)

  class FlaxNet(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
      self.fc = nnx.Linear(16, 3, rngs=rngs)

  net = Net()
  model = FlaxNet(nnx.Rngs(0))
  names = jt.flax_names(nnx.state(model, nnx.Param), net)
  assert names == {
    "conv/kernel": TorchName("conv.weight", (2, 3, 1, 0)),
    "conv/bias": TorchName("conv.bias"),
    "fc/kernel": TorchName("fc.weight", (1, 0)),
    "fc/bias": TorchName("fc.bias"),
  }
  shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
  params0, curv, noise = problem(shapes, 100)
  kw = dict(lr=0.02, momentum_decay=0.004)
  want = TorchRun(lambda pg: torch.optim.NAdam(pg, **kw), params0).run(curv, noise, 0, 100)
  first = TorchRun(lambda pg: torch.optim.NAdam(pg, **kw), params0)
  mid = first.run(curv, noise, 0, 50)
  tx = jt.NAdam(**kw)
  params = to_jax(mid, names)
  assert params["conv"]["kernel"].shape == (3, 3, 2, 4)
  state = jt.load_state_dict(tx, params, first.opt.state_dict(), names=names)
  params, state = run_jax(tx, params, state, curv, noise, 50, 100, names)
  assert_close(to_torch(params, names), want)


# ----------------------------------------------------------------------------------------------- bad input


def _adam_run(steps=3, **kw):
  params0, curv, noise = problem(SHAPES, steps)
  run = TorchRun(lambda pg: torch.optim.Adam(pg, lr=0.1, **kw), params0)
  mid = run.run(curv, noise, 0, steps)
  return run.opt.state_dict(), to_jax(mid, NAMES)


def test_refuses_another_optimizers_state_dict():
  sd, params = _adam_run()
  with pytest.raises(ValueError, match="not a state dict of torch.optim.RAdam"):
    jt.load_state_dict(jt.RAdam(lr=0.1), params, sd, names=NAMES)
  with pytest.raises(ValueError, match="not a state dict of torch.optim.SGD"):
    jt.load_state_dict(jt.SGD(lr=0.1), params, sd, names=NAMES)
  with pytest.raises(ValueError, match="amsgrad=False but tx's default has amsgrad=True"):
    jt.load_state_dict(jt.Adam(lr=0.1, amsgrad=True), params, sd, names=NAMES)
  with pytest.raises(ValueError, match="lr=0.1 but tx's default has lr=0.2"):
    jt.load_state_dict(jt.Adam(lr=0.2), params, sd, names=NAMES)
  with pytest.raises(TypeError, match="'state' and 'param_groups'"):
    jt.load_state_dict(jt.Adam(lr=0.1), params, {"optim": sd}, names=NAMES)
  with pytest.raises(TypeError, match="not wrapped"):
    import optax

    jt.load_state_dict(optax.chain(jt.Adam(lr=0.1)), params, sd, names=NAMES)


def test_refuses_missing_or_extra_parameters():
  sd, params = _adam_run()
  fewer = {k: v for k, v in params.items() if k != "head"}
  with pytest.raises(ValueError, match="holds 4 parameters, tx's default holds 2"):
    jt.load_state_dict(jt.Adam(lr=0.1), fewer, sd, names={k: v for k, v in NAMES.items() if k.startswith("enc")})
  more = {**params, "extra": {"bias": jnp.zeros(2)}}
  with pytest.raises(ValueError, match="holds 4 parameters, tx's default holds 5"):
    jt.load_state_dict(jt.Adam(lr=0.1), more, sd, names={**NAMES, "extra/bias": TorchName("extra.bias")})
  with pytest.raises(ValueError, match=r"Leaves without a name: \['extra/bias'\]"):
    jt.load_state_dict(jt.Adam(lr=0.1), more, sd, names=NAMES)


def test_refuses_transposed_shape():
  sd, params = _adam_run()
  plain = {k: TorchName(v.name) for k, v in NAMES.items()}  # forgot the transposes
  with pytest.raises(ValueError, match=r"'enc.weight' \(enc/kernel\): PyTorch's exp_avg has shape \(3, 4\)"):
    jt.load_state_dict(jt.Adam(lr=0.1), params, sd, names=plain)


def test_refuses_code_in_a_pickle(tmp_path):
  """A checkpoint whose unpickling would write a file is refused, and the file is not written."""
  target = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (target.write_text, ("this ran",))

  path = tmp_path / "ckpt.pt"
  torch.save({"optim": Payload()}, path)
  with pytest.raises(ValueError, match="refused to load"):
    jt.load_checkpoint(path)
  with pytest.raises(ValueError, match="refused to load"):
    jt.load_state_dict(jt.Adam(), {"w": jnp.zeros(2)}, path)
  assert not target.exists()
  # A plain checkpoint loads.
  sd, params = _adam_run()
  torch.save(sd, path)
  state = jt.load_state_dict(jt.Adam(lr=0.1), params, path, names=NAMES)
  jax.tree.map(np.testing.assert_array_equal, state, jt.load_state_dict(jt.Adam(lr=0.1), params, sd, names=NAMES))


def test_sgd_schedule_position_from_the_scheduler():
  """SGD's state has no step: the position comes from the scheduler's last_epoch (or steps=)."""
  params0, curv, noise = problem(SHAPES, 90)
  kw = dict(lr=0.05, momentum=0.9)

  def make(pg):
    return torch.optim.SGD(pg, **kw)

  def sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)

  want = TorchRun(make, params0, None, sched).run(curv, noise, 0, 90)
  first = TorchRun(make, params0, None, sched)
  mid = first.run(curv, noise, 0, 30)
  tx = jt.SGD(lr=jt.StepLR(lr=0.05, step_size=20, gamma=0.5), momentum=0.9)
  params = to_jax(mid, NAMES)
  with pytest.raises(ValueError, match="pass steps="):
    jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES)
  with pytest.raises(ValueError, match="last_epoch is 30, but 31 optimizer steps"):
    jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES, scheduler=first.sched.state_dict(), steps=31)
  state = jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES, scheduler=first.sched.state_dict())
  again = jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES, steps=30)
  jax.tree.map(np.testing.assert_array_equal, state, again)
  params, state = run_jax(tx, params, state, curv, noise, 30, 60, NAMES)
  last = TorchRun(make, to_torch(params, NAMES), None, sched)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  last.sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, last.sched.state_dict()))
  assert_close(last.run(curv, noise, 60, 90), want)


def test_flax_names_linen_lists():
  """Linen names a list's items layers_0; PyTorch's ModuleList layers.0."""

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2)])

  params = {
    "layers_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
    "layers_1": {"scale": jnp.zeros(3), "bias": jnp.zeros(3)},
    "layers_2": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
  }
  names = jt.flax_names(params, Net())
  assert list(names.values()) == [
    TorchName("layers.0.weight", (1, 0)),
    TorchName("layers.0.bias"),
    TorchName("layers.1.weight"),
    TorchName("layers.1.bias"),
    TorchName("layers.2.weight", (1, 0)),
    TorchName("layers.2.bias"),
  ]
  assert list(names)[0] == "layers_0/kernel"
  with pytest.raises(ValueError, match="'layers.2.weight' \\(Linear\\) has no leaf"):
    jt.flax_names({k: v for k, v in params.items() if k != "layers_2"}, Net())


def test_named_parameters_order_from_param_names():
  """A torch optimizer given named parameters (in any order) saves param_names; they set the order."""
  params0, curv, noise = problem(SHAPES, 3)
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params0.items()}
  opt = torch.optim.Adam(list(reversed(tensors.items())), lr=0.1)
  for t in range(3):
    for k, p in tensors.items():
      p.grad = torch.tensor(curv[k]) * p.detach() + torch.tensor(noise[k][t])
    opt.step()
  sd = opt.state_dict()
  assert sd["param_groups"][0]["param_names"][0] == "head.bias"
  tx = jt.Adam(lr=0.1)
  params = to_jax({k: p.detach().numpy() for k, p in tensors.items()}, NAMES)
  state = jt.load_state_dict(tx, params, sd, names=NAMES)
  moments = next(s for s in state if hasattr(s, "mu"))
  np.testing.assert_array_equal(moments.mu["enc"]["kernel"], opt.state[tensors["enc.weight"]]["exp_avg"].numpy().T)
  np.testing.assert_array_equal(moments.nu["head"]["bias"], opt.state[tensors["head.bias"]]["exp_avg_sq"].numpy())
  renamed = {**NAMES, "head/bias": TorchName("head.b")}
  with pytest.raises(ValueError, match=r"extra in the state dict: \['head.bias'\]"):
    jt.load_state_dict(tx, params, sd, names=renamed)


def test_one_cycle_with_cycled_momentum():
  """OneCycleLR drives SGD's momentum too; both directions carry the cycle's position."""
  params0, curv, noise = problem(SHAPES, 120)
  kw = dict(lr=0.01, momentum=0.9)

  def make(pg):
    return torch.optim.SGD(pg, **kw)

  def sched(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=120)

  want = TorchRun(make, params0, None, sched).run(curv, noise, 0, 120)
  first = TorchRun(make, params0, None, sched)
  mid = first.run(curv, noise, 0, 40)
  tx = jt.SGD(lr=jt.OneCycleLR(0.1, total_steps=120), momentum=0.9)
  params = to_jax(mid, NAMES)
  state = jt.load_state_dict(tx, params, first.opt.state_dict(), names=NAMES, scheduler=first.sched.state_dict())
  back = jt.state_dict(tx, state, params, names=NAMES)
  for g, h in zip(back["param_groups"], first.opt.state_dict()["param_groups"], strict=True):
    assert g.keys() == h.keys()
    for k in g:
      assert g[k] == (h[k] if h[k] is None or isinstance(h[k], (bool, list)) else pytest.approx(h[k], rel=1e-12)), k
  params, state = run_jax(tx, params, state, curv, noise, 40, 80, NAMES)
  last = TorchRun(make, to_torch(params, NAMES), None, sched)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  last.sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, last.sched.state_dict()))
  assert_close(last.run(curv, noise, 80, 120), want)


def test_asgd_eta_follows_a_schedule_and_is_checked():
  """ASGD's eta and mu, which jadam derives from the step: a StepLR run both ways, and a tampered eta refused."""
  params0, curv, noise = problem(SHAPES, 90)
  kw = dict(lambd=1e-3, alpha=0.75, t0=10)

  def make(pg):
    return torch.optim.ASGD(pg, lr=0.05, **kw)

  def sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

  ref = TorchRun(make, params0, None, sched)
  want = ref.run(curv, noise, 0, 90)
  first = TorchRun(make, params0, None, sched)
  mid = first.run(curv, noise, 0, 30)
  sd = first.opt.state_dict()
  tx = jt.ASGD(lr=jt.StepLR(lr=0.05, step_size=10, gamma=0.5), **kw)
  params = to_jax(mid, NAMES)
  state = jt.load_state_dict(tx, params, sd, names=NAMES, scheduler=first.sched.state_dict())
  back = jt.state_dict(tx, state, params, names=NAMES)
  for i, entry in sd["state"].items():
    for key, t in entry.items():
      assert back["state"][i][key].dtype == t.dtype and torch.equal(back["state"][i][key], t), (i, key)
  params, state = run_jax(tx, params, state, curv, noise, 30, 60, NAMES)
  last = TorchRun(make, to_torch(params, NAMES), None, sched)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=NAMES))
  last.sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, last.sched.state_dict()))
  assert_close(last.run(curv, noise, 60, 90), want)
  ax = {i: e["ax"].numpy() for i, e in last.opt.state_dict()["state"].items()}
  assert_close(ax, {i: e["ax"].numpy() for i, e in ref.opt.state_dict()["state"].items()})

  sd["state"][0]["eta"] = sd["state"][0]["eta"] * 2
  with pytest.raises(ValueError, match="has eta="):
    jt.load_state_dict(tx, to_jax(mid, NAMES), sd, names=NAMES, scheduler=first.sched.state_dict())


def test_asgd_float32_round_trip_is_bitwise():
  """Under PyTorch's float32 default, eta and mu written by jadam are PyTorch's own bits."""
  params0, curv, noise = ({k: v.astype(np.float32) for k, v in d.items()} for d in problem(SHAPES, 25))
  torch.set_default_dtype(torch.float32)
  with jax.enable_x64(False):
    run = TorchRun(lambda pg: torch.optim.ASGD(pg, lr=0.03, t0=7), params0)
    run.run(curv, noise, 0, 25)
    sd = run.opt.state_dict()
    tx = jt.ASGD(lr=0.03, t0=7)
    params = to_jax({n: t.detach().numpy() for n, t in run.tensors.items()}, NAMES)
    back = jt.state_dict(tx, jt.load_state_dict(tx, params, sd, names=NAMES), params, names=NAMES)
  for i, entry in sd["state"].items():
    for key, t in entry.items():
      assert back["state"][i][key].dtype == t.dtype and torch.equal(back["state"][i][key], t), (i, key)


# SparseAdam: two tables with row-sparse gradients; "b" gets none on some steps, so the tables' counts differ.
SPARSE = {"a": (20, 3), "b": (15, 2)}
SPARSE_NAMES = {k: TorchName(k) for k in SPARSE}


def sparse_grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    step = {}
    for k, shape in SPARSE.items():
      if k == "b" and t % 5 == 2:
        step[k] = None
        continue
      n = int(rng.integers(1, 6))
      ids = rng.integers(0, shape[0] - 2, size=n)  # the last two rows never move
      ids[-1] = ids[0]  # a duplicate
      step[k] = (ids, rng.normal(size=(n, *shape[1:])))
    out.append(step)
  return out


class SparseTorchRun:
  def __init__(self, params, **kw):
    self.tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    self.opt = torch.optim.SparseAdam(list(self.tensors.values()), **kw)

  def run(self, grads, t0, t1):
    for t in range(t0, t1):
      for k, p in self.tensors.items():
        g = grads[t][k]
        p.grad = None if g is None else torch.sparse_coo_tensor(torch.tensor(g[0])[None], torch.tensor(g[1]), p.shape)
      self.opt.step()
    return {k: p.detach().numpy().copy() for k, p in self.tensors.items()}


def sparse_run_jax(tx, params, state, grads, t0, t1, width=6):
  """jadam's side, each gradient padded to `width` entries (index V: padding) so that `jit` compiles once."""
  from jax.experimental.sparse import BCOO

  import jadam

  def bcoo(g, shape):
    if g is None:
      return None
    ids, vals = g
    pad = width - len(ids)
    ids = np.concatenate([ids, np.full(pad, shape[0])])
    vals = np.concatenate([vals, np.zeros((pad, *shape[1:]))])
    return BCOO((jnp.asarray(vals), jnp.asarray(ids)[:, None]), shape=shape)

  step = jax.jit(lambda g, s, p: jadam.update_and_apply(tx, g, s, p))
  for t in range(t0, t1):
    params, state = step({k: bcoo(grads[t][k], SPARSE[k]) for k in SPARSE}, state, params)
  return params, state


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_sparse_adam_both_ways():
  """torch SparseAdam N -> jadam N -> torch N equals torch's 3N; tables keep their own step counts."""
  n = 20
  rng = np.random.default_rng(1)
  params0 = {k: rng.normal(size=s) for k, s in SPARSE.items()}
  grads = sparse_grads(3 * n)
  kw = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)
  ref = SparseTorchRun(params0, **kw)
  want = ref.run(grads, 0, 3 * n)
  first = SparseTorchRun(params0, **kw)
  mid = first.run(grads, 0, n)
  sd = first.opt.state_dict()
  assert sd["state"][0]["step"] == n and sd["state"][1]["step"] < n  # "b" missed steps
  tx = jt.SparseAdam(**kw)
  params = {k: jnp.asarray(v) for k, v in mid.items()}
  state = jt.load_state_dict(tx, params, sd, names=SPARSE_NAMES)
  back = jt.state_dict(tx, state, params, names=SPARSE_NAMES)
  assert back["param_groups"] == sd["param_groups"]
  for i, entry in sd["state"].items():
    assert set(back["state"][i]) == set(entry)
    assert back["state"][i]["step"] == entry["step"] and type(back["state"][i]["step"]) is int
    for key in ("exp_avg", "exp_avg_sq"):
      assert torch.equal(back["state"][i][key], entry[key]), (i, key)

  params, state = sparse_run_jax(tx, params, state, grads, n, 2 * n)
  assert_close({k: np.asarray(v) for k, v in params.items()}, SparseTorchRun(params0, **kw).run(grads, 0, 2 * n))
  last = SparseTorchRun({k: np.asarray(v) for k, v in params.items()}, **kw)
  last.opt.load_state_dict(jt.state_dict(tx, state, params, names=SPARSE_NAMES))
  assert_close(last.run(grads, 2 * n, 3 * n), want)
  end, ref_end = last.opt.state_dict()["state"], ref.opt.state_dict()["state"]
  for i, entry in ref_end.items():
    assert end[i]["step"] == entry["step"]
    assert_close(
      {k: end[i][k].numpy() for k in ("exp_avg", "exp_avg_sq")},
      {k: entry[k].numpy() for k in ("exp_avg", "exp_avg_sq")},
    )

  # A table never stepped has no state in PyTorch, and none is written for it.
  fresh = SparseTorchRun(params0, **kw)
  fresh.run([{"a": g["a"], "b": None} for g in grads], 0, 3)
  sd = fresh.opt.state_dict()
  assert set(sd["state"]) == {0}
  params = {k: jnp.asarray(v.detach().numpy()) for k, v in fresh.tensors.items()}
  state = jt.load_state_dict(tx, params, sd, names=SPARSE_NAMES)
  assert set(jt.state_dict(tx, state, params, names=SPARSE_NAMES)["state"]) == {0}
  # With a schedule, the number of step() calls is needed when the tables' counts differ.
  with pytest.raises(ValueError, match="pass steps="):
    jt.load_state_dict(jt.SparseAdam(**{**kw, "lr": jt.StepLR(lr=0.05, step_size=2)}), params, sd, names=SPARSE_NAMES)
  with pytest.raises(ValueError, match="took 3"):
    jt.load_state_dict(tx, params, sd, names=SPARSE_NAMES, steps=2)


BNB_SHAPES = {"w": (48, 100), "rows": (12, 512), "b": (10,)}  # flat blocks, per-row blocks, a 32-bit moment


def bnb_run(bnb, params, grads, t0, t1, sd=None, **kw):
  tensors = {k: torch.nn.Parameter(torch.tensor(np.asarray(params[k]))) for k in BNB_SHAPES}
  opt = bnb.optim.AdamW8bit(list(tensors.values()), **kw)
  if sd is not None:
    opt.load_state_dict(sd)
  for t in range(t0, t1):
    for k, p in tensors.items():
      p.grad = torch.tensor(grads[t][k])
    opt.step()
  return {k: p.detach().numpy().copy() for k, p in tensors.items()}, opt


def test_bitsandbytes_8bit_both_ways():
  """bitsandbytes' 8-bit codes and scales carried as they are: the round trip is bitwise, and a run handed over
  follows bitsandbytes' uninterrupted one about as closely as the two libraries' own 8-bit roundings allow."""
  bnb = pytest.importorskip("bitsandbytes")
  import jadam

  torch.set_default_dtype(torch.float32)
  n = 15
  rng = np.random.default_rng(0)
  params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in BNB_SHAPES.items()}
  grads = [{k: (rng.normal(size=s) + 0.3).astype(np.float32) for k, s in BNB_SHAPES.items()} for _ in range(3 * n)]
  kw = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
  names = {k: TorchName(k) for k in BNB_SHAPES}
  with jax.enable_x64(False):
    want, _ = bnb_run(bnb, params0, grads, 0, 3 * n, **kw)
    mid, opt = bnb_run(bnb, params0, grads, 0, n, **kw)
    sd = opt.state_dict()
    tx = jt.Adam8bit(**kw)  # bitsandbytes' Adam8bit and AdamW8bit: one kernel, one state dict
    params = {k: jnp.asarray(v) for k, v in mid.items()}
    state = jt.load_state_dict(tx, params, sd, names=names)
    back = jt.state_dict(tx, state, params, names=names)
    assert back["param_groups"] == sd["param_groups"]
    for i, entry in sd["state"].items():
      assert back["state"][i]["step"] == entry["step"] == n
      q, bq = entry["__bnb_optimizer_quant_state__"], back["state"][i]["__bnb_optimizer_quant_state__"]
      assert set(q) == set(bq)
      for key, t in q.items():
        assert bq[key].dtype == t.dtype and torch.equal(bq[key], t), (i, key)
    assert sd["state"][2]["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.float32  # "b": 32-bit

    step = jax.jit(lambda g, s, p: jadam.update_and_apply(tx, g, s, p))
    fresh = params
    fresh_state = tx.init(params)
    for t in range(n, 2 * n):
      g = {k: jnp.asarray(v) for k, v in grads[t].items()}
      params, state = step(g, state, params)
      fresh, fresh_state = step(g, fresh_state, fresh)
    last, _ = bnb_run(
      bnb,
      {k: np.asarray(v) for k, v in params.items()},
      grads,
      2 * n,
      3 * n,
      jt.state_dict(tx, state, params, names=names),
      **kw,
    )
    restarted, _ = bnb_run(bnb, fresh, grads, 2 * n, 3 * n, **kw)
  for k in BNB_SHAPES:
    err = np.linalg.norm(last[k] - want[k]) / np.linalg.norm(want[k] - params0[k])
    err_restart = np.linalg.norm(restarted[k] - want[k]) / np.linalg.norm(want[k] - params0[k])
    assert err < 5e-3 and err < err_restart / 30, (k, err, err_restart)


def test_bitsandbytes_8bit_refusals():
  """Another block layout (min_8bit_size), a transposed 8-bit leaf, or torch.optim's AdamW: refused, named."""
  bnb = pytest.importorskip("bitsandbytes")
  torch.set_default_dtype(torch.float32)
  rng = np.random.default_rng(0)
  params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in BNB_SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in BNB_SHAPES.items()} for _ in range(2)]
  names = {k: TorchName(k) for k in BNB_SHAPES}
  with jax.enable_x64(False):
    _, opt = bnb_run(bnb, params0, grads, 0, 2)
    sd = opt.state_dict()
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    with pytest.raises(ValueError, match="32-bit state1, tx an 8-bit one: build tx with the run's min_8bit_size"):
      jt.load_state_dict(jt.AdamW8bit(min_8bit_size=0), params, sd, names=names)
    with pytest.raises(ValueError, match="8-bit state1, tx a 32-bit one"):
      jt.load_state_dict(jt.AdamW8bit(min_8bit_size=10**6), params, sd, names=names)
    flipped = {**params, "w": params["w"].T}
    with pytest.raises(ValueError, match="an 8-bit moment cannot be transposed"):
      jt.load_state_dict(jt.AdamW8bit(), flipped, sd, names={**names, "w": TorchName("w", (1, 0))})
    ts = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params0.items()}
    adamw = torch.optim.AdamW(list(ts.values()))
    with pytest.raises(ValueError, match="not a state dict of bitsandbytes' AdamW8bit"):
      jt.load_state_dict(jt.AdamW8bit(), params, adamw.state_dict(), names=names)
    for bad in (-5, 2.7, float("nan")):  # a step that is not a count, as torch.optim's state dicts are checked
      odd = copy.deepcopy(sd)
      for entry in odd["state"].values():
        entry["step"] = bad
      with pytest.raises(ValueError, match=r"has step .*, not a count"):
        jt.load_state_dict(jt.AdamW8bit(), params, odd, names=names)
