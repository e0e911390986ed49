r"""Optimizer step time: jadam vs optax vs torch.optim.Adam, against the memory bandwidth.

    python -m benchmarks.step_time            # 1M, 10M, 50M vectors, 2,000-leaf tree, MNIST CNN
    python -m benchmarks.step_time --quick    # tiny sizes, a smoke run
    python -m benchmarks.step_time --only configs   # fused kernel vs XLA for the covered configurations
    python -m benchmarks.step_time --only leaves    # 500 small leaves: set-up and step, a fresh process each
    python -m benchmarks.step_time --only models    # ResNet-50's and BERT-base's parameter shapes

A step is update + apply, float32, with the parameters and the state donated
(the fast path: `jadam.update_and_apply` in one `jax.jit`). jadam runs twice:
with its fused single-pass CPU kernel (the default of `jadam.make_update_step`)
and with `fused=False`, the pure-XLA path (three passes on CPU). Every contender of
a workload is timed in the same process, interleaved in rounds (the order
rotates each round) so that a noisy neighbour hits them alike. Each row gives
the median step time and its spread (min-max and IQR), the effective GB/s at
28 bytes per parameter (read g, p, m, v; write p, m, v) and its fraction of the
bandwidth of an in-place triad, `a += s * b` on float32 arrays (12 bytes per
element: read a, b; write a) on the device JAX uses, measured in the same
rounds. It also prints the optimizer-state bytes per parameter.

The flat-vector workload also times jadam.adam8bit through the kernel's 8-bit
variant (its GB/s column still counts 28 bytes a parameter, for comparison; it
moves 16).

The `leaves` workload is a tree of 500 leaves of 2K-18K float32 values (every
shape distinct, as a model's are): each library runs in a fresh process of its
own, which times the eager `init`, the first (compiling) step and then the
steady step; the ratios are jadam's over optax's. The `models` workload times
the step on the parameter shapes of ResNet-50 (161 leaves, 25.6M) and
BERT-base (199 leaves, 110M), interleaved as the other workloads.

The `configs` workload times, at 10M and 50M parameters, each configuration
the kernel finds by structure (clip + adam, apply_if_finite(adam),
jadam.torch.AdamW with two groups, inject_hyperparams(adam), amsgrad, bf16
moments, 8-bit moments) with the kernel and with `fused=False`, interleaved,
against torch's fused Adam; the target is fused/XLA <= 0.70 (and, for 8-bit
moments, the float32 "adam" row's fused time or less). "bytes" is what a single
pass moves per parameter (float32 g, p, m, v read and p, m, v written: 28; +8
for AMSGrad's maximum; bf16 moments: 20; 8-bit moments: g, p and two codes
read, p and two codes written, 16, plus 8/256 for the scales).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

# torch's OpenMP threads spin after each op by default and would steal the
# cores from XLA's threads in the next contender's step: make them sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jadam  # noqa: E402
from jadam._kernels import build as _kernel_build  # noqa: E402

try:  # torch is optional: its rows are skipped where it is absent
  import torch
except ImportError:  # pragma: no cover
  torch = None

BYTES_PER_PARAM = 28  # read g, p, m, v (16) + write p, m, v (12), float32
TRIAD_BYTES = 12  # read a, b (8) + write a (4), float32


class Contender:
  """A thing to time: `run()` does one step and blocks until it is done."""

  def __init__(self, name: str, run: Callable[[], None], state_bytes: float | None, n_params: int):
    self.name, self.run, self.state_bytes, self.n_params = name, run, state_bytes, n_params
    self.times: list[float] = []


# ---------------------------------------------------------------- JAX contenders


def _jax_opt_contender(name, tx, params, grads, *, check=None, fused=None):
  """Time `tx` in the recommended form: update + apply in one jit, params and state donated."""
  step = jadam.make_update_step(tx, fused=fused)  # params and state donated, in the outputs' order
  box = [jax.tree.map(jnp.array, params), None]  # own copies: they are donated
  box[1] = tx.init(box[0])
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(box[1]) if jnp.ndim(x) > 0)

  def run():
    box[0], box[1] = step(box[0], box[1], grads)
    jax.block_until_ready(box[0])

  n = sum(x.size for x in jax.tree.leaves(params))
  return Contender(name, run, state_bytes / n, n)


def _triad(n: int) -> Contender:
  a, b = jnp.zeros(n, jnp.float32), jnp.ones(n, jnp.float32)
  triad = jax.jit(lambda a, b: a + jnp.float32(1e-3) * b, donate_argnums=0)
  box = [a]

  def run():
    box[0] = triad(box[0], b)
    box[0].block_until_ready()

  c = Contender("triad (a += s*b)", run, None, n)
  c.bytes_per_elem = TRIAD_BYTES
  return c


# -------------------------------------------------------------- torch contenders


def _torch_device():
  if torch is None:
    return None
  if jax.default_backend() == "cpu":
    return "cpu"
  return "cuda" if torch.cuda.is_available() else None  # never compare a GPU with torch on CPU


def _torch_sync(device):
  if device == "cuda":
    torch.cuda.synchronize()


def _torch_opt_contenders(shapes, seed=0):
  device = _torch_device()
  if device is None:
    return []
  gen = torch.Generator().manual_seed(seed)
  params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float32, device=device)) for s in shapes]
  for p in params:
    p.grad = torch.randn(p.shape, generator=gen).to(device)
  n = sum(p.numel() for p in params)
  out = []
  for label, kwargs in (
    ("foreach=False", {"foreach": False}),
    ("foreach=True", {"foreach": True}),
    ("fused=True", {"fused": True}),
  ):
    try:
      opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
      opt.step()
    except (RuntimeError, ValueError) as e:  # fused unsupported on this device/build
      print(f"  (torch Adam {label} skipped: {e})")
      continue
    state_bytes = sum(
      t.numel() * t.element_size()
      for st in opt.state.values()
      for t in st.values()
      if torch.is_tensor(t) and t.dim() > 0
    )

    def run(opt=opt):
      opt.step()
      _torch_sync(device)

    out.append(Contender(f"torch Adam {label}", run, state_bytes / n, n))
  return out


# ------------------------------------------------------------------- workloads


def tree_shapes(blocks: int) -> list[tuple[int, ...]]:
  """Ten leaves a block, shaped like a small MLP/attention block: about 99K parameters a block."""
  block = [(128, 256), (256,), (256, 128), (128,), (96, 128), (128,), (128,), (128,), (128, 160), (160,)]
  return [s for _ in range(blocks) for s in block]


def _optimizer_workload(shapes, with_torch=True, bf16=True, eight=False):
  key = jax.random.key(0)
  keys = jax.random.split(key, len(shapes))
  grads = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]
  params = [jnp.zeros(s, jnp.float32) for s in shapes]
  if len(shapes) == 1:
    grads, params = grads[0], params[0]
  contenders = [
    _jax_opt_contender("jadam.adam (fused kernel)", jadam.adam(1e-3), params, grads),
    _jax_opt_contender("jadam.adam (XLA)", jadam.adam(1e-3), params, grads, fused=False),
    _jax_opt_contender("optax.adam", optax.adam(1e-3), params, grads),
  ]
  if bf16:
    contenders.append(
      _jax_opt_contender(
        "jadam.adam bf16 moments", jadam.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), params, grads
      )
    )
  if eight:  # the kernel's 8-bit variant (the XLA 8-bit step is timed in the configs workload)
    contenders.append(_jax_opt_contender("jadam.adam8bit (fused kernel)", jadam.adam8bit(1e-3), params, grads))
  if with_torch:
    contenders += _torch_opt_contenders(shapes)
  return contenders


def leaves_shapes(n: int = 500, seed: int = 0) -> list[tuple[int, ...]]:
  """`n` leaves of 2K-18K values, every other one a matrix of 64 columns: the `leaves` workload's tree."""
  sizes = np.random.default_rng(seed).integers(2048, 18433, n)
  return [(int(s),) if i % 2 else (int(s) // 64, 64) for i, s in enumerate(sizes)]


def resnet50_shapes(base: int = 64) -> list[tuple[int, ...]]:
  """ResNet-50's parameters (convolutions HWIO, batch-norm scale and bias, the classifier): 161 leaves, 25.6M.

  `base` is the first stage's width (64; smaller for a smoke run, same leaves).
  """
  shapes = [(7, 7, 3, base), (base,), (base,)]
  cin = base
  for width, blocks in ((base, 3), (2 * base, 4), (4 * base, 6), (8 * base, 3)):
    for b in range(blocks):
      for k, i, o in ((1, cin, width), (3, width, width), (1, width, 4 * width)):
        shapes += [(k, k, i, o), (o,), (o,)]
      if b == 0:  # the projection shortcut
        shapes += [(1, 1, cin, 4 * width), (4 * width,), (4 * width,)]
      cin = 4 * width
  return shapes + [(cin, 1000), (1000,)]


def bert_base_shapes() -> list[tuple[int, ...]]:
  """BERT-base's parameters (embeddings, 12 layers, pooler): 199 leaves, 110M."""
  d, ff = 768, 3072
  shapes = [(30522, d), (512, d), (2, d), (d,), (d,)]
  for _ in range(12):
    shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (d, ff), (ff,), (ff, d), (d,), (d,), (d,)]
  return shapes + [(d, d), (d,)]


def _setup_child(lib: str, n_leaves: int, steps: int) -> None:
  """In a fresh process: `lib`'s eager init, first step and steady step on the `leaves` tree, as one JSON line."""
  shapes = leaves_shapes(n_leaves)
  rng = np.random.default_rng(1)
  params = {f"leaf{i:04d}": jnp.asarray(rng.standard_normal(s, np.float32)) for i, s in enumerate(shapes)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32)), params)
  jax.block_until_ready((params, grads))
  tx = jadam.adam(1e-3) if lib == "jadam" else optax.adam(1e-3)
  step = jadam.make_update_step(tx)
  t0 = time.perf_counter()
  state = jax.block_until_ready(tx.init(params))
  t1 = time.perf_counter()
  params, state = jax.block_until_ready(step(params, state, grads))
  t2 = time.perf_counter()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, grads))
    times.append(time.perf_counter() - t)
  kernel = "@jadam_" in step.lower(params, state, grads).as_text()
  out = {"init": t1 - t0, "first": t2 - t1, "step": float(np.median(times)), "kernel": kernel}
  print(json.dumps(out))


