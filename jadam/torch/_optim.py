"""`torch.optim`'s optimizers, with PyTorch's arguments, as chains of jadam's stages."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _lbfgs
from jadam import _optimizers as _alias
from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._stages import correct as _correct
from jadam._stages import orthogonal as _orthogonal
from jadam._stages import penalty as _penalty
from jadam._stages import scale as _scale
from jadam._stages.moments import scale_by_moments
from jadam._stages.penalty import add_l2
from jadam._stages.scale import normalize, scale_by_lr
from jadam.torch import _groups
from jadam.torch._schedulers import CyclicLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

Params = Any


def _value(x: Any) -> float | None:
  """A hyperparameter's value if it is a concrete number now (not a schedule or tracer)."""
  if _hparams.is_schedule(x):  # jadam.torch's schedulers are callables too
    return None
  return _hparams.concrete_value(x)


def _at_least_zero(what: str, x: Any) -> None:
  """PyTorch's `if not 0.0 <= x: raise ValueError(f"Invalid {what}: {x}")`."""
  v = _value(x)
  if v is not None and not 0.0 <= v:
    raise ValueError(f"Invalid {what}: {x}")


def _check_lr(lr: Any) -> None:
  if isinstance(lr, bool) or not (
    isinstance(lr, (numbers.Real, jax.Array, np.ndarray, np.generic, LRScheduler, ReduceLROnPlateau)) or callable(lr)
  ):
    raise TypeError(f"lr must be a float, a scalar array, a schedule or a jadam.torch scheduler; got {lr!r}.")
  _at_least_zero("learning rate", lr)


def _check_betas(betas: Any) -> tuple[Any, Any]:
  if not isinstance(betas, (tuple, list)) or len(betas) != 2:
    raise TypeError(f"betas must be a pair (beta1, beta2); got {betas!r}.")
  for i, b in enumerate(betas):
    v = _value(b)
    if v is not None and not 0.0 <= v < 1.0:
      raise ValueError(f"Invalid beta parameter at index {i}: {b}")
  return betas[0], betas[1]


def _cycled_momentum(lr: Any, momentum: Any, optimizer: str) -> Any:
  """OneCycleLR and CyclicLR with cycle_momentum drive the momentum (or beta1), as in PyTorch."""
  if isinstance(lr, (OneCycleLR, CyclicLR)) and lr.cycle_momentum:
    if momentum is None:
      raise ValueError(
        f"optimizer must support momentum or beta1 with `cycle_momentum` option enabled ({optimizer} has"
        f" neither); pass {type(lr).__name__}(..., cycle_momentum=False)."
      )
    return lr.momentum
  return momentum


def _with_lr(make: Callable[[Any], optax.GradientTransformation], lr: Any) -> optax.GradientTransformation:
  """`make(lr)`, or, for ReduceLROnPlateau, `make(1.0)` followed by the plateau's scaling."""
  if isinstance(lr, ReduceLROnPlateau):
    return optax.chain(make(1.0), lr.transform())
  return make(lr)


def _plateau_decoupled(*direction, b1, b2, weight_decay, maximize, plateau, **unused):
  """NAdam/RAdam with decoupled decay under ReduceLROnPlateau: the decay in additive form,
  :math:`-\\eta(u + \\lambda\\theta)`, since the rate lives in the plateau's state."""
  del unused
  return optax.chain(
    *_alias.torch_front(maximize, None),
    scale_by_moments(b1, b2),
    *direction,
    add_l2(weight_decay),
    scale_by_lr(1.0),
    plateau.transform(),
  )


def _rebase(default_lr: Any, group_lr: Any, index: int, n_groups: int) -> Any:
  r"""Group `index`'s learning rate: PyTorch's one rule, a scheduler scales each group from the group's own lr.

  ============================  ==========================  ===================================
  default ``lr``                the group gives a number    the group gives nothing
  ============================  ==========================  ===================================
  a number                      the group's number          the default
  a `jadam.torch` scheduler     the scheduler from the      the scheduler
  (incl. ReduceLROnPlateau)     group's number (`rebase`)
  OneCycleLR / CyclicLR         ignored, as PyTorch: the    the same; a list `max_lr` (and
                                scheduler sets the rates    `base_lr`) gives entry `index`
  an Optax schedule `s`         :math:`\eta_g s(t)/s(0)`    the schedule
  ============================  ==========================  ===================================

  A group that gives its own schedule or scheduler keeps it.
  """
  own = group_lr is not _groups.UNSET
  value = _value(group_lr) if own else None
  if own and value is None:
    return group_lr  # the group's own schedule or scheduler
  if isinstance(default_lr, (OneCycleLR, CyclicLR)):
    return default_lr.for_group(index, n_groups)
  if value is None:  # the group gives no lr
    return default_lr
  _check_lr(group_lr)
  if isinstance(default_lr, (LRScheduler, ReduceLROnPlateau)):
    return default_lr.rebase(value)
  if _hparams.is_schedule(default_lr):
    return _scaled_schedule(default_lr, value)
  return group_lr


