"""Adafactor: jadam.adafactor and jadam.torch.Adafactor against a NumPy float64 reference and torch.optim.Adafactor."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jadam
from tests.helpers import reference_adafactor_muon as R

SHAPES = {"matrix": (5, 3), "tall": (2, 7), "batched": (2, 3, 4), "vector": (4,), "scalar": ()}
STEPS = 120

# (torch keywords, jadam.adafactor keywords)
CASES = [
  ({}, {}),
  (dict(weight_decay=0.1), dict(weight_decay=0.1)),
  (dict(maximize=True), dict(maximize=True)),
  (dict(lr=0.3, weight_decay=0.05, maximize=True), dict(learning_rate=0.3, weight_decay=0.05, maximize=True)),
  (
    dict(eps=(1e-4, 1e-2), d=2.0, beta2_decay=-0.5),
    dict(eps=1e-4, eps_scale=1e-2, clipping_threshold=2.0, beta2_decay=-0.5),
  ),
]


def _name(kw):
  return "-".join(f"{k}={v}" for k, v in kw.items()) or "defaults"


def _reference_kwargs(kw):
  out = dict(lr=kw.get("lr", 1e-2), beta2_decay=kw.get("beta2_decay", -0.8), d=kw.get("d", 1.0))
  out.update(eps1=kw.get("eps", (None, 1e-3))[0], eps2=kw.get("eps", (None, 1e-3))[1])
  return dict(out, wd=kw.get("weight_decay", 0.0), maximize=kw.get("maximize", False))


class AdafactorReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(_name(t), t, j) for t, j in CASES])
  def test_matches_numpy_float64(self, torch_kw, jadam_kw):
    with jax.enable_x64(True):
      want = R.run_numpy(
        functools.partial(R.adafactor_step, **_reference_kwargs(torch_kw)), R.adafactor_state, SHAPES, STEPS
      )
      tx = jadam.adafactor(**jadam_kw)
      tx = optax.GradientTransformation(tx.init, self.variant(tx.update))
      got, _, _ = R.run_jax(tx, SHAPES, STEPS, jit=False)
    assert R.max_rel_diff(got, want) <= 1e-12


torch = pytest.importorskip("torch")


def _torch_adafactor(kw):
  return lambda tensors: [torch.optim.Adafactor(list(tensors.values()), **kw)]


@pytest.mark.parametrize("torch_kw, jadam_kw", CASES, ids=[_name(t) for t, _ in CASES])
def test_front_door_matches_torch_float64(torch_kw, jadam_kw):
  want, _ = R.run_torch(_torch_adafactor(torch_kw), SHAPES, STEPS)
  with jax.enable_x64(True):
    got, _, _ = R.run_jax(jadam.torch.Adafactor(**torch_kw), SHAPES, STEPS)
    recipe, _, _ = R.run_jax(jadam.adafactor(**jadam_kw), SHAPES, STEPS)
  assert R.max_rel_diff(got, want) <= 1e-12
  assert R.max_rel_diff(recipe, want) <= 1e-12


@pytest.mark.parametrize("torch_kw", [{}, dict(weight_decay=0.1, maximize=True)], ids=_name)
def test_float32_within_rounding_model(torch_kw):
  """float32 against torch's float32, bounded by a rounding model.

  Per step each library rounds the new parameter once (together at most 1 ulp
  of the leaf's scale apart) and computes the step with about 20 roundings
  and three means of at most 24 terms (relative error below 2^-24 * (20 + 3 * 24)
  = 92 ulps of the step, which is below lr * RMS(theta) * sqrt(n) <= the
  leaf's scale / 20 here). The gradient's feedback is scaled down by the
  relative step, below 1/10. So T steps stay within T * (1 + 92/20) * 1.1 ulps.
  """
  steps = 100
  want, _ = R.run_torch(_torch_adafactor(torch_kw), SHAPES, steps, np.float32)
  got, _, _ = R.run_jax(jadam.torch.Adafactor(**torch_kw), SHAPES, steps, np.float32)
  assert R.max_ulps(got, want) <= steps * (1 + 92 / 20) * 1.1


def test_param_groups_and_scheduler_match_torch():
  groups = [{"params": "matrix|vector", "lr": 0.05, "weight_decay": 0.1}]

  def make(tensors):
    opt = torch.optim.Adafactor(
      [{"params": [tensors["matrix"], tensors["vector"]], "lr": 0.05, "weight_decay": 0.1}]
      + [{"params": [v for k, v in tensors.items() if k not in ("matrix", "vector")]}],
      lr=0.2,
    )
    return [opt]

  want, _ = R.run_torch(make, SHAPES, 60, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5))
  with jax.enable_x64(True):
    tx = jadam.torch.Adafactor(groups, lr=jadam.torch.StepLR(0.2, 7, 0.5))
    got, _, _ = R.run_jax(tx, SHAPES, 60)
  assert R.max_rel_diff(got, want) <= 1e-12


def test_inject_hyperparams_and_schedules():
  with jax.enable_x64(True):
    plain, _, _ = R.run_jax(jadam.adafactor(0.1, weight_decay=0.01, eps=1e-20), SHAPES, 20)
    injected = optax.inject_hyperparams(jadam.adafactor)(
      learning_rate=0.1, weight_decay=0.01, eps=1e-20, beta2_decay=-0.8, eps_scale=1e-3, clipping_threshold=1.0
    )
    got, _, state = R.run_jax(injected, SHAPES, 20)
    np.testing.assert_array_equal(np.asarray(state.hyperparams["learning_rate"]), 0.1)
    assert R.max_rel_diff(got, plain) <= 1e-15
    constant, _, _ = R.run_jax(jadam.adafactor(lambda count: 0.1), SHAPES, 20)
    assert R.max_rel_diff(constant, R.run_jax(jadam.adafactor(0.1), SHAPES, 20)[0]) <= 1e-15


def test_state_shapes_are_torch_s():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = jadam.adafactor().init(params)[0]
  assert isinstance(state, jadam.ScaleByFactoredMomentsState)
  assert state.row_var["batched"].shape == (2, 3, 1) and state.col_var["batched"].shape == (2, 1, 4)
  assert state.variance["batched"] is None and state.row_var["vector"] is None
  assert state.variance["scalar"].shape == ()


def test_bf16_params_stay_bf16_and_finite_on_zero_grads():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
  tx = jadam.adafactor()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
  "kw, error, match",
  [
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(beta2_decay=0.5), ValueError, "beta2_decay should be <= 0"),
    (dict(eps=(-1.0, 1e-3)), ValueError, "epsilon1 should be >= 0"),
    (dict(eps=(None, -1.0)), ValueError, "epsilon2 should be >= 0"),
    (dict(eps=1e-3), TypeError, "pair"),
    (dict(d=0.5), ValueError, "Clipping threshold d should be >= 1"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(maximize=1), TypeError, "maximize"),
    (dict(lr=jadam.torch.ReduceLROnPlateau(0.1)), TypeError, "ReduceLROnPlateau"),
  ],
)
def test_front_door_refuses_bad_arguments(kw, error, match):
  with pytest.raises(error, match=match):
    jadam.torch.Adafactor(**kw)


def test_recipe_refuses_bad_arguments_and_complex_params():
  with pytest.raises(ValueError, match="beta2_decay"):
    jadam.adafactor(beta2_decay=0.1)
  with pytest.raises(ValueError, match="clipping_threshold"):
    jadam.adafactor(clipping_threshold=0.5)
  with pytest.raises(TypeError, match="complex"):
    jadam.adafactor().init({"w": jnp.ones((2, 2), jnp.complex64)})
  tx = jadam.adafactor()
  with pytest.raises(TypeError, match="jadam.adam"):
    tx.update({"w": jnp.ones(3)}, jadam.adam().init({"w": jnp.ones(3)}), {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))


def test_compiles_once_and_keeps_the_state_s_shapes_and_dtypes():
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  tx = jadam.adafactor(learning_rate=optax.linear_schedule(0.1, 0.01, 10))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(params, state, params)
    return optax.apply_updates(params, updates), state

  state = first = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, first)
