"""A training run moved between PyTorch and jadam: `torch.optim` state dicts in both directions.

`load_state_dict` turns a `torch.optim` optimizer's `state_dict()` (and its
scheduler's) into the state of the matching `jadam.torch` optimizer;
`state_dict` gives the reverse, loadable by `torch.optim.X.load_state_dict`.
Both are exact: every number is copied, never recomputed, so a run continued on
the other side follows the uninterrupted one to rounding. Adam8bit/AdamW8bit
use bitsandbytes' state dicts instead, whose 8-bit codes and scales are copied
as they are.

The jadam state is found by walking the optimizer's state by the *type* of
each stage's state (`ScaleByMomentsState` holds `exp_avg` and `exp_avg_sq`,
`MomentumState` the `momentum_buffer`, ...), never by a stage's position in a
chain, so stages that a recipe adds with neutral values do not disturb it.

Reading a checkpoint never runs code from it: :func:`load_checkpoint` is
`torch.load(..., weights_only=True)`, which unpickles tensors, numbers, strings
and containers only. A plain `torch.load` (or `pickle.load`) of a file from
someone else runs whatever the file asks for (a pickle names functions to call
while it is read), so a checkpoint downloaded from the web could run any
command on your machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._lbfgs import LbfgsState
from jadam._stages.correct import NesterovCorrectState
from jadam._stages.factored import ScaleByFactoredMomentsState
from jadam._stages.moments import AccumulateSquaresState, MaxNuState, ScaleByInfMomentsState, ScaleByMomentsState
from jadam._stages.scale import MomentumState, ScaleByAsgdState, ScaleByDeltaState, ScaleByRpropState
from jadam._stages.sparse import ScaleBySparseMomentsState
from jadam._tuning.plateau import ReduceLROnPlateauState
from jadam.torch import _groups
from jadam.torch._optim import AsgdOnPlateauState
from jadam.torch._schedulers import LRScheduler, OneCycleLR, ReduceLROnPlateau

__all__ = ("TorchName", "flax_names", "load_checkpoint", "load_state_dict", "scheduler_state_dict", "state_dict")


class TorchName(NamedTuple):
  """The PyTorch parameter a jadam leaf stands for.

  Attributes:
    name: its name in `module.named_parameters()`, e.g. ``"fc1.weight"``.
    perm: the axes permutation from PyTorch's layout to jadam's
      (``np.transpose(torch_array, perm)`` is the jadam leaf), applied to the
      parameter and to every moment; None when the layouts agree. A Linear
      weight ``(out, in)`` to a Flax kernel ``(in, out)`` is ``(1, 0)``; a Conv2d
      weight OIHW to HWIO is ``(2, 3, 1, 0)``.
  """

  name: str
  perm: tuple[int, ...] | None = None


# PyTorch's per-parameter state keys, optimizer by optimizer: (key, jadam state type, field, kept(hp)).
# Field "count" is the stage's step count, torch's `step` tensor. Scalar fields (mu_product) hold one
# number for the whole group; PyTorch keeps a copy in every parameter's state.


def _require_torch():
  """PyTorch, which the state-dict bridge needs and jadam does not require: a clear error where it is missing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "jadam.torch's state-dict bridge converts to and from torch tensors and needs PyTorch:"
      " pip install 'jadam[torch]' (or torch itself)"
    ) from e
  return torch


def _always(hp):
  return True


def _nonzero(key):
  def kept(hp):
    v = _number(hp[key])
    return v is None or v != 0  # a schedule: PyTorch keeps the buffer

  return kept


_ADAM = (
  ("step", ScaleByMomentsState, "count", _always),
  ("exp_avg", ScaleByMomentsState, "mu", _always),
  ("exp_avg_sq", ScaleByMomentsState, "nu", _always),
)
_LAYOUT: dict[str, tuple] = {
  "Adam": (*_ADAM, ("max_exp_avg_sq", MaxNuState, "nu_max", lambda hp: hp["amsgrad"])),
  "AdamW": (*_ADAM, ("max_exp_avg_sq", MaxNuState, "nu_max", lambda hp: hp["amsgrad"])),
  "RAdam": _ADAM,
  "NAdam": (_ADAM[0], ("mu_product", NesterovCorrectState, "mu_product", _always), *_ADAM[1:]),
  "Adamax": (
    ("step", ScaleByInfMomentsState, "count", _always),
    ("exp_avg", ScaleByInfMomentsState, "mu", _always),
    ("exp_inf", ScaleByInfMomentsState, "nu", _always),
  ),
  "Adagrad": (
    ("step", AccumulateSquaresState, "count", _always),
    ("sum", AccumulateSquaresState, "sum_of_squares", _always),
  ),
  "RMSprop": (
    ("step", ScaleByMomentsState, "count", _always),
    ("square_avg", ScaleByMomentsState, "nu", _always),
    ("momentum_buffer", MomentumState, "trace", _nonzero("momentum")),
    ("grad_avg", ScaleByMomentsState, "mu", lambda hp: hp["centered"]),
  ),
  "SGD": (("momentum_buffer", MomentumState, "trace", _nonzero("momentum")),),
  "Adadelta": (
    ("step", ScaleByMomentsState, "count", _always),
    ("square_avg", ScaleByMomentsState, "nu", _always),
    ("acc_delta", ScaleByDeltaState, "acc_delta", _always),
  ),
  "Rprop": (
    ("step", ScaleByRpropState, "count", _always),
    ("prev", ScaleByRpropState, "prev", _always),
    ("step_size", ScaleByRpropState, "step_size", _always),
  ),
  "SparseAdam": (
    ("step", ScaleBySparseMomentsState, "count", _always),
    ("exp_avg", ScaleBySparseMomentsState, "mu", _always),
    ("exp_avg_sq", ScaleBySparseMomentsState, "nu", _always),
  ),
  "ASGD": (
    ("step", ScaleByAsgdState, "count", _always),
    ("eta", ScaleByAsgdState, "eta", _always),
    ("mu", ScaleByAsgdState, "mu", _always),
    ("ax", ScaleByAsgdState, "ax", _always),
  ),
}
_SCALARS = frozenset({"mu_product"})
_PER_TABLE = frozenset({"SparseAdam"})  # optimizers whose tables count their own steps (a Python int in PyTorch)


def _asgd_eta(hp: Mapping[str, Any], step: int) -> float:
  """ASGD's `eta` after `step` steps, lr that of the last step (a number or a schedule's value)."""
  return _asgd_eta_of(_at(hp["lr"], step - 1), hp, step)


def _asgd_eta_of(lr: float, hp: Mapping[str, Any], step: int) -> float:
  """PyTorch's ASGD `eta` after `step` steps whose last ran at rate `lr`: `lr / (1 + lambd * lr * step) ** alpha`."""
  lambd, alpha = float(hp["lambd"]), float(hp["alpha"])
  return lr / ((1 + lambd * lr * float(step)) ** alpha)


def _asgd_mu(hp: Mapping[str, Any], step: int) -> float:
  """ASGD's `mu` after `step` steps: PyTorch's `1 / max(1, step - t0)`."""
  return 1 / max(1, float(step) - float(hp["t0"]))


# Keys that PyTorch keeps but jadam computes from the step and the hyperparameters (its state has no field for
# them): written on the way out with PyTorch's own formula, checked on the way in.
_DERIVED: dict[str, Callable[[Mapping[str, Any], int], float]] = {"eta": _asgd_eta, "mu": _asgd_mu}
_DERIVED_RTOL = 1e-6  # PyTorch rounds them to its scalar dtype, float32 unless the default dtype is float64

# Flags that choose PyTorch's kernels, not its arithmetic: ignored on the way in, PyTorch's defaults on the way out.
_KERNEL_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
_FLAGS_OF = {
  "Adam": ("foreach", "capturable", "differentiable", "fused"),
  "AdamW": ("foreach", "capturable", "differentiable", "fused"),
  "SGD": ("foreach", "differentiable", "fused"),
  "RMSprop": ("capturable", "foreach", "differentiable"),
  "Adagrad": ("foreach", "differentiable", "fused"),
  "NAdam": ("foreach", "capturable", "differentiable"),
  "RAdam": ("foreach", "capturable", "differentiable"),
  "Adamax": ("foreach", "capturable", "differentiable"),
  "Adadelta": ("capturable", "foreach", "differentiable"),
  "Rprop": ("foreach", "differentiable", "capturable"),
  "ASGD": ("foreach", "differentiable", "capturable"),
  "SparseAdam": (),
}
# Keys PyTorch's schedulers add to a param group.
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})
_RTOL = 1e-9  # hyperparameters: PyTorch's recursive schedules and jadam's closed forms agree to rounding (float64)


def _number(x: Any) -> float | None:
  """A hyperparameter's value if it is a concrete number (not a schedule)."""
  if _hparams.is_schedule(x):  # jadam.torch's schedulers are callables too
    return None
  return _hparams.concrete_value(x)


