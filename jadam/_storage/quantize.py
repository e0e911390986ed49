r"""8-bit block-wise quantized moments, as bitsandbytes stores them.

A moment leaf is kept as one uint8 code per element plus one float32 scale
per block of `block_size` consecutive elements (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", ICLR 2022):

.. math::
    a_b = \max_{i \in b} |x_i|, \qquad
    q_i = \operatorname*{argmin}_k \big| x_i / a_b - c_k \big|, \qquad
    \tilde x_i = c_{q_i}\, a_b,

with the 256 values :math:`c_k` of a *dynamic* map (:func:`dynamic_map`): a
sign, a decimal exponent from :math:`10^{-6}` to :math:`10^0` and a linear
fraction, so that values six decades below their block's maximum still have
a code. :math:`m` uses the signed map, :math:`v` the unsigned one, which
spends the sign bit on more fractions.

Block layout (the sharding rule): blocks are bitsandbytes' blocks, runs of
`block_size` consecutive elements of the leaf in row-major order, the last one
padded. When the leaf's last axis is a multiple of `block_size`, every block
lies inside one row, and the scales are stored with the leaf's leading shape,
``absmax.shape == (*shape[:-1], shape[-1] // block_size)``: a leaf sharded
along any axis gives codes and scales sharded the same way, and no block
straddles two shards as long as each shard of the last axis holds a multiple
of `block_size` elements. Other leaves are blocked as one flat vector
(``absmax.shape == (ceil(size / block_size),)``), as bitsandbytes does; shard
those along the first axis only, with a multiple of `block_size` elements per
shard, or use a block size that divides the last axis.

Where 8 bits lose information: a value below about :math:`1.6 \cdot 10^{-7}`
of its block's maximum rounds to zero (the smallest positive code of the
unsigned map is :math:`3.25 \cdot 10^{-7}`). :math:`v \sim g^2` spans twice the
decades of :math:`g`, so in a block whose gradients span more than about three
decades the smallest :math:`v` underflow, and the step that reads them,
:math:`\hat m / (\sqrt{\hat v} + \epsilon)`, is then too large (bounded by
:math:`1/\sqrt{1 - \beta_2}`, 31.6 for :math:`\beta_2 = 0.999`, since the
current gradient's share is added in float32 before the step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam._core import common as _common


@dataclasses.dataclass(frozen=True)
class Quantized:
  """A moment storage format: 8-bit codes and one float32 scale per block.

  Pass it where a moment's dtype goes: ``jadam.scale_by_moments(mu_dtype=
  jadam.Quantized(), nu_dtype=jadam.Quantized())``. The first moment uses the
  signed dynamic map, the second the unsigned one. :func:`jadam.adam8bit` is
  :func:`jadam.adam` with both.

  Attributes:
    block_size: elements per scale, a positive power of two (bitsandbytes:
      256). The state costs :math:`1 + 4/\\text{block\\_size}` bytes per value.
    min_size: leaves with fewer elements keep a float32 moment (in the leaf's
      dtype widened to float32), as bitsandbytes' `min_8bit_size`: for small
      tensors the saving is nothing and the rounding is not.

  Leaves that are not real floating point (complex) keep a moment in their own
  dtype, as without this spec; integer leaves get no moment at all, as always.

  Blocks are bitsandbytes' (`block_size` consecutive values in row-major
  order). When a leaf's last axis is a multiple of `block_size`, its scales
  are shaped ``(*shape[:-1], shape[-1] // block_size)`` and sharded like the
  leaf, so no block straddles a shard as long as each shard of the last axis
  holds a multiple of `block_size` values; other leaves are blocked as one
  flat vector (shard them along the first axis only).
  """

  block_size: int = 256
  min_size: int = 0

  def __post_init__(self):
    b = self.block_size
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
      raise TypeError(
        f"block_size must be a Python int (a positive power of two); got {type(b).__name__} {b!r}. Under"
        " optax.inject_hyperparams name it in static_args."
      )
    if b < 1 or b & (b - 1):
      raise ValueError(f"block_size must be a positive power of two; got {b}.")
    m = self.min_size
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
      raise TypeError(f"min_size (min_8bit_size) must be a Python int; got {type(m).__name__} {m!r}.")
    if m < 0:
      raise ValueError(f"min_size (min_8bit_size) must be >= 0; got {m}.")


class QuantizedArray(NamedTuple):
  """One quantized leaf: the codes and the scales of its blocks (what :func:`quantize` returns)."""

  codes: jax.Array  # uint8, the leaf's shape
  absmax: jax.Array  # float32, one per block (see the module's docstring for its shape)


class QuantizedMoment(NamedTuple):
  """A moment stored as a :class:`Quantized` spec asks: two trees shaped like the parameters.

  Where a leaf is quantized, `codes` holds its uint8 codes and `absmax` its
  blocks' float32 maxima. Where it is not (fewer than `min_size` elements, or
  complex), `codes` holds its moment as :func:`jadam.adam` would and `absmax` an
  unused float32 scalar (orbax refuses zero-size arrays). Two parameter-shaped trees, rather than
  a node per leaf, so that frameworks that box each state leaf (Flax NNX's
  `nnx.Optimizer`) and orbax see plain arrays.
  """

  codes: optax.Updates
  absmax: optax.Updates


def check_dtype(name: str, dtype: Any) -> None:
  """`jadam._core.common.check_dtype`, which also accepts a :class:`Quantized` spec."""
  if not isinstance(dtype, Quantized):
    _common.check_dtype(name, dtype)


def dynamic_map(signed: bool) -> np.ndarray:
  """bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted float32 values.

  For each exponent :math:`e = 0..6`, :math:`2^{e}` (signed) or :math:`2^{e+1}`
  (unsigned) fractions, the midpoints of a linear grid on [0.1, 1], scaled by
  :math:`10^{e-6}` (and negated, when signed); then 0 and 1. The signed map
  has 254 such values, the unsigned 254 as well with one zero as padding.
  """
  data: list[float] = []
  for i in range(7):
    items = 2**i + 1 if signed else 2 ** (i + 1) + 1
    bounds = np.linspace(0.1, 1, items, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    scaled = (np.float32(10.0 ** (-6 + i)) * means).tolist()
    data += scaled
    if signed:
      data += [-x for x in scaled]
  data += [0.0, 1.0]
  data += [0.0] * (256 - len(data))
  return np.sort(np.asarray(data, np.float32))


_MAPS = {True: dynamic_map(True), False: dynamic_map(False)}
# Decision boundaries, the midpoints between neighbouring codes: x goes to the
# first code whose upper boundary is >= x (torch.bucketize, bitsandbytes' rule).
_BOUNDS = {s: ((m[:-1] + m[1:]) / np.float32(2.0)).astype(np.float32) for s, m in _MAPS.items()}


def _lookup_tables(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Tables that turn a binary search over `bounds` into two lookups.

  Indexed by the top 16 bits of a float32 (sign, exponent, 7 bits of
  mantissa), each key stands for an interval of floats that holds at most one
  boundary (the map's codes are at least 1.6% apart, the keys' intervals at
  most 0.8% wide): `base[k]` counts the boundaries below the interval and
  `next[k]` is the boundary inside it (or +inf), so that
  ``searchsorted(bounds, y) == base[k] + (next[k] < y)``.
  """
  keys = np.arange(2**16, dtype=np.uint32)
  edge = (keys << 16).view(np.float32)  # the end of each interval nearest zero
  far = ((keys + 1) << 16).view(np.float32)  # the other end, excluded
  positive = keys < 2**15
  low = np.where(positive, edge, far)  # the interval is [edge, far) for y >= 0, (far, edge] for y < 0
  base = np.where(positive, np.searchsorted(bounds, low, side="left"), np.searchsorted(bounds, low, side="right"))
  inside = np.minimum(base, len(bounds) - 1)
  b = bounds[inside]
  high = np.where(positive, far, edge)
  hit = (base < len(bounds)) & np.where(positive, b < high, b <= high)
  with np.errstate(invalid="ignore"):
    finite = np.isfinite(edge) & np.isfinite(far)
  after = np.minimum(inside + 1, len(bounds) - 1)
  second = hit & (base + 1 < len(bounds)) & np.where(positive, bounds[after] < high, bounds[after] <= high)
  assert not np.any(second & finite), "two boundaries in one key's interval"
  return base.astype(np.int32), np.where(hit, b, np.float32(np.inf)).astype(np.float32)


