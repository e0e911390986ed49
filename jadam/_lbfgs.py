r"""L-BFGS with `torch.optim.LBFGS`'s algorithm: one `update` is one PyTorch `step(closure)`.

PyTorch's `step` runs up to `max_iter` inner iterations, each an L-BFGS
direction from a history of at most `history_size` curvature pairs and either
a fixed step or a strong-Wolfe line search, re-evaluating the closure as it
goes. Here the closure is Optax's `value_fn` (``update(grads, state, params,
value=..., value_fn=...)``, the calling convention of `optax.lbfgs`), the
inner loops are `jax.lax.while_loop`\ s and the history lives in fixed-size
buffers, so the whole step compiles under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry

_CURVATURE = 1e-10  # PyTorch keeps a pair (y, s) only if y.s exceeds this
_STAGE = "jadam.lbfgs"  # what error messages call it


class LbfgsState(NamedTuple):
  """State of :func:`lbfgs`: PyTorch's LBFGS state (`optimizer.state[first_param]`), in fixed-size buffers.

  The vectors are the parameters flattened in `jax.tree.leaves` order
  (PyTorch's: its parameter list's order). The history holds `num_old` pairs,
  oldest first; the rows past `num_old` are not read.
  """

  count: jax.Array  # type: ignore[assignment]  # int32: update calls so far (a scheduled learning rate reads it)
  func_evals: jax.Array  # int32: PyTorch's state["func_evals"]
  n_iter: jax.Array  # int32: PyTorch's state["n_iter"], inner iterations over all steps
  d: jax.Array  # (n,): the last direction
  t: jax.Array  # the last step length
  old_dirs: jax.Array  # (history_size, n): y = g_{k+1} - g_k
  old_stps: jax.Array  # (history_size, n): s = t d
  ro: jax.Array  # (history_size,): 1 / (y.s)
  num_old: jax.Array  # int32: pairs held
  H_diag: jax.Array  # scale of the initial inverse Hessian, y.s / y.y
  prev_flat_grad: jax.Array  # (n,)
  prev_loss: jax.Array
  al: jax.Array  # (history_size,): PyTorch's scratch of the two-loop recursion (NaN where it holds None)
  value: jax.Array  # the objective at the parameters this update returns; inf if this update did not evaluate it
  grad: optax.Updates  # its gradient there, for optax.value_and_grad_from_state


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
  """PyTorch's `_cubic_interpolate` (minFunc's polyinterp): the minimiser of the cubic through two points."""
  if bounds is not None:
    xmin_bound, xmax_bound = bounds
  else:
    xmin_bound = jnp.where(x1 <= x2, x1, x2)
    xmax_bound = jnp.where(x1 <= x2, x2, x1)
  d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
  d2_square = d1**2 - g1 * g2
  d2 = jnp.sqrt(jnp.where(d2_square >= 0, d2_square, 0))
  left = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
  right = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
  min_pos = jnp.where(x1 <= x2, left, right)
  # Python's min(max(a, lo), hi), NaN included: max(nan, lo) is nan, min(nan, hi) is nan.
  clipped = _pymin(_pymax(min_pos, xmin_bound), xmax_bound)
  return jnp.where(d2_square >= 0, clipped, (xmin_bound + xmax_bound) / 2.0)


def _pymax(a, b):
  """Python's `max(a, b)`: `b` if `b > a`, else `a` (a NaN first argument is kept)."""
  return jnp.where(b > a, b, a)


def _pymin(a, b):
  """Python's `min(a, b)`: `b` if `b < a`, else `a`."""
  return jnp.where(b < a, b, a)


class _Bracket(NamedTuple):
  t: jax.Array  # (2,)
  f: jax.Array  # (2,)
  g: jax.Array  # (2, n)
  gtd: jax.Array  # (2,)


