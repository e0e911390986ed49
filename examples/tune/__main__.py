"""``python -m examples.tune``: sweep an optimizer's hyperparameters on MNIST, every configuration at once.

Examples:
  python -m examples.tune                                         # adam: lr x b1 x b2 = 3 x 2 x 2, MLP, 3 epochs
  python -m examples.tune --lr 1e-3,3e-3 --eps 1e-8,1e-6
  python -m examples.tune --model cnn --sequential                # the CNN, one configuration at a time (CPU)
  python -m examples.tune --patience 2 --plateau-patience 1 --plateau-factor 0.3 --epochs 10
  python -m examples.tune --optimizer AdamW --lr 1e-3 --weight-decay 0,1e-2,1e-1
  python -m examples.tune --sequential                            # the same runs one after another
  python -m examples.tune --data-dir /data/mnist --workdir runs/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from examples import _cli
from examples.mnist import optimizers
from examples.tune import train
from examples.tune.configs import default


def _floats(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
  if not values:
    raise argparse.ArgumentTypeError("expected at least one number")
  return values


def parse_args(argv: list[str] | None = None) -> tuple[default.Config, str]:
  base = default.get_config()
  p = _cli.parser(
    "python -m examples.tune", __doc__, "Sweep one optimizer's hyperparameters on MNIST in one vmapped program."
  )
  p.add_argument(
    "--optimizer",
    default=base.optimizer,
    choices=list(optimizers.OPTIMIZERS),
    metavar="NAME",
    help=f"one of {', '.join(optimizers.OPTIMIZERS)}",
  )
  hp = p.add_argument_group("values to sweep (comma-separated; the grid is their product)")
  for name in train.HYPERPARAMETERS:
    flag = "--" + name.replace("_", "-")
    default_values = base.grid.get(name)
    shown = (
      " (default: the optimizer's own)"
      if default_values is None
      else f" (default: {','.join(f'{v:g}' for v in default_values)})"
    )
    hp.add_argument(flag, type=_floats, default=None, help=f"{name} values{shown}")
  p.add_argument(
    "--model",
    choices=("cnn", "mlp"),
    default=base.model,
    help="the 784-256-10 MLP or Flax's CNN (on CPU: --sequential)",
  )
  p.add_argument("--epochs", type=int, default=base.epochs, help="passes over the training set")
  p.add_argument(
    "--patience", type=int, default=base.patience, help="early stopping on validation loss (default: none)"
  )
  p.add_argument(
    "--plateau-patience", type=int, default=base.plateau_patience, help="ReduceLROnPlateau's patience (default: none)"
  )
  p.add_argument("--plateau-factor", type=float, default=base.plateau_factor, help="ReduceLROnPlateau's factor")
  p.add_argument("--batch-size", type=int, default=base.batch_size, help="training batch size")
  p.add_argument("--val-fraction", type=float, default=base.val_fraction, help="the training set's last part, held out")
  p.add_argument("--seed", type=int, default=base.seed, help="initialisation and shuffling seed")
  _cli.add_mnist_data_arguments(p, base.data_dir)
  p.add_argument("--workdir", default=None, help="sweep.json, sweep.png, checkpoints (default: workdir/tune-<time>)")
  p.add_argument(
    "--sequential", action="store_true", help="train the configurations one after another (default: all at once)"
  )
  p.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=base.progress,
    help="progress within each epoch (default: a bar on a terminal, else a line every few seconds)",
  )
  p.add_argument("--no-plot", dest="plot", action="store_false", help="write no sweep.png (default: write it)")
  p.add_argument("--train-limit", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--test-limit", type=int, default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  given = {n: getattr(a, n) for n in train.HYPERPARAMETERS if getattr(a, n) is not None}
  grid = given if given else dict(base.grid)
  config = dataclasses.replace(
    base,
    optimizer=a.optimizer,
    grid=grid,
    model=a.model,
    epochs=a.epochs,
    patience=a.patience,
    plateau_patience=a.plateau_patience,
    plateau_factor=a.plateau_factor,
    batch_size=a.batch_size,
    val_fraction=a.val_fraction,
    seed=a.seed,
    data_dir=a.data_dir,
    download=a.download,
    sequential=a.sequential,
    plot=a.plot,
    progress=a.progress,
    train_limit=a.train_limit,
    test_limit=a.test_limit,
  )
  return config, a.workdir or time.strftime("workdir/tune-%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> None:
  config, workdir = parse_args(argv)
  train.sweep_and_evaluate(config, workdir)


if __name__ == "__main__":
  _cli.run("python -m examples.tune", main)
