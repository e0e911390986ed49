"""jadam.sweep: every configuration at once equals each configuration alone."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import rounding as _rounding

F32 = functools.partial(jnp.asarray, dtype=jnp.float32)


def _problem(n_steps=20, seed=0):
  """A small least-squares problem: params and a sequence of gradients-producing batches."""
  key = jax.random.key(seed)
  params = {"w": jax.random.normal(key, (5, 3)), "b": jnp.zeros(3)}
  xs = jax.random.normal(jax.random.key(seed + 1), (n_steps, 8, 5))
  ys = jax.random.normal(jax.random.key(seed + 2), (n_steps, 8, 3))
  return params, xs, ys


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _alone(tx, params, xs, ys):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for x, y in zip(xs, ys, strict=True):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@functools.partial(jax.jit, static_argnums=0)
def _alone_run(factory, kwargs, params, xs, ys):
  """`factory(**kwargs)` alone over the batches, one compile for every value of `kwargs` (float32 scalars)."""
  tx = factory(**kwargs)

  def body(carry, batch):
    params, state = carry
    updates, state = tx.update(jax.grad(_loss)(params, *batch), state, params)
    return (optax.apply_updates(params, updates), state), None

  return jax.lax.scan(body, (params, tx.init(params)), (xs, ys))[0][0]


def _together(sweep, params, xs, ys):
  params = sweep.broadcast(params)
  state = sweep.tx.init(params)
  update = jax.jit(sweep.tx.update)
  grad = jax.vmap(jax.grad(_loss), in_axes=(0, None, None))
  for x, y in zip(xs, ys, strict=True):
    updates, state = update(grad(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _f32(x):
  return float(np.float32(x))


def _adam_hyperparameters(factory, config) -> dict:
  """tests/helpers/rounding.adam_step_gap's keywords for one of the sweep test's factories and configurations."""
  hp = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False)
  if factory is jadam.torch.Adam:
    hp.update(lr=config["lr"], b1=config["betas"][0], b2=config["betas"][1])
  else:
    hp.update({"lr" if k == "learning_rate" else k: v for k, v in config.items()})
    hp.update(decoupled=factory is jadam.adamw, amsgrad=getattr(factory, "keywords", {}).get("amsgrad", False))
  return {k: _f32(v) if isinstance(v, float) else v for k, v in hp.items()}  # what the programs compute with


def _gap_bound(hp, params, xs, ys) -> dict:
  """Per element, how far two float32 programs running Adam with `hp` on `_problem`'s batches may end apart.

  The least-squares gradient ``(2 / n) X^T (X W + b - Y)`` (n the number of residuals) is a sum of products:
  each program's rounding of it is within (5 + 8 + 4) of its operations of the sum of the terms' magnitudes,
  and a difference in W and b reaches it through |X|.
  """
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  dw, db = np.zeros_like(w), np.zeros_like(b)
  sw, sb = _rounding.zeros_state(w.shape), _rounding.zeros_state(b.shape)
  pair = 2
  for t, (x, y) in enumerate(zip(np.asarray(xs, np.float64), np.asarray(ys, np.float64), strict=True), start=1):
    scale = 2.0 / y.size
    r = x @ w + b - y
    ax = np.abs(x)
    dr = pair * (w.shape[0] + 2) * _rounding._R * (ax @ np.abs(w) + np.abs(b) + np.abs(y)) + ax @ dw + db
    gw, gb = scale * x.T @ r, scale * r.sum(0)
    dgw = scale * (ax.T @ dr) + pair * (x.shape[0] + 2) * _rounding._R * scale * (ax.T @ np.abs(r))
    dgb = scale * dr.sum(0) + pair * (x.shape[0] + 2) * _rounding._R * scale * np.abs(r).sum(0)
    hp_t = {**hp, "lr": float(hp["lr"](t - 1)) if callable(hp["lr"]) else hp["lr"]}  # a schedule: read at t - 1
    w, dw = _rounding.adam_step_gap(sw, gw, dgw, w, dw, t=t, **hp_t)
    b, db = _rounding.adam_step_gap(sb, gb, dgb, b, db, t=t, **hp_t)
  return {"w": dw, "b": db}


def test_grid_order_is_itertools_product():
  configs = jadam.sweep_grid({"learning_rate": [1, 2], "b1": [0.8, 0.9], "eps": [1e-8]})
  assert configs == [
    {"learning_rate": 1, "b1": 0.8, "eps": 1e-8},
    {"learning_rate": 1, "b1": 0.9, "eps": 1e-8},
    {"learning_rate": 2, "b1": 0.8, "eps": 1e-8},
    {"learning_rate": 2, "b1": 0.9, "eps": 1e-8},
  ]
  sweep = jadam.sweep(jadam.adam, {"learning_rate": [1e-3, 1e-2], "b1": [0.8, 0.9]})
  assert sweep.configs == jadam.sweep_grid({"learning_rate": [1e-3, 1e-2], "b1": [0.8, 0.9]})
  explicit = [{"b2": 0.99, "eps": 1e-6}, {"b2": 0.999, "eps": 1e-8}]
  assert jadam.sweep(jadam.adam, configs=explicit).configs == explicit


@pytest.mark.parametrize(
  "factory,grid",
  [
    (jadam.adam, {"learning_rate": [1e-3, 3e-2], "b1": [0.8, 0.9], "b2": [0.99], "eps": [1e-8, 1e-3]}),
    (jadam.adamw, {"learning_rate": [1e-2], "weight_decay": [0.0, 0.1, 1.0]}),
    (functools.partial(jadam.adam, amsgrad=True), {"learning_rate": [1e-2, 1e-1], "weight_decay": [0.0, 0.1]}),
    (jadam.torch.Adam, {"lr": [1e-2, 1e-1], "betas": [(0.9, 0.999), (0.8, 0.99)]}),
  ],
  ids=["adam", "adamw", "amsgrad", "torch.Adam"],
)
def test_each_configuration_is_the_same_configuration_alone(factory, grid):
  """Alone: the factory called with the same float32 hyperparameters that the sweep injects.

  The vmapped and the single program round differently (XLA batches the matrix products and fuses otherwise,
  and differently again on CPUs with and without AVX-512), so they agree within the bound that
  tests/helpers/rounding.py derives from the rounding of each operation, carried through the 20 steps.
  """
  params, xs, ys = _problem()
  sweep = jadam.sweep(factory, grid)
  got_params, state = _together(sweep, params, xs, ys)
  for i, config in enumerate(sweep.configs):
    kwargs = {k: tuple(F32(x) for x in v) if isinstance(v, tuple) else F32(v) for k, v in config.items()}
    want = _alone_run(factory, kwargs, params, xs, ys)
    bound = _gap_bound(_adam_hyperparameters(factory, config), params, xs, ys)
    for k in ("w", "b"):
      gap = np.abs(np.asarray(got_params[k][i], np.float64) - np.asarray(want[k], np.float64))
      assert np.all(gap <= bound[k]), (config, k, np.max(gap), np.max(bound[k]))
      # not vacuous: below a tenth of how far the configuration moved the parameters, so that another learning
      # rate, decay or weight decay would show (the bound is a worst case: through the gradient's dependence on
      # the parameters and Adam's division by sqrt(v), a difference can grow step after step; the measured
      # differences stay at a few ulps)
      moved = np.max(np.abs(np.asarray(want[k], np.float64) - np.asarray(params[k], np.float64)))
      assert np.max(bound[k]) < 0.1 * moved, (config, k, np.max(bound[k]), moved)
    for k, v in config.items():
      if not isinstance(v, tuple):
        assert state.inner.hyperparams[k][i] == F32(v)


def test_scheduled_peak_per_configuration():
  params, xs, ys = _problem()

  def cosine(peak):
    return optax.cosine_decay_schedule(peak, 20)

  sweep = jadam.sweep(jadam.adam, {"learning_rate": [1e-2, 1e-1]}, schedules={"learning_rate": cosine})
  with jax.numpy_dtype_promotion("standard"):  # optax's cosine mixes the int32 count with floats
    got, _ = _together(sweep, params, xs, ys)
    for i, peak in enumerate([1e-2, 1e-1]):
      want, _ = _alone(jadam.adam(cosine(F32(peak))), params, xs, ys)
      hp = _adam_hyperparameters(jadam.adam, {"learning_rate": cosine(_f32(peak))})
      bound = _gap_bound(hp, params, xs, ys)  # the rounding model, as in the test above
      for k in ("w", "b"):
        gap = np.abs(np.asarray(got[k][i], np.float64) - np.asarray(want[k], np.float64))
        assert np.all(gap <= bound[k]), (peak, k, np.max(gap), np.max(bound[k]))
    constant, _ = _together(jadam.sweep(jadam.adam, {"learning_rate": [1e-2, 1e-1]}), params, xs, ys)
  assert not np.allclose(got["w"], constant["w"])  # the schedule was applied


def test_a_stopped_configuration_is_frozen():
  params, xs, ys = _problem(n_steps=6)
  sweep = jadam.sweep(jadam.adam, {"learning_rate": [1e-2, 2e-2, 3e-2]}, early_stopping=jadam.early_stopping(0))
  p = sweep.broadcast(params)
  state = sweep.tx.init(p)
  update = jax.jit(sweep.tx.update)
  grad = jax.vmap(jax.grad(_loss), in_axes=(0, None, None))
  for x, y in zip(xs[:3], ys[:3], strict=True):
    updates, state = update(grad(p, x, y), state, p)
    p = optax.apply_updates(p, updates)
  state = sweep.observe(state, jnp.array([1.0, 1.0, 1.0]))  # first epoch: every one improves on inf
  state = sweep.observe(state, jnp.array([0.5, 2.0, 0.4]))  # the second stops (patience 0)
  np.testing.assert_array_equal(state.stopping.stopped_epoch, [0, 2, 0])
  frozen_p, frozen_state = jax.tree.map(lambda a: np.asarray(a[1]), (p, state.inner))
  for x, y in zip(xs[3:], ys[3:], strict=True):
    updates, state = update(grad(p, x, y), state, p)
    np.testing.assert_array_equal(updates["w"][1], 0.0)
    p = optax.apply_updates(p, updates)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: np.asarray(a[1]), (p, state.inner)), (frozen_p, frozen_state))
  assert int(state.inner.count[1]) == 3 and int(state.inner.count[0]) == 6
  # The others went on as if alone: within the rounding model's bound, as in the tests above.
  want, _ = _alone(jadam.adam(F32(3e-2)), params, xs, ys)
  bound = _gap_bound(_adam_hyperparameters(jadam.adam, {"learning_rate": 3e-2}), params, xs, ys)
  for k in ("w", "b"):
    gap = np.abs(np.asarray(p[k][2], np.float64) - np.asarray(want[k], np.float64))
    assert np.all(gap <= bound[k]), (k, np.max(gap), np.max(bound[k]))


def test_composes_with_make_train_step_in_one_compile():
  params, xs, ys = _problem()
  sweep = jadam.sweep(jadam.adam, {"learning_rate": [1e-3, 1e-2], "b2": [0.99, 0.999]})
  traces = []

  def loss_fn(params, x, y):
    traces.append(1)
    losses = jax.vmap(_loss, in_axes=(0, None, None))(params, x, y)
    return losses.sum(), losses

  step = jadam.make_train_step(loss_fn, sweep.tx, has_aux=True)
  p = jax.tree.map(jnp.array, sweep.broadcast(params))
  state = sweep.tx.init(p)
  for x, y in zip(xs, ys, strict=True):
    p, state, total, losses = step(p, state, x, y)
  assert losses.shape == (4,) and np.isclose(total, losses.sum())
  assert len(traces) <= 2  # one trace (a second only if the step keeps a fused and a generic variant)
  want, _ = _together(sweep, params, xs, ys)
  for i, config in enumerate(sweep.configs):  # two vmapped programs: within the rounding model's bound
    bound = _gap_bound(_adam_hyperparameters(jadam.adam, config), params, xs, ys)
    for k in ("w", "b"):
      gap = np.abs(np.asarray(p[k][i], np.float64) - np.asarray(want[k][i], np.float64))
      assert np.all(gap <= bound[k]), (config, k, np.max(gap), np.max(bound[k]))


def test_save_and_restore_the_sweep_state(tmp_path):
  params, xs, ys = _problem(n_steps=3)
  sweep = jadam.sweep(
    jadam.adam,
    {"learning_rate": [1e-3, 1e-2]},
    plateau=jadam.torch.ReduceLROnPlateau(1.0, patience=0),
    early_stopping=jadam.early_stopping(2),
  )
  _, state = _together(sweep, params, xs, ys)
  state = sweep.observe(state, jnp.array([1.0, 2.0]))
  jadam.save_state(tmp_path / "sweep", state)
  restored = jadam.restore_state(tmp_path / "sweep", sweep.tx.init(sweep.broadcast(params)))
  chex.assert_trees_all_equal(restored, state)
  assert type(restored) is jadam.SweepState


def test_bfloat16_parameters_keep_float32_hyperparameters():
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  sweep = jadam.sweep(jadam.adam, {"b2": [0.999, 0.9999]})
  p = sweep.broadcast(params)
  state = sweep.tx.init(p)
  assert state.inner.hyperparams["b2"].dtype == jnp.float32
  updates, state = sweep.tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
  assert updates["w"].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(updates["w"])))


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="either grid"):
    jadam.sweep(jadam.adam)
  with pytest.raises(ValueError, match="takes no 'momentum'"):
    jadam.sweep(jadam.adam, {"momentum": [0.9]})
  with pytest.raises(TypeError, match="amsgrad is a flag.*functools.partial"):
    jadam.sweep(jadam.adam, {"amsgrad": [False, True]})
  with pytest.raises(ValueError, match=r"configs\[1\].*b1"):
    jadam.sweep(jadam.adam, {"b1": [0.9, 1.5]})
  with pytest.raises(ValueError, match="must agree"):
    jadam.sweep(jadam.adam, configs=[{"b1": 0.9}, {"b2": 0.99}])
  with pytest.raises(ValueError, match="non-empty"):
    jadam.sweep(jadam.adam, {"b1": []})
  with pytest.raises(ValueError, match="schedules"):
    jadam.sweep(jadam.adam, {"b1": [0.9]}, schedules={"learning_rate": lambda p: p})
  sweep = jadam.sweep(jadam.adam, {"b1": [0.8, 0.9]})
  with pytest.raises(ValueError, match="leading axis of 2.*broadcast"):
    sweep.tx.init({"w": jnp.ones(3)})
  state = sweep.tx.init(sweep.broadcast({"w": jnp.ones(3)}))
  with pytest.raises(ValueError, match="one metric per configuration"):
    sweep.observe(state, jnp.ones(3))


def test_values_that_do_not_survive_the_injected_dtype_are_refused():
  # float64 numbers that float32 turns into inf or 0 (or a subnormal, which loses its digits)
  for grid, what in [
    ({"learning_rate": [1e-3, 1e39]}, "learning_rate=1e\\+39"),
    ({"eps": [1e-50]}, "eps=1e-50"),
    ({"eps": [1e-40]}, "eps=1e-40"),
  ]:
    with pytest.raises(ValueError, match=rf"{what}.*float32"):
      jadam.sweep(jadam.adam, grid)
  with pytest.raises(ValueError, match=r"betas\[1\]=1e-50.*float32"):  # a swept tuple, element by element
    jadam.sweep(jadam.torch.Adam, {"betas": [(0.9, 1e-50)]})
  with pytest.raises(ValueError, match="float64.*1e-320"):
    jadam.sweep(jadam.adam, {"eps": [1e-320]}, hyperparam_dtype=jnp.float64)
  jadam.sweep(jadam.adam, {"eps": [1e-30, 0.0], "learning_rate": [3e38]})  # representable: accepted


def test_an_empty_sweep_says_it_has_nothing_to_sweep():
  for kw in [dict(grid={}), dict(configs=[{}]), dict(configs=[{}, {}])]:
    with pytest.raises(ValueError, match="nothing to sweep"):
      jadam.sweep(jadam.adam, **kw)


def test_plateau_without_a_swept_rate_injects_the_default():
  sweep = jadam.sweep(jadam.adam, {"b1": [0.8, 0.9]}, plateau=jadam.torch.ReduceLROnPlateau(1.0, patience=0))
  assert sweep.configs == [{"b1": 0.8, "learning_rate": 1e-3}, {"b1": 0.9, "learning_rate": 1e-3}]
  state = sweep.tx.init(sweep.broadcast({"w": jnp.ones(3)}))
  for loss in [1.0, 1.0]:
    state = sweep.observe(state, jnp.array([loss, 0.5 * loss]))
  want = _rounding.given(1e-3) * _rounding.given(0.1) * _rounding.given(0.1)  # float32 products against 1e-4
  _rounding.assert_within(state.inner.hyperparams["learning_rate"], [1e-4, 1e-4], want)
