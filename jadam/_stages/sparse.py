r"""Row-sparse gradients: lazy Adam for embedding tables, paying only for the rows a step touched.

The gradient of a table :math:`\theta \in \mathbb{R}^{V \times \dots}` whose
forward pass read a few rows is row-sparse. jadam holds it as JAX's own sparse
type, a :class:`jax.experimental.sparse.BCOO` with one sparse dimension:
``indices`` of shape ``(k, 1)`` (integers) and ``data`` of shape
``(k, *theta.shape[1:])``. Duplicate indices are summed, as PyTorch's
``grad.coalesce()`` does. An index equal to :math:`V` is padding (JAX's own
convention: ``bcoo_sum_duplicates(..., nse=...)`` pads with it), so a jitted
step can take a fixed number of ids.

- :func:`scale_by_sparse_moments` updates :math:`m, v` on the touched rows only
  and passes on, for each table, the :class:`jadam.Moments` of those rows with
  the table's own step count; :func:`rowwise` runs jadam's dense stages
  (:func:`jadam.bias_correct`, :func:`jadam.normalize`) on them unchanged.
  :func:`jadam.sparse_adam` is their chain.
- :func:`apply_updates` adds a row-sparse update by a scatter: :math:`O(k\,d)`.
  ``optax.apply_updates`` also gives the right parameters, by way of
  ``BCOO.todense``: :math:`O(V d)` per table and step. The step helpers
  (:func:`jadam.update_and_apply` and the compiled steps) run
  :func:`jadam.sparse_adam` on the CPU as one fused kernel call per table
  (`jadam._kernels.sparse_step`), with the bits of this module's stages.
- :func:`value_and_sparse_grad` differentiates a loss with respect to the
  gathered rows of its tables, never the dense :math:`(V, d)` gradient.

Out-of-range indices: outside `jit` (concrete indices) an index below 0 or
above :math:`V` raises a `ValueError`. Under `jit` they cannot be checked
without a host round trip: every index outside :math:`[0, V)` is then treated
as padding (its row is neither read nor written); negative indices do *not*
wrap around as NumPy's do.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse as jsparse

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages.moments import AccumulateSquaresState, Moments, expect_updates

BCOO = jsparse.BCOO

DENSE_GRADIENT = "SparseAdam does not support dense gradients, please consider Adam instead"


def is_sparse(x: Any) -> bool:
  """Whether `x` is a row-sparse gradient or update (a `BCOO`); use as ``is_leaf`` when mapping over grads."""
  return isinstance(x, BCOO)


def has_sparse(tree: Any) -> bool:
  """Whether any leaf of `tree` is a `BCOO`."""
  return any(is_sparse(x) for x in jax.tree.leaves(tree, is_leaf=is_sparse))


def _check_sparse_grad(stage: str, where: str, g: Any, p: Any) -> None:
  """Raises a clear error unless `g` is a row-sparse gradient for a table shaped like `p`."""
  if not is_sparse(g):
    raise TypeError(
      f"{DENSE_GRADIENT}. {stage} got a dense {_common._aval(g)} gradient at {where}: give each table a"
      " jax.experimental.sparse.BCOO with indices (k, 1) (jadam.value_and_sparse_grad makes them), and"
      " the dense leaves to another optimizer with optax.partition."
    )
  if g.n_batch != 0 or g.n_sparse != 1:
    raise TypeError(
      f"{stage}: the gradient at {where} must be row-sparse: a BCOO with one sparse dimension (indices of"
      f" shape (k, 1)) and no batch dimensions; got n_batch={g.n_batch}, n_sparse={g.n_sparse}. Build it as"
      " BCOO((data, ids[:, None]), shape=table.shape) or BCOO.fromdense(x, n_dense=x.ndim - 1)."
    )
  if not jnp.issubdtype(g.indices.dtype, jnp.integer):
    raise TypeError(f"{stage}: the gradient's indices at {where} must be integers; got {g.indices.dtype}.")
  if p is not None and tuple(g.shape) != tuple(np.shape(p)):
    raise ValueError(
      f"{stage}: the gradient at {where} is for a table of shape {tuple(g.shape)}, but the state (the"
      f" table) has shape {tuple(np.shape(p))}. {_common.STATE_HINT}"
    )


def _check_range(stage: str, where: str, idx: jax.Array, rows: int) -> None:
  """Outside jit, refuses indices below 0 or above `rows` (`rows` itself is padding)."""
  if isinstance(idx, jax.core.Tracer):
    return
  values = np.asarray(idx)
  bad = (values < 0) | (values > rows)
  if bad.any():
    raise ValueError(
      f"{stage}: {where} has row indices out of range for a table of {rows} rows:"
      f" {values[bad][:5].tolist()} (valid: 0 to {rows - 1}; {rows} marks padding)."
    )


def check_gradient(stage: str, where: str, g: Any, table: Any) -> None:
  """Raises what :func:`scale_by_sparse_moments` raises for a gradient `g` of `table` (its moment): a dense
  gradient, one not row-sparse, non-integer indices, another shape, and (outside jit) indices out of range."""
  _check_sparse_grad(stage, where, g, table)
  _check_range(stage, f"the gradient at {where}", g.indices, g.shape[0])


def row_ids(indices: jax.Array, rows: int) -> jax.Array:
  """The `(k,)` integer `indices` as int32 row ids, each outside :math:`[0, V)` made :math:`V` (padding).

  The range is checked in the ids' own dtype, before the narrowing to int32: an int64 id
  :math:`2^{32} + 3` is padding, never row 3."""
  if jnp.iinfo(indices.dtype).bits < 32:
    indices = indices.astype(jnp.int32)  # exact; and `rows` may not fit an int8
  return jnp.where((indices >= 0) & (indices < rows), indices, rows).astype(jnp.int32)


def _unique(idx: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """`(unique, inverse)` of a 1-d int32 `idx`: sorted unique values padded with `fill` to its length, and
  `unique[inverse] == idx`. One sort of the keys alone and a binary search."""
  k = idx.shape[0]
  ordered = jnp.sort(idx)
  first = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
  unique = jnp.full(k, fill, idx.dtype).at[jnp.cumsum(first) - 1].set(ordered, mode="drop", indices_are_sorted=True)
  return unique, jnp.searchsorted(unique, idx).astype(jnp.int32)


def coalesce(g: BCOO) -> tuple[jax.Array, jax.Array]:
  r"""`(rows, data)`: the indices of `g` made unique and sorted, duplicates summed, as torch's ``coalesce()``.

  Both keep `g`'s number of entries :math:`k` (a static shape, so it works under
  `jit`): the unused tail has row :math:`V` (padding) and zero data, as has any
  index outside :math:`[0, V)`. A gradient flagged ``unique_indices`` (as
  :func:`value_and_sparse_grad` makes them) is taken as it is. Otherwise one
  sort of the :math:`k` indices and a binary search: :math:`O(k \log k)`
  (a key-value sort, as ``jnp.unique(return_inverse=True)`` does, is ten
  times slower on CPU).
  """
  rows = g.shape[0]
  idx = row_ids(g.indices[:, 0], rows)
  k = idx.shape[0]
  valid = idx < rows

  def expand(mask):  # one flag per row, broadcast over the row's values
    return mask.reshape((k,) + (1,) * (g.data.ndim - 1))

  if g.unique_indices:
    return idx, jnp.where(expand(valid), g.data, jnp.zeros_like(g.data))
  if k == 0:
    return idx, g.data
  unique, inverse = _unique(idx, rows)
  data = jnp.zeros_like(g.data).at[inverse].add(g.data)
  return unique, jnp.where(expand(unique < rows), data, jnp.zeros_like(data))


def to_dense(g: BCOO) -> jax.Array:
  """`g` as a dense array, duplicates summed as :func:`coalesce` sums them (padding dropped): :math:`O(V d)`."""
  rows, data = coalesce(g)
  return jnp.zeros(g.shape, data.dtype).at[rows].set(data, mode="drop")


def accumulate_rows(g: BCOO, total: jax.Array) -> tuple[BCOO, BCOO, jax.Array]:
  r"""Adagrad's sum of squares on the rows of a row-sparse gradient, as `torch.optim.Adagrad` does.

  .. math::
      v_{t,R} = v_{t-1,R} + g_{t,R}^2,

  with :math:`R` the coalesced rows of `g` (duplicates summed first, as torch's
  ``grad.coalesce()``); the other rows of `total` keep their bits.

  Returns:
    ``(grad, nu, total)``: the coalesced gradient and the new sums of its rows,
    as `BCOO`\ s with the same rows and flags as `g` (so that stages mapping
    over them see one structure), and the new `total`.
  """
  rows, data = coalesce(g)
  is_sorted = not g.unique_indices
  dtype = _common.compute_dtype(total.dtype)
  gd = data.astype(dtype)
  nu = _rows_of(total, rows, is_sorted=is_sorted).astype(dtype) + _common.componentwise(lambda a: a * a, gd)
  idx = rows.astype(g.indices.dtype)[:, None]

  def like_g(values: jax.Array) -> BCOO:
    return BCOO((values, idx), shape=g.shape, indices_sorted=g.indices_sorted, unique_indices=g.unique_indices)

  return like_g(data), like_g(nu), _put_rows(total, rows, nu, is_sorted=is_sorted)


def _rows_of(x: jax.Array, idx: jax.Array, *, is_sorted: bool = False) -> jax.Array:
  """`x[idx]`, zeros where `idx` is padding: :math:`O(k d)`."""
  return x.at[idx].get(mode="fill", fill_value=0, indices_are_sorted=is_sorted)


def _put_rows(x: jax.Array, idx: jax.Array, values: jax.Array, *, is_sorted: bool = False) -> jax.Array:
  """`x` with rows `idx` set to `values` (padding dropped): in place when `x` is donated."""
  return x.at[idx].set(values.astype(x.dtype), mode="drop", indices_are_sorted=is_sorted)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["moments", "rows"],
  meta_fields=["shape", "indices_sorted", "unique_indices"],
)
@dataclasses.dataclass(frozen=True)
class RowMoments:
  """What :func:`scale_by_sparse_moments` passes on for one table.

  Attributes:
    moments: the :class:`jadam.Moments` of the touched rows: `mu`, `nu` and
      `grad` are ``(k, *shape[1:])`` blocks, `count` is this table's own step.
    rows: ``(k,)``, sorted and unique, of the gradient's index dtype; `shape[0]` marks padding.
    shape: the table's shape.
    indices_sorted, unique_indices: the gradient's `BCOO` flags, which the
      update keeps, so that it has the gradient's pytree structure (as
      `optax.apply_if_finite`'s two branches need).
  """

  moments: Moments
  rows: jax.Array
  shape: tuple[int, ...]
  indices_sorted: bool = False
  unique_indices: bool = False


class ScaleBySparseMomentsState(NamedTuple):
  """State for :func:`scale_by_sparse_moments`."""

  count: optax.Updates  # per table, shape=(), int32: steps on which it had a gradient (torch's state["step"])
  mu: optax.Updates
  nu: optax.Updates


@_registry.stage("scale_by_sparse_moments", state=ScaleBySparseMomentsState)
def scale_by_sparse_moments(
  b1: optax.ScalarOrSchedule = 0.9, b2: optax.ScalarOrSchedule = 0.999
) -> optax.GradientTransformation:
  r"""Adam's moments on the rows a row-sparse gradient touches; the other rows are left as they are.

  For each table, with :math:`R` the rows present in the (coalesced) gradient:

  .. math::
      m_{t,r} = m_{t-1,r} + (1 - \beta_1)(g_{t,r} - m_{t-1,r}), \qquad
      v_{t,r} = v_{t-1,r} + (1 - \beta_2)(g_{t,r}^2 - v_{t-1,r}), \qquad r \in R,

  PyTorch's `SparseAdam` arithmetic. Rows outside :math:`R` keep their moments
  bit for bit (not decayed). Each table has its own step :math:`t`, increased on
  every step on which it has a gradient (also an empty one, as PyTorch's does);
  a `None` gradient leaves the table's count and moments as they were.

  Args:
    b1: Decay of the first moment, in [0, 1): a float, a scalar array or a
      schedule (of the table's step count).
    b2: Decay of the second moment, of the same kinds.

  Returns:
    An :class:`optax.GradientTransformation` taking a tree of
    :class:`jax.experimental.sparse.BCOO` gradients (see the module's
    docstring) and passing on a tree of :class:`RowMoments`; follow it with
    :func:`rowwise` stages. Dense gradients are refused.
  """
  _hparams.check_hyperparameter("b1", b1, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  _hparams.check_hyperparameter("b2", b2, low=0.0, high=1.0, high_open=True, wide_dtype=True)
  b1_fn, b2_fn = _hparams.as_schedule(b1), _hparams.as_schedule(b2)
  stage = "jadam.scale_by_sparse_moments"

  def init_fn(params):
    count = jax.tree.map(lambda p: jnp.zeros([], jnp.int32), params)
    return ScaleBySparseMomentsState(
      count=count,
      mu=_common.state_zeros(params, None, widen=False),
      nu=_common.state_zeros(params, None, widen=True),
    )

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, stage)
    _common.check_state(stage, state, ScaleBySparseMomentsState)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_common.is_update_leaf)
    try:
      # jaxlib ships no stub for PyTreeDef: mypy cannot see its methods
      counts, mus, nus = (treedef.flatten_up_to(x) for x in (state.count, state.mu, state.nu))  # type: ignore[attr-defined]
    except (ValueError, TypeError) as e:
      raise ValueError(f"{stage}: the gradients and the state are different trees ({e}). {_common.STATE_HINT}") from e
    out, new_counts, new_mus, new_nus = [], [], [], []
    for (path, g), t, m, v in zip(leaves, counts, mus, nus, strict=True):
      if g is None or not _common.is_float_leaf(m):
        out.append(g)  # as jadam's dense stages do: a None or integer gradient goes through as it came
        new_counts.append(t)
        new_mus.append(m)
        new_nus.append(v)
        continue
      check_gradient(stage, where=jax.tree_util.keystr(path) or "the root", g=g, table=m)
      rows, data = coalesce(g)
      is_sorted = not g.unique_indices  # coalesce sorted them (a flagged input may hold padding anywhere)
      beta1, beta2 = b1_fn(t), b2_fn(t)
      dtype = _common.compute_dtype(m.dtype)
      gd = data.astype(dtype)
      m_old = _rows_of(m, rows, is_sorted=is_sorted).astype(dtype)
      v_old = _rows_of(v, rows, is_sorted=is_sorted).astype(dtype)
      one_m_b1 = 1 - _hparams.cast_hyperparameter(beta1, dtype)
      one_m_b2 = 1 - _hparams.cast_hyperparameter(beta2, dtype)
      m_new = m_old + (gd - m_old) * one_m_b1
      v_new = v_old + (gd * gd - v_old) * one_m_b2
      t = optax.safe_increment(t)
      moments = Moments(mu=m_new, nu=v_new, count=t, b1=beta1, b2=beta2, grad=data)
      out.append(
        RowMoments(
          moments=moments,
          rows=rows.astype(g.indices.dtype),
          shape=tuple(g.shape),
          indices_sorted=g.indices_sorted,  # the gradient's flags: see RowMoments
          unique_indices=g.unique_indices,
        )
      )
      new_counts.append(t)
      new_mus.append(_put_rows(m, rows, m_new, is_sorted=is_sorted))
      new_nus.append(_put_rows(v, rows, v_new, is_sorted=is_sorted))
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    new_state = ScaleBySparseMomentsState(count=unflat(new_counts), mu=unflat(new_mus), nu=unflat(new_nus))
    return unflat(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _without_rows(updates: Any, replace: Callable[[str, BCOO], Any]) -> tuple[Any, list]:
  """`updates` with each `BCOO` leaf `g` at `path` replaced by `replace(path, g)`, and the leaves it replaced."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_common.is_update_leaf)
  out = [replace(jax.tree_util.keystr(p) or "the root", g) if is_sparse(g) else g for p, g in leaves]
  return jax.tree_util.tree_unflatten(treedef, out), [g if is_sparse(g) else None for _, g in leaves]


def dense_rows(inner: optax.GradientTransformation, *, pass_through: bool) -> optax.GradientTransformation:
  r"""`inner`, a dense stage on parameter-shaped updates, given row-sparse (`BCOO`) gradients as PyTorch takes them.

  With `pass_through`, each `BCOO` goes by `inner` untouched and `inner`'s
  state for that leaf is left as it was (`inner` sees a `None` gradient): what
  `torch.optim.SGD` does with a sparse gradient and no momentum. Otherwise each
  `BCOO` is made dense first (duplicates summed), as PyTorch's momentum buffer
  makes it: :math:`b_t = \mu b_{t-1} + (1-	au) g_t` holds every row any step
  touched, so the update is dense too.

  Args:
    inner: a stage whose update takes parameter-shaped updates (e.g. :func:`jadam.momentum`).
    pass_through: leave row-sparse gradients to the stages after this one.

  Returns:
    An :class:`optax.GradientTransformation` with `inner`'s state.
  """

  def update_fn(updates, state, params=None):
    if not has_sparse(updates):
      return inner.update(updates, state, params)

    def replace(where, g):
      check_gradient("jadam.dense_rows", where, g, None)
      return None if pass_through else to_dense(g)

    dense, rows = _without_rows(updates, replace)
    out, state = inner.update(dense, state, params)
    if pass_through:
      leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=_common.is_update_leaf)
      out = jax.tree_util.tree_unflatten(treedef, [g if r is None else r for g, r in zip(leaves, rows, strict=True)])
    return out, state

  return optax.GradientTransformation(inner.init, update_fn)


def accumulate_rows_of(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  r""":func:`jadam.accumulate_squares` (`inner`) that also takes row-sparse (`BCOO`) gradients: torch's sparse Adagrad.

  For a `BCOO` gradient, with :math:`R` its coalesced rows (duplicates summed):

  .. math::
      v_{t,R} = v_{t-1,R} + g_{t,R}^2, \qquad v_{t,r} = v_{t-1,r} 	ext{ elsewhere (bit for bit)},

  and the :class:`jadam.Moments` passed on hold, for that leaf, `BCOO`\ s of
  the rows :math:`R` (`mu` and `grad` the coalesced gradient, `nu` the new sums),
  with the gradient's rows and flags: :func:`jadam.normalize` then divides their
  values and the update stays row-sparse,
  :math:`-lpha_t\, g_{t,R} / (\sqrt{v_{t,R}} + \epsilon)`. Dense leaves go as in `inner`.

  Args:
    inner: ``jadam.accumulate_squares(...)``.

  Returns:
    An :class:`optax.GradientTransformation` with `inner`'s state.
  """

  def update_fn(updates, state, params=None):
    if not has_sparse(updates):
      return inner.update(updates, state, params)
    stage = "jadam.accumulate_squares"
    expect_updates(updates, stage)
    _common.check_state(stage, state, AccumulateSquaresState)
    _common.check_tree(stage, updates, "the state's sum_of_squares", state.sum_of_squares, _common.STATE_HINT)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_common.is_update_leaf)
    mus, nus, kept = [], [], []
    sums = treedef.flatten_up_to(state.sum_of_squares)  # type: ignore[attr-defined]  # jaxlib: no PyTreeDef stub
    for (path, g), s in zip(leaves, sums, strict=True):
      if is_sparse(g):
        check_gradient(stage, jax.tree_util.keystr(path) or "the root", g, s)
        grad, nu, s = accumulate_rows(g, s)
      elif _common.is_float_leaf(g):
        gc = g.astype(_common.compute_dtype(g.dtype))
        grad, nu = g, s.astype(gc.dtype) + _common.componentwise(lambda a: a * a, gc)
        s = nu.astype(s.dtype)
      else:
        grad, nu = g, g
      mus.append(grad)
      nus.append(nu)
      kept.append(s)
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    count = optax.safe_increment(state.count)
    mu = unflat(mus)
    moments = Moments(mu=mu, nu=unflat(nus), count=count, b1=0.0, b2=0.0, grad=mu)
    return moments, AccumulateSquaresState(count=count, sum_of_squares=unflat(kept))

  return optax.GradientTransformation(inner.init, update_fn)


def _is_row_moments(x: Any) -> bool:
  return x is None or isinstance(x, RowMoments)


@_registry.stage("rowwise", state=optax.EmptyState)
def rowwise(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  r"""Runs a stateless stage of :class:`jadam.Moments` (e.g. :func:`jadam.bias_correct`) on each table's rows.

  .. math::
      (m_{t,R}, v_{t,R}, t) \;\mapsto\; \texttt{inner}(m_{t,R}, v_{t,R}, t) \quad \text{for each table,}

  with :math:`R` the table's touched rows and :math:`t` its own step count.
  Each table's :class:`RowMoments` is given to `inner` as a one-leaf
  :class:`jadam.Moments` with the table's own step count. If `inner` returns
  moments, they go on as :class:`RowMoments`; if it returns the rows of a
  direction (as :func:`jadam.normalize` does), they go on as a row-sparse
  `BCOO` update with the same rows.

  Args:
    inner: a stateless transformation from :class:`jadam.Moments`.

  Returns:
    An :class:`optax.GradientTransformation` on trees of :class:`RowMoments`.
  """

  def update_fn(updates, state, params=None):
    del params

    def one(x):
      if x is None or (not isinstance(x, (RowMoments, BCOO)) and not _common.is_float_leaf(x)):
        return x  # a None or integer gradient, passed through by scale_by_sparse_moments
      if not isinstance(x, RowMoments):
        raise TypeError(
          "jadam.rowwise expects the RowMoments that jadam.scale_by_sparse_moments produces; got"
          f" {type(x).__name__}. Put scale_by_sparse_moments before it."
        )
      out, _ = inner.update(x.moments, inner.init(None))
      if isinstance(out, Moments):
        return dataclasses.replace(x, moments=out)
      return BCOO(
        (out, x.rows[:, None]), shape=x.shape, indices_sorted=x.indices_sorted, unique_indices=x.unique_indices
      )

    return jax.tree.map(one, updates, is_leaf=_is_row_moments), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
  r"""``optax.apply_updates`` that adds a row-sparse (`BCOO`) update by a scatter into its rows.

  .. math::
      \theta_{t,r} = \theta_{t-1,r} + \Delta\theta_{t,r}, \quad r \in R; \qquad
      \theta_{t,r} = \theta_{t-1,r} \text{ elsewhere, bit for bit.}

  :math:`O(k d)` per table, and in place when `params` is donated to the
  enclosing `jit`. Duplicate indices are summed; padding (index :math:`V`) and,
  under `jit`, any index outside :math:`[0, V)` is dropped. Dense leaves are
  added as ``optax.apply_updates`` does.

  Args:
    params: the parameters.
    updates: the updates, dense arrays and `BCOO`s (e.g. from
      :func:`jadam.sparse_adam`).

  Returns:
    The new parameters, each of its old dtype.
  """

  def one(p, u):
    if p is None or u is None:
      return p
    if is_sparse(u):
      _check_sparse_grad("jadam.apply_updates", "an update", u, p)
      rows = u.shape[0]
      idx = row_ids(u.indices[:, 0], rows)
      return p.at[idx].add(u.data.astype(p.dtype), mode="drop")
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

  return jax.tree.map(one, params, updates, is_leaf=_common.is_update_leaf)


def update_and_apply(tx: optax.GradientTransformation, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
  """``tx.update`` then :func:`apply_updates`: the step helpers' path for trees with row-sparse gradients."""
  updates, state = tx.update(grads, state, params)
  return apply_updates(params, updates), state


def value_and_sparse_grad(fun: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  r"""``jax.value_and_grad`` whose gradient of each embedding table is row-sparse, never dense.

  The returned ``f(params, ids, *args)`` calls ``fun(params, ids, *args)`` with
  each table named in `ids` replaced by the rows that its ids read, and its ids
  by their positions among those rows; it then differentiates with respect to
  those rows. The lookup ``table[ids]`` (``jnp.take(table, ids, axis=0)``, what
  ``flax.nnx.Embed`` does) gives the same values, and the gradient of the
  ``(n, d)`` rows, paired with their ids, is the table's gradient: a `BCOO`
  with unique sorted indices, ready for :func:`jadam.sparse_adam`. Work and
  memory are :math:`O(n d + n \log n)` for :math:`n` ids, not :math:`O(V d)`.

  Args:
    fun: ``fun(params, ids, *args)`` returning a scalar loss (``(loss, aux)``
      if `has_aux`). It must read each table only through ``table[ids[name]]``
      (any shape of ids), e.g. an NNX model merged from `params` and called on
      the ids.
    has_aux: whether `fun` returns ``(loss, aux)``.

  Returns:
    ``f(params, ids, *args) -> (value, grads)``; give it to
    :func:`jadam.make_train_step` in place of a loss for a one-`jit`, donated
    step ``step(params, state, ids, *args)``. `params` is a pytree (a dict,
    an ``nnx.State``, ...); `ids` a dict from a table's ``/``-joined path in
    `params` (as :func:`jadam.torch.path_string` writes it, e.g.
    ``"embed/embedding"``) to an integer array of row ids in :math:`[0, V)`.
    `grads` is shaped like `params`, with a `BCOO` of :math:`n` entries
    (duplicates summed, the rest padding) for each table.

  Raises:
    ValueError: outside `jit`, for an id below 0 or above :math:`V`. Under
      `jit` (where ids cannot be checked without a host round trip) an id
      outside :math:`[0, V)` is padding in both directions: its lookup reads a
      row of zeros (it does not wrap around, as ``table[-1]`` would) and its row
      gets no gradient, so the value and the gradient are of the same function.
      An id equal to :math:`V` is padding in both cases.

  Examples:
    >>> import jax.numpy as jnp, jadam
    >>> params = {"table": jnp.ones((1000, 4)), "w": jnp.ones(4)}
    >>> def loss(params, ids, y):
    ...   return jnp.sum((params["table"][ids["table"]] @ params["w"] - y) ** 2)
    >>> f = jadam.value_and_sparse_grad(loss)
    >>> value, grads = f(params, {"table": jnp.array([3, 7, 3])}, 1.0)
    >>> grads["table"].indices[:, 0]
    Array([   3,    7, 1000], dtype=int32)
  """
  _hparams.check_flag("has_aux", has_aux)

  def wrapped(params, ids, *args):
    if not isinstance(ids, dict):
      raise TypeError(f"ids must be a dict from a table's path to its ids; got {type(ids).__name__}.")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_common.path_string(p) for p, _ in leaves]
    unknown = sorted(set(ids) - set(names))
    if unknown:
      raise ValueError(f"ids names tables {unknown} that are not in params; its paths are {names[:8]}.")
    tables, local_ids, rows_of = {}, {}, {}
    for name, (_, table) in zip(names, leaves, strict=True):
      if name not in ids:
        continue
      i = jnp.asarray(ids[name])
      if not jnp.issubdtype(i.dtype, jnp.integer):
        raise TypeError(f"ids[{name!r}] must be integers; got {i.dtype}.")
      n, vocab = i.size, table.shape[0]
      _check_range("jadam.value_and_sparse_grad", f"ids[{name!r}]", i, vocab)
      flat = row_ids(i.reshape(-1), vocab)  # out of range: padding, read as zeros and given no gradient
      unique, inverse = _unique(flat, vocab) if n else (flat, flat)
      rows_of[name] = unique
      tables[name] = _rows_of(table, unique, is_sorted=True)
      local_ids[name] = inverse.reshape(i.shape).astype(i.dtype)

    def on_rows(leaf_values):
      return fun(jax.tree_util.tree_unflatten(treedef, leaf_values), {**ids, **local_ids}, *args)

    values = [tables.get(name, leaf) for name, (_, leaf) in zip(names, leaves, strict=True)]
    value, grads = jax.value_and_grad(on_rows, has_aux=has_aux)(values)
    out = []
    for name, (_, table), g in zip(names, leaves, grads, strict=True):
      if name in rows_of:
        g = BCOO((g, rows_of[name][:, None]), shape=table.shape, indices_sorted=True, unique_indices=True)
      out.append(g)
    return value, jax.tree_util.tree_unflatten(treedef, out)

  return _registry.mark_function(wrapped, "value_and_sparse_grad", has_aux=has_aux)  # make_train_step's gradient


def value_and_grad_of(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
  """`make_train_step`'s gradient: `loss_fn` itself if :func:`value_and_sparse_grad` made it, else
  ``jax.value_and_grad(loss_fn)``."""
  record = _registry.lookup(loss_fn)
  if record is None or record.name != "value_and_sparse_grad":
    return jax.value_and_grad(loss_fn, has_aux=has_aux)
  marked = record.hparams["has_aux"]
  if marked != has_aux:
    raise ValueError(f"make_train_step(has_aux={has_aux}) got a value_and_sparse_grad(has_aux={marked}) function.")
  return loss_fn
