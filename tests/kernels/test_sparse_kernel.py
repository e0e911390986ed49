"""The fused SparseAdam CPU kernel (jadam/_kernels/sparse_step.py): the generic sparse path's results, in one call.

The reference is the generic path run op by op (`tx.update` then `jadam.apply_updates`, not jitted): the kernel
rounds each operation as it does, so its bits are equal in float32 and float64. The jitted generic path
(`fused=False`) is XLA's, whose LLVM backend contracts some a * b + c into fused multiply-adds (which ones
depends on the shapes): against it, a few ulps.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.sparse import BCOO

import jadam
from jadam._kernels import build as _kernels

SHAPES = {"a": (40, 3), "b": (30, 2, 4)}  # two tables, one with a (V, ...) trailing shape
K = 10  # ids per step and table


@pytest.fixture(scope="module", autouse=True)
def _kernel():
  if not _kernels.load():
    pytest.skip(f"the kernel is unavailable here: {_kernels.error()}")


def _kernel_in(text):
  return "jadam_sparse_adam_f" in text


def _grads(rng, t, dtype, *, out_of_range=False):
  """One step's gradients: duplicates, padding (index V), rows 0-4 only every 10th step, the last two rows never,
  an empty gradient (k = 0) for "a" at step 5 and no gradient for "b" every 7th step."""
  out = {}
  for name, shape in SHAPES.items():
    if name == "b" and t % 7 == 3:
      out[name] = None
      continue
    k = 0 if (name == "a" and t == 5) else K
    ids = rng.integers(0 if t % 10 == 0 else 5, shape[0] - 2, size=k)
    if k:
      ids[1] = ids[0]  # a duplicate
      ids[2] = ids[0]
      ids[-1] = shape[0]  # padding
      if out_of_range:
        ids[-2], ids[-3] = -1, shape[0] + 7  # under jit: padding too
    vals = rng.normal(size=(k, *shape[1:]))
    out[name] = BCOO((jnp.asarray(vals, dtype), jnp.asarray(ids, jnp.int32)[:, None]), shape=shape)
  return out


def _as_padding(grads):
  """The gradients with every index outside [0, V) made V: what jit does with them, for the eager reference."""

  def one(g):
    if not isinstance(g, BCOO):
      return g
    rows = g.shape[0]
    i = g.indices
    return BCOO((g.data, jnp.where((i >= 0) & (i < rows), i, rows)), shape=g.shape)

  return jax.tree.map(one, grads, is_leaf=lambda x: x is None or isinstance(x, BCOO))


def _params(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.normal(size=shape), dtype) for name, shape in SHAPES.items()}


def _eager(tx, grads, state, params):
  """The generic path op by op."""
  updates, state = tx.update(_as_padding(grads), state, params)
  return jadam.apply_updates(params, updates), state


def _kernel_step(tx):
  return jax.jit(functools.partial(jadam.update_and_apply, tx, fused=True))


def _generic_step(tx):
  return jax.jit(functools.partial(jadam.update_and_apply, tx, fused=False))


def _assert_ulps(got, want, prev, ulps=4):
  """No element further than `ulps` ulps of the leaf's largest value (before or after) from the other."""
  for a, b, c in zip(*(jax.tree.leaves(x) for x in (got, want, prev)), strict=True):
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.size and jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(np.isnan(a), np.isnan(b))  # a NaN where the other has one (apply_if_finite)
      a, b, c = (np.where(np.isnan(x), 0, x) for x in (a, b, c))
      tol = ulps * np.spacing(max(np.max(np.abs(b)), np.max(np.abs(c))).astype(b.dtype))
      assert np.max(np.abs(a - b)) <= tol, (np.max(np.abs(a - b)), tol)
    else:
      np.testing.assert_array_equal(a, b)


