"""One frozen record per jadam transformation: what it is, and every argument it was built from.

Each jadam stage factory is decorated with :func:`stage`, which binds the call's
arguments to the factory's signature (defaults applied) and files a
:class:`Record` for the transformation it returns; a recipe of `_optimizers.py`
is built with :func:`optimizer_chain`, a `jadam.torch` optimizer's parameter
groups with :func:`register` too. The fast path (`jadam._kernels.plan`) reads
these records and nothing else of jadam's transformations: a stage, an argument
or a value it does not know makes it refuse, so adding an argument to a stage
can never leave the kernel computing the old formula.

**One mechanism: a weak-keyed table, keyed by the transformation's update
function, filled when the factory returns.** The alternatives were weighed:

- a `GradientTransformation` subclass with an extra field breaks the ``init,
  update = tx`` unpacking that optax and user code rely on (it is a NamedTuple);
- attributes set on the update function (``update_fn.jadam_stage``) are a side
  channel anyone can write, and `functools.wraps` copies them onto wrappers;
- keying by the `GradientTransformation` itself is impossible (NamedTuple
  instances cannot be weakly referenced) and unstable (optax's combinators
  rebuild the tuple; they keep the update function).

The update function is what optax's combinators keep (`optax.chain` holds the
functions, `with_extra_args_support` wraps them: `jadam._kernels.optax_compat`
unwraps), so keying by it finds a stage wherever it is used. Entries disappear
with their transformation.

**Identity of states.** A recipe's state is an :class:`OptimizerState`: exactly
`optax.chain`'s tuple (same children, same key paths ``[0]``, ``[1]``...), with
the optimizer's name and its stages' state types as static pytree metadata.
Another optimizer's update refuses it, naming the optimizer that made it, even
where the stage-type sequences coincide (``adam`` and ``rmsprop(centered=True)``);
`jadam.save_state` records it and `jadam.restore_state` checks it. As
static metadata it costs nothing under `jit`, and `optax.tree_map_params`,
shardings and orbax see the chain's tuple.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from jadam._core import common as _common
from jadam._core import host_init as _host_init
from jadam._core import placement as _placement


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
  """What a jadam transformation is: the one statement the fast path reads.

  Attributes:
    name: the stage or optimizer, e.g. ``"scale_by_moments"``, ``"jadam.adam"``.
    hparams: every argument of the factory, by name, as given (defaults applied):
      floats, arrays, schedules, dtypes, masks, inner transformations.
    defaults: the factory's default values (the arguments without one are absent).
    state: the type of the state the transformation's `init` returns.
  """

  name: str
  hparams: Mapping[str, Any]
  defaults: Mapping[str, Any]
  state: type | None

  def non_default(self) -> list[str]:
    """The arguments given a value other than their default (or that have none): what a planner must know."""
    out = []
    for key, value in self.hparams.items():
      if key not in self.defaults or not _same(value, self.defaults[key]):
        out.append(key)
    return out


def _same(value: Any, default: Any) -> bool:
  """Whether an argument is its default: identical, or an equal Python scalar (never an array comparison)."""
  if value is default:
    return True
  scalars = (bool, int, float, str, type(None))
  return (
    isinstance(value, scalars) and isinstance(default, scalars) and type(value) is type(default) and value == default
  )


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # update function (or loss function) -> Record


def register(key: Any, record: Record) -> Any:
  """Files `record` for `key`: a transformation (keyed by its update function) or a function. Returns `key`."""
  fn = key.update if isinstance(key, optax.GradientTransformation) else key
  _RECORDS[fn] = record
  return key


def lookup(key: Any) -> Record | None:
  """The record of a transformation or of its update function, else None."""
  fn = key.update if isinstance(key, optax.GradientTransformation) else key
  try:
    return _RECORDS.get(fn)
  except TypeError:  # not weakly referenceable: not ours
    return None


def stage(name: str, state: type | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Declares a stage factory: every transformation it returns is filed with its :class:`Record`.

  Usage, on a new stage (the whole declaration)::

      @registry.stage("scale_by_moments", state=ScaleByMomentsState)
      def scale_by_moments(b1=0.9, b2=0.999, *, mu_dtype=None, nu_dtype=None): ...

  Every argument of the call is recorded, defaults applied; a planner that
  does not implement one of them refuses where it has a non-default value.
  """

  def declare(factory: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(factory)
    defaults = types.MappingProxyType(
      {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    )

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Any:
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      tx = factory(*args, **kwargs)
      return register(tx, Record(name, types.MappingProxyType(dict(bound.arguments)), defaults, state))

    return make

  return declare


# --- optimizers: a chain of stages whose state says which optimizer made it -------
@dataclasses.dataclass(frozen=True)
class Identity:
  """Which optimizer made a state: its name and its stages' state types (static, hashable)."""

  optimizer: str
  stages: tuple[str, ...]

  def describe(self) -> str:
    return f"{self.optimizer} ({', '.join(self.stages)})"


class OptimizerState(tuple):
  """`optax.chain`'s state tuple, carrying the :class:`Identity` of the optimizer that made it.

  A tuple (indexing, unpacking and key paths are the chain's); the identity is
  static pytree metadata, so two optimizers' states are different trees.
  """

  identity: Identity

  def __new__(cls, states: Any, identity: Identity) -> OptimizerState:
    out = super().__new__(cls, states)
    out.identity = identity
    return out

  def __repr__(self) -> str:
    return f"OptimizerState[{self.identity.optimizer}]{tuple.__repr__(self)}"

  def __reduce__(self) -> Any:
    return OptimizerState, (tuple(self), self.identity)


def _flatten(state: OptimizerState) -> tuple[Any, Identity]:
  return [(jax.tree_util.SequenceKey(i), s) for i, s in enumerate(state)], state.identity


jax.tree_util.register_pytree_with_keys(
  OptimizerState, _flatten, lambda identity, children: OptimizerState(children, identity)
)


def optimizer_state(name: str, states: Any) -> OptimizerState:
  """A chain's state tuple as optimizer `name`'s state (its identity read from the stages' state types)."""
  return OptimizerState(states, Identity(name, _state_types(states)))


def identity_of(state: Any) -> Identity | None:
  return state.identity if isinstance(state, OptimizerState) else None


def _state_types(state: Any) -> tuple[str, ...]:
  return tuple(type(s).__name__ for s in state) if isinstance(state, tuple) else (type(state).__name__,)


def check_identity(name: str, mine: Identity | None, state: Any) -> None:
  """Raises a `TypeError` where `state` was made by another optimizer than `name` (`mine`)."""
  if mine is None:
    return
  theirs = identity_of(state)
  if theirs is None:  # a plain tuple (a tree rebuilt by hand): its stage types are all it says
    types_ = _state_types(state)
    if types_ == mine.stages:
      return
    theirs = Identity("another optimizer", types_)
  if theirs == mine:
    return
  raise TypeError(
    f"{name}'s update received a state made by {theirs.optimizer}'s init: its stages' states are"
    f" ({', '.join(theirs.stages)}), where {name}'s are ({', '.join(mine.stages)}). Pass the state that {name}'s"
    " own init returned."
  )


class ChainCheck:
  """What an optimizer chain checks before its stages run: the state's identity and the gradients."""

  def __init__(self, name: str, none_grads: bool):
    self.name, self.none_grads = name, none_grads
    self.identity: Identity | None = None

  def __call__(self, updates: Any, state: Any, params: Any) -> None:
    theirs = identity_of(state)
    if self.identity is None and theirs is not None and theirs.optimizer != self.name:
      check_identity(self.name, Identity(self.name, theirs.stages), state)  # no init yet: the name still differs
    check_identity(self.name, self.identity, state)
    if params is not None and not self.none_grads:
      _common.check_grads_present(self.name, updates, params)


def optimizer_chain(
  name: str, *stages: optax.GradientTransformation, none_grads: bool = False, **hparams: Any
) -> optax.GradientTransformationExtraArgs:
  """`optax.chain(*stages)` whose state carries the optimizer's :class:`Identity` and whose update checks it.

  Its record (name ``name``, state :class:`OptimizerState`) holds the stages
  (``hparams["stages"]``, each with its own record), the chain (``"chain"``),
  the check the update makes (``"check"``) and the recipe's `hparams`.

  Args:
    name: the optimizer, for messages and the identity, e.g. ``"jadam.adam"``.
    *stages: the transformations, in order.
    none_grads: accept a `None` gradient where the params hold an array (an
      optimizer that skips such leaves, as `torch.optim.SparseAdam` does, and
      whose updates go through :func:`jadam.apply_updates`).
    **hparams: the recipe's own arguments, recorded as they are.
  """
  tx = optax.chain(*stages)
  check = ChainCheck(name, none_grads)

  def init_fn(params):
    state = optimizer_state(name, _placement.on_params_mesh(_host_init.init(tx.init, params), params))
    check.identity = state.identity  # the stage types do not depend on the params: the first init says them
    return state

  def update_fn(updates, state, params=None, **extra_args):
    if check.identity is None and params is not None:  # update before this chain's init (a restored state)
      check.identity = Identity(name, _state_types(jax.eval_shape(tx.init, params)))
    check(updates, state, params)
    new_updates, new_state = tx.update(updates, tuple(state), params, **extra_args)
    return new_updates, optimizer_state(name, new_state)

  out = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  fields = {"stages": stages, "chain": tx, "check": check, "none_grads": none_grads, **hparams}
  return register(out, Record(name, types.MappingProxyType(fields), types.MappingProxyType({}), OptimizerState))


def mark_function(fn: Callable[..., Any], name: str, **hparams: Any) -> Callable[..., Any]:
  """Files a record for a function that is not a transformation (e.g. :func:`jadam.value_and_sparse_grad`'s)."""
  return register(fn, Record(name, types.MappingProxyType(hparams), types.MappingProxyType({}), None))
