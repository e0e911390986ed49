"""A hyperparameter sweep on MNIST models: all configurations at once (jadam.sweep) vs one after another.

    python -m benchmarks.sweep [--configs 16] [--models mlp,cnn] [--steps 20] [--repeats 3] [--batch-size 128]

Both sides train the same model from the same start with the same batches.
*Vmapped*: one :func:`jadam.sweep` over the configurations (learning rate x b1
x b2), stepped by :func:`jadam.make_train_step` on the sum of the
configurations' losses. *Sequential*: each configuration alone, as one would
run it without a sweep: ``jadam.adam(**config)`` with its own
``make_train_step`` (the fused CPU kernel where it applies). Each side is
compiled and warmed up first, then timed over ``--steps`` steps on one fixed
batch already on the device, ``--repeats`` times interleaved (the best kept); the
time of an epoch is that per-step time times the steps of an epoch of full
MNIST's training split (54,000 images, after the tuning example's validation
split, ``// batch``). Compile times are printed apart. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam
from examples.mnist import input_pipeline
from examples.tune import train as tune

TRAIN_IMAGES = 54_000


def configs(n: int) -> list[dict[str, float]]:
  """`n` configurations of jadam.adam: learning rates x b1 x b2 (n a multiple of 4)."""
  if n % 4:
    raise ValueError(f"--configs must be a multiple of 4 (b1 x b2 = 2 x 2); got {n}")
  lrs = list(np.geomspace(1e-4, 1e-2, n // 4))
  return jadam.sweep_grid({"learning_rate": [float(x) for x in lrs], "b1": [0.8, 0.9], "b2": [0.99, 0.999]})


def _single_loss(apply):
  def loss(params, images, labels):
    logits = apply(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)).mean()

  return loss


class _Runner:
  """A compiled step and its carry: ``run(k)`` takes k steps on the fixed batch and waits."""

  def __init__(self, step, carry, batch):
    self.step, self.carry, self.batch = step, carry, batch
    t0 = time.perf_counter()
    self.run(1)
    self.first = time.perf_counter() - t0  # compile included
    self.run(1)

  def run(self, k: int) -> float:
    t0 = time.perf_counter()
    carry = self.carry
    for _ in range(k):
      carry = self.step(*carry, *self.batch)[:2]
    jax.block_until_ready(carry)
    self.carry = carry
    return (time.perf_counter() - t0) / k


def measure(model: str, n: int, steps: int, batch_size: int, repeats: int, hidden: int = 256) -> dict[str, float]:
  """Seconds per epoch and to compile, each side's best of `repeats` interleaved timings."""
  apply, params = tune.make_model(model, seed=0, **({"hidden": hidden} if model == "mlp" else {}))
  data = input_pipeline.load_sample().train
  batch = (jax.device_put(data.images[:batch_size]), jax.device_put(data.labels[:batch_size]))
  sweep = jadam.sweep(jadam.adam, configs=configs(n))
  train_step, _ = tune.make_steps(apply, sweep.tx)
  stacked = jax.tree.map(jnp.array, sweep.broadcast(params))
  vmapped = _Runner(train_step, (stacked, sweep.tx.init(stacked)), batch)
  alone = []
  for config in sweep.configs:
    tx = jadam.adam(**config)
    own = jax.tree.map(jnp.array, params)
    alone.append(_Runner(jadam.make_train_step(_single_loss(apply), tx), (own, tx.init(own)), batch))
  v_step, s_step = [], []
  for _ in range(repeats):  # interleaved, so that a burst of load on a shared machine hits both sides
    v_step.append(vmapped.run(steps))
    s_step.append(sum(r.run(steps) for r in alone))
  per_epoch = TRAIN_IMAGES // batch_size
  return {
    "vmapped_epoch": min(v_step) * per_epoch,
    "sequential_epoch": min(s_step) * per_epoch,
    "vmapped_compile": vmapped.first,
    "sequential_compile": sum(r.first for r in alone),
  }


def pieces(model: str, n: int, steps: int, batch_size: int, repeats: int, hidden: int = 256) -> dict[str, float]:
  """Milliseconds a step of the gradient alone and of the optimizer update alone, vmapped vs n single ones."""
  apply, params = tune.make_model(model, seed=0, **({"hidden": hidden} if model == "mlp" else {}))
  data = input_pipeline.load_sample().train
  images, labels = jax.device_put(data.images[:batch_size]), jax.device_put(data.labels[:batch_size])
  loss = _single_loss(apply)
  sweep = jadam.sweep(jadam.adam, configs=configs(n))
  stacked = jax.tree.map(jnp.array, sweep.broadcast(params))
  grad_v = jax.jit(jax.grad(lambda p: jax.vmap(loss, in_axes=(0, None, None))(p, images, labels).sum()))
  grad_1 = jax.jit(jax.grad(lambda p: loss(p, images, labels)))
  grads_v, grads_1 = grad_v(stacked), grad_1(params)
  tx = jadam.adam(1e-3)
  update_v = jadam.make_update_step(sweep.tx)
  update_1 = jadam.make_update_step(tx, fused=False)
  runners = {
    "grad_vmapped": _Runner(lambda p, g: (p, grad_v(p)), (stacked, None), ()),
    "grad_single": _Runner(lambda p, g: (p, grad_1(p)), (params, None), ()),
    "update_vmapped": _Runner(
      lambda p, s: update_v(p, s, grads_v), (jax.tree.map(jnp.array, stacked), sweep.tx.init(stacked)), ()
    ),
    "update_single": _Runner(
      lambda p, s: update_1(p, s, grads_1), (jax.tree.map(jnp.array, params), tx.init(params)), ()
    ),
  }
  best = {k: min(r.run(steps) for _ in range(repeats)) * 1e3 for k, r in runners.items()}
  for k in ("grad_single", "update_single"):
    best[k] *= n
  return best


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", type=int, default=16)
  p.add_argument("--models", default="mlp,cnn")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3, help="interleaved timings of each side; the best is kept")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--hidden", type=int, default=256, help="the MLP's hidden width (784-hidden-10)")
  p.add_argument("--pieces", action="store_true", help="also time the gradient and the update apart")
  a = p.parse_args(argv)
  device = jax.devices()[0]
  print(
    f"{a.configs} configurations of jadam.adam, batch {a.batch_size}, best of {a.repeats} x {a.steps} steps;"
    f" {device.platform} ({device.device_kind}), {os.cpu_count()} cores, {platform.machine()}, jax {jax.__version__}"
  )
  print("| model | vmapped s/epoch | sequential s/epoch | vmapped / sequential | compile: vmapped | sequential |")
  print("|---|---|---|---|---|---|")
  for model in a.models.split(","):
    r = measure(model, a.configs, a.steps, a.batch_size, a.repeats, a.hidden)
    name = f"mlp 784-{a.hidden}-10" if model == "mlp" else "cnn (Flax's MNIST CNN)"
    print(
      f"| {name} | {r['vmapped_epoch']:.1f} | {r['sequential_epoch']:.1f}"
      f" | {r['vmapped_epoch'] / r['sequential_epoch']:.2f}x | {r['vmapped_compile']:.1f} s"
      f" | {r['sequential_compile']:.1f} s |",
      flush=True,
    )
  if a.pieces:
    print(f"\n| model | ms/step | vmapped | {a.configs} single ones |\n|---|---|---|---|")
    for model in a.models.split(","):
      r = pieces(model, a.configs, a.steps, a.batch_size, a.repeats, a.hidden)
      for part in ("grad", "update"):
        print(f"| {model} | {part} | {r[part + '_vmapped']:.1f} | {r[part + '_single']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
