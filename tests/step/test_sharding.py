"""Scale-out on jax.sharding: data parallel equals one device; FSDP state follows its params, no collectives."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadam

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")

_COLLECTIVES = re.compile(r"all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all|collective-broadcast")


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "w1": jax.random.normal(k1, (16, 64)) / 4,
    "b1": jnp.zeros(64),
    "w2": jax.random.normal(k2, (64, 8)) / 8,
    "b2": jnp.zeros(8),
  }


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def _batches(steps):
  x = jax.random.normal(jax.random.key(1), (steps, 64, 16))
  y = jnp.sin(x[..., :8])
  return x, y


_OPTIMIZERS = {
  "adam": lambda: jadam.adam(1e-2),
  "adamw_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-2, weight_decay=1e-2)),
  "adam_bf16_moments": lambda: jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_data_parallel_matches_one_device(name):
  tx = _OPTIMIZERS[name]()
  steps = 20
  xs, ys = _batches(steps)

  def train(step, params, state, shard_batch):
    for t in range(steps):
      x, y = shard_batch(xs[t]), shard_batch(ys[t])
      params, state, _ = step(params, state, x, y)
    return params, state

  one = jadam.make_train_step(_loss, tx)
  params = jax.device_put(_params(), jax.devices()[0])
  want, want_state = train(one, params, tx.init(params), lambda b: jax.device_put(b, jax.devices()[0]))

  mesh = _mesh()
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(_params(), replicated)
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  got, got_state = train(jadam.make_train_step(_loss, tx), params, state, lambda b: jax.device_put(b, batch))

  for leaf in jax.tree.leaves(got):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
  # the mean over the batch is reduced in another order across 8 devices
  if name == "adam_bf16_moments":  # the same random bits, but a 1-ulp change may round to the other side
    chex.assert_trees_all_close(got, want, rtol=1e-2, atol=1e-3)  # bf16 m: 2^-8 relative a step
  else:
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-4, atol=1e-6)


def _fsdp_sharding(mesh, leaf):
  """Shard each parameter along its first axis divisible by the mesh, as FSDP does."""
  for axis, size in enumerate(leaf.shape):
    if size % mesh.size == 0:
      spec = [None] * leaf.ndim
      spec[axis] = "data"
      return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def moments_of(state):
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, jadam.ScaleByMomentsState))
    if isinstance(s, jadam.ScaleByMomentsState)
  ]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_fsdp_state_follows_params_and_update_has_no_collectives(name):
  tx = _OPTIMIZERS[name]()
  mesh = _mesh()
  params = _params()
  shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), params)
  params = jax.device_put(params, shardings)
  state = tx.init(params)  # zeros_like keeps each parameter's sharding

  for tree in (moments_of(state).mu, moments_of(state).nu):
    for leaf, param in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
      assert leaf.shape == param.shape
      assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (leaf.sharding, param.sharding)

  grads = jax.device_put(jax.tree.map(jnp.ones_like, _params()), shardings)
  step = jadam.make_update_step(tx)
  hlo = step.lower(params, state, grads).compile().as_text()
  if name == "adamw_clip":
    # the global norm is a sum over every shard: one all-reduce of a scalar, no more
    found = [line for line in hlo.splitlines() if _COLLECTIVES.search(line) and "=" in line]
    result_types = [re.match(r"\s*(\(.*?\)|\S+)\s", line.split("=", 1)[1]).group(1) for line in found]
    assert found and all(re.fullmatch(r"\(?(f32\[\](, )?)+\)?", t) for t in result_types), found
  else:
    assert not _COLLECTIVES.search(hlo), [line for line in hlo.splitlines() if _COLLECTIVES.search(line)]

  new_params, new_state = step(params, state, grads)
  for new, sharding in zip(jax.tree.leaves(new_params), jax.tree.leaves(shardings), strict=True):
    assert new.sharding.is_equivalent_to(sharding, new.ndim)
  for tree in (moments_of(new_state).mu, moments_of(new_state).nu):
    for new, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
      assert new.sharding.is_equivalent_to(sharding, new.ndim)


def test_fsdp_update_matches_unsharded():
  tx = jadam.adam(1e-2)
  mesh = _mesh()
  params = _params()
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
  step = jax.jit(functools.partial(jadam.update_and_apply, tx))
  want, want_state = step(grads, tx.init(params), params)
  shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), params)
  sp, sg = jax.device_put(params, shardings), jax.device_put(grads, shardings)
  got, got_state = step(sg, tx.init(sp), sp)
  chex.assert_trees_all_equal(got, want)  # elementwise: the same bits on every shard
  chex.assert_trees_all_equal(got_state, want_state)


def test_jitted_init_with_state_shardings_from_optax_tree_map_params():
  """For parameters that only exist inside jit: the state's shardings, from the params', by Optax's own tool."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-3, nu_dtype=jnp.bfloat16))
  mesh = _mesh()
  shapes = jax.eval_shape(_params)
  param_shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), shapes)
  state_shapes = jax.eval_shape(tx.init, shapes)
  state_shardings = optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    state_shapes,
    param_shardings,
    transform_non_params=lambda _: NamedSharding(mesh, P()),
  )
  params = jax.jit(_params, out_shardings=param_shardings)()
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  nu = state[1][1].nu
  for leaf, param in zip(jax.tree.leaves(nu), jax.tree.leaves(params), strict=True):
    assert leaf.dtype == jnp.bfloat16
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim)
