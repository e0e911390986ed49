"""Flax's MNIST CNN, in NNX and in Linen (the same layers, shapes and initialisers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax import lax


def avg_pool(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2: ``nn.avg_pool``'s result, bit for bit.

  ``nn.avg_pool`` divides by ``np.prod(window_shape)``, an int64 scalar that
  strict dtype promotion refuses; dividing by the Python float 4.0 is the same
  operation on float32 and promotes nowhere.
  """
  return nn.pool(x, 0.0, lax.add, (2, 2), (2, 2), "VALID") / 4.0


class CNN(nnx.Module):
  """Conv 32 3x3, relu, avg-pool, Conv 64 3x3, relu, avg-pool, Dense 256, relu, Dense 10."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = avg_pool(nnx.relu(self.conv1(x)))
    x = avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.linear1(x))
    return self.linear2(x)


class LinenCNN(nn.Module):
  """The same CNN in Linen (Flax's own ``examples/mnist`` model)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = avg_pool(nn.relu(x))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = avg_pool(nn.relu(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=256)(x))
    return nn.Dense(features=10)(x)


# Mean and standard deviation of MNIST's training pixels, scaled to [0, 1].
MEAN, STD = 0.1307, 0.3081


def prepare(images: jax.Array) -> jax.Array:
  """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1), standardised with MNIST's mean and std."""
  return (images.astype(jnp.float32)[..., None] / 255.0 - MEAN) / STD


class LinenMLP(nn.Module):
  """A 2-layer perceptron: Dense ``hidden``, relu, Dense 10 (a fast model for sweeps and benchmarks)."""

  hidden: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=self.hidden)(x))
    return nn.Dense(features=10)(x)


# Linen modules by name, for examples that need a pure ``apply(params, images)``.
LINEN_MODELS = {"cnn": LinenCNN, "mlp": LinenMLP}
