r"""One optimizer, many configurations, one compiled program: `inject_hyperparams` under `vmap`.

Tuning Adam is training the same model with a handful of learning rates,
betas and epsilons. Each configuration is an independent run, so all of them
can be one: give the parameters and the optimizer state a leading
configuration axis and `vmap` the update over it. The hyperparameters then live
in the state, one value per configuration, as :func:`optax.inject_hyperparams`
keeps them, which is also where a plateau rule lowers one configuration's
learning rate and where early stopping freezes one configuration.
"""

from __future__ import annotations

import inspect
import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam._core import common as _common
from jadam._tuning import plateau as _plateau
from jadam._tuning.early_stopping import EarlyStopping, EarlyStoppingState

Config = dict[str, Any]


class SweepState(NamedTuple):
  """State of a :func:`sweep`: every leaf has a leading axis, one entry per configuration."""

  inner: optax.OptState  # optax.inject_hyperparams' state: .hyperparams holds each configuration's values
  stopping: EarlyStoppingState | optax.EmptyState  # EmptyState without early_stopping
  plateau: _plateau.ReduceLROnPlateauState | optax.EmptyState  # EmptyState without a plateau


class Sweep(NamedTuple):
  """What :func:`sweep` returns: ``tx, configs, observe = jadam.sweep(...)``."""

  tx: optax.GradientTransformation  # init/update with a leading configuration axis
  configs: list[Config]  # the configurations, in the order of that axis
  observe: Callable[[SweepState, jax.typing.ArrayLike], SweepState]  # (state, metric per config) -> state

  def broadcast(self, params: optax.Params) -> optax.Params:
    """`params` repeated along a new leading axis, once per configuration (the same start for all)."""
    n = len(self.configs)
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *jnp.shape(p))), params)


def sweep_grid(values: Mapping[str, Sequence[Any]]) -> list[Config]:
  """Every combination of `values`, the last name varying fastest (the order of `itertools.product`).

  Examples:
    >>> import jadam
    >>> for config in jadam.sweep_grid({"learning_rate": [1e-3, 3e-3], "b1": [0.8, 0.9]}):
    ...   print(config)
    {'learning_rate': 0.001, 'b1': 0.8}
    {'learning_rate': 0.001, 'b1': 0.9}
    {'learning_rate': 0.003, 'b1': 0.8}
    {'learning_rate': 0.003, 'b1': 0.9}
  """
  names = list(values)
  for name in names:
    if isinstance(values[name], (str, bytes)) or not isinstance(values[name], Sequence) or not values[name]:
      raise ValueError(f"grid[{name!r}] must be a non-empty list of values; got {values[name]!r}.")
  return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(values[n] for n in names))]


def _flatten(name: str, value: Any) -> dict[str, Any]:
  """One swept value as scalars: a tuple such as torch's ``betas`` becomes ``betas__0``, ``betas__1``."""
  if isinstance(value, (tuple, list)):
    return {f"{name}__{i}": v for i, v in enumerate(value)}
  return {name: value}


def _check_value(name: str, value: Any) -> None:
  for v in value if isinstance(value, (tuple, list)) else (value,):
    if isinstance(v, bool):
      raise TypeError(
        f"{name} is a flag ({v!r}): a flag changes the program, so it cannot vary across one vmapped sweep."
        f" Fix it with functools.partial(factory, {name}=...) and run one sweep per value."
      )
    if not isinstance(v, numbers.Real):
      raise TypeError(f"{name} must take numbers in a sweep; got {type(v).__name__} {v!r}.")


def _check_representable(i: int, values: Mapping[str, Any], dtype: Any) -> None:
  """Refuses a value that the cast to `dtype` (where it is injected) turns into inf, zero or a subnormal."""
  tiny = float(jnp.finfo(dtype).tiny)
  for key, v in values.items():
    with np.errstate(over="ignore", under="ignore"):  # what the cast makes of it is the question here
      cast = float(np.asarray(v, np.float64).astype(dtype))
    if (np.isfinite(v) and not np.isfinite(cast)) or (v != 0 and abs(cast) < tiny):
      name = key if "__" not in key else f"{key.rsplit('__', 1)[0]}[{_index(key)}]"
      raise ValueError(
        f"configs[{i}]: {name}={v!r} is injected as {jnp.dtype(dtype).name}, which holds it as {cast!r}: outside"
        f" {jnp.dtype(dtype).name}'s normal range ({tiny:g} to {float(jnp.finfo(dtype).max):g}). Pass"
        " hyperparam_dtype=jnp.float64 (under jax_enable_x64) or a representable value."
      )


