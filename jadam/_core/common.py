"""Helpers shared by jadam's stages: state and tree checks, dtypes, tree maps, paths (hyperparameters: `hparams`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse


def check_state(stage: str, state: Any, cls: type) -> None:
  """Raises a `TypeError` unless `state` is the `cls` that `stage`'s init returns.

  Two optimizers with as many stages give states that `optax.chain` accepts
  for each other, and a moment read under another's meaning would go unseen.
  """
  if not isinstance(state, cls):
    raise TypeError(
      f"{stage} expects its state to be the {cls.__name__} that its init returns, but received"
      f" {type(state).__name__}. Was the state made by another optimizer's init?"
    )


def _aval(x: Any) -> str:
  """`float32[3,4]`, as jax prints an abstract value."""
  if x is None:
    return "None"
  dtype = getattr(x, "dtype", None)
  return f"{dtype if dtype is not None else type(x).__name__}[{','.join(map(str, np.shape(x)))}]"


def is_update_leaf(x: Any) -> bool:
  """Where a stage stops when it maps over gradients or updates: `None` (no gradient) and a row-sparse `BCOO`
  (one gradient, whose integer indices are not values to scale or zero)."""
  return x is None or isinstance(x, sparse.BCOO)


def check_tree(stage: str, updates: Any, name: str, other: Any, hint: str) -> None:
  """Raises a `ValueError` unless `other` is a tree of the structure and shapes of `updates`.

  `other` is what `stage` maps together with the updates: a moment of its
  state or the parameters. Without this, a tree of other parameters fails deep
  inside `jax.tree.map` (which says neither which stage nor which trees), and
  a leaf of another shape that broadcasts silently changes the state's shape.
  Only structures and shapes are read, so it costs nothing under `jit`. A
  `None` update (a frozen leaf) may stand for any leaf of `other`.

  Args:
    stage: the stage's name, for the message.
    updates: the updates the stage received.
    name: what `other` is, e.g. "the state's nu" or "the params".
    other: the tree to compare.
    hint: what the user should check, appended to the message.
  """
  mine, mine_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_update_leaf)
  theirs, theirs_def = jax.tree_util.tree_flatten_with_path(other, is_leaf=is_update_leaf)
  if mine_def == theirs_def:  # type: ignore[operator]  # jaxlib's PyTreeDef has no stub here
    for (path, u), (_, o) in zip(mine, theirs, strict=True):
      if u is not None and (o is None or np.shape(u) != np.shape(o)):
        raise ValueError(
          f"{stage}: the updates and {name} differ at {jax.tree_util.keystr(path)}: the updates have"
          f" {_aval(u)}, {name} {_aval(o)}. {hint}"
        )
    return
  mine_paths = [jax.tree_util.keystr(p) for p, _ in mine]
  theirs_paths = [jax.tree_util.keystr(p) for p, _ in theirs]
  extra = [p for p in mine_paths if p not in set(theirs_paths)]
  missing = [p for p in theirs_paths if p not in set(mine_paths)]
  found = ([f"{extra[0]} is in the updates but not in {name}"] if extra else []) + (
    [f"{missing[0]} is in {name} but not in the updates"] if missing else []
  )
  if not found:
    found = [f"their containers differ ({mine_def} vs {theirs_def})"]
  raise ValueError(f"{stage}: the updates and {name} are different trees: {'; '.join(found)}. {hint}")


STATE_HINT = "Was the state made by this optimizer's init for these parameters?"
PARAMS_HINT = "Pass update(grads, state, params) the parameters that the gradients are for."


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype an update is computed in: the leaf's, but never below float32."""
  # Not jnp.promote_types(dtype, float32): under strict promotion it raises for
  # float64 (and for any two distinct float types).
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return dtype


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real dtype of a complex one (complex64 -> float32); a real dtype unchanged."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.finfo(dtype).dtype) if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def componentwise(fn: Callable[..., jax.Array], *xs: jax.Array) -> jax.Array:
  """`fn(*xs)`, applied to the real and imaginary parts separately where a leaf is complex.

  jadam's one rule for complex parameters is PyTorch's: `torch.optim` treats
  a complex parameter as `torch.view_as_real` of it, a pair of real numbers,
  so every nonlinear operation of a stage (square, root, division, absolute
  value, maximum, adding eps) acts on each part alone. Linear operations
  (moving averages, momentum, scaling by a real rate) are the same either
  way. On real leaves this is `fn(*xs)`. `fn` must take and return arrays of
  the real dtype.
  """
  if any(jnp.iscomplexobj(x) for x in xs):
    return jax.lax.complex(fn(*(jnp.real(x) for x in xs)), fn(*(jnp.imag(x) for x in xs)))
  return fn(*xs)


def is_float_leaf(x: Any) -> bool:
  """Whether jadam optimizes this leaf: an inexact array (not int, bool, None)."""
  return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def float_dtype() -> jnp.dtype:
  """The widest float in use: float64 under `jax.enable_x64`, else float32."""
  return jnp.dtype(jnp.result_type(float))


def one_minus_power(b: jax.typing.ArrayLike, count: jax.Array) -> jax.Array:
  r"""The bias correction factor :math:`1 - \beta^t`, computed as :math:`-\mathrm{expm1}(t \log \beta)`.

  Forming `b ** t` in float32 and subtracting from one loses the low bits of a
  number close to one (10 ulps after 200 steps against PyTorch, which works in
  double). `expm1` of `t log(b)` keeps them, with `log(b)` taken in double on
  the host when `b` is a Python float.

  Args:
    b: the decay, a Python float or a scalar array, in [0, 1].
    count: the step t (an integer array, t >= 1).

  Returns:
    A scalar of the default float dtype (float32, float64 under x64).
  """
  dtype = float_dtype()
  t = jnp.asarray(count).astype(dtype)
  if isinstance(b, numbers.Number):
    if b == 0:
      return jnp.ones([], dtype)
    log_b = math.log(b)
  else:
    log_b = jnp.log(jnp.asarray(b).astype(dtype))
  # b == 0 gives log_b = -inf and -expm1(-inf) = 1, the right limit for t >= 1.
  return -jnp.expm1(t * log_b)


