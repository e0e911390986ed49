"""`torch.optim.lr_scheduler` as functions of the step count (Optax schedules).

A PyTorch scheduler mutates the optimizer's learning rate each time
`scheduler.step()` is called. Here a scheduler is a pure function of the number
of optimizer steps taken, `schedule(count) -> lr`, which any jadam or Optax
`learning_rate` accepts. By default one scheduler step is one optimizer step
(PyTorch code that calls `scheduler.step()` after every `optimizer.step()`);
`.per_epoch(steps_per_epoch)` maps PyTorch's usual once-per-epoch call: the
learning rate of optimizer step `count` is then PyTorch's at epoch
`count // steps_per_epoch`.

Where PyTorch's formula is recursive (chainable), the closed form is used; the
two agree to rounding (checked to 1e-12 against PyTorch in the tests).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import optax

from jadam._core import common as _common
from jadam._tuning import plateau as _plateau


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_lr(name: str, lr: Any) -> None:
  if not _is_number(lr):
    raise TypeError(f"{name} must be a number (PyTorch reads it from the optimizer's param group); got {lr!r}.")
  if not 0.0 <= lr:
    raise ValueError(f"Invalid learning rate: {lr}")


def _check_steps(steps_per_epoch: Any, name: str = "steps_per_epoch") -> None:
  if not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool) or steps_per_epoch <= 0:
    raise ValueError(f"{name} must be a positive integer; got {steps_per_epoch!r}.")


def _check_count(name: str, x: Any) -> None:
  if not isinstance(x, int) or isinstance(x, bool) or x < 0:
    raise ValueError(f"{name} must be a non-negative integer; got {x!r}.")


def _check_number(name: str, x: Any, *, positive: bool = False) -> None:
  """Where PyTorch's scheduler would fail later (a string gamma) or give NaN here (T_max=0): now, by name."""
  if not _is_number(x):
    raise TypeError(f"{name} must be a number; got {x!r}.")
  if positive and not x > 0:
    raise ValueError(f"{name} must be positive; got {x!r}.")


@dataclasses.dataclass(frozen=True)
class LRScheduler:
  """Base class: a learning rate as a function of the optimizer step count.

  Subclasses define `_at(epoch)`, PyTorch's learning rate after `epoch` calls
  of `scheduler.step()`. Calling the scheduler on an optimizer step count gives
  the learning rate used by the update that step count reads (the first update
  reads count 0, as every Optax schedule).
  """

  # A real field (keyword-only, after each subclass's own): equality and hash tell
  # `StepLR(1e-3, 2)` from `StepLR(1e-3, 2).per_epoch(100)`, as a static-argument jit cache needs.
  steps_per_epoch: int = dataclasses.field(default=1, kw_only=True)

  if TYPE_CHECKING:  # what every subclass defines, declared for the type checker only

    @property
    def lr(self) -> float: ...  # the initial learning rate (a field or a property of each subclass)

    def _factor(self, epoch: jax.Array) -> jax.Array: ...

  def __post_init__(self):
    _check_steps(self.steps_per_epoch)

  def __call__(self, count: jax.typing.ArrayLike) -> jax.Array:
    count = jnp.asarray(count)
    if count.ndim != 0:
      raise ValueError(f"{type(self).__name__} takes the step count, a scalar; got shape {count.shape}.")
    epoch = count // self.steps_per_epoch
    return jnp.asarray(self._at(epoch.astype(_common.float_dtype())), _common.float_dtype())

  def per_epoch(self, steps_per_epoch: int) -> LRScheduler:
    """The same scheduler, stepped once every `steps_per_epoch` optimizer steps.

    PyTorch code that calls `scheduler.step()` once per epoch of N batches maps
    to `scheduler.per_epoch(N)`. `steps_per_epoch` is a field: the result is
    not equal to (and hashes apart from) the scheduler stepped every step.
    """
    _check_steps(steps_per_epoch)
    out = copy.copy(self)
    object.__setattr__(out, "steps_per_epoch", steps_per_epoch)
    return out

  def rebase(self, lr: float) -> LRScheduler:
    """The same scheduler for a param group whose initial learning rate is `lr`."""
    out = copy.copy(self)
    _check_lr("lr", lr)
    object.__setattr__(out, "lr", lr)
    return out

  def _at(self, epoch: jax.Array) -> jax.Array:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class StepLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.StepLR`: :math:`\eta_e = \eta_0\,\gamma^{\lfloor e / s\rfloor}`.

  Args:
    lr: the initial learning rate :math:`\eta_0` (PyTorch reads it from the
      optimizer; with parameter groups, each group's own lr replaces it).
    step_size: :math:`s`, scheduler steps between decays.
    gamma: the decay :math:`\gamma`.
  """

  lr: float
  step_size: int
  gamma: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_steps(self.step_size, "step_size")
    _check_number("gamma", self.gamma)

  def _factor(self, epoch):
    return jnp.power(self.gamma, jnp.floor(epoch / self.step_size))

  def _at(self, epoch):
    return self.lr * self._factor(epoch)


@dataclasses.dataclass(frozen=True)
class MultiStepLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.MultiStepLR`: :math:`\eta_e = \eta_0\,\gamma^{\#\{m_i \le e\}}`.

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    milestones: scheduler steps at which the rate is multiplied by
      :math:`\gamma` (a milestone listed twice counts twice, as in PyTorch).
    gamma: the decay :math:`\gamma`.
  """

  lr: float
  milestones: Sequence[int]
  gamma: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_number("gamma", self.gamma)
    if not isinstance(self.milestones, (list, tuple)) or not all(
      isinstance(m, int) and not isinstance(m, bool) for m in self.milestones
    ):
      raise TypeError(f"milestones must be a list of integers (scheduler steps); got {self.milestones!r}.")
    object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))

  def _factor(self, epoch):
    if not self.milestones:
      return jnp.ones_like(epoch)
    passed = jnp.sum(jnp.asarray(self.milestones, epoch.dtype) <= epoch)
    return jnp.power(self.gamma, passed.astype(epoch.dtype))

  def _at(self, epoch):
    return self.lr * self._factor(epoch)


@dataclasses.dataclass(frozen=True)
class ExponentialLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.ExponentialLR`: :math:`\eta_e = \eta_0\,\gamma^e`."""

  lr: float
  gamma: float

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_number("gamma", self.gamma)

  def _factor(self, epoch):
    return jnp.power(self.gamma, epoch)

  def _at(self, epoch):
    return self.lr * self._factor(epoch)


