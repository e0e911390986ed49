"""jadam.lbfgs and jadam.torch.LBFGS against the live torch.optim.LBFGS with a closure, float64; its state dicts.

One jadam `update` is one torch `step(closure)`: up to `max_iter` inner iterations, each re-evaluating
the objective. Both libraries take the same steps, but torch's `dot` (a BLAS kernel with its own
summation order) and its `add_(alpha=t)` (one fused multiply-add) round differently from XLA's, by an
ulp. L-BFGS amplifies such a difference: its curvature pairs are differences of nearly equal
gradients. Where the run is well conditioned (least squares; Rosenbrock with a line search or short
steps) whole 15-step trajectories agree to 1e-10; for every configuration each step taken from
torch's own state (loaded with jadam.torch.load_state_dict) agrees to 1e-10, and the discrete path
(evaluations and iterations counted) is the same. Whole fixed-step Rosenbrock runs drift as far from
torch as torch drifts from itself when started one ulp away (measured in the test that says so).
"""

from __future__ import annotations

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jadam

torch = pytest.importorskip("torch")
STEPS = 15
TOL = 1e-10

_A = np.random.default_rng(0).normal(size=(20, 5))
_B = np.random.default_rng(1).normal(size=20)


def _rosen_torch(x):
  return ((1 - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()


def _rosen_jax(p):
  x = p["x"]
  return jnp.sum((1 - x[:-1]) ** 2) + 100 * jnp.sum((x[1:] - x[:-1] ** 2) ** 2)


def _lsq_torch(x):  # x = [bias, w0..w4]: jadam's leaves "a_bias", "b_w" flatten in this order
  return ((torch.tensor(_A) @ x[1:] + x[0] - torch.tensor(_B)) ** 2).mean()


def _lsq_jax(p):
  return jnp.mean((jnp.asarray(_A) @ p["b_w"] + p["a_bias"][0] - jnp.asarray(_B)) ** 2)


PROBLEMS = {
  "rosen2": (_rosen_torch, _rosen_jax, lambda x: {"x": x}, np.array([-1.2, 1.0])),
  "rosen4": (_rosen_torch, _rosen_jax, lambda x: {"x": x}, np.array([-1.2, 1.0, -0.5, 0.8])),
  "lsq": (_lsq_torch, _lsq_jax, lambda x: {"a_bias": x[:1], "b_w": x[1:]}, np.array([0.0] + [0.5] * 5)),
}


def _flat(p):
  return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(p)])


def _torch_run(problem, kwargs, steps=STEPS, x0=None):
  """torch's parameters after each step, with the state dict before it (a deep copy: torch mutates its lists)."""
  f, _, _, start = PROBLEMS[problem]
  x0 = start if x0 is None else x0
  p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.LBFGS([p], **kwargs)

  def closure():
    opt.zero_grad()
    loss = f(p)
    loss.backward()
    return loss

  out = []
  for _ in range(steps):
    before, sd = p.detach().numpy().copy(), copy.deepcopy(opt.state_dict())
    opt.step(closure)
    st = opt.state[p]
    out.append((before, sd, p.detach().numpy().copy(), st["func_evals"], st["n_iter"]))
  return out


def _rel(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


TRAJECTORIES = [
  # (name, problem, torch kwargs): the well-conditioned runs, whole trajectories
  ("lsq_fixed", "lsq", dict()),
  ("lsq_fixed_short", "lsq", dict(max_iter=4, history_size=2)),
  ("lsq_fixed_lr", "lsq", dict(lr=0.3, max_iter=7, history_size=5)),
  ("lsq_fixed_one_pair", "lsq", dict(max_iter=2, history_size=1)),
  ("lsq_wolfe", "lsq", dict(line_search_fn="strong_wolfe")),
  ("lsq_wolfe_short", "lsq", dict(line_search_fn="strong_wolfe", max_iter=4, history_size=2)),
  ("lsq_wolfe_lr", "lsq", dict(line_search_fn="strong_wolfe", lr=0.3, max_iter=7, history_size=5)),
  ("rosen_fixed_lr", "rosen2", dict(lr=0.5, max_iter=3, history_size=2)),
  ("rosen_fixed_one_iter", "rosen2", dict(max_iter=1, history_size=10)),
  ("rosen_wolfe", "rosen2", dict(line_search_fn="strong_wolfe")),
  ("rosen_wolfe_lr", "rosen2", dict(line_search_fn="strong_wolfe", lr=0.5, max_iter=3, history_size=2)),
  ("rosen_wolfe_long", "rosen2", dict(line_search_fn="strong_wolfe", lr=0.1, max_iter=10, history_size=4)),
  ("rosen_wolfe_one_iter", "rosen4", dict(line_search_fn="strong_wolfe", max_iter=1, history_size=10)),
]


def _jadam(kwargs):
  return jadam.torch.LBFGS(**kwargs)


_COMPILED: dict = {}


def _compiled(problem, kwargs):
  """`(tx, jitted update)` for a problem and configuration, compiled once per test session (compiling the
  line search takes seconds)."""
  key = (problem, tuple(sorted(kwargs.items())))
  if key not in _COMPILED:
    f = PROBLEMS[problem][1]
    tx = _jadam(kwargs)
    _COMPILED[key] = tx, jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v, value_fn=f))
  return _COMPILED[key]