def _scaled_schedule(schedule: Callable[[Any], Any], group_lr: float) -> Callable[[Any], Any]:
  """An Optax schedule as a torch scheduler of a group whose initial lr is `group_lr`: `group_lr * s(t) / s(0)`."""
  try:
    first = float(schedule(jnp.zeros([], jnp.int32)))
  except Exception as e:  # noqa: BLE001 - a schedule that cannot be read at step 0 outside a trace
    raise ValueError(
      f"a group's lr of {group_lr} scales the default lr schedule by s(t) / s(0), but s(0) failed: {e}"
    ) from e
  if first == 0.0 or not np.isfinite(first):
    raise ValueError(
      f"a group's lr of {group_lr} scales the default lr schedule by s(t) / s(0), and s(0) is {first}; give the group"
      " its own schedule, or use jadam.torch.LambdaLR(lr, lr_lambda), which scales each group's lr by lr_lambda."
    )
  # s(0) again at each call, in the precision of the call (x64 may be on there and not here).
  return lambda count: group_lr * (jnp.asarray(schedule(count)) / jnp.asarray(schedule(jnp.zeros_like(count))))


def _flag(name: str, x: Any) -> bool:
  if not isinstance(x, bool):
    raise TypeError(f"{name} must be a bool; got {x!r}.")
  return x


# --- The front door, table-driven -------------------------------------------------------------------
# Each optimizer is one Spec: PyTorch's arguments in the order PyTorch checks them, each with its check
# (written once, below) and the jadam keyword it becomes. `_front` builds any of them, per parameter group.


def _lr(x: Any) -> Any:
  _check_lr(x)
  return x


def _nonneg(what: str) -> Callable[[Any], Any]:
  """PyTorch's `if not 0.0 <= x: raise ValueError(f"Invalid {what}: {x}")`."""

  def check(x):
    _at_least_zero(what, x)
    return x

  return check


def _within(what: str, low: float, high: float) -> Callable[[Any], Any]:
  def check(x):
    v = _value(x)
    if v is not None and not low <= v <= high:
      raise ValueError(f"Invalid {what}: {x}")
    return x

  return check


def _positive(what: str) -> Callable[[Any], Any]:
  """PyTorch's `if not 0.0 < x: raise ValueError(f"Invalid {what}: {x}")` (SparseAdam's lr and eps)."""

  def check(x):
    v = _value(x)
    if v is not None and not 0.0 < v:
      raise ValueError(f"Invalid {what}: {x}")
    return x

  return check


def _positive_lr(x: Any) -> Any:
  return _positive("learning rate")(_lr(x))


def _no_amsgrad(x: Any) -> bool:
  if _flag("amsgrad", x):
    raise ValueError("bitsandbytes' 8-bit Adam does not support amsgrad=True")
  return x


def _bool(name: str) -> Callable[[Any], bool]:
  return lambda x: _flag(name, x)


def _pair(name: str, what: str) -> Callable[[Any], tuple]:
  def check(x):
    if not isinstance(x, (tuple, list)) or len(x) != 2:
      raise TypeError(f"{name} must be a pair {what}; got {x!r}.")
    return tuple(x)

  return check


def _etas(x: Any) -> tuple:
  x = _pair("etas", "(etaminus, etaplus)")(x)
  if not 0.0 < x[0] < 1.0 < x[1]:
    raise ValueError(f"Invalid eta values: {x[0]}, {x[1]}")
  return x


def _any(x: Any) -> Any:
  return x


# --- LBFGS --------------------------------------------------------------------------------


def _positive_int(name: str) -> Callable[[Any], int]:
  def check(x):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
      raise ValueError(f"LBFGS's {name} must be a positive int; got {x!r}.")
    return int(x)

  return check


def _line_search(x: Any) -> Any:
  if x not in (None, "strong_wolfe"):
    raise ValueError(f"only 'strong_wolfe' is supported (or None); got line_search_fn={x!r}.")  # torch: at step()
  return x


def _lbfgs_lr(x: Any) -> Any:
  if isinstance(x, ReduceLROnPlateau):
    raise TypeError(
      "jadam.torch.LBFGS does not take a ReduceLROnPlateau: its lr is the inner iterations' step length, not a"
      " scale of the update. Pass a number or a schedule."
    )
  return _lr(x)


_EPS = ("eps", _nonneg("epsilon value"), "eps")
_BETAS = ("betas", _check_betas, ("b1", "b2"))
_WD = ("weight_decay", _nonneg("weight_decay value"), "weight_decay")
_MAXIMIZE = ("maximize", _bool("maximize"), "maximize")
_DECOUPLED = ("decoupled_weight_decay", _bool("decoupled_weight_decay"), "decoupled_weight_decay")


@dataclasses.dataclass(frozen=True)
class Spec:
  """One `torch.optim` optimizer as a table.

  Attributes:
    alias: the jadam recipe, called as ``alias(lr, **keywords)`` (through `_with_lr`, so that a
      ReduceLROnPlateau takes the learning-rate stage's place).
    args: ``(torch argument, check, jadam keyword)`` for each argument but `lr` (always checked first),
      in PyTorch's order. `check(value)` raises PyTorch's error and returns the keyword's value; a tuple
      keyword takes a pair (betas -> b1, b2); keyword None: read by `make` only.
    momentum: the keyword that a OneCycleLR or CyclicLR with `cycle_momentum` drives; None where the
      optimizer has none (PyTorch then refuses such a scheduler).
    make: ``make(spec, hp, keywords)`` in place of the alias call, where a recipe needs more (Adam's
      decoupled decay, NAdam/RAdam's decay under ReduceLROnPlateau, SGD's Nesterov check).
    lr_check: the check of `lr`.
  """

  alias: Callable[..., optax.GradientTransformation]
  args: tuple
  momentum: str | None = None
  make: Callable[[Spec, dict, dict], optax.GradientTransformation] | None = None
  lr_check: Callable[[Any], Any] = _lr


