"""Train the same MLP with torch.optim and with jadam.torch, from the same weights on the same batches.

The recipe is ported verbatim: the torch lines and the jadam lines below take
the same arguments. Only where the state lives differs (torch's optimizer
object; jadam's explicit `opt_state`) and the sign (torch subtracts inside
`step()`; jadam's updates already carry the minus and are added with
`optax.apply_updates`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam


@dataclasses.dataclass
class Config:
  recipe: str = "adamw_cosine"
  steps: int = 300
  batch_size: int = 32
  hidden: int = 32
  dtype: str = "float64"
  seed: int = 0
  print_every: int = 50


def data(config: Config):
  """A deterministic regression task: 512 points in 8 dimensions, targets from a fixed nonlinear teacher."""
  rng = np.random.default_rng(config.seed)
  x = rng.normal(size=(512, 8))
  w = rng.normal(size=(8, 2))
  y = np.sin(x @ w) + 0.1 * (x[:, :2] ** 2)
  order = np.concatenate([rng.permutation(512) for _ in range(config.steps * config.batch_size // 512 + 1)])
  batches = order[: config.steps * config.batch_size].reshape(config.steps, config.batch_size)
  return x, y, batches


def init_params(config: Config):
  """torch.nn.Linear's layout: weight (out, in), bias (out,); the same numbers go to both libraries."""
  rng = np.random.default_rng(config.seed + 1)

  def linear(n_in, n_out):
    bound = 1 / np.sqrt(n_in)
    return {"weight": rng.uniform(-bound, bound, (n_out, n_in)), "bias": rng.uniform(-bound, bound, (n_out,))}

  return {"layer1": linear(8, config.hidden), "layer2": linear(config.hidden, 2)}


def recipes(steps: int):
  """Each recipe as (torch builder, jadam transformation): the same arguments on both sides."""
  import torch  # only the example's torch side needs it

  S = torch.optim.lr_scheduler

  def adamw_cosine_torch(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.99)
    )
    return opt, S.CosineAnnealingLR(opt, T_max=steps)

  adamw_cosine_jadam = jadam.torch.AdamW(
    [{"params": ".*/weight", "weight_decay": 0.05}, {"params": ".*/bias", "weight_decay": 0.0}],
    lr=jadam.torch.CosineAnnealingLR(3e-3, T_max=steps),
    betas=(0.9, 0.99),
  )

  def sgd_onecycle_torch(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return opt, S.OneCycleLR(opt, max_lr=0.1, total_steps=steps)

  sgd_onecycle_jadam = jadam.torch.SGD(
    lr=jadam.torch.OneCycleLR(0.1, total_steps=steps), momentum=0.9, nesterov=True, weight_decay=1e-4
  )

  def nadam_layers_torch(model):
    opt = torch.optim.NAdam(
      [{"params": model.layer1.parameters(), "lr": 1e-3}, {"params": model.layer2.parameters()}],
      lr=2e-3,
      weight_decay=1e-2,
      decoupled_weight_decay=True,
    )
    return opt, S.StepLR(opt, step_size=max(steps // 4, 1), gamma=0.5)

  nadam_layers_jadam = jadam.torch.NAdam(
    [{"params": "layer1/.*", "lr": 1e-3}],
    lr=jadam.torch.StepLR(2e-3, step_size=max(steps // 4, 1), gamma=0.5),
    weight_decay=1e-2,
    decoupled_weight_decay=True,
  )
  return {
    "adamw_cosine": (adamw_cosine_torch, adamw_cosine_jadam),
    "sgd_onecycle": (sgd_onecycle_torch, sgd_onecycle_jadam),
    "nadam_layers": (nadam_layers_torch, nadam_layers_jadam),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["layer1"]["weight"].T + params["layer1"]["bias"])
  out = h @ params["layer2"]["weight"].T + params["layer2"]["bias"]
  return jnp.mean((out - y) ** 2)


def train_jadam(config: Config, tx: optax.GradientTransformation):
  """Losses at each step and the final params, trained with jadam."""
  dtype = np.dtype(config.dtype)
  x, y, batches = data(config)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), init_params(config))
  x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)

  @jax.jit
  def train_step(params, opt_state, idx):
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for idx in batches:
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(idx))
    losses.append(float(loss))
  return np.array(losses), jax.tree.map(np.asarray, params)


def train_torch(config: Config, build):
  """The same with torch.optim: losses at each step and the final params (as the same pytree)."""
  import torch

  dtype = {"float64": torch.float64, "float32": torch.float32}[config.dtype]
  # NAdam keeps its momentum product in torch's *default* dtype, not the parameters':
  # float32 unless told otherwise, which puts float64 runs 1e-11 apart.
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    return _train_torch(config, build, dtype)
  finally:
    torch.set_default_dtype(previous)


def _train_torch(config, build, dtype):
  import torch

  x, y, batches = data(config)
  init = init_params(config)
  model = torch.nn.Sequential()
  model.add_module("layer1", torch.nn.Linear(8, config.hidden, dtype=dtype))
  model.add_module("act", torch.nn.Tanh())
  model.add_module("layer2", torch.nn.Linear(config.hidden, 2, dtype=dtype))
  with torch.no_grad():
    for layer in ("layer1", "layer2"):
      for name in ("weight", "bias"):
        getattr(getattr(model, layer), name).copy_(torch.tensor(init[layer][name], dtype=dtype))
  opt, sched = build(model)
  xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
  losses = []
  for idx in batches:
    idx = torch.from_numpy(idx)
    loss = torch.mean((model(xt[idx]) - yt[idx]) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
  params = {
    layer: {name: getattr(getattr(model, layer), name).detach().numpy().copy() for name in ("weight", "bias")}
    for layer in ("layer1", "layer2")
  }
  return np.array(losses), params


def run(config: Config) -> dict:
  """Trains both, prints the per-step loss difference and the final max parameter difference, returns them."""
  build_torch, tx = recipes(config.steps)[config.recipe]
  ctx = jax.enable_x64(config.dtype == "float64")
  with ctx:
    jadam_losses, jadam_params = train_jadam(config, tx)
  torch_losses, torch_params = train_torch(config, build_torch)
  loss_diff = np.abs(jadam_losses - torch_losses)
  param_diff = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(jadam_params), jax.tree.leaves(torch_params), strict=True)
  )
  param_scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(torch_params))
  print(f"recipe {config.recipe}, {config.dtype}, {config.steps} steps")
  print(f"{'step':>6} {'torch loss':>14} {'jadam loss':>14} {'|difference|':>13}")
  for t in range(0, config.steps, config.print_every):
    print(f"{t + 1:>6} {torch_losses[t]:>14.10f} {jadam_losses[t]:>14.10f} {loss_diff[t]:>13.3e}")
  t = config.steps - 1
  print(f"{t + 1:>6} {torch_losses[t]:>14.10f} {jadam_losses[t]:>14.10f} {loss_diff[t]:>13.3e}")
  print(f"max |loss difference| over all steps: {loss_diff.max():.3e}")
  print(
    f"final max |parameter difference|: {param_diff:.3e} (relative to max |parameter| {param_diff / param_scale:.3e})"
  )
  return {
    "max_loss_diff": float(loss_diff.max()),
    "max_param_diff": param_diff,
    "max_param_rel_diff": param_diff / param_scale,
    "final_loss": float(jadam_losses[-1]),
    "first_loss": float(jadam_losses[0]),
  }
