"""jadam.torch.SGD and jadam.torch.Adagrad given row-sparse (`BCOO`) gradients, against live torch, float64.

PyTorch's rules: SGD without momentum adds the sparse gradient to its rows; with momentum its buffer holds
every row any step touched (torch keeps it as an uncoalesced sparse tensor; jadam as a dense array, the
same numbers); Adagrad adds the squares at the coalesced rows only and steps those rows. Both refuse a
nonzero weight_decay with a sparse gradient.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental.sparse import BCOO

import jadam

torch = pytest.importorskip("torch")

STEPS = 12
SHAPES = {"a": (12, 3), "b": (15, 2, 4)}  # two tables, one with a (V, ...) trailing shape
K = 6  # entries per step and table, at most; jadam pads the rest with index V
# Both libraries take the same IEEE operations per row; the order in which duplicates are summed (and,
# for torch's uncoalesced momentum buffer, the grouping of the scaled entries) differs, a few ulps per step.
TOL = 1e-12
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _schedule(seed: int = 0):
  """Per step and table: (ids, values), with duplicates, rows absent for many steps, and one empty gradient."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(STEPS):
    step = {}
    for name, shape in SHAPES.items():
      k = 0 if (name == "a" and t == 5) else int(rng.integers(1, K + 1))
      high = shape[0] - 2  # the last two rows never
      low = 0 if t % 4 == 0 else 4  # rows 0-3 only on every 4th step
      ids = rng.integers(low, high, size=k)
      if k > 2:
        ids[1] = ids[0]  # a duplicate
      step[name] = (ids, rng.normal(size=(k, *shape[1:])))
    step["w"] = rng.normal(size=3)  # a dense leaf beside the tables
    out.append(step)
  return out


def _params0():
  rng = np.random.default_rng(1)
  return {**{n: rng.normal(size=s) for n, s in SHAPES.items()}, "w": rng.normal(size=3)}


def _torch_run(name, kwargs):
  p0 = _params0()
  ps = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
  opt = getattr(torch.optim, name)(list(ps.values()), **kwargs)
  out = []
  for step in _schedule():
    for n, shape in SHAPES.items():
      ids, vals = step[n]
      ps[n].grad = torch.sparse_coo_tensor(
        torch.tensor(ids, dtype=torch.int64)[None], torch.tensor(vals, dtype=torch.float64), shape
      )
    ps["w"].grad = torch.tensor(step["w"], dtype=torch.float64)
    opt.step()
    out.append({k: v.detach().numpy().copy() for k, v in ps.items()})
  return out


def _grads(step):
  """jadam's gradients of a step: a BCOO of K entries per table (the unused ones padding, index V)."""
  out = {}
  for n, shape in SHAPES.items():
    ids, vals = step[n]
    pad = K - len(ids)
    ids = np.concatenate([ids, np.full(pad, shape[0])]).astype(np.int32)
    vals = np.concatenate([vals, np.ones((pad, *shape[1:]))])  # padding's values are never read
    out[n] = BCOO((jnp.asarray(vals), jnp.asarray(ids)[:, None]), shape=shape)
  out["w"] = jnp.asarray(step["w"])
  return out


