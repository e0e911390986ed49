r"""Optimizer-state memory: bytes per parameter and peak memory, float32 vs bfloat16 moments.

    python -m benchmarks.memory            # 50M float32 parameters
    python -m benchmarks.memory --quick    # 1M
    python -m benchmarks.memory --only "jadam.adam bf16 moments" jadam.adam8bit   # jadam.adam and these
    python -m benchmarks.memory --xla --only jadam.adam8bit   # the pure-XLA step (fused=False) instead

For each optimizer it reports the state's bytes per parameter, the compiled
step's memory (XLA's `memory_analysis`: arguments + outputs - donated aliases +
temporaries) and the measured peak: on CPU the growth of the process's peak
resident set (`ru_maxrss`) over init and a few steps, each optimizer in a fresh
subprocess; on GPU the device's `peak_bytes_in_use`. The step is
`jadam.make_update_step`'s default (on CPU the fused kernel where it serves the
optimizer, float32, bfloat16 and 8-bit moments alike); `--xla` measures the
pure-XLA step (`fused=False`) instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

import jadam

OPTIMIZERS = {
  "jadam.adam": lambda: jadam.adam(1e-3),
  "jadam.adam bf16 moments": lambda: jadam.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
  "jadam.adam bf16 nu": lambda: jadam.adam(1e-3, nu_dtype=jnp.bfloat16),
  "optax.adam": lambda: optax.adam(1e-3),
  "optax.adam bf16 mu": lambda: optax.adam(1e-3, mu_dtype=jnp.bfloat16),
  "jadam.adam8bit": lambda: jadam.adam8bit(1e-3),
}


def _maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_one(name: str, n: int, steps: int = 3, fused: bool | None = None) -> dict:
  """Runs in a fresh process: init and a few donated steps of `name` on `n` float32 parameters."""
  tx = OPTIMIZERS[name]()
  dev = jax.devices()[0]
  # Compile from shapes alone, then make the arrays without temporaries
  # (jax.random.normal would leave a high-water mark above the state's size,
  # hiding the growth on CPU, where only the peak of the process is known).
  shape = jax.ShapeDtypeStruct((n,), jnp.float32)
  step = jadam.make_update_step(tx, fused=fused)
  compiled = step.lower(shape, jax.eval_shape(tx.init, shape), shape).compile()
  mem = compiled.memory_analysis()
  params = jnp.zeros(n, jnp.float32)
  grads = jnp.full(n, 0.5, jnp.float32)
  jax.block_until_ready((params, grads))
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  before = stats["bytes_in_use"] if stats else _maxrss_bytes()
  state = tx.init(params)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)
  for _ in range(steps):
    params, state = compiled(params, state, grads)
  jax.block_until_ready(params)
  after = dev.memory_stats()["peak_bytes_in_use"] if stats else _maxrss_bytes()
  return {
    "name": name,
    "state_bytes_per_param": state_bytes / n,
    "compiled_bytes": None
    if mem is None
    else (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
    "peak_growth_bytes": after - before,
    "device": f"{dev.platform}: {dev.device_kind}",
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--size", type=float, default=5e7)
  parser.add_argument("--only", nargs="+", choices=list(OPTIMIZERS), help="measure these (and jadam.adam, the base)")
  parser.add_argument("--xla", action="store_true", help="the pure-XLA step (fused=False), not the fused CPU kernel")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one optimizer, print JSON
  args = parser.parse_args(argv)
  n = int(1e6 if args.quick else args.size)
  if args.one:
    print(json.dumps(measure_one(args.one, n, fused=False if args.xla else None)))
    return
  rows = []
  names = [n for n in OPTIMIZERS if not args.only or n == "jadam.adam" or n in args.only]
  for name in names:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--size", str(n), "--one", name] + (["--xla"] if args.xla else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))

  def mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"

  path = "pure-XLA step (fused=False)" if args.xla else "default step (the fused kernel on CPU)"
  print(f"# optimizer memory, {n:,} float32 parameters ({rows[0]['device']}, {path})\n")
  print("| optimizer | state B/param | compiled step MiB | measured peak growth MiB | vs jadam fp32 |")
  print("|---|---|---|---|---|")
  base = rows[0]["peak_growth_bytes"]
  for r in rows:
    print(
      f"| {r['name']} | {r['state_bytes_per_param']:.2f} | {mib(r['compiled_bytes'])} |"
      f" {mib(r['peak_growth_bytes'])} | {r['peak_growth_bytes'] / base:.2f} |"
    )
  print(
    "\ncompiled: arguments + outputs - donated aliases + temporaries of the jitted update_and_apply;"
    " measured: peak growth over init + 3 steps (ru_maxrss on CPU, peak_bytes_in_use on GPU),"
    " after the parameters and the gradient exist (made without temporaries)."
  )


if __name__ == "__main__":
  main()
