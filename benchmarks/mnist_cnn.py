"""Training-step throughput of Flax's MNIST CNN: jadam.adam vs optax.adam vs torch.optim.Adam.

    PYTHONPATH=. python benchmarks/mnist_cnn.py [--steps 50] [--repeats 7] [--batch-size 128]

The JAX rows use the example's own jitted train step (``examples.mnist.train``),
built once per optimizer in the same process and timed in interleaved repeats
(jadam, optax, jadam, optax, ...), each of ``--steps`` steps on one fixed batch
already on the device, after a warm-up that compiles. The torch row trains the
same architecture (same layers, padding and pooling) with ``torch.optim.Adam``
on PyTorch's CPU build, with ``torch.set_num_threads`` at the core count. It
prints the median images/s and ms/step, the spread (min..max of the repeats)
and the ratio to optax.adam. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jadam
from examples.mnist import input_pipeline, models, train


def _batch(batch_size: int):
  data = input_pipeline.load_sample().train
  return data.images[:batch_size], data.labels[:batch_size]


def jax_runner(api: str, tx, images, labels):
  """A function running ``n`` train steps and waiting for the result."""
  task = train.make_task(api, tx, seed=0)
  box = {"state": task.state, "totals": jnp.zeros(3, jnp.float32)}
  images, labels = jax.device_put(images), jax.device_put(labels)

  def run(n: int) -> None:
    state, totals = box["state"], box["totals"]
    for _ in range(n):
      state, totals = task.train_step(state, totals, images, labels)
    jax.block_until_ready(totals)
    box["state"], box["totals"] = state, totals

  return run


def nnx_jit_runner(tx, images, labels):
  """The same step with ``nnx.jit`` on the objects (what the example does not use)."""
  model = models.CNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  images, labels = jax.device_put(images), jax.device_put(labels)

  @nnx.jit
  def step(model, optimizer, images, labels):
    def loss_fn(model):
      return train._mean_loss(model(models.prepare(images)), labels)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  def run(n: int) -> None:
    for _ in range(n):
      loss = step(model, optimizer, images, labels)
    jax.block_until_ready(loss)

  return run


def torch_runner(images, labels, threads: int):
  import torch
  from torch import nn

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1),
    nn.ReLU(),
    nn.AvgPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1),
    nn.ReLU(),
    nn.AvgPool2d(2),
    nn.Flatten(),
    nn.Linear(7 * 7 * 64, 256),
    nn.ReLU(),
    nn.Linear(256, 10),
  )
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = (torch.from_numpy(images.astype(np.float32))[:, None] / 255.0 - models.MEAN) / models.STD
  y = torch.from_numpy(labels.astype(np.int64))

  def run(n: int) -> None:
    for _ in range(n):
      optimizer.zero_grad(set_to_none=True)
      loss = nn.functional.cross_entropy(model(x), y)
      loss.backward()
      optimizer.step()

  return run, torch.__version__


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--api", choices=("nnx", "linen"), default="nnx")
  p.add_argument("--no-torch", dest="torch", action="store_false")
  p.add_argument("--no-nnx-jit", dest="nnx_jit", action="store_false", help="skip the nnx.jit variant of the step")
  a = p.parse_args(argv)

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  images, labels = _batch(a.batch_size)
  runners = {
    f"jadam.adam ({a.api}, jax.jit)": jax_runner(a.api, jadam.adam(1e-3), images, labels),
    f"optax.adam ({a.api}, jax.jit)": jax_runner(a.api, optax.adam(1e-3), images, labels),
  }
  if a.nnx_jit:
    runners["jadam.adam (nnx, nnx.jit)"] = nnx_jit_runner(jadam.adam(1e-3), images, labels)
  torch_version = None
  if a.torch:
    try:
      runners["torch.optim.Adam"], torch_version = torch_runner(images, labels, threads)
    except ImportError:
      print("torch is not installed: no torch row", file=sys.stderr)

  for run in runners.values():  # compile and warm up
    run(5)
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(a.repeats):
    for name, run in runners.items():  # interleaved
      t0 = time.perf_counter()
      run(a.steps)
      times[name].append((time.perf_counter() - t0) / a.steps)

  print(
    f"MNIST CNN train step, batch {a.batch_size}, {a.repeats} repeats x {a.steps} steps,"
    f" {threads} CPU threads, {platform.processor() or platform.machine()};"
    f" jax {jax.__version__} on {jax.devices()[0].platform}" + (f", torch {torch_version}" if torch_version else "")
  )
  ref = statistics.median(times[f"optax.adam ({a.api}, jax.jit)"])
  print(f"| {'optimizer':<28} | images/s (median) | ms/step (median) | ms/step min..max | vs optax.adam |")
  print(f"| {'-' * 28} | ---: | ---: | ---: | ---: |")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(
      f"| {name:<28} | {a.batch_size / med:,.0f} | {1e3 * med:.2f} |"
      f" {1e3 * min(ts):.2f}..{1e3 * max(ts):.2f} | {ref / med:.3f}x |"
    )


if __name__ == "__main__":
  main()