def _run(tx, dtype, steps, *, out_of_range=True, seed=1, exact=True):
  """`steps` steps of the kernel, the eager generic path and the jitted generic path from the same start.

  `exact`: the eager path's bits; else (schedules, whose scalar arithmetic XLA may fold otherwise than the eager
  path does) a few ulps of it."""
  rng = np.random.default_rng(seed)
  params = _params(dtype)
  kernel, generic = _kernel_step(tx), _generic_step(tx)
  k_ps = e_ps = j_ps = params
  k_s = e_s = j_s = tx.init(params)
  assert _kernel_in(kernel.lower(_grads(rng, 1, dtype), k_s, k_ps).as_text())
  for t in range(steps):
    grads = _grads(rng, t, dtype, out_of_range=out_of_range)
    prev = (k_ps, k_s)
    k_ps, k_s = kernel(grads, k_s, k_ps)
    e_ps, e_s = _eager(tx, grads, e_s, e_ps)
    if exact:
      chex.assert_trees_all_equal((k_ps, k_s), (e_ps, e_s))  # bit for bit, state included
    else:
      _assert_ulps((k_ps, k_s), (e_ps, e_s), prev)
      e_ps, e_s = k_ps, k_s  # from the same point again
    j_ps, j_s = generic(grads, *jax.tree.map(jnp.copy, prev[::-1]))
    _assert_ulps((k_ps, k_s), (j_ps, j_s), prev)
  return params, k_ps, k_s


