r"""The sharded step: the fused kernel on each shard vs XLA's sharded step, and the state's bytes per device.

    python -m benchmarks.sharded                  # 10M and 50M parameters on 8 virtual CPU devices
    python -m benchmarks.sharded --sizes 1e5 --steps 2   # a smoke run

The parameters (float32 leaves of 1024 x 1024, rows split over the devices) are laid out three ways on a
mesh of 8 virtual CPU devices (``--xla_force_host_platform_device_count``, set here unless XLA_FLAGS says
otherwise):

- FSDP: parameters, gradients and both moments sharded by rows;
- ZeRO-1: parameters and gradients replicated, the moments sharded by rows (the new parameters are
  gathered back, the one all-gather ZeRO-1 is made of);
- data parallel: everything replicated (each device steps the whole model).

Each layout's step is `jadam.make_update_step(jadam.adam(1e-3))`, parameters and state donated, timed with
the kernel on each shard (the default) and against XLA's partitioned step (``fused=False``, jitted with
out_shardings that keep each layout, as the kernel's step does), interleaved in
rounds so that a noisy neighbour hits both alike; the table gives the median and the ratio, kernel / XLA
(target <= 0.75). The virtual devices share the host's cores and memory bandwidth, so the times are the
whole host's, not one device's. "state bytes / device" is the largest device's share of the optimizer state
(mu, nu, counts), against the whole (target 1/8 for FSDP and ZeRO-1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jadam  # noqa: E402
from jadam._kernels import build as _kernel_build  # noqa: E402

_COLUMNS = 1024


def shapes(n: int, devices: int) -> list[tuple[int, int]]:
  """Leaves of up to 1024 x 1024 float32, rows a multiple of `devices`, about `n` parameters in all."""
  rows = max(devices, (n // _COLUMNS) // devices * devices)
  per_leaf = _COLUMNS
  out = [(per_leaf, _COLUMNS)] * (rows // per_leaf)
  if rows % per_leaf:
    out.append((rows % per_leaf, _COLUMNS))
  return out


def layouts(mesh: Mesh) -> dict[str, tuple[P, P]]:
  """(parameters' spec, moments' spec) per layout."""
  return {"FSDP": (P("data"), P("data")), "ZeRO-1": (P(), P("data")), "data parallel": (P(), P())}


def _state_shardings(tx, params, mesh: Mesh, moments: P):
  """The state's shardings: each parameter-shaped leaf as `moments`, the counts replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, moments if x.ndim else P()), jax.eval_shape(tx.init, params))


def state_bytes(state) -> tuple[int, int]:
  """(bytes of the optimizer state on its fullest device, bytes of the whole state)."""
  per_device: dict = {}
  whole = 0
  for leaf in jax.tree.leaves(state):
    whole += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()), whole


class _Contender:
  def __init__(self, label, step, params, state, grads):
    self.label, self.step, self.box, self.grads, self.times = label, step, [params, state], grads, []

  def run(self):
    start = time.perf_counter()
    self.box[0], self.box[1] = self.step(self.box[0], self.box[1], self.grads)
    jax.block_until_ready(self.box)
    self.times.append(time.perf_counter() - start)

  def compiled(self) -> str:
    return self.step.lower(*self.box, self.grads).compile().as_text()


def measure(n: int, layout: str, steps: int, mesh: Mesh) -> dict:
  """Median step times (kernel per shard, XLA) and the state's bytes per device, for one size and layout."""
  param_spec, moment_spec = layouts(mesh)[layout]
  tx = jadam.adam(1e-3)
  leaves = shapes(n, mesh.size)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  host = [np.asarray(jax.random.normal(k, s, jnp.float32)) for k, s in zip(keys, leaves, strict=True)]
  sharding = NamedSharding(mesh, param_spec)
  grads = [jax.device_put(g, sharding) for g in host]
  contenders = []
  for label, fused in (("kernel", None), ("XLA", False)):
    params = [jax.device_put(np.zeros(s, np.float32), sharding) for s in leaves]
    state_shardings = _state_shardings(tx, params, mesh, moment_spec)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    if fused is None:  # the step helper: the kernel per shard, each output laid out as its input
      step = jadam.make_update_step(tx)
    else:  # XLA's step, told to keep the layouts (left free, it returns ZeRO-1's parameters split like the moments)
      step = jax.jit(
        lambda p, s, g: jadam.update_and_apply(tx, g, s, p, fused=False),
        out_shardings=([sharding] * len(params), state_shardings),
        donate_argnums=(0, 1),
      )
    contenders.append(_Contender(label, step, params, state, grads))
  served = 'custom_call_target="jadam_adam' in contenders[0].compiled()
  for c in contenders:  # compile; twice, as a step whose outputs come out laid out otherwise compiles again
    c.run()
    c.run()
    c.times.clear()
  for r in range(steps):
    for c in contenders[r % 2 :] + contenders[: r % 2]:
      c.run()
  on_one, whole = state_bytes(contenders[0].box[1])
  kernel, xla = (statistics.median(c.times) for c in contenders)
  return {
    "n": sum(int(np.prod(s)) for s in leaves),
    "layout": layout,
    "kernel_ms": 1e3 * kernel,
    "xla_ms": 1e3 * xla,
    "ratio": kernel / xla,
    "served": served,
    "per_device": on_one,
    "whole": whole,
  }


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", nargs="+", type=float, default=[1e7, 5e7], help="parameters per model")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per contender (interleaved)")
  parser.add_argument("--layouts", nargs="+", default=["FSDP", "ZeRO-1", "data parallel"])
  parser.add_argument(
    "--max-replicated", type=float, default=2e7, help="largest model run data parallel (8 whole copies of p, m, v)"
  )
  args = parser.parse_args(argv)
  devices = jax.devices()
  if len(devices) < _DEVICES:
    raise SystemExit(f"needs {_DEVICES} devices, found {len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
  mesh = Mesh(np.array(devices[:_DEVICES]), ("data",))
  print(f"# jadam sharded step: {_DEVICES} virtual {devices[0].platform} devices, jax {jax.__version__}")
  print(f"CPU and kernel: {_kernel_build.describe()}; {os.cpu_count()} cores")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip()!r}; {args.steps} timed steps each, interleaved\n")
  print(
    "| parameters | layout | kernel per shard (ms) | XLA (ms) | kernel / XLA | kernel compiled in |"
    " state bytes / device | of the whole |"
  )
  print("|---:|---|---:|---:|---:|---|---:|---:|")
  rows = []
  for n in args.sizes:
    for layout in args.layouts:
      if layout == "data parallel" and n > args.max_replicated:
        print(f"| {int(n):,} | {layout} | skipped: 8 whole copies above --max-replicated | | | | | |")
        continue
      row = measure(int(n), layout, args.steps, mesh)
      rows.append(row)
      print(
        f"| {row['n']:,} | {layout} | {row['kernel_ms']:.2f} | {row['xla_ms']:.2f} | {row['ratio']:.2f} |"
        f" {'yes' if row['served'] else 'no'} | {row['per_device']:,} | {row['per_device'] / row['whole']:.3f} |",
        flush=True,
      )
  return rows


if __name__ == "__main__":
  main()
