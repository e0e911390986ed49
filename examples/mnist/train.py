"""Train Flax's MNIST CNN with a jadam optimizer, in Flax NNX or Linen.

The two APIs differ only in :func:`make_task`: each gives a pure
``apply(params, images)`` and its parameters, and jadam does the rest: the
train step is :func:`jadam.make_train_step`, the checkpoints are
:func:`jadam.save_state`/:func:`jadam.restore_state`. The optimizers come from
the explicit table in :mod:`examples.mnist.optimizers`. The data, the loop,
the metrics and the plot are shared (``examples.tune`` reuses the model and
the input pipeline).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jadam
from examples._progress import Progress
from examples.mnist import input_pipeline, models, optimizers
from examples.mnist.configs.default import Config

# ---------------------------------------------------------------- optimizer


def optimizer_names() -> list[str]:
  """The names ``--optimizer`` accepts: the explicit table in :mod:`examples.mnist.optimizers`."""
  return list(optimizers.OPTIMIZERS)


def default_learning_rate(name: str) -> float | None:
  """The default ``learning_rate`` (or ``lr``) of optimizer ``name``, if it has a number for one."""
  fn = optimizers.get(name)
  params = inspect.signature(fn).parameters
  default = next((params[p].default for p in ("learning_rate", "lr") if p in params), None)
  return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def make_optimizer(
  name: str, learning_rate: Any = None, hyperparameters: dict[str, Any] | None = None
) -> optax.GradientTransformation:
  """``optimizers.OPTIMIZERS[name]``, called with the hyperparameters.

  The learning rate goes to the optimizer's ``learning_rate`` or ``lr``; ``b1``
  and ``b2`` become ``betas`` for an optimizer that takes betas (a torch front
  door). Any other hyperparameter must be one of the optimizer's own arguments.

  Raises:
    ValueError: For an unknown name or a hyperparameter the optimizer lacks.
  """
  fn = optimizers.get(name)
  params = inspect.signature(fn).parameters
  accepted = [p for p in params if p not in ("self", "params")]
  kwargs: dict[str, Any] = {}
  lr_name = optimizers.lr_name(name)
  if learning_rate is not None:
    if lr_name is None:
      raise ValueError(f"{name} takes no learning rate (it takes {accepted})")
    kwargs[lr_name] = learning_rate
  elif lr_name is not None and params[lr_name].default is inspect.Parameter.empty:
    raise ValueError(f"{name} needs a learning rate (--lr)")
  hyper = dict(hyperparameters or {})
  if ("b1" in hyper or "b2" in hyper) and optimizers.takes_betas(name):
    b1, b2 = params["betas"].default
    kwargs["betas"] = (hyper.pop("b1", b1), hyper.pop("b2", b2))
  for key, value in hyper.items():
    if key not in params:
      raise ValueError(f"{name} takes no {key!r}; it takes {accepted}")
    kwargs[key] = value
  return fn(**kwargs)


def cosine_schedule(peak: float, steps: int) -> optax.Schedule:
  """``peak`` at step 0 down to 0 at ``steps``, as ``optax.cosine_decay_schedule``.

  Written out so the step count is cast to float32 first: optax's schedule mixes
  the int32 count with floats, which strict dtype promotion refuses.
  """

  def schedule(count):
    t = jnp.minimum(jnp.asarray(count).astype(jnp.float32), float(steps)) / float(max(steps, 1))
    return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

  return schedule


# --------------------------------------------------------------------- tasks


class Task(NamedTuple):
  """One API's view of the model: a pytree state and jitted steps of it."""

  state: Any  # initial state: (params, optimizer state)
  train_step: Callable[..., Any]  # (state, totals, images, labels) -> (state, totals)
  eval_step: Callable[..., Any]  # (state, images, labels, mask) -> [loss_sum, correct, count]
  params: Callable[[Any], Any]  # state -> the parameters, a pytree of arrays