def _front(name: str, spec: Spec, params: Params, defaults: dict) -> optax.GradientTransformation:
  """`torch.optim.<name>(params, **defaults)` from its spec, one recipe per parameter group."""

  def build(hp):
    spec.lr_check(hp["lr"])
    kw: dict[str, Any] = {}
    for arg, check, key in spec.args:
      value = check(hp[arg])
      if isinstance(key, tuple):
        kw.update(zip(key, value, strict=True))
      elif key is not None:
        kw[key] = value
    cycled = _cycled_momentum(hp["lr"], kw.get(spec.momentum) if spec.momentum else None, name)
    if spec.momentum:
      kw[spec.momentum] = cycled
    if spec.make is not None:
      return spec.make(spec, hp, kw)
    return _with_lr(lambda a: spec.alias(a, **kw), hp["lr"])

  return _groups.grouped(name, params, defaults, build, rebase=_rebase)


def _make_adam(spec: Spec, hp: dict, kw: dict) -> optax.GradientTransformation:
  """Adam and AdamW: PyTorch's decoupled decay multiplies the parameters by 1 - lr wd (jadam.decoupled_decay)."""
  del spec
  if not hp["decoupled_weight_decay"]:
    return _with_lr(lambda a: _alias.adam(a, **kw), hp["lr"])
  if isinstance(hp["lr"], ReduceLROnPlateau):  # the rate lives in the plateau's state: additive form
    return _with_lr(lambda a: _alias.adamw(a, **kw), hp["lr"])
  return optax.chain(
    _alias.adam(hp["lr"], **{**kw, "weight_decay": 0.0}), _penalty.decoupled_decay(hp["weight_decay"], hp["lr"])
  )


def _make_sgd(spec: Spec, hp: dict, kw: dict) -> optax.GradientTransformation:
  m, d = _value(kw["momentum"]), _value(kw["dampening"])
  if kw["nesterov"] and ((m is not None and m <= 0) or (d is not None and d != 0)):
    raise ValueError("Nesterov momentum requires a momentum and zero dampening")
  return _with_lr(lambda a: spec.alias(a, **kw), hp["lr"])


def _make_nadam_radam(spec: Spec, hp: dict, kw: dict) -> optax.GradientTransformation:
  """NAdam and RAdam, one builder: under ReduceLROnPlateau their decoupled decay takes the additive form."""
  if kw["decoupled_weight_decay"] and isinstance(hp["lr"], ReduceLROnPlateau):
    direction: tuple[optax.GradientTransformation, ...]
    if spec.alias is _alias.nadam:
      direction = (_correct.nesterov_correct(kw["momentum_decay"]), normalize(kw["eps"]))
    else:
      direction = (_correct.rectify(kw["eps"]),)
    return _plateau_decoupled(*direction, **kw, plateau=hp["lr"])
  return _with_lr(lambda a: spec.alias(a, **kw), hp["lr"])


# --- Rprop with a scheduler, ASGD with ReduceLROnPlateau ----------------------------------


def _make_rprop(spec: Spec, hp: dict, kw: dict) -> optax.GradientTransformation:
  """Rprop: a scheduler sets the initial step sizes (its rate at step 0) and nothing else, as in PyTorch.

  PyTorch's Rprop reads the group's lr once, when the first `step()` fills its
  state, after the scheduler's construction has set it: a LinearLR with
  `start_factor=0.5` halves the initial step sizes; later scheduler steps change
  nothing. A warning says so (PyTorch says nothing).
  """
  lr = hp["lr"]
  if _value(lr) is not None:
    return spec.alias(lr, **kw)
  warnings.warn(
    "jadam.torch.Rprop: lr is a schedule or scheduler. As in PyTorch, Rprop reads the rate only once, to set"
    " the initial step sizes (the schedule's value at step 0); its later values have no effect.",
    UserWarning,
    stacklevel=4,
  )

  def first_rate():
    return lr.lr if isinstance(lr, ReduceLROnPlateau) else lr(jnp.zeros([], jnp.int32))

  # Built at init, in the precision of the run (x64 may be on there and not here); update reads no rate.
  def init_fn(params):
    return spec.alias(first_rate(), **kw).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # a ReduceLROnPlateau's metric: read by nothing
    return spec.alias(1.0, **kw).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AsgdOnPlateauState(NamedTuple):
  """State of `jadam.torch.ASGD(lr=ReduceLROnPlateau(...))`."""

  asgd: Any  # jadam.asgd's state
  plateau: Any  # ReduceLROnPlateauState: the rate of the coming update, and the plateau's counters
  last_lr: jax.Array  # the rate of the previous update, which ASGD's eta reads