def _at(x: Any, count: int) -> Any:
  """A hyperparameter's value at step `count`, as a Python number (bools stay bools)."""
  if isinstance(x, (bool, str, int)) or x is None:  # an int stays one (Muon's ns_steps feeds range())
    return x
  if isinstance(x, (tuple, list)):
    return tuple(_at(v, count) for v in x)
  if isinstance(x, ReduceLROnPlateau):
    raise AssertionError("handled by the caller")
  if _hparams.is_schedule(x):
    return float(x(jnp.asarray(count, jnp.int32)))
  return float(x)


def _spec(tx: Any, what: str) -> _groups.Groups:
  spec = _groups.groups_of(tx)
  if spec is None:
    raise TypeError(
      f"{what}: tx must be a jadam.torch optimizer itself (e.g. jadam.torch.AdamW(...)), not wrapped in another"
      f" transformation; got {tx!r}. Chain other transformations around it after converting its state."
    )
  if spec.name not in _LAYOUT and spec.name not in _EIGHT_BIT and spec.name != "LBFGS":
    raise NotImplementedError(f"{what}: no state_dict mapping for jadam.torch.{spec.name} yet.")
  return spec


# ----------------------------------------------------------------------------------------------------- names


def _normalise_names(params: Any, names: Any, what: str) -> dict[str, TorchName]:
  """`names` as {jadam path: TorchName} in PyTorch's parameter order."""
  paths = [_groups.path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if names is None:
    return {p: TorchName(p) for p in paths}
  if not isinstance(names, Mapping):
    raise TypeError(
      f"{what}: names must map each leaf's '/'-joined path to its PyTorch parameter name (or a"
      f" jadam.torch.TorchName(name, perm)), in PyTorch's parameter order; got {type(names).__name__}."
    )
  out = {}
  for path, v in names.items():
    if isinstance(v, str):
      v = TorchName(v)
    elif isinstance(v, (tuple, list)) and not isinstance(v, TorchName) and len(v) == 2:
      v = TorchName(v[0], None if v[1] is None else tuple(v[1]))
    if not isinstance(v, TorchName) or not isinstance(v.name, str):
      raise TypeError(f"{what}: names[{path!r}] must be a PyTorch parameter name or a TorchName; got {v!r}.")
    out[path] = v
  missing = [p for p in paths if p not in out]
  extra = [p for p in out if p not in set(paths)]
  if missing or extra:
    raise ValueError(
      f"{what}: names must list every leaf of params once."
      + (f" Leaves without a name: {missing}." if missing else "")
      + (f" Names of no leaf: {extra} (leaves look like {paths[:3]})." if extra else "")
    )
  torch_names = [v.name for v in out.values()]
  dup = sorted({n for n in torch_names if torch_names.count(n) > 1})
  if dup:
    raise ValueError(f"{what}: names gives the same PyTorch name to two leaves: {dup}.")
  return out


def _perm_of(module_type: str, ndim: int, leaf: str) -> tuple[int, ...] | None:
  if leaf != "weight" or ndim < 2:
    return None
  if module_type == "Linear":
    return (1, 0)
  if module_type in ("Conv1d", "Conv2d", "Conv3d"):
    return (*range(2, ndim), 1, 0)
  if module_type in ("Embedding",):
    return None
  raise NotImplementedError(
    f"no layout rule for a {module_type} weight of rank {ndim}; pass names with a TorchName(name, perm) for it."
  )


_FLAX_LEAF = {"Linear": "kernel", "Conv1d": "kernel", "Conv2d": "kernel", "Conv3d": "kernel", "Embedding": "embedding"}


def flax_names(params: Any, module: Any) -> dict[str, TorchName]:
  """`names` for a Flax (NNX or Linen) model whose layers mirror a PyTorch module's.

  Each PyTorch parameter ``"a.b.weight"`` of `module.named_parameters()` is
  matched to the leaf ``"a/b/<leaf>"`` of `params` (or ``"a/b_<i>/..."`` for a
  `Sequential` index ``b.<i>``, Linen's naming): ``kernel`` for Linear and
  Conv weights, transposed ((out, in) to (in, out); OIHW to HWIO), ``scale``
  for norms, ``embedding`` for Embedding, ``bias`` for biases.

  Args:
    params: the Flax parameters: `nnx.state(model, nnx.Param)` or Linen's
      ``variables["params"]``.
    module: the `torch.nn.Module`.

  Returns:
    {leaf path: TorchName}, in PyTorch's parameter order, for `names=`.
  """
  paths = {_groups.path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  types = {n: type(m).__name__ for n, m in module.named_modules()}
  out = {}
  for name, p in module.named_parameters():
    owner, _, leaf = name.rpartition(".")
    kind = types.get(owner, "")
    flax_leaf = _FLAX_LEAF.get(kind, "scale") if leaf == "weight" else leaf
    parts = owner.split(".") if owner else []
    candidates = ["/".join([*parts, flax_leaf])]
    if any(s.isdigit() for s in parts):  # Linen names a list's items layers_0
      merged: list[str] = []
      for s in parts:
        if s.isdigit() and merged:
          merged[-1] = f"{merged[-1]}_{s}"
        else:
          merged.append(s)
      candidates.append("/".join([*merged, flax_leaf]))
    hit = [c for c in candidates if c in paths]
    if not hit:
      raise ValueError(
        f"flax_names: PyTorch's {name!r} ({kind}) has no leaf {' or '.join(map(repr, candidates))} in params"
        f" (leaves look like {sorted(paths)[:4]}); name the layers alike or pass names yourself."
      )
    out[hit[0]] = TorchName(name, _perm_of(kind, p.dim(), leaf))
  extra = sorted(paths - set(out))
  if extra:
    raise ValueError(f"flax_names: leaves of params with no PyTorch parameter: {extra}.")
  return out


# ----------------------------------------------------------------------------------------------------- groups


def _torch_groups(spec: _groups.Groups, params: Any, names: dict[str, TorchName]) -> list[tuple[str, dict, list[str]]]:
  """PyTorch's param groups as (jadam label, hyperparameters, leaf paths in PyTorch's order)."""
  if spec.labels is None:
    return [("default", spec.groups[0], list(names))]
  labels = {_groups.path_string(p): label for p, label in jax.tree_util.tree_leaves_with_path(spec.labels(params))}
  out = []
  for i, hp in enumerate(spec.groups[:-1]):
    out.append((f"group{i}", hp, [p for p in names if labels[p] == f"group{i}"]))
  rest = [p for p in names if labels[p] == "default"]
  if rest:
    out.append(("default", spec.groups[-1], rest))
  return out


def _scalar_dtype():
  torch = _require_torch()

  return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _walk(node: Any, fn: Callable[[Any, str], Any], label: str = "default") -> Any:
  """Rebuild a jadam state, calling `fn(stage_state, group_label)` on every NamedTuple stage state."""
  if isinstance(node, optax.PartitionState):
    return node._replace(inner_states={k: _walk(v, fn, k) for k, v in node.inner_states.items()})
  if isinstance(node, optax.MaskedState):
    return node._replace(inner_state=_walk(node.inner_state, fn, label))
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    if type(node) not in _KNOWN:  # e.g. optax.InjectHyperparamsState around a chain
      node = type(node)(*(_walk(v, fn, label) if isinstance(v, tuple) else v for v in node))
    return fn(node, label)
  if isinstance(node, _registry.OptimizerState):  # a recipe's chain: its identity kept
    return _registry.OptimizerState([_walk(v, fn, label) for v in node], node.identity)
  if isinstance(node, (tuple, list)):
    return type(node)(_walk(v, fn, label) for v in node)
  return node


def _stages(state: Any) -> dict[str, dict[type, Any]]:
  """{group label: {stage state type: the stage state}}; a type twice in a group is refused."""
  found: dict[str, dict[type, Any]] = {}

  def visit(node, label):
    group = found.setdefault(label, {})
    if type(node) in group and type(node) in _KNOWN:
      raise ValueError(f"the state holds two {type(node).__name__} in one group: which is PyTorch's is ambiguous.")
    group[type(node)] = node
    return node

  _walk(state, visit)
  return found


_KNOWN = frozenset(
  {
    ScaleByMomentsState,
    MaxNuState,
    MomentumState,
    AccumulateSquaresState,
    ScaleByInfMomentsState,
    NesterovCorrectState,
    ReduceLROnPlateauState,
    ScaleByDeltaState,
    ScaleByRpropState,
    ScaleByAsgdState,
    ScaleBySparseMomentsState,
  }
)


# --- Adafactor and Muon ---------------------------------------------------------------------------
_LAYOUT["Adafactor"] = (
  ("step", ScaleByFactoredMomentsState, "count", _always),
  ("row_var", ScaleByFactoredMomentsState, "row_var", _always),
  ("col_var", ScaleByFactoredMomentsState, "col_var", _always),
  ("variance", ScaleByFactoredMomentsState, "variance", _always),
)
_LAYOUT["Muon"] = (("momentum_buffer", MomentumState, "trace", _always),)  # PyTorch's Muon keeps no step
_FLAGS_OF["Adafactor"] = ("foreach",)
_FLAGS_OF["Muon"] = ()
_KNOWN = _KNOWN | {ScaleByFactoredMomentsState}
# Keys PyTorch keeps only for parameters of some ranks: Adafactor factors those of two or more dimensions.
_RANKS: dict[str, Callable[[int], bool]] = {
  "row_var": lambda ndim: ndim >= 2,
  "col_var": lambda ndim: ndim >= 2,
  "variance": lambda ndim: ndim < 2,
}


def _has(key: str, ndim: int) -> bool:
  """Whether PyTorch keeps `key` for a parameter of `ndim` dimensions."""
  return _RANKS.get(key, _always)(ndim)


def _ndims(params: Any) -> dict[str, int]:
  return {_groups.path_string(q): np.ndim(leaf) for q, leaf in jax.tree_util.tree_leaves_with_path(params)}


# --- end Adafactor and Muon -----------------------------------------------------------------------------------


def _is_count(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and x.shape == () and jnp.issubdtype(x.dtype, jnp.integer)


# ----------------------------------------------------------------------------------------------------- torch -> jadam


def load_checkpoint(path: str | os.PathLike) -> Any:
  """A file written by `torch.save`, read without running code from it.

  This is `torch.load(path, map_location="cpu", weights_only=True)`: it
  rebuilds tensors, numbers, strings and containers and refuses anything else.
  A plain `torch.load` or `pickle.load` calls whatever functions the file
  names while reading it, so a checkpoint from someone else could run any
  command on your machine; such a file is refused here with a `ValueError`.
  """
  import pickle

  torch = _require_torch()

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
      f"refused to load {os.fspath(path)!r}: it holds objects other than tensors, numbers, strings and"
      " containers, and unpickling them would run code from the file (torch.load(weights_only=True)"
      f" said: {str(e).splitlines()[0]})."
    ) from None


def _as_numpy(t: Any, where: str) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      return np.asarray(t.float().numpy()).astype(jnp.bfloat16)
    return np.asarray(t.numpy())
  if isinstance(t, (int, float, np.ndarray)):
    return np.asarray(t)
  raise TypeError(f"{where} must be a tensor; got {type(t).__name__}.")


def _close(a: Any, b: Any, rtol: float | None = None) -> bool:
  if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
    return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_close, a, b))
  if isinstance(a, (bool, str)) or isinstance(b, (bool, str)) or a is None or b is None:
    return a == b
  a, b = float(a), float(b)
  if rtol is None:
    rtol = _RTOL if _common.float_dtype() == jnp.float64 else 1e-6  # a schedule evaluated in float32
  return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def load_state_dict(
  tx: optax.GradientTransformation,
  params: Any,
  state_dict: Mapping[str, Any] | str | os.PathLike,
  *,
  names: Mapping[str, str | TorchName] | None = None,
  scheduler: Mapping[str, Any] | None = None,
  steps: int | None = None,
) -> Any:
  """The state of `tx` that continues a PyTorch run from its optimizer's `state_dict()`.

  Every moment (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``sum``,
  ``square_avg``, ``grad_avg``, ``momentum_buffer``, ``exp_inf``,
  ``mu_product``, ``acc_delta``, ``prev``, ``step_size``, ``ax``; Adafactor's
  ``row_var`` and ``col_var`` for parameters of two or more dimensions and
  ``variance`` for the others) is copied
  into the stage that holds it, transposed as `names` says; PyTorch's ``step``
  becomes every stage's step count, which is also the position of a scheduler
  given as `lr` (SparseAdam's per-table ``step`` becomes each table's count).
  ASGD's ``eta`` and ``mu``, which jadam derives from the step, are checked
  (under ReduceLROnPlateau, ``eta`` gives the rate of the step before, which
  ASGD's next step reads). Updates of `tx` from the returned state then equal
  PyTorch's next steps.
  For Adam8bit/AdamW8bit the state dict is bitsandbytes' (each parameter's
  ``state1``/``state2`` uint8 codes, ``absmax1``/``absmax2`` block scales and
  ``qmap1``/``qmap2`` under ``"__bnb_optimizer_quant_state__"``, or float32
  ``state1``/``state2`` for small tensors): codes and scales are copied as
  they are (same dynamic map, same blocks of 256 in PyTorch's row-major
  layout), so an 8-bit leaf cannot be transposed by `names`.

  Checked, with nothing returned on a mismatch: the optimizer (its param
  groups' keys are `tx`'s), the hyperparameters (each group's lr, betas, eps,
  ... equal `tx`'s; a scheduler's lr at the current step), the parameters
  (their number per group, their names if the state dict has them, every
  shape), and that all parameters took the same number of steps.

  Args:
    tx: a `jadam.torch` optimizer, with the hyperparameters and groups of the
      PyTorch run (group ``i`` of `tx` is PyTorch's param group ``i``; leaves
      in no group form PyTorch's last group).
    params: the parameter pytree (its shapes and dtypes are the state's).
    state_dict: ``optimizer.state_dict()``, or the path of a file holding just
      that (read by :func:`load_checkpoint`, which runs no code from it).
    names: {leaf path: PyTorch parameter name or :class:`TorchName`}, in the
      order PyTorch's optimizer got its parameters (for a model given whole,
      `model.named_parameters()`'s; with groups, each group's leaves in this
      order). :func:`flax_names` builds it for a Flax model. Default: the
      leaves in `jax.tree.leaves` order, with PyTorch's shapes.
    scheduler: the PyTorch scheduler's `state_dict()`, if the run had one:
      ReduceLROnPlateau's best, num_bad_epochs and cooldown_counter go to the
      plateau state; for the others, last_epoch is checked against the step.
    steps: the number of optimizer steps taken, needed only where the state
      dict does not say (SGD, whose state has no step; SparseAdam whose tables
      took different numbers of steps, under a schedule) and no scheduler does.

  Returns:
    The state of `tx` for `params`.
  """
  what = "jadam.torch.load_state_dict"
  spec = _spec(tx, what)
  sd = _read_state_dict(what, state_dict)
  if spec.name in _EIGHT_BIT:
    return _load_8bit(what, tx, spec, params, sd, names, scheduler, steps)
  if spec.name == "LBFGS":
    return _load_lbfgs(what, tx, spec, params, sd, names)
  run = _match(what, spec, params, sd, names)
  ndims = _ndims(params)
  taken, odd = _steps_taken(what, spec, run, ndims)
  step = _common_step(what, spec, taken, run.names, scheduler, steps)
  plateau = _check_hyperparameters(what, run, step, scheduler)
  if odd:
    p, have, expect = odd[0]
    raise ValueError(
      f"{what}: parameter {run.names[p].name!r} ({p}) has state {have}, but torch.optim.{spec.name}"
      f" with these hyperparameters keeps {expect}: is this another optimizer's state dict?"
    )
  _check_plateau_scheduler(what, plateau, scheduler, step)
  template = tx.init(params)  # every tensor is converted before the state is built: nothing partial on an error
  values = _collect(what, spec, run, _stages(template), ndims, taken, step)
  last_lrs = _asgd_last_lrs(what, spec, run, step) if plateau and spec.name == "ASGD" else {}
  return _walk(template, _filler(step, values, plateau, last_lrs, dict(scheduler or {})))


