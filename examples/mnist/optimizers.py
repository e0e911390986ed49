"""The optimizers the MNIST examples accept, by name: an explicit table, extended by hand.

jadam's own aliases take ``learning_rate`` and ``b1``/``b2``; the `jadam.torch`
front doors take PyTorch's ``lr`` and ``betas``. Stages (``decoupled_decay``),
schedulers (``StepLR``) and helpers (``path_string``) are not optimizers, so
they are not here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import optax

import jadam

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  # jadam's recipes
  "adam": jadam.adam,
  "adamw": jadam.adamw,
  "adam8bit": jadam.adam8bit,
  "adamw8bit": jadam.adamw8bit,
  "adamax": jadam.adamax,
  "nadam": jadam.nadam,
  "radam": jadam.radam,
  "rmsprop": jadam.rmsprop,
  "adagrad": jadam.adagrad,
  "sgd": jadam.sgd,
  # PyTorch's names and arguments (jadam.torch)
  "Adam": jadam.torch.Adam,
  "AdamW": jadam.torch.AdamW,
  "Adam8bit": jadam.torch.Adam8bit,
  "AdamW8bit": jadam.torch.AdamW8bit,
  "Adamax": jadam.torch.Adamax,
  "NAdam": jadam.torch.NAdam,
  "RAdam": jadam.torch.RAdam,
  "RMSprop": jadam.torch.RMSprop,
  "Adagrad": jadam.torch.Adagrad,
  "SGD": jadam.torch.SGD,
}


def get(name: str) -> Callable[..., optax.GradientTransformation]:
  """The factory called `name`, or a `ValueError` that lists the names."""
  try:
    return OPTIMIZERS[name]
  except KeyError:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def lr_name(name: str) -> str | None:
  """The factory's learning-rate argument: ``learning_rate``, ``lr`` (a torch front door) or None."""
  params = inspect.signature(get(name)).parameters
  return next((p for p in ("learning_rate", "lr") if p in params), None)


def takes_betas(name: str) -> bool:
  """Whether the factory takes PyTorch's ``betas`` pair rather than ``b1`` and ``b2``."""
  params = inspect.signature(get(name)).parameters
  return "betas" in params and "b1" not in params
