"""Sweep one optimizer's hyperparameters on MNIST, every configuration in one vmapped program.

The model and the data come from :mod:`examples.mnist`. The last
``val_fraction`` of the training set is held out for validation: early
stopping, the plateau rule and the choice of the best configuration read the
validation loss; the test set is only reported.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam
from examples._progress import Progress
from examples.mnist import input_pipeline, models, optimizers
from examples.tune.configs.default import Config

# The example's hyperparameter names -> the optimizer's own (b1, b2 may become torch's betas).
HYPERPARAMETERS = ("lr", "b1", "b2", "eps", "weight_decay")


def optimizer_grid(config: Config) -> dict[str, list[Any]]:
  """``config.grid`` under the optimizer's own argument names (``learning_rate`` or ``lr``, ``betas``...)."""
  name = config.optimizer
  factory = optimizers.get(name)
  grid: dict[str, list[Any]] = {}
  for key, values in config.grid.items():
    if key not in HYPERPARAMETERS:
      raise ValueError(f"unknown hyperparameter {key!r}; the sweep takes {', '.join(HYPERPARAMETERS)}")
    values = [float(v) for v in values]
    if key == "lr":
      lr = optimizers.lr_name(name)
      if lr is None:
        raise ValueError(f"{name} takes no learning rate")
      grid[lr] = values
    elif key in ("b1", "b2") and optimizers.takes_betas(name):
      continue  # below, as pairs
    else:
      grid[key] = values
  if optimizers.takes_betas(name) and ("b1" in config.grid or "b2" in config.grid):
    import inspect

    b1, b2 = inspect.signature(factory).parameters["betas"].default
    pairs = [(float(x), float(y)) for x in config.grid.get("b1", [b1]) for y in config.grid.get("b2", [b2])]
    grid["betas"] = pairs
  if not grid:
    raise ValueError("nothing to sweep: give at least one of --lr, --b1, --b2, --eps, --weight-decay")
  return grid


def make_model(name: str, seed: int, **module_kwargs: Any) -> tuple[Any, Any]:
  """``(apply, params)``: a pure ``apply(params, images) -> logits`` and the initial parameters."""
  try:
    module = models.LINEN_MODELS[name](**module_kwargs)
  except KeyError:
    raise ValueError(f"model must be one of {', '.join(models.LINEN_MODELS)}; got {name!r}") from None
  params = module.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]

  def apply(params, images):
    return module.apply({"params": params}, models.prepare(images))

  return apply, params


def _totals(logits, labels, mask):
  """[sum of losses, number correct, number of examples] of one batch."""
  labels = labels.astype(jnp.int32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.stack([(losses * mask).sum(), (correct * mask).sum(), mask.sum()])


def make_steps(apply, tx: optax.GradientTransformation):
  """A jadam train step over every configuration at once and a jitted evaluation step.

  The loss of the stacked parameters is the sum of each configuration's mean
  batch loss: its gradient with respect to configuration c's parameters is
  configuration c's own gradient, so :func:`jadam.make_train_step` trains all
  of them in one compiled step.
  """
  per_config = jax.vmap(apply, in_axes=(0, None))

  def loss_fn(params, images, labels):
    logits = per_config(params, images)
    losses = jax.vmap(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels.astype(jnp.int32)).mean())(
      logits
    )
    return losses.sum(), losses

  train_step = jadam.make_train_step(loss_fn, tx, has_aux=True)

  @jax.jit
  def eval_step(params, images, labels, mask):
    return jax.vmap(lambda lg: _totals(lg, labels, mask))(per_config(params, images))

  return train_step, eval_step