def _leaves(n_leaves: int, steps: int) -> str:
  """The `leaves` workload: each library's set-up and step in its own fresh process."""
  got = {}
  for lib in ("optax", "jadam"):
    cmd = [sys.executable, "-m", "benchmarks.step_time", "--setup-child", lib, "--leaves", str(n_leaves)]
    run = subprocess.run(cmd + ["--steps", str(steps)], capture_output=True, text=True, check=True)
    got[lib] = json.loads(run.stdout.strip().splitlines()[-1])
  n = sum(int(np.prod(s)) for s in leaves_shapes(n_leaves))
  lines = [f"\n### {n_leaves} leaves of 2K-18K, {n:,} float32 parameters, each library in a fresh process\n"]
  lines += ["| library | init s | first step s | init + first s | step ms | fused kernel? |", "|" + "---|" * 6]
  for lib, r in got.items():
    row = f"| {lib}.adam | {r['init']:.2f} | {r['first']:.2f} | {r['init'] + r['first']:.2f} | {r['step'] * 1e3:.2f} |"
    lines.append(row + f" {'yes' if r['kernel'] else 'no'} |")
  j, o = got["jadam"], got["optax"]
  ratio = (j["init"] + j["first"]) / (o["init"] + o["first"])
  lines.append(
    f"\njadam/optax: init + first step {ratio:.2f} (target <= 0.5), step {j['step'] / o['step']:.2f} (target <= 0.4)"
  )
  return "\n".join(lines)


