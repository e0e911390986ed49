"""The planner: reads a transformation's registry records and serves its step with a kernel, or refuses.

A step is served when the transformation is, after optax's combinators
(`jadam._kernels.optax_compat`, the only module that looks inside optax), a
chain whose last stages are a kernel's:

- dense (`jadam._kernels.fused`): ``[clip_by_global_norm] [flip_sign] [add_l2]
  scale_by_moments [max_nu] bias_correct normalize [add_l2 (masked or not)]
  scale_by_lr [decoupled_decay]``, any stages in front run as they are;
- row-sparse (`jadam._kernels.sparse_step`): ``[flip_sign]
  scale_by_sparse_moments rowwise(bias_correct(into_step=True))
  rowwise(normalize) scale_by_lr``.

Each of these stages is read from its :class:`jadam._core.registry.Record`,
which holds every argument its factory was called with. The planner lists, per
stage, the arguments the kernel implements; **any other argument with a
non-default value, any unknown stage, any state of another type, makes it
refuse** (`Unserved`, naming the stage and the argument), and the caller then
runs the transformation's own update. A kernel can be slower or absent; it can
never compute another formula than the stages.

A served step is bound as one primitive (`jadam._kernels.dispatch`) that holds
both the kernel's step and the stages' (:func:`stages_step`): the kernel where
the program is lowered for this CPU, the stages for `jax.export`, for other
platforms, under `vmap` and for derivatives. The planner also decides where a
kernel that would serve is slower than XLA on this CPU (:func:`check_speed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._kernels import build as _build
from jadam._kernels import dispatch as _dispatch
from jadam._kernels import fused as _fused
from jadam._kernels import optax_compat as _compat
from jadam._kernels import sharded as _sharded
from jadam._kernels import sparse_step as _sparse_step
from jadam._kernels.base import Ctx, Unserved
from jadam._stages import sparse as _sparse
from jadam._storage import bf16 as _bf16
from jadam._storage import quantize as _quantize

Items = list[tuple[Any, Any]]  # (update function, state) of a flattened chain

# The arguments each kernel implements, per stage; every other argument must keep its default.
DENSE_ARGS = {
  "scale_by_moments": {"b1", "b2", "mu_dtype", "nu_dtype"},
  "max_nu": {"nu_dtype"},
  "bias_correct": set(),  # into_step=False only
  "normalize": {"eps", "eps_root"},
  "scale_by_lr": {"learning_rate"},
  "add_l2": {"weight_decay", "mask"},
  "decoupled_decay": {"weight_decay", "learning_rate"},  # convention="torch" only
  "flip_sign": set(),
}
SPARSE_ARGS = {
  "scale_by_sparse_moments": {"b1", "b2"},
  "rowwise": {"inner"},
  "bias_correct": {"into_step"},  # into_step=True only, checked below
  "normalize": {"eps", "eps_root"},
  "scale_by_lr": {"learning_rate"},
  "flip_sign": set(),
}


def record(fn: Any) -> _registry.Record | None:
  return _registry.lookup(_compat.unwrap(fn))


def name_of(fn: Any) -> str | None:
  r = record(fn)
  return None if r is None else r.name


def known(r: _registry.Record, table: dict[str, set[str]]) -> dict[str, Any]:
  """The record's arguments, or `Unserved` naming the first one the kernel does not implement."""
  allowed = table.get(r.name)
  if allowed is None:
    raise Unserved(f"jadam.{r.name} is not one of the kernel's stages")
  for arg in r.non_default():
    if arg not in allowed:
      raise Unserved(f"jadam.{r.name}({arg}={r.hparams[arg]!r}): the kernel does not implement {arg!r}")
  return dict(r.hparams)


def sched(value: Any, name: str) -> Any:
  """A hyperparameter as the stage makes it a function of the step count."""
  return _hparams.as_schedule(value, name)