CASES = [
  ("sgd", "SGD", dict(lr=0.1)),
  ("sgd_maximize", "SGD", dict(lr=0.05, maximize=True)),
  ("sgd_momentum", "SGD", dict(lr=0.1, momentum=0.9)),
  ("sgd_dampening", "SGD", dict(lr=0.1, momentum=0.8, dampening=0.3)),
  ("sgd_nesterov", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
  ("adagrad", "Adagrad", dict(lr=0.1)),
  ("adagrad_decay", "Adagrad", dict(lr=0.2, lr_decay=0.1, initial_accumulator_value=0.5, eps=1e-6)),
  ("adagrad_maximize", "Adagrad", dict(lr=0.05, maximize=True)),
]


class SparseSgdAdagradTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*CASES)
  def test_matches_torch_float64(self, name, kwargs):
    want = _torch_run(name, kwargs)
    with jax.enable_x64(True):
      tx = getattr(jadam.torch, name)(**kwargs)
      params = {k: jnp.asarray(v) for k, v in _params0().items()}
      state = tx.init(params)

      def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return jadam.apply_updates(params, updates), state

      step = self.variant(step)
      for t, s in enumerate(_schedule()):
        params, state = step(params, state, _grads(s))
        for k, w in want[t].items():
          err = np.max(np.abs(np.asarray(params[k]) - w)) / np.max(np.abs(w))
          assert err <= TOL, (t, k, err)

  def test_updates_stay_row_sparse_without_momentum(self):
    """SGD without momentum and Adagrad pass row-sparse updates on: O(k d) per table, not O(V d)."""
    with jax.enable_x64(True):
      params = {k: jnp.asarray(v) for k, v in _params0().items()}
      for tx in (jadam.torch.SGD(lr=0.1), jadam.torch.Adagrad(lr=0.1), jadam.sgd(0.1, momentum=0.0)):
        updates, _ = tx.update(_grads(_schedule()[0]), tx.init(params), params)
        assert isinstance(updates["a"], BCOO) and isinstance(updates["b"], BCOO)
        assert not isinstance(updates["w"], BCOO)
      tx = jadam.torch.SGD(lr=0.1, momentum=0.9)
      updates, _ = tx.update(_grads(_schedule()[0]), tx.init(params), params)
      assert not isinstance(updates["a"], BCOO)  # the buffer holds every row touched so far

  def test_adagrad_untouched_rows_keep_their_sums(self):
    with jax.enable_x64(True):
      params = {k: jnp.asarray(v) for k, v in _params0().items()}
      tx = jadam.torch.Adagrad(lr=0.1, initial_accumulator_value=0.25)
      grads = _grads(_schedule()[1])  # rows 4..9 of "a" at most
      _, state = tx.update(grads, tx.init(params), params)
      sums = next(
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, jadam.AccumulateSquaresState))
        if isinstance(s, jadam.AccumulateSquaresState)
      ).sum_of_squares
      touched = set(np.asarray(grads["a"].indices[:, 0]).tolist()) - {SHAPES["a"][0]}
      for r in range(SHAPES["a"][0]):
        if r not in touched:
          np.testing.assert_array_equal(np.asarray(sums["a"][r]), 0.25)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_weight_decay_with_sparse_gradients_is_refused_as_in_torch(name):
  p = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
  opt = getattr(torch.optim, name)([p], lr=0.1, weight_decay=0.1)
  p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2, dtype=torch.float64), (4, 2))
  with pytest.raises(RuntimeError):
    opt.step()
  tx = getattr(jadam.torch, name)(lr=0.1, weight_decay=0.1)
  params = {"t": jnp.zeros((4, 2))}
  grads = {"t": BCOO((jnp.ones((1, 2)), jnp.array([[1]])), shape=(4, 2))}
  with pytest.raises(ValueError, match="weight_decay is not compatible with sparse gradients"):
    tx.update(grads, tx.init(params), params)


def test_sparse_gradient_of_another_shape_is_refused():
  tx = jadam.torch.Adagrad(lr=0.1)
  params = {"t": jnp.zeros((4, 2))}
  grads = {"t": BCOO((jnp.ones((1, 2)), jnp.array([[1]])), shape=(5, 2))}
  with pytest.raises(ValueError):
    tx.update(grads, tx.init(params), params)


def test_embedding_gradients_from_value_and_sparse_grad_match_torch_embedding():
  """An embedding lookup differentiated by jadam.value_and_sparse_grad, stepped by Adagrad, as torch's
  nn.Embedding(sparse=True) with torch.optim.Adagrad."""
  V, d, ids = 10, 3, np.array([[1, 4, 1], [7, 4, 0]])
  rng = np.random.default_rng(3)
  table0, y = rng.normal(size=(V, d)), rng.normal(size=(2, 3))
  emb = torch.nn.Embedding(V, d, sparse=True, dtype=torch.float64)
  with torch.no_grad():
    emb.weight.copy_(torch.tensor(table0))
  opt = torch.optim.Adagrad(emb.parameters(), lr=0.3, lr_decay=0.05)
  for _ in range(5):
    opt.zero_grad()
    loss = ((emb(torch.tensor(ids)).sum(-1) - torch.tensor(y)) ** 2).sum()
    loss.backward()
    opt.step()
  with jax.enable_x64(True):

    def loss_fn(params, ids, y):
      return jnp.sum((params["t"][ids["t"]].sum(-1) - y) ** 2)

    f = jadam.value_and_sparse_grad(loss_fn)
    tx = jadam.torch.Adagrad(lr=0.3, lr_decay=0.05)
    params = {"t": jnp.asarray(table0)}
    state = tx.init(params)
    for _ in range(5):
      _, grads = f(params, {"t": jnp.asarray(ids)}, jnp.asarray(y))
      params, state = jadam.update_and_apply(tx, grads, state, params)
  want = emb.weight.detach().numpy()
  assert np.max(np.abs(np.asarray(params["t"]) - want)) / np.max(np.abs(want)) <= TOL
