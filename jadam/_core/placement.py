"""Where an eagerly built state lives: on its parameters' mesh, replicated where it does not follow them.

`tx.init` on sharded parameters gives moments sharded like them (`zeros_like`
keeps a sharding), but the step counts (``jnp.zeros([], jnp.int32)``) land
uncommitted on the default device. A step compiled for the mesh takes them
anyway, but a restored copy of them is committed to that one device, and a
step on the mesh then fails with "incompatible devices". So the leaves that
live on one device while the parameters span a mesh are replicated over it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _mesh_of(params: Any) -> Any:
  """The one mesh (of several devices) the concrete `params` are laid out on, or None."""
  meshes = set()
  for x in jax.tree.leaves(params):
    sharding = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
      meshes.add(sharding.mesh)
  return meshes.pop() if len(meshes) == 1 else None


def on_params_mesh(state: Any, params: Any) -> Any:
  """`state` with each concrete leaf that lives on one device replicated over `params`' mesh (if they have one)."""
  mesh = _mesh_of(params)
  if mesh is None:
    return state
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(x):
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array) or len(x.sharding.device_set) > 1:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, replicated)
    value = np.asarray(x)  # the same in every process (a count, a constant): each puts its own devices' copies
    return jax.make_array_from_callback(value.shape, replicated, lambda index: value[index])

  return jax.tree.map(place, state)