def _run_jadam(problem, want, tx, update):
  _, f, tree, x0 = PROBLEMS[problem]
  params = tree(jnp.asarray(x0))
  state = tx.init(params)
  for _, _, after, evals, n_iter in want:
    value, grads = jax.value_and_grad(f)(params)
    updates, state = update(grads, state, params, value)
    params = optax.apply_updates(params, updates)
    assert _rel(_flat(params), after) <= TOL
    assert (int(state.func_evals), int(state.n_iter)) == (evals, n_iter)


class LbfgsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("fixed", None), ("strong_wolfe", "strong_wolfe"))
  def test_jit_and_eager_match_torch(self, line_search_fn):
    """Two steps, jitted and not (eagerly every while_loop compiles on each call: slow, so short)."""
    kwargs = dict(max_iter=3, history_size=2, line_search_fn=line_search_fn)
    want = _torch_run("lsq", kwargs, steps=2)
    _, f, _, _ = PROBLEMS["lsq"]
    with jax.enable_x64(True):
      tx = _jadam(kwargs)
      _run_jadam("lsq", want, tx, self.variant(lambda g, s, p, v: tx.update(g, s, p, value=v, value_fn=f)))

  @parameterized.named_parameters(*TRAJECTORIES)
  def test_trajectory_matches_torch_float64(self, problem, kwargs):
    want = _torch_run(problem, kwargs)
    with jax.enable_x64(True):
      _run_jadam(problem, want, *_compiled(problem, kwargs))

  @parameterized.product(
    line_search_fn=[None, "strong_wolfe"],
    config=[
      dict(),
      dict(max_iter=5, history_size=3),
      dict(lr=0.5, max_iter=3, history_size=2),
      dict(max_iter=1, history_size=10),
      dict(lr=0.1, max_iter=10, history_size=4),
    ],
  )
  def test_each_step_from_torchs_state_matches_torch(self, line_search_fn, config):
    """Rosenbrock in 4-D, where whole fixed-step runs drift apart from an ulp: each step from torch's own state."""
    kwargs = {**config, "line_search_fn": line_search_fn}
    run = _torch_run("rosen4", kwargs)
    _, f, tree, _ = PROBLEMS["rosen4"]
    with jax.enable_x64(True):
      tx, update = _compiled("rosen4", kwargs)
      for before, sd, after, evals, n_iter in run:
        params = tree(jnp.asarray(before))
        state = jadam.torch.load_state_dict(tx, params, sd)
        value, grads = jax.value_and_grad(f)(params)
        updates, state = update(grads, state, params, value)
        assert _rel(_flat(optax.apply_updates(params, updates)), after) <= TOL
        assert (int(state.func_evals), int(state.n_iter)) == (evals, n_iter)

  @parameterized.named_parameters(
    ("defaults", dict()),
    ("short", dict(max_iter=5, history_size=3)),
    ("lr", dict(lr=0.5, max_iter=3, history_size=2)),
    ("one_iter", dict(max_iter=1, history_size=10)),
    ("long", dict(lr=0.1, max_iter=10, history_size=4)),
  )
  def test_whole_fixed_step_rosenbrock_runs_drift_no_more_than_torch_from_one_ulp(self, config):
    """Whole 15-step runs on 4-D Rosenbrock without a line search: the same path, and a drift that is torch's own.

    These runs amplify rounding. Torch itself, started one ulp away in one coordinate (a relative change of
    1e-16; the largest of the 8 such starts), ends 3e-13 (one_iter), 1.5e-10 (lr), 1.1e-8 (long), 2.6e-7
    (defaults) and 2.2e-4 (short) away from torch; jadam ends 4.5e-14, 8.6e-11, 1.2e-8, 5.7e-8 and 1.0e-4
    away. jadam rounds differently from torch at every evaluation: torch's `dot` of 4 entries is BLAS's
    pairwise (x0 y0 + x2 y2) + (x1 y1 + x3 y3), XLA's a chain of fused multiply-adds; the closure's value and
    gradient from autograd and from `jax.grad` differ in the last bit at half the points. Each alone, put into
    torch (its `dot` replaced by XLA's order; its closure's gradient taken from JAX), moves torch's whole run
    by as much as jadam's distance from it (7.7e-8 and 3.0e-8 for defaults, 6.4e-5 and 9.0e-6 for short). No
    branch is taken differently: every step has torch's number of evaluations and iterations. So the whole run
    is held to 1e-10 or, where torch's own spread over the 8 one-ulp starts is larger, to 10 times that spread
    (jadam differs by a few ulps at each operation, the perturbed start by one ulp once); each step from
    torch's state is held to 1e-10 by `test_each_step_from_torchs_state_matches_torch` (at most 1.5e-12). With
    the line search the same holds (lr=0.1, max_iter=10: jadam 1.5e-4, torch's spread 5.9e-4, after which
    the last step's line search takes one evaluation fewer).
    """
    kwargs = {**config, "line_search_fn": None}
    want = _torch_run("rosen4", kwargs)
    x0 = PROBLEMS["rosen4"][3]
    spread = 0.0
    for i in range(x0.size):
      for direction in (-np.inf, np.inf):
        nudged = x0.copy()
        nudged[i] = np.nextafter(nudged[i], direction)
        run = _torch_run("rosen4", kwargs, x0=nudged)
        spread = max(spread, max(_rel(r[2], w[2]) for r, w in zip(run, want, strict=True)))
    _, f, tree, _ = PROBLEMS["rosen4"]
    with jax.enable_x64(True):
      tx, update = _compiled("rosen4", kwargs)
      params = tree(jnp.asarray(x0))
      state, drift = tx.init(params), 0.0
      for _, _, after, evals, n_iter in want:
        value, grads = jax.value_and_grad(f)(params)
        updates, state = update(grads, state, params, value)
        params = optax.apply_updates(params, updates)
        drift = max(drift, _rel(_flat(params), after))
        assert (int(state.func_evals), int(state.n_iter)) == (evals, n_iter)
    assert drift <= max(TOL, 10 * spread), (drift, spread)

  def test_value_and_grad_from_state(self):
    """optax.value_and_grad_from_state reuses the objective the step ended with: the same run, fewer evaluations."""
    want = _torch_run("lsq", dict(line_search_fn="strong_wolfe"))
    _, f, tree, x0 = PROBLEMS["lsq"]
    with jax.enable_x64(True):
      tx = jadam.lbfgs(line_search_fn="strong_wolfe")
      params = tree(jnp.asarray(x0))
      state = tx.init(params)
      value_and_grad = optax.value_and_grad_from_state(f)

      @jax.jit
      def step(params, state):
        value, grads = value_and_grad(params, state=state)
        updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=f)
        return optax.apply_updates(params, updates), state

      for _, _, after, _, _ in want:
        params, state = step(params, state)
        assert _rel(_flat(params), after) <= TOL

  def test_scheduled_lr_matches_torch(self):
    f_t, f, tree, x0 = PROBLEMS["lsq"]
    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], lr=0.5, max_iter=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)

    def closure():
      opt.zero_grad()
      loss = f_t(p)
      loss.backward()
      return loss

    with jax.enable_x64(True):
      tx = jadam.torch.LBFGS(lr=jadam.torch.StepLR(0.5, 4, 0.5), max_iter=3)
      params = tree(jnp.asarray(x0))
      state = tx.init(params)
      update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v, value_fn=f))
      for _ in range(STEPS):
        opt.step(closure)
        sched.step()
        value, grads = jax.value_and_grad(f)(params)
        updates, state = update(grads, state, params, value)
        params = optax.apply_updates(params, updates)
        assert _rel(_flat(params), p.detach().numpy()) <= TOL