def _make_asgd(spec: Spec, hp: dict, kw: dict) -> optax.GradientTransformation:
  r"""ASGD; with ReduceLROnPlateau, the plateau's rate enters ASGD's step size one step late, as in PyTorch.

  PyTorch's ASGD moves by the `eta` it stored at the end of the previous step,
  :math:`\eta_{t} = \alpha_{t-1} / (1 + \lambda \alpha_{t-1} (t-1))^{a}`, with
  :math:`\alpha_{t-1}` the group's lr during that step; `scheduler.step(metric)`
  after step :math:`t-1` changes the lr of step :math:`t`, which reaches `eta`
  at step :math:`t+1`. The rate never scales the update otherwise.
  """
  plateau = hp["lr"]
  if not isinstance(plateau, ReduceLROnPlateau):
    return spec.alias(plateau, **kw)
  schedule = plateau.transform()

  def init_fn(params):
    p = schedule.init(params)
    return AsgdOnPlateauState(asgd=spec.alias(1.0, **kw).init(params), plateau=p, last_lr=p.lr)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    _common.check_state("jadam.torch.ASGD", state, AsgdOnPlateauState)
    last = state.last_lr
    # eta after c steps reads the rate at count c - 1 (the first step, count 0, reads it too): `last`.
    updates, inner = spec.alias(lambda count: last, **kw).update(updates, state.asgd, params)
    _, fed = schedule.update({}, state.plateau, value=value)  # the plateau's rule only: it scales nothing here
    return updates, AsgdOnPlateauState(asgd=inner, plateau=fed, last_lr=state.plateau.lr)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_ADAM = Spec(
  _alias.adam,
  (_EPS, _BETAS, _WD, ("amsgrad", _bool("amsgrad"), "amsgrad"), _MAXIMIZE, (*_DECOUPLED[:2], None)),
  momentum="b1",
  make=_make_adam,
)
_ADAM8BIT = Spec(
  _alias.adamw8bit,
  (_EPS, _BETAS, _WD, ("amsgrad", _no_amsgrad, None), ("min_8bit_size", _any, "min_8bit_size")),
  momentum="b1",
)
SPECS = {
  "Adam": _ADAM,
  "AdamW": _ADAM,
  "SGD": Spec(
    _alias.sgd,
    (
      ("momentum", _nonneg("momentum value"), "momentum"),
      _WD,
      ("dampening", _any, "dampening"),
      ("nesterov", _bool("nesterov"), "nesterov"),
      _MAXIMIZE,
    ),
    momentum="momentum",
    make=_make_sgd,
  ),
  "RMSprop": Spec(
    _alias.rmsprop,
    (
      _EPS,
      ("momentum", _nonneg("momentum value"), "momentum"),
      _WD,
      ("alpha", _nonneg("alpha value"), "alpha"),
      ("centered", _bool("centered"), "centered"),
      _MAXIMIZE,
    ),
    momentum="momentum",
  ),
  "Adagrad": Spec(
    _alias.adagrad,
    (
      ("lr_decay", _nonneg("lr_decay value"), "lr_decay"),
      _WD,
      ("initial_accumulator_value", _nonneg("initial_accumulator_value value"), "initial_accumulator_value"),
      _EPS,
      _MAXIMIZE,
    ),
  ),
  "Adamax": Spec(_alias.adamax, (_EPS, _BETAS, _WD, _MAXIMIZE), momentum="b1"),
  "NAdam": Spec(
    _alias.nadam,
    (_EPS, _BETAS, _WD, ("momentum_decay", _nonneg("momentum_decay value"), "momentum_decay"), _DECOUPLED, _MAXIMIZE),
    momentum="b1",
    make=_make_nadam_radam,
  ),
  "RAdam": Spec(_alias.radam, (_EPS, _BETAS, _WD, _DECOUPLED, _MAXIMIZE), momentum="b1", make=_make_nadam_radam),
  "Adadelta": Spec(_alias.adadelta, (("rho", _within("rho value", 0.0, 1.0), "rho"), _EPS, _WD, _MAXIMIZE)),
  "Rprop": Spec(
    _alias.rprop,
    (("etas", _etas, "etas"), ("step_sizes", _pair("step_sizes", "(min, max)"), "step_sizes"), _MAXIMIZE),
    make=_make_rprop,
  ),
  "ASGD": Spec(
    _alias.asgd,
    (("lambd", _any, "lambd"), ("alpha", _any, "alpha"), ("t0", _any, "t0"), _WD, _MAXIMIZE),
    make=_make_asgd,
  ),
  "LBFGS": Spec(
    _lbfgs.lbfgs,
    (
      ("max_iter", _positive_int("max_iter"), "max_iter"),
      ("max_eval", _positive_int("max_eval"), "max_eval"),
      ("tolerance_grad", _any, "tolerance_grad"),
      ("tolerance_change", _any, "tolerance_change"),
      ("history_size", _positive_int("history_size"), "history_size"),
      ("line_search_fn", _line_search, "line_search_fn"),
    ),
    lr_check=_lbfgs_lr,
  ),
  "SparseAdam": Spec(
    _alias.sparse_adam,
    (("eps", _positive("epsilon value"), "eps"), _BETAS, _MAXIMIZE),
    momentum="b1",
    lr_check=_positive_lr,
  ),
  # bitsandbytes' "adam" kernel serves both: decoupled decay, differing only in the default weight_decay
  "Adam8bit": _ADAM8BIT,
  "AdamW8bit": _ADAM8BIT,
}