@dataclasses.dataclass(frozen=True)
class CosineAnnealingLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.CosineAnnealingLR`.

  .. math::
      \eta_e = \eta_{\min} + \tfrac12(\eta_0 - \eta_{\min})\left(1 + \cos\frac{\pi e}{T_{\max}}\right),

  which is PyTorch's recursive form in closed form, past :math:`T_{\max}` too:
  the rate climbs back to :math:`\eta_0` at :math:`2T_{\max}` and so on (it
  does not restart abruptly; that is `CosineAnnealingWarmRestarts`).

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    T_max: half the period, in scheduler steps.
    eta_min: the minimum :math:`\eta_{\min}`.
  """

  lr: float
  T_max: int
  eta_min: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_number("T_max", self.T_max, positive=True)
    _check_number("eta_min", self.eta_min)

  def _at(self, epoch):
    cos = jnp.cos(math.pi * epoch / self.T_max)
    return self.eta_min + (self.lr - self.eta_min) * (1 + cos) / 2


@dataclasses.dataclass(frozen=True)
class LinearLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.LinearLR`.

  .. math::
      \eta_e = \eta_0 \left(f_s + (f_e - f_s)\frac{\min(e, T)}{T}\right).

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    start_factor: :math:`f_s \in (0, 1]`.
    end_factor: :math:`f_e \in [0, 1]`.
    total_iters: :math:`T`, scheduler steps to go from one to the other.
  """

  lr: float
  start_factor: float = 1.0 / 3
  end_factor: float = 1.0
  total_iters: int = 5

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_number("start_factor", self.start_factor)
    _check_number("end_factor", self.end_factor)
    _check_steps(self.total_iters, "total_iters")
    if self.start_factor > 1.0 or self.start_factor <= 0:
      raise ValueError("Starting multiplicative factor expected to be greater than 0 and less or equal to 1.")
    if self.end_factor > 1.0 or self.end_factor < 0:
      raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")

  def _factor(self, epoch):
    progress = jnp.minimum(epoch, self.total_iters) / self.total_iters
    return self.start_factor + (self.end_factor - self.start_factor) * progress

  def _at(self, epoch):
    return self.lr * self._factor(epoch)


@dataclasses.dataclass(frozen=True)
class OneCycleLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.OneCycleLR`: warm up to `max_lr`, then anneal far below the start.

  With :math:`\eta_{\text{init}} = \eta_{\max}/d` and :math:`\eta_{\min} =
  \eta_{\text{init}}/d_f`, the rate goes from :math:`\eta_{\text{init}}` to
  :math:`\eta_{\max}` over the first `pct_start` of the steps, then to
  :math:`\eta_{\min}` (three phases if `three_phase`), by cosine or linear
  annealing. It is meant to be stepped every batch, so it counts optimizer
  steps. Past `total_steps` (where PyTorch raises) it holds its last value.

  With `cycle_momentum` (the default), PyTorch also cycles the momentum (or
  :math:`\beta_1`) between `max_momentum` and `base_momentum`; :meth:`momentum`
  is that schedule, and `jadam.torch` optimizers given a `OneCycleLR` as `lr`
  use it for their momentum or :math:`\beta_1`, as PyTorch does.

  The arguments are PyTorch's (`epochs` and `steps_per_epoch` only serve to
  give `total_steps`). Its learning rate does not depend on the param group's
  own lr, as in PyTorch.
  """

  max_lr: float
  total_steps: int | None = None
  epochs: int | None = None
  steps_per_epoch_: int | None = None
  pct_start: float = 0.3
  anneal_strategy: str = "cos"
  cycle_momentum: bool = True
  base_momentum: float = 0.85
  max_momentum: float = 0.95
  div_factor: float = 25.0
  final_div_factor: float = 1e4
  three_phase: bool = False

  def __init__(
    self,
    max_lr,
    total_steps=None,
    epochs=None,
    steps_per_epoch=None,
    pct_start=0.3,
    anneal_strategy="cos",
    cycle_momentum=True,
    base_momentum=0.85,
    max_momentum=0.95,
    div_factor=25.0,
    final_div_factor=1e4,
    three_phase=False,
  ):
    if total_steps is not None:
      if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
    elif epochs is not None and steps_per_epoch is not None:
      if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"Expected positive integer epochs, but got {epochs}")
      if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
        raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
      total_steps = epochs * steps_per_epoch
    else:
      raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
    if not isinstance(pct_start, float) or pct_start < 0 or pct_start > 1:
      raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
      raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
    max_lr = _as_lrs("max_lr", max_lr)
    values = dict(
      max_lr=max_lr,
      total_steps=total_steps,
      epochs=epochs,
      steps_per_epoch_=steps_per_epoch,
      pct_start=pct_start,
      anneal_strategy=anneal_strategy,
      cycle_momentum=cycle_momentum,
      base_momentum=base_momentum,
      max_momentum=max_momentum,
      div_factor=div_factor,
      final_div_factor=final_div_factor,
      three_phase=three_phase,
    )
    for k, v in values.items():
      object.__setattr__(self, k, v)
    object.__setattr__(self, "steps_per_epoch", 1)
    super().__post_init__()

  def rebase(self, lr: float) -> OneCycleLR:
    del lr  # PyTorch's OneCycleLR sets every group's rate from max_lr
    return self

  def for_group(self, index: int, n_groups: int) -> OneCycleLR:
    """The scheduler of param group `index` (of `n_groups`): entry `index` of a list `max_lr`, as PyTorch."""
    out = copy.copy(self)
    object.__setattr__(out, "max_lr", _per_group("max_lr", self.max_lr, index, n_groups))
    return out

  def _phases(self, start_value, peak_value, end_value):
    """PyTorch's phases: (end_step, start, end) for each."""
    n, pct = cast(int, self.total_steps), self.pct_start  # set by __post_init__
    if self.three_phase:
      return [
        (float(pct * n) - 1, start_value, peak_value),
        (float(2 * pct * n) - 2, peak_value, start_value),
        (n - 1, start_value, end_value),
      ]
    return [(float(pct * n) - 1, start_value, peak_value), (n - 1, peak_value, end_value)]

  def _anneal(self, start, end, pct):
    if self.anneal_strategy == "cos":
      return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1)
    return (end - start) * pct + start

  def _follow(self, step, phases):
    step = jnp.minimum(step, cast(int, self.total_steps))
    out: Any = None
    chosen: Any = None
    start_step = 0.0
    for i, (end_step, a, b) in enumerate(phases):
      value = self._anneal(a, b, (step - start_step) / (end_step - start_step))
      if out is None:
        out, chosen = value, step <= end_step
      else:
        take = (
          jnp.logical_not(chosen)
          if i == len(phases) - 1
          else jnp.logical_and(jnp.logical_not(chosen), step <= end_step)
        )
        out = jnp.where(take, value, out)
        chosen = jnp.logical_or(chosen, take)
      start_step = end_step
    return out

  def _at(self, step):
    if isinstance(self.max_lr, tuple):
      raise ValueError("this OneCycleLR has one max_lr per param group: give it to a jadam.torch optimizer as lr.")
    initial = self.max_lr / self.div_factor
    return self._follow(step, self._phases(initial, self.max_lr, initial / self.final_div_factor))

  def momentum(self, count: jax.typing.ArrayLike) -> jax.Array:
    """The momentum (or :math:`\\beta_1`) PyTorch uses at optimizer step `count` when `cycle_momentum`."""
    step = jnp.asarray(count).astype(_common.float_dtype())
    hi, lo = self.max_momentum, self.base_momentum
    phases = self._phases(hi, lo, hi)
    if self.three_phase:
      phases[-1] = (phases[-1][0], hi, hi)
    return jnp.asarray(self._follow(step, phases), _common.float_dtype())