def _strong_wolfe(obj, x, t, d, f, g, gtd, max_ls, *, tolerance_change, c1=1e-4, c2=0.9):
  """PyTorch's `_strong_wolfe` (minFunc's lswolfe), as two `while_loop`s: a bracketing phase and a zoom.

  Returns ``(f_new, g_new, t, ls_func_evals)``. A one-point bracket (the
  Wolfe conditions met at once) is held as the point twice.
  """
  dtype = g.dtype
  d_norm = jnp.max(jnp.abs(d))
  f_new, g_new = obj(x, t, d)
  gtd_new = jnp.dot(g_new, d)
  zero = jnp.zeros([], dtype)

  def pair(a, b):
    return _Bracket(*(jnp.stack([u, v]) for u, v in zip(a, b, strict=True)))

  # Phase 1: bracket an interval containing a point that satisfies the Wolfe conditions.
  class Bracketing(NamedTuple):
    ls_iter: jax.Array
    evals: jax.Array
    t: jax.Array
    t_prev: jax.Array
    f_prev: jax.Array
    g_prev: jax.Array
    gtd_prev: jax.Array
    f_new: jax.Array
    g_new: jax.Array
    gtd_new: jax.Array
    found: jax.Array
    done: jax.Array
    bracket: _Bracket

  start = Bracketing(
    ls_iter=jnp.zeros([], jnp.int32),
    evals=jnp.ones([], jnp.int32),
    t=t,
    t_prev=zero,
    f_prev=f,
    g_prev=g,
    gtd_prev=gtd,
    f_new=f_new,
    g_new=g_new,
    gtd_new=gtd_new,
    found=jnp.zeros([], bool),
    done=jnp.zeros([], bool),
    bracket=pair((zero, f, g, gtd), (t, f_new, g_new, gtd_new)),
  )

  def bracketing(s: Bracketing) -> Bracketing:
    armijo_fails = (s.f_new > (f + c1 * s.t * gtd)) | ((s.ls_iter > 1) & (s.f_new >= s.f_prev))
    wolfe = jnp.abs(s.gtd_new) <= -c2 * gtd
    two = pair((s.t_prev, s.f_prev, s.g_prev, s.gtd_prev), (s.t, s.f_new, s.g_new, s.gtd_new))
    one = pair((s.t, s.f_new, s.g_new, s.gtd_new), (s.t, s.f_new, s.g_new, s.gtd_new))
    found = armijo_fails | wolfe | (s.gtd_new >= 0)
    bracket = jax.tree.map(lambda a, b: jnp.where(~armijo_fails & wolfe, b, a), two, one)

    def stop(s):
      return s._replace(found=found, done=~armijo_fails & wolfe, bracket=bracket)

    def extrapolate(s):
      min_step = s.t + 0.01 * (s.t - s.t_prev)
      max_step = s.t * 10
      t_new = _cubic_interpolate(s.t_prev, s.f_prev, s.gtd_prev, s.t, s.f_new, s.gtd_new, bounds=(min_step, max_step))
      f_next, g_next = obj(x, t_new, d)
      return s._replace(
        ls_iter=s.ls_iter + 1,
        evals=s.evals + 1,
        t=t_new,
        t_prev=s.t,
        f_prev=s.f_new,
        g_prev=s.g_new,
        gtd_prev=s.gtd_new,
        f_new=f_next,
        g_new=g_next,
        gtd_new=jnp.dot(g_next, d),
      )

    return jax.lax.cond(found, stop, extrapolate, s)

  s = jax.lax.while_loop(lambda s: ~s.found & (s.ls_iter < max_ls), bracketing, start)
  # Out of evaluations before a bracket: PyTorch's [0, t] (its gtd entries are never read then).
  exhausted = pair((zero, f, g, gtd), (s.t, s.f_new, s.g_new, s.gtd_new))
  bracket = jax.tree.map(lambda a, b: jnp.where(s.ls_iter == max_ls, a, b), exhausted, s.bracket)

  # Phase 2: zoom into the bracket until a point satisfies the conditions.
  class Zoom(NamedTuple):
    ls_iter: jax.Array
    evals: jax.Array
    done: jax.Array
    insuf_progress: jax.Array
    low: jax.Array  # int32: the position of the lower point
    bracket: _Bracket

  def ordered(b):
    return jnp.where(b.f[0] <= b.f[1], 0, 1).astype(jnp.int32)

  def zooming(z: Zoom) -> Zoom:
    b, low = z.bracket, z.low
    high = 1 - low
    t_new = _cubic_interpolate(b.t[0], b.f[0], b.gtd[0], b.t[1], b.f[1], b.gtd[1])
    hi_t, lo_t = _pymax(b.t[0], b.t[1]), _pymin(b.t[0], b.t[1])
    eps = 0.1 * (hi_t - lo_t)
    near = _pymin(hi_t - t_new, t_new - lo_t) < eps
    move = near & (z.insuf_progress | (t_new >= hi_t) | (t_new <= lo_t))
    moved = jnp.where(jnp.abs(t_new - hi_t) < jnp.abs(t_new - lo_t), hi_t - eps, lo_t + eps)
    t_new = jnp.where(move, moved, t_new)
    insuf = near & ~move
    f_next, g_next = obj(x, t_new, d)
    gtd_next = jnp.dot(g_next, d)
    point = (t_new, f_next, g_next, gtd_next)

    def put(br, i, values):
      return _Bracket(*(a.at[i].set(v) for a, v in zip(br, values, strict=True)))

    worse = (f_next > (f + c1 * t_new * gtd)) | (f_next >= b.f[low])
    # Armijo fails or no lower than the lowest point: the new point replaces the high end.
    as_high = put(b, high, point)
    # Otherwise it is the new low end; the old low becomes the high end if the slope says so.
    wolfe = jnp.abs(gtd_next) <= -c2 * gtd
    flip = ~wolfe & (gtd_next * (b.t[high] - b.t[low]) >= 0)
    swapped = put(b, high, tuple(a[low] for a in b))
    as_low = put(jax.tree.map(lambda a, c: jnp.where(flip, a, c), swapped, b), low, point)
    new = jax.tree.map(lambda a, c: jnp.where(worse, a, c), as_high, as_low)
    return Zoom(
      ls_iter=z.ls_iter + 1,
      evals=z.evals + 1,
      done=jnp.where(worse, z.done, wolfe),
      insuf_progress=insuf,
      low=jnp.where(worse, ordered(new), low),
      bracket=new,
    )

  def zoom_on(z: Zoom):
    b = z.bracket
    wide = ~(jnp.abs(b.t[1] - b.t[0]) * d_norm < tolerance_change)
    return ~z.done & (z.ls_iter < max_ls) & wide

  z = Zoom(s.ls_iter, s.evals, s.done, jnp.zeros([], bool), ordered(bracket), bracket)
  z = jax.lax.while_loop(zoom_on, zooming, z)
  b = z.bracket
  return b.f[z.low], b.g[z.low], b.t[z.low], z.evals


