"""Bring a PyTorch run into JAX and back: torch N steps, jadam + Flax NNX N steps, torch N steps.

1. PyTorch trains a small CNN with AdamW and a cosine schedule for N steps and
   saves a checkpoint (`torch.save` of the model's, the optimizer's and the
   scheduler's state dicts).
2. jadam reads it without running code from it (`jadam.torch.load_checkpoint`,
   i.e. `torch.load(..., weights_only=True)`), copies the weights into the
   Flax NNX twin of the model (kernels transposed), turns the optimizer state
   into `jadam.torch.AdamW`'s (`jadam.torch.load_state_dict`: moments, step,
   the schedule's position) and trains N steps.
3. The state goes back (`jadam.torch.state_dict`, `scheduler_state_dict`) into
   a fresh PyTorch model, optimizer and scheduler, which train N more steps.

Every leg sees the same batches as one uninterrupted PyTorch run of 3N steps,
and the loss curves are printed side by side.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam.torch as jt


@dataclasses.dataclass
class Config:
  steps: int = 100  # per leg
  batch_size: int = 32
  dtype: str = "float64"
  lr: float = 3e-3
  weight_decay: float = 0.01
  seed: int = 0
  print_every: int = 25


def data(cfg: Config, n_steps: int):
  """Batches of 8x8 one-channel images labelled by a fixed random teacher, NCHW, the same for both sides."""
  rng = np.random.default_rng(cfg.seed)
  x = rng.normal(size=(n_steps, cfg.batch_size, 1, 8, 8))
  teacher = rng.normal(size=(64, 10))
  y = np.argmax(x.reshape(n_steps, cfg.batch_size, 64) @ teacher, axis=-1)
  return x.astype(cfg.dtype), y


def torch_model():
  import torch

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(1, 8, 3)
      self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
      return self.fc(torch.relu(self.conv(x)).flatten(1))

  return Net()


def flax_model(dtype: str):
  from flax import nnx

  kw = dict(param_dtype=jnp.dtype(dtype), dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))

  class Net(nnx.Module):
    def __init__(self):
      self.conv = nnx.Conv(1, 8, (3, 3), padding="VALID", **kw)
      self.fc = nnx.Linear(8 * 6 * 6, 10, **kw)

    def __call__(self, x):  # x: NCHW, as PyTorch's
      h = jax.nn.relu(self.conv(x.transpose(0, 2, 3, 1)))  # NHWC
      return self.fc(h.transpose(0, 3, 1, 2).reshape(x.shape[0], -1))  # flatten in PyTorch's C, H, W order

  return Net()


def torch_optimizer(model, cfg: Config):
  import torch

  opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
  return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * cfg.steps)


def torch_leg(model, opt, sched, x, y, start, stop):
  import torch

  losses = []
  for t in range(start, stop):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[t])), torch.from_numpy(y[t]))
    loss.backward()
    opt.step()
    sched.step()
    losses.append(loss.item())
  return losses


def weights_to_flax(params, model_state, names):
  """PyTorch's model.state_dict() into the Flax parameters, transposed as `names` says."""
  by_path = {}
  for path, tn in names.items():
    a = model_state[tn.name].numpy()
    by_path[path] = np.transpose(a, tn.perm) if tn.perm else a

  def put(path, leaf):
    a = by_path[jt.path_string(path)]
    assert a.shape == leaf.shape, (path, a.shape, leaf.shape)
    return jnp.asarray(a, leaf.dtype)

  return jax.tree_util.tree_map_with_path(put, params)


def weights_to_torch(params, names):
  import torch

  leaves = {jt.path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  out = {}
  for path, tn in names.items():
    a = leaves[path]
    out[tn.name] = torch.from_numpy(np.array(np.transpose(a, np.argsort(tn.perm)) if tn.perm else a))
  return out


def run(cfg: Config) -> dict[str, list[float]]:
  """The three legs and the reference; prints the curves. Float64 needs `jax.enable_x64`."""
  import torch

  if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("float64 needs jax_enable_x64 (python -m examples.from_pytorch sets it).")
  old = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, cfg.dtype))
  try:
    return _run(cfg)
  finally:
    torch.set_default_dtype(old)


def _run(cfg: Config) -> dict[str, list[float]]:
  import torch

  n = cfg.steps
  x, y = data(cfg, 3 * n)

  # The reference: PyTorch, uninterrupted.
  torch.manual_seed(cfg.seed)
  model = torch_model()
  init = {k: v.clone() for k, v in model.state_dict().items()}
  opt, sched = torch_optimizer(model, cfg)
  reference = torch_leg(model, opt, sched, x, y, 0, 3 * n)

  # Leg 1: PyTorch, then a checkpoint on disk.
  model = torch_model()
  model.load_state_dict(init)
  opt, sched = torch_optimizer(model, cfg)
  curve = torch_leg(model, opt, sched, x, y, 0, n)
  workdir = tempfile.mkdtemp(prefix="from_pytorch_")
  path = os.path.join(workdir, "ckpt.pt")
  torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, path)

  # Leg 2: jadam + Flax NNX from the checkpoint.
  from flax import nnx

  ckpt = jt.load_checkpoint(path)  # torch.load(weights_only=True): no code from the file runs
  graphdef, params = nnx.split(flax_model(cfg.dtype), nnx.Param)
  names = jt.flax_names(params, torch_model())  # "fc/kernel" <- "fc.weight" transposed, conv OIHW -> HWIO
  params = weights_to_flax(params, ckpt["model"], names)
  tx = jt.AdamW(lr=jt.CosineAnnealingLR(cfg.lr, T_max=3 * n), weight_decay=cfg.weight_decay)
  state = jt.load_state_dict(tx, params, ckpt["optim"], names=names, scheduler=ckpt["sched"])

  def loss_fn(params, xb, yb):
    logits = nnx.merge(graphdef, params)(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for t in range(n, 2 * n):
    params, state, loss = step(params, state, jnp.asarray(x[t]), jnp.asarray(y[t]))
    curve.append(float(loss))

  # Leg 3: back to PyTorch, in fresh objects.
  model = torch_model()
  model.load_state_dict(weights_to_torch(params, names))
  opt, sched = torch_optimizer(model, cfg)
  opt.load_state_dict(jt.state_dict(tx, state, params, names=names))
  sched.load_state_dict(jt.scheduler_state_dict(tx, state, params, sched.state_dict()))
  curve += torch_leg(model, opt, sched, x, y, 2 * n, 3 * n)

  print(f"AdamW + CosineAnnealingLR, {cfg.dtype}: torch {n} steps -> jadam + Flax NNX {n} -> torch {n}")
  print(f"{'step':>5} {'leg':>6} {'uninterrupted torch':>20} {'moved run':>20} {'|difference|':>13}")
  for t in range(0, 3 * n, cfg.print_every):
    leg = ("torch", "jadam", "torch")[t // n]
    print(f"{t:5d} {leg:>6} {reference[t]:20.15f} {curve[t]:20.15f} {abs(curve[t] - reference[t]):13.3g}")
  worst = max(abs(a - b) / abs(b) for a, b in zip(curve, reference, strict=True))
  print(f"largest relative difference over {3 * n} steps: {worst:.3g}")
  return {"reference": reference, "moved": curve}
