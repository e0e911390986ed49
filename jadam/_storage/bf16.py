r"""Low-precision optimizer state: unbiased (stochastic) rounding to bfloat16.

Adam's second moment decays by :math:`\beta_2 = 0.999` per step. bfloat16 keeps
8 significant bits, so round-to-nearest turns :math:`0.999\,v` back into
:math:`v` and a bfloat16 :math:`v` never decays. Rounding up or down at random,
with the probability of rounding up equal to the distance to the lower
neighbour over the spacing, makes the stored value correct *on average*:
:math:`\mathbb{E}[\operatorname{sr}(x)] = x`, so :math:`\mathbb{E}[v_t] = 0.999^t v_0`.

The random bits come from a counter-based hash of (element index, step,
stream), not from a PRNG key in the state: the state stays 2 bytes per value
and two runs of the same program give the same bits.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam._core import common as _common

_M1 = np.uint32(0x9E3779B1)  # golden-ratio multiplier (Weyl sequence over the index)
_M2 = np.uint32(0x85EBCA77)
_M3 = np.uint32(0xC2B2AE3D)
_F1 = np.uint32(0x85EBCA6B)  # murmur3's fmix32 constants
_F2 = np.uint32(0xC2B2AE35)


def stream_offset(stream: int) -> int:
  """The hash's offset for a stream (a leaf's moment): what :func:`hash_bits` adds, and the CPU kernel too."""
  return (int(stream) * int(_M3)) % 2**32


def hash_bits(shape: tuple[int, ...], count: jax.Array, stream: int) -> jax.Array:
  """32 pseudo-random bits per element, a pure function of (index, count, stream).

  murmur3's finaliser applied to a Weyl sequence over the flat element index,
  offset by the step and the stream. Elementwise, so XLA fuses it into the loop
  that stores the moment.
  """
  size = int(np.prod(shape, dtype=np.int64))
  i = jax.lax.iota(jnp.uint32, size).reshape(shape)
  t = jnp.asarray(count).astype(jnp.uint32)
  offset = np.uint32(stream_offset(stream))
  h = i * _M1 + (t * _M2 + offset)
  h = h ^ (h >> 16)
  h = h * _F1
  h = h ^ (h >> 13)
  h = h * _F2
  return h ^ (h >> 16)


def round_to_bfloat16(x: jax.Array, count: jax.Array, stream: int) -> jax.Array:
  r"""Stochastically round a float32 array to bfloat16, unbiased.

  .. math::
      \operatorname{sr}(x) = \operatorname{trunc}_{16}\big(\operatorname{bits}(x) + r\big),
      \qquad r \sim U\{0, \dots, 2^{16} - 1\},

  i.e. add 16 random bits below bfloat16's last bit and truncate: :math:`x`
  rounds away from zero with probability (distance to the truncated value) /
  (spacing), which makes :math:`\mathbb{E}[\operatorname{sr}(x)] = x`.
  NaN stays NaN; infinities stay infinite.

  Args:
    x: a float32 array.
    count: the step (an integer scalar); with `stream`, it selects the bits.
    stream: a Python int that separates leaves and moments.

  Returns:
    `x` in bfloat16.
  """
  x = x.astype(jnp.float32)
  r = hash_bits(x.shape, count, stream) >> 16
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + r) & np.uint32(0xFFFF0000)
  y = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  y = jnp.where(jnp.isfinite(x), y, x)  # inf + r would read as NaN
  return y.astype(jnp.bfloat16)  # exact: the low 16 bits are zero


def stochastic_store(dtype: Any) -> bool:
  """Whether a moment requested in `dtype` is stored with stochastic rounding: bfloat16 only."""
  return dtype is not None and jnp.dtype(dtype) == jnp.bfloat16


def store(
  updates: optax.Updates,
  values: optax.Updates,
  state: optax.Updates,
  count: jax.Array,
  stream: int,
) -> optax.Updates:
  """`values` cast to the dtypes of `state`, bfloat16 leaves rounded stochastically.

  Leaves where `updates` is not a float array keep their `state` leaf, as
  :func:`jadam._core.common.tree_map_float` does with ``keep=2``. Each leaf gets its
  own stream of bits (the leaf's position in the tree).
  """
  leaf = itertools.count()

  def one(g, v, s):
    del g
    k = next(leaf)
    if s.dtype == jnp.bfloat16 and v.dtype != jnp.bfloat16:
      return round_to_bfloat16(v, count, 2 * k + stream)
    return v.astype(s.dtype)

  return _common.tree_map_float(one, updates, values, state, keep=2)
