"""The only module that looks inside optax: its combinators, opened for the planner.

Optax builds `chain`, `named_chain`, `masked`, `partition`, `apply_if_finite`,
`inject_hyperparams` and `clip_by_global_norm` as closures; their parts (the
inner transformations, the mask, `max_norm`) are reachable only through the
closures' free variables. This module reads them, by the update function's
module and qualified name and the free variables' names, and nothing else in
jadam does. Whatever it does not find exactly as expected (another optax
version's names, a missing variable, an unexpected state type) raises
`Unserved`: the planner then runs the transformation's own update, so an optax
release that renames a closure variable turns the fast path off, never makes it
compute something else.

`apply_if_finite`, `inject_hyperparams` and `partition` wrap a step: for the
kernel to run inside them, their own bookkeeping (the finite check and its
counters, the injected hyperparameters, the groups' masks) is done here, as
optax does it, around the planner's step of the inner transformation.

Checked against optax 0.2.8 (tests/kernels/test_optax_compat.py) and written to the
names optax has used since 0.2.5.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jadam._kernels.base import Ctx, Unserved, select

Run = Callable[[Any, Any, Any, Any, Ctx], tuple[Any, Any]]  # (update fn, state, grads, params, ctx) -> step


def closure(fn: Any) -> dict[str, Any]:
  """The free variables of a closure, by name (empty cells left out)."""
  code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
  if code is None:
    return {}
  out = {}
  for name, cell in zip(code.co_freevars, cells, strict=False):  # an object's own __code__ and __closure__
    try:
      out[name] = cell.cell_contents
    except ValueError:  # an empty cell
      pass
  return out


def _is(fn: Any, qualname: str) -> bool:
  return getattr(fn, "__module__", "").startswith("optax") and getattr(fn, "__qualname__", "") == qualname


def unwrap(fn: Any) -> Any:
  """Through optax's extra-args adapter (`with_extra_args_support`): the update function it calls."""
  while _is(fn, "with_extra_args_support.<locals>.update"):
    inner = closure(fn).get("tx")
    if inner is None:
      raise Unserved("an unknown version of optax's with_extra_args_support")
    fn = inner.update
  return fn


def chain_parts(fn: Any) -> list[Any] | None:
  """The update functions of `optax.chain` / `optax.named_chain` (in order), or None for another function."""
  if _is(fn, "chain.<locals>.update_fn"):
    fns = closure(fn).get("update_fns")
  elif _is(fn, "named_chain.<locals>.update_fn"):
    env = closure(fn)
    fns = [tx.update for _, tx in env.get("transforms", ())] if "transforms" in env else None
  else:
    return None
  if fns is None:
    raise Unserved("an unknown version of optax.chain")
  return list(fns)


def named_chain_rebuild(fn: Any, state: Any) -> Callable[[list[Any]], Any] | None:
  """How `optax.named_chain`'s state (a mapping by name) is rebuilt from its parts' states; None for `optax.chain`."""
  if not _is(fn, "named_chain.<locals>.update_fn"):
    return None
  names = [name for name, _ in closure(fn)["transforms"]]
  return lambda new: type(state)(zip(names, new, strict=True))


def chain_states(fn: Any, state: Any) -> list[Any]:
  """The states of a chain's parts, in order."""
  if _is(fn, "named_chain.<locals>.update_fn"):
    names = [name for name, _ in closure(fn)["transforms"]]
    if not isinstance(state, Mapping) or list(state) != names:
      raise Unserved("an optax.named_chain's state does not match its stages (call init first)")
    return [state[name] for name in names]
  if not isinstance(state, tuple):
    raise Unserved("a chain's state does not match its stages (call init first)")
  return list(state)


def clip_max_norm(fn: Any) -> Any | None:
  """`max_norm` of `optax.clip_by_global_norm`, or None for another function."""
  if not _is(fn, "clip_by_global_norm.<locals>.update_fn"):
    return None
  env = closure(fn)
  if "max_norm" not in env:
    raise Unserved("an unknown version of optax.clip_by_global_norm")
  return env["max_norm"]


def masked(fn: Any, state: Any) -> tuple[Any, Any] | None:
  """`(inner transformation, mask)` of `optax.masked`, or None for another function."""
  if not (_is(fn, "masked.<locals>.update_fn") and isinstance(state, optax.MaskedState)):
    return None
  env = closure(fn)
  if "inner" not in env or "mask" not in env:
    raise Unserved("an unknown version of optax.masked")
  return env["inner"], env["mask"]


def mask_tree(mask: Any, tree: Any) -> Any:
  return mask(tree) if callable(mask) else mask