def _per_group(name: str, value: Any, index: int, n_groups: int) -> Any:
  """Entry `index` of a per-group list (PyTorch's list form of max_lr, base_lr, ...), or the scalar itself.

  Entry i is group i's; the leaves no group selects (jadam's default group, index `n_groups`) take the entry
  after the groups' if there is one, else the last.
  """
  if not isinstance(value, tuple):
    return value
  if len(value) not in (n_groups, n_groups + 1) or not value:
    raise ValueError(
      f"expected {max(n_groups, 1)} values for {name} (one per param group, and optionally one more for the"
      f" leaves no group selects), but got {len(value)}"
    )
  return value[min(index, len(value) - 1)]


def _as_lrs(name: str, value: Any) -> Any:
  """A learning rate, or a list of them (one per group), checked; a list becomes a (hashable) tuple."""
  if isinstance(value, (list, tuple)):
    for v in value:
      _check_lr(name, v)
    return tuple(value)
  _check_lr(name, value)
  return value


def _check_callable(name: str, fn: Any) -> None:
  if not callable(fn):
    raise TypeError(f"{name} should be a function, but got {type(fn).__name__}")


@dataclasses.dataclass(frozen=True)
class LambdaLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.LambdaLR`: :math:`\eta_e = \eta_0\,\lambda(e)`.

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    lr_lambda: :math:`\lambda`, a function of the scheduler step :math:`e`. It
      is called with a float jax scalar under tracing, so write it with jax or
      plain arithmetic (``lambda e: 0.95 ** e``, ``jnp.minimum(1.0, (e + 1) / 10)``),
      not `min` or `if`.
  """

  lr: float
  lr_lambda: Any

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_callable("lr_lambda", self.lr_lambda)

  def _at(self, epoch):
    return self.lr * self.lr_lambda(epoch)


@dataclasses.dataclass(frozen=True)
class MultiplicativeLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.MultiplicativeLR`: :math:`\eta_e = \eta_0 \prod_{k=1}^{e} \lambda(k)`.

  There is no closed form for an arbitrary :math:`\lambda`: the product is a
  loop over the scheduler steps taken (a `jax.lax.fori_loop`, :math:`O(e)`
  scalar work per call), in PyTorch's order, so it rounds as PyTorch does.

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    lr_lambda: :math:`\lambda`, a function of the scheduler step (a float jax
      scalar; see :class:`LambdaLR`).
  """

  lr: float
  lr_lambda: Any

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_callable("lr_lambda", self.lr_lambda)

  def _factor(self, epoch):
    n = epoch.astype(jnp.int32)
    one = jnp.ones([], epoch.dtype)
    return jax.lax.fori_loop(1, n + 1, lambda k, acc: acc * self.lr_lambda(k.astype(epoch.dtype)), one)

  def _at(self, epoch):
    n = epoch.astype(jnp.int32)
    start = jnp.asarray(self.lr, epoch.dtype)
    return jax.lax.fori_loop(1, n + 1, lambda k, acc: acc * self.lr_lambda(k.astype(epoch.dtype)), start)


@dataclasses.dataclass(frozen=True)
class ConstantLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.ConstantLR`: :math:`\eta_e = \eta_0 f` for :math:`e < T`, then :math:`\eta_0`.

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    factor: :math:`f \in [0, 1]`.
    total_iters: :math:`T`, scheduler steps at the reduced rate.
  """

  lr: float
  factor: float = 1.0 / 3
  total_iters: int = 5

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_number("factor", self.factor)
    if self.factor > 1.0 or self.factor < 0:
      raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
    _check_count("total_iters", self.total_iters)

  def _factor(self, epoch):
    return jnp.where(epoch >= self.total_iters, 1.0, self.factor).astype(epoch.dtype)

  def _at(self, epoch):
    return self.lr * self._factor(epoch)