def tree_map_float(fn: Callable[..., Any], tree: Any, *rest: Any, keep: int = 0) -> Any:
  """Maps `fn` over the leaves where `tree` holds an inexact array.

  Elsewhere (integer, boolean and float0 leaves, and `None` gradients) the
  result is the corresponding leaf of the `keep`-th tree, unchanged: pass
  `keep=0` for updates (they go through as they came) and the index of a state
  tree to leave that state as it was. Either way the state's dtypes never change
  between steps, as `jax.lax.scan` and `jit` need.
  """
  trees = (tree, *rest)

  def apply(*leaves):
    if not is_float_leaf(leaves[0]):
      return leaves[keep]
    return fn(*leaves)

  return jax.tree.map(apply, *trees, is_leaf=lambda x: x is None)


_COMPLEX_OF = {jnp.dtype(jnp.float32): jnp.dtype(jnp.complex64), jnp.dtype(jnp.float64): jnp.dtype(jnp.complex128)}


def state_dtype(leaf: jax.Array, dtype: Any, *, widen: bool) -> Any:
  """The storage dtype of a state leaf for parameter `leaf`, given a `mu_dtype`-like `dtype` (or None).

  The precision comes from `dtype`, the kind (real or complex) from the
  parameter: `"complex64"` stores float32 for a real parameter and `float32`
  stores complex64 for a complex one, so one dtype serves a tree of both.
  """
  if dtype is None:
    return compute_dtype(leaf.dtype) if widen else leaf.dtype
  dtype = jnp.dtype(dtype)
  if not jnp.iscomplexobj(leaf):
    return real_dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return dtype
  if dtype not in _COMPLEX_OF:
    raise TypeError(
      f"A state dtype of {dtype} cannot hold the moments of a complex parameter ({leaf.dtype}): there is no"
      " complex type of that width. Use complex64 (or float32) for complex parameters."
    )
  return _COMPLEX_OF[dtype]


def state_zeros(params: optax.Params, dtype: Any, *, widen: bool) -> optax.Params:
  """Zeros shaped like the float leaves of `params`; other leaves kept as they are."""
  return jax.tree.map(
    lambda p: jnp.zeros_like(p, state_dtype(p, dtype, widen=widen)) if is_float_leaf(p) else jnp.zeros_like(p),
    params,
  )


def check_dtype(name: str, dtype: Any) -> None:
  if dtype is None:
    return
  try:
    inexact = jnp.issubdtype(jnp.dtype(dtype), jnp.inexact)
  except TypeError:  # numpy's "data type 'foo' not understood" names no argument
    inexact = False
  if not inexact:
    raise TypeError(
      f"{name} must be a floating dtype (or a complex one, for complex parameters) or None; got {dtype!r}."
    )


def check_grads_present(name: str, updates: Any, params: Any) -> None:
  """Raises a `ValueError` where a gradient is `None` but the parameter is an array.

  Such an update would reach `optax.apply_updates` as `param + None` and fail
  there, far from its cause. A leaf to freeze takes a zero gradient, or is
  left out with `optax.masked` / `optax.set_to_zero` under `optax.partition`.
  """

  def is_none(x):
    return x is None

  grads, grads_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_none)
  values, values_def = jax.tree_util.tree_flatten(params, is_leaf=is_none)
  if grads_def != values_def:  # type: ignore[operator]  # jaxlib's PyTreeDef has no stub here
    return  # the stages' check_tree says how the trees differ
  for (path, g), p in zip(grads, values, strict=True):
    if g is None and p is not None:
      raise ValueError(
        f"{name}: the gradient at {jax.tree_util.keystr(path)} is None, but the params hold {_aval(p)} there, and"
        " optax.apply_updates cannot add None to it. Pass a zero gradient for a frozen parameter, or leave it out"
        " of the optimizer with optax.partition(..., optax.set_to_zero())."
      )


def path_string(path: Sequence[Any]) -> str:
  """A key path as the `/`-joined string that group patterns match: ``"encoder/layers/0/kernel"``.

  Flax NNX's boxes (a trailing ``.value`` attribute of an `nnx.Variable`) are
  left out, so an NNX model's `nnx.state(model, nnx.Param)` gives the same
  paths as its Linen or plain-dict twin.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


# --- Adafactor and Muon ------------------------------------------------
def torch_lerp(start: jax.Array, end: jax.Array, weight: jax.typing.ArrayLike) -> jax.Array:
  r"""`torch.lerp(start, end, weight)` as PyTorch rounds it: :math:`s + w(e - s)` for :math:`|w| < 1/2`,
  :math:`e - (e - s)(1 - w)` otherwise.

  Algebraically :math:`(1 - w)s + we`; the two forms keep the rounding error
  small at either end (:math:`w = 1` gives `end` exactly). `weight` is cast to
  the arrays' dtype first, as PyTorch's kernel casts its scalar.
  """
  w = jnp.asarray(weight).astype(start.dtype)
  return jnp.where(jnp.abs(w) < 0.5, start + w * (end - start), end - (end - start) * (1 - w))
