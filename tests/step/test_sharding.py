"""Scale-out on jax.sharding: data parallel equals one device; FSDP state follows its params, no collectives.

The step helpers run the fused kernel on each device's shard (`jadam._kernels.sharded`): the compiled
programs below hold its custom call and no gather.
"""

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


_KERNEL = re.compile(r'custom_call_target="jadam_adam')


def _collectives(hlo):
  """The collective operations of a compiled module (their defining lines)."""
  op = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + _COLLECTIVES.pattern + r")(-start)?\(")
  return [line for line in hlo.splitlines() if op.search(line)]


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
  step = jadam.make_train_step(_loss, tx)
  hlo = step.lower(params, state, jax.device_put(xs[0], batch), jax.device_put(ys[0], batch)).compile().as_text()
  # the kernel on each device's (whole, replicated) copy; bfloat16 moments on replicated leaves too
  assert _KERNEL.search(hlo)
  got, got_state = train(step, params, state, lambda b: jax.device_put(b, batch))

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
    found = _collectives(hlo)
    result_types = [re.match(r"\s*(\(.*?\)|\S+)\s", line.split("=", 1)[1]).group(1) for line in found]
    assert found and all(re.fullmatch(r"\(?(f32\[\](, )?)+\)?", t) for t in result_types), found
  else:
    assert not _collectives(hlo), _collectives(hlo)
  # the kernel on each shard; bfloat16 moments of sharded leaves take the XLA arithmetic (their rounding
  # hashes each value's index in the whole leaf)
  assert bool(_KERNEL.search(hlo)) == (name != "adam_bf16_moments")

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


def follow(leaf, sharding):
  """The parameter's sharding where it fits the state leaf (mu, nu, 8-bit codes, per-row scales), else replicated.

  For `optax.tree_map_params`: it hands every leaf of a parameter-shaped subtree of the state its
  parameter's sharding, and some are not the parameter's shape (8-bit scales, per-table counts).
  """
  if isinstance(leaf, optax.MaskedNode):  # optax.partition's stand-in for another group's leaf
    return leaf
  if len(sharding.spec) <= leaf.ndim:
    try:
      sharding.shard_shape(leaf.shape)  # raises where a sharded axis does not divide
      return sharding
    except ValueError:
      pass
  return NamedSharding(sharding.mesh, P())


def _table_params():
  return {**_params(), "table": jnp.ones((64, 16)), "w3": jnp.ones((512, 8))}


_GROUPED = {  # the optimizers whose state is not just mu and nu like the params
  "adam8bit": lambda: jadam.adam8bit(1e-2, block_size=64, min_8bit_size=256),
  "torch_adamw_groups": lambda: jadam.torch.AdamW([{"params": "b.*", "weight_decay": 0.0}], lr=1e-2),
  "sparse_adam": lambda: optax.partition(
    {"table": jadam.sparse_adam(1e-2), "rest": jadam.adam(1e-2)},
    {k: "table" if k == "table" else "rest" for k in _table_params()},
  ),
  "torch_sparse_adam": lambda: jadam.torch.SparseAdam(lr=1e-2),
}


