"""Flax's MNIST CNN, in NNX and in Linen (the same layers, shapes and initialisers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


def _pool(x: jax.Array) -> jax.Array:
    return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class CNN(nnx.Module):
    """Conv 32 3x3, relu, avg-pool, Conv 64 3x3, relu, avg-pool, Dense 256, relu, Dense 10."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _pool(nnx.relu(self.conv1(x)))
        x = _pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


class LinenCNN(nn.Module):
    """The same CNN in Linen (Flax's own ``examples/mnist`` model)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(features=256)(x))
        return nn.Dense(features=10)(x)


# Mean and standard deviation of MNIST's training pixels, scaled to [0, 1].
MEAN, STD = 0.1307, 0.3081


def prepare(images: jax.Array) -> jax.Array:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1), standardised with MNIST's mean and std."""
    return (images.astype(jnp.float32)[..., None] / 255.0 - MEAN) / STD