# ------------------------------------------------------------ configurations


def configurations() -> list[tuple[str, Callable[[], optax.GradientTransformation], int]]:
  """(name, transformation factory, bytes a single pass moves per parameter) for the configs workload."""
  return [
    ("adam", lambda: jadam.adam(1e-3), 28),
    ("clip + adam", lambda: optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-3)), 28),
    ("apply_if_finite(adam)", lambda: optax.apply_if_finite(jadam.adam(1e-3), 5), 28),
    (
      "torch.AdamW two groups",
      lambda: jadam.torch.AdamW([{"params": "a"}, {"params": "b", "weight_decay": 0.1, "lr": 1e-4}], lr=1e-3),
      28,
    ),
    ("inject_hyperparams(adam)", lambda: optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3), 28),
    ("adam amsgrad", lambda: jadam.adam(1e-3, amsgrad=True), 36),
    ("adam bf16 moments", lambda: jadam.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), 20),
    ("adam8bit", lambda: jadam.adam8bit(1e-3), 16),
  ]


def _configs(n: int, steps: int, with_torch: bool, names: list[str] | None = None) -> str:
  half = n // 2
  keys = jax.random.split(jax.random.key(0), 2)
  grads = {"a": jax.random.normal(keys[0], (half,)), "b": jax.random.normal(keys[1], (n - half,))}
  params = jax.tree.map(jnp.zeros_like, grads)
  torch_fused = [c for c in _torch_opt_contenders([(half,), (n - half,)]) if c.name.endswith("fused=True")]
  torch_fused = torch_fused if with_torch else []
  head = "| configuration | fused ms | XLA ms | fused/XLA | vs torch fused | bytes/param | fused GB/s | kernel? |"
  lines = [f"\n### configurations, {n:,} float32 parameters in two leaves\n", head, "|" + "---|" * 8]
  for name, make, nbytes in configurations():
    if names is not None and name not in names:
      continue
    tx = make()
    with jax.numpy_dtype_promotion("standard"):
      try:
        jadam.make_update_step(tx, fused=True).lower(params, tx.init(params), grads)
        chosen = jadam.make_update_step(tx).lower(params, tx.init(params), grads).as_text()  # the default's choice
        served = "yes" if "@jadam_" in chosen else f"no: slower than XLA on the {_kernel_build.isa()} path"
      except ValueError as e:
        served = "no: " + str(e).split("serve this step: ")[-1][:60]
      fused = _jax_opt_contender("fused", tx, params, grads)
      xla = _jax_opt_contender("XLA", tx, params, grads, fused=False)
      for c in torch_fused:
        c.times = []
      measure([fused, xla] + torch_fused, steps)
    f, x = np.median(fused.times), np.median(xla.times)
    t = f"{f / np.median(torch_fused[0].times):.2f}" if torch_fused else "-"
    gbs = nbytes * n / f / 1e9
    lines.append(f"| {name} | {f * 1e3:.2f} | {x * 1e3:.2f} | {f / x:.2f} | {t} | {nbytes} | {gbs:.1f} | {served} |")
    del fused, xla
  return "\n".join(lines)


