"""Checkpoints of optimizer state with orbax: checked against the tree they restore into.

Orbax saves arrays well, but restoring into other dtypes casts without a word
(a bfloat16 moment comes back as float32, or the reverse), and it refuses to
save zero-size arrays, which parameter trees may hold. :func:`save_state`
therefore stores a tree as its non-empty array leaves plus a description of
every leaf (key path, shape, dtype, or ``None``), and :func:`restore_state`
compares that description with the tree it restores into before it reads a
single array, and each array it reads with the SHA-256 digest recorded when it
was written. No pickle is involved: arrays go through orbax's tensorstore
format, the description through JSON.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, TypedDict

import jax
import numpy as np
from jax.experimental import multihost_utils

from jadam._core import registry as _registry

_FORMAT = "jadam.checkpoint/1"
_CHECKSUMS = "jadam.checksums/1"  # the digests' own record, beside the arrays and the description


class _Entry(TypedDict):
  """One leaf in the checkpoint's description (as JSON): its key path, and its shape and dtype (None for None)."""

  path: str
  leaf: dict[str, Any] | None


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(
      "jadam.save_state and jadam.restore_state need orbax-checkpoint, which is in"
      " jadam's `test` and `examples` extras: pip install 'jadam[examples]' (or"
      " pip install orbax-checkpoint)."
    ) from e
  return ocp


def _leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """`(key path, leaf)` pairs, `None` leaves included, and the treedef that rebuilds the tree."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in pairs], treedef


def _as_array(leaf: Any) -> Any:
  """Arrays (and `jax.ShapeDtypeStruct`) as they are; Python scalars as jax would make them.

  `TrainState.create` starts with the Python int ``step=0``, which a jitted
  step returns as an int32 array: both must read as int32.
  """
  return leaf if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else jax.numpy.asarray(leaf)


def _describe(leaf: Any) -> dict[str, Any] | None:
  if leaf is None:
    return None
  leaf = _as_array(leaf)
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    raise TypeError("PRNG key arrays cannot be checkpointed as they are: save jax.random.key_data(key) instead.")
  return {"shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype))}


def _stored(entry: dict[str, Any] | None) -> bool:
  """Whether a leaf's values are in orbax's part of the checkpoint: not `None`, not zero-size."""
  return entry is not None and math.prod(entry["shape"]) > 0


def _show(entry: dict[str, Any] | None) -> str:
  """`float32[3,4]`, as jax prints an aval; `None` for a `None` leaf."""
  return "None" if entry is None else f"{entry['dtype']}[{','.join(map(str, entry['shape']))}]"


def _digest(value: Any) -> str:
  """SHA-256 of an array's values: its global array brought to the host, in C order, native byte order."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:  # spans processes: every process gathers it
    host = np.ascontiguousarray(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
  else:
    host = np.ascontiguousarray(np.asarray(jax.device_get(value)))
  return hashlib.sha256(host.view(np.uint8).reshape(-1).data).hexdigest()


def _verify(path: str, description: list[_Entry], record: Any, arrays: dict[str, Any]) -> None:
  """Raises unless every restored array has the digest that :func:`save_state` recorded for it."""
  sums = record.get("sha256") if isinstance(record, dict) and record.get("format") == _CHECKSUMS else None
  if not isinstance(sums, dict):
    raise ValueError(f"the checkpoint at {path} has an unreadable 'checksums' item ({str(record)[:80]}).")
  for key, value in arrays.items():
    leaf = description[int(key)]["path"] or "the root"
    if key not in sums:
      raise ValueError(f"the checkpoint at {path} records no checksum for {leaf}: it was altered after saving.")
    if _digest(value) != sums[key]:
      raise ValueError(
        f"the checkpoint at {path} is corrupt: the values read for {leaf} do not have the SHA-256 checksum"
        " recorded when it was saved (a changed data file, or a storage fault). Nothing was restored."
      )


# --- which optimizer wrote a state -------------------------------------------------------
def _identities(tree: Any) -> dict[str, dict[str, Any]]:
  """The identity of every optimizer state in `tree` (`jadam._core.registry.OptimizerState`), by key path."""

  def is_state(x: Any) -> bool:
    return isinstance(x, _registry.OptimizerState)

  found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state)[0]
  return {
    jax.tree_util.keystr(path): {"optimizer": x.identity.optimizer, "stages": list(x.identity.stages)}
    for path, x in found
    if is_state(x)
  }