def _param_shaped_leaves(state, params):
  """(state leaf, its parameter) for every leaf of the state's parameter-shaped subtrees of the parameter's shape."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    key = path[-1]
    if isinstance(key, jax.tree_util.DictKey) and key.key in params and leaf.shape == params[key.key].shape:
      out.append((jax.tree_util.keystr(path), leaf, params[key.key]))
  return out


@pytest.mark.parametrize("name", sorted(_GROUPED))
def test_state_follows_params_eager_and_through_tree_map_params(name):
  tx = _GROUPED[name]()
  mesh = _mesh()
  shapes = jax.eval_shape(_table_params)
  param_shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), shapes)
  params = jax.jit(_table_params, out_shardings=param_shardings)()

  eager = tx.init(params)
  state_shapes = jax.eval_shape(tx.init, shapes)
  state_shardings = optax.tree_map_params(
    tx,
    follow,
    state_shapes,
    param_shardings,
    transform_non_params=lambda _: NamedSharding(mesh, P()),
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )
  jitted = jax.jit(tx.init, out_shardings=state_shardings)(params)
  chex.assert_trees_all_equal(jitted, eager)
  for state in (eager, jitted):
    found = _param_shaped_leaves(state, params)
    assert len(found) >= 2 * len(params) - 1, [p for p, _, _ in found]  # mu and nu (or 8-bit codes) of each
    for path, leaf, param in found:
      assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (path, leaf.sharding, param.sharding)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      if leaf.ndim:  # on the mesh (8-bit scales included), not on one device
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh, jax.tree_util.keystr(path)
  if name == "adam8bit":  # per-row scales follow their parameter: w1 (16, 64) -> (16, 1), sharded on its rows
    absmax = jitted[1].mu.absmax["w1"]
    assert absmax.shape == (16, 1) and absmax.sharding.is_equivalent_to(param_shardings["w1"], 2)


def test_zero1_state_sharded_params_replicated():
  """ZeRO-1: the one-liner of docs/guides/scale_out.md shards the state over "data"; the steps are unchanged."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-2, weight_decay=1e-2))
  mesh = _mesh()
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(_params(), replicated)

  def zero1(x):  # a leaf whose first axis splits over the devices is sharded along it; the rest is replicated
    return NamedSharding(mesh, P("data") if x.ndim and x.shape[0] % mesh.size == 0 else P())

  state = jax.jit(tx.init, out_shardings=jax.tree.map(zero1, jax.eval_shape(tx.init, params)))(params)
  mu = moments_of(state).mu
  assert mu["w2"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  assert mu["w2"].addressable_shards[0].data.shape == (64 // 8, 8)  # 1/8 of the moment on each device

  step = jadam.make_train_step(_loss, tx, donate=False)  # the kernel on each shard of the moments
  xs, ys = _batches(3)
  split = NamedSharding(mesh, P("data"))
  args = (params, state, jax.device_put(xs[0], split), jax.device_put(ys[0], split))
  hlo = step.lower(*args).compile().as_text()
  xla = jadam.make_train_step(_loss, tx, fused=False, donate=False).lower(*args).compile().as_text()
  # The gradient's all-reduces, as XLA's step; then each new parameter gathered back to replicated, the one
  # all-gather ZeRO-1 is made of (XLA's own step leaves the parameters sharded like the moments instead), and
  # no moment gathered.
  found = _collectives(hlo)
  gathers = [line for line in found if "all-gather" in line]
  assert _KERNEL.search(hlo) and len(found) - len(gathers) <= len(_collectives(xla)), found
  assert len(gathers) <= len(params), gathers
  want_params, want_state = params, jax.device_put(tx.init(_params()), replicated)
  for t in range(3):
    x, y = jax.device_put(xs[t], NamedSharding(mesh, P("data"))), jax.device_put(ys[t], NamedSharding(mesh, P("data")))
    params, state, _ = step(params, state, x, y)
    want_params, want_state, _ = step(want_params, want_state, x, y)
  # XLA partitions the backward pass otherwise around the sharded state: the gradient's sums in another order,
  # a few ulps; each step moves a parameter by lr * u with |u| <= ~1, so by a few ulps of lr (2^-20 lr on 3 steps),
  # and may round theta - lr * u to the neighbouring float32 (one ulp of theta a step).
  chex.assert_trees_all_close(params, want_params, rtol=3 * 2.0**-23, atol=3 * 1e-2 * 2.0**-20)
  chex.assert_trees_all_close(state, want_state, rtol=1e-5, atol=1e-8)
  assert moments_of(state).mu["w2"].addressable_shards[0].data.shape == (64 // 8, 8)
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)


_RESUMED = {
  "adam": lambda: jadam.adam(1e-2),
  "adam8bit": lambda: jadam.adam8bit(1e-2, block_size=64, min_8bit_size=256),
  "torch_adamw_groups": lambda: jadam.torch.AdamW([{"params": "b.*", "weight_decay": 0.0}], lr=1e-2),
}


@pytest.mark.parametrize("init", ["eager", "jitted"])
@pytest.mark.parametrize("name", sorted(_RESUMED))
def test_checkpoint_resumes_on_a_mesh_and_onto_another(name, init, tmp_path):
  """save_state after 2 FSDP steps, restore into `like` from either init, resume: the run that never stopped.

  Also restored onto another mesh (2 x 4, w sharded over both axes): the same values, `like`'s shardings.
  """
  tx = _RESUMED[name]()
  mesh = _mesh()
  shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), _params())
  params = jax.device_put(_params(), shardings)
  grads = [jax.device_put(jax.tree.map(lambda p, k=k: jnp.cos(p + k), _params()), shardings) for k in range(3)]
  step = jadam.make_update_step(tx, donate=False)  # the kernel on each shard
  state = tx.init(params)
  for g in grads[:2]:
    params, state = step(params, state, g)
  jadam.save_state(tmp_path / "step_2", state)
  want_params, want_state = step(params, state, grads[2])

  def like_on(shardings):
    fresh = jax.device_put(_params(), shardings)
    if init == "eager":
      return tx.init(fresh)
    out = optax.tree_map_params(
      tx,
      follow,
      jax.eval_shape(tx.init, fresh),
      shardings,
      transform_non_params=lambda _: NamedSharding(jax.tree.leaves(shardings)[0].mesh, P()),
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    return jax.jit(tx.init, out_shardings=out)(fresh)

  restored = jadam.restore_state(tmp_path / "step_2", like=like_on(shardings))
  got_params, got_state = step(params, restored, grads[2])
  chex.assert_trees_all_equal(got_params, want_params)
  chex.assert_trees_all_equal(got_state, want_state)

  other = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  other_shardings = {k: NamedSharding(other, P(("a", "b")) if k == "w1" else P()) for k in _params()}
  like = like_on(other_shardings)
  moved = jadam.restore_state(tmp_path / "step_2", like=like)
  chex.assert_trees_all_equal(moved, state)
  for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(like), strict=True):
    assert got.sharding == want.sharding or not want.committed
  got_params, got_state = step(
    jax.device_put(params, other_shardings), moved, jax.device_put(grads[2], other_shardings)
  )
  # Another layout is another program: XLA:CPU may round a leaf's step otherwise (contract (1 - b2) g g + b2 v
  # into an FMA, vectorize the division): a few roundings of the update u = lr m^ / (sqrt(v^) + eps), so the
  # bound is in ulps of the leaf's largest update, not of each parameter (one near 0 moves by the same update).
  leaves = (jax.tree.leaves(got_params), jax.tree.leaves(want_params), jax.tree.leaves(params))
  for got, want, before in zip(*leaves, strict=True):
    step_size = float(jnp.max(jnp.abs(want - before)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2.0**-23, atol=8 * 2.0**-23 * step_size)


@pytest.mark.parametrize("name", ["adam", "adam8bit", "adamw_clip"])
def test_explicit_sharding_fsdp_equals_one_device(name):
  """Under `AxisType.Explicit` (shardings in the types), FSDP steps give the one-device step's bits."""
  tx = {**_OPTIMIZERS, **_RESUMED}[name]()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  grads = [jax.tree.map(lambda p, k=k: jnp.cos(p + k), _params()) for k in range(3)]
  step = jadam.make_update_step(tx, donate=False)  # the kernel on each shard, and on one device
  want, want_state = _params(), tx.init(_params())
  for g in grads:
    want, want_state = step(want, want_state, g)
  with jax.set_mesh(mesh):
    shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), _params())
    params = jax.device_put(_params(), shardings)
    state = tx.init(params)
    for g in grads:
      params, state = step(params, state, jax.device_put(g, shardings))
  for got, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
    assert got.sharding.is_equivalent_to(sharding, got.ndim)
  if name != "adam":
    # clip: the global norm is summed over the shards in another order, a few ulps of it. 8-bit: w2's flat blocks
    # (its last axis, 8, is no multiple of 64) compile otherwise per shard, and XLA:CPU may round the step once
    # otherwise (also seen restoring onto another mesh): one rounding of the parameter a step at most.
    chex.assert_trees_all_close(params, want, rtol=3 * 2.0**-23, atol=3 * 1e-2 * 2.0**-20)
  else:  # elementwise: the same bits on every shard
    chex.assert_trees_all_equal(params, want)
    chex.assert_trees_all_equal(state, want_state)


