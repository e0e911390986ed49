r"""Lazy Adam on an embedding table: jadam's sparse step vs the dense jadam.adam step vs torch.optim.SparseAdam.

    python -m benchmarks.sparse             # 1,000,000 x 64 float32 table, 4,096 Zipf ids a step
    python -m benchmarks.sparse --quick     # 100,000 rows, fewer steps
    python -m benchmarks.sparse --torch-threads 1   # torch on one thread (a loaded machine)
    python -m benchmarks.sparse --sgd-adagrad       # jadam.torch.SGD / Adagrad on row-sparse gradients instead

With ``--sgd-adagrad`` it times `jadam.torch.SGD` (no momentum: with momentum
jadam's buffer is dense and torch's a sparse tensor of every row touched) and
`jadam.torch.Adagrad` on the same Zipf gradients, through
``jadam.make_update_step`` (parameters and state donated; their row-sparse
path is XLA's: coalesce, gather, scatter), at two table sizes, against
torch's sparse SGD and Adagrad, the fused SparseAdam kernel on the same ids
(which reads and writes two moments where Adagrad has one sum and SGD none)
and the bytes each step must move at the machine's streaming bandwidth:
whether a fused in-place kernel would serve.

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
import jadam.torch


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


def _bandwidth_gbs(n: int = 1 << 24) -> float:
  """NumPy's a = 2 c, then a = a + b, over float32 arrays of `n` entries: bytes moved over the best of 5, GB/s."""
  b, c = np.ones(n, np.float32), np.ones(n, np.float32)
  a = np.empty_like(b)
  best = np.inf
  for _ in range(5):
    t0 = time.perf_counter()
    np.multiply(c, np.float32(2.0), out=a)
    np.add(a, b, out=a)
    best = min(best, time.perf_counter() - t0)
  return 5 * n * 4 / best / 1e9  # c read and a written, then a and b read and a written


def sgd_adagrad(args, rng) -> None:
  """Row-sparse SGD and Adagrad: jadam's XLA path against torch, the fused SparseAdam kernel and the bytes moved."""
  dim, k = args.dim, args.ids
  sizes = (args.rows // 10, args.rows)
  batches = {
    r: [(zipf_ids(rng, r, k), rng.standard_normal((k, dim)).astype(np.float32)) for _ in range(8)] for r in sizes
  }
  unique = float(np.mean([len(np.unique(ids)) for ids, _ in batches[args.rows]]))
  gbs = _bandwidth_gbs()
  print(f"streaming bandwidth (NumPy, one thread): {gbs:.1f} GB/s\n")
  # bytes a step must move: the gradient's values and ids once, then per distinct row the parameter row read and
  # written (SGD), plus Adagrad's sum row read and written; SparseAdam's m and v rows twice more.
  grad_bytes = k * (dim + 1) * 4
  moved = {"SGD": grad_bytes + 2 * unique * dim * 4, "Adagrad": grad_bytes + 4 * unique * dim * 4}
  moved["SparseAdam"] = grad_bytes + 6 * unique * dim * 4
  txs = {
    "SGD": jadam.torch.SGD(lr=0.1),
    "Adagrad": jadam.torch.Adagrad(lr=0.1),
    "SparseAdam": jadam.torch.SparseAdam(lr=1e-3),
  }
  results: dict[tuple[str, int], float] = {}
  for rows in sizes:
    grads = [{"table": BCOO((jnp.asarray(v), jnp.asarray(i)[:, None]), shape=(rows, dim))} for i, v in batches[rows]]
    for name, tx in txs.items():
      results[(f"jadam.torch.{name}", rows)] = _time_jadam(
        jadam.make_update_step(tx), tx, rng, rows, dim, grads, args.steps
      )
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    for rows in sizes:
      tgrads = [
        torch.sparse_coo_tensor(torch.from_numpy(i.astype(np.int64))[None], torch.from_numpy(v), (rows, dim))
        for i, v in batches[rows]
      ]
      for name, kw in (("SGD", dict(lr=0.1)), ("Adagrad", dict(lr=0.1)), ("SparseAdam", dict(lr=1e-3))):
        p = torch.nn.Parameter(torch.randn(rows, dim))
        opt = getattr(torch.optim, name)([p], **kw)

        def torch_step(i, p=p, opt=opt, tgrads=tgrads):
          p.grad = tgrads[i % len(tgrads)]
          opt.step()

        torch_step(0)
        results[(f"torch.optim.{name} ({torch.get_num_threads()} threads)", rows)] = _median_time(
          torch_step, args.steps
        )
  print(f"{k:,} ids a step ({unique:,.0f} distinct at V={args.rows:,}), rows of {dim} float32; median step, ms")
  width = max(len(name) for name, _ in results)
  print(f"{'step':<{width}}  " + "  ".join(f"{'V=' + format(r, ','):>13}" for r in sizes) + "  bytes / bandwidth")
  for name in dict.fromkeys(n for n, _ in results):
    kind = name.split(".")[-1].split(" ")[0]
    bound = moved[kind] / (gbs * 1e9) * 1e3
    cells = "  ".join(f"{results[(name, r)] * 1e3:13.3f}" for r in sizes)
    print(f"{name:<{width}}  {cells}  {bound:8.3f}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--ids", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sgd-adagrad", action="store_true", help="time row-sparse SGD and Adagrad instead")
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
  if args.sgd_adagrad:
    sgd_adagrad(args, rng)
    return

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