def _read_state_dict(what: str, state_dict: Any) -> Mapping[str, Any]:
  """An optimizer's state dict, read from its file if given a path; refused unless it has PyTorch's two keys."""
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_checkpoint(state_dict)
  if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "param_groups"}:
    keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
    raise TypeError(
      f"{what}: state_dict must be a torch.optim optimizer's state_dict() (keys 'state' and 'param_groups');"
      f" got {keys}. A checkpoint dict holds it under its own key, e.g. checkpoint['optim']."
    )
  return state_dict


class _Run(NamedTuple):
  """A PyTorch state dict matched to a jadam.torch optimizer's groups."""

  groups: list[tuple[str, dict, list[str]]]  # (jadam label, tx's hyperparameters, leaf paths in PyTorch's order)
  saved: list[Mapping[str, Any]]  # the state dict's param groups, in the same order
  ids: dict[str, Any]  # jadam path -> PyTorch's parameter id
  per_param: Mapping[Any, Mapping[str, Any]]  # the state dict's "state"
  names: dict[str, TorchName]


def _match(what: str, spec: _groups.Groups, params: Any, sd: Mapping[str, Any], names: Any) -> _Run:
  """Step 1: match the state dict's param groups and parameters to `tx`'s (keys, names, counts)."""
  names = _normalise_names(params, names, what)
  groups = _torch_groups(spec, params, names)
  saved = list(sd["param_groups"])
  if len(saved) != len(groups):
    raise ValueError(
      f"{what}: the state dict has {len(saved)} param groups, tx has {len(groups)}"
      f" ({', '.join(label for label, _, _ in groups)})."
    )
  wanted = set(spec.groups[0]) | set(_FLAGS_OF[spec.name])
  index: dict[str, Any] = {}
  for g, ((label, _, paths), sg) in enumerate(zip(groups, saved, strict=True)):
    _check_group_keys(what, spec.name, g, sg, wanted)
    index.update(_group_index(what, g, label, paths, sg, names))
  per_param = sd["state"]
  unknown_ids = sorted(set(per_param) - set(index.values()), key=str)
  if unknown_ids:
    raise ValueError(f"{what}: the state dict has state for parameter ids {unknown_ids} of no param group.")
  return _Run(groups, saved, index, per_param, names)