def _batch_totals(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """[sum of losses, number correct, number of examples] of one batch."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  correct = (jnp.argmax(logits, -1) == labels.astype(jnp.int32)).astype(jnp.float32)
  if mask is None:
    mask = jnp.ones_like(losses)
  return jnp.stack([(losses * mask).sum(), (correct * mask).sum(), mask.sum()])


def _mean_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)).mean()


def _make_task(apply: Callable[[Any, jax.Array], jax.Array], params: Any, tx: optax.GradientTransformation) -> Task:
  """Both APIs: ``apply(params, images) -> logits``, stepped by :func:`jadam.make_train_step`.

  The step is jadam's: gradient, update and apply in one `jit`, parameters and
  optimizer state donated (the fused CPU kernel for jadam.adam/adamw).
  """

  def loss_fn(params, images, labels):
    logits = apply(params, images)
    return _mean_loss(logits, labels), _batch_totals(logits, labels)

  step = jadam.make_train_step(loss_fn, tx, has_aux=True)

  def train_step(state, totals, images, labels):
    params, opt_state, _, batch_totals = step(*state, images, labels)
    return (params, opt_state), totals + batch_totals

  @jax.jit
  def eval_step(state, images, labels, mask):
    return _batch_totals(apply(state[0], images), labels, mask)

  return Task((params, tx.init(params)), train_step, eval_step, lambda state: state[0])


def make_nnx_task(tx: optax.GradientTransformation, seed: int) -> Task:
  """NNX: the model split into its graph and its ``nnx.Param`` state, merged inside the loss."""
  graphdef, params = nnx.split(models.CNN(rngs=nnx.Rngs(seed)), nnx.Param)

  def apply(params, images):
    return nnx.merge(graphdef, params)(models.prepare(images))

  task = _make_task(apply, params, tx)
  return task._replace(params=lambda state: nnx.to_pure_dict(state[0]))


def make_linen_task(tx: optax.GradientTransformation, seed: int) -> Task:
  """Linen: the same CNN, ``module.apply`` on its ``params`` collection."""
  module = models.LinenCNN()
  params = module.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
  return _make_task(lambda params, images: module.apply({"params": params}, models.prepare(images)), params, tx)


def make_task(api: str, tx: optax.GradientTransformation, seed: int) -> Task:
  if api == "nnx":
    return make_nnx_task(tx, seed)
  if api == "linen":
    return make_linen_task(tx, seed)
  raise ValueError(f"api must be 'nnx' or 'linen', not {api!r}")


# ---------------------------------------------------------------------- loop


def evaluate(task: Task, state: Any, data: input_pipeline.Dataset, batch_size: int) -> dict[str, float]:
  """Loss and accuracy over every example of ``data`` (the last batch padded and masked)."""
  totals = jnp.zeros(3, jnp.float32)
  for images, labels, mask in input_pipeline.eval_batches(data, batch_size):
    totals = totals + task.eval_step(state, images, labels, mask)
  loss_sum, correct, count = np.asarray(totals, np.float64)
  return {"loss": loss_sum / count, "accuracy": correct / count}


def train_epoch(
  task: Task, state: Any, data: input_pipeline.Dataset, config: Config, epoch: int
) -> tuple[Any, dict[str, float]]:
  """One pass over the shuffled training set (order fixed by seed and epoch)."""
  steps = len(data) // config.batch_size
  bar = Progress(  # a bar on a terminal, else a line every few seconds
    input_pipeline.train_batches(data, config.batch_size, config.seed, epoch),
    total=steps,
    desc=f"epoch {epoch}/{config.epochs}",
    enabled=config.progress,
    file=sys.stderr,
  )
  totals = jnp.zeros(3, jnp.float32)
  for step, (images, labels) in enumerate(bar, 1):
    state, totals = task.train_step(state, totals, images, labels)
    if step % config.log_every == 0 and not bar.disable:
      loss_sum, correct, count = np.asarray(totals)
      bar.set_postfix(loss=f"{loss_sum / count:.4f}", accuracy=f"{correct / count:.4f}")
  bar.close()
  loss_sum, correct, count = np.asarray(totals, np.float64)  # waits for the last step
  if count == 0:
    raise ValueError(f"{len(data)} training examples give no batch of {config.batch_size}")
  return state, {"loss": loss_sum / count, "accuracy": correct / count, "images": int(count)}


def _latest_checkpoint(workdir: pathlib.Path) -> int | None:
  """The last epoch with a complete checkpoint (its state written: save_state renames it into place last)."""
  root = workdir / "checkpoints"
  epochs = [int(d.name) for d in root.iterdir() if d.name.isdigit() and (d / "state").is_dir()] if root.is_dir() else []
  return max(epochs, default=None)


def _save(workdir: pathlib.Path, epoch: int, state: Any, history: list[dict[str, Any]]) -> None:
  """``checkpoints/<epoch>/``: the history as JSON, then the state with :func:`jadam.save_state`."""
  folder = workdir / "checkpoints" / str(epoch)
  if folder.exists():  # an incomplete one, from a run killed while writing it
    shutil.rmtree(folder)
  folder.mkdir(parents=True)
  (folder / "history.json").write_text(json.dumps(history) + "\n")
  jadam.save_state(folder / "state", state)


def _restore(workdir: pathlib.Path, epoch: int, like: Any) -> tuple[Any, list[dict[str, Any]]]:
  """The state (checked against `like` leaf by leaf) and the history of epoch `epoch`."""
  folder = workdir / "checkpoints" / str(epoch)
  state = jadam.restore_state(folder / "state", like)
  return state, json.loads((folder / "history.json").read_text())


def _plot(history: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = [h["epoch"] for h in history]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (("train", "o-"), ("test", "s--")):
    ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
    ax_acc.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], style, label=split)
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
  ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
    ax.xaxis.get_major_locator().set_params(integer=True)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _describe(config: Config) -> str:
  hyper = "".join(f", {k}={v!r}" for k, v in config.hyperparameters.items())
  lr = "" if config.learning_rate is None else f"{config.learning_rate:g}"
  if config.lr_schedule != "constant":
    lr = f"{config.lr_schedule}({lr})"
  return f"{config.api}, jadam.{config.optimizer}({lr}{hyper}), batch {config.batch_size}, seed {config.seed}"


def epoch_line(epoch: int, epochs: int, record: dict[str, Any]) -> str:
  """The progress line of one epoch's history record (losses, accuracies, seconds, images/s)."""
  return (
    f"epoch {epoch:>2}/{epochs}: train loss {record['train_loss']:.4f}"
    f" accuracy {100 * record['train_accuracy']:.2f}% | test loss {record['test_loss']:.4f}"
    f" accuracy {100 * record['test_accuracy']:.2f}% | {record['seconds']:.1f} s,"
    f" {record['images_per_second']:,.0f} images/s"
  )


def train_and_evaluate(config: Config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Train, evaluating on the whole test set after every epoch.

  Writes to ``workdir``: ``metrics.json``, ``metrics.png`` and a checkpoint
  per epoch under ``checkpoints/<epoch>/`` (:func:`jadam.save_state`). With ``config.resume`` it
  continues from the last checkpoint and ends with the same parameters as an
  uninterrupted run.

  Returns:
    What ``metrics.json`` holds; ``"state"`` and ``"task"`` are added for callers.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  source = input_pipeline.load(config.data_dir, allow_download=config.download)
  train_data = source.train.take(config.train_limit)
  test_data = source.test.take(config.test_limit)

  learning_rate = config.learning_rate
  if config.lr_schedule == "cosine":
    if learning_rate is None:  # the optimizer's own default is the peak
      learning_rate = default_learning_rate(config.optimizer)
    if learning_rate is None:
      raise ValueError(f"--lr-schedule cosine needs --lr: {config.optimizer} has no default learning rate")
    learning_rate = cosine_schedule(learning_rate, config.epochs * (len(train_data) // config.batch_size))
  elif config.lr_schedule != "constant":
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {config.lr_schedule!r}")
  tx = make_optimizer(config.optimizer, learning_rate, config.hyperparameters)
  task = make_task(config.api, tx, config.seed)
  state, history, start = task.state, [], 0

  latest = _latest_checkpoint(workdir)
  if latest is not None and not config.resume:
    raise FileExistsError(
      f"{workdir / 'checkpoints'} holds checkpoints (epoch {latest}): pass --resume"
      " to continue from them, or choose another --workdir"
    )
  if latest is not None:
    state, history = _restore(workdir, latest, state)
    start = latest
    print(f"resumed from epoch {latest} in {workdir / 'checkpoints'}", flush=True)
    if config.lr_schedule == "cosine":
      print(f"(the cosine spans --epochs {config.epochs}: the same curve only if the first run had it too)", flush=True)

  print(
    f"MNIST ({source.origin}: {len(train_data)} train / {len(test_data)} test images"
    f" from {source.path}); {_describe(config)}; epochs {start + 1}..{config.epochs}",
    flush=True,
  )
  for epoch in range(start + 1, config.epochs + 1):
    t0 = time.perf_counter()
    state, train = train_epoch(task, state, train_data, config, epoch)
    train_seconds = time.perf_counter() - t0
    test = evaluate(task, state, test_data, config.eval_batch_size)
    seconds = time.perf_counter() - t0
    record = {
      "epoch": epoch,
      "train_loss": train["loss"],
      "train_accuracy": train["accuracy"],
      "test_loss": test["loss"],
      "test_accuracy": test["accuracy"],
      "seconds": seconds,
      "train_seconds": train_seconds,
      "images_per_second": train["images"] / train_seconds,
    }
    history.append(record)
    print(epoch_line(epoch, config.epochs, record), flush=True)
    _save(workdir, epoch, state, history)

  metrics = {
    "config": dataclasses.asdict(config),
    "data": {
      "origin": source.origin,
      "path": str(source.path),
      "train_examples": len(train_data),
      "test_examples": len(test_data),
    },
    "history": history,
    "test_accuracy": history[-1]["test_accuracy"] if history else math.nan,
    "test_loss": history[-1]["test_loss"] if history else math.nan,
  }
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  if config.plot and history:
    _plot(history, workdir / "metrics.png", f"MNIST CNN, {_describe(config)}")
  return {**metrics, "state": state, "task": task}
