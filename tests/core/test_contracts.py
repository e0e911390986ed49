"""The contracts users rely on without reading the code: static fields, hashes, `import *`, integer leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam


def test_moments_bias_corrected_is_static_under_jit():
  moments = jadam.Moments(mu=jnp.ones(2), nu=jnp.full(2, 4.0), count=jnp.asarray(1), b1=0.9, b2=0.999, grad=jnp.ones(2))
  assert len(jax.tree.leaves(moments)) == 6  # mu, nu, count, b1, b2, grad: bias_corrected is no leaf
  for stage in (jadam.bias_correct(), jadam.bias_correct(into_step=True)):
    out, _ = jax.jit(stage.update)(moments, stage.init(None))
    assert out.bias_corrected is True
  direction, _ = jax.jit(jadam.normalize().update)(moments, optax.EmptyState())
  np.testing.assert_allclose(direction, 0.5, rtol=1e-6)
  assert moments._replace(bias_corrected=True).bias_corrected and not moments.bias_corrected


SCHEDULERS = [
  jadam.torch.StepLR(1e-3, 2),
  jadam.torch.MultiStepLR(1e-3, [2, 5]),
  jadam.torch.ExponentialLR(1e-3, 0.9),
  jadam.torch.CosineAnnealingLR(1e-3, 10),
  jadam.torch.LinearLR(1e-3),
  jadam.torch.OneCycleLR(1e-3, total_steps=100),
  jadam.torch.ReduceLROnPlateau(1e-3),
]


@pytest.mark.parametrize("schedule", SCHEDULERS, ids=lambda s: type(s).__name__)
def test_per_epoch_is_a_field_of_equality_and_hash(schedule):
  stepped = schedule.per_epoch(100)
  assert schedule != stepped and hash(schedule) != hash(stepped)
  assert stepped == schedule.per_epoch(100) and hash(stepped) == hash(schedule.per_epoch(100))
  assert stepped.steps_per_epoch == 100 and schedule.steps_per_epoch == 1


def test_per_epoch_schedules_get_their_own_jit_cache_entry():
  run = jax.jit(lambda s, count: s(count), static_argnums=0)
  schedule = jadam.torch.StepLR(1.0, 2, gamma=0.5)
  assert float(run(schedule, 4)) == 0.25
  assert float(run(schedule.per_epoch(100), 4)) == 1.0


def test_import_star_does_not_shadow_torch_or_keras():
  names = {}
  exec("from jadam import *", names)
  assert "torch" not in names and "keras" not in names and "adam" in names
  assert jadam.torch.Adam is not None and jadam.keras.Adam is not None


ALIASES = ["adam", "adamw", "sgd", "rmsprop", "adagrad", "adamax", "nadam", "radam", "adadelta", "rprop", "asgd"]


@pytest.mark.parametrize("name", ALIASES)
def test_integer_leaves_do_not_move(name):
  params = {"w": jnp.ones(3), "i": jnp.arange(3, dtype=jnp.int32), "flag": jnp.array([True, False])}
  grads = {"w": jnp.ones(3), "i": jnp.arange(3, dtype=jnp.int32), "flag": jnp.array([True, True])}
  tx = getattr(jadam, name)(1.0)
  state = tx.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["i"].dtype == jnp.int32 and not np.any(updates["i"])
    assert updates["flag"].dtype == jnp.bool_ and not np.any(updates["flag"])
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["i"], [0, 1, 2])
  np.testing.assert_array_equal(params["flag"], [True, False])


@pytest.mark.parametrize("name", ALIASES)
def test_another_optimizers_state_is_refused_by_name(name):
  params = {"w": jnp.ones(3)}
  other = "nadam" if name != "nadam" else "adam"
  state = getattr(jadam, other)().init(params)
  with pytest.raises(TypeError, match=rf"jadam.{name}'s update received a state made by jadam.{other}'s init"):
    getattr(jadam, name)().update(params, state, params)


# --- optax.inject_hyperparams: inner_state is the plain optimizer's state -----------------
# Every numeric hyperparameter that may be zero, set to zero.
ZEROS = {
  "adam": dict(weight_decay=0.0, eps_root=0.0, eps=0.0),
  "adamw": dict(weight_decay=0.0, eps=0.0),
  "sgd": dict(momentum=0.0, dampening=0.0, weight_decay=0.0),
  "rmsprop": dict(momentum=0.0, weight_decay=0.0),
  "adagrad": dict(lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0),
  "adamax": dict(weight_decay=0.0),
  "nadam": dict(weight_decay=0.0, momentum_decay=0.0),
  "nadam-decoupled": dict(weight_decay=0.0, momentum_decay=0.0, decoupled_weight_decay=True),
  "radam": dict(weight_decay=0.0),
  "radam-decoupled": dict(weight_decay=0.0, decoupled_weight_decay=True),
  "adadelta": dict(weight_decay=0.0, eps=0.0),
  "rprop": dict(maximize=True),
  "asgd": dict(weight_decay=0.0, lambd=0.0),
  "torch.Adadelta": dict(weight_decay=0.0),
  "torch.Rprop": dict(maximize=False),
  "torch.ASGD": dict(weight_decay=0.0, lambd=0.0),
  "torch.Adam": dict(weight_decay=0.0),
  "torch.AdamW": dict(weight_decay=0.0),
  "torch.SGD": dict(momentum=0.0, dampening=0.0, weight_decay=0.0),
  "torch.RMSprop": dict(momentum=0.0, weight_decay=0.0),
  "torch.Adagrad": dict(lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0),
  "torch.Adamax": dict(weight_decay=0.0),
  "torch.NAdam": dict(weight_decay=0.0, momentum_decay=0.0),
  "torch.RAdam": dict(weight_decay=0.0, decoupled_weight_decay=True),
}


def _factory(name):
  base = name.split("-")[0]
  module, _, attr = base.rpartition(".")
  return getattr(jadam.torch if module == "torch" else jadam, attr)


@pytest.mark.parametrize("zero", [False, True], ids=["default", "zero"])
@pytest.mark.parametrize("name", sorted(ZEROS))
def test_inject_hyperparams_inner_state_is_the_plain_state(name, zero):
  factory = _factory(name)
  kwargs = dict(ZEROS[name]) if zero else {k: v for k, v in ZEROS[name].items() if isinstance(v, bool)}
  lr = {"lr": 1e-2} if name.startswith("torch.") else {"learning_rate": 1e-2}
  with jax.enable_x64(True):
    params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64).reshape(2, 3), "b": jnp.full(3, 0.5, jnp.float64)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(3.0 * p + i) + 0.1 * i, params) for i in range(3)]
    plain = factory(**lr, **kwargs)
    injected = optax.inject_hyperparams(factory)(**lr, **kwargs)
    states, p1, p2 = [plain.init(params), injected.init(params)], params, params
    for g in grads:
      u1, states[0] = plain.update(g, states[0], p1)
      u2, states[1] = injected.update(g, states[1], p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    inner = states[1].inner_state
    assert jax.tree.structure(inner) == jax.tree.structure(states[0])
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(inner), strict=True):
      assert jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-300)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), p1, p2)