def sweep(
  factory: Callable[..., optax.GradientTransformation],
  grid: Mapping[str, Sequence[Any]] | None = None,
  *,
  configs: Sequence[Mapping[str, Any]] | None = None,
  schedules: Mapping[str, Callable[[jax.Array], optax.Schedule]] | None = None,
  plateau: Any = None,
  early_stopping: EarlyStopping | None = None,
  hyperparam_dtype: Any = jnp.float32,
) -> Sweep:
  r"""Train every configuration of one optimizer at once: a transformation vmapped over its hyperparameters.

  For configurations :math:`c = 1 \dots C` the parameters and the state carry
  a leading axis of length :math:`C`, and one update is

  .. math::
      (u^{(c)}, s^{(c)}) = \texttt{factory}(h^{(c)}).\text{update}(g^{(c)}, s^{(c)}, \theta^{(c)})
      \quad \text{for every } c \text{ at once (} \texttt{jax.vmap} \text{)},

  with :math:`h^{(c)}` the configuration's hyperparameters, held in the state
  by :func:`optax.inject_hyperparams` (as `hyperparam_dtype` scalars: a float32
  ``b1=0.9`` makes :math:`1 - \beta_1` = 1 - float32(0.9), as
  ``inject_hyperparams(jadam.adam)`` does). Only the swept names are injected;
  every other argument keeps the factory's default, or what
  ``functools.partial(factory, ...)`` fixed (flags such as `amsgrad` must be
  fixed that way: they change the program).

  With `early_stopping`, a configuration that has stopped takes no more steps:
  its updates are zero and its state, step count included, stays as it was.
  With `plateau`, each configuration has its own `ReduceLROnPlateau` state,
  which lowers that configuration's learning rate. Both read the metrics given
  to ``observe(state, metrics)``, a vector with one value per configuration
  (e.g. the validation losses after each epoch).

  Args:
    factory: a jadam optimizer (:func:`jadam.adam`, ...), a `jadam.torch`
      front door (:func:`jadam.torch.Adam`, whose ``betas`` are swept as
      tuples), or any Optax factory whose swept arguments are numbers.
    grid: values per hyperparameter, by the factory's own argument names;
      the configurations are their product in the order of :func:`sweep_grid`
      (the last name varies fastest).
    configs: instead of `grid`, an explicit list of configurations (dicts with
      the same names), kept in its order.
    schedules: for some swept names, a function of the configuration's value
      that returns a schedule, e.g. ``{"learning_rate": lambda peak:
      optax.cosine_decay_schedule(peak, steps)}``: a cosine whose peak is swept.
    plateau: a :class:`jadam.torch.ReduceLROnPlateau` whose rule (mode, factor,
      patience, threshold, threshold_mode, cooldown, min_lr, eps) each
      configuration follows; its `lr` is ignored: each configuration starts from
      its own learning rate (the swept value: the peak, if it is scheduled).
    early_stopping: a :func:`jadam.early_stopping` rule.
    hyperparam_dtype: dtype of the injected hyperparameters (default float32,
      which bfloat16 parameters need: bfloat16 rounds 0.999 to 1); None follows
      the parameters, as in `optax.inject_hyperparams`.

  Returns:
    A :class:`Sweep` ``(tx, configs, observe)``: the transformation (its `init`
    takes parameters with the leading configuration axis, e.g.
    ``sweep.broadcast(params)``), the configurations in the order of that
    axis, and a jitted ``observe(state, metrics) -> state`` for the epoch's
    metrics.

  Raises:
    ValueError: no configuration, or none that names a hyperparameter
      (nothing to sweep), both or neither of `grid` and `configs`,
      configurations with different names, a name the factory does not take,
      a value it refuses (each configuration is built once to check it), a
      value that the cast to `hyperparam_dtype` makes inf, zero or subnormal
      (``learning_rate=1e39`` or ``eps=1e-50`` in float32).
    TypeError: a flag or a non-number among the values.

  Examples:
    >>> import jax, jax.numpy as jnp, jadam
    >>> tx, configs, observe = sweep = jadam.sweep(
    ...     jadam.adam, {"learning_rate": [1e-3, 1e-2], "b2": [0.99, 0.999]})
    >>> configs[1]
    {'learning_rate': 0.001, 'b2': 0.999}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)  # one configuration's loss
    >>> def loss_fn(params):  # the sum over configurations: each gets its own gradient
    ...   losses = jax.vmap(loss)(params)
    ...   return losses.sum(), losses
    >>> step = jadam.make_train_step(loss_fn, tx, has_aux=True)
    >>> params = sweep.broadcast({"w": jnp.ones(3)})
    >>> state = tx.init(params)
    >>> params, state, _, losses = step(params, state)
    >>> params["w"][:, 0]  # one step of each learning rate
    Array([0.999, 0.999, 0.99 , 0.99 ], dtype=float32)
  """
  program = _SweepProgram(
    factory,
    _configurations(grid, configs),
    schedules=dict(schedules or {}),
    plateau=plateau,
    early_stopping=early_stopping,
    hyperparam_dtype=hyperparam_dtype,
  )
  return Sweep(optax.GradientTransformation(program.init, program.update), program.configs, jax.jit(program.observe))