class _Loop(NamedTuple):
  """The carry of one `update`'s inner iterations (PyTorch's locals of `step`)."""

  n_iter: jax.Array  # this step's iterations
  state: LbfgsState
  x: jax.Array
  loss: jax.Array
  flat_grad: jax.Array
  opt_cond: jax.Array
  current_evals: jax.Array
  evaluated: jax.Array  # loss and flat_grad are those of x
  stop: jax.Array


def _direction(s: LbfgsState, flat_grad: jax.Array, history_size: int) -> LbfgsState:
  """PyTorch's L-BFGS direction: update the history with (y, s) if y.s > 1e-10, then the two-loop recursion."""
  first = s.n_iter == 1
  y = flat_grad - s.prev_flat_grad
  stp = s.d * s.t
  ys = jnp.dot(y, stp)
  keep = ~first & (ys > _CURVATURE)
  full = s.num_old == history_size

  def shift(a):  # a full history drops its oldest row to make room
    return jnp.where(keep & full, jnp.roll(a, -1, axis=0), a)

  at = jnp.where(full, history_size - 1, s.num_old)
  dirs = shift(s.old_dirs).at[at].set(jnp.where(keep, y, shift(s.old_dirs)[at]))
  stps = shift(s.old_stps).at[at].set(jnp.where(keep, stp, shift(s.old_stps)[at]))
  ro = shift(s.ro).at[at].set(jnp.where(keep, 1.0 / ys, shift(s.ro)[at]))
  num_old = jnp.where(keep & ~full, s.num_old + 1, s.num_old)
  h_diag = jnp.where(keep, ys / jnp.dot(y, y), s.H_diag)

  def backward(j, carry):
    q, al = carry
    i = history_size - 1 - j
    live = i < num_old
    a = jnp.dot(stps[i], q) * ro[i]
    return jnp.where(live, q - a * dirs[i], q), al.at[i].set(jnp.where(live, a, al[i]))

  q, al = jax.lax.fori_loop(0, history_size, backward, (-flat_grad, s.al))
  r = q * h_diag

  def forward(i, r):
    be_i = jnp.dot(dirs[i], r) * ro[i]
    return jnp.where(i < num_old, r + (al[i] - be_i) * stps[i], r)

  d = jax.lax.fori_loop(0, history_size, forward, r)
  one = jnp.ones([], s.H_diag.dtype)
  return s._replace(
    d=jnp.where(first, -flat_grad, d),
    old_dirs=dirs,
    old_stps=stps,
    ro=ro,
    num_old=jnp.where(first, 0, num_old),
    H_diag=jnp.where(first, one, h_diag),
    al=jnp.where(first, s.al, al),
  )


