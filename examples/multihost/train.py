"""One process of the multi-host MNIST run: the CNN of `examples.mnist`, data parallel (or FSDP) over every device.

Each process runs this same program (as on N hosts). After ``jax.distributed.initialize`` the devices of
every process form one mesh, ``("data",)``; the parameters and the optimizer state are global arrays on it,
replicated (data parallel) or split by rows (``--fsdp``: each parameter along its first axis that the
device count divides, and its moments with it); each process reads its own slice of every global batch
(:func:`jax.make_array_from_process_local_data`). The step is :func:`jadam.make_train_step`, as on one
device: XLA all-reduces the gradient and the fused Adam kernel runs on each device's shard. Checkpoints
(:func:`jadam.save_state`) are written by every process into one folder; metrics, the plot and the
progress are process 0's.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
from examples._progress import Progress
from examples.mnist import input_pipeline
from examples.mnist import train as mnist
from examples.mnist.configs.default import Config


@dataclasses.dataclass(frozen=True)
class Run:
  """What the multi-host run adds to the MNIST example's :class:`Config`."""

  fsdp: bool = False  # parameters and state split by rows over the devices (else replicated)


def _local(x: jax.Array) -> np.ndarray:
  """A replicated global array's value, from this process's first shard (the others hold the same)."""
  return np.asarray(x.addressable_shards[0].data)


def _fsdp_spec(shape: tuple[int, ...], devices: int) -> P:
  """Split along the first axis `devices` divides; replicated where none does (biases of 10, say)."""
  for axis, size in enumerate(shape):
    if size % devices == 0:
      return P(*[None] * axis, "data")
  return P()


def _global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array of the same `value` held by every process, laid out as `sharding`."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _batch(mesh: Mesh, *arrays: np.ndarray) -> list[jax.Array]:
  """Global batches split over the devices: each process gives its own contiguous slice of the rows."""
  n, i = jax.process_count(), jax.process_index()
  split = NamedSharding(mesh, P("data"))
  out = []
  for a in arrays:
    rows = len(a) // n
    out.append(jax.make_array_from_process_local_data(split, a[i * rows : (i + 1) * rows], a.shape))
  return out


def place(state: Any, mesh: Mesh, fsdp: bool, tx) -> Any:
  """(params, optimizer state) on the mesh: the params replicated or FSDP-split, the state built from them."""
  params = jax.tree.map(
    lambda p: _global(p, NamedSharding(mesh, _fsdp_spec(p.shape, mesh.size) if fsdp else P())), state[0]
  )
  return params, tx.init(params)  # the moments follow their parameters, the counts replicated


def _evaluate(task: mnist.Task, state: Any, data: input_pipeline.Dataset, batch_size: int, mesh) -> dict:
  totals = np.zeros(3, np.float64)
  for images, labels, mask in input_pipeline.eval_batches(data, batch_size):
    totals += _local(task.eval_step(state, *_batch(mesh, images, labels, mask)))
  loss_sum, correct, count = totals
  return {"loss": loss_sum / count, "accuracy": correct / count}


def _epoch(task: mnist.Task, state: Any, data, config: Config, epoch: int, mesh) -> tuple[Any, dict]:
  steps = len(data) // config.batch_size
  enabled = config.progress if jax.process_index() == 0 else False
  bar = Progress(
    input_pipeline.train_batches(data, config.batch_size, config.seed, epoch),
    total=steps,
    desc=f"epoch {epoch}/{config.epochs}",
    enabled=enabled,
    file=sys.stderr,
  )
  totals = _global(np.zeros(3, np.float32), NamedSharding(mesh, P()))
  for images, labels in bar:
    state, totals = task.train_step(state, totals, *_batch(mesh, images, labels))
  bar.close()
  loss_sum, correct, count = _local(totals).astype(np.float64)
  if count == 0:
    raise ValueError(f"{len(data)} training examples give no batch of {config.batch_size}")
  return state, {"loss": loss_sum / count, "accuracy": correct / count, "images": int(count)}