def _check_group_keys(what: str, name: str, g: int, sg: Mapping[str, Any], wanted: set[str]) -> None:
  keys = set(sg) - {"params", "param_names"} - _SCHEDULER_KEYS
  if keys != wanted:
    raise ValueError(
      f"{what}: this is not a state dict of torch.optim.{name}: its param group {g} has"
      f" {sorted(keys)}, {name}'s has {sorted(wanted)}"
      + (f" (missing {sorted(wanted - keys)})" if wanted - keys else "")
      + (f" (extra {sorted(keys - wanted)})" if keys - wanted else "")
      + "."
    )


def _group_index(
  what: str, g: int, label: str, paths: list[str], sg: Mapping[str, Any], names: dict[str, TorchName]
) -> dict[str, Any]:
  """{jadam path: PyTorch parameter id} of one group, by position (or by `param_names` where saved)."""
  ids = list(sg["params"])
  if "param_names" in sg:
    by_name = {names[p].name: p for p in paths}
    saved_names = set(sg["param_names"])
    unknown = [n for n in sg["param_names"] if n not in by_name]
    absent = [names[p].name for p in paths if names[p].name not in saved_names]
    if unknown or absent:
      raise ValueError(
        f"{what}: param group {g} of the state dict and tx's {label} hold different parameters:"
        + (f" extra in the state dict: {unknown};" if unknown else "")
        + (f" missing from the state dict: {absent};" if absent else "")
        + " (names gives tx's PyTorch names)."
      )
    paths = [by_name[n] for n in sg["param_names"]]
  if len(ids) != len(paths):
    raise ValueError(
      f"{what}: param group {g} of the state dict holds {len(ids)} parameters, tx's {label} holds"
      f" {len(paths)} ({paths[:6]}{'...' if len(paths) > 6 else ''}): a parameter is missing or extra."
    )
  return dict(zip(paths, ids, strict=True))


def _steps_taken(
  what: str, spec: _groups.Groups, run: _Run, ndims: dict[str, int]
) -> tuple[dict[str, int], list[tuple[str, list[str], list[str]]]]:
  """Step 2: each parameter's step count (0: no state; -1: stepped, not counted, as SGD), and the parameters
  whose state keys are not `tx`'s (reported after the hyperparameters, which name the likelier mistake)."""
  layout = _LAYOUT[spec.name]
  taken: dict[str, int] = {}
  odd = []
  for _, hp, paths in run.groups:
    expect = {key for key, _, _, kept in layout if kept(hp)}
    for p in paths:
      entry = run.per_param.get(run.ids[p], {})
      if not entry:
        taken[p] = 0
        continue
      if set(entry) != {key for key in expect if _has(key, ndims[p])}:
        odd.append((p, sorted(entry), sorted(expect)))
      taken[p] = _step_count(what, run.names[p].name, entry["step"]) if "step" in entry else -1
  return taken, odd


def _common_step(
  what: str,
  spec: _groups.Groups,
  taken: dict[str, int],
  names: dict[str, TorchName],
  scheduler: Mapping[str, Any] | None,
  steps: int | None,
) -> int:
  """Step 3: the one step count of the run, from the parameters' counts, the scheduler or `steps`."""
  counts = {v for v in taken.values() if v >= 0}
  stepped = any(v != 0 for v in taken.values())
  if spec.name in _PER_TABLE and len(counts) > 1:  # tables that missed steps: the step count is the calls'
    return _per_table_step(what, spec, max(counts), scheduler, steps)
  if stepped and 0 in counts:
    zero = [names[p].name for p, v in taken.items() if v == 0][:4]
    raise ValueError(
      f"{what}: parameters {zero} have no state while others have been stepped: in PyTorch they got no"
      " gradient, and jadam steps every parameter; this run cannot be continued exactly."
    )
  if stepped:
    counts.discard(0)
  if len(counts) > 1:
    raise ValueError(f"{what}: parameters took different numbers of steps ({sorted(counts)}); jadam needs one.")
  return _resolve_step(what, spec, counts.pop() if counts else None, stepped, scheduler, steps)


def _check_hyperparameters(what: str, run: _Run, step: int, scheduler: Mapping[str, Any] | None) -> dict[str, float]:
  """Step 4: each group's hyperparameters are `tx`'s at `step`; returns {label: the plateau's lr} for the groups
  whose lr is a ReduceLROnPlateau (its rate is state, read from the state dict)."""
  plateau = {}
  for g, ((label, hp, _), sg) in enumerate(zip(run.groups, run.saved, strict=True)):
    for key, mine in hp.items():
      if key == "lr" and isinstance(mine, (LRScheduler, ReduceLROnPlateau)) and scheduler is not None:
        _check_epoch(what, mine, scheduler, step)
      if key == "lr" and isinstance(mine, ReduceLROnPlateau):
        plateau[label] = float(sg[key])
        continue
      value = _value_at(key, mine, hp, step)
      if not _close(value, _at(sg[key], 0)):
        raise ValueError(
          f"{what}: param group {g} has {key}={sg[key]!r} but tx's {label} has {key}={value!r}"
          f"{' at step ' + str(step) if callable(mine) else ''}: build tx with the run's hyperparameters."
        )
  return plateau


def _value_at(key: str, mine: Any, hp: Mapping[str, Any], step: int) -> Any:
  """Hyperparameter `key` of a group at `step`, as PyTorch's param group holds it (OneCycleLR writes the
  momentum, or beta1, of each step into the group)."""
  value = _at(mine, step)
  cycled = hp["lr"] if isinstance(hp["lr"], OneCycleLR) and hp["lr"].cycle_momentum else None
  if cycled is not None and key in ("betas", "momentum"):
    m = float(cycled.momentum(step))
    return (m, value[1]) if key == "betas" else m
  return value


def _check_plateau_scheduler(
  what: str, plateau: dict[str, float], scheduler: Mapping[str, Any] | None, step: int
) -> None:
  if plateau and scheduler is None and step:
    raise ValueError(f"{what}: tx's lr is a ReduceLROnPlateau: pass the PyTorch scheduler's state_dict() too.")
  if plateau and scheduler is not None and "best" not in scheduler:
    raise ValueError(f"{what}: tx's lr is a ReduceLROnPlateau but the scheduler state dict is not one.")


def _collect(
  what: str,
  spec: _groups.Groups,
  run: _Run,
  stages: dict[str, dict[type, Any]],
  ndims: dict[str, int],
  taken: dict[str, int],
  step: int,
) -> dict[tuple, Any]:
  """Step 5: every PyTorch tensor as the jadam array that replaces a leaf of the template, keyed
  (label, stage state type, field) for a group's scalar and (label, type, field, path) for a leaf."""
  values: dict[tuple, Any] = {}
  for label, hp, paths in run.groups:
    here = stages.get(label, {})
    for key, typ, field, kept in _LAYOUT[spec.name]:
      if (field == "count" and spec.name not in _PER_TABLE) or not kept(hp):
        continue
      if typ not in here:
        raise ValueError(f"{what}: tx's state has no {typ.__name__} in its {label} for PyTorch's {key!r}.")
      if key in _DERIVED:
        _check_derived(what, spec.name, run, key, hp, paths, step)
        continue
      if field == "count":  # SparseAdam's own count per table
        counts = _leaves(here[typ].count)
        values.update({(label, typ, field, p): jnp.asarray(taken[p], counts[p].dtype) for p in paths})
      elif key in _SCALARS:
        values.update(_collect_scalar(what, run, key, (label, typ, field), getattr(here[typ], field), paths))
      else:
        leaves = _leaves(getattr(here[typ], field))
        for p in paths:
          entry = run.per_param.get(run.ids[p])
          if entry and _has(key, ndims[p]):
            values[(label, typ, field, p)] = _tensor_for(what, key, entry[key], run.names[p], p, leaves[p])
  return values


