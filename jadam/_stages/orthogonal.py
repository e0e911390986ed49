r"""Muon's stage: replace each matrix update by an approximately orthogonal one (Newton–Schulz).

:func:`orthogonalize` acts on parameter-shaped updates, so it composes with any
momentum before it (:func:`jadam.momentum`, ``ema=True`` for
`torch.optim.Muon`'s) and any step after it (:func:`jadam.scale_by_lr`,
:func:`jadam.decoupled_decay`); :func:`jadam.muon` is that chain.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages.moments import expect_updates

Dtype = Any

# Keller Jordan's quintic, as torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_SHAPE_SCALES = ("original", "match_rms_adamw")


def shape_scale(shape: tuple[int, ...], kind: str | None) -> float:
  r"""Muon's learning-rate factor for a matrix of `shape` :math:`(A, B)`, in double, as `torch.optim.Muon`.

  ``"original"`` (Keller Jordan's): :math:`\sqrt{\max(1, A/B)}`; ``"match_rms_adamw"``
  (Moonshot's): :math:`0.2\sqrt{\max(A, B)}`; ``None``: 1.
  """
  if kind is None:
    return 1.0
  a, b = shape[:2]
  if kind == "original":
    return math.sqrt(max(1, a / b))
  return 0.2 * math.sqrt(max(a, b))


def newton_schulz(
  g: jax.Array, coefficients: tuple[float, float, float], steps: int, eps: jax.typing.ArrayLike, dtype: Any
) -> jax.Array:
  r"""`steps` quintic Newton–Schulz iterations on :math:`X_0 = G / \max(\lVert G\rVert_F, \epsilon)`, in `dtype`.

  .. math::
      A_k = X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,

  on the wide orientation (:math:`G^\top` when :math:`G` has more rows than
  columns, transposed back at the end). Each product is accumulated in
  float32 or wider and each line rounded once to `dtype`, as PyTorch's
  `addmm` on bfloat16 does.
  """
  a, b, c = coefficients
  wide = _common.compute_dtype(dtype)
  tall = g.shape[0] > g.shape[1]
  x = g.astype(dtype)
  if tall:
    x = x.T
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(wide)))).astype(dtype)
  x = (x.astype(wide) / jnp.maximum(norm, _hparams.cast_hyperparameter(eps, dtype)).astype(wide)).astype(dtype)

  def dot(p, q):  # products accumulated in `wide`, at full precision on every backend
    return jnp.matmul(p, q, precision=jax.lax.Precision.HIGHEST, preferred_element_type=wide)

  for _ in range(steps):
    gram = dot(x, x.T).astype(dtype)
    update = (b * gram.astype(wide) + c * dot(gram, gram)).astype(dtype)
    x = (a * x.astype(wide) + dot(update, x)).astype(dtype)
  return x.T if tall else x


@_registry.stage("orthogonalize", state=optax.ScaleByScheduleState)
def orthogonalize(
  ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
  ns_steps: int = 5,
  eps: optax.ScalarOrSchedule = 1e-7,
  *,
  shape_scaling: str | None = None,
  ns_dtype: Dtype | None = jnp.bfloat16,
) -> optax.GradientTransformation:
  r"""Replace each matrix update by its Newton–Schulz orthogonalisation, as `torch.optim.Muon` does.

  .. math::
      O = \mathrm{NS}^{(a,b,c)}_k\bigl(U / \max(\lVert U\rVert_F, \epsilon)\bigr), \qquad
      u \leftarrow s(A, B)\, O,

  where :math:`\mathrm{NS}_k` is ``newton_schulz``, which drives every
  singular value of :math:`U` towards (roughly) one: :math:`O \approx
  U_\Sigma V^\top` for :math:`U = U_\Sigma \Sigma V^\top`. :math:`s` is
  ``shape_scale``, Muon's learning-rate adjustment for an :math:`A \times
  B` matrix (1 when `shape_scaling` is None).

  Only 2-D leaves are accepted (a `ValueError` names any other): Muon is for
  hidden-layer weight matrices; give biases, norms and embeddings another
  optimizer with `optax.partition` (see :func:`jadam.muon`).

  Args:
    ns_coefficients: :math:`(a, b, c)` of the quintic iteration.
    ns_steps: :math:`k`, the number of iterations (below 100, as PyTorch).
    eps: :math:`\epsilon \ge 0`, the floor of the norm: a float, a scalar
      array or a schedule.
    shape_scaling: None, ``"original"`` or ``"match_rms_adamw"``.
    ns_dtype: the dtype the iteration runs in: bfloat16 by default, as PyTorch
      hard-codes (the result then carries bfloat16's 8 bits of precision,
      whatever the parameter's dtype); None runs it in the update's dtype
      (float32 or wider), for a reference.

  Returns:
    An :class:`optax.GradientTransformation` on parameter-shaped updates.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024; Liu et al., `Muon is
    Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3:
    raise ValueError(f"ns_coefficients must be a tuple of exactly 3 values (a, b, c); got {ns_coefficients!r}.")
  a, b, c = (float(x) for x in ns_coefficients)
  coefficients = (a, b, c)
  if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
    raise ValueError(f"ns_steps must be an integer in [0, 100) (PyTorch's bound); got {ns_steps!r}.")
  _hparams.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  if shape_scaling is not None and shape_scaling not in _SHAPE_SCALES:
    raise ValueError(f"shape_scaling must be None or one of {_SHAPE_SCALES}; got {shape_scaling!r}.")
  _common.check_dtype("ns_dtype", ns_dtype)
  eps_fn = _hparams.as_schedule(eps, "eps")
  stage = "jadam.orthogonalize"

  def check_2d(tree, what):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if _common.is_float_leaf(x) and jnp.ndim(x) != 2:
        raise ValueError(
          f"{stage} (Muon) only takes 2-D parameters, but {what} at {jax.tree_util.keystr(path)} has shape"
          f" {jnp.shape(x)}. Give the other leaves another optimizer, e.g. optax.partition({{'muon': jadam.muon(...),"
          " 'adamw': jadam.adamw(...)}, labels) with labels 'muon' for the hidden 2-D weights."
        )
      if _common.is_float_leaf(x) and jnp.iscomplexobj(x):
        raise TypeError(f"{stage}: Muon does not support complex parameters ({jax.tree_util.keystr(path)}).")

  def init_fn(params):
    check_2d(params, "the parameter")
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    expect_updates(updates, stage)
    check_2d(updates, "the update")
    e = eps_fn(state.count)

    def one(u):
      dtype = _common.compute_dtype(u.dtype) if ns_dtype is None else jnp.dtype(ns_dtype)
      o = newton_schulz(u, coefficients, ns_steps, e, dtype)
      wide = _common.compute_dtype(u.dtype)
      scale = shape_scale(u.shape, shape_scaling)
      return (o.astype(wide) * scale).astype(u.dtype) if scale != 1.0 else o.astype(u.dtype)

    return _common.tree_map_float(one, updates), optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