def _check_identities(path: str, stored: dict[str, Any], expected: dict[str, Any], *, names_only: bool) -> None:
  """Raises where the checkpoint's optimizer at a key path is not the one `like` holds there (both known).

  With `names_only`, only another optimizer raises (one optimizer in another
  configuration is left to the leaf-by-leaf comparison, which says where).
  """
  for where in sorted(set(stored) & set(expected)):
    s, e = stored[where], expected[where]
    if s["optimizer"] != e["optimizer"] or (s != e and not names_only):
      at = f" at {where}" if where else ""
      raise ValueError(
        f"the checkpoint at {path} does not match the tree to restore into: it holds a state written by"
        f" {s['optimizer']} (stages {', '.join(s['stages'])}){at}, and the tree to restore into is a state of"
        f" {e['optimizer']} (stages {', '.join(e['stages'])}). Restore it into {s['optimizer']}'s own state."
        " Nothing was restored."
      )


def save_state(directory: str | os.PathLike, tree: Any) -> None:
  """Save a pytree of arrays (an optimizer state, a `TrainState`, an `nnx.State`) with orbax.

  Writes `directory`, which must not exist yet, atomically (orbax writes to a
  temporary directory and renames it). The tree's leaves go through orbax's
  array format; its structure is described in JSON (each leaf's key path,
  shape and dtype, and where it is ``None``, and which optimizer and stage
  types wrote each optimizer state in it), so that :func:`restore_state` can
  refuse a tree that does not match. Zero-size arrays, ``None`` leaves and
  empty states (`optax.EmptyState`) are recorded in the description only.
  The SHA-256 digest of every stored array (its global values brought to the
  host, sharded arrays included) is recorded beside them, in a JSON item of its
  own, for :func:`restore_state` to verify: orbax keeps no checksum of the data.
  Nothing is pickled.

  Args:
    directory: where to write the checkpoint: a new directory, e.g. one per step.
    tree: any pytree whose leaves are arrays (jax or NumPy), scalars or ``None``.

  Raises:
    ImportError: orbax-checkpoint is not installed.
    TypeError: a leaf is a PRNG key array (save its `jax.random.key_data`).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, jadam
    >>> tx = jadam.adam(1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.update(params, tx.init(params), params)[1]
    >>> with tempfile.TemporaryDirectory() as root:
    ...   jadam.save_state(os.path.join(root, "step_1"), state)
    ...   restored = jadam.restore_state(os.path.join(root, "step_1"), tx.init(params))
    >>> int(restored[0].count)
    1
  """
  ocp = _orbax()
  leaves, _ = _leaves(tree)
  description: list[_Entry] = [{"path": path, "leaf": _describe(leaf)} for path, leaf in leaves]
  # Only non-empty arrays go to orbax, which refuses zero-size ones; the rest is rebuilt from the description.
  arrays = {str(i): _as_array(leaf) for i, (_, leaf) in enumerate(leaves) if _stored(description[i]["leaf"])}
  header = {"format": _FORMAT, "leaves": description, "optimizers": _identities(tree)}
  items = {"structure": ocp.args.JsonSave(header)}
  if arrays:  # an EmptyState alone has none
    items["arrays"] = ocp.args.StandardSave(arrays)
    # orbax keeps no checksum of the data: a flipped bit would restore as a wrong value without a word
    sums = {key: _digest(value) for key, value in arrays.items()}
    items["checksums"] = ocp.args.JsonSave({"format": _CHECKSUMS, "sha256": sums})
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(os.path.abspath(os.fspath(directory)), args=ocp.args.Composite(**items))


def _first_mismatch(stored: list[_Entry], expected: list[_Entry]) -> str | None:
  for i, (s, e) in enumerate(zip(stored, expected, strict=False)):  # a longer list is reported below
    if s["path"] != e["path"]:
      return f"leaf {i} is {e['path']} in the tree to restore into, {s['path']} in the checkpoint"
    if s["leaf"] != e["leaf"]:
      return f"at {e['path']}: expected {_show(e['leaf'])}, found {_show(s['leaf'])}"
  if len(stored) != len(expected):
    longer, what = (expected, "the tree to restore into") if len(expected) > len(stored) else (stored, "the checkpoint")
    n = min(len(stored), len(expected))
    return (
      f"the tree to restore into has {len(expected)} leaves and the checkpoint {len(stored)};"
      f" the first extra one, in {what}, is {longer[n]['path']} ({_show(longer[n]['leaf'])})"
    )
  return None


