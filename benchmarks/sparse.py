r"""Lazy Adam on an embedding table: jadam's sparse step vs the dense jadam.adam step vs torch.optim.SparseAdam.

    python -m benchmarks.sparse             # 1,000,000 x 64 float32 table, 4,096 Zipf ids a step
    python -m benchmarks.sparse --quick     # 100,000 rows, fewer steps
    python -m benchmarks.sparse --torch-threads 1   # torch on one thread (a loaded machine)

Each step gets 4,096 ids drawn from a Zipf law over the rows (exponent 1.1,
so a few rows recur often and most appear rarely), with their duplicates, and
a (4096, 64) block of gradient values:

- jadam sparse: ``jadam.make_update_step(jadam.sparse_adam())`` on the
  row-sparse `BCOO` gradient (coalescing included), parameters and state
  donated. On the CPU this is the fused SparseAdam kernel
  (`jadam/_kernels/csrc/sparse_adam_cpu.cc`): one call groups the ids by row, sums
  the duplicates and updates each touched row of the table, m and v in place.
- jadam sparse, coalesced gradient: the same step on a gradient whose indices
  are already unique (flagged ``unique_indices``, as
  :func:`jadam.value_and_sparse_grad` makes them, the grouping having been
  paid there).
- the same two with ``fused=False``: the generic XLA path (sort and binary
  search to coalesce, a scatter-add, gathers of the touched rows of the
  table, m and v, three scatters back), what runs off the CPU or without a
  C++ compiler.
- jadam dense: ``jadam.make_update_step(jadam.adam())`` on the dense (V, 64)
  gradient the same ids would give (its fused single-pass kernel on CPU).
- torch SparseAdam: ``torch.optim.SparseAdam`` with ``p.grad`` a sparse COO
  tensor of the same ids and values (``opt.step()`` only).

Memory: what XLA's compiled step needs beyond its donated inputs (temporaries
plus outputs not written in place), for two table sizes: the sparse step's
does not grow with V.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.sparse import BCOO

import jadam


def zipf_ids(rng: np.random.Generator, rows: int, k: int, a: float = 1.1) -> np.ndarray:
  ids = rng.zipf(a, size=k) - 1
  while (bad := ids >= rows).any():
    ids[bad] = rng.zipf(a, size=int(bad.sum())) - 1
  return rng.permutation(rows)[ids].astype(np.int32)  # spread the hot rows over the table


def _median_time(fn, steps: int) -> float:
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _time_jadam(step, tx, rng, rows, dim, grads, steps) -> float:
  """Median time of a donated jadam step over `steps` calls, after one to compile."""
  params = {"table": jnp.asarray(rng.standard_normal((rows, dim)), jnp.float32)}
  box = [params, tx.init(params)]

  def one(i):
    box[0], box[1] = step(box[0], box[1], grads[i % len(grads)])
    jax.block_until_ready(box[0])

  one(0)
  return _median_time(one, steps)


def _added_bytes(step, *args) -> int | None:
  mem = step.lower(*args).compile().memory_analysis()
  if mem is None:
    return None
  return int(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def _structs(tx, rows, dim, k, sparse):
  params = {"table": jax.ShapeDtypeStruct((rows, dim), jnp.float32)}
  if sparse:
    grads = {"table": BCOO((jnp.zeros((k, dim)), jnp.zeros((k, 1), jnp.int32)), shape=(rows, dim))}
    grads = jax.eval_shape(lambda: grads)
  else:
    grads = params
  return params, jax.eval_shape(tx.init, params), grads


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--ids", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--torch-threads", type=int, default=None, help="torch's intra-op threads (default: torch's own choice)"
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.rows, args.steps = 100_000, 10
  rows, dim, k = args.rows, args.dim, args.ids
  rng = np.random.default_rng(0)
  batches = [(zipf_ids(rng, rows, k), rng.standard_normal((k, dim)).astype(np.float32)) for _ in range(8)]
  unique = np.mean([len(np.unique(ids)) for ids, _ in batches])
  print(f"table {rows:,} x {dim} float32, {k:,} Zipf ids a step ({unique:,.0f} distinct on average)")
  print(f"device: {jax.devices()[0].device_kind}, {args.steps} steps each, median step time\n")

  results = {}

  # jadam, sparse: the fused kernel (CPU), then the generic XLA path
  tx = jadam.sparse_adam(1e-3)
  step = jadam.make_update_step(tx)
  xla_step = jadam.make_update_step(tx, fused=False)
  grads = [{"table": BCOO((jnp.asarray(v), jnp.asarray(i)[:, None]), shape=(rows, dim))} for i, v in batches]
  coalesced = [{"table": BCOO.sum_duplicates(g["table"], nse=k)} for g in grads]  # unique_indices=True
  results["jadam sparse_adam (make_update_step)"] = _time_jadam(step, tx, rng, rows, dim, grads, args.steps)
  results["jadam sparse_adam, coalesced gradient"] = _time_jadam(step, tx, rng, rows, dim, coalesced, args.steps)
  results["jadam sparse_adam, XLA path (fused=False)"] = _time_jadam(xla_step, tx, rng, rows, dim, grads, args.steps)
  results["jadam sparse_adam, XLA path, coalesced"] = _time_jadam(xla_step, tx, rng, rows, dim, coalesced, args.steps)
  sparse_mem = {r: _added_bytes(step, *_structs(tx, r, dim, k, True)) for r in (rows // 10, rows)}
  xla_mem = {r: _added_bytes(xla_step, *_structs(tx, r, dim, k, True)) for r in (rows // 10, rows)}
  coalesced = None

  # jadam, dense
  tx_dense = jadam.adam(1e-3)
  step_dense = jadam.make_update_step(tx_dense)
  dense_grads = [{"table": g["table"].todense()} for g in grads[:2]]
  results["jadam adam, dense (make_update_step)"] = _time_jadam(
    step_dense, tx_dense, rng, rows, dim, dense_grads, max(5, args.steps // 5)
  )
  dense_mem = {r: _added_bytes(step_dense, *_structs(tx_dense, r, dim, k, False)) for r in (rows // 10, rows)}
  dense_grads = None

  # torch
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    p = torch.nn.Parameter(torch.randn(rows, dim))
    opt = torch.optim.SparseAdam([p], lr=1e-3)
    tgrads = [
      torch.sparse_coo_tensor(torch.from_numpy(i.astype(np.int64))[None], torch.from_numpy(v), (rows, dim))
      for i, v in batches
    ]

    def torch_step(i):
      p.grad = tgrads[i % len(tgrads)]
      opt.step()

    torch_step(0)
    results[f"torch.optim.SparseAdam ({torch.get_num_threads()} threads)"] = _median_time(torch_step, args.steps)

  sparse_t = results["jadam sparse_adam (make_update_step)"]
  dense_t = results["jadam adam, dense (make_update_step)"]
  width = max(map(len, results))
  print(f"{'step':<{width}}  {'ms':>9}  {'vs jadam sparse':>15}")
  for name, t in results.items():
    print(f"{name:<{width}}  {t * 1e3:9.3f}  {t / sparse_t:14.2f}x")
  print(f"\nsparse / dense = {sparse_t / dense_t:.4f}x (target <= 0.05)")
  for name, t in results.items():
    if name.startswith("torch"):
      print(f"sparse / torch SparseAdam = {sparse_t / t:.3f}x (target <= 1.0)")
  print("\nmemory a compiled step adds beyond its donated inputs (XLA memory_analysis):")
  memories = (
    ("jadam sparse_adam", sparse_mem),
    ("jadam sparse_adam, XLA path", xla_mem),
    ("jadam adam, dense", dense_mem),
  )
  for name, mem in memories:
    cells = ", ".join(f"V={r:,}: {b / 2**20:.2f} MiB" if b is not None else f"V={r:,}: n/a" for r, b in mem.items())
    print(f"  {name}: {cells}")


if __name__ == "__main__":
  main()