# ------------------------------------------------------------------ MNIST CNN


def _cnn_contenders(batch: int, with_torch=True):
  """Flax's MNIST CNN: a full train step (forward, backward, update), batch of `batch`."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(32, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Conv(64, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(256)(x))
      return nn.Dense(10)(x)

  model = CNN()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch, 28, 28, 1), np.float32))
  y = jnp.asarray(rng.integers(0, 10, batch))
  params = model.init(jax.random.key(0), x[:1])["params"]
  n = sum(p.size for p in jax.tree.leaves(params))

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  out = []
  for name, tx in (("jadam.adam", jadam.adam(1e-3)), ("optax.adam", optax.adam(1e-3))):
    step = jadam.make_train_step(loss_fn, tx)
    box = [jax.tree.map(jnp.array, params), None]
    box[1] = tx.init(box[0])
    state_bytes = sum(v.nbytes for v in jax.tree.leaves(box[1]) if jnp.ndim(v) > 0)

    def run(step=step, box=box):
      box[0], box[1], loss = step(box[0], box[1], x, y)
      loss.block_until_ready()

    out.append(Contender(name, run, state_bytes / n, n))

  device = _torch_device() if with_torch else None
  if device is not None:
    tnn = torch.nn
    net = tnn.Sequential(
      tnn.Conv2d(1, 32, 3, padding=1),
      tnn.ReLU(),
      tnn.AvgPool2d(2),
      tnn.Conv2d(32, 64, 3, padding=1),
      tnn.ReLU(),
      tnn.AvgPool2d(2),
      tnn.Flatten(),
      tnn.Linear(64 * 7 * 7, 256),
      tnn.ReLU(),
      tnn.Linear(256, 10),
    ).to(device)
    tx_ = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().to(device)
    ty = torch.from_numpy(np.array(y)).long().to(device)
    for label, kwargs in (("foreach=True", {"foreach": True}), ("fused=True", {"fused": True})):
      try:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, **kwargs)
      except (RuntimeError, ValueError) as e:
        print(f"  (torch Adam {label} skipped: {e})")
        continue

      def run(opt=opt):
        opt.zero_grad(set_to_none=True)
        loss = tnn.functional.cross_entropy(net(tx_), ty)
        loss.backward()
        opt.step()
        _torch_sync(device)

      run()
      state_bytes = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if torch.is_tensor(t) and t.dim() > 0
      )
      out.append(Contender(f"torch Adam {label}", run, state_bytes / n, n))
  return out, n


# --------------------------------------------------------------------- timing


def measure(contenders: list[Contender], steps: int, per_round: int = 2, warmup: int = 2) -> None:
  """Times each contender `steps` times, `per_round` steps at a time, rotating the order each round."""
  for c in contenders:
    for _ in range(warmup):
      c.run()
  rounds = -(-steps // per_round)
  for r in range(rounds):
    order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
    for c in order:
      for _ in range(per_round):
        t0 = time.perf_counter()
        c.run()
        c.times.append(time.perf_counter() - t0)


def table(title: str, contenders: list[Contender], triad_gbs: float | None, *, optimizer_only=True) -> str:
  ref = {c.name: np.median(c.times) for c in contenders}
  lines = [f"\n### {title}\n"]
  head = "| contender | median ms | min-max ms | IQR ms |"
  if optimizer_only:
    head += " GB/s @28B/param | of triad BW |"
  head += " vs optax | vs torch fused | state B/param |"
  lines.append(head)
  lines.append("|" + "---|" * (head.count("|") - 1))
  for c in contenders:
    t = np.asarray(c.times) * 1e3
    med = np.median(t)
    row = f"| {c.name} | {med:.3f} | {t.min():.3f}-{t.max():.3f} | {np.percentile(t, 75) - np.percentile(t, 25):.3f} |"
    if optimizer_only:
      gbs = BYTES_PER_PARAM * c.n_params / (med * 1e-3) / 1e9
      row += f" {gbs:.1f} | {gbs / triad_gbs:.0%} |" if triad_gbs else f" {gbs:.1f} | - |"

    def vs(other, med=med):
      return f"{med / (ref[other] * 1e3):.2f}" if other in ref else "-"

    row += f" {vs('optax.adam')} | {vs('torch Adam fused=True')} |"
    row += f" {c.state_bytes:.2f} |" if c.state_bytes is not None else " - |"
    lines.append(row)
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run")
  parser.add_argument("--sizes", default="1e6,1e7,5e7", help="flat-vector sizes, comma-separated")
  parser.add_argument("--tree-blocks", type=int, default=200, help="10 leaves a block (200: 2,000 leaves, ~20M)")
  parser.add_argument("--steps", type=int, default=24, help="timed steps per contender")
  parser.add_argument("--cnn-batch", type=int, default=128)
  parser.add_argument("--triad-size", type=float, default=1e8)
  parser.add_argument("--only", default="vector,tree,leaves,models,cnn,configs", help="workloads to run")
  parser.add_argument("--config-sizes", default="1e7,5e7", help="sizes of the configs workload")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--leaves", type=int, default=500, help="leaves of the `leaves` workload's tree")
  parser.add_argument("--models", default="resnet50,bert_base", help="the `models` workload's trees")
  parser.add_argument("--setup-child", choices=("jadam", "optax"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.setup_child:
    _setup_child(args.setup_child, args.leaves, args.steps)
    return
  if args.quick:
    args.sizes, args.tree_blocks, args.steps, args.cnn_batch, args.triad_size = "1e4,1e5", 3, 4, 8, 1e6
    args.config_sizes, args.leaves, args.models = "1e4", 12, "resnet50"
  with_torch = torch is not None and not args.no_torch
  if with_torch:
    torch.set_num_threads(os.cpu_count() or 1)

  dev = jax.devices()[0]
  print(
    f"# jadam step-time benchmark\n\njax {jax.__version__} on {dev.platform}: {dev.device_kind}; "
    f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
  )
  print(f"CPU and kernel: {_kernel_build.describe()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if with_torch:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {_torch_device()}")
  print(f"steps per contender: {args.steps} (interleaved rounds); triad on {int(args.triad_size):,} float32\n")

  workloads = args.only.split(",")
  triad = _triad(int(args.triad_size))
  measure([triad], 8)  # the first number, before anything else is in memory

  if "vector" in workloads:
    for size in args.sizes.split(","):
      n = int(float(size))
      cs = _optimizer_workload([(n,)], with_torch, eight=True)
      triad.times = []
      measure(cs + [triad], args.steps)
      bw = TRIAD_BYTES * triad.n_params / np.median(triad.times) / 1e9
      print(table(f"flat vector, {n:,} float32 parameters (triad {bw:.1f} GB/s)", cs, bw))
      del cs
  if "tree" in workloads:
    shapes = tree_shapes(args.tree_blocks)
    cs = _optimizer_workload(shapes, with_torch)
    triad.times = []
    measure(cs + [triad], args.steps)
    bw = TRIAD_BYTES * triad.n_params / np.median(triad.times) / 1e9
    print(table(f"{len(shapes):,}-leaf tree, {cs[0].n_params:,} float32 parameters (triad {bw:.1f} GB/s)", cs, bw))
    del cs
  if "leaves" in workloads:
    print(_leaves(args.leaves, args.steps))
  if "models" in workloads:
    resnet = functools.partial(resnet50_shapes, 4 if args.quick else 64)
    makers = {"resnet50": ("ResNet-50", resnet), "bert_base": ("BERT-base", bert_base_shapes)}
    for name in args.models.split(","):
      title, make = makers[name]
      cs = _optimizer_workload(make(), with_torch, bf16=False)
      triad.times = []
      measure(cs + [triad], args.steps)
      bw = TRIAD_BYTES * triad.n_params / np.median(triad.times) / 1e9
      shapes = make()
      print(
        table(
          f"{title} parameter shapes, {len(shapes)} leaves, {cs[0].n_params:,} float32 (triad {bw:.1f} GB/s)", cs, bw
        )
      )
      del cs
  if "configs" in workloads:
    for size in args.config_sizes.split(","):
      # --quick: two configurations, enough to keep the code from rotting
      names = ["adam", "torch.AdamW two groups", "adam8bit"] if args.quick else None
      print(_configs(int(float(size)), args.steps, with_torch, names))
  if "cnn" in workloads:
    cs, n = _cnn_contenders(args.cnn_batch, with_torch)
    measure(cs, args.steps)
    print(
      table(
        f"MNIST CNN train step (forward + backward + update), batch {args.cnn_batch}, {n:,} parameters",
        cs,
        None,
        optimizer_only=False,
      )
    )


if __name__ == "__main__":
  main()