_TABLES = {s: _lookup_tables(b) for s, b in _BOUNDS.items()}


def _packed_table(signed: bool) -> np.ndarray:
  """`_TABLES[signed]` as the C++ kernel reads it: one uint32 per key, `base | threshold << 16`.

  A boundary inside a key's interval has the key as its top 16 bits, so comparing
  it with y needs only the low 16 bits: for y >= 0, ``next < y`` iff
  ``low16(y) > low16(next)``; for y < 0 the order is reversed, so both sides are
  complemented (``0xFFFF - low16``). A key without a boundary gets the threshold
  0xFFFF, which no low half exceeds.
  """
  base, nxt = _TABLES[signed]
  keys = np.arange(2**16, dtype=np.uint32)
  hit = np.isfinite(nxt)
  bits = nxt.view(np.uint32)
  assert np.all((bits[hit] >> 16) == keys[hit]), "a boundary outside its key's interval"
  assert not np.any(hit & ((keys & 0x7FFF) > 0x7F80)), "a boundary in a NaN key"
  low = bits & np.uint32(0xFFFF)
  low = np.where(keys >= 2**15, np.uint32(0xFFFF) - low, low)
  threshold = np.where(hit, low, np.uint32(0xFFFF)).astype(np.uint32)
  assert np.all((base >= 0) & (base < 2**16))
  return (base.astype(np.uint32) | (threshold << np.uint32(16))).astype(np.uint32)