def evaluate(eval_step, params, data: input_pipeline.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per configuration: mean loss and accuracy over every example of `data`."""
  totals = None
  for images, labels, mask in input_pipeline.eval_batches(data, batch_size):
    out = eval_step(params, images, labels, mask)
    totals = out if totals is None else totals + out
  totals = np.asarray(totals, np.float64)
  return totals[:, 0] / totals[:, 2], totals[:, 1] / totals[:, 2]


def split(train: input_pipeline.Dataset, val_fraction: float) -> tuple[input_pipeline.Dataset, input_pipeline.Dataset]:
  """The training set without its last ``val_fraction``, and that last part (the validation set)."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
  n_val = max(1, int(round(len(train) * val_fraction)))
  n = len(train) - n_val
  return (
    input_pipeline.Dataset(train.images[:n], train.labels[:n]),
    input_pipeline.Dataset(train.images[n:], train.labels[n:]),
  )


def make_sweep(config: Config, configs: list[dict[str, Any]], steps_per_epoch: int) -> jadam.Sweep:
  factory = optimizers.get(config.optimizer)
  if config.extra:
    factory = functools.partial(factory, **config.extra)
  plateau = None
  if config.plateau_patience is not None:
    plateau = jadam.torch.ReduceLROnPlateau(lr=1.0, patience=config.plateau_patience, factor=config.plateau_factor)
  stopping = None if config.patience is None else jadam.early_stopping(patience=config.patience)
  return jadam.sweep(factory, configs=configs, plateau=plateau, early_stopping=stopping)


def train_configs(
  config: Config,
  configs: list[dict[str, Any]],
  data: dict[str, input_pipeline.Dataset],
  workdir: pathlib.Path | None = None,
  log: bool = True,
) -> dict[str, Any]:
  """Train `configs` together (one sweep) and evaluate them; the sequential mode calls it once per config."""
  steps = len(data["train"]) // config.batch_size
  if steps == 0:
    raise ValueError(f"{len(data['train'])} training examples give no batch of {config.batch_size}")
  sweep = make_sweep(config, configs, steps)
  n = len(sweep.configs)
  apply, params = make_model(config.model, config.seed)
  params = jax.tree.map(jnp.array, sweep.broadcast(params))  # own buffers: the step donates them
  state = sweep.tx.init(params)
  train_step, eval_step = make_steps(apply, sweep.tx)
  val_loss = [[] for _ in range(n)]
  val_acc = [[] for _ in range(n)]
  stopped = [None] * n
  seconds = []
  for epoch in range(1, config.epochs + 1):
    if all(s is not None for s in stopped):
      break
    t0 = time.perf_counter()
    batches = input_pipeline.train_batches(data["train"], config.batch_size, config.seed, epoch)
    for images, labels in Progress(batches, steps, f"epoch {epoch}/{config.epochs}", enabled=config.progress and log):
      params, state, _, _ = train_step(params, state, images, labels)
    jax.block_until_ready(params)
    seconds.append(time.perf_counter() - t0)
    loss, acc = evaluate(eval_step, params, data["val"], config.eval_batch_size)
    state = sweep.observe(state, jnp.asarray(loss, jnp.float32))
    stopped_epoch = (
      np.asarray(state.stopping.stopped_epoch) if isinstance(state.stopping, jadam.EarlyStoppingState) else None
    )
    for i in range(n):
      if stopped[i] is None:
        val_loss[i].append(float(loss[i]))
        val_acc[i].append(float(acc[i]))
        if stopped_epoch is not None and stopped_epoch[i] > 0:
          stopped[i] = int(stopped_epoch[i])
    if workdir is not None:  # the last epoch's parameters and sweep state (restore_state reads them back)
      jadam.save_state(workdir / "checkpoints" / f"epoch_{epoch}", {"params": params, "state": state})
      shutil.rmtree(workdir / "checkpoints" / f"epoch_{epoch - 1}", ignore_errors=True)
    if log:
      running = sum(s is None for s in stopped)
      print(
        f"epoch {epoch:>2}/{config.epochs}: {seconds[-1]:.1f} s for {n} configurations;"
        f" best val loss {np.nanmin(loss):.4f}, best val accuracy {100 * np.nanmax(acc):.2f}%;"
        f" {running} still running",
        flush=True,
      )
  _, test_acc = evaluate(eval_step, params, data["test"], config.eval_batch_size)
  lr = optimizers.lr_name(config.optimizer)
  final_lr = np.asarray(state.inner.hyperparams[lr]) if lr in state.inner.hyperparams else None
  return {
    "configs": sweep.configs,
    "val_loss": val_loss,
    "val_accuracy": val_acc,
    "stopped_epoch": stopped,
    "test_accuracy": [float(a) for a in test_acc],
    "final_lr": None if final_lr is None else [float(x) for x in final_lr],
    "seconds_per_epoch": seconds,
    "params": params,
    "state": state,
  }


def _short(config: dict[str, Any]) -> str:
  return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def table(results: dict[str, Any], best: int) -> str:
  """The configurations ranked by final validation loss."""
  rows = sorted(range(len(results["configs"])), key=lambda i: _final(results["val_loss"][i]))
  names = list(results["configs"][0])
  head = ["rank", *names, "val loss", "val acc %", "stopped", "test acc %"]
  lines = []
  for rank, i in enumerate(rows, 1):
    c = results["configs"][i]
    cells = [str(rank), *(str(c[k]) for k in names)]
    cells += [
      f"{_final(results['val_loss'][i]):.4f}",
      f"{100 * results['val_accuracy'][i][-1]:.2f}",
      "-" if results["stopped_epoch"][i] is None else str(results["stopped_epoch"][i]),
      f"{100 * results['test_accuracy'][i]:.2f}" + (" *" if i == best else ""),
    ]
    lines.append(cells)
  widths = [max(len(h), *(len(r[j]) for r in lines)) for j, h in enumerate(head)]

  def fmt(cells):
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

  return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def _final(losses: list[float]) -> float:
  return losses[-1] if losses and math.isfinite(losses[-1]) else math.inf


def plot(results: dict[str, Any], path: pathlib.Path, title: str, best: int | None = None) -> None:
  """What the table ranks by, final validation loss, over the two widest axes (the lowest over the other axes),
  each configuration's curve, and the chosen configuration `best` marked in both."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  configs = results["configs"]
  names = sorted(configs[0], key=lambda k: -len({str(c[k]) for c in configs}))
  axes = names[:2] if len(names) >= 2 else names + [None]
  xs = sorted({c[axes[0]] for c in configs}, key=lambda v: str(v) if isinstance(v, tuple) else v)
  ys = sorted({c[axes[1]] for c in configs}, key=lambda v: str(v) if isinstance(v, tuple) else v) if axes[1] else [None]
  grid = np.full((len(ys), len(xs)), np.nan)

  def cell(c):  # (row, column) of configuration c in the map
    return (ys.index(c[axes[1]]) if axes[1] else 0, xs.index(c[axes[0]]))

  for i, c in enumerate(configs):
    final = _final(results["val_loss"][i])
    grid[cell(c)] = np.nanmin([grid[cell(c)], final if math.isfinite(final) else np.nan])
  fig, (ax_map, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.8))
  im = ax_map.imshow(grid, cmap="viridis_r", origin="lower", aspect="auto")  # yellow: lowest loss
  for (y, x), v in np.ndenumerate(grid):
    ax_map.text(x, y, f"{v:.4f}", ha="center", va="center", color="k" if v < np.nanmean(grid) else "w", fontsize=9)
  if best is not None:
    y, x = cell(configs[best])
    ax_map.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax_map.text(x, y + 0.3, "chosen", ha="center", va="center", color="red", fontsize=8, fontweight="bold")
  ax_map.set_xticks(range(len(xs)), [str(v) for v in xs])
  ax_map.set_yticks(range(len(ys)), [str(v) for v in ys])
  ax_map.set(
    xlabel=axes[0], ylabel=axes[1] or "", title="final validation loss (ranks the table), lowest over other axes"
  )
  fig.colorbar(im, ax=ax_map)
  # One colour per value of the widest axis, so that 24 curves stay readable.
  colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(xs)))
  for i, c in enumerate(configs):
    losses = results["val_loss"][i]
    style = "-" if results["stopped_epoch"][i] is None else ":"
    x = xs.index(c[axes[0]])
    label = (
      f"{axes[0]}={c[axes[0]]}" if i == min(j for j, d in enumerate(configs) if d[axes[0]] == c[axes[0]]) else None
    )
    ax_curve.plot(range(1, len(losses) + 1), losses, style, marker="o", ms=3, alpha=0.7, color=colours[x], label=label)
    if i == best:
      ax_curve.plot(range(1, len(losses) + 1), losses, "-", color="red", lw=2.5, zorder=3, label=f"chosen: {_short(c)}")
  ax_curve.legend(fontsize=8)
  ax_curve.set(xlabel="epoch", ylabel="validation loss", title="validation loss (dotted: stopped early)")
  ax_curve.set_yscale("log")
  ax_curve.grid(alpha=0.3)
  ax_curve.xaxis.get_major_locator().set_params(integer=True)
  if len(configs) <= 24:
    ax_curve.legend(fontsize=6, ncol=2 if len(configs) > 8 else 1)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _title(out: dict[str, Any]) -> str:
  """What ran, and on which data: the shipped sample or the full MNIST (from --data-dir, the cache or a download)."""
  data = out["data"]
  origins = {"sample": "the shipped MNIST sample", "data_dir": "MNIST from --data-dir", "download": "MNIST, downloaded"}
  origin = origins.get(data["origin"], f"MNIST from the {data['origin']}")
  epochs = out["settings"]["epochs"]
  return (
    f"{out['model']}, {out['optimizer']}, {epochs} epochs, {out['mode']}; {origin}:"
    f" {data['train_examples']} train / {data['val_examples']} validation images"
  )


def replot(sweep_json: str | pathlib.Path, png: str | pathlib.Path) -> None:
  """Draw a previous run's ``sweep.png`` again from its ``sweep.json`` (no training)."""
  out = json.loads(pathlib.Path(sweep_json).read_text())
  keys = ("val_loss", "val_accuracy", "stopped_epoch", "test_accuracy")
  results = {k: [c[k] for c in out["configs"]] for k in keys}
  results["configs"] = [{k: c[k] for k in out["hyperparameters"]} for c in out["configs"]]
  plot(results, pathlib.Path(png), _title(out), best=out["best"])


def load_data(config: Config) -> tuple[dict[str, input_pipeline.Dataset], input_pipeline.Source]:
  source = input_pipeline.load(config.data_dir, allow_download=config.download)
  train, val = split(source.train.take(config.train_limit), config.val_fraction)
  return {"train": train, "val": val, "test": source.test.take(config.test_limit)}, source


def sweep_and_evaluate(config: Config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Run the sweep, write ``sweep.json``, ``sweep.png`` and checkpoints to `workdir`, print the ranked table.

  Returns:
    What ``sweep.json`` holds, plus ``"results"`` (with the final parameters and state).
  """
  workdir = pathlib.Path(workdir)
  previous = [n for n in ("sweep.json", "checkpoints", "config_0") if (workdir / n).exists()]
  if previous:  # before training: orbax would refuse to write over the checkpoints only at the end
    raise FileExistsError(f"{workdir} holds a previous sweep ({', '.join(previous)}): pass a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  data, source = load_data(config)
  configs = jadam.sweep_grid(optimizer_grid(config))
  if config.model == "cnn" and not config.sequential and len(configs) > 1 and jax.default_backend() == "cpu":
    print(
      "warning: a vmapped CNN sweep on CPU is far slower than --sequential (XLA:CPU runs the vmapped convolutions"
      " as grouped ones, with no fast path: 23x in benchmarks.sweep)",
      file=sys.stderr,
      flush=True,
    )
  mode = "one after another" if config.sequential else "all at once (vmapped)"
  print(
    f"MNIST ({source.origin}: {len(data['train'])} train / {len(data['val'])} validation /"
    f" {len(data['test'])} test images); {config.model}, {config.optimizer}, {len(configs)} configurations"
    f" {mode}, {config.epochs} epochs, batch {config.batch_size}",
    flush=True,
  )
  t0 = time.perf_counter()
  if config.sequential:
    parts = []
    for i, c in enumerate(configs):
      print(f"configuration {i + 1}/{len(configs)}: {_short(c)}", flush=True)
      parts.append(train_configs(config, [c], data, workdir / f"config_{i}" if config.checkpoint else None))
    results = {k: [x for p in parts for x in p[k]] for k in ("configs", "val_loss", "val_accuracy", "stopped_epoch")}
    results["test_accuracy"] = [x for p in parts for x in p["test_accuracy"]]
    results["final_lr"] = [x for p in parts for x in (p["final_lr"] or [None])]
    # one epoch of every configuration; one that stopped early takes no time in the epochs after
    per_epoch = itertools.zip_longest(*(p["seconds_per_epoch"] for p in parts), fillvalue=0.0)
    results["seconds_per_epoch"] = [float(np.sum(s)) for s in per_epoch]
    results["params"] = [p["params"] for p in parts]
  else:
    results = train_configs(config, configs, data, workdir if config.checkpoint else None)
  seconds = time.perf_counter() - t0
  best = min(range(len(configs)), key=lambda i: _final(results["val_loss"][i]))
  out = {
    "optimizer": config.optimizer,
    "model": config.model,
    "mode": "sequential" if config.sequential else "vmapped",
    "data": {
      "origin": source.origin,
      "train_examples": len(data["train"]),
      "val_examples": len(data["val"]),
      "test_examples": len(data["test"]),
    },
    "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("grid",)},
    "hyperparameters": list(configs[0]),  # the swept names: keys of each entry of "configs"
    "configs": [
      {
        **c,
        "val_loss": results["val_loss"][i],
        "val_accuracy": results["val_accuracy"][i],
        "stopped_epoch": results["stopped_epoch"][i],
        "test_accuracy": results["test_accuracy"][i],
        "final_lr": results["final_lr"][i] if results["final_lr"] else None,
      }
      for i, c in enumerate(configs)
    ],
    "best": best,
    "seconds": seconds,
    "seconds_per_epoch": results["seconds_per_epoch"],
  }
  (workdir / "sweep.json").write_text(json.dumps(out, indent=2) + "\n")
  print(table(results, best))
  b = out["configs"][best]
  print(
    f"best on validation loss: {_short(configs[best])}: test accuracy {100 * b['test_accuracy']:.2f}%;"
    f" {seconds:.0f} s in all; sweep.json, sweep.png in {workdir}",
    flush=True,
  )
  if config.plot:
    plot(results, workdir / "sweep.png", _title(out), best=best)
  return {**out, "results": results}
