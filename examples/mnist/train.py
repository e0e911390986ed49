"""Train Flax's MNIST CNN with a jadam optimizer, in Flax NNX or Linen.

The two APIs differ only in :func:`make_task`: each gives a pytree ``state``
(the model and optimizer state) and jitted ``train_step``/``eval_step``
functions of it. The data, the loop, the metrics, the checkpoints and the
plot are shared.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

from examples.mnist import input_pipeline, models
from examples.mnist.configs.default import Config

# ---------------------------------------------------------------- optimizer


def _optimizer_namespaces() -> list[Any]:
  import jadam

  spaces = [jadam]
  try:
    import jadam.torch as jadam_torch  # the torch-named front doors, when present
  except ImportError:
    pass
  else:
    spaces.append(jadam_torch)
  return spaces


def optimizer_names() -> list[str]:
  """The names ``--optimizer`` accepts: jadam's aliases and jadam.torch's front doors.

  An alias is a public function of ``jadam`` that takes a learning rate and
  is not a single stage (``scale_by_*``); everything callable that
  ``jadam.torch`` exports is a front door.
  """
  names = []
  for i, space in enumerate(_optimizer_namespaces()):
    for name in getattr(space, "__all__", [n for n in dir(space) if not n.startswith("_")]):
      obj = getattr(space, name, None)
      if i > 0 and callable(obj):
        names.append(name)
      elif inspect.isfunction(obj) and not name.startswith("scale_by"):
        params = inspect.signature(obj).parameters
        if "learning_rate" in params or "lr" in params:
          names.append(name)
  return names


def default_learning_rate(name: str) -> float | None:
  """The default ``learning_rate`` (or ``lr``) of optimizer ``name``, if it has a number for one."""
  if name not in optimizer_names():
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(optimizer_names())}")
  fn = next(getattr(s, name) for s in _optimizer_namespaces() if hasattr(s, name))
  params = inspect.signature(fn).parameters
  default = next((params[p].default for p in ("learning_rate", "lr") if p in params), None)
  return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def make_optimizer(
  name: str, learning_rate: float | None = None, hyperparameters: dict[str, Any] | None = None
) -> optax.GradientTransformation:
  """``getattr(jadam, name)`` (or ``jadam.torch``'s), called with the hyperparameters.

  The learning rate goes to the optimizer's ``learning_rate`` or ``lr``; ``b1``
  and ``b2`` become ``betas`` for an optimizer that takes betas (a torch front
  door). Any other hyperparameter must be one of the optimizer's own arguments.

  Raises:
    ValueError: For an unknown name or a hyperparameter the optimizer lacks.
  """
  if name not in optimizer_names():
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(optimizer_names())}")
  fn = next(getattr(s, name) for s in _optimizer_namespaces() if hasattr(s, name))
  params = inspect.signature(fn).parameters
  accepted = [p for p in params if p not in ("self", "params")]
  kwargs: dict[str, Any] = {}
  lr_name = next((p for p in ("learning_rate", "lr") if p in params), None)
  if learning_rate is not None:
    if lr_name is None:
      raise ValueError(f"{name} takes no learning rate (it takes {accepted})")
    kwargs[lr_name] = learning_rate
  elif lr_name is not None and params[lr_name].default is inspect.Parameter.empty:
    raise ValueError(f"{name} needs a learning rate (--lr)")
  hyper = dict(hyperparameters or {})
  if ("b1" in hyper or "b2" in hyper) and "betas" in params and "b1" not in params:
    default = params["betas"].default
    b1, b2 = default if default is not inspect.Parameter.empty else (0.9, 0.999)
    kwargs["betas"] = (hyper.pop("b1", b1), hyper.pop("b2", b2))
  for key, value in hyper.items():
    if key not in params:
      raise ValueError(f"{name} takes no {key!r}; it takes {accepted}")
    kwargs[key] = value
  tx = fn(**kwargs)
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"{name}(...) gave a {type(tx).__name__}, not an optax transformation")
  return tx


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

  state: Any  # initial state: params, optimizer state, step
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


def make_nnx_task(tx: optax.GradientTransformation, seed: int) -> Task:
  """NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``optimizer.update``.

  The jitted steps take the split state, merge it, and split it again
  (``jax.jit`` with ``nnx.split``/``nnx.merge``), which costs less per call
  than ``nnx.jit`` on the objects.
  """
  model = models.CNN(rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(state, totals, images, labels):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(models.prepare(images))
      return _mean_loss(logits, labels), logits

    (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), totals + _batch_totals(logits, labels)

  @jax.jit
  def eval_step(state, images, labels, mask):
    model, _ = nnx.merge(graphdef, state)
    return _batch_totals(model(models.prepare(images)), labels, mask)

  def params(state):
    model, _ = nnx.merge(graphdef, state)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  return Task(state, train_step, eval_step, params)


def make_linen_task(tx: optax.GradientTransformation, seed: int) -> Task:
  """Linen: the same CNN, with ``flax.training.train_state.TrainState``."""
  module = models.LinenCNN()
  variables = module.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1), jnp.float32))
  state = train_state.TrainState.create(apply_fn=module.apply, params=variables["params"], tx=tx)
  state = state.replace(step=jnp.zeros((), jnp.int32))  # an array, as after a step

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(state, totals, images, labels):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, models.prepare(images))
      return _mean_loss(logits, labels), logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), totals + _batch_totals(logits, labels)

  @jax.jit
  def eval_step(state, images, labels, mask):
    logits = state.apply_fn({"params": state.params}, models.prepare(images))
    return _batch_totals(logits, labels, mask)

  return Task(state, train_step, eval_step, lambda state: state.params)


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
  from tqdm.auto import tqdm

  steps = len(data) // config.batch_size
  disable = None if config.progress is None else not config.progress
  bar = tqdm(
    input_pipeline.train_batches(data, config.batch_size, config.seed, epoch),
    total=steps,
    desc=f"epoch {epoch}/{config.epochs}",
    unit="step",
    disable=disable,
    file=sys.stderr,
    leave=False,
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


def _checkpoint_manager(workdir: pathlib.Path):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _save(manager, epoch: int, state: Any, history: list[dict[str, Any]]) -> None:
  import orbax.checkpoint as ocp

  # The state's leaves as a list: one format for NNX's State and Linen's
  # TrainState; restore rebuilds the tree from a freshly made one.
  leaves = jax.tree.leaves(state)
  manager.save(
    epoch,
    args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), history=ocp.args.JsonSave(history)),
  )
  manager.wait_until_finished()


def _restore(manager, epoch: int, like: Any) -> tuple[Any, list[dict[str, Any]]]:
  import orbax.checkpoint as ocp

  leaves, treedef = jax.tree.flatten(like)
  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  restored = manager.restore(
    epoch,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()),
  )
  return jax.tree.unflatten(treedef, list(restored["state"])), list(restored["history"])


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


def train_and_evaluate(config: Config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Train, evaluating on the whole test set after every epoch.

  Writes to ``workdir``: ``metrics.json``, ``metrics.png`` and an orbax
  checkpoint per epoch under ``checkpoints/``. With ``config.resume`` it
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

  manager = _checkpoint_manager(workdir)
  latest = manager.latest_step()
  if latest is not None and not config.resume:
    raise FileExistsError(
      f"{workdir / 'checkpoints'} holds checkpoints (epoch {latest}): pass --resume"
      " to continue from them, or choose another --workdir"
    )
  if latest is not None:
    state, history = _restore(manager, latest, state)
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
    print(
      f"epoch {epoch:>2}/{config.epochs}: train loss {train['loss']:.4f}"
      f" accuracy {100 * train['accuracy']:.2f}% | test loss {test['loss']:.4f}"
      f" accuracy {100 * test['accuracy']:.2f}% | {seconds:.1f} s,"
      f" {record['images_per_second']:,.0f} images/s",
      flush=True,
    )
    _save(manager, epoch, state, history)

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
  manager.close()
  return {**metrics, "state": state, "task": task}