def _configurations(
  grid: Mapping[str, Sequence[Any]] | None, configs: Sequence[Mapping[str, Any]] | None
) -> list[Config]:
  """The configurations of exactly one of `grid` and `configs`, checked: at least one, each with the same names."""
  if grid is not None and configs is None:
    chosen = sweep_grid(grid)
  elif configs is not None and grid is None:
    chosen = [dict(c) for c in configs]
  else:
    raise ValueError("pass either grid (values per hyperparameter) or configs (a list of configurations), not both.")
  if not chosen:
    raise ValueError("a sweep needs at least one configuration.")
  names = list(chosen[0])
  if not names:
    raise ValueError(
      f"nothing to sweep: the configurations name no hyperparameter ({chosen[:2]}...). Give grid values per"
      " hyperparameter, e.g. {'learning_rate': [1e-3, 3e-3]}."
    )
  for i, config in enumerate(chosen):
    if set(config) != set(names):
      raise ValueError(f"configs[{i}] has the names {sorted(config)}, configs[0] {sorted(names)}: they must agree.")
    for name, value in config.items():
      _check_value(name, value)
  return chosen


def _signature(factory: Callable[..., optax.GradientTransformation], names: Sequence[str]) -> inspect.Signature:
  """`factory`'s signature, after checking that it takes every swept name."""
  try:
    signature = inspect.signature(factory)
  except (TypeError, ValueError) as e:
    raise TypeError(f"factory must be an optimizer factory such as jadam.adam; got {factory!r}.") from e
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
  for name in names:
    if name not in signature.parameters and not takes_any:
      raise ValueError(
        f"{getattr(factory, '__name__', factory)} takes no {name!r}; it takes {list(signature.parameters)}."
      )
  return signature


def _plateau_rule(plateau: Any, lr_name: str | None) -> _plateau.PlateauRule:
  """`plateau`'s rule, after checking that there is a learning rate for it to lower."""
  rule = _plateau.rule_of(plateau)
  if rule is None:
    raise TypeError(f"plateau must be a jadam.torch.ReduceLROnPlateau; got {type(plateau).__name__}.")
  if lr_name is None:
    raise ValueError("plateau lowers the learning rate, but the factory takes no learning_rate or lr.")
  return rule


class _Injectable:
  """The factory as `optax.inject_hyperparams` reads it: one keyword-only scalar per flattened swept value.

  `inject_hyperparams` injects what the signature names, so a swept tuple such
  as torch's ``betas`` is offered as ``betas__0``, ``betas__1`` and regrouped
  by `build` before the factory sees it.
  """

  def __init__(
    self, build: Callable[[Mapping[str, Any]], optax.GradientTransformation], flat_names: list[str], name: str
  ):
    self._build = build
    self.__signature__ = inspect.Signature([inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in flat_names])
    self.__name__ = name

  def __call__(self, **values: Any) -> optax.GradientTransformation:
    return self._build(values)


