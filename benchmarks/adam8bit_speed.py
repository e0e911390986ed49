"""Step time of 8-bit Adam: jadam.adam8bit against float32 jadam.adam and bitsandbytes' Adam8bit, in one run.

    python -m benchmarks.adam8bit_speed                  # 10M and 50M parameters
    python -m benchmarks.adam8bit_speed --sizes 1e6 --steps 5

One float32 vector of n parameters, a fixed gradient (normal, times scales spread
log-uniformly over six decades, so that each block's codes spread over the map as in
training), params and state donated
(`jadam.make_update_step`). Rows: jadam.adam through XLA (`fused=False`) and
through its fused CPU kernel (the default on CPU), jadam.adam8bit likewise
(XLA, and the fused kernel's 8-bit variant), and, where installed,
torch.optim.Adam (foreach) and bitsandbytes' Adam8bit on the same device.
Median seconds per step over `--steps` timed steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jadam
from jadam._kernels import build as _kernel_build


def _time(run, steps: int) -> float:
  for _ in range(2):
    run()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _gradient(n: int) -> jax.Array:
  scale = jnp.exp(jax.random.uniform(jax.random.key(1), (n,), minval=-6.0 * math.log(10), maxval=0.0))
  return jax.random.normal(jax.random.key(0), (n,), jnp.float32) * scale


def _jax_row(tx, grads: jax.Array, steps: int, fused: bool | None) -> float:
  step = jadam.make_update_step(tx, fused=fused)
  box = {"params": jnp.zeros_like(grads)}
  box["state"] = tx.init(box["params"])

  def run():
    box["params"], box["state"] = step(box["params"], box["state"], grads)
    jax.block_until_ready(box["params"])

  return _time(run, steps)


def _torch_row(make, grads: jax.Array, steps: int) -> float:
  import torch

  g = torch.from_numpy(np.array(grads))
  p = torch.nn.Parameter(torch.zeros_like(g))
  p.grad = g
  opt = make([p])
  return _time(opt.step, steps)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=float, nargs="+", default=[1e7, 5e7])
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  try:
    import bitsandbytes as bnb
    import torch
  except ImportError:
    bnb = torch = None
  print(f"# 8-bit Adam step time, seconds per step (median of {args.steps}), {jax.devices()[0].platform}\n")
  print(f"CPU and kernel: {_kernel_build.describe()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
  print("| parameters | optimizer | s/step | vs jadam.adam (XLA) | vs jadam.adam (fused) |")
  print("|---|---|---|---|---|")
  for size in args.sizes:
    n = int(size)
    grads = _gradient(n)
    rows = {
      "jadam.adam (XLA)": _jax_row(jadam.adam(1e-3), grads, args.steps, False),
      "jadam.adam8bit (XLA)": _jax_row(jadam.adam8bit(1e-3), grads, args.steps, False),
    }
    try:
      rows["jadam.adam (fused kernel)"] = _jax_row(jadam.adam(1e-3), grads, args.steps, True)
      rows["jadam.adam8bit (fused kernel)"] = _jax_row(jadam.adam8bit(1e-3), grads, args.steps, True)
    except Exception as e:  # no compiler, or not a CPU
      print(f"(the fused kernel is unavailable: {type(e).__name__}: {e})")
    if bnb is not None:
      rows["torch.optim.Adam (foreach)"] = _torch_row(lambda p: torch.optim.Adam(p, lr=1e-3), grads, args.steps)
      rows["bitsandbytes Adam8bit"] = _torch_row(lambda p: bnb.optim.Adam8bit(p, lr=1e-3), grads, args.steps)
    base, fused = rows["jadam.adam (XLA)"], rows.get("jadam.adam (fused kernel)")
    for name, t in rows.items():
      vs_fused = f"{t / fused:.2f}x" if fused else "-"
      print(f"| {n / 1e6:g}M | {name} | {t:.4f} | {t / base:.2f}x | {vs_fused} |")


if __name__ == "__main__":
  main()
