"""The optimizers the MNIST examples accept, by name: an explicit table, extended by hand.

jadam's own aliases take ``learning_rate`` and ``b1``/``b2``; the `jadam.torch`
front doors take PyTorch's ``lr`` and ``betas``. Stages (``decoupled_decay``),
schedulers (``StepLR``) and helpers (``path_string``) are not optimizers, so
they are not here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

import jadam

NUM_CLASSES = 10  # the output layer's width: its kernel is the one 2-D weight that is not hidden


def muon(
  learning_rate: optax.ScalarOrSchedule = 0.02,
  momentum: float = 0.95,
  *,
  weight_decay: float = 0.1,
  adamw_lr_ratio: float = 0.05,
  adamw_weight_decay: float = 0.0,
  adjust_lr_fn: str | None = "original",
  ns_dtype: Any = jax.numpy.bfloat16,
) -> optax.GradientTransformation:
  """The usual Muon recipe: :func:`jadam.muon` for the hidden 2-D weights, :func:`jadam.adamw` for the rest.

  Hidden 2-D weights are the dense kernels but the output layer's (which
  maps to the classes); the convolution kernels (4-D), the biases and the
  output layer take AdamW, at `adamw_lr_ratio` times Muon's rate (0.05: 1e-3
  for Muon's 0.02), following the same schedule. PyTorch writes this as two
  optimizers, `torch.optim.Muon` and `torch.optim.AdamW`; Optax as one
  `optax.partition`.
  """

  def adamw_rate(count):
    return adamw_lr_ratio * (learning_rate(count) if callable(learning_rate) else learning_rate)

  def labels(params):
    def hidden(p):  # a 2-D weight, not the classifier's
      return jax.numpy.ndim(p) == 2 and jax.numpy.shape(p)[-1] != NUM_CLASSES

    return jax.tree.map(lambda p: "muon" if hidden(p) else "adamw", params)

  return optax.partition(
    {
      "muon": jadam.muon(
        learning_rate, momentum, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype
      ),
      "adamw": jadam.adamw(adamw_rate, weight_decay=adamw_weight_decay),
    },
    labels,
  )


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
  "adafactor": jadam.adafactor,
  "muon": muon,  # with AdamW for what is not a hidden 2-D weight (above)
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
  "Adafactor": jadam.torch.Adafactor,
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