def _shard_on(axis):
  """Each parameter sharded on its `axis` where that axis divides among the 8 devices (FSDP on any axis)."""

  def sharding(mesh, leaf):
    if leaf.ndim > axis and leaf.shape[axis] % mesh.size == 0:
      return NamedSharding(mesh, P(*[None] * axis, "data"))
    return NamedSharding(mesh, P())

  return sharding


_LAYOUTS = {
  "fsdp_rows": _shard_on(0),
  "fsdp_columns": _shard_on(1),
  "replicated": lambda mesh, leaf: NamedSharding(mesh, P()),
}
_PER_SHARD = {
  "adam": lambda: jadam.adam(1e-2),
  "adamw_clip": _OPTIMIZERS["adamw_clip"],
  "adam8bit": lambda: jadam.adam8bit(1e-2, block_size=8, min_8bit_size=256),  # w1's rows of 64 split into 8s
  "apply_if_finite": lambda: optax.apply_if_finite(jadam.adam(1e-2), 3),  # the check: XLA's all-reduce of a bool
  "inject_hyperparams": lambda: optax.inject_hyperparams(jadam.adamw)(learning_rate=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("name", sorted(_PER_SHARD))
def test_kernel_per_shard_equals_one_device_kernel(name, layout):
  """make_update_step on sharded inputs: the kernel on every shard, no gather, the one-device kernel's results."""
  tx = _PER_SHARD[name]()
  mesh = _mesh()
  shardings = jax.tree.map(lambda p: _LAYOUTS[layout](mesh, p), _params())
  grads = [jax.tree.map(lambda p, k=k: jnp.cos(p + k), _params()) for k in range(3)]
  step = jadam.make_update_step(tx, donate=False)
  one = jax.devices()[0]
  want, want_state = jax.device_put(_params(), one), tx.init(jax.device_put(_params(), one))
  params = jax.device_put(_params(), shardings)
  state = tx.init(params)
  hlo = step.lower(params, state, jax.device_put(grads[0], shardings)).compile().as_text()
  # 8-bit on columns: w2's rows of 8 split into 1-column shards would cut its blocks of 8, so the kernel does
  # not serve that step, which runs as its stages, partitioned by XLA
  assert bool(_KERNEL.search(hlo)) == ((name, layout) != ("adam8bit", "fsdp_columns"))
  assert not [line for line in _collectives(hlo) if "all-gather" in line or "all-to-all" in line]
  for g in grads:
    want, want_state = step(want, want_state, jax.device_put(g, one))
    params, state = step(params, state, jax.device_put(g, shardings))
  for got, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
    assert got.sharding.is_equivalent_to(sharding, got.ndim)
  if (name, layout) in (("adamw_clip", "fsdp_rows"), ("adamw_clip", "fsdp_columns"), ("adam8bit", "fsdp_columns")):
    # clip: the global norm summed over the shards in another order, a few ulps of the clip factor, which
    # Adam's scale-free step m / sqrt(v) cancels but for eps. 8-bit on columns: the stages (above), which may
    # round the step otherwise than the kernel. Either way: at most one rounding of the parameter a step.
    chex.assert_trees_all_close(params, want, rtol=3 * 2.0**-23, atol=3 * 1e-2 * 2.0**-20)
  else:  # elementwise: the same bits on every shard
    chex.assert_trees_all_equal(params, want)
    chex.assert_trees_all_equal(state, want_state)


def test_fused_true_names_why_the_kernel_cannot_serve_a_sharded_step():
  mesh = _mesh()
  shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), _params())
  params = jax.device_put(_params(), shardings)
  tx = _OPTIMIZERS["adam_bf16_moments"]()
  with pytest.raises(ValueError, match="bfloat16 moments: their stochastic rounding"):
    jadam.make_update_step(tx, fused=True)(params, tx.init(params), params)
  tx = jadam.adam(1e-2)
  inside = jax.jit(functools.partial(jadam.update_and_apply, tx, fused=True))
  with pytest.raises(ValueError, match="inside a jit on a mesh of Auto axes"):
    inside(params, tx.init(params), params)
  # fused=None in a user's jit: the XLA step, partitioned without a gather
  hlo = jax.jit(functools.partial(jadam.update_and_apply, tx)).lower(params, tx.init(params), params).compile()
  assert not _KERNEL.search(hlo.as_text()) and not _collectives(hlo.as_text())


