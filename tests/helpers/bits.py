"""Bitwise comparison of pytrees: the same structure, dtypes, shapes and bit patterns (so -0.0 != 0.0, NaN == NaN)."""

from __future__ import annotations

import jax
import numpy as np


def bits(x) -> np.ndarray:
  """The raw bits of an array, as unsigned integers of its width (bool and int arrays as they are)."""
  x = np.asarray(x)
  if x.dtype.kind in "fc" or x.dtype.name in ("bfloat16", "float16"):
    return x.view(f"u{x.dtype.itemsize}")
  return x


def assert_bitwise_equal(got, want, what: str = "") -> None:
  """Raises AssertionError unless `got` and `want` are the same tree with bit-identical leaves."""

  def is_none(x):
    return x is None

  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got, is_leaf=is_none)
  want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want, is_leaf=is_none)
  assert got_def == want_def, f"{what}: tree structures differ:\n{got_def}\n{want_def}"
  for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
    where = f"{what}{jax.tree_util.keystr(path)}"
    if a is None or b is None:
      assert a is None and b is None, f"{where}: {a!r} vs {b!r}"
      continue
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    diff = np.flatnonzero(bits(a).ravel() != bits(b).ravel())
    assert diff.size == 0, (
      f"{where}: {diff.size} of {a.size} values differ in their bits,"
      f" e.g. {a.ravel()[diff[0]]!r} vs {b.ravel()[diff[0]]!r}"
    )
