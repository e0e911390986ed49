"""``python -m examples.mnist``: train Flax's MNIST CNN with jadam.

Examples:
  python -m examples.mnist                                   # jadam.adam, lr 1e-3 cosine-decayed, NNX
  python -m examples.mnist --lr-schedule constant            # jadam.adam(1e-3) as it is
  python -m examples.mnist --api linen --epochs 1
  python -m examples.mnist --optimizer adamw --lr 3e-3 --weight-decay 1e-2
  python -m examples.mnist --optimizer sgd --lr 0.1 --momentum 0.9
  python -m examples.mnist --optimizer muon                   # Muon (0.02) for the hidden 2-D weights, AdamW the rest
  python -m examples.mnist --data-dir ~/data/fashion-mnist   # any four IDX files
  python -m examples.mnist --workdir runs/a --resume
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any

from examples import _cli
from examples.mnist import train
from examples.mnist.configs import default


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _key_value(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
  return key.strip().replace("-", "_"), _value(value)


def parse_args(argv: list[str] | None = None) -> tuple[default.Config, str]:
  base = default.get_config()
  p = _cli.parser("python -m examples.mnist", __doc__, "Train Flax's MNIST CNN with a jadam optimizer.")
  p.add_argument("--api", choices=("nnx", "linen"), default=base.api, help="Flax's NNX or Linen model and step")
  p.add_argument(
    "--optimizer",
    default=base.optimizer,
    help="a jadam alias (adam, adamw, sgd, rmsprop, adagrad, ...) or a jadam.torch"
    " front door (Adam, AdamW, ...), by name (default %(default)s)",
  )
  p.add_argument(
    "--lr",
    "--learning-rate",
    type=float,
    default=None,
    help="learning rate (default: 1e-3 for adam; else the optimizer's own)",
  )
  p.add_argument(
    "--lr-schedule",
    choices=("constant", "cosine"),
    default=base.lr_schedule,
    help="cosine decay from --lr to 0 over --epochs (default), or constant",
  )
  hp = p.add_argument_group("optimizer hyperparameters (only those given are passed)")
  own = "(default: the optimizer's own)"
  hp.add_argument("--b1", type=float, help=f"first-moment decay {own}")
  hp.add_argument("--b2", type=float, help=f"second-moment decay {own}")
  hp.add_argument("--eps", type=float, help=f"the denominator's epsilon {own}")
  hp.add_argument("--weight-decay", type=float, help=f"weight decay {own}")
  hp.add_argument("--momentum", type=float, help=f"momentum, for sgd and rmsprop {own}")
  hp.add_argument("--amsgrad", action="store_true", default=None, help="AMSGrad's running maximum of v (default: off)")
  hp.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum, for sgd (default: off)")
  hp.add_argument(
    "--opt",
    metavar="NAME=VALUE",
    type=_key_value,
    action="append",
    default=[],
    help="any other argument of the optimizer, e.g. --opt centered=True (default: none)",
  )
  p.add_argument("--epochs", type=int, default=base.epochs, help="passes over the training set")
  p.add_argument("--batch-size", type=int, default=base.batch_size, help="training batch size")
  p.add_argument("--eval-batch-size", type=int, default=base.eval_batch_size, help="evaluation batch size")
  p.add_argument("--seed", type=int, default=base.seed, help="initialisation and shuffling seed")
  _cli.add_mnist_data_arguments(p, base.data_dir)
  p.add_argument("--workdir", default="workdir", help="metrics, plot and checkpoints; refused if it holds a run")
  p.add_argument(
    "--resume", action="store_true", help="continue from the last checkpoint in --workdir (default: a new run)"
  )
  p.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=base.progress,
    help="progress within each epoch (default: a bar on a terminal, else a line every few seconds)",
  )
  p.add_argument("--no-plot", dest="plot", action="store_false", help="write no metrics.png (default: write it)")
  p.add_argument("--train-limit", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--test-limit", type=int, default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)

  hyper = {
    name: getattr(a, name)
    for name in ("b1", "b2", "eps", "weight_decay", "momentum", "amsgrad", "nesterov")
    if getattr(a, name) is not None
  }
  hyper.update(a.opt)
  learning_rate = a.lr
  if learning_rate is None and a.optimizer == base.optimizer:
    learning_rate = base.learning_rate
  config = dataclasses.replace(
    base,
    api=a.api,
    optimizer=a.optimizer,
    learning_rate=learning_rate,
    lr_schedule=a.lr_schedule,
    hyperparameters=hyper,
    **_cli.mnist_run_fields(a),
  )
  return config, a.workdir


def main(argv: list[str] | None = None) -> None:
  config, workdir = parse_args(argv)
  metrics = train.train_and_evaluate(config, workdir)
  print(f"test accuracy {100 * metrics['test_accuracy']:.2f}%; metrics, plot and checkpoints in {workdir}")


if __name__ == "__main__":
  _cli.run("python -m examples.mnist", main)