@pytest.mark.parametrize("layout", ["fsdp", "zero1"])
@pytest.mark.parametrize("name", ["adam", "adamw_clip"])
def test_kernel_per_shard_inside_a_users_jit_under_explicit_sharding(name, layout):
  """Under AxisType.Explicit the layout is in the tracers' types: update_and_apply in the user's jit runs per shard."""
  tx = _OPTIMIZERS[name]()
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, _params())
  want, _ = jadam.make_update_step(tx, donate=False)(_params(), tx.init(_params()), grads)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    if layout == "fsdp":
      shardings = jax.tree.map(lambda p: _fsdp_sharding(mesh, p), _params())
      params, g = jax.device_put(_params(), shardings), jax.device_put(grads, shardings)
      state = tx.init(params)
    else:  # ZeRO-1: the moments split, the parameters (and so the new ones) replicated
      params, g = jax.device_put(_params(), NamedSharding(mesh, P())), jax.device_put(grads, NamedSharding(mesh, P()))
      shapes = jax.eval_shape(tx.init, params)
      state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: _fsdp_sharding(mesh, x), shapes))(params)
    step = jax.jit(lambda p, s, g: jadam.update_and_apply(tx, g, s, p, fused=True))
    hlo = step.lower(params, state, g).compile().as_text()
    gathers = [line for line in _collectives(hlo) if "all-gather" in line]
    assert _KERNEL.search(hlo) and (not gathers if layout == "fsdp" else len(gathers) <= len(params)), gathers
    got, _ = step(params, state, g)
  for leaf, before in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
    assert leaf.sharding.is_equivalent_to(before.sharding, leaf.ndim)
  if name == "adam":
    chex.assert_trees_all_equal(got, want)
  else:  # the clip norm's sum in another order (see test_kernel_per_shard_equals_one_device_kernel)
    chex.assert_trees_all_close(got, want, rtol=2.0**-23, atol=1e-2 * 2.0**-20)


@pytest.mark.parametrize("name", sorted(_GROUPED) + ["adam"])
def test_eager_init_replicates_step_counts_over_the_params_mesh(name):
  """Every leaf of an eager init on FSDP params is on their mesh: the counts replicated, not on one device."""
  tx = {**_GROUPED, "adam": lambda: jadam.adam(1e-2)}[name]()
  mesh = _mesh()
  params = jax.device_put(_table_params(), jax.tree.map(lambda p: _fsdp_sharding(mesh, p), _table_params()))
  state = tx.init(params)
  counts = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh, jax.tree_util.keystr(path)
    if not leaf.ndim:
      counts += 1
      assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
  assert counts