def _save(workdir: pathlib.Path, epoch: int, state: Any, history: list[dict]) -> None:
  """``checkpoints/<epoch>/``: process 0 writes the history; every process its shards of the state."""
  folder = workdir / "checkpoints" / str(epoch)
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.json").write_text(json.dumps(history) + "\n")
  multihost_utils.sync_global_devices(f"checkpoint folder {epoch}")
  jadam.save_state(folder / "state", state)


def train_and_evaluate(config: Config, run: Run, workdir: str | pathlib.Path) -> dict[str, Any]:
  """:func:`examples.mnist.train.train_and_evaluate` over every device of every process.

  The global batch is ``config.batch_size`` (each of the P processes feeds 1/P of it); it and the eval
  batch must divide among the devices. Returns what ``metrics.json`` holds, with ``"state"`` added.
  """
  workdir = pathlib.Path(workdir)
  devices = jax.devices()
  for name, size in (("batch size", config.batch_size), ("eval batch size", config.eval_batch_size)):
    if size % len(devices):
      raise ValueError(f"the {name} {size} does not divide among {len(devices)} devices")
  mesh = Mesh(np.array(devices), ("data",))
  source = input_pipeline.load(config.data_dir, allow_download=config.download)
  train_data, test_data = source.train.take(config.train_limit), source.test.take(config.test_limit)
  learning_rate = config.learning_rate
  if config.lr_schedule == "cosine":
    learning_rate = mnist.cosine_schedule(learning_rate, config.epochs * (len(train_data) // config.batch_size))
  tx = mnist.make_optimizer(config.optimizer, learning_rate, config.hyperparameters)
  task = mnist.make_task(config.api, tx, config.seed)
  state, history, start = place(task.state, mesh, run.fsdp, tx), [], 0
  latest = mnist._latest_checkpoint(workdir)
  if latest is not None and not config.resume:
    raise FileExistsError(f"{workdir / 'checkpoints'} holds checkpoints (epoch {latest}): pass --resume")
  if latest is not None:
    state, history = mnist._restore(workdir, latest, state)
    start = latest
  lead = jax.process_index() == 0
  layout = "FSDP" if run.fsdp else "data parallel"
  if lead:
    print(
      f"MNIST ({source.origin}: {len(train_data)} train / {len(test_data)} test images); {layout} over"
      f" {jax.process_count()} processes, {len(devices)} devices; {mnist._describe(config)} (global batch);"
      f" epochs {start + 1}..{config.epochs}",
      flush=True,
    )
  for epoch in range(start + 1, config.epochs + 1):
    t0 = time.perf_counter()
    state, train = _epoch(task, state, train_data, config, epoch, mesh)
    train_seconds = time.perf_counter() - t0
    test = _evaluate(task, state, test_data, config.eval_batch_size, mesh)
    record = {
      "epoch": epoch,
      "train_loss": train["loss"],
      "train_accuracy": train["accuracy"],
      "test_loss": test["loss"],
      "test_accuracy": test["accuracy"],
      "seconds": time.perf_counter() - t0,
      "images_per_second": train["images"] / train_seconds,
    }
    history.append(record)
    if lead:
      print(mnist.epoch_line(epoch, config.epochs, record), flush=True)
    _save(workdir, epoch, state, history)
  metrics = {
    "config": dataclasses.asdict(config),
    "run": {**dataclasses.asdict(run), "processes": jax.process_count(), "devices": len(devices)},
    "data": {"origin": source.origin, "train_examples": len(train_data), "test_examples": len(test_data)},
    "history": history,
    "test_accuracy": history[-1]["test_accuracy"] if history else float("nan"),
  }
  if lead:
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if config.plot and history:
      mnist._plot(history, workdir / "metrics.png", f"MNIST CNN, {layout}, {mnist._describe(config)}")
  return {**metrics, "state": state}
