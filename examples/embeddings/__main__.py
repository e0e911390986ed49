"""``python -m examples.embeddings``: a word-level language model whose embedding table trains with SparseAdam.

Trains the same model twice from the same start and batches: the table with
``jadam.sparse_adam`` and the rest with ``jadam.adam`` (row-sparse gradients
from ``jadam.value_and_sparse_grad``), then with dense ``jadam.adam`` for
everything, and compares their validation perplexity. Offline: the corpus is
the Wikipedia sample that the ``gensim`` wheel ships as test data.

Examples:
  python -m examples.embeddings                        # both runs, 2 epochs
  python -m examples.embeddings --runs sparse --epochs 1
  python -m examples.embeddings --corpus my_text.txt   # one document a line
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from examples import _cli
from examples.embeddings import train


def parse_args(argv=None) -> tuple[train.Config, str]:
  base = train.Config()
  p = _cli.parser("python -m examples.embeddings", __doc__)
  p.add_argument("--corpus", default=None, help="a text file, one document a line (default: gensim's sample)")
  p.add_argument(
    "--runs",
    nargs="+",
    choices=("sparse", "dense"),
    default=list(base.runs),
    help="which runs, from the same start (default: sparse dense)",
  )
  p.add_argument("--epochs", type=int, default=base.epochs, help="passes over the training windows")
  p.add_argument("--lr", type=float, default=base.learning_rate, help="learning rate of every optimizer")
  p.add_argument("--dim", type=int, default=base.dim, help="embedding width")
  p.add_argument("--hidden", type=int, default=base.hidden, help="hidden layer width")
  p.add_argument("--batch-size", type=int, default=base.batch_size, help="training batch size")
  p.add_argument("--context", type=int, default=base.context, help="context words per prediction")
  p.add_argument("--min-count", type=int, default=base.min_count, help="rarer words share one row")
  p.add_argument("--shortlist", type=int, default=base.shortlist, help="output classes (frequent words + <unk>)")
  p.add_argument("--seed", type=int, default=base.seed, help="initialisation and batch-order seed")
  p.add_argument("--eval-every", type=int, default=base.eval_every, help="steps between validation evaluations")
  p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (default: none)")
  p.add_argument("--workdir", default=None, help="metrics.json, metrics.png (default: workdir/embeddings-<time>)")
  p.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=base.progress,
    help="progress within each run (default: a bar on a terminal, else a line every few seconds)",
  )
  a = p.parse_args(argv)
  config = dataclasses.replace(
    base,
    corpus=a.corpus,
    runs=tuple(a.runs),
    epochs=a.epochs,
    learning_rate=a.lr,
    dim=a.dim,
    hidden=a.hidden,
    batch_size=a.batch_size,
    context=a.context,
    min_count=a.min_count,
    shortlist=a.shortlist,
    seed=a.seed,
    eval_every=a.eval_every,
    max_steps=a.max_steps,
    progress=a.progress,
  )
  return config, a.workdir or time.strftime("workdir/embeddings-%Y%m%d-%H%M%S")


def main(argv=None) -> None:
  config, workdir = parse_args(argv)
  metrics = train.train_and_evaluate(config, workdir)
  for kind, run in metrics["runs"].items():
    print(f"{kind:>6}: {run['optimizer']}: validation perplexity {run['valid_perplexity']:.1f}")
  print(f"wrote {workdir}/metrics.json and {workdir}/metrics.png")


if __name__ == "__main__":
  _cli.run("python -m examples.embeddings", main)