@dataclasses.dataclass(frozen=True)
class PolynomialLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.PolynomialLR`: :math:`\eta_e = \eta_0 (1 - \min(e, T)/T)^p`.

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    total_iters: :math:`T`, scheduler steps to reach zero.
    power: :math:`p`.
  """

  lr: float
  total_iters: int = 5
  power: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    _check_steps(self.total_iters, "total_iters")
    _check_number("power", self.power)

  def _factor(self, epoch):
    return (1.0 - jnp.minimum(epoch, self.total_iters) / self.total_iters) ** self.power

  def _at(self, epoch):
    return self.lr * self._factor(epoch)


@dataclasses.dataclass(frozen=True)
class CosineAnnealingWarmRestarts(LRScheduler):
  r"""`torch.optim.lr_scheduler.CosineAnnealingWarmRestarts` (SGDR).

  .. math::
      \eta_e = \eta_{\min} + \tfrac12(\eta_0 - \eta_{\min})\left(1 + \cos\frac{\pi T_{cur}}{T_i}\right),

  where the :math:`i`-th period lasts :math:`T_i = T_0 T_{mult}^i` scheduler
  steps and :math:`T_{cur}` counts the steps since the last restart: in closed
  form, the period :math:`n` holding :math:`e` is the largest with
  :math:`T_0 (T_{mult}^n - 1)/(T_{mult} - 1) \le e`.

  Args:
    lr: the initial learning rate :math:`\eta_0`.
    T_0: the first period, a positive integer.
    T_mult: the growth of the period, an integer >= 1.
    eta_min: :math:`\eta_{\min}`.
  """

  lr: float
  T_0: int
  T_mult: int = 1
  eta_min: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    _check_lr("lr", self.lr)
    if not isinstance(self.T_0, int) or isinstance(self.T_0, bool) or self.T_0 <= 0:
      raise ValueError(f"Expected positive integer T_0, but got {self.T_0}")
    if not isinstance(self.T_mult, int) or isinstance(self.T_mult, bool) or self.T_mult < 1:
      raise ValueError(f"Expected integer T_mult >= 1, but got {self.T_mult}")
    if not _is_number(self.eta_min):
      raise ValueError(f"Expected float or int eta_min, but got {self.eta_min} of type {type(self.eta_min)}")

  def _at(self, epoch):
    t0, m = float(self.T_0), float(self.T_mult)
    t_i: float | jax.Array
    if self.T_mult == 1:
      t_cur, t_i = jnp.mod(epoch, t0), t0
    else:

      def start(k):
        return t0 * (m**k - 1.0) / (m - 1.0)  # the step at which period k begins

      n = jnp.floor(jnp.log(epoch / t0 * (m - 1.0) + 1.0) / math.log(m))
      n = jnp.where(start(n + 1.0) <= epoch, n + 1.0, n)  # the logarithm may round across a restart
      n = jnp.where(start(n) > epoch, n - 1.0, n)
      t_cur, t_i = epoch - start(n), t0 * m**n
    return self.eta_min + (self.lr - self.eta_min) * (1 + jnp.cos(math.pi * t_cur / t_i)) / 2


_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


@dataclasses.dataclass(frozen=True)
class CyclicLR(LRScheduler):
  r"""`torch.optim.lr_scheduler.CyclicLR`: the rate cycles between `base_lr` and `max_lr`.

  With :math:`S = s_{up} + s_{down}`, cycle :math:`c = \lfloor 1 + e/S\rfloor`,
  :math:`x = 1 + e/S - c` and :math:`h = x / r` if :math:`x \le r = s_{up}/S`,
  else :math:`(x - 1)/(r - 1)`:

  .. math::
      \eta_e = \eta_{base} + (\eta_{max} - \eta_{base})\, h\, \sigma,

  with :math:`\sigma = 1` (``"triangular"``), :math:`2^{1-c}` (``"triangular2"``),
  :math:`\gamma^e` (``"exp_range"``) or `scale_fn` of :math:`c` or :math:`e`
  (`scale_mode`). It is meant to be stepped every batch. With
  `cycle_momentum` (the default) :meth:`momentum` is the momentum (or
  :math:`\beta_1`) PyTorch sets, :math:`\mu_{max} - (\mu_{max} - \mu_{base})h\sigma`,
  and a `jadam.torch` optimizer given a `CyclicLR` as `lr` uses it, as PyTorch
  does.

  Args:
    base_lr: :math:`\eta_{base}`, the initial learning rate (PyTorch sets every
      group's lr to it).
    max_lr: PyTorch's, with its defaults, as are step_size_up, step_size_down, mode, gamma,
      scale_fn, scale_mode, cycle_momentum, base_momentum and max_momentum.
      `scale_fn` is called with float jax scalars (see :class:`LambdaLR`).
  """

  base_lr: float
  max_lr: float
  step_size_up: int = 2000
  step_size_down: int | None = None
  mode: str = "triangular"
  gamma: float = 1.0
  scale_fn: Any = None
  scale_mode: str = "cycle"
  cycle_momentum: bool = True
  base_momentum: float = 0.8
  max_momentum: float = 0.9

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "base_lr", _as_lrs("base_lr", self.base_lr))
    object.__setattr__(self, "max_lr", _as_lrs("max_lr", self.max_lr))
    _check_steps(self.step_size_up, "step_size_up")
    if self.step_size_down is not None:
      _check_steps(self.step_size_down, "step_size_down")
    if self.mode not in _CYCLIC_MODES and self.scale_fn is None:
      raise ValueError("mode is invalid and scale_fn is None")
    if self.scale_fn is not None:
      _check_callable("scale_fn", self.scale_fn)
    if self.scale_mode not in ("cycle", "iterations"):
      raise ValueError(f"scale_mode must be 'cycle' or 'iterations'; got {self.scale_mode!r}.")
    _check_number("gamma", self.gamma)
    if not isinstance(self.cycle_momentum, bool):
      raise TypeError(f"cycle_momentum must be a bool; got {self.cycle_momentum!r}.")
    for name in ("base_momentum", "max_momentum"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))

  @property
  def lr(self) -> float:
    """The initial learning rate, `base_lr`."""
    return self.base_lr

  def rebase(self, lr: float) -> CyclicLR:
    del lr  # PyTorch's CyclicLR sets every group's rate from base_lr
    return self

  def for_group(self, index: int, n_groups: int) -> CyclicLR:
    """The scheduler of param group `index`: entry `index` of list `base_lr` / `max_lr` (and momenta), as PyTorch."""
    out = copy.copy(self)
    for name in ("base_lr", "max_lr", "base_momentum", "max_momentum"):
      object.__setattr__(out, name, _per_group(name, getattr(self, name), index, n_groups))
    return out

  def _wave(self, epoch):
    """(h, sigma) at scheduler step `epoch`."""
    up = float(self.step_size_up)
    total = up + float(self.step_size_down if self.step_size_down is not None else self.step_size_up)
    ratio = up / total
    cycle = jnp.floor(1 + epoch / total)
    x = 1.0 + epoch / total - cycle
    height = jnp.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
    if self.scale_fn is not None:
      sigma = self.scale_fn(cycle if self.scale_mode == "cycle" else epoch)
    elif self.mode == "triangular":
      sigma = jnp.ones_like(epoch)
    elif self.mode == "triangular2":
      sigma = 1 / (2.0 ** (cycle - 1))
    else:
      sigma = jnp.power(self.gamma, epoch)
    return height, sigma

  def _at(self, epoch):
    if isinstance(self.base_lr, tuple) or isinstance(self.max_lr, tuple):
      raise ValueError("this CyclicLR has per-group rates: give it to a jadam.torch optimizer as lr.")
    height, sigma = self._wave(epoch)
    return self.base_lr + (self.max_lr - self.base_lr) * height * sigma

  def momentum(self, count: jax.typing.ArrayLike) -> jax.Array:
    """The momentum (or :math:`\\beta_1`) PyTorch uses at optimizer step `count` when `cycle_momentum`."""
    dtype = _common.float_dtype()
    epoch = (jnp.asarray(count) // self.steps_per_epoch).astype(dtype)
    height, sigma = self._wave(epoch)
    return jnp.asarray(self.max_momentum - (self.max_momentum - self.base_momentum) * height * sigma, dtype)


def _check_children(name: str, schedulers: Any) -> tuple:
  if not isinstance(schedulers, (list, tuple)) or not schedulers:
    raise ValueError(f"{name} expects at least one scheduler, but got no scheduler.")
  for i, s in enumerate(schedulers):
    if isinstance(s, ReduceLROnPlateau):
      raise ValueError(
        f"{name} does not support `ReduceLROnPlateau` scheduler as it requires additional kwargs to be"
        f" specified when calling `step`, but got one at index {i} in the given schedulers sequence."
      )
    if not isinstance(s, LRScheduler):
      raise TypeError(f"{name}: the scheduler at index {i} is not a jadam.torch scheduler; got {s!r}.")
    if s.steps_per_epoch != 1:
      raise ValueError(
        f"{name}: the scheduler at index {i} has per_epoch({s.steps_per_epoch}); set per_epoch on the {name}"
        " instead, which steps all of them."
      )
  return tuple(schedulers)


@dataclasses.dataclass(frozen=True)
class _Composite(LRScheduler):
  """A scheduler made of others (which share the optimizer's initial lr): the first one's lr, rebased together."""

  schedulers: Sequence[LRScheduler]

  @property
  def lr(self) -> float:
    return self.schedulers[0].lr

  def rebase(self, lr: float) -> _Composite:
    out = copy.copy(self)
    object.__setattr__(out, "schedulers", tuple(s.rebase(lr) for s in self.schedulers))
    return out


@dataclasses.dataclass(frozen=True)
class SequentialLR(_Composite):
  r"""`torch.optim.lr_scheduler.SequentialLR`: one scheduler after another, each restarted at its milestone.

  At scheduler step :math:`e`, with :math:`i` the number of milestones
  :math:`\le e`, the rate is `schedulers[i]` at step :math:`e - m_{i-1}`
  (:math:`m_{-1} = 0`): each scheduler starts from its own beginning, as
  PyTorch's does when it reaches its milestone. The common recipe, warmup then
  cosine::

      SequentialLR([LinearLR(lr, 0.01, total_iters=w), CosineAnnealingLR(lr, T_max=n - w)], milestones=[w])

  (PyTorch's `MultiplicativeLR` inside a `SequentialLR` starts from the rate the
  previous scheduler left; here it starts from its own `lr`.)

  Args:
    schedulers: the `jadam.torch` schedulers, each with the initial lr (the
      same for all, as they share PyTorch's optimizer), none with `per_epoch`.
    milestones: the scheduler steps at which the next one takes over; one
      fewer than the schedulers.
  """

  milestones: Sequence[int]

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "schedulers", _check_children("SequentialLR", self.schedulers))
    if not isinstance(self.milestones, (list, tuple)) or not all(
      isinstance(m, int) and not isinstance(m, bool) for m in self.milestones
    ):
      raise TypeError(f"milestones must be a list of integers (scheduler steps); got {self.milestones!r}.")
    if len(self.milestones) != len(self.schedulers) - 1:
      raise ValueError(
        "Sequential Schedulers expects number of schedulers provided to be one more than the number of"
        f" milestone points, but got number of schedulers {len(self.schedulers)} and the number of milestones to"
        f" be equal to {len(self.milestones)}"
      )
    object.__setattr__(self, "milestones", tuple(self.milestones))

  def _at(self, epoch):
    out = self.schedulers[0]._at(epoch)
    for m, s in zip(self.milestones, self.schedulers[1:], strict=True):
      out = jnp.where(epoch >= m, s._at(epoch - m), out)
    return out


@dataclasses.dataclass(frozen=True)
class ChainedScheduler(_Composite):
  r"""`torch.optim.lr_scheduler.ChainedScheduler`: every scheduler stepped at once, their factors multiplied.

  .. math::
      \eta_e = \eta_0 \prod_i f_i(e),

  where :math:`f_i(e)` is scheduler :math:`i`'s rate over its initial rate.
  That is what PyTorch's chain computes when each scheduler multiplies the
  current rate by a factor: `StepLR`, `MultiStepLR`, `ExponentialLR`,
  `ConstantLR`, `LinearLR`, `PolynomialLR` and `MultiplicativeLR`, which are
  the ones accepted. (The others set the rate outright, so in a PyTorch chain
  the result depends on their order; compose them with :class:`SequentialLR`
  or an Optax schedule instead.)

  Args:
    schedulers: the `jadam.torch` schedulers, with the same initial lr.
  """

  def __post_init__(self):
    super().__post_init__()
    children = _check_children("ChainedScheduler", self.schedulers)
    for i, s in enumerate(children):
      if not hasattr(s, "_factor"):
        raise ValueError(
          f"ChainedScheduler: {type(s).__name__} (index {i}) sets the rate rather than multiplying it, so its"
          " chained rate depends on the order; chain StepLR, MultiStepLR, ExponentialLR, ConstantLR, LinearLR,"
          " PolynomialLR or MultiplicativeLR, or use SequentialLR."
        )
    object.__setattr__(self, "schedulers", children)

  def _at(self, epoch):
    out = self.lr * jnp.ones_like(epoch)
    for s in self.schedulers:
      out = out * s._factor(epoch)
    return out


ReduceLROnPlateauState = _plateau.ReduceLROnPlateauState  # the core's, re-exported by jadam.torch


@dataclasses.dataclass(frozen=True)
class ReduceLROnPlateau:
  r"""`torch.optim.lr_scheduler.ReduceLROnPlateau`, fed the metric through `update(..., value=metric)`.

  Unlike the other schedulers it depends on a metric, so it is a state, not a
  function of the step: :meth:`transform` is an
  `optax.GradientTransformationExtraArgs` that multiplies the updates by the
  current learning rate :math:`\eta` and then feeds `value` to PyTorch's rule:

  - `value` is *better* than the best so far if it is below
    :math:`\text{best}(1 - \tau)` (mode ``"min"``, threshold_mode ``"rel"``),
    below :math:`\text{best} - \tau` (``"abs"``), or above
    :math:`\text{best}(1 + \tau)` / :math:`\text{best} + \tau` in mode ``"max"``;
  - otherwise the count of bad epochs grows; during a cooldown it is held at 0;
  - once it exceeds `patience`, :math:`\eta \leftarrow \max(f\eta, \eta_{\min})`
    if that lowers :math:`\eta` by more than `eps`, and a cooldown of
    `cooldown` epochs starts.

  The metric passed with update `t` is the one PyTorch code passes to
  `scheduler.step(metric)` after `optimizer.step()` number `t`; it sets the rate
  of the next update. With :meth:`per_epoch` it is read only on the last update
  of each epoch (the others may pass any value).

  A `jadam.torch` optimizer given a `ReduceLROnPlateau` as `lr` builds this in
  place of its learning-rate stage; with any other Optax optimizer, chain it
  after a unit learning rate: ``optax.chain(optax.sgd(1.0), plateau.transform())``.

  Args:
    lr: the initial learning rate (PyTorch reads it from the optimizer).
    mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps:
      PyTorch's, with its defaults.
  """

  lr: float
  mode: str = "min"
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  threshold_mode: str = "rel"
  cooldown: int = 0
  min_lr: float = 0.0
  eps: float = 1e-8
  steps_per_epoch: int = 1

  def __post_init__(self):
    _check_lr("lr", self.lr)
    _ = self.rule  # PyTorch's checks of factor, mode and threshold_mode, in its order
    _check_steps(self.steps_per_epoch)

  @property
  def rule(self) -> _plateau.PlateauRule:
    """This scheduler's rule without its learning rate, which :func:`jadam.sweep` runs per configuration."""
    return _plateau.PlateauRule(**{f.name: getattr(self, f.name) for f in dataclasses.fields(_plateau.PlateauRule)})

  def per_epoch(self, steps_per_epoch: int) -> ReduceLROnPlateau:
    """Read the metric once every `steps_per_epoch` updates (at the end of each epoch)."""
    return dataclasses.replace(self, steps_per_epoch=steps_per_epoch)

  def rebase(self, lr: float) -> ReduceLROnPlateau:
    """The same rule for a param group whose initial learning rate is `lr`."""
    return dataclasses.replace(self, lr=lr)

  def __call__(self, count):
    raise TypeError(
      "ReduceLROnPlateau depends on a metric, not only on the step: pass it as a"
      " jadam.torch optimizer's lr, or chain its .transform() and call"
      " update(grads, state, params, value=metric)."
    )

  def _is_better(self, a, best):
    return self.rule.is_better(a, best)

  def transform(self) -> optax.GradientTransformationExtraArgs:
    """Scale updates by the current learning rate, then update it from `value` (the core rule's ``transform``)."""
    return self.rule.transform(self.lr, steps_per_epoch=self.steps_per_epoch, name="jadam.torch.ReduceLROnPlateau")
