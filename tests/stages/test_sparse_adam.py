"""jadam.sparse_adam and jadam.torch.SparseAdam against the live torch.optim.SparseAdam; the sparse paths."""

from __future__ import annotations

import functools
import pathlib
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.sparse import BCOO

import jadam

torch = pytest.importorskip("torch")

STEPS = 50
SHAPES = {"a": (20, 3), "b": (30, 2, 4)}  # two tables of different widths, one with a (V, ...) trailing shape
K = 8  # ids per step and table, at most
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _schedule(seed: int = 0, steps: int = STEPS):
  """Per step and table: (ids, values) or None (no gradient), with duplicates, rows absent for many steps, k=0."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    step = {}
    for name, shape in SHAPES.items():
      if name == "b" and t % 7 == 3:
        step[name] = None  # no gradient this step: torch's p.grad is None
        continue
      if name == "a" and t == 11:
        k = 0  # an empty gradient
      else:
        k = int(rng.integers(1, K + 1))
      # rows 0-4 only on every 10th step; the last two rows never
      high = shape[0] - 2
      low = 0 if t % 10 == 0 else 5
      ids = rng.integers(low, high, size=k)
      if k > 2:
        ids[1] = ids[0]  # a duplicate
      step[name] = (ids, rng.normal(size=(k, *shape[1:])))
    out.append(step)
  return out


def _padded(g, shape, width=K):
  """jadam's side of a step: `width` entries, the unused ones padding (index V), so that `jit` compiles once."""
  if g is None:
    return None
  ids, vals = g
  pad = width - len(ids)
  return np.concatenate([ids, np.full(pad, shape[0])]), np.concatenate([vals, np.zeros((pad, *shape[1:]))])


def _init(dtype):
  rng = np.random.default_rng(42)
  return {name: rng.normal(size=shape).astype(dtype) for name, shape in SHAPES.items()}


def _torch_run(init, schedule, groups=None, *, maximize=False, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
  params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  if groups is None:
    opt = torch.optim.SparseAdam(list(params.values()), lr=lr, betas=betas, eps=eps, maximize=maximize)
  else:
    opt = torch.optim.SparseAdam(
      [{"params": [params[k] for k in names], **hp} for names, hp in groups], lr=lr, betas=betas, eps=eps
    )
  traj = []
  for step in schedule:
    for name, p in params.items():
      g = step[name]
      if g is None:
        p.grad = None
      else:
        ids, vals = g
        p.grad = torch.sparse_coo_tensor(
          torch.tensor(ids, dtype=torch.int64)[None], torch.tensor(vals, dtype=p.dtype), p.shape
        )
    opt.step()
    traj.append({k: p.detach().numpy().copy() for k, p in params.items()})
  return traj


def _bcoo(g, shape, dtype):
  if g is None:
    return None
  ids, vals = g
  return BCOO((jnp.asarray(vals, dtype), jnp.asarray(ids, jnp.int32)[:, None]), shape=shape)


def _jadam_run(tx, init, schedule, step_fn):
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)
  traj = []
  for step in schedule:
    grads = {k: _bcoo(_padded(step[k], SHAPES[k]), SHAPES[k], init[k].dtype) for k in SHAPES}
    params, state = step_fn(tx, grads, state, params)
    traj.append({k: np.asarray(v) for k, v in params.items()})
  return traj, state


def _max_rel(a, b):
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


class SparseAdamTorchTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_float64_matches_torch(self):
    self._float64(maximize=False)

  @chex.variants(with_jit=True)
  def test_float64_maximize_matches_torch(self):
    self._float64(maximize=True)

  def _float64(self, maximize):
    with jax.enable_x64(True):
      init, schedule = _init(np.float64), _schedule(1)
      tx = jadam.sparse_adam(1e-2, maximize=maximize)
      step = self.variant(lambda tx_, g, s, p: jadam.update_and_apply(tx_, g, s, p), static_argnums=0)
      ours, state = _jadam_run(tx, init, schedule, step)
      ref = _torch_run(init, schedule, maximize=maximize)
      for t, (o, r) in enumerate(zip(ours, ref, strict=True)):
        for k in SHAPES:
          assert _max_rel(o[k], r[k]) <= 1e-12, (t, k, _max_rel(o[k], r[k]))
      # the last two rows of each table never had a gradient: bit-identical to the start
      for k in SHAPES:
        np.testing.assert_array_equal(ours[-1][k][-2:], init[k][-2:])
      # torch's state["step"]: steps with a gradient, the empty one included
      counts = next(x for x in state if isinstance(x, jadam.ScaleBySparseMomentsState)).count
      assert int(counts["a"]) == STEPS and int(counts["b"]) == STEPS - sum(1 for t in range(STEPS) if t % 7 == 3)

  def test_float32_within_ulps_of_torch(self):
    init, schedule = _init(np.float32), _schedule(2)
    tx = jadam.sparse_adam(1e-2)
    ours, _ = _jadam_run(tx, init, schedule, jax.jit(jadam.update_and_apply, static_argnums=0))
    ref = _torch_run(init, schedule)
    for k in SHAPES:
      ulps = np.abs(ours[-1][k] - ref[-1][k]) / np.spacing(np.abs(ref[-1][k]).astype(np.float32))
      assert ulps.max() <= 16, (k, ulps.max())  # after 50 steps; torch folds lr into one double step size
      np.testing.assert_array_equal(ours[-1][k][-2:], init[k][-2:])

  def test_groups_match_torch(self):
    with jax.enable_x64(True):
      init, schedule = _init(np.float64), _schedule(3)
      tx = jadam.torch.SparseAdam([{"params": "b", "lr": 3e-2, "betas": (0.8, 0.99)}], lr=1e-2)
      ours, _ = _jadam_run(tx, init, schedule, jadam.update_and_apply)
      ref = _torch_run(init, schedule, groups=[(["a"], {}), (["b"], {"lr": 3e-2, "betas": (0.8, 0.99)})])
      for k in SHAPES:
        assert _max_rel(ours[-1][k], ref[-1][k]) <= 1e-12

  def test_sparse_table_next_to_dense_adam_matches_torch(self):
    """One step for a table (SparseAdam) and a dense layer (AdamW), as torch users run two optimizers."""
    with jax.enable_x64(True):
      rng = np.random.default_rng(5)
      table0, w0 = rng.normal(size=(40, 4)), rng.normal(size=(4, 3))
      tx = optax.partition(
        {"sparse": jadam.torch.SparseAdam(lr=1e-2), "dense": jadam.torch.AdamW(lr=1e-2)},
        {"table": "sparse", "w": "dense"},
      )
      params = {"table": jnp.asarray(table0), "w": jnp.asarray(w0)}
      state = tx.init(params)
      tt = torch.nn.Parameter(torch.tensor(table0))
      tw = torch.nn.Parameter(torch.tensor(w0))
      opts = [torch.optim.SparseAdam([tt], lr=1e-2), torch.optim.AdamW([tw], lr=1e-2)]
      step = jax.jit(lambda p, s, g: jadam.update_and_apply(tx, g, s, p))
      for _ in range(50):
        ids = rng.integers(0, 30, size=6)
        gt, gw = rng.normal(size=(6, 4)), rng.normal(size=(4, 3))
        grads = {"table": BCOO((jnp.asarray(gt), jnp.asarray(ids, jnp.int32)[:, None]), shape=(40, 4)), "w": gw}
        params, state = step(params, state, grads)
        tt.grad = torch.sparse_coo_tensor(torch.tensor(ids)[None], torch.tensor(gt), (40, 4))
        tw.grad = torch.tensor(gw)
        for o in opts:
          o.step()
      assert _max_rel(np.asarray(params["table"]), tt.detach().numpy()) <= 1e-12
      assert _max_rel(np.asarray(params["w"]), tw.detach().numpy()) <= 1e-12
      np.testing.assert_array_equal(np.asarray(params["table"])[30:], table0[30:])