def test_stationary_start_returns_at_once_as_torch():
  p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.LBFGS([p])

  def closure():
    opt.zero_grad()
    loss = (p**2).sum()
    loss.backward()
    return loss

  opt.step(closure)

  def f(x):
    return jnp.sum(x**2)

  with jax.enable_x64(True):
    tx = jadam.torch.LBFGS()
    x = jnp.zeros(3)
    state = tx.init(x)
    value, grad = jax.value_and_grad(f)(x)
    updates, state = tx.update(grad, state, x, value=value, value_fn=f)
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  assert (int(state.func_evals), int(state.n_iter)) == (opt.state[p]["func_evals"], opt.state[p]["n_iter"]) == (1, 0)
  sd = jadam.torch.state_dict(tx, state, x)
  assert sd["state"][0] == {"func_evals": 1, "n_iter": 0}


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_state_dict_round_trips_and_continues_torch(line_search_fn):
  """torch -> jadam -> torch is exact; torch continuing from jadam's state dict equals jadam continuing."""
  kwargs = dict(max_iter=4, history_size=3, line_search_fn=line_search_fn)
  f_t, f, tree, _ = PROBLEMS["rosen4"]
  run = _torch_run("rosen4", kwargs, steps=6)
  with jax.enable_x64(True):
    tx = _jadam(kwargs)
    params = tree(jnp.asarray(run[-1][0]))
    sd = run[-1][1]  # torch's state dict before its 6th step: a full history, `al` with entries
    state = jadam.torch.load_state_dict(tx, params, sd)
    back = jadam.torch.state_dict(tx, state, params)
    assert back["param_groups"] == sd["param_groups"]
    mine, theirs = back["state"][0], sd["state"][0]
    assert set(mine) == set(theirs)
    for key, want in theirs.items():
      got = mine[key]
      if isinstance(want, list):
        assert len(got) == len(want), key
        for a, b in zip(got, want, strict=True):
          assert (a is None) == (b is None), key
          if b is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, key
            assert float(a.sub(b).abs().max()) == 0.0, key
      else:
        assert np.shape(got) == np.shape(want), key
        assert (
          float(torch.as_tensor(got, dtype=torch.float64).sub(torch.as_tensor(want, dtype=torch.float64)).abs().max())
          == 0.0
        ), key
    # jadam -> torch: torch takes the next steps from jadam's state and agrees with jadam's own
    p = torch.tensor(run[-1][0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], **kwargs)
    opt.load_state_dict(back)

    def closure():
      opt.zero_grad()
      loss = f_t(p)
      loss.backward()
      return loss

    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v, value_fn=f))
    for _ in range(3):
      opt.step(closure)
      value, grads = jax.value_and_grad(f)(params)
      updates, state = update(grads, state, params, value)
      params = optax.apply_updates(params, updates)
      assert _rel(_flat(params), p.detach().numpy()) <= TOL
      assert int(state.func_evals) == opt.state[p]["func_evals"]


