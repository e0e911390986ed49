"""Default sweep of the tuning example."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything :func:`examples.tune.train.sweep_and_evaluate` reads."""

  optimizer: str = "adam"  # a name in examples.mnist.optimizers.OPTIMIZERS
  # Values per hyperparameter, by the example's names (lr, b1, b2, eps,
  # weight_decay); the grid is their product. A name left out keeps the
  # optimizer's default.
  grid: dict[str, tuple[float, ...]] = dataclasses.field(
    default_factory=lambda: {"lr": (3e-4, 1e-3, 3e-3), "b1": (0.8, 0.9), "b2": (0.99, 0.999)}
  )
  # "mlp" (784-256-10) or "cnn" (Flax's MNIST CNN). The MLP by default: on CPU,
  # XLA runs a vmapped convolution as a grouped one with no fast path (docs/guides/
  # tuning.md): sweep the CNN with --sequential there, or on an accelerator.
  model: str = "mlp"
  epochs: int = 3
  patience: int | None = None  # early stopping on validation loss; None: never
  plateau_patience: int | None = None  # ReduceLROnPlateau on validation loss; None: none
  plateau_factor: float = 0.1
  batch_size: int = 128
  eval_batch_size: int = 1000
  val_fraction: float = 0.1  # held out of the training set (the last examples)
  seed: int = 0
  data_dir: str | None = None  # None: cache, download, or the shipped sample
  download: bool = True
  sequential: bool = False  # one configuration after another instead of all at once
  train_limit: int | None = None  # for tests: the first N training examples (before the split)
  test_limit: int | None = None
  plot: bool = True
  progress: bool | None = None  # within each epoch; None: a bar on a terminal, else a line every few seconds
  checkpoint: bool = True  # the last epoch's parameters and sweep state, with jadam.save_state
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # fixed optimizer arguments


def get_config() -> Config:
  """lr x b1 x b2 = 3 x 2 x 2 configurations of jadam.adam, 3 epochs of the MLP."""
  return Config()
