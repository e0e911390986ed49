r"""8-bit Adam against the live reference: jadam.adam8bit vs bitsandbytes' Adam8bit.

    python -m benchmarks.adam8bit_fidelity              # 200k parameters, 200 steps
    python -m benchmarks.adam8bit_fidelity --n 20000 --steps 50

Both 8-bit optimizers see the same float32 gradient sequence: per coordinate
:math:`g_t = s_i (z_t + \mu)` with scales :math:`s_i = 10^{u_i}`,
:math:`u_i \sim U[-6, 0]`, so each block of 256 holds gradients six decades
apart. Each is compared with its own float32 Adam (jadam.adam8bit with
jadam.adam, bitsandbytes' Adam8bit with torch.optim.Adam) by the relative
distance of the parameters, :math:`\|\theta_{8} - \theta_{32}\| / \|\theta_{32}\|`,
after the last step, and by the fraction of coordinates whose total
movement is off by more than a factor 2. Then the quantize/dequantize round
trip of jadam and of bitsandbytes' functions on the same blocks (the signed
map on values like m, the unsigned one on values like v).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jadam
from jadam._storage import quantize as _quantize


def gradients(n: int, steps: int, seed: int = 0, decades: float = 6.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  scales = 10.0 ** rng.uniform(-decades, 0.0, n)
  z = rng.standard_normal((steps, n)) + 0.3
  return (z * scales).astype(np.float32)


def run_jadam(tx, grads: np.ndarray, lr_params0: np.ndarray) -> np.ndarray:
  params = jnp.asarray(lr_params0)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return params + updates, state

  for g in grads:
    params, state = step(params, state, jnp.asarray(g))
  return np.asarray(params)


def run_torch(make, grads: np.ndarray, params0: np.ndarray) -> np.ndarray:
  import torch

  p = torch.nn.Parameter(torch.from_numpy(params0.copy()))
  opt = make([p])
  for g in grads:
    p.grad = torch.from_numpy(g)
    opt.step()
  return p.detach().numpy().copy()


def distances(x: np.ndarray, ref: np.ndarray, start: np.ndarray) -> tuple[float, float]:
  rel = float(np.linalg.norm(x - ref) / np.linalg.norm(ref - start))
  moved, moved_ref = np.abs(x - start), np.abs(ref - start)
  off = float(np.mean((moved > 2 * moved_ref) | (moved < moved_ref / 2)))
  return rel, off


def round_trip(n: int, seed: int = 1) -> list[tuple[str, float, float, float]]:
  """(what, jadam rel. error, bitsandbytes rel. error, codes equal) for m-like and v-like blocks."""
  import bitsandbytes.functional as F
  import torch

  rng = np.random.default_rng(seed)
  g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 0, n)).astype(np.float32)
  rows = []
  for what, x, signed in (("m-like (signed map)", g, True), ("v-like (unsigned map)", g * g, False)):
    q = _quantize.quantize(jnp.asarray(x), 256, signed=signed)
    back = np.asarray(_quantize.dequantize(q, 256, signed=signed))
    qb, st = F.quantize_blockwise(torch.from_numpy(x), code=F.create_dynamic_map(signed=signed), blocksize=256)
    back_b = F.dequantize_blockwise(qb, st).numpy()

    def err(y, x=x):
      return float(np.linalg.norm(y - x) / np.linalg.norm(x))

    rows.append((what, err(back), err(back_b), float(np.mean(np.asarray(q.codes) == qb.numpy()))))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=200_000)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--decades", type=float, default=6.0)
  args = parser.parse_args(argv)
  grads = gradients(args.n, args.steps, decades=args.decades)
  start = np.zeros(args.n, np.float32)
  rows = []
  ref_j = run_jadam(jadam.adam(args.lr), grads, start)
  rows.append(
    ("jadam.adam8bit vs jadam.adam", distances(run_jadam(jadam.adam8bit(args.lr), grads, start), ref_j, start))
  )
  try:
    import bitsandbytes as bnb
    import torch
  except ImportError:
    print("bitsandbytes or torch is not installed: only jadam's row")
    bnb = None
  if bnb is not None:
    ref_t = run_torch(lambda p: torch.optim.Adam(p, lr=args.lr), grads, start)
    b8 = run_torch(lambda p: bnb.optim.Adam8bit(p, lr=args.lr), grads, start)
    rows.append(("bitsandbytes Adam8bit vs torch.optim.Adam", distances(b8, ref_t, start)))
    rows.append(("(jadam.adam vs torch.optim.Adam)", distances(ref_j, ref_t, start)))
  print(
    f"# 8-bit Adam fidelity: {args.n:,} parameters, {args.steps} steps, lr {args.lr}, gradient scales over"
    f" {args.decades:g} decades\n"
  )
  print("| comparison | relative distance | coordinates moved off by > 2x |")
  print("|---|---|---|")
  for name, (rel, off) in rows:
    print(f"| {name} | {rel:.4f} | {100 * off:.2f}% |")
  if bnb is not None:
    print("\n| round trip, blocks of 256 | jadam rel. error | bitsandbytes rel. error | codes equal |")
    print("|---|---|---|---|")
    for what, ej, eb, same in round_trip(args.n):
      print(f"| {what} | {ej:.3g} | {eb:.3g} | {100 * same:.1f}% |")


if __name__ == "__main__":
  main()