# --- walking the transformation ---------------------------------------------------
def step(
  tx: optax.GradientTransformation,
  grads: Any,
  state: Any,
  params: Any,
  *,
  multi_device_ok: bool,
  require: bool,
  layout: _sharded.Layout | None = None,
) -> tuple[Any, Any]:
  """The fused step ``(new_params, new_state)``; raises :class:`Unserved` where the stages must run.

  On several devices the kernel runs on each device's shard (`jadam._kernels.sharded`), where the
  inputs' layout is known: from concrete arrays, explicit sharding, or the step helper's `layout`.
  `multi_device_ok` is set by callers that vouch that inputs with no mesh live on one device.
  `require` (``fused=True``) also serves what this CPU's ISA path runs faster in XLA.
  """
  if jax.default_backend() != "cpu":
    raise Unserved(f"the default backend is {jax.default_backend()}; the kernel runs on the CPU")
  mesh, specs = _sharded.where(grads, state, params, layout=layout, one_device_ok=multi_device_ok)
  if not _build.load():
    raise Unserved(f"the kernel is unavailable: {_build.error()}")
  ctx = Ctx(apply=None, require=require)

  def local(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    return run(tx.update, state, grads, params, ctx)

  def kernel(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    if mesh is None:
      return local(grads, state, params)
    return _sharded.run(mesh, specs, local, grads, state, params)  # the kernel on each shard

  def stages(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    return stages_step(tx, grads, state, params)

  # one primitive: the kernel where the program runs on this CPU, the stages for export, elsewhere, under vmap
  return _dispatch.planned_step(kernel, stages, grads, state, params)


def stages_step(tx: optax.GradientTransformation, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
  """``(new_params, new_state)`` through the stages as written: ``tx.update``, then the parameters updated.

  What the kernel's step equals, and what runs where it does not (row-sparse
  gradients are added by :func:`jadam._stages.sparse.apply_updates`'s scatter).
  """
  if _sparse.has_sparse(grads):
    return _sparse.update_and_apply(tx, grads, state, params)
  updates, new_state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), new_state


def run(fn: Any, state: Any, grads: Any, params: Any, ctx: Ctx) -> tuple[Any, Any]:
  """``(new_params, new_state)`` of ``fn`` then ``optax.apply_updates``, through a kernel, or raises Unserved."""
  fn = _compat.unwrap(fn)
  r = _registry.lookup(fn)
  if r is not None and r.name == "torch_groups":  # jadam.torch's door: its check, then its transformation
    if params is not None and r.hparams["labels"] is not None:
      who = f"jadam.torch.{r.hparams['optimizer']}"
      _common.check_tree(who, grads, "the params", params, _common.PARAMS_HINT)
    return run(r.hparams["inner"].update, state, grads, params, ctx)
  done = _compat.wrapper_step(fn, state, grads, params, ctx, run, _fused.all_finite)
  if done is not None:
    return done
  items, rebuild = flatten(fn, state, grads, params)
  if len(items) == 1 and items[0][0] is not fn:  # a chain of one: its part, then the chain's state around it
    new_params, new_state = run(items[0][0], items[0][1], grads, params, ctx)
    return new_params, rebuild([new_state])
  if params is None:
    raise Unserved("the kernel needs the parameters (update(grads, state, params))")
  if "scale_by_sparse_moments" in [name_of(f) for f, _ in items]:  # jadam.sparse_adam's: the row-sparse kernel
    return _sparse_step.run_chain(items, rebuild, parse_sparse(items), grads, params, ctx)
  core = parse_dense(items)
  if not ctx.require:
    check_speed(core)
  return _fused.run_chain(items, rebuild, core, grads, params, ctx)


def moments_kind(hp: dict[str, Any]) -> str:
  """How the dense kernel stores the moments: "8bit" (`jadam.Quantized`), "bfloat16" (stochastic rounding), "float"."""
  dtypes = (hp["mu_dtype"], hp["nu_dtype"])
  if any(isinstance(d, _quantize.Quantized) for d in dtypes):
    return "8bit"
  if not all(d is None or isinstance(d, (str, type, np.dtype)) for d in dtypes):
    return "other"  # a storage the dense kernel refuses (fused._quantized_block_size says which)
  return "bfloat16" if all(_bf16.stochastic_store(d) for d in dtypes) else "float"


def check_speed(core: _fused.Core) -> None:
  """`Unserved` where this CPU's kernel variant is slower than XLA for the configuration (`build.kernel_prefers`)."""
  if not _build.kernel_prefers(amsgrad=bool(core.mode & _fused.AMSGRAD), moments=moments_kind(core.hp)):
    raise Unserved(f"on this CPU's {_build.isa()} path the kernel is slower than XLA for this configuration")


def flatten(fn: Any, state: Any, grads: Any, params: Any) -> tuple[Items, Callable[[list[Any]], Any]]:
  """Nested chains as one list of (update function, state), and how to rebuild the state from new ones.

  A jadam optimizer (`registry.optimizer_chain`) is opened after its own
  checks (its state's identity; no `None` gradient where the params hold arrays).
  """
  fn = _compat.unwrap(fn)
  r = _registry.lookup(fn)
  if r is not None and r.state is _registry.OptimizerState:
    r.hparams["check"](grads, state, params)
    items, rebuild = flatten(r.hparams["chain"].update, tuple(state), grads, params)
    return items, lambda new: _registry.optimizer_state(r.name, rebuild(new))
  parts = _compat.chain_parts(fn)
  if parts is None:
    return [(fn, state)], lambda new: new[0]
  states = _compat.chain_states(fn, state)
  if len(states) != len(parts):
    raise Unserved("a chain's state does not match its stages (call init first)")
  subs = [flatten(f, s, grads, params) for f, s in zip(parts, states, strict=True)]
  back = _compat.named_chain_rebuild(fn, state) or tuple

  def rebuild_chain(new: list[Any]) -> Any:
    out, k = [], 0
    for items, sub in subs:
      out.append(sub(new[k : k + len(items)]))
      k += len(items)
    return back(out)

  return [x for items, _ in subs for x in items], rebuild_chain


# --- the dense kernel's stages --------------------------------------------------------
def _stage_at(items: Items, i: int, name: str) -> _registry.Record | None:
  """The record at item `i` if it is stage `name`, else None."""
  if i < 0:
    return None
  r = record(items[i][0])
  return r if r is not None and r.name == name else None


def _add_l2_at(items: Items, i: int) -> tuple[dict, Any] | None:
  """add_l2's arguments and mask at item `i` (its own mask, or in `optax.masked`), or None."""
  if i < 0:
    return None
  r = _stage_at(items, i, "add_l2")
  if r is not None:
    hp = known(r, DENSE_ARGS)
    return hp, hp["mask"]
  opened = _compat.masked(*items[i])
  if opened is None:
    return None
  inner = record(opened[0].update)
  if inner is None or inner.name != "add_l2":
    return None
  hp = known(inner, DENSE_ARGS)
  if hp["mask"] is not None:
    raise Unserved("an add_l2 with a mask inside optax.masked")
  return hp, opened[1]


def _tail(items: Items, core: dict) -> int:
  """[decoupled_decay] at the end, then scale_by_lr and a decoupled add_l2: the index before them."""
  i = len(items) - 1
  r = _stage_at(items, i, "decoupled_decay")
  if r is not None:
    hp = known(r, DENSE_ARGS)
    core["hp"].update(decay_wd=sched(hp["weight_decay"], "weight_decay"), decay=i)
    core["hp"]["decay_lr"] = sched(hp["learning_rate"], "learning_rate")
    core["mode"] |= _fused.TORCH_DECAY
    i -= 1
  r = _stage_at(items, i, "scale_by_lr")
  if r is None:
    raise Unserved("the transformation does not end in jadam.scale_by_lr (Adam's last stage)")
  core["hp"].update(learning_rate=sched(known(r, DENSE_ARGS)["learning_rate"], "learning_rate"), lr=i)
  i -= 1
  decay = _add_l2_at(items, i)
  if decay is not None:
    core["hp"].update(weight_decay=sched(decay[0]["weight_decay"], "weight_decay"), l2=i, mask=decay[1])
    core["mode"] |= _fused.DECOUPLED
    i -= 1
  return i


def _middle(items: Items, core: dict, i: int) -> int:
  """normalize, bias_correct(), [max_nu], scale_by_moments: the index before them."""
  r = _stage_at(items, i, "normalize")
  if r is None:
    raise Unserved("no jadam.normalize before scale_by_lr: not Adam's stages")
  hp = known(r, DENSE_ARGS)
  core["hp"].update(eps=sched(hp["eps"], "eps"), eps_root=sched(hp["eps_root"], "eps_root"))
  r = _stage_at(items, i - 1, "bias_correct")
  if r is None:
    raise Unserved("no jadam.bias_correct() (into_step=False) before normalize")
  known(r, DENSE_ARGS)
  i -= 2
  r = _stage_at(items, i, "max_nu")
  if r is not None:
    known(r, DENSE_ARGS)
    core["mode"] |= _fused.AMSGRAD
    core["hp"]["max_nu"] = i
    i -= 1
  r = _stage_at(items, i, "scale_by_moments")
  if r is None or r.hparams["b1"] is None:
    raise Unserved("no jadam.scale_by_moments (with b1) before bias_correct")
  hp = known(r, DENSE_ARGS)
  core["moments"] = i
  core["hp"].update(b1=sched(hp["b1"], "b1"), b2=sched(hp["b2"], "b2"), mu_dtype=hp["mu_dtype"])
  core["hp"]["nu_dtype"] = hp["nu_dtype"]
  return i - 1


def _front(items: Items, core: dict, i: int) -> int:
  """[clip_by_global_norm] [flip_sign] [add_l2] in front of the moments: the first item of the kernel's part."""
  coupled = _add_l2_at(items, i)
  if coupled is not None:
    if core["mode"] & _fused.DECOUPLED or coupled[1] is not None:
      raise Unserved("both a coupled and a decoupled add_l2, or a masked coupled add_l2")
    core["hp"].update(weight_decay=sched(coupled[0]["weight_decay"], "weight_decay"), l2=i, mask=None)
    core["mode"] |= _fused.COUPLED
    i -= 1
  r = _stage_at(items, i, "flip_sign")
  if r is not None:
    known(r, DENSE_ARGS)
    core["mode"] |= _fused.NEGATE
    i -= 1
  clip = _compat.clip_max_norm(items[i][0]) if i >= 0 else None
  if clip is not None:
    core["clip"] = clip
    core["mode"] |= _fused.CLIP
    i -= 1
  return i + 1


def parse_dense(items: Items) -> _fused.Core:
  """The dense kernel's plan of a flattened chain, or `Unserved`."""
  core: dict[str, Any] = {"hp": {}, "mode": 0, "clip": None}
  i = _middle(items, core, _tail(items, core))
  start = _front(items, core, i)
  plan = _fused.Core(moments=core["moments"], hp=core["hp"], mode=core["mode"], clip=core["clip"], start=start)
  _check_states(items, plan)
  return plan


def _check_states(items: Items, core: _fused.Core) -> None:
  """Each of the kernel's stages holds its record's state type."""
  at = [core.moments, core.hp["lr"]] + [core.hp[k] for k in ("max_nu", "decay", "l2") if k in core.hp]
  for i in at:
    f, s = items[i]
    r = record(f)
    opened = _compat.masked(f, s) if r is None else None
    if opened is not None:  # a jadam.add_l2 inside optax.masked
      r, s = record(opened[0].update), s.inner_state
    s = s.inner_state if isinstance(s, optax.MaskedState) else s
    _check_state(r, s)


def _check_state(r: _registry.Record | None, state: Any) -> None:
  """`Unserved` unless `state` is of the type `r` (a stage's record) says its init returns."""
  if r is None or r.state is None:
    raise Unserved("a stage of the kernel without a registry record of its state")
  if not isinstance(state, r.state):
    raise Unserved(f"the state of jadam.{r.name} is {type(state).__name__}, not {r.state.__name__}")


# --- the row-sparse kernel's stages ------------------------------------------------------
def _rowwise(items: Items, i: int, name: str) -> dict | None:
  """The arguments of rowwise(`name`) at item `i`, or None."""
  r = _stage_at(items, i, "rowwise")
  if r is None:
    return None
  inner = record(known(r, SPARSE_ARGS)["inner"].update)
  return known(inner, SPARSE_ARGS) if inner is not None and inner.name == name else None


def parse_sparse(items: Items) -> dict:
  """The positions and hyperparameters of sparse_adam's stages at the end of `items`, or `Unserved`."""
  n = len(items)
  lr = _stage_at(items, n - 1, "scale_by_lr")
  if n < 4 or lr is None:
    raise Unserved("a sparse chain that does not end in jadam.scale_by_lr")
  norm = _rowwise(items, n - 2, "normalize")
  if norm is None:
    raise Unserved("no rowwise(jadam.normalize) before scale_by_lr: not sparse_adam's stages")
  correct = _rowwise(items, n - 3, "bias_correct")
  if correct is None or correct["into_step"] is not True:
    raise Unserved("no rowwise(jadam.bias_correct(into_step=True)) before rowwise(normalize)")
  moments = _stage_at(items, n - 4, "scale_by_sparse_moments")
  if moments is None:
    raise Unserved("no jadam.scale_by_sparse_moments before the rowwise stages")
  hp = known(moments, SPARSE_ARGS)
  flip = _stage_at(items, n - 5, "flip_sign")
  if flip is not None:
    known(flip, SPARSE_ARGS)
  core = dict(
    moments=n - 4,
    lr=n - 1,
    b1=sched(hp["b1"], "b1"),
    b2=sched(hp["b2"], "b2"),
    eps=sched(norm["eps"], "eps"),
    eps_root=sched(norm["eps_root"], "eps_root"),
    learning_rate=sched(known(lr, SPARSE_ARGS)["learning_rate"], "learning_rate"),
    negate=flip is not None,
  )
  core["start"] = n - 5 if core["negate"] else n - 4
  for i, r in ((n - 4, moments), (n - 1, lr)):
    _check_state(r, items[i][1])
  return core