class SparseKernelTest(chex.TestCase):
  @pytest.mark.filterwarnings("ignore:Explicitly requested dtype")
  def test_bitwise_the_generic_path_float32_and_float64(self):
    for dtype in (jnp.float32, jnp.float64):
      with jax.enable_x64(dtype == jnp.float64):
        for maximize in (False, True):
          tx = jadam.sparse_adam(1e-2, maximize=maximize)
          params, new, state = _run(tx, dtype, 30)
          for name in SHAPES:  # rows never touched: their bits, in the table and the moments
            np.testing.assert_array_equal(np.asarray(new[name])[-2:], np.asarray(params[name])[-2:])
            assert not np.asarray(state[-4].mu[name])[-2:].any()
          assert int(state[-4].count["a"]) == 30  # the empty gradient counts, as torch's state["step"]
          assert int(state[-4].count["b"]) == 30 - sum(1 for t in range(30) if t % 7 == 3)

  def test_empty_gradient_changes_nothing_but_the_count(self):
    tx = jadam.sparse_adam(1e-2)
    params = _params(jnp.float32)
    grads = {name: BCOO((jnp.zeros((0, *s[1:])), jnp.zeros((0, 1), jnp.int32)), shape=s) for name, s in SHAPES.items()}
    state = tx.init(params)
    new, new_state = _kernel_step(tx)(grads, state, params)
    chex.assert_trees_all_equal(new, params)
    chex.assert_trees_all_equal(new_state[-4].mu, state[-4].mu)
    assert int(new_state[-4].count["a"]) == 1 and int(new_state[-1].count) == 1

  def test_unique_flagged_gradient_from_value_and_sparse_grad(self):
    params = {"t": jnp.asarray(np.random.default_rng(0).normal(size=(50, 4)), jnp.float32), "w": jnp.ones(4)}
    tx = optax.partition({"s": jadam.sparse_adam(1e-2), "d": jadam.adam(1e-2)}, {"t": "s", "w": "d"})

    def loss(params, ids, y):
      return jnp.sum((params["t"][ids["t"]] @ params["w"] - y) ** 2)

    f = jadam.value_and_sparse_grad(loss)
    step = jadam.make_train_step(f, tx)
    assert _kernel_in(step.lower(params, tx.init(params), {"t": jnp.zeros(6, jnp.int32)}, 1.0).as_text())
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    e_p, e_s = params, tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(8):
      ids = {"t": jnp.asarray(rng.integers(0, 50, size=6), jnp.int32)}
      _, grads = f(e_p, ids, 1.0)
      assert grads["t"].unique_indices
      p, s, _ = step(p, s, ids, 1.0)
      e_p, e_s = _eager(tx, grads, e_s, e_p)
      chex.assert_trees_all_equal((p, s), (e_p, e_s))

  def test_partition_with_dense_adam_and_torch_groups(self):
    params = {**_params(jnp.float32), "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    labels = {"a": "sparse", "b": "sparse", "w": "dense"}
    txs = [
      optax.partition({"sparse": jadam.sparse_adam(1e-2), "dense": jadam.adam(1e-2)}, labels),
      optax.partition(
        {
          "sparse": jadam.torch.SparseAdam([{"params": "b", "lr": 3e-2, "betas": (0.8, 0.99)}], lr=1e-2),
          "dense": jadam.torch.AdamW(lr=1e-2),
        },
        labels,
      ),
    ]
    for tx in txs:
      rng = np.random.default_rng(2)
      kernel = _kernel_step(tx)
      k_p = e_p = params
      k_s = e_s = tx.init(params)
      for t in range(6):
        grads = {**_grads(rng, t, jnp.float32), "w": jnp.sin(k_p["w"] * (t + 1))}
        if t == 0:
          text = kernel.lower(grads, k_s, k_p).as_text()
          assert _kernel_in(text) and "jadam_adam_f32" in text  # both kernels in one step
        k_p, k_s = kernel(grads, k_s, k_p)
        e_p, e_s = _eager(tx, grads, e_s, e_p)
        chex.assert_trees_all_equal((k_p, k_s), (e_p, e_s))

  def test_schedules_and_inject_hyperparams(self):
    txs = [
      jadam.sparse_adam(optax.linear_schedule(1e-2, 1e-3, 10), b1=optax.linear_schedule(0.8, 0.9, 5), eps=1e-6),
      optax.inject_hyperparams(jadam.sparse_adam)(learning_rate=optax.linear_schedule(1e-2, 1e-3, 20), b2=0.99),
      jadam.torch.SparseAdam(lr=1e-2),
    ]
    for tx, exact in zip(txs, (False, False, True), strict=True):
      _run(tx, jnp.float32, 8, out_of_range=False, seed=3, exact=exact)

  def test_apply_if_finite_rejects_and_accepts_as_the_generic_path(self):
    tx = optax.apply_if_finite(jadam.sparse_adam(1e-2), max_consecutive_errors=1)
    params, state = _params(jnp.float32), tx.init(_params(jnp.float32))
    kernel = _kernel_step(tx)
    rng = np.random.default_rng(4)
    e_p, e_s = params, state
    for t in range(5):
      grads = _grads(rng, t, jnp.float32)
      if t in (1, 2, 4):  # a NaN: rejected at 1 and 4; at 2 the second in a row, accepted
        grads["a"] = BCOO((grads["a"].data.at[3, 0].set(jnp.nan), grads["a"].indices), shape=SHAPES["a"])
      new, new_state = kernel(grads, state, params)
      # optax.apply_if_finite runs its inner update in a lax.cond, compiled as XLA compiles it: a few ulps
      e_p, e_s = _eager(tx, grads, state, params)
      _assert_ulps((new, new_state), (e_p, e_s), (params, state))
      chex.assert_trees_all_equal(new_state.inner_state[0].count, e_s.inner_state[0].count)
      chex.assert_trees_all_equal(new_state._replace(inner_state=None), e_s._replace(inner_state=None))
      if t in (1, 4):  # rejected: everything as it was, bit for bit
        chex.assert_trees_all_equal((new, new_state.inner_state), (params, state.inner_state))
      params, state = new, new_state
    assert int(state.total_notfinite) == 3

  def test_donated_step_writes_in_place(self):
    tx = jadam.sparse_adam(1e-3)
    step = jadam.make_update_step(tx)
    added = []
    for rows in (10_000, 200_000):
      params = {"t": jax.ShapeDtypeStruct((rows, 64), jnp.float32)}
      grads = jax.eval_shape(
        lambda r=rows: {"t": BCOO((jnp.zeros((256, 64)), jnp.zeros((256, 1), jnp.int32)), shape=(r, 64))}
      )
      compiled = step.lower(params, jax.eval_shape(tx.init, params), grads).compile()
      text = compiled.as_text()
      assert 'custom_call_target="jadam_sparse_adam_f32"' in text and " copy(" not in text
      mem = compiled.memory_analysis()
      if mem is not None:
        added.append(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    if added:
      assert added[0] == added[1] and added[0] < 256 * 64 * 4, added  # no (V, d) buffer: O(k d) at most
    params = {"t": jnp.zeros((1000, 64))}
    state = tx.init(params)
    before = [x.unsafe_buffer_pointer() for x in (params["t"], state[0].mu["t"], state[0].nu["t"])]
    g = {"t": BCOO((jnp.ones((5, 64)), jnp.arange(5)[:, None]), shape=(1000, 64))}
    params, state = step(params, state, g)
    after = [x.unsafe_buffer_pointer() for x in (params["t"], state[0].mu["t"], state[0].nu["t"])]
    assert after == before  # the donated buffers themselves, updated in place

  def test_unserved_chains_take_the_generic_path(self):
    params = {**_params(jnp.float32), "w": jnp.ones(3)}
    grads = {**_grads(np.random.default_rng(5), 1, jnp.float32), "w": jnp.ones(3)}
    not_sparse_adam = optax.chain(
      jadam.scale_by_sparse_moments(),
      jadam.rowwise(jadam.bias_correct()),
      jadam.rowwise(jadam.normalize()),
      jadam.scale_by_lr(1e-2),
    )
    labels = {"a": "s", "b": "s", "w": "d"}
    for tx, why in [
      (optax.partition({"s": not_sparse_adam, "d": jadam.adam(1e-2)}, labels), r"bias_correct\(into_step=True\)"),
      (optax.partition({"s": jadam.sparse_adam(1e-2), "d": optax.sgd(1e-2)}, labels), "scale_by_lr"),
    ]:
      want = _generic_step(tx)(grads, tx.init(params), params)
      got = jax.jit(functools.partial(jadam.update_and_apply, tx))(grads, tx.init(params), params)
      chex.assert_trees_all_equal(got, want)
      with pytest.raises(ValueError, match=why):
        _kernel_step(tx)(grads, tx.init(params), params)

  def test_errors_are_the_generic_paths(self):
    tx = jadam.sparse_adam(1e-2)
    params = {"t": jnp.zeros((10, 2))}
    state = tx.init(params)
    with pytest.raises(TypeError, match="SparseAdam does not support dense gradients"):
      jadam.update_and_apply(tx, {"t": jnp.ones((10, 2))}, state, params, fused=True)
    with pytest.raises(ValueError, match="out of range"):
      jadam.update_and_apply(tx, {"t": BCOO((jnp.ones((1, 2)), jnp.array([[11]])), shape=(10, 2))}, state, params)

  def test_ids_beyond_int32_are_padding_in_the_kernel_and_its_lowering(self):
    # int64 ids 2**32 + 3 and -2**32 + 5 would narrow to rows 3 and 5: the kernel and the XLA lowering drop them
    with jax.enable_x64(True):
      tx = jadam.sparse_adam(1e-2)
      params = {"t": jnp.zeros((10, 2), jnp.float32)}
      state = tx.init(params)
      ids = jnp.asarray([[1], [2**32 + 3], [-(2**32) + 5]], jnp.int64)
      grads = {"t": BCOO((jnp.ones((3, 2), jnp.float32), ids), shape=(10, 2))}
      step = _kernel_step(tx)
      assert _kernel_in(step.lower(grads, state, params).as_text())
      exported = jax.export.export(step, platforms=("cpu",))(grads, state, params)
      for run in (step, exported.call):
        p, s = run(grads, state, params)
        assert np.flatnonzero(np.asarray(p["t"]).any(axis=1)).tolist() == [1]
        assert np.flatnonzero(np.asarray(s[-4].nu["t"]).any(axis=1)).tolist() == [1]

  def test_export_is_pure_xla_and_agrees(self):
    tx = jadam.sparse_adam(1e-2, maximize=True)
    params = _params(jnp.float32)
    step = _kernel_step(tx)
    rng = np.random.default_rng(6)
    state = tx.init(params)
    for t in range(3):  # moments not zero, so that the arithmetic is all exercised
      params, state = step(_grads(rng, t, jnp.float32), state, params)
    grads = _grads(rng, 3, jnp.float32, out_of_range=True)
    for platforms in [("cpu",), ("cuda", "tpu")]:
      exp = jax.export.export(step, platforms=platforms)(grads, state, params)
      calls = [line for line in exp.mlir_module().splitlines() if "stablehlo.custom_call" in line]
      assert not [c for c in calls if "jadam" in c], calls[:2]
    exported = jax.export.export(step, platforms=("cpu",))(grads, state, params)
    _assert_ulps(exported.call(grads, state, params), step(grads, state, params), (params, state))