def wrapper_step(fn: Any, state: Any, grads: Any, params: Any, ctx: Ctx, run: Run, all_finite: Callable) -> Any:
  """The step of an optax wrapper (`apply_if_finite`, `inject_hyperparams`, `partition`) around `run`'s, else None."""
  if isinstance(state, optax.ApplyIfFiniteState) and _is(fn, "apply_if_finite.<locals>.update"):
    return _if_finite(fn, state, grads, params, ctx, run, all_finite)
  if _is_inject(fn, state):
    return _inject(fn, state, grads, params, ctx, run)
  if isinstance(state, optax.PartitionState) and _is(fn, "partition.<locals>.update_fn"):
    return _partition(fn, state, grads, params, ctx, run)
  return None


def _if_finite(fn, state, grads, params, ctx, run, all_finite):
  env = closure(fn)
  if "inner" not in env or "max_consecutive_errors" not in env:
    raise Unserved("an unknown version of optax.apply_if_finite")
  inner, max_errors = env["inner"], env["max_consecutive_errors"]
  # optax.apply_if_finite's own bookkeeping, as it does it
  isfinite = all_finite(grads)  # optax's jnp.all(jnp.isfinite(...)) over the leaves, as one parallel pass
  notfinite_count = jnp.where(isfinite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count))
  ok = jnp.logical_or(isfinite, notfinite_count > max_errors)
  inner_ctx = ctx._replace(apply=ok if ctx.apply is None else jnp.logical_and(ctx.apply, ok))
  new_params, inner_state = run(inner.update, state.inner_state, grads, params, inner_ctx)
  new_state = optax.ApplyIfFiniteState(
    notfinite_count=notfinite_count,
    last_finite=isfinite,
    total_notfinite=jnp.where(isfinite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
    inner_state=inner_state,
  )
  # an enclosing apply_if_finite that rejects the step keeps this one's counters too
  kept = select(ctx, new_state._replace(inner_state=None), state._replace(inner_state=None))
  return new_params, kept._replace(inner_state=inner_state)


def _is_inject(fn, state) -> bool:
  fields = ("count", "hyperparams", "hyperparams_states", "inner_state")
  return (
    getattr(fn, "__module__", "").startswith("optax")
    and getattr(type(state), "_fields", None) == fields
    and {"inner_factory", "sched_hps", "other_hps"} <= set(closure(fn))
  )


def _inject(fn, state, grads, params, ctx, run):
  env = closure(fn)
  convert = getattr(fn, "__globals__", {}).get("_convert_floats")
  if convert is None:
    raise Unserved("an unknown version of optax.inject_hyperparams")
  dtype = env.get("hyperparam_dtype")
  if dtype is None:
    dtype = optax.tree.dtype(params, "highest")
  # optax.inject_hyperparams's bookkeeping, as it does it
  hparams = {k: convert(v, dtype) for k, v in state.hyperparams.items()}
  hparams.update({k: convert(f(state.hyperparams_states[k]), dtype) for k, f in env["sched_hps"].items()})
  hp_states = {k: f.update(state.hyperparams_states[k]) for k, f in env["sched_hps"].items()}
  inner = env["inner_factory"](**env["other_hps"], **hparams)
  new_params, inner_state = run(inner.update, state.inner_state, grads, params, ctx)
  new = type(state)(
    count=optax.safe_increment(state.count), hyperparams=hparams, hyperparams_states=hp_states, inner_state=inner_state
  )
  kept = select(ctx, new._replace(inner_state=None), state._replace(inner_state=None))
  return new_params, kept._replace(inner_state=inner_state)


def _masked_tree(tree, mask):
  return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask, tree)


def _partition(fn, state, grads, params, ctx, run):
  env = closure(fn)
  if "transforms" not in env or "param_labels" not in env:
    raise Unserved("an unknown version of optax.partition")
  transforms, param_labels = env["transforms"], env["param_labels"]
  if params is None:
    raise Unserved("the kernel needs the parameters")
  labels = param_labels(grads) if callable(param_labels) else param_labels
  new_params, inner_states = params, {}
  for group, tx in transforms.items():
    mask = jax.tree.map(lambda label, g=group: label == g, labels)
    masked_state = state.inner_states[group]
    if not isinstance(masked_state, optax.MaskedState):
      raise Unserved("a partition's state is not MaskedStates")
    group_params, inner = run(
      tx.update, masked_state.inner_state, _masked_tree(grads, mask), _masked_tree(params, mask), ctx
    )
    new_params = jax.tree.map(lambda m, new, old: new if m else old, mask, group_params, new_params)
    inner_states[group] = optax.MaskedState(inner_state=inner)
  return new_params, optax.PartitionState(inner_states)
