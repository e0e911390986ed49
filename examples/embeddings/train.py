r"""Train a neural language model with SparseAdam for its embedding table, Adam for the rest; compare with dense Adam.

The model (Bengio et al., 2003): the embeddings of the previous `context`
words, concatenated, through a hidden layer, to a softmax over a shortlist of
the most frequent words and <unk> (Schwenk, 2007), so that the table is the
largest parameter. Two runs from the same initialisation and batches:

- ``sparse``: the table (:math:`V \times d`) with :func:`jadam.sparse_adam`,
  its gradient taken row-sparse by :func:`jadam.value_and_sparse_grad` (the
  dense :math:`V \times d` gradient is never formed), the hidden and output
  layers with :func:`jadam.adam`, in one `optax.partition` and one jitted step;
- ``dense``: :func:`jadam.adam` for every parameter (rows a batch does not
  touch still decay their moments and move).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jadam
from examples._progress import Progress
from examples.embeddings import input_pipeline

TABLE = "embed/embedding"


@dataclasses.dataclass
class Config:
  corpus: str | None = None  # default: gensim's head500.noblanks.cor
  context: int = 4
  min_count: int = 2
  shortlist: int = 2000  # output classes: the most frequent words, and <unk> for the rest
  dim: int = 64
  hidden: int = 128
  batch_size: int = 256
  epochs: int = 2
  learning_rate: float = 2e-3
  seed: int = 0
  eval_every: int = 500
  runs: tuple[str, ...] = ("sparse", "dense")
  max_steps: int | None = None  # stop early (tests)
  progress: bool | None = None  # None: a bar on a terminal, else a line every few seconds


class LanguageModel(nnx.Module):
  def __init__(self, vocab: int, context: int, dim: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.hidden = nnx.Linear(context * dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, context_ids: jax.Array) -> jax.Array:
    x = self.embed(context_ids)  # (batch, context, dim)
    x = x.reshape(x.shape[0], -1)
    return self.out(jnp.tanh(self.hidden(x)))


def _loss(graphdef, params, ids, batch):
  logits = nnx.merge(graphdef, params)(ids[TABLE])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, -1]).mean()


def make_run(kind: str, graphdef, params, lr: float):
  """`(tx, step)` for a run: step(params, state, batch) -> (params, state, loss), params and state donated."""
  if kind == "sparse":
    labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "table" if jadam.torch.path_string(p) == TABLE else "rest", params
    )
    tx = optax.partition({"table": jadam.sparse_adam(lr), "rest": jadam.adam(lr)}, labels)
    grad_fn = jadam.value_and_sparse_grad(functools.partial(_loss, graphdef))

    def step(params, state, batch):
      loss, grads = grad_fn(params, {TABLE: batch[:, :-1]}, batch)  # the table's gradient: a BCOO
      params, state = jadam.update_and_apply(tx, grads, state, params)
      return params, state, loss

  elif kind == "dense":
    tx = jadam.adam(lr)
    grad_fn = jax.value_and_grad(lambda p, batch: _loss(graphdef, p, {TABLE: batch[:, :-1]}, batch))

    def step(params, state, batch):
      loss, grads = grad_fn(params, batch)
      params, state = jadam.update_and_apply(tx, grads, state, params)
      return params, state, loss

  else:
    raise ValueError(f"unknown run {kind!r}: choose 'sparse' or 'dense'")
  return tx, jax.jit(step, donate_argnums=(0, 1))


def evaluate(graphdef, params, data: np.ndarray, batch_size: int = 1024) -> float:
  """Mean cross-entropy (nats) over `data`."""

  @jax.jit
  def total(params, batch, mask):
    logits = nnx.merge(graphdef, params)(batch[:, :-1])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, -1]) * mask).sum()

  s = 0.0
  for i in range(0, len(data), batch_size):
    chunk = data[i : i + batch_size]
    mask = np.zeros(batch_size, np.float32)
    mask[: len(chunk)] = 1.0
    chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
    s += float(total(params, chunk, mask))  # one compiled shape: the last chunk is padded and masked
  return s / len(data)


def _plot(histories: dict[str, Any], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for kind, h in histories.items():
    ax1.plot(h["train_step"], h["train_loss"], label=f"{kind}: train")
    ax2.plot(h["eval_step"], h["valid_ppl"], marker="o", label=f"{kind}: validation")
  ax1.set(xlabel="step", ylabel="cross-entropy (nats)", title="training loss (smoothed)")
  ax2.set(xlabel="step", ylabel="perplexity", title="validation perplexity", yscale="log")
  for ax in (ax1, ax2):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train_and_evaluate(config: Config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs each of `config.runs`; writes ``metrics.json`` and ``metrics.png`` to `workdir` and returns the metrics."""
  workdir = pathlib.Path(workdir)
  if (workdir / "metrics.json").exists():  # before training, not after
    raise FileExistsError(f"{workdir} holds a previous run's metrics.json: pass a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  corpus = pathlib.Path(config.corpus) if config.corpus else input_pipeline.default_corpus()
  data = input_pipeline.load(corpus, context=config.context, min_count=config.min_count, shortlist=config.shortlist)
  vocab = len(data.vocab)
  classes = min(config.shortlist, vocab)
  print(
    f"{corpus.name}: {len(data.train):,} training windows, {len(data.valid):,} held out;"
    f" table {vocab:,} x {config.dim}, {classes:,} output classes"
  )
  model = LanguageModel(vocab, config.context, config.dim, config.hidden, classes, rngs=nnx.Rngs(config.seed))
  graphdef, params0 = nnx.split(model, nnx.Param)
  steps_per_epoch = len(data.train) // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)

  metrics: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "corpus": str(corpus),
    "vocabulary": vocab,
    "table_shape": [vocab, config.dim],
    "output_classes": classes,
    "runs": {},
  }
  for kind in config.runs:
    tx, step = make_run(kind, graphdef, params0, config.learning_rate)
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    rng = np.random.default_rng(config.seed)  # the same batches for every run
    history = {"train_step": [], "train_loss": [], "eval_step": [], "valid_ppl": []}
    smooth, t, times = None, 0, []
    bar = Progress(None, total_steps, kind, enabled=config.progress)  # a bar on a terminal, else a line every few s
    while t < total_steps:
      for batch in input_pipeline.batches(data.train, config.batch_size, rng):
        t0 = time.perf_counter()
        params, state, loss = step(params, state, batch)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        t += 1
        smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
        if t % 20 == 0:
          history["train_step"].append(t)
          history["train_loss"].append(smooth)
        if t % config.eval_every == 0 or t == total_steps:
          ppl = math.exp(evaluate(graphdef, params, data.valid))
          history["eval_step"].append(t)
          history["valid_ppl"].append(ppl)
          bar.set_postfix(loss=f"{smooth:.3f}", valid_ppl=f"{ppl:.1f}")
        bar.update(1)
        if t >= total_steps:
          break
    bar.close()
    valid_loss = evaluate(graphdef, params, data.valid)
    metrics["runs"][kind] = {
      "optimizer": "jadam.sparse_adam (table) + jadam.adam (rest)" if kind == "sparse" else "jadam.adam (all)",
      "steps": t,
      "valid_loss": valid_loss,
      "valid_perplexity": math.exp(valid_loss),
      "train_loss_smoothed": smooth,
      "step_ms_median": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
      "history": history,
    }
    print(f"{kind}: validation perplexity {math.exp(valid_loss):.1f} after {t} steps")

  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  _plot(
    {k: v["history"] for k, v in metrics["runs"].items()},
    workdir / "metrics.png",
    f"NPLM on {corpus.name}, table {vocab:,} x {config.dim}",
  )
  return metrics