# The fused kernel's arithmetic code search (see _search_table) trusts its floor of t only farther than this from an
# integer; nearer, it looks the code up. Its error is under 3e-5: the fit's (1.1e-5, asserted under 2e-5 below) and
# the float32 fma's rounding (under 8e-6 for t < 256).
_SEARCH_WINDOW = 2.0**-14


def _search_table(signed: bool) -> np.ndarray:
  r"""The fused CPU kernel's table for finding codes by arithmetic instead of by memory lookups.

  Between consecutive decades the map is a linear grid (:func:`dynamic_map`), so on
  :math:`a = |y|` the code is an affine function's floor,

  .. math::
      q(a) = \min(\lfloor S_d a + B_d \rfloor, \text{cap}_d),

  with :math:`S_d, B_d` fitted so that each boundary inside decade :math:`d`
  lands on an integer. The decade :math:`d` is the number of separators
  (boundaries between decades, below the first code, below 1) under `a`: each
  binade :math:`[2^k, 2^{k+1})`, :math:`k \ge -31`, holds at most one, so `d` is
  a lookup on the exponent and one comparison, ``d0[k] + (a > thr[k])``. Where
  :math:`S_d a + B_d` falls within `_SEARCH_WINDOW` of an integer the kernel
  takes the exact lookup (`_packed_table`) instead. On y < 0 (signed map) the
  kernel returns :math:`254 - \min(q(|y|), 254)`, the mirror image.

  Layout, as uint32 words: d0 (int32, 32, indexed by the biased exponent mod 32,
  exponents below -31 taken as -31), thr (float32, 32), S, B (float32, 16 each,
  by decade: 0 below the first code, 1..7 the decades, 8 at 1), cap (int32, 16),
  the window (float32).
  """
  codes, bounds = _MAPS[signed], _BOUNDS[signed]
  zero = 127 if signed else 0
  top = len(codes) - 1  # 1.0
  positive = np.arange(zero + 1, top)
  decade = np.floor(np.log10(codes[positive].astype(np.float64))).astype(int) + 7  # 10^(i-6) * (0.1, 1)
  s = np.zeros(16, np.float32)
  b = np.zeros(16, np.float32)
  cap = np.zeros(16, np.int32)
  b[0], cap[0] = zero + 0.5, zero
  found = [bounds[zero]]  # the separators: between 0 and the first positive code
  for i in range(7):
    members = positive[decade == i]
    first, n = int(members[0]), len(members)
    found.append(bounds[first + n - 1])  # above the decade's last code
    inner = bounds[first : first + n - 1].astype(np.float64)  # inner[j - 1] lies between codes first+j-1, first+j
    target = np.arange(first + 1, first + n, dtype=np.float64)
    slope = n / (0.9 * 10.0 ** (i - 6)) if n > 1 else 0.0
    s[i + 1] = slope
    b[i + 1] = np.mean(target - slope * inner) if n > 1 else first + 0.5
    cap[i + 1] = first + n - 1
    fit = np.abs(np.float64(s[i + 1]) * inner + np.float64(b[i + 1]) - target)
    assert n == 1 or fit.max() < 2e-5, "the affine fit of a decade's boundaries"
    assert np.float64(s[i + 1]) * bounds[first - 1] + b[i + 1] >= first + 0.1, "the decade's lower separator"
  s[8], b[8], cap[8] = 0.0, top + 0.5, top
  separators = np.asarray(found, np.float32)
  d0 = np.zeros(32, np.int32)
  thr = np.full(32, np.inf, np.float32)
  for k in range(-31, 1):
    lo, hi = np.float32(2.0**k), np.float32(2.0 ** (k + 1))
    inside = separators[(separators >= lo) & (separators < hi)]
    assert len(inside) <= 1, "two separators in one binade"
    slot = (k + 127) % 32
    d0[slot] = np.count_nonzero(separators < lo) if k > -31 else 0
    if len(inside):
      thr[slot] = inside[0]
  assert separators[0] > 2.0**-30, "a separator below the exponents the kernel tells apart"
  words = [d0.view(np.uint32), thr.view(np.uint32), s.view(np.uint32), b.view(np.uint32), cap.view(np.uint32)]
  return np.concatenate([*words, np.asarray([_SEARCH_WINDOW], np.float32).view(np.uint32)])