def _leaves(tree: Any) -> dict[str, Any]:
  return {_groups.path_string(q): leaf for q, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_derived(
  what: str, name: str, run: _Run, key: str, hp: Mapping[str, Any], paths: list[str], step: int
) -> None:
  """ASGD's eta and mu, which jadam computes from the step: PyTorch's must be what its formula gives."""
  if key == "eta" and isinstance(hp["lr"], ReduceLROnPlateau):
    return  # the rate it reads is the step before's: `_asgd_last_lrs` recovers it from eta
  want = _DERIVED[key](hp, step)
  for p in paths:
    entry = run.per_param.get(run.ids[p])
    if entry and not _close(float(_as_numpy(entry[key], key)), want, _DERIVED_RTOL):
      raise ValueError(
        f"{what}: parameter {run.names[p].name!r} has {key}={float(_as_numpy(entry[key], key))!r}, but"
        f" torch.optim.{name} with tx's hyperparameters has {key}={want!r} after {step} steps:"
        " build tx with the run's hyperparameters (and schedule)."
      )


def _collect_scalar(what: str, run: _Run, key: str, where: tuple, template: Any, paths: list[str]) -> dict:
  """A number PyTorch copies into every parameter's state (NAdam's mu_product), held once per group by jadam."""
  vals = {float(_as_numpy(run.per_param[run.ids[p]][key], key)) for p in paths if run.per_param.get(run.ids[p])}
  if len(vals) > 1:
    raise ValueError(f"{what}: parameters of one group disagree on {key} ({sorted(vals)}).")
  return {where: jnp.asarray(vals.pop(), template.dtype)} if vals else {}


def _tensor_for(what: str, key: str, tensor: Any, name: TorchName, path: str, want: Any) -> jax.Array:
  """PyTorch's `key` of one parameter as the jadam leaf `want` holds it (transposed by the name's perm)."""
  a = _as_numpy(tensor, f"{name.name}'s {key}")
  perm = name.perm
  if perm is not None:
    if len(perm) != a.ndim:
      raise ValueError(f"{what}: {name.name!r}: perm {perm} for {key} of shape {a.shape}.")
    a = np.transpose(a, perm)
  if a.shape != want.shape:
    transposed = f" (transposed by {perm}: {a.shape})" if perm else ""
    raise ValueError(
      f"{what}: parameter {name.name!r} ({path}): PyTorch's {key} has shape"
      f" {tuple(_as_numpy(tensor, key).shape)}{transposed},"
      f" the jadam leaf {want.shape}; a transposed kernel needs names with TorchName(name, perm)."
    )
  return jnp.asarray(a, want.dtype)


def _filler(
  step: int, values: dict[tuple, Any], plateau: dict[str, float], last_lrs: dict[str, float], sched: dict
) -> Callable[[Any, str], Any]:
  """Step 6: the function that `_walk` calls on each stage state of the template to put the collected values in."""

  def fill(node: Any, label: str) -> Any:
    replace = {}
    for f in getattr(node, "_fields", ()):
      v = getattr(node, f)
      if f == "count" and _is_count(v):
        replace[f] = jnp.asarray(step, v.dtype)
      elif (label, type(node), f) in values:
        replace[f] = values[(label, type(node), f)]
      elif type(node) in _KNOWN and v is not None and not _is_count(v) and not isinstance(node, ReduceLROnPlateauState):

        def put(q, leaf, f=f):
          return values.get((label, type(node), f, _groups.path_string(q)), leaf)

        replace[f] = jax.tree_util.tree_map_with_path(put, v)
    if isinstance(node, ReduceLROnPlateauState) and label in plateau:
      replace.update(_plateau_fields(node, plateau[label], sched))
    if isinstance(node, AsgdOnPlateauState) and label in last_lrs:
      replace["last_lr"] = jnp.asarray(last_lrs[label], node.last_lr.dtype)
    return node._replace(**replace) if replace else node

  return fill


def _plateau_fields(node: ReduceLROnPlateauState, lr: float, sched: Mapping[str, Any]) -> dict[str, jax.Array]:
  out = {"lr": jnp.asarray(lr, node.lr.dtype)}
  if "best" in sched:
    out["best"] = jnp.asarray(float(sched["best"]), node.best.dtype)
    out["num_bad_epochs"] = jnp.asarray(int(sched["num_bad_epochs"]), node.num_bad_epochs.dtype)
    out["cooldown_counter"] = jnp.asarray(int(sched["cooldown_counter"]), node.cooldown_counter.dtype)
  return out


def _asgd_last_lrs(what: str, spec: _groups.Groups, run: _Run, step: int) -> dict[str, float]:
  r"""ASGD under ReduceLROnPlateau: each group's rate of the last step, which ASGD's next step size reads.

  PyTorch keeps that rate only inside the stored :math:`\eta = \alpha_{t} / (1 + \lambda\alpha_{t} t)^{a}`
  (the scheduler may have lowered the group's lr since): it is the group's current lr if that gives
  :math:`\eta`, else the rate between the current lr and the current lr over the plateau's factor (the
  reduction, or one clamped at `min_lr`) that gives :math:`\eta`, found by bisection to the last bits.
  Before any step it is the group's lr, which PyTorch's first step reads.
  """
  out = {}
  for g, ((label, hp, paths), sg) in enumerate(zip(run.groups, run.saved, strict=True)):
    current = float(sg["lr"])
    entries = [run.per_param[run.ids[p]] for p in paths if run.per_param.get(run.ids[p])]
    if step == 0 or not entries:
      out[label] = current
      continue
    eta = float(_as_numpy(entries[0]["eta"], "eta"))
    last = _solve_asgd_rate(eta, current, current / hp["lr"].factor, hp, step)
    if last is None:
      raise ValueError(
        f"{what}: param group {g} has eta={eta!r} after {step} steps, which no rate between its lr {current!r}"
        f" and lr / factor gives with tx's lambd and alpha: build tx with the run's hyperparameters."
      )
    out[label] = last
  return out


def _solve_asgd_rate(eta: float, low: float, high: float, hp: Mapping[str, Any], step: int) -> float | None:
  """The rate in [low, high] whose ASGD step size after `step` steps is `eta` (`low` itself if it serves)."""
  if _close(_asgd_eta_of(low, hp, step), eta, _DERIVED_RTOL):
    return low
  lo, hi = low, high
  for _ in range(200):  # eta grows with the rate here (d eta / d lr > 0 while lambd lr step (alpha - 1) < 1)
    mid = 0.5 * (lo + hi)
    if mid in (lo, hi):
      break
    lo, hi = (mid, hi) if _asgd_eta_of(mid, hp, step) < eta else (lo, mid)
  best = min((lo, hi), key=lambda lr: abs(_asgd_eta_of(lr, hp, step) - eta))
  return best if _close(_asgd_eta_of(best, hp, step), eta, _DERIVED_RTOL) else None


def _check_epoch(what: str, sched: Any, scheduler: Mapping[str, Any], step: int) -> None:
  epoch = scheduler.get("last_epoch")
  if epoch is not None and int(epoch) != step // sched.steps_per_epoch:
    raise ValueError(
      f"{what}: the scheduler's last_epoch is {epoch}, but {step} optimizer steps at {sched.steps_per_epoch}"
      f" per scheduler step make {step // sched.steps_per_epoch}: tx's scheduler does not follow this run."
    )


def _per_table_step(what, spec, most, scheduler, steps) -> int:
  """SparseAdam's number of `step()` calls when its tables took different numbers of steps.

  PyTorch does not record it; it only positions a learning-rate schedule, so with a constant lr the largest
  table count serves.
  """
  if steps is not None or scheduler is not None or any(_number(hp["lr"]) is None for hp in spec.groups):
    step = _resolve_step(what, spec, None, True, scheduler, steps)
  else:
    step = most
  if step < most:
    raise ValueError(f"{what}: {step} optimizer steps, but a table of the state dict took {most}.")
  return step


def _resolve_step(what, spec, step, stepped, scheduler, steps) -> int:
  """The step count, from the state, the scheduler or `steps`; they must agree."""
  if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
    raise ValueError(f"{what}: steps must be a non-negative integer; got {steps!r}.")
  if step is not None:
    if steps is not None and steps != step:
      raise ValueError(f"{what}: steps={steps}, but the state dict's parameters took {step}.")
    return step
  if steps is not None:
    return steps
  lr = spec.groups[0]["lr"]
  per = getattr(lr, "steps_per_epoch", 1)
  if scheduler is not None and "last_epoch" in scheduler and per == 1:
    return int(scheduler["last_epoch"])
  if any(callable(hp["lr"]) or isinstance(hp["lr"], ReduceLROnPlateau) for hp in spec.groups):
    raise ValueError(
      f"{what}: torch.optim.{spec.name}'s state does not count steps and tx's lr depends on them: pass steps=."
    )
  return 1 if stepped else 0


# ----------------------------------------------------------------------------------------------------- jadam -> torch


def _step_of(state: Any) -> int:
  """The step count: every stage's `count` (they agree in a jadam.torch optimizer)."""
  counts = set()

  def visit(node, label):
    c = getattr(node, "count", None)
    if c is not None and _is_count(c):
      counts.add(int(c))
    return node

  _walk(state, visit)
  if len(counts) > 1:
    raise ValueError(f"jadam.torch.state_dict: the state's stages disagree on the step count ({sorted(counts)}).")
  return counts.pop() if counts else 0


def state_dict(
  tx: optax.GradientTransformation,
  state: Any,
  params: Any,
  *,
  names: Mapping[str, str | TorchName] | None = None,
) -> dict[str, Any]:
  """`state` as a `torch.optim` state dict, for `torch.optim.X.load_state_dict` to continue the run.

  The reverse of :func:`load_state_dict`, with the same `names` (kernels are
  transposed back to PyTorch's layout). The param groups carry `tx`'s
  hyperparameters at the current step (a scheduler's current lr, with
  ``initial_lr``); PyTorch's kernel flags (foreach, fused, capturable,
  differentiable) take PyTorch's defaults. For a scheduler's state see
  :func:`scheduler_state_dict`. For Adam8bit/AdamW8bit it is bitsandbytes'
  state dict, for `bnb.optim.Adam8bit(...).load_state_dict`.

  Args:
    tx: the `jadam.torch` optimizer.
    state: its state.
    params: the parameter pytree (for the leaf paths).
    names: as in :func:`load_state_dict`.

  Returns:
    ``{"state": {id: {key: tensor}}, "param_groups": [...]}`` with CPU tensors.
  """
  what = "jadam.torch.state_dict"
  spec = _spec(tx, what)
  if spec.name in _EIGHT_BIT:
    return _state_dict_8bit(what, spec, state, params, names)
  if spec.name == "LBFGS":
    return _state_dict_lbfgs(what, spec, state, params, names)
  names = _normalise_names(params, names, what)
  stages = _stages(state)
  step = _step_of(state)
  ndims = _ndims(params)
  out_state: dict[int, dict[str, Any]] = {}
  out_groups = []
  pid = 0
  for label, hp, paths in _torch_groups(spec, params, names):
    here = stages.get(label, {})
    ids = list(range(pid, pid + len(paths)))
    pid += len(paths)
    out_groups.append({**_param_group(spec.name, hp, here, step), "params": ids})
    if step == 0:
      continue
    fields = _fields_out(what, spec.name, label, hp, here, step)
    for p, i in zip(paths, ids, strict=True):
      if spec.name in _PER_TABLE and fields["step"].get(p, 0) == 0:
        continue  # a table that never had a gradient has no state in PyTorch
      entry = _entry_out(what, spec.name, p, fields, names[p], ndims[p])
      if entry:
        out_state[i] = entry
  return {"state": out_state, "param_groups": out_groups}


def _param_group(name: str, hp: Mapping[str, Any], here: dict[type, Any], step: int) -> dict[str, Any]:
  """A group's hyperparameters at `step` as PyTorch's param group holds them (its schedulers' keys included)."""
  group: dict[str, Any] = {}
  for key, mine in hp.items():
    if key == "lr":
      group.update(_lr_entries(mine, here, step))
    else:
      group[key] = _at(mine, step)
  lr = hp["lr"]
  if isinstance(lr, OneCycleLR) and lr.cycle_momentum:  # PyTorch's OneCycleLR writes the momentum or beta1
    m = float(lr.momentum(step))
    if "betas" in group:
      group["betas"] = (m, group["betas"][1])
    elif "momentum" in group:
      group["momentum"] = m
  for flag in _FLAGS_OF[name]:
    group[flag] = _KERNEL_FLAGS[flag]
  return group


def _lr_entries(lr: Any, here: dict[type, Any], step: int) -> dict[str, Any]:
  """A group's `lr` at `step` and the keys PyTorch's scheduler adds to the group."""
  if isinstance(lr, ReduceLROnPlateau):
    return {"lr": float(here[ReduceLROnPlateauState].lr), "initial_lr": float(lr.lr)}
  if isinstance(lr, OneCycleLR):
    initial = lr.max_lr / lr.div_factor
    out = {"lr": _at(lr, step), "initial_lr": initial, "max_lr": float(lr.max_lr)}
    out["min_lr"] = initial / lr.final_div_factor
    if lr.cycle_momentum:
      out["base_momentum"], out["max_momentum"] = lr.base_momentum, lr.max_momentum
    return out
  if isinstance(lr, LRScheduler):
    return {"lr": _at(lr, step), "initial_lr": float(lr.lr)}
  return {"lr": _at(lr, step)}


def _fields_out(
  what: str, name: str, label: str, hp: Mapping[str, Any], here: dict[type, Any], step: int
) -> dict[str, Any]:
  """{PyTorch key: a tensor for every parameter, a number for the group, or {leaf path: array}} of one group."""
  torch = _require_torch()

  fields: dict[str, Any] = {}
  for key, typ, field, kept in _LAYOUT[name]:
    if not kept(hp):
      continue
    if field == "count" and name in _PER_TABLE:  # PyTorch's SparseAdam counts in a Python int, per table
      fields[key] = {p: int(c) for p, c in _leaves(here[typ].count).items()}
    elif field == "count":
      fields[key] = torch.tensor(float(step), dtype=_scalar_dtype())
    elif typ not in here:
      raise ValueError(f"{what}: the state has no {typ.__name__} in its {label} for PyTorch's {key!r}.")
    elif key == "eta" and isinstance(hp["lr"], ReduceLROnPlateau):  # the rate of the last step, kept by jadam
      fields[key] = _asgd_eta_of(float(here[AsgdOnPlateauState].last_lr), hp, step)
    elif key in _DERIVED:
      fields[key] = _DERIVED[key](hp, step)
    elif key in _SCALARS:
      fields[key] = float(np.asarray(getattr(here[typ], field), np.float64))
    else:
      fields[key] = _leaves(getattr(here[typ], field))
  return fields


def _entry_out(what: str, name: str, p: str, fields: dict[str, Any], torch_name: TorchName, ndim: int) -> dict:
  """One parameter's PyTorch state from its group's fields."""
  torch = _require_torch()

  entry = {}
  for key, v in fields.items():
    if not _has(key, ndim):
      continue
    if name in _PER_TABLE and key == "step":
      entry[key] = v[p]
    elif isinstance(v, torch.Tensor):
      entry[key] = v.clone()
    elif isinstance(v, float):
      entry[key] = torch.tensor(v, dtype=_scalar_dtype())
    elif p not in v:
      raise ValueError(f"{what}: the state's {key} has no leaf {p!r}: state and params do not match.")
    else:
      a = np.asarray(v[p])
      if torch_name.perm is not None:
        a = np.transpose(a, np.argsort(torch_name.perm))
      entry[key] = _to_torch(a)
  return entry


def _to_torch(a: np.ndarray):
  torch = _require_torch()

  if a.dtype == jnp.bfloat16:
    return torch.from_numpy(np.array(a, np.float32, order="C")).to(torch.bfloat16)
  # np.array, not np.ascontiguousarray, which makes a 0-d array (a scalar parameter's state) 1-d.
  return torch.from_numpy(np.array(a, order="C"))


def scheduler_state_dict(
  tx: optax.GradientTransformation, state: Any, params: Any, template: Mapping[str, Any]
) -> dict[str, Any]:
  """A PyTorch scheduler's `state_dict()` at the position of `state`, for `scheduler.load_state_dict`.

  Args:
    tx: the `jadam.torch` optimizer whose lr is the scheduler.
    state: its state.
    params: the parameter pytree.
    template: the `state_dict()` of a freshly made PyTorch scheduler of the
      same kind and arguments (its fixed fields are kept; the position is set).

  Returns:
    `template` with last_epoch, _step_count and _last_lr set (and best,
    num_bad_epochs, cooldown_counter for ReduceLROnPlateau).
  """
  what = "jadam.torch.scheduler_state_dict"
  spec = _spec(tx, what)
  stages = _stages(state)
  step = _step_of(state)
  out = dict(template)
  lrs = []
  for label, hp, _ in _torch_groups(spec, params, _normalise_names(params, None, what)):
    lr = hp["lr"]
    if isinstance(lr, ReduceLROnPlateau):
      node = stages[label][ReduceLROnPlateauState]
      lrs.append(float(node.lr))
      out["best"] = float(node.best)
      out["num_bad_epochs"] = int(node.num_bad_epochs)
      out["cooldown_counter"] = int(node.cooldown_counter)
    elif isinstance(lr, LRScheduler):
      lrs.append(_at(lr, step))
    else:
      raise ValueError(f"{what}: tx's {label} lr is not a jadam.torch scheduler ({lr!r}).")
  per = getattr(spec.groups[0]["lr"], "steps_per_epoch", 1)
  if "best" in template and "best" not in out:
    raise ValueError(f"{what}: template is a ReduceLROnPlateau's but tx's lr is not one.")
  out["last_epoch"] = step // per
  if "_step_count" in template:
    out["_step_count"] = step // per + 1
  if len(lrs) != len(template.get("_last_lr", lrs)):
    raise ValueError(f"{what}: the template's scheduler has {len(template['_last_lr'])} groups, tx {len(lrs)}.")
  out["_last_lr"] = lrs
  return out


# ----------------------------------------------------------------------------------------------------- bitsandbytes

_EIGHT_BIT = frozenset({"Adam8bit", "AdamW8bit"})
_BNB = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict() nests each parameter's 8-bit state
_BNB_GROUP = ("lr", "betas", "eps", "weight_decay")
_BNB_FIXED = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}  # its AdEMAMix keys, in every group


