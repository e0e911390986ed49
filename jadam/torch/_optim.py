"""`torch.optim`'s optimizers, with PyTorch's arguments, as chains of jadam's stages."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _optimizers as _alias
from jadam._core import hparams as _hparams
from jadam._stages import correct as _correct
from jadam._stages import penalty as _penalty
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
  if own and _value(group_lr) is None:
    return group_lr  # the group's own schedule or scheduler
  if isinstance(default_lr, (OneCycleLR, CyclicLR)):
    return default_lr.for_group(index, n_groups)
  if not own:
    return default_lr
  _check_lr(group_lr)
  if isinstance(default_lr, (LRScheduler, ReduceLROnPlateau)):
    return default_lr.rebase(_value(group_lr))
  if _hparams.is_schedule(default_lr):
    return _scaled_schedule(default_lr, _value(group_lr))
  return group_lr


def _scaled_schedule(schedule: Callable[[Any], Any], group_lr: float) -> Callable[[Any], Any]:
  """An Optax schedule as a torch scheduler of a group whose initial lr is `group_lr`: `group_lr * s(t) / s(0)`."""
  try:
    first = float(schedule(jnp.zeros([], jnp.int32)))
  except Exception as e:  # noqa: BLE001 - a schedule that cannot be read at step 0 outside a trace
    raise ValueError(f"a group's lr of {group_lr} scales the default lr schedule by s(t) / s(0), but s(0) failed: {e}")
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


def _number_lr(x: Any) -> Any:
  if isinstance(x, (LRScheduler, ReduceLROnPlateau)) or callable(x):
    raise TypeError("Rprop's lr must be a number: it only sets the initial step sizes, so a schedule has no effect.")
  return _lr(x)


def _lr_no_plateau(x: Any) -> Any:
  if isinstance(x, ReduceLROnPlateau):
    raise TypeError("ASGD's rate enters its own decay formula: ReduceLROnPlateau is not supported; pass a schedule.")
  return _lr(x)


_any = lambda x: x
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
  make: Callable[["Spec", dict, dict], optax.GradientTransformation] | None = None
  lr_check: Callable[[Any], Any] = _lr


def _front(name: str, spec: Spec, params: Params, defaults: dict) -> optax.GradientTransformation:
  """`torch.optim.<name>(params, **defaults)` from its spec, one recipe per parameter group."""

  def build(hp):
    spec.lr_check(hp["lr"])
    kw = {}
    for arg, check, key in spec.args:
      value = check(hp[arg])
      if isinstance(key, tuple):
        kw.update(zip(key, value))
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
    if spec.alias is _alias.nadam:
      direction = (_correct.nesterov_correct(kw["momentum_decay"]), normalize(kw["eps"]))
    else:
      direction = (_correct.rectify(kw["eps"]),)
    return _plateau_decoupled(*direction, **kw, plateau=hp["lr"])
  return _with_lr(lambda a: spec.alias(a, **kw), hp["lr"])


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
    lr_check=_number_lr,
  ),
  "ASGD": Spec(
    _alias.asgd,
    (("lambd", _any, "lambd"), ("alpha", _any, "alpha"), ("t0", _any, "t0"), _WD, _MAXIMIZE),
    lr_check=_lr_no_plateau,
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

  Arguments and defaults are PyTorch's; see :func:`Adam` for `params` (parameter groups). `lr` must be
  a number: PyTorch reads it once, to start the step sizes, so a scheduler would have no effect.
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
  (a schedule is read as PyTorch reads the group's rate each step).
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
    params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
      min_8bit_size, is_paged: as in :func:`Adam8bit`.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  del is_paged
  defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, min_8bit_size=min_8bit_size)
  _bnb_only("AdamW8bit", args, optim_bits)
  return _front("AdamW8bit", SPECS["AdamW8bit"], params, defaults)