def test_a_state_dict_of_other_hyperparameters_is_refused():
  run = _torch_run("lsq", dict(history_size=5), steps=2)
  with jax.enable_x64(True):
    params = PROBLEMS["lsq"][2](jnp.zeros(6))
    with pytest.raises(ValueError, match="history_size"):
      jadam.torch.load_state_dict(jadam.torch.LBFGS(history_size=4), params, run[-1][1])


def test_errors_as_torch():
  p = torch.zeros(2, requires_grad=True)
  with pytest.raises(ValueError, match="LBFGS doesn't support per-parameter options"):
    torch.optim.LBFGS([{"params": [p]}, {"params": [torch.zeros(1, requires_grad=True)]}])
  with pytest.raises(ValueError, match="LBFGS doesn't support per-parameter options"):
    jadam.torch.LBFGS([{"params": "a"}, {"params": "b"}])
  with pytest.raises(ValueError, match="only 'strong_wolfe' is supported"):
    jadam.torch.LBFGS(line_search_fn="backtracking")
  with pytest.raises(ValueError, match="Invalid learning rate"):
    jadam.torch.LBFGS(lr=-1.0)
  with pytest.raises(TypeError, match="ReduceLROnPlateau"):
    jadam.torch.LBFGS(lr=jadam.torch.ReduceLROnPlateau(1.0))
  tx = jadam.lbfgs()
  x = jnp.ones(2)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(x, tx.init(x), x, value=1.0)


def test_compiles_once():
  def f(x):
    return jnp.sum((x - 1.0) ** 2 * jnp.arange(1.0, 4.0))

  tx = jadam.lbfgs(line_search_fn="strong_wolfe", history_size=3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, state):
    value, grad = jax.value_and_grad(f)(x)
    updates, state = tx.update(grad, state, x, value=value, value_fn=f)
    return optax.apply_updates(x, updates), state

  x, state = jnp.zeros(3), tx.init(jnp.zeros(3))
  for _ in range(4):
    x, state = step(x, state)
  # float32: near its minimum the objective resolves x only to about sqrt(eps32) = 3e-4
  np.testing.assert_allclose(np.asarray(x), 1.0, atol=1e-3)