class _SweepProgram:
  """One sweep: its checked configurations and the vmapped `init`, `update` and `observe` over them.

  The hyperparameters of configuration :math:`c` are row :math:`c` of the
  injected state; `update` vmaps one injected transformation over that axis,
  `observe` vmaps the plateau rule and early stopping over it.
  """

  def __init__(
    self,
    factory: Callable[..., optax.GradientTransformation],
    configs: list[Config],
    *,
    schedules: dict[str, Callable[[jax.Array], optax.Schedule]],
    plateau: Any,
    early_stopping: EarlyStopping | None,
    hyperparam_dtype: Any,
  ):
    self.factory = factory
    self.names = list(configs[0])
    signature = _signature(factory, self.names)
    for name in schedules:
      if name not in self.names:
        raise ValueError(f"schedules[{name!r}]: {name!r} is not swept (the swept names are {self.names}).")
    self.schedules = schedules
    self.lr_name = next((n for n in ("learning_rate", "lr") if n in signature.parameters), None)
    self.rule: optax.GradientTransformationExtraArgs | None = None
    if plateau is not None:
      rule = _plateau_rule(plateau, self.lr_name)
      configs = self._with_learning_rate(configs, signature)
      # The same rule with steps_per_epoch=1: observe is called once an epoch.
      self.rule = rule.transform(1.0, name="jadam.sweep's plateau")
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
      raise TypeError(f"early_stopping must be made by jadam.early_stopping; got {type(early_stopping).__name__}.")
    self.early_stopping = early_stopping
    self.configs = configs
    self.n = len(configs)
    for i, config in enumerate(configs):  # concrete values: the factory's own checks name the argument
      try:
        self.build(config)
      except (ValueError, TypeError) as e:
        raise type(e)(f"configs[{i}] = {config}: {e}") from e

    flat = [{k: v for name, value in c.items() for k, v in _flatten(name, value).items()} for c in configs]
    self.value_dtype = hyperparam_dtype or _common.float_dtype()
    for i, values in enumerate(flat):
      _check_representable(i, values, self.value_dtype)
    injectable = _Injectable(self.build, list(flat[0]), getattr(factory, "__name__", "factory"))
    self.inject = optax.inject_hyperparams(injectable, hyperparam_dtype=hyperparam_dtype)
    self.template = self.inject(**flat[0])  # its update reads every hyperparameter from the state
    self.stacked = {k: jnp.asarray(np.array([f[k] for f in flat], np.float64), self.value_dtype) for k in flat[0]}

  def _with_learning_rate(self, configs: list[Config], signature: inspect.Signature) -> list[Config]:
    """`configs`, each with the factory's default learning rate if it is not swept, so that plateau can lower it."""
    assert self.lr_name is not None  # _plateau_rule refused a factory without one
    if self.lr_name in self.names:
      return configs
    default = signature.parameters[self.lr_name].default
    if not isinstance(default, numbers.Real):
      raise ValueError(f"plateau needs {self.lr_name!r} in the sweep: the factory has no numeric default for it.")
    self.names.append(self.lr_name)
    return [{**c, self.lr_name: float(default)} for c in configs]

  def build(self, values: Mapping[str, Any]) -> optax.GradientTransformation:
    """The factory at one configuration's values (a swept tuple either whole or flattened as ``name__i``)."""
    kwargs = {}
    for name in self.names:
      if name in values:
        value = values[name]
      else:
        value = tuple(values[k] for k in sorted((k for k in values if k.startswith(name + "__")), key=_index))
      kwargs[name] = self.schedules[name](value) if name in self.schedules else value
    return self.factory(**kwargs)

  def check_axis(self, params: optax.Params) -> None:
    """Raises a `ValueError` unless every leaf of `params` has the leading configuration axis."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      if np.ndim(leaf) == 0 or np.shape(leaf)[0] != self.n:
        raise ValueError(
          f"sweep of {self.n} configurations: every parameter needs a leading axis of {self.n}, but"
          f" {jax.tree_util.keystr(path)} has shape {np.shape(leaf)}. Use sweep.broadcast(params)."
        )

  def init(self, params: optax.Params) -> SweepState:
    """The state of every configuration, stacked along the leading axis."""
    self.check_axis(params)
    hyper = {k: jnp.array(v, self.value_dtype, copy=True) for k, v in self.stacked.items()}  # own buffers: steps donate
    inner = jax.vmap(lambda h, p: self.inject(**h).init(p))(hyper, params)
    stopping: EarlyStoppingState | optax.EmptyState = optax.EmptyState()
    plateau: _plateau.ReduceLROnPlateauState | optax.EmptyState = optax.EmptyState()
    early_stopping, rule, configurations = self.early_stopping, self.rule, jnp.arange(self.n)
    if early_stopping is not None:
      stopping = jax.vmap(lambda _: early_stopping.init())(configurations)
    if rule is not None:
      plateau = jax.vmap(lambda _: rule.init({}))(configurations)
    return SweepState(inner=inner, stopping=stopping, plateau=plateau)

  def running(self, state: SweepState) -> jax.Array:
    """Which configurations still take steps: a boolean vector, all true without early stopping."""
    if isinstance(state.stopping, EarlyStoppingState):
      return state.stopping.stopped_epoch == 0
    return jnp.ones([self.n], bool)

  def where(self, mask: jax.Array, new: Any, old: Any) -> Any:
    """`new` for the configurations where `mask` holds, `old` elsewhere, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape((self.n,) + (1,) * (jnp.ndim(a) - 1)), a, b), new, old)

  def update(
    self, updates: optax.Updates, state: SweepState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, SweepState]:
    """One step of every configuration; a stopped configuration gets a zero update and keeps its state."""
    _common.check_state("jadam.sweep", state, SweepState)
    self.check_axis(updates)
    new_updates, inner = jax.vmap(self.template.update)(updates, state.inner, params)
    if isinstance(state.stopping, EarlyStoppingState):
      go = self.running(state)
      new_updates = self.where(go, new_updates, jax.tree.map(jnp.zeros_like, new_updates))
      inner = self.where(go, inner, state.inner)
    return new_updates, state._replace(inner=inner)

  def observe(self, state: SweepState, metrics: jax.typing.ArrayLike) -> SweepState:
    """Feeds one metric per configuration to the plateau rule (a lower learning rate) and to early stopping."""
    _common.check_state("jadam.sweep observe", state, SweepState)
    if np.shape(metrics) != (self.n,):
      raise ValueError(f"observe takes one metric per configuration, shape ({self.n},); got shape {np.shape(metrics)}.")
    metrics = jnp.asarray(metrics)
    stopping, plateau, inner = state.stopping, state.plateau, state.inner
    if self.rule is not None:
      plateau, inner = self._lower_learning_rates(state, metrics)
    if self.early_stopping is not None:
      stopping = jax.vmap(self.early_stopping.update)(state.stopping, metrics)
    return SweepState(inner=inner, stopping=stopping, plateau=plateau)

  def _lower_learning_rates(
    self, state: SweepState, metrics: jax.Array
  ) -> tuple[_plateau.ReduceLROnPlateauState, optax.OptState]:
    """The plateau rule fed `metrics` (running configurations only), and the injected state with its rates."""
    assert (
      self.rule is not None and self.lr_name is not None and isinstance(state.plateau, _plateau.ReduceLROnPlateauState)
    )
    rule, lr_name = self.rule, self.lr_name
    hyper = dict(state.inner.hyperparams)
    current = state.plateau._replace(lr=hyper[lr_name].astype(state.plateau.lr.dtype))
    _, fed = jax.vmap(lambda s, v: rule.update({}, s, None, value=v))(current, metrics)
    plateau = self.where(self.running(state), fed, state.plateau)
    hyper[lr_name] = plateau.lr.astype(hyper[lr_name].dtype)
    return plateau, state.inner._replace(hyperparams=hyper)


def _index(key: str) -> int:
  return int(key.rsplit("__", 1)[1])