def kernel_tables() -> tuple[np.ndarray, ...]:
  """What the fused CPU kernel's 8-bit step reads: the signed and unsigned maps, their packed code tables, then their
  arithmetic search tables."""
  return (
    np.ascontiguousarray(_MAPS[True], np.float32),
    np.ascontiguousarray(_MAPS[False], np.float32),
    _packed_table(True),
    _packed_table(False),
    _search_table(True),
    _search_table(False),
  )


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
  """``table[index]``, shaped and sharded as `index`.

  The output sharding is named: under explicit sharding (`AxisType.Explicit`) a lookup into a replicated
  table by sharded indices has none of its own to infer.
  """
  return jnp.asarray(table).at[index].get(out_sharding=jax.typeof(index).sharding)


def _codes(scaled: jax.Array, signed: bool) -> jax.Array:
  """``searchsorted(bounds, scaled, side="left")`` for `scaled` in [-1, 1], by two table lookups."""
  base, nxt = _TABLES[signed]
  key = (jax.lax.bitcast_convert_type(scaled, jnp.uint32) >> 16).astype(jnp.int32)
  return _lookup(base, key) + (_lookup(nxt, key) < scaled).astype(jnp.int32)


def _blocks(shape: tuple[int, ...], block_size: int) -> tuple[bool, int]:
  """`(per_row, n_blocks)`: whether blocks follow the last axis, and how many blocks a flat layout has."""
  per_row = len(shape) >= 1 and shape[-1] > 0 and shape[-1] % block_size == 0
  size = math.prod(shape)
  return per_row, -(-size // block_size)


def absmax_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  per_row, n = _blocks(shape, block_size)
  return (*shape[:-1], shape[-1] // block_size) if per_row else (n,)


def _block_max(x: jax.Array, block_size: int) -> jax.Array:
  """The maximum of each block of `x`, shaped as the absmax (the last, partial block of a flat layout included)."""
  per_row, n = _blocks(x.shape, block_size)
  if per_row:
    return jnp.max(x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size), axis=-1)
  flat = x.reshape(-1)
  full = (flat.size // block_size) * block_size
  parts = [jnp.max(flat[:full].reshape(-1, block_size), axis=-1)] if full else []
  if full < flat.size:  # sliced, not padded: a pad would be written out in full
    parts.append(jnp.max(flat[full:], keepdims=True))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _per_value(scales: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
  """One scale per block, broadcast to one per value of a leaf of `shape` (fuses into its consumer)."""
  wide = jnp.broadcast_to(scales[..., None], (*scales.shape, block_size))
  per_row, _ = _blocks(shape, block_size)
  if per_row:
    return wide.reshape(shape)
  return wide.reshape(-1)[: math.prod(shape)].reshape(shape)


# The largest block scale, 2^126 (8.5e38): a block holding an inf (or a v beyond it) keeps this scale, so that its
# other values decode to finite numbers (not 0 * inf); the larger value itself is coded as 1, the scale. 2^126 and
# not float32's maximum: its reciprocal, 2^-126, is still a normal float32, which a CPU that flushes subnormals to
# zero (XLA's setting) keeps; 1 / 3.4e38 would flush to 0 and code the whole block as zero.
SCALE_MAX = 2.0**126


def quantize(
  x: jax.Array, block_size: int, *, signed: bool, again: Callable[[], jax.Array] | None = None
) -> QuantizedArray:
  r"""Block-wise 8-bit codes of `x` (computed in float32) and the blocks' absolute maxima.

  Nearest code to :math:`x / a_b` (ties to the lower code), as bitsandbytes'
  `quantize_blockwise`; a block of zeros keeps :math:`a_b = 0` and code of 0.

  Non-finite values stay in their own value, never spread over their block:
  :math:`a_b = \min(\max_{i \in b,\, x_i \ne \text{NaN}} |x_i|,\ 2^{126})`,
  the largest magnitude of the block with NaNs ignored (0 for a block of NaNs,
  as bitsandbytes' CPU quantizer ignores them), capped at :math:`2^{126}`
  (`SCALE_MAX`) so that an inf does not make :math:`a_b` infinite and every
  other value of the block :math:`0 \cdot \infty`. A NaN is coded (as 255,
  the table's code for NaN) but the parameter that read it is NaN already.

  `again`, if given, computes `x` anew from the inputs it was made from, behind
  an optimization barrier: the maxima are reduced from `x` and the codes from
  the recomputation, so that XLA fuses both into loops over the inputs instead
  of writing `x` to memory between the reduction and the encoding (a float32
  temporary per moment, twice the 8-bit state).
  """
  shape = x.shape
  magnitude = jnp.abs(x.astype(jnp.float32))
  # NaNs ignored and the scale capped at SCALE_MAX: a NaN or an inf stays in its own value
  magnitude = jnp.where(jnp.isnan(magnitude), np.float32(0.0), magnitude)
  absmax = jnp.minimum(_block_max(magnitude, block_size), np.float32(SCALE_MAX))
  y = (x if again is None else again()).astype(jnp.float32)
  # bitsandbytes: x * (1 / max(absmax, 1e-38)), clamped to [-1, 1].
  inv = 1.0 / jnp.maximum(absmax, np.float32(1e-38))
  scaled = jnp.clip(y * _per_value(inv, shape, block_size), -1.0, 1.0)
  codes = _codes(scaled, signed)
  if not signed:
    # A positive v never rounds to zero: it goes to the smallest positive code
    # (3.25e-7 of its block's maximum). A v read back as zero would make the next
    # step up to 1/sqrt(1 - b2) times too large; one read as slightly too large
    # only shortens it. (bitsandbytes' CPU quantizer sends tiny values to a positive code too.)
    codes = jnp.where(scaled > 0, jnp.maximum(codes, 1), codes)
  return QuantizedArray(codes=codes.astype(jnp.uint8), absmax=absmax)


def dequantize(q: QuantizedArray, block_size: int, *, signed: bool, dtype: Any = jnp.float32) -> jax.Array:
  """:math:`c_{q_i} a_b` in `dtype` (float32 at least), shaped as the codes."""
  values = _lookup(_MAPS[signed], q.codes.astype(jnp.int32))
  return (values * _per_value(q.absmax, q.codes.shape, block_size)).astype(dtype)


def _quantizes(leaf: Any, spec: Quantized) -> bool:
  """Whether a leaf gets quantized moments under `spec`: a real float leaf of at least `min_size` elements."""
  return (
    _common.is_float_leaf(leaf)
    and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    and math.prod(np.shape(leaf)) >= max(spec.min_size, 1)
  )


def zeros(params: optax.Params, spec: Quantized, *, widen: bool) -> QuantizedMoment:
  """The initial moment: zero codes and scales where `spec` applies, the usual float zeros elsewhere."""

  def codes(p):
    if _quantizes(p, spec):
      return jnp.zeros_like(p, jnp.uint8)  # keeps the parameter's sharding
    if _common.is_float_leaf(p):  # complex or small leaves: the moment jadam.adam keeps
      return jnp.zeros_like(p, _common.state_dtype(p, None, widen=widen))
    return jnp.zeros_like(p)

  def absmax(p):
    shape = absmax_shape(np.shape(p), spec.block_size) if _quantizes(p, spec) else ()
    z = jnp.zeros(shape, jnp.float32)
    sharding = None if isinstance(p, jax.core.Tracer) else getattr(p, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
      return z
    # On the parameter's mesh, never on one device (a multi-process step refuses those): per-row scales take the
    # parameter's spec, flat ones its first axis's, where the shards hold whole blocks; else replicated.
    parts = tuple(sharding.spec) + (None,) * (np.ndim(p) - len(sharding.spec))
    whole_blocks = math.prod(sharding.shard_shape(np.shape(p))) % spec.block_size == 0
    if shape and _blocks(np.shape(p), spec.block_size)[0]:
      fits = parts
    else:
      fits = parts[:1] if shape and whole_blocks and not any(parts[1:]) else ()
    for candidate in (fits, ()):
      try:
        return jax.device_put(z, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*candidate)))
      except ValueError:  # a shard that is not whole blocks
        continue
    return z

  return QuantizedMoment(codes=jax.tree.map(codes, params), absmax=jax.tree.map(absmax, params))


def is_codes(c: Any) -> bool:
  """Whether a moment leaf holds 8-bit codes (uint8), not a float moment."""
  return c is not None and jnp.result_type(c) == jnp.uint8


def load(moment: Any, spec: Any, *, signed: bool) -> optax.Updates:
  """The moment as a tree of float arrays: quantized leaves dequantized to float32, others as they are."""
  if not isinstance(spec, Quantized):
    return moment
  if not isinstance(moment, QuantizedMoment):
    raise TypeError(
      f"a moment stored as {spec} must be the QuantizedMoment that its init returns; got"
      f" {type(moment).__name__}. Was the state made by another optimizer's init?"
    )

  def one(c, a):
    return dequantize(QuantizedArray(c, a), spec.block_size, signed=signed) if is_codes(c) else c

  return jax.tree.map(one, moment.codes, moment.absmax, is_leaf=lambda x: x is None)


class _Pair(NamedTuple):
  codes: Any
  absmax: Any


def store(
  updates: optax.Updates,
  values: optax.Updates,
  state: QuantizedMoment,
  spec: Quantized,
  *,
  signed: bool,
  recompute: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[QuantizedMoment, optax.Updates]:
  """`(stored, passed_on)`: `values` requantized where `state` holds codes, cast to the state's dtype elsewhere.

  Leaves where `updates` is not a float array keep their `state` leaves.
  `passed_on` is `values`.
  `recompute(g, old)`, if given, is how each value was made from its gradient
  and the dequantized old moment: see `again` in :func:`quantize`.
  """

  def one(g, v, c, a):
    if not _common.is_float_leaf(g):
      return _Pair(c, a), v
    if is_codes(c):
      again = None
      if recompute is not None:

        def again(g=g, c=c, a=a):
          g, c, a = jax.lax.optimization_barrier((g, c, a))
          return recompute(g, dequantize(QuantizedArray(c, a), spec.block_size, signed=signed))

      return _Pair(*quantize(v, spec.block_size, signed=signed, again=again)), v
    return _Pair(v.astype(c.dtype), a), v

  out = jax.tree.map(one, updates, values, state.codes, state.absmax, is_leaf=lambda x: x is None)

  def is_out(x):  # what `one` returns for a leaf: stop there, not inside the pair
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], _Pair)

  return (
    QuantizedMoment(
      codes=jax.tree.map(lambda o: o[0].codes, out, is_leaf=is_out),
      absmax=jax.tree.map(lambda o: o[0].absmax, out, is_leaf=is_out),
    ),
    jax.tree.map(lambda o: o[1], out, is_leaf=is_out),
  )
