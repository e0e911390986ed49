"""PyTorch's parameter groups on a parameter pytree, built on `optax.partition`."""

from __future__ import annotations

import numbers
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jadam._core import common as _common
from jadam._core import placement as _placement
from jadam._core import registry as _registry
from jadam._core.common import path_string

Build = Callable[[dict], optax.GradientTransformation]
UNSET = object()  # a group that gives no "lr" of its own
Matcher = Callable[[str, Any], bool]


class Groups(NamedTuple):
  """What a `jadam.torch` optimizer was built from, for `jadam.torch.state_dict` and `load_state_dict`.

  A view of its registry record (`jadam._core.registry`, name ``"torch_groups"``).
  """

  name: str  # torch's class name, e.g. "AdamW"
  groups: tuple[dict, ...]  # hyperparameters of group0, group1, ..., then of the "default" group
  labels: Callable[[Any], Any] | None  # the partition's labels; None: a single group


def groups_of(tx: Any) -> Groups | None:
  """The `Groups` of a transformation made by a `jadam.torch` optimizer, else None."""
  record = _registry.lookup(tx)
  if record is None or record.name != "torch_groups":
    return None
  hp = record.hparams
  return Groups(hp["optimizer"], hp["groups"], hp["labels"])


def _front(name: str, inner: optax.GradientTransformation, groups: tuple[dict, ...], labels: Any):
  """`inner` behind the door's own update, filed as `name`'s groups; with groups (`labels`), the update first
  checks that the params are the gradients' tree."""

  def update_fn(updates, state, params=None, **extra_args):
    # optax.partition masks the params with the updates' labels: mismatched trees would fail inside jax.tree.map.
    if params is not None and labels is not None:
      _common.check_tree(f"jadam.torch.{name}", updates, "the params", params, _common.PARAMS_HINT)
    return inner.update(updates, state, params, **extra_args)

  def init_fn(params):  # the counts on the params' mesh, as jadam's optimizers place theirs
    return _placement.on_params_mesh(inner.init(params), params)

  out = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  hparams = {"optimizer": name, "groups": groups, "labels": labels, "inner": inner}
  return _registry.register(
    out, _registry.Record("torch_groups", types.MappingProxyType(hparams), types.MappingProxyType({}), None)
  )


def _matcher(spec: Any, index: int) -> Matcher:
  """A group's `"params"` entry as a predicate of (path string, leaf)."""
  if isinstance(spec, str):
    try:
      pattern = re.compile(spec)
    except re.error as e:
      raise ValueError(f"param group {index}: 'params' {spec!r} is not a valid regular expression: {e}.") from None
    return lambda path, leaf: pattern.fullmatch(path) is not None
  if callable(spec):
    return lambda path, leaf: bool(spec(path, leaf))
  if isinstance(spec, (list, tuple)) and spec:
    parts = [_matcher(s, index) for s in spec]
    return lambda path, leaf: any(p(path, leaf) for p in parts)
  raise TypeError(
    f"param group {index}: 'params' must be a regular expression matched against the"
    " '/'-joined key path (e.g. 'encoder/.*'), a predicate (path, leaf) -> bool, or a"
    f" non-empty list of these; got {type(spec).__name__} {spec!r}."
  )


def _is_group_list(params: Any) -> bool:
  return isinstance(params, (list, tuple)) and len(params) > 0 and all(isinstance(g, Mapping) for g in params)


def grouped(
  name: str, params: Any, defaults: dict, build: Build, *, rebase: Callable[[Any, Any, int, int], Any]
) -> optax.GradientTransformation:
  """The optimizer `name` over parameter groups, as `optax.partition` of one `build(hp)` per group.

  Args:
    name: the optimizer's name, for messages.
    params: torch's first argument: None or a parameter pytree (one group: every
      leaf uses `defaults`), or a list of group dicts, each with a ``"params"``
      selector and overrides of any key of `defaults`.
    defaults: the hyperparameters given as keyword arguments.
    build: makes the transformation of one group from its hyperparameters.
    rebase: `rebase(default_lr, group_lr, index, n_groups)` gives group
      `index`'s learning rate from the default and the group's own (`UNSET`
      where it gives none); the leaves no group selects are group `n_groups`
      (with no groups at all, group 0 of 0).
  """

  def with_lr(hp, own, i, n):
    return {**hp, "lr": rebase(defaults["lr"], own, i, n)} if "lr" in defaults else hp

  if params is None or (not _is_group_list(params) and not _looks_like_hyperparameter(params)):
    hp = with_lr(dict(defaults), UNSET, 0, 0)
    return _front(name, build(hp), (hp,), None)
  if _looks_like_hyperparameter(params):
    raise TypeError(
      f"{name}'s first argument is PyTorch's `params`: None, the parameter pytree"
      " (every leaf in one group) or a list of parameter groups (dicts); got"
      f" {params!r}. Pass hyperparameters by name, e.g. {name}(lr={params!r})."
    )
  matchers, transforms, hps = [], {}, []
  for i, group in enumerate(params):
    if "params" not in group:
      raise ValueError(f"param group {i} of {name} has no 'params' entry: it must select its leaves.")
    unknown = sorted(set(group) - set(defaults) - {"params"})
    if unknown:
      raise ValueError(
        f"param group {i} of {name} sets {', '.join(map(repr, unknown))}, which {name} does not"
        f" take; its hyperparameters are {', '.join(sorted(defaults))}."
      )
    matchers.append(_matcher(group["params"], i))
    hp = {**defaults, **{k: v for k, v in group.items() if k != "params"}}
    hp = with_lr(hp, group.get("lr", UNSET), i, len(params))
    transforms[f"group{i}"] = build(hp)
    hps.append(hp)
  default_hp = with_lr(dict(defaults), UNSET, len(params), len(params))
  transforms["default"] = build(default_hp)
  specs = [g["params"] for g in params]

  def labels(tree):
    def label(path, leaf):
      where = path_string(path)
      hits = [i for i, match in enumerate(matchers) if match(where, leaf)]
      if len(hits) > 1:
        raise ValueError(
          f"some parameters appear in more than one parameter group: {where!r} is selected by"
          f" group {hits[0]} ({specs[hits[0]]!r}) and group {hits[1]} ({specs[hits[1]]!r})."
        )
      return f"group{hits[0]}" if hits else "default"

    # A row-sparse gradient (BCOO) is one leaf: its label is its table's; a None gradient keeps its label too.
    out = jax.tree_util.tree_map_with_path(label, tree, is_leaf=_common.is_update_leaf)
    used = set(jax.tree.leaves(out))
    # No leaves at all: optax.tree_map_params's placeholder for the params (or an empty tree), which no group can
    # select; a group that misses is told on the real parameters.
    for i, spec in enumerate(specs if used else ()):
      if f"group{i}" not in used:
        paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)][:4]
        raise ValueError(
          f"param group {i} of {name} ({spec!r}) selects no parameter; patterns are matched in"
          f" full against '/'-joined key paths such as {paths}."
        )
    return out

  return _front(name, optax.partition(transforms, labels), (*hps, default_hp), labels)


def _looks_like_hyperparameter(x: Any) -> bool:
  """A number passed where the params belong: `Adam(1e-3)` meant `Adam(lr=1e-3)`."""
  return isinstance(x, numbers.Number) or (isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0)