def restore_state(directory: str | os.PathLike, like: Any) -> Any:
  """Restore a tree saved by :func:`save_state` into the structure, dtypes and shardings of `like`.

  The checkpoint's description is compared with `like` leaf by leaf (key
  path, shape, dtype, ``None``) before any array is read; on a mismatch
  nothing is restored and the checkpoint is left as it was. `like` is usually
  a freshly initialised state, ``tx.init(params)``: its values are ignored,
  its structure (NamedTuple types, `nnx.Variable` boxes, a `TrainState`'s
  `apply_fn` and `tx`) is what the result is built from, and each restored
  jax array is placed with the sharding of `like`'s leaf.

  Args:
    directory: a checkpoint written by :func:`save_state`.
    like: a tree of the same structure as the saved one (arrays or
      `jax.ShapeDtypeStruct`).

  Returns:
    The saved tree, as a tree of `like`'s structure.

  Raises:
    FileNotFoundError: there is no checkpoint at `directory`.
    ValueError: the checkpoint was not written by :func:`save_state`, it
      holds another optimizer's state than `like` (the message names both),
      or it does not match `like`; the message names the first key path that
      differs, with what `like` expects there and what the checkpoint holds.
      Also when an array read back does not have the SHA-256 digest recorded
      when it was saved (a changed data file: the message names its key
      path), or the digests are missing; nothing is returned then.
  """
  ocp = _orbax()
  path = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}.")
  if not os.path.isdir(os.path.join(path, "structure")):
    raise ValueError(f"{path} is not a checkpoint written by jadam.save_state (it has no 'structure' item).")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  header = checkpointer.restore(path, args=ocp.args.Composite(structure=ocp.args.JsonRestore()))["structure"]
  found = header.get("format") if isinstance(header, dict) else None
  if found != _FORMAT:
    raise ValueError(
      f"{path} is not a checkpoint written by jadam.save_state (its format is {found!r}, not {_FORMAT!r})."
    )
  stored_ids, expected_ids = header.get("optimizers", {}), _identities(like)
  _check_identities(path, stored_ids, expected_ids, names_only=True)
  leaves, treedef = _leaves(like)
  expected: list[_Entry] = [{"path": p, "leaf": _describe(leaf)} for p, leaf in leaves]
  mismatch = _first_mismatch(header["leaves"], expected)
  if mismatch:
    raise ValueError(
      f"the checkpoint at {path} does not match the tree to restore into: {mismatch}. Nothing was restored."
    )
  _check_identities(path, stored_ids, expected_ids, names_only=False)

  def target(leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, (np.ndarray, jax.ShapeDtypeStruct)):
      return leaf  # a NumPy array is restored as one
    return jax.ShapeDtypeStruct((), _as_array(leaf).dtype)  # a Python scalar

  wanted = {str(i): target(leaf) for i, (_, leaf) in enumerate(leaves) if _stored(expected[i]["leaf"])}
  arrays = {}
  if wanted:
    arrays = checkpointer.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(wanted)))["arrays"]
    if not os.path.isdir(os.path.join(path, "checksums")):
      raise ValueError(
        f"the checkpoint at {path} has no 'checksums' item, so its arrays cannot be verified: it was written by"
        " an older jadam or altered after saving. Nothing was restored."
      )
    record = checkpointer.restore(path, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]
    _verify(path, header["leaves"], record, arrays)

  def rebuild(i, leaf):
    entry = expected[i]["leaf"]
    if entry is None:
      return None
    value = arrays[str(i)] if str(i) in arrays else np.zeros(entry["shape"], jax.numpy.dtype(entry["dtype"]))
    if isinstance(leaf, jax.Array) and not leaf.committed:
      # An eager init's step count (jnp.zeros) is on the default device, uncommitted, so that jit moves it to the
      # mesh of the arrays beside it; placed on that one device it would be refused beside them ("incompatible
      # devices"). It stays uncommitted: rebuilt from host values.
      return jax.numpy.asarray(np.asarray(value))
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
      sharding = getattr(leaf, "sharding", None)
      return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
    if isinstance(leaf, np.ndarray):
      return np.asarray(value)
    return np.asarray(value).item()  # a Python scalar stays one

  return jax.tree_util.tree_unflatten(treedef, [rebuild(i, leaf) for i, (_, leaf) in enumerate(leaves)])