def _bnb_qmap(signed: bool):
  """bitsandbytes' `create_dynamic_map(signed)` to the bit, as its state dicts hold it (jadam's
  `dynamic_map` differs by an ulp at a few points: torch.linspace rounds otherwise than NumPy's)."""
  torch = _require_torch()

  data = []
  for i in range(7):
    bounds = torch.linspace(0.1, 1, 2**i + 1 if signed else 2 ** (i + 1) + 1, dtype=torch.float32)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    data += ((10 ** (-6 + i)) * means).tolist()
    if signed:
      data += (-(10 ** (-6 + i)) * means).tolist()
  data += [0, 1.0]
  data += [0] * (256 - len(data))
  return torch.tensor(sorted(data), dtype=torch.float32)


def _index(what, groups, saved, names) -> dict[str, Any]:
  """{jadam path: PyTorch parameter id}, by position in each group (or by `param_names` if saved)."""
  index: dict[str, Any] = {}
  for g, ((label, _, paths), sg) in enumerate(zip(groups, saved, strict=True)):
    index.update(_group_index(what, g, label, paths, sg, names))
  return index


def _moment_leaves(moment: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  codes = {_groups.path_string(q): c for q, c in jax.tree_util.tree_leaves_with_path(moment.codes)}
  absmax = {_groups.path_string(q): a for q, a in jax.tree_util.tree_leaves_with_path(moment.absmax)}
  return codes, absmax


def _step_count(what: str, name: str, value: Any) -> int:
  """A parameter's saved `step` as an int, refused unless it is a non-negative whole number."""
  s = float(_as_numpy(value, f"{name}'s step"))
  if not np.isfinite(s) or s != int(s) or s < 0:
    raise ValueError(f"{what}: parameter {name!r} has step {s}, not a count.")
  return int(s)


def _load_8bit(what, tx, spec, params, state_dict, names, scheduler, steps):
  """bitsandbytes' Adam8bit/AdamW8bit `state_dict()` as the state of jadam.torch's: codes and scales copied."""
  names = _normalise_names(params, names, what)
  groups = _torch_groups(spec, params, names)
  saved = list(state_dict["param_groups"])
  _check_bnb_groups(what, spec.name, saved, len(groups))
  index = _index(what, groups, saved, names)
  per_param = state_dict["state"]
  step = _bnb_step(what, spec, index, per_param, names, scheduler, steps)
  _check_bnb_hyperparameters(what, groups, saved, step, scheduler)
  template = tx.init(params)
  new = _collect_8bit(what, groups, _stages(template), per_param, index, names)
  return _walk(template, _filler_8bit(step, new))


def _check_bnb_groups(what: str, name: str, saved: list, n_groups: int) -> None:
  if len(saved) != n_groups:
    raise ValueError(f"{what}: the state dict has {len(saved)} param groups, tx has {n_groups}.")
  wanted = set(_BNB_GROUP) | set(_BNB_FIXED)
  for g, sg in enumerate(saved):
    keys = set(sg) - {"params", "param_names"} - _SCHEDULER_KEYS
    if keys != wanted or any(sg[k] != v for k, v in _BNB_FIXED.items()):
      raise ValueError(
        f"{what}: this is not a state dict of bitsandbytes' {name}: its param group {g} has {sorted(keys)}"
        f" ({ {k: sg.get(k) for k in _BNB_FIXED} }), bitsandbytes' has {sorted(wanted)} with {_BNB_FIXED}."
      )


def _bnb_step(what, spec, index, per_param, names, scheduler, steps) -> int:
  """The run's step count: every parameter's `step` (bitsandbytes keeps `step` and the quantised state)."""
  taken = {}
  for p, i in index.items():
    entry = per_param.get(i, {})
    if entry and set(entry) != {"step", _BNB}:
      raise ValueError(
        f"{what}: parameter {names[p].name!r} has state {sorted(entry)}; bitsandbytes' {spec.name} keeps"
        f" ['step', {_BNB!r}]: is this another optimizer's state dict?"
      )
    taken[p] = _step_count(what, names[p].name, entry["step"]) if entry else 0
  counts = set(taken.values())
  if len(counts) > 1:
    raise ValueError(
      f"{what}: parameters took different numbers of steps ({sorted(counts)}); jadam steps every parameter."
    )
  count = counts.pop() if counts else 0
  return _resolve_step(what, spec, count if count else None, False, scheduler, steps)


def _check_bnb_hyperparameters(what, groups, saved, step, scheduler) -> None:
  for g, ((label, hp, _), sg) in enumerate(zip(groups, saved, strict=True)):
    if isinstance(hp["lr"], ReduceLROnPlateau):
      raise NotImplementedError(f"{what}: ReduceLROnPlateau with an 8-bit state is not carried.")
    if isinstance(hp["lr"], LRScheduler) and scheduler is not None:
      _check_epoch(what, hp["lr"], scheduler, step)
    for key in _BNB_GROUP:
      value = _at(hp[key], step)
      if not _close(value, _at(sg[key], 0)):
        raise ValueError(
          f"{what}: param group {g} has {key}={sg[key]!r} but tx's {label} has {key}={value!r}: build tx with"
          " the run's hyperparameters."
        )


def _collect_8bit(what, groups, stages, per_param, index, names) -> dict[str, dict[str, tuple[dict, dict]]]:
  """{label: {"mu"/"nu": ({path: codes}, {path: absmax})}} from each parameter's quantised state."""
  from jadam._storage import quantize as _quantize

  qmaps = {"1": _quantize.dynamic_map(True), "2": _quantize.dynamic_map(False)}  # jadam's codes' values
  new: dict[str, dict[str, tuple[dict, dict]]] = {}
  for label, _, paths in groups:
    moments = stages[label][ScaleByMomentsState]
    for n, field in (("1", "mu"), ("2", "nu")):
      codes, absmax = _moment_leaves(getattr(moments, field))
      for p in paths:
        entry = per_param.get(index[p])
        if not entry:
          continue
        c, a = _bnb_moment(what, names[p], entry[_BNB], n, codes[p], absmax[p], qmaps[n])
        got = new.setdefault(label, {}).setdefault(field, ({}, {}))
        got[0][p] = c
        if a is not None:
          got[1][p] = a
  return new


def _bnb_moment(what, name, quant, n, c, a, qmap) -> tuple[jax.Array, jax.Array | None]:
  """One moment of one parameter: bitsandbytes' codes and block scales where tx keeps 8 bits (copied as they
  are, after checking the map and the blocks), its 32-bit state (transposed by the name's perm) otherwise."""
  s = _as_numpy(quant[f"state{n}"], f"{name.name}'s state{n}")
  if c.dtype != jnp.uint8:
    if s.dtype == np.uint8:
      raise ValueError(
        f"{what}: {name.name!r}: bitsandbytes kept an 8-bit state{n}, tx a 32-bit one: build tx with"
        " the run's min_8bit_size."
      )
    if name.perm is not None:
      s = np.transpose(s, name.perm)
    if s.shape != c.shape:
      raise ValueError(f"{what}: {name.name!r}: state{n} has shape {s.shape}, tx's leaf {c.shape}.")
    return jnp.asarray(s, c.dtype), None
  if s.dtype != np.uint8 or f"absmax{n}" not in quant:
    raise ValueError(
      f"{what}: {name.name!r}: bitsandbytes kept a 32-bit state{n}, tx an 8-bit one: build tx with"
      " the run's min_8bit_size."
    )
  if name.perm is not None:
    raise ValueError(
      f"{what}: {name.name!r}: an 8-bit moment cannot be transposed (its blocks are runs of"
      " PyTorch's row-major layout); give the leaf PyTorch's layout."
    )
  q = _as_numpy(quant[f"qmap{n}"], f"qmap{n}")
  if q.shape != qmap.shape or not np.allclose(q, qmap, rtol=2e-7, atol=0):
    raise ValueError(f"{what}: {name.name!r}: qmap{n} is not bitsandbytes' dynamic map, the values of jadam's codes.")
  s_abs = _as_numpy(quant[f"absmax{n}"], f"absmax{n}")
  if s.shape != c.shape or s_abs.size != a.size:
    raise ValueError(
      f"{what}: {name.name!r}: state{n} {s.shape} / absmax{n} {s_abs.shape}, tx's {c.shape} /"
      f" {a.shape}: a block size other than tx's?"
    )
  return jnp.asarray(s), jnp.asarray(s_abs.reshape(a.shape), a.dtype)


def _filler_8bit(step: int, new: dict[str, dict[str, tuple[dict, dict]]]) -> Callable[[Any, str], Any]:
  """The function that `_walk` calls on each stage state: the step count, and the 8-bit moments put in."""

  def put(table: dict) -> Callable[[Any, Any], Any]:
    return lambda q, leaf: table.get(_groups.path_string(q), leaf)

  def fill(node: Any, label: str) -> Any:
    replace = {}
    if _is_count(getattr(node, "count", None)):
      replace["count"] = jnp.asarray(step, node.count.dtype)
    if type(node) is ScaleByMomentsState:
      for field, (codes, absmax) in new.get(label, {}).items():
        m = getattr(node, field)
        replace[field] = m._replace(
          codes=jax.tree_util.tree_map_with_path(put(codes), m.codes),
          absmax=jax.tree_util.tree_map_with_path(put(absmax), m.absmax),
        )
    return node._replace(**replace) if replace else node

  return fill


def _state_dict_8bit(what, spec, state, params, names):
  """jadam.torch's Adam8bit/AdamW8bit state as bitsandbytes' `state_dict()`."""
  torch = _require_torch()

  names = _normalise_names(params, names, what)
  groups = _torch_groups(spec, params, names)
  stages = _stages(state)
  step = _step_of(state)
  qmaps = {"1": _bnb_qmap(True), "2": _bnb_qmap(False)}
  out_state, out_groups, pid = {}, [], 0
  for label, hp, paths in groups:
    lr = hp["lr"]
    if isinstance(lr, ReduceLROnPlateau):
      raise NotImplementedError(f"{what}: ReduceLROnPlateau with an 8-bit state is not carried.")
    group = {key: _at(hp[key], step) for key in _BNB_GROUP}
    if isinstance(lr, LRScheduler):
      group["initial_lr"] = float(lr.lr)
    group.update(_BNB_FIXED)
    ids = list(range(pid, pid + len(paths)))
    pid += len(paths)
    group["params"] = ids
    out_groups.append(group)
    if step == 0:
      continue
    moments = stages[label][ScaleByMomentsState]
    leaves = {n: _moment_leaves(getattr(moments, f)) for n, f in (("1", "mu"), ("2", "nu"))}
    for p, i in zip(paths, ids, strict=True):
      quant = {}
      for n, (codes, absmax) in leaves.items():
        c = np.asarray(codes[p])
        if c.dtype == np.uint8:
          if names[p].perm is not None:
            raise ValueError(f"{what}: {names[p].name!r}: an 8-bit moment cannot be transposed to PyTorch's layout.")
          quant[f"state{n}"] = torch.from_numpy(c.copy())
          quant[f"qmap{n}"] = qmaps[n].clone()
          quant[f"absmax{n}"] = torch.from_numpy(np.asarray(absmax[p], np.float32).reshape(-1).copy())
        else:
          if names[p].perm is not None:
            c = np.transpose(c, np.argsort(names[p].perm))
          quant[f"state{n}"] = _to_torch(c)
      out_state[i] = {"step": step, _BNB: quant}
  return {"state": out_state, "param_groups": out_groups}


# ----------------------------------------------------------------------------------------------------- LBFGS
# PyTorch keeps LBFGS's state, global to its one group, under its first parameter: counts, the flat
# vectors of all parameters (in the order of its parameter list: jadam's jax.tree.leaves order), the
# history as lists (oldest first) and `al`, the two-loop recursion's scratch (None where never written).

_LBFGS_GROUP = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn")


def _lbfgs_group(what: str, spec: _groups.Groups, saved: list, n_params: int, names: Any) -> None:
  """Checks that `saved` (the state dict's param groups) are those of `tx`: one group, its hyperparameters."""
  if names is not None:
    raise ValueError(f"{what}: LBFGS flattens its parameters in order; `names` is not supported for it.")
  if len(saved) != 1:
    raise ValueError(f"{what}: LBFGS has one param group; the state dict has {len(saved)}.")
  group, hp = saved[0], spec.groups[0]
  keys = set(group) - {"params", "param_names"} - _SCHEDULER_KEYS
  if keys != set(_LBFGS_GROUP):
    raise ValueError(f"{what}: this is not a state dict of torch.optim.LBFGS: its param group has {sorted(keys)}.")
  for key in _LBFGS_GROUP:
    mine = hp[key]
    if key == "lr" and _number(mine) is None:
      continue  # a schedule: its value depends on the step, which PyTorch's LBFGS state does not count
    if not (mine == group[key] if key == "line_search_fn" else _close(mine, group[key])):
      raise ValueError(f"{what}: the state dict's {key} is {group[key]!r}, tx's is {mine!r}.")
  if len(group["params"]) != n_params:
    raise ValueError(f"{what}: the state dict's group has {len(group['params'])} parameters, params has {n_params}.")


def _load_lbfgs(what, tx, spec, params, state_dict, names):
  """`torch.optim.LBFGS(...).state_dict()` as the :class:`jadam.LbfgsState` that continues it."""
  _lbfgs_group(what, spec, list(state_dict["param_groups"]), len(jax.tree.leaves(params)), names)
  state = tx.init(params)
  if not isinstance(state, LbfgsState):
    raise TypeError(f"{what}: tx's state is not an LbfgsState; pass jadam.torch.LBFGS(...) itself.")
  saved = dict(state_dict["state"].get(state_dict["param_groups"][0]["params"][0], {}))
  n, m, dtype = state.d.shape[0], state.ro.shape[0], state.d.dtype

  def vec(key: str) -> jax.Array:
    return _lbfgs_vector(what, key, saved[key], n, dtype)

  def scalar(x: Any) -> jax.Array:
    return jnp.asarray(float(_as_numpy(x, what)), dtype)

  history = {key: list(saved.get(key, [])) for key in ("old_dirs", "old_stps", "ro")}
  k = len(history["ro"])
  if k > m or any(len(v) != k for v in history.values()):
    raise ValueError(
      f"{what}: the state dict holds {k} curvature pairs, more than tx's history_size {m}, or lists"
      " of different lengths."
    )
  out = state._replace(
    func_evals=jnp.asarray(int(saved.get("func_evals", 0)), jnp.int32),
    n_iter=jnp.asarray(int(saved.get("n_iter", 0)), jnp.int32),
    num_old=jnp.asarray(k, jnp.int32),
  )
  if "d" not in saved:  # no iteration yet (or the first step found a stationary point)
    return out

  def pad(rows: list[jax.Array], width: tuple[int, ...]) -> jax.Array:
    return jnp.stack(rows + [jnp.zeros(width, dtype)] * (m - k)) if m else jnp.zeros((0, *width))

  al = [jnp.nan if a is None else float(_as_numpy(a, what)) for a in saved.get("al", [None] * m)]
  if len(al) != m:
    raise ValueError(f"{what}: the state dict's al has {len(al)} entries; tx's history_size is {m}.")
  return out._replace(
    d=vec("d"),
    t=scalar(saved["t"]),
    old_dirs=pad([_lbfgs_vector(what, "old_dirs", v, n, dtype) for v in history["old_dirs"]], (n,)),
    old_stps=pad([_lbfgs_vector(what, "old_stps", v, n, dtype) for v in history["old_stps"]], (n,)),
    ro=jnp.asarray([float(_as_numpy(r, what)) for r in history["ro"]] + [0.0] * (m - k), dtype),
    H_diag=scalar(saved["H_diag"]),
    prev_flat_grad=vec("prev_flat_grad"),
    prev_loss=scalar(saved["prev_loss"]),
    al=jnp.asarray(al, dtype),
  )


def _lbfgs_vector(what: str, key: str, t: Any, n: int, dtype: Any) -> jax.Array:
  a = _as_numpy(t, f"{what}: {key}")
  if a.shape != (n,):
    raise ValueError(f"{what}: the state dict's {key} has shape {a.shape}; the parameters flatten to ({n},).")
  return jnp.asarray(a, dtype)


def _state_dict_lbfgs(what, spec, state, params, names):
  """A :class:`jadam.LbfgsState` as `torch.optim.LBFGS`'s state dict."""
  torch = _require_torch()

  if not isinstance(state, LbfgsState):
    raise TypeError(f"{what}: state is not an LbfgsState; pass the state of jadam.torch.LBFGS(...).")
  n_params = len(jax.tree.leaves(params))
  hp = spec.groups[0]
  group = {key: hp[key] for key in _LBFGS_GROUP}
  group["lr"] = _at(hp["lr"], int(state.count))
  _lbfgs_group(what, spec, [{**group, "params": list(range(n_params))}], n_params, names)

  def tensor(a: Any) -> Any:
    return _to_torch(np.asarray(a)).reshape(np.shape(a))  # 0-d stays 0-d: torch's alpha= needs a number

  n_iter, k = int(state.n_iter), int(state.num_old)
  saved: dict[str, Any] = {"func_evals": int(state.func_evals), "n_iter": n_iter}
  if n_iter > 0:
    saved.update(
      d=tensor(state.d),
      t=tensor(state.t),
      old_dirs=[tensor(state.old_dirs[i]) for i in range(k)],
      old_stps=[tensor(state.old_stps[i]) for i in range(k)],
      ro=[tensor(state.ro[i]) for i in range(k)],
      H_diag=tensor(state.H_diag),
      prev_flat_grad=tensor(state.prev_flat_grad),
      prev_loss=float(state.prev_loss),
    )
  if n_iter > 1:  # PyTorch makes `al` at its second iteration
    saved["al"] = [
      None if np.isnan(a) else torch.tensor(float(a), dtype=saved["d"].dtype) for a in np.asarray(state.al)
    ]
  return {
    "state": {0: saved} if n_iter or int(state.func_evals) else {},
    "param_groups": [{**group, "params": list(range(n_params))}],
  }