@_registry.stage("lbfgs", state=LbfgsState)
def lbfgs(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  *,
  max_iter: int = 20,
  max_eval: int | None = None,
  tolerance_grad: float = 1e-7,
  tolerance_change: float = 1e-9,
  history_size: int = 100,
  line_search_fn: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""L-BFGS with the algorithm of `torch.optim.LBFGS`; one `update` is one PyTorch ``step(closure)``.

  With :math:`g_k` the gradient at :math:`x_k`, each of up to `max_iter` inner
  iterations takes

  .. math::
      \begin{align*}
        y &= g_k - g_{k-1}, \quad s = t_{k-1} d_{k-1}, \quad
          \text{kept in the history (at most \texttt{history\_size} pairs) if } y^\top s > 10^{-10},
          \quad H_0 = \frac{y^\top s}{y^\top y}\\
        d_k &= -H_k g_k \quad \text{(the two-loop recursion; } d_1 = -g_1\text{)}\\
        t_k &= \alpha \;(t_1 = \min(1, 1/\lVert g_1\rVert_1)\,\alpha), \quad
          \text{or the strong-Wolfe line search from there}
          \;(c_1 = 10^{-4},\ c_2 = 0.9)\\
        x_{k+1} &= x_k + t_k d_k,
      \end{align*}

  and stops, as PyTorch does, after `max_iter` iterations or `max_eval`
  evaluations, when :math:`\max|g| \le` `tolerance_grad`, when
  :math:`g^\top d > -` `tolerance_change`, or when the step or the change of
  the objective falls below `tolerance_change`. Without a line search the
  last iteration does not evaluate the objective (PyTorch's saving).

  Call it as `optax.lbfgs` is called: ``update(grads, state, params,
  value=f(params), value_fn=f)`` with `grads` the gradient of `f` at `params`
  (what PyTorch's first closure call gives); the inner iterations call
  ``jax.value_and_grad(value_fn)``. The updates are the new parameters minus
  the old: `optax.apply_updates` then gives PyTorch's parameters to rounding.
  The state keeps the objective and its gradient at the new parameters (when
  the step evaluated them), so ``optax.value_and_grad_from_state(f)`` saves
  the first evaluation of the next step. The whole step is
  `jax.lax.while_loop`\ s over fixed-size buffers: it compiles under `jax.jit`
  (once: `history_size` fixes the shapes).

  Args:
    learning_rate: :math:`\alpha`, PyTorch's `lr` (default 1): a float, a scalar
      array or a schedule of the update count.
    max_iter: inner iterations per update (PyTorch's default 20).
    max_eval: objective evaluations per update (default ``max_iter * 5 // 4``).
    tolerance_grad: stop when the largest gradient entry is at most this.
    tolerance_change: stop when the step, the objective's change or the
      directional derivative is below this.
    history_size: curvature pairs kept (PyTorch's default 100).
    line_search_fn: None (a fixed step) or ``"strong_wolfe"``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose update takes
    `value` and `value_fn` (and accepts `grad`, as Optax's line searches do).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, jadam
    >>> f = lambda x: jnp.sum((x - 3.0) ** 2)
    >>> tx = jadam.lbfgs(line_search_fn="strong_wolfe")
    >>> x = jnp.zeros(2)
    >>> state = tx.init(x)
    >>> value, grad = jax.value_and_grad(f)(x)
    >>> updates, state = tx.update(grad, state, x, value=value, value_fn=f)
    >>> optax.apply_updates(x, updates)
    Array([3., 3.], dtype=float32)

  References:
    `torch.optim.LBFGS <https://pytorch.org/docs/stable/generated/torch.optim.LBFGS.html>`_;
    Nocedal & Wright, Numerical Optimization, Algorithms 7.4 and 3.5-3.6;
    M. Schmidt, `minFunc <https://www.cs.ubc.ca/~schmidtm/Software/minFunc.html>`_.
  """
  options = _options(max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn)
  _hparams.check_hyperparameter("learning_rate", learning_rate, low=0.0)
  lr_fn = _hparams.as_schedule(learning_rate, "learning_rate")

  def init_fn(params):
    return _init(params, history_size)

  def update_fn(updates, state, params=None, *, value=None, value_fn=None, grad=None, **extra_args):
    del grad, extra_args  # the gradient is `updates`; the rest belongs to other stages of a chain
    if params is None or value is None or value_fn is None:
      raise ValueError(
        f"{_STAGE} needs the parameters, the objective there and the objective itself: call"
        " update(grads, state, params, value=f(params), value_fn=f), as for optax.lbfgs."
      )
    return _update(updates, state, params, value, value_fn, lr_fn, options)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class _Options:
  """PyTorch's stopping rules and line search of one :func:`lbfgs`, checked (`max_eval` resolved)."""

  max_iter: int
  max_eval: int
  tolerance_grad: float
  tolerance_change: float
  history_size: int
  line_search_fn: str | None


def _options(
  max_iter: int,
  max_eval: int | None,
  tolerance_grad: float,
  tolerance_change: float,
  history_size: int,
  line_search_fn: str | None,
) -> _Options:
  """Checks :func:`lbfgs`'s options; `max_eval` defaults to PyTorch's ``max_iter * 5 // 4``."""
  if line_search_fn not in (None, "strong_wolfe"):
    raise ValueError(f"only 'strong_wolfe' is supported as line_search_fn (or None); got {line_search_fn!r}.")
  for name, value in (("max_iter", max_iter), ("history_size", history_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int; got {value!r}.")
  if max_eval is None:
    max_eval = max_iter * 5 // 4
  if isinstance(max_eval, bool) or not isinstance(max_eval, int):
    raise TypeError(f"max_eval must be an int or None; got {max_eval!r}.")
  return _Options(max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn)


def _init(params: optax.Params, history_size: int) -> LbfgsState:
  """PyTorch's empty LBFGS state for `params` flattened: no history, no direction, no evaluation yet."""
  flat, _ = ravel_pytree(params)
  if not jnp.issubdtype(flat.dtype, jnp.floating):
    raise TypeError(f"{_STAGE} takes real floating parameters; they flatten to {flat.dtype}.")
  n, dtype = flat.shape[0], flat.dtype
  zeros, scalar = jnp.zeros(n, dtype), jnp.zeros([], dtype)
  history = jnp.zeros((history_size, n), dtype)
  count = jnp.zeros([], jnp.int32)
  return LbfgsState(
    count=count,
    func_evals=count,
    n_iter=count,
    d=zeros,
    t=scalar,
    old_dirs=history,
    old_stps=history,
    ro=jnp.zeros(history_size, dtype),
    num_old=count,
    H_diag=jnp.ones([], dtype),
    prev_flat_grad=zeros,
    prev_loss=scalar,
    al=jnp.full(history_size, jnp.nan, dtype),
    value=jnp.full([], jnp.inf, dtype),
    grad=optax.tree.zeros_like(params),
  )


class _Objective:
  """`value_fn` and its gradient on the flat parameter vector, in the parameters' dtype (PyTorch's closure)."""

  def __init__(self, value_fn: Callable[[optax.Params], jax.typing.ArrayLike], unravel: Callable, dtype: Any):
    self._value_and_grad = jax.value_and_grad(lambda v: value_fn(unravel(v)))
    self._dtype = dtype

  def at(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The objective and its flat gradient at `x`."""
    f, g = self._value_and_grad(x)
    return jnp.asarray(f).astype(self._dtype), g.astype(self._dtype)

  def along(self, x: jax.Array, t: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The objective and its flat gradient at ``x + t d`` (the line search's `obj_func`)."""
    return self.at(x + t * d)


def _update(
  updates: optax.Updates,
  state: LbfgsState,
  params: optax.Params,
  value: jax.typing.ArrayLike,
  value_fn: Callable[[optax.Params], jax.typing.ArrayLike],
  lr_fn: Callable[[jax.Array], jax.typing.ArrayLike],
  options: _Options,
) -> tuple[optax.Updates, LbfgsState]:
  """One PyTorch ``step(closure)``: the inner iterations from `params`, whose gradient is `updates`."""
  _common.check_state(_STAGE, state, LbfgsState)
  x0, unravel = ravel_pytree(params)
  flat_grad = ravel_pytree(updates)[0].astype(x0.dtype)
  if flat_grad.shape != x0.shape or state.d.shape != x0.shape:
    raise ValueError(f"{_STAGE}: the gradients, the parameters and the state hold different numbers of values.")
  dtype = x0.dtype
  lr = _hparams.cast_hyperparameter(lr_fn(state.count), dtype)
  objective = _Objective(value_fn, unravel, dtype)
  opt_cond = jnp.max(jnp.abs(flat_grad)) <= options.tolerance_grad
  start = _Loop(
    n_iter=jnp.zeros([], jnp.int32),
    state=state._replace(func_evals=state.func_evals + 1),
    x=x0,
    loss=jnp.asarray(value).astype(dtype),
    flat_grad=flat_grad,
    opt_cond=opt_cond,
    current_evals=jnp.ones([], jnp.int32),
    evaluated=jnp.ones([], bool),
    stop=opt_cond,
  )
  end = jax.lax.while_loop(lambda c: ~c.stop, lambda c: _iteration(c, lr, objective, options), start)
  value_now = jnp.where(end.evaluated, end.loss, jnp.inf).astype(dtype)
  grad_tree = unravel(jnp.where(end.evaluated, end.flat_grad, jnp.zeros_like(end.flat_grad)))
  new_state = end.state._replace(count=optax.safe_increment(state.count), value=value_now, grad=grad_tree)
  step = unravel(end.x - x0)
  step = jax.tree.map(lambda u, p: jnp.asarray(u).astype(jnp.asarray(p).dtype), step, params)
  return step, new_state


def _iteration(c: _Loop, lr: jax.typing.ArrayLike, objective: _Objective, options: _Options) -> _Loop:
  """One of PyTorch's inner iterations: the direction, the step length, then the move (unless it is no descent)."""
  n_iter = c.n_iter + 1
  s = _direction(c.state._replace(n_iter=c.state.n_iter + 1), c.flat_grad, options.history_size)
  first_ever = s.n_iter == 1
  t = jnp.where(first_ever, _pymin(jnp.ones([], c.x.dtype), 1.0 / jnp.sum(jnp.abs(c.flat_grad))) * lr, lr)
  s = s._replace(prev_flat_grad=c.flat_grad, prev_loss=c.loss, t=t)
  gtd = jnp.dot(c.flat_grad, s.d)

  def no_descent(c):  # the directional derivative is below tolerance: stop before moving
    return c._replace(n_iter=n_iter, state=s, stop=jnp.ones([], bool))

  def move(c):
    return _move(c, s, n_iter, gtd, objective, options)

  return jax.lax.cond(gtd > -options.tolerance_change, no_descent, move, c)


def _move(
  c: _Loop, s: LbfgsState, n_iter: jax.Array, gtd: jax.Array, objective: _Objective, options: _Options
) -> _Loop:
  """The move along `s.d` (a strong-Wolfe line search, or the fixed step `s.t`), then PyTorch's stopping tests."""
  if options.line_search_fn == "strong_wolfe":
    max_ls = options.max_eval - c.current_evals
    loss, grad, t, evals = _strong_wolfe(
      objective.along, c.x, s.t, s.d, c.loss, c.flat_grad, gtd, max_ls, tolerance_change=options.tolerance_change
    )
    x = c.x + t * s.d
    evaluated = jnp.ones([], bool)
  else:
    t = s.t
    x = c.x + t * s.d
    last = n_iter == options.max_iter  # PyTorch does not evaluate after the last iteration
    loss, grad = jax.lax.cond(last, lambda x: (c.loss, c.flat_grad), objective.at, x)
    evals = jnp.where(last, 0, 1).astype(jnp.int32)
    evaluated = ~last
  opt_cond = jnp.where(evaluated, jnp.max(jnp.abs(grad)) <= options.tolerance_grad, c.opt_cond)
  current_evals = c.current_evals + evals
  new = s._replace(t=t, func_evals=s.func_evals + evals)
  stop = (
    (n_iter == options.max_iter)
    | (current_evals >= options.max_eval)
    | opt_cond
    | (jnp.max(jnp.abs(s.d * t)) <= options.tolerance_change)
    | (jnp.abs(loss - s.prev_loss) < options.tolerance_change)
  )
  return _Loop(n_iter, new, x, loss, grad, opt_cond, current_evals, evaluated, stop)