class SparsePathsTest(chex.TestCase):
  def _problem(self, k=5, rows=50):
    rng = np.random.default_rng(0)
    params = {"t": jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32), "n": jnp.arange(3)}
    ids = jnp.asarray(rng.integers(0, rows, size=k), jnp.int32)
    grads = {"t": BCOO((jnp.asarray(rng.normal(size=(k, 3)), jnp.float32), ids[:, None]), shape=(rows, 3)), "n": None}
    return params, grads

  def test_every_apply_path_gives_the_same_bits(self):
    params, grads = self._problem()
    tx = jadam.sparse_adam(1e-2)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    a = optax.apply_updates({"t": params["t"]}, {"t": updates["t"]})["t"]  # by way of BCOO.todense: O(V d)
    b = jadam.apply_updates(params, updates)["t"]
    c = jadam.update_and_apply(tx, grads, state, params)[0]["t"]
    copy = jax.tree.map(jnp.copy, (params, state))
    d = jadam.make_update_step(tx)(*copy, grads)[0]["t"]
    for x in (a, b, c):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(d))

  def test_empty_gradient_changes_nothing_but_the_count(self):
    params, _ = self._problem()
    tx = jadam.sparse_adam(1e-2)
    state = tx.init(params)
    grads = {"t": BCOO((jnp.zeros((0, 3)), jnp.zeros((0, 1), jnp.int32)), shape=(50, 3)), "n": None}
    new_params, new_state = jadam.update_and_apply(tx, grads, state, params)
    chex.assert_trees_all_equal(new_params, params)
    chex.assert_trees_all_equal(new_state[0].mu, state[0].mu)
    assert int(new_state[0].count["t"]) == 1  # torch increments state["step"] before skipping an empty grad

  def test_schedule_inject_hyperparams_checkpoint_apply_if_finite(self):
    params, grads = self._problem()
    params, grads = {"t": params["t"]}, {"t": grads["t"]}
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    txs = [
      jadam.sparse_adam(sched),
      optax.inject_hyperparams(jadam.sparse_adam)(learning_rate=1e-2),
      optax.apply_if_finite(jadam.sparse_adam(1e-2), 3),
    ]
    for tx in txs:
      state = tx.init(params)
      step = jadam.make_update_step(tx, donate=False)
      p, s = step(params, state, grads)
      p, s = step(p, s, grads)
      ref_p, _ = jadam.update_and_apply(tx, grads, *jadam.update_and_apply(tx, grads, state, params)[::-1])
      np.testing.assert_array_equal(np.asarray(p["t"]), np.asarray(ref_p["t"]))
    # a non-finite gradient is skipped by apply_if_finite, the table is untouched
    bad = {"t": BCOO((grads["t"].data.at[0, 0].set(jnp.nan), grads["t"].indices), shape=(50, 3))}
    p2, s2 = jadam.update_and_apply(txs[2], bad, txs[2].init(params), params)
    np.testing.assert_array_equal(np.asarray(p2["t"]), np.asarray(params["t"]))
    assert int(s2.notfinite_count) == 1
    # save and restore the state
    tx = jadam.sparse_adam(1e-2)
    p, s = jadam.update_and_apply(tx, grads, tx.init(params), params)
    pytest.importorskip("orbax.checkpoint")
    tmp_path = pathlib.Path(tempfile.mkdtemp())
    jadam.save_state(tmp_path / "ckpt", s)
    restored = jadam.restore_state(tmp_path / "ckpt", tx.init(params))
    chex.assert_trees_all_equal(restored, s)

  def test_in_place_memory_does_not_grow_with_the_table(self):
    tx = jadam.sparse_adam(1e-3)
    temp = []
    for rows in (10_000, 200_000):
      params = {"t": jax.ShapeDtypeStruct((rows, 64), jnp.float32)}
      grads = {"t": BCOO((jnp.zeros((256, 64)), jnp.zeros((256, 1), jnp.int32)), shape=(rows, 64))}
      grads = jax.eval_shape(lambda grads=grads: grads)
      compiled = jadam.make_update_step(tx).lower(params, jax.eval_shape(tx.init, params), grads).compile()
      mem = compiled.memory_analysis()
      if mem is None:
        pytest.skip("no memory analysis on this backend")
      temp.append(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    assert temp[1] == temp[0], temp  # what a step adds is O(k d): no (V, d) temporary, outputs aliased
    assert temp[0] < 10_000 * 64 * 4


class BadInputTest(chex.TestCase):
  def setUp(self):
    super().setUp()
    self.tx = jadam.sparse_adam(1e-2)
    self.params = {"t": jnp.zeros((10, 2))}
    self.state = self.tx.init(self.params)

  def _grad(self, ids, shape=(10, 2)):
    ids = jnp.asarray(ids)
    return {"t": BCOO((jnp.ones((ids.shape[0], 2)), ids[:, None]), shape=shape)}

  def test_dense_gradient_is_refused_with_torchs_words(self):
    with pytest.raises(TypeError, match="SparseAdam does not support dense gradients, please consider Adam instead"):
      self.tx.update({"t": jnp.ones((10, 2))}, self.state, self.params)

  def test_element_sparse_gradient_is_refused(self):
    with pytest.raises(TypeError, match="one sparse dimension"):
      self.tx.update({"t": BCOO.fromdense(jnp.ones((10, 2)))}, self.state, self.params)

  def test_out_of_range_indices_raise_eagerly_and_are_dropped_under_jit(self):
    for bad in ([1, 11], [-1, 2]):
      with pytest.raises(ValueError, match="out of range"):
        self.tx.update(self._grad(bad), self.state, self.params)
    # index V is padding: allowed eagerly; under jit every index outside [0, V) is padding
    p, _ = jadam.update_and_apply(self.tx, self._grad([1, 10]), self.state, self.params)
    assert np.count_nonzero(np.asarray(p["t"]).any(axis=1)) == 1
    p, _ = jax.jit(lambda g: jadam.update_and_apply(self.tx, g, self.state, self.params))(self._grad([1, 11, -1]))
    changed = np.flatnonzero(np.asarray(p["t"]).any(axis=1))
    assert changed.tolist() == [1]  # -1 did not wrap to the last row

  def test_ids_beyond_int32_never_change_a_row(self):
    # int64 ids 2**32 + 3 and -2**32 + 5 narrow to rows 3 and 5 in int32: the range is checked before narrowing
    with jax.enable_x64(True):
      params = {"t": jnp.zeros((10, 2), jnp.float32)}
      state = self.tx.init(params)
      ids = jnp.asarray([[1], [2**32 + 3], [-(2**32) + 5]], jnp.int64)
      grad = {"t": BCOO((jnp.ones((3, 2), jnp.float32), ids), shape=(10, 2))}
      with pytest.raises(ValueError, match="out of range"):
        jadam.update_and_apply(self.tx, grad, state, params)
      for fused in (False, True):
        p, s = jax.jit(functools.partial(jadam.update_and_apply, self.tx, fused=fused))(grad, state, params)
        assert np.flatnonzero(np.asarray(p["t"]).any(axis=1)).tolist() == [1], fused
        assert np.flatnonzero(np.asarray(s[0].nu["t"]).any(axis=1)).tolist() == [1], fused
      p = jax.jit(jadam.apply_updates)(params, grad)  # the scatter alone
      assert np.flatnonzero(np.asarray(p["t"]).any(axis=1)).tolist() == [1]

  def test_mismatched_table_shape(self):
    with pytest.raises(ValueError, match=r"shape \(12, 2\).*shape \(10, 2\)"):
      self.tx.update(self._grad([1], shape=(12, 2)), self.state, self.params)

  def test_non_integer_indices(self):
    g = self._grad([1, 2])["t"]
    g = jax.tree_util.tree_unflatten(jax.tree.structure(g), [g.data, g.indices.astype(jnp.float32)])
    with pytest.raises(TypeError, match="indices .* must be integers"):
      self.tx.update({"t": g}, self.state, self.params)

  def test_torch_front_door_checks(self):
    for kw, msg in [
      ({"lr": 0.0}, "Invalid learning rate: 0.0"),
      ({"lr": -1.0}, "Invalid learning rate: -1.0"),
      ({"eps": 0.0}, "Invalid epsilon value: 0.0"),
      ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0: 1.0"),
      ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ]:
      with pytest.raises(ValueError, match=msg):
        jadam.torch.SparseAdam(**kw)
      with pytest.raises(ValueError, match=msg):
        torch.optim.SparseAdam([torch.nn.Parameter(torch.zeros(2))], **kw)


class ValueAndSparseGradTest(chex.TestCase):
  def _model(self, vocab):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
      def __init__(self):
        self.embed = nnx.Embed(vocab, 8, rngs=nnx.Rngs(0))
        self.out = nnx.Linear(8, 1, rngs=nnx.Rngs(1))

      def __call__(self, ids):
        return self.out(self.embed(ids).mean(axis=1))[:, 0]

    return nnx, Model()

  @chex.variants(with_jit=True, without_jit=True)
  def test_nnx_embed_gradient_equals_the_dense_one(self):
    nnx, model = self._model(100)
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.array([[3, 5, 3], [7, 3, 99]])
    y = jnp.array([1.0, -1.0])

    def loss(params, ids, y):
      return jnp.mean((nnx.merge(graphdef, params)(ids["embed/embedding"]) - y) ** 2)

    value, grads = self.variant(jadam.value_and_sparse_grad(loss))(params, {"embed/embedding": ids}, y)
    dense_value, dense = jax.value_and_grad(lambda p: loss(p, {"embed/embedding": ids}, y))(params)
    np.testing.assert_allclose(value, dense_value, rtol=1e-6)
    g = grads["embed"]["embedding"].get_value()
    assert isinstance(g, BCOO) and g.shape == (100, 8) and g.nse == ids.size
    np.testing.assert_allclose(g.todense(), dense["embed"]["embedding"].get_value(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["out"]["kernel"].get_value(), dense["out"]["kernel"].get_value(), rtol=1e-5)

  def test_out_of_range_ids_are_padding_in_the_value_and_the_gradient(self):
    # under jit an id outside [0, V) (-1, V + 2, and an int64 2**32 + 3) reads a row of zeros and gets no gradient,
    # so the loss and its gradient describe the same function; outside jit it raises, as sparse_adam does
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=3), jnp.float32)

    def loss(params, ids):
      return jnp.sum(jnp.tanh(params["t"][ids["t"]] @ params["w"]) ** 2)

    def reference(params, ids):  # the rows read as zeros where the id is out of range
      valid = (ids >= 0) & (ids < 6)
      rows = jnp.where(valid[:, None], params["t"][np.where(valid, ids, 0)], 0.0)
      return jnp.sum(jnp.tanh(rows @ params["w"]) ** 2)

    f = jadam.value_and_sparse_grad(loss)
    with jax.enable_x64(True):
      for ids in ([0, -1, 2, 2], [5, 8, 1, -6], [2**32 + 3, 3, 6]):
        ids = np.asarray(ids, np.int64)
        want, want_g = jax.value_and_grad(reference)({"t": table, "w": w}, ids)
        value, grads = jax.jit(f)({"t": table, "w": w}, {"t": jnp.asarray(ids)})
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(grads["t"].todense(), want_g["t"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads["w"], want_g["w"], rtol=1e-5, atol=1e-7)
        with pytest.raises(ValueError, match="out of range"):
          f({"t": table, "w": w}, {"t": jnp.asarray(ids)})

  def test_never_materialises_the_dense_gradient(self):
    nnx, model = self._model(123_457)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, ids):
      return jnp.sum(nnx.merge(graphdef, params)(ids["embed/embedding"]))

    f = jadam.value_and_sparse_grad(loss)
    jaxpr = jax.make_jaxpr(f)(params, {"embed/embedding": jnp.zeros((4, 3), jnp.int32)})
    shapes = [v.aval.shape for e in jaxpr.eqns for v in e.outvars if hasattr(v.aval, "shape")]
    assert (123_457, 8) not in shapes

  def test_make_train_step_takes_value_and_sparse_grad(self):
    nnx, model = self._model(40)
    graphdef, params = nnx.split(model, nnx.Param)
    labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "table" if jadam.torch.path_string(p) == "embed/embedding" else "rest", params
    )
    tx = optax.partition({"table": jadam.sparse_adam(1e-2), "rest": jadam.adam(1e-2)}, labels)

    def loss(params, ids, y):
      return jnp.mean((nnx.merge(graphdef, params)(ids["embed/embedding"]) - y) ** 2)

    grad_fn = jadam.value_and_sparse_grad(loss)
    ids = {"embed/embedding": jnp.array([[1, 2, 1], [5, 1, 7]])}
    y = jnp.array([1.0, -1.0])
    state = tx.init(params)
    expected = jadam.update_and_apply(tx, grad_fn(params, ids, y)[1], state, params)[0]
    step = jadam.make_train_step(grad_fn, tx)
    new_params, state, value = step(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), ids, y)
    chex.assert_trees_all_close(new_params, expected, rtol=1e-6)
    table = np.asarray(new_params["embed"]["embedding"].get_value())
    np.testing.assert_array_equal(table[8:], np.asarray(params["embed"]["embedding"].get_value())[8:])
    losses = [float(value)]
    for _ in range(10):  # trains: SparseAdam for the table, Adam for the rest, one donated jit
      new_params, state, value = step(new_params, state, ids, y)
      losses.append(float(value))
    assert losses[-1] < 0.75 * losses[0]  # 0.92 -> 0.56 here
    with pytest.raises(ValueError, match="has_aux"):
      jadam.make_train_step(grad_fn, tx, has_aux=True)