def Adam(
  params: Params = None,
  lr: Any = 1e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  amsgrad: bool = False,
  *,
  foreach: bool | None = None,
  maximize: bool = False,
  capturable: bool = False,
  differentiable: bool = False,
  fused: bool | None = None,
  decoupled_weight_decay: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.Adam`: :func:`jadam.adam` (or :func:`jadam.adamw` if `decoupled_weight_decay`).

  Args:
    params: PyTorch's first argument. None or the parameter pytree: one group,
      every leaf uses the keyword arguments. Or a list of parameter groups: dicts
      whose ``"params"`` selects leaves (a regular expression matched in full
      against the ``/``-joined key path, e.g. ``"encoder/.*"``; a predicate
      ``(path, leaf) -> bool``; or a list of these) and whose other keys override
      any keyword argument for those leaves. Unselected leaves use the keyword
      arguments; a leaf selected by two groups is an error, as in PyTorch.
    lr: a float, a scalar array, an Optax schedule or a `jadam.torch` scheduler.
    betas: :math:`(\beta_1, \beta_2)`.
    eps: added to :math:`\sqrt{\hat v_t}`.
    weight_decay: coupled L2 (decoupled if `decoupled_weight_decay`).
    amsgrad: PyTorch's AMSGrad (maximum of the raw :math:`v_t`).
    foreach, capturable, differentiable, fused: accepted and ignored: they
      choose PyTorch kernels, not the arithmetic.
    maximize: ascend instead.
    decoupled_weight_decay: AdamW's decay.

  Returns:
    An :class:`optax.GradientTransformation` (with extra args if `lr` is a
    :class:`ReduceLROnPlateau`).
  """
  del foreach, capturable, differentiable, fused
  defaults = dict(
    lr=lr,
    betas=betas,
    eps=eps,
    weight_decay=weight_decay,
    amsgrad=amsgrad,
    maximize=maximize,
    decoupled_weight_decay=decoupled_weight_decay,
  )
  return _front("Adam", SPECS["Adam"], params, defaults)


def AdamW(
  params: Params = None,
  lr: Any = 1e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 1e-2,
  amsgrad: bool = False,
  *,
  maximize: bool = False,
  foreach: bool | None = None,
  capturable: bool = False,
  differentiable: bool = False,
  fused: bool | None = None,
) -> optax.GradientTransformation:
  r"""`torch.optim.AdamW`: :func:`jadam.adamw`, decay :math:`\theta \leftarrow \theta(1 - \alpha\lambda)`.

  Arguments and defaults are PyTorch's (weight_decay :math:`10^{-2}`); see :func:`Adam`.
  """
  del foreach, capturable, differentiable, fused
  defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
  return _front("AdamW", SPECS["AdamW"], params, {**defaults, "decoupled_weight_decay": True})


def SGD(
  params: Params = None,
  lr: Any = 1e-3,
  momentum: Any = 0.0,
  dampening: Any = 0.0,
  weight_decay: Any = 0.0,
  nesterov: bool = False,
  *,
  maximize: bool = False,
  foreach: bool | None = None,
  differentiable: bool = False,
  fused: bool | None = None,
) -> optax.GradientTransformation:
  r"""`torch.optim.SGD`: :func:`jadam.sgd` (:math:`b_1 = g_1`, dampening, Nesterov).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del foreach, differentiable, fused
  defaults = dict(
    lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
  )
  return _front("SGD", SPECS["SGD"], params, defaults)


def RMSprop(
  params: Params = None,
  lr: Any = 1e-2,
  alpha: Any = 0.99,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  momentum: Any = 0.0,
  centered: bool = False,
  capturable: bool = False,
  foreach: bool | None = None,
  maximize: bool = False,
  differentiable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.RMSprop`: :func:`jadam.rmsprop` (eps outside the root, momentum after the division).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del capturable, foreach, differentiable
  defaults = dict(
    lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize
  )
  return _front("RMSprop", SPECS["RMSprop"], params, defaults)


def Adagrad(
  params: Params = None,
  lr: Any = 1e-2,
  lr_decay: Any = 0.0,
  weight_decay: Any = 0.0,
  initial_accumulator_value: float = 0.0,
  eps: Any = 1e-10,
  foreach: bool | None = None,
  *,
  maximize: bool = False,
  differentiable: bool = False,
  fused: bool | None = None,
) -> optax.GradientTransformation:
  r"""`torch.optim.Adagrad`: :func:`jadam.adagrad` (rate :math:`\alpha / (1 + (t-1)\eta)`).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del foreach, differentiable, fused
  defaults = dict(
    lr=lr,
    lr_decay=lr_decay,
    weight_decay=weight_decay,
    initial_accumulator_value=initial_accumulator_value,
    eps=eps,
    maximize=maximize,
  )
  return _front("Adagrad", SPECS["Adagrad"], params, defaults)


def Adamax(
  params: Params = None,
  lr: Any = 2e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  foreach: bool | None = None,
  *,
  maximize: bool = False,
  differentiable: bool = False,
  capturable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.Adamax`: :func:`jadam.adamax` (eps inside the maximum).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del foreach, differentiable, capturable
  defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
  return _front("Adamax", SPECS["Adamax"], params, defaults)


def NAdam(
  params: Params = None,
  lr: Any = 2e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  momentum_decay: Any = 4e-3,
  decoupled_weight_decay: bool = False,
  *,
  foreach: bool | None = None,
  maximize: bool = False,
  capturable: bool = False,
  differentiable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.NAdam`: :func:`jadam.nadam` (Dozat's momentum schedule).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del foreach, capturable, differentiable
  defaults = dict(
    lr=lr,
    betas=betas,
    eps=eps,
    weight_decay=weight_decay,
    momentum_decay=momentum_decay,
    decoupled_weight_decay=decoupled_weight_decay,
    maximize=maximize,
  )
  return _front("NAdam", SPECS["NAdam"], params, defaults)


def RAdam(
  params: Params = None,
  lr: Any = 1e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  decoupled_weight_decay: bool = False,
  *,
  foreach: bool | None = None,
  maximize: bool = False,
  capturable: bool = False,
  differentiable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.RAdam`: :func:`jadam.radam` (rectified once :math:`\rho_t > 5`).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del foreach, capturable, differentiable
  defaults = dict(
    lr=lr,
    betas=betas,
    eps=eps,
    weight_decay=weight_decay,
    decoupled_weight_decay=decoupled_weight_decay,
    maximize=maximize,
  )
  return _front("RAdam", SPECS["RAdam"], params, defaults)


def Adadelta(
  params: Params = None,
  lr: Any = 1.0,
  rho: Any = 0.9,
  eps: Any = 1e-6,
  weight_decay: Any = 0.0,
  foreach: bool | None = None,
  *,
  capturable: bool = False,
  maximize: bool = False,
  differentiable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.Adadelta`: :func:`jadam.adadelta` (eps inside both roots).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`.
  """
  del foreach, capturable, differentiable
  defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
  return _front("Adadelta", SPECS["Adadelta"], params, defaults)


def Rprop(
  params: Params = None,
  lr: Any = 1e-2,
  etas: tuple[float, float] = (0.5, 1.2),
  step_sizes: tuple[float, float] = (1e-6, 50),
  *,
  capturable: bool = False,
  foreach: bool | None = None,
  maximize: bool = False,
  differentiable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.Rprop`: :func:`jadam.rprop` (the learning rate is the initial step size).

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups). PyTorch reads
  `lr` once, to start the step sizes: a scheduler (or schedule) is accepted, as PyTorch accepts one, with
  a warning; its rate at step 0 starts the step sizes (a `LinearLR(start_factor=0.5)` halves them, as in
  PyTorch) and its later rates have no effect.
  """
  del capturable, foreach, differentiable
  defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize)
  return _front("Rprop", SPECS["Rprop"], params, defaults)


def ASGD(
  params: Params = None,
  lr: Any = 1e-2,
  lambd: float = 1e-4,
  alpha: float = 0.75,
  t0: float = 1e6,
  weight_decay: Any = 0.0,
  foreach: bool | None = None,
  maximize: bool = False,
  differentiable: bool = False,
  capturable: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.ASGD`: :func:`jadam.asgd`; the averaged parameters (`ax`) are in the state.

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups) and `lr`
  (a schedule is read as PyTorch reads the group's rate each step). The rate enters only ASGD's step
  size :math:`\eta_{t+1} = \alpha_t / (1 + \lambda \alpha_t t)^{a}`, one step late, with a
  :class:`ReduceLROnPlateau` too (then pass the metric: ``update(grads, state, params, value=metric)``).
  """
  del foreach, differentiable, capturable
  defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize)
  return _front("ASGD", SPECS["ASGD"], params, defaults)


def SparseAdam(
  params: Params = None,
  lr: Any = 1e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.SparseAdam`: :func:`jadam.sparse_adam`, lazy Adam for row-sparse (`BCOO`) gradients.

  Arguments, defaults and argument checks are PyTorch's (`lr` and `eps` must be
  positive); see :func:`Adam` for `params` (parameter groups) and `lr`. Every
  leaf it optimizes must get a row-sparse gradient (dense ones are refused, as
  PyTorch refuses them): give dense layers another optimizer with
  `optax.partition`, as the README shows.
  """
  defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
  return _front("SparseAdam", SPECS["SparseAdam"], params, defaults)


def _bnb_only(name: str, args: Any, optim_bits: Any) -> None:
  """bitsandbytes' arguments that jadam cannot honour."""
  if args is not None:
    raise NotImplementedError(f"{name}: bitsandbytes' `args` (a GlobalOptimManager config) has no jadam equivalent.")
  if optim_bits != 32:
    raise ValueError(f"{name} only supports optim_bits=32 (default value for compatibility)")


def Adam8bit(
  params: Params = None,
  lr: Any = 1e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0,
  amsgrad: bool = False,
  optim_bits: int = 32,
  args: Any = None,
  min_8bit_size: int = 4096,
  is_paged: bool = False,
) -> optax.GradientTransformation:
  r"""bitsandbytes' `bnb.optim.Adam8bit`: :func:`jadam.adamw8bit`, with its arguments and defaults.

  .. math::
      \theta_t = \theta_{t-1}(1 - \alpha\lambda) - \alpha \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon},

  with :math:`m, v` stored in 8 bits, blocks of 256 (see :func:`jadam.adam8bit`).
  As in bitsandbytes, whose "adam" kernel serves both Adam8bit and AdamW8bit,
  `weight_decay` is *decoupled* (multiplies the parameters by
  :math:`1 - \alpha\lambda`), not PyTorch Adam's L2 gradient term; the two
  differ only in the default :math:`\lambda`.

  Args:
    params: None, the parameter pytree, or a list of parameter groups, as in
      :func:`Adam`; a group may override `lr`, `betas`, `eps`, `weight_decay`
      and `min_8bit_size`.
    lr, betas, eps, weight_decay: as in bitsandbytes.
    amsgrad: must be False, as in bitsandbytes.
    optim_bits: must be 32 (bitsandbytes keeps it for compatibility).
    args: must be None (bitsandbytes' GlobalOptimManager overrides).
    min_8bit_size: tensors with fewer elements keep float32 moments.
    is_paged: accepted and ignored (memory placement, not arithmetic).

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  del is_paged
  defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, min_8bit_size=min_8bit_size)
  _bnb_only("Adam8bit", args, optim_bits)
  return _front("Adam8bit", SPECS["Adam8bit"], params, defaults)


def AdamW8bit(
  params: Params = None,
  lr: Any = 1e-3,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 1e-2,
  amsgrad: bool = False,
  optim_bits: int = 32,
  args: Any = None,
  min_8bit_size: int = 4096,
  is_paged: bool = False,
) -> optax.GradientTransformation:
  r"""bitsandbytes' `bnb.optim.AdamW8bit`: :func:`Adam8bit` with `weight_decay=1e-2` by default.

  Args:
    params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged: as in :func:`Adam8bit`.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  del is_paged
  defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, min_8bit_size=min_8bit_size)
  _bnb_only("AdamW8bit", args, optim_bits)
  return _front("AdamW8bit", SPECS["AdamW8bit"], params, defaults)


# --- Adafactor and Muon --------------------------------------------------------------------------
def _at_most(what: str, bound: float) -> Callable[[Any], Any]:
  """PyTorch's `if not bound >= x: raise ValueError(f"{what} should be <= bound but is: {x}")`."""

  def check(x):
    v = _value(x)
    if v is not None and not v <= bound:
      raise ValueError(f"{what} should be <= {bound} but is: {x}")
    return x

  return check


def _adafactor_eps(x: Any) -> tuple:
  eps1, eps2 = _pair("eps", "(epsilon1 or None, epsilon2)")(x)
  for what, v in (("epsilon1", eps1), ("epsilon2", eps2)):
    n = None if v is None and what == "epsilon1" else _value(v)
    if v is None and what == "epsilon2":
      raise TypeError("eps[1] (epsilon2) must be a number; only eps[0] may be None.")
    if n is not None and not 0.0 <= n:
      raise ValueError(f"{what} should be >= 0 but is: {v}")
  return eps1, eps2


def _d(x: Any) -> Any:
  v = _value(x)
  if v is not None and not 1.0 <= v:
    raise ValueError(f"Clipping threshold d should be >= 1 but is: {x}")
  return x


def _lr_not_plateau(optimizer: str, why: str) -> Callable[[Any], Any]:
  def check(x):
    if isinstance(x, ReduceLROnPlateau):
      raise TypeError(f"{optimizer}: ReduceLROnPlateau is not supported: {why}; pass a schedule or scheduler.")
    return _lr(x)

  return check


def _adjust_lr_fn(x: Any) -> str:
  if x is not None and x not in ("original", "match_rms_adamw"):
    raise ValueError(f"Adjust learning rate function {x} is not supported")
  return "original" if x is None else x


def _ns_coefficients(x: Any) -> tuple:
  if not isinstance(x, (tuple, list)) or len(x) != 3:
    raise ValueError(f"Coefficients must be a tuple of exactly 3 values; got {x!r}.")
  return tuple(x)


def _ns_steps(x: Any) -> int:
  if isinstance(x, bool) or not isinstance(x, int):
    raise TypeError(f"ns_steps must be an int; got {x!r}.")
  if x >= 100:
    raise ValueError("Number of steps must be less than 100 for computational efficiency")
  return x


def _make_muon(spec: Spec, hp: dict, kw: dict) -> optax.GradientTransformation:
  """Muon; under ReduceLROnPlateau its decoupled decay takes the additive form (the rate lives in the plateau)."""
  if not isinstance(hp["lr"], ReduceLROnPlateau):
    return spec.alias(hp["lr"], **kw)
  ns_dtype = typing.cast(functools.partial, spec.alias).keywords["ns_dtype"]  # Muon() binds it
  return optax.chain(
    _scale.momentum(kw["momentum"], nesterov=kw["nesterov"], ema=True),
    _orthogonal.orthogonalize(
      kw["ns_coefficients"], kw["ns_steps"], kw["eps"], shape_scaling=kw["adjust_lr_fn"], ns_dtype=ns_dtype
    ),
    add_l2(kw["weight_decay"]),
    scale_by_lr(1.0),
    hp["lr"].transform(),
  )


SPECS["Adafactor"] = Spec(
  _alias.adafactor,
  (
    ("beta2_decay", _at_most("beta2_decay", 0.0), "beta2_decay"),
    ("eps", _adafactor_eps, ("eps", "eps_scale")),
    ("d", _d, "clipping_threshold"),
    _WD,
    _MAXIMIZE,
  ),
  lr_check=_lr_not_plateau("Adafactor", "its rate enters min(lr, 1/sqrt(t)), not a product"),
)
SPECS["Muon"] = Spec(
  _alias.muon,
  (
    ("weight_decay", _nonneg("weight decay"), "weight_decay"),
    ("momentum", _nonneg("momentum"), "momentum"),
    ("nesterov", _bool("nesterov"), "nesterov"),
    ("ns_coefficients", _ns_coefficients, "ns_coefficients"),
    ("eps", _any, "eps"),
    ("ns_steps", _ns_steps, "ns_steps"),
    ("adjust_lr_fn", _adjust_lr_fn, "adjust_lr_fn"),
  ),
  momentum="momentum",
  make=_make_muon,
)


def Adafactor(
  params: Params = None,
  lr: Any = 1e-2,
  beta2_decay: Any = -0.8,
  eps: tuple[Any, Any] = (None, 1e-3),
  d: Any = 1.0,
  weight_decay: Any = 0.0,
  *,
  foreach: bool | None = None,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""`torch.optim.Adafactor`: :func:`jadam.adafactor`, factored second moments and a relative step.

  The step size is :math:`\min(\alpha, 1/\sqrt t)` times the parameter's RMS (at least epsilon2).

  Arguments, defaults and argument checks are PyTorch's: ``eps = (epsilon1, epsilon2)``
  (epsilon1 None: each parameter dtype's machine epsilon), `d` the clipping
  threshold, `weight_decay` decoupled (:math:`\theta(1 - \alpha\lambda)`); see
  :func:`Adam` for `params` (parameter groups) and `lr`, which may be a
  schedule or a `jadam.torch` scheduler, but not ReduceLROnPlateau (the rate
  enters :math:`\min(\alpha, 1/\sqrt t)`, which no multiplier can follow).
  State dicts carry PyTorch's `step`, `row_var`, `col_var` and `variance`.
  """
  defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize)
  del foreach
  return _front("Adafactor", SPECS["Adafactor"], params, defaults)


def Muon(
  params: Params = None,
  lr: Any = 1e-3,
  weight_decay: Any = 0.1,
  momentum: Any = 0.95,
  nesterov: bool = True,
  ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
  eps: Any = 1e-7,
  ns_steps: int = 5,
  adjust_lr_fn: str | None = None,
  *,
  ns_dtype: Any = jnp.bfloat16,
) -> optax.GradientTransformation:
  r"""`torch.optim.Muon`: :func:`jadam.muon`, for 2-D parameters only (its init refuses others).

  Arguments, defaults and argument checks are PyTorch's (`adjust_lr_fn` None is
  ``"original"``); see :func:`Adam` for `params` (parameter groups) and `lr`.
  As in PyTorch, give the parameters that are not hidden 2-D weights another
  optimizer: where PyTorch runs two optimizers, jadam partitions one tree::

      tx = optax.partition(
          {"muon": jadam.torch.Muon(lr=0.02), "adamw": jadam.torch.AdamW(lr=3e-4, weight_decay=0.01)},
          lambda params: jax.tree.map(lambda p: "muon" if p.ndim == 2 else "adamw", params))

  Args:
    ns_dtype: jadam's only addition, keyword-only: the dtype of the
      Newton–Schulz iteration, bfloat16 as PyTorch hard-codes; None runs it in
      the parameters' dtype.

  State dicts carry PyTorch's `momentum_buffer` (and no step, as PyTorch's).
  """
  defaults = dict(
    lr=lr,
    weight_decay=weight_decay,
    momentum=momentum,
    nesterov=nesterov,
    ns_coefficients=ns_coefficients,
    eps=eps,
    ns_steps=ns_steps,
    adjust_lr_fn=adjust_lr_fn,
  )
  _common.check_dtype("ns_dtype", ns_dtype)
  spec = dataclasses.replace(SPECS["Muon"], alias=functools.partial(_alias.muon, ns_dtype=ns_dtype))
  return _front("Muon", spec, params, defaults)


def LBFGS(
  params: Params = None,
  lr: Any = 1,
  max_iter: int = 20,
  max_eval: int | None = None,
  tolerance_grad: float = 1e-7,
  tolerance_change: float = 1e-9,
  history_size: int = 100,
  line_search_fn: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""`torch.optim.LBFGS`: :func:`jadam.lbfgs`; one ``update`` is one PyTorch ``step(closure)``.

  PyTorch's closure becomes Optax's line-search convention::

      # torch                                   # jadam
      def closure():                            value, grads = jax.value_and_grad(f)(params)
        opt.zero_grad(); loss = f(model)        updates, state = tx.update(
        loss.backward(); return loss                grads, state, params, value=value, value_fn=f)
      opt.step(closure)                         params = optax.apply_updates(params, updates)

  (``optax.value_and_grad_from_state(f)(params, state=state)`` in place of
  ``jax.value_and_grad`` reuses the evaluation the step ended with.)
  Arguments and defaults are PyTorch's (`max_eval` defaults to
  ``max_iter * 5 // 4``). As in PyTorch there is one parameter group: `params`
  may be None or the parameter pytree, not a list of groups. `lr` may be a
  number, a schedule or a `jadam.torch` scheduler of the update count; a
  ReduceLROnPlateau is refused. An unknown `line_search_fn` is refused here
  (PyTorch refuses it at the first `step`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  if _groups._is_group_list(params):
    raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
  if max_eval is None:
    max_eval = max_iter * 5 // 4
  defaults = dict(
    lr=lr,
    max_iter=max_iter,
    max_eval=max_eval,
    tolerance_grad=tolerance_grad,
    tolerance_change=tolerance_change,
    history_size=history_size,
    line_search_fn=line_search_fn,
  )
  return _front("LBFGS", SPECS["LBFGS"], params, defaults)
