"""jadam.adam and its relatives: optax parity, chex variants, tracing, scan, vmap, shard_map, pmap."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
from tests.helpers import parity as _parity
from tests.helpers import reference
from tests.helpers import rounding as _rounding

STEPS = 500


def _quadratic(n=4, steps=50, seed=0, scale=1.0):
  prob = _parity.problem(steps, n, seed=seed, scale=scale)
  return prob.params, prob.a, prob.b, prob.noise


class AdamReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("unit", 1.0), ("eps_dominated", 1e-7))
  def test_matches_reference_float64(self, scale):
    with jax.enable_x64(True):
      p0, a, b, noise = _quadratic(scale=scale)
      tx = jadam.adam(learning_rate=1e-3)
      theta = jnp.asarray(p0)
      state, update = self.variant(tx.init)(theta), self.variant(tx.update)
      thetas, grads = [], []
      for n in noise:
        g = jnp.asarray(a) * theta - jnp.asarray(b) + jnp.asarray(n)
        u, state = update(g, state, theta)
        chex.assert_trees_all_equal_dtypes(u, theta)
        theta = optax.apply_updates(theta, u)
        thetas.append(theta)
        grads.append(g)
      want = reference.adam(np.asarray(grads), p0, lr=1e-3)
      chex.assert_trees_all_close(np.asarray(thetas), want, rtol=1e-12, atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("adam", dict(), dict(amsgrad=None)),
    ("weight_decay", dict(weight_decay=0.1), dict(weight_decay=0.1)),
    ("amsgrad", dict(amsgrad=True), dict(amsgrad="torch")),
    ("maximize", dict(maximize=True), dict(maximize=True)),
    ("eps_root", dict(eps_root=1e-3), dict(eps_root=1e-3)),
  )
  def test_flags_match_reference_float64(self, kwargs, ref_kwargs):
    with jax.enable_x64(True):
      rng = np.random.default_rng(1)
      grads = rng.normal(size=(30, 3))
      p0 = rng.uniform(1, 2, 3)
      tx = jadam.adam(1e-2, **kwargs)
      theta = jnp.asarray(p0)
      state, update = self.variant(tx.init)(theta), self.variant(tx.update)
      for g, want in zip(grads, reference.adam(grads, p0, lr=1e-2, **ref_kwargs), strict=True):
        u, state = update(jnp.asarray(g), state, theta)
        theta = optax.apply_updates(theta, u)
        chex.assert_trees_all_close(theta, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
  "make_jadam, make_optax, hp",
  [
    (lambda: jadam.adam(1e-2), lambda: optax.adam(1e-2), dict(learning_rate=1e-2)),
    (
      lambda: jadam.adam(1e-2, 0.8, 0.99, 1e-6),
      lambda: optax.adam(1e-2, 0.8, 0.99, 1e-6),
      dict(learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-6),
    ),
    (
      lambda: jadam.adam(1e-2, eps_root=1e-8),
      lambda: optax.adam(1e-2, eps_root=1e-8),
      dict(learning_rate=1e-2, eps_root=1e-8),
    ),
    (
      lambda: jadam.adamw(1e-2, weight_decay=0.1),
      lambda: optax.adamw(1e-2, weight_decay=0.1),
      dict(learning_rate=1e-2, weight_decay=0.1),
    ),
    (
      lambda: jadam.adamw(1e-2, weight_decay=1e-4),
      lambda: optax.adamw(1e-2),
      dict(learning_rate=1e-2, weight_decay=1e-4),
    ),
  ],
  ids=["adam", "adam_betas_eps", "adam_eps_root", "adamw", "adamw_optax_default"],
)
def test_matches_optax(make_jadam, make_optax, hp):
  prob = _parity.problem(STEPS)
  with jax.enable_x64(True):
    got = _parity.run_jax(make_jadam(), prob, np.float64)
    want = _parity.run_optax(make_optax(), prob, np.float64)
  assert _parity.max_rel(got, want) <= 1e-12
  # float32: optax forms 1 - b**t in float32 (`power`), jadam does not. Step by step (optax starts each step from
  # jadam's parameters and gradient): within the rounding model's bound, a few ulps of the parameters.
  factory = jadam.adamw if "weight_decay" in hp else jadam.adam
  model = _rounding.of_alias(factory, hp)
  got32, grads32 = _parity.run_jax(make_jadam(), prob, np.float32, with_grads=True)
  per_step = _parity.run_optax(make_optax(), prob, np.float32, teacher=(got32, grads32))
  previous = np.concatenate([np.asarray(prob.params, np.float32)[None], got32[:-1]])
  bound = model(grads32, previous[0], teacher=previous, power=True)
  _rounding.assert_within(got32, per_step, _rounding.Gap(0.0, np.stack([s["params"].gap for s in bound])), "step")
  # Free, each on its own trajectory: the gradient a theta - b + noise carries the gaps into the next steps. The
  # bound sums magnitudes where the problem contracts, so it is loose (a few percent after 500 steps): the steps
  # above are the sharp comparison; this one says the trajectories do not part.
  a, b, noise = (np.asarray(x, np.float32) for x in (prob.a, prob.b, prob.noise))
  free = model(lambda theta, t: theta * a - b + noise[t - 1], previous[0], steps=STEPS, power=True)
  free = _rounding.Gap(0.0, np.stack([s["params"].gap for s in free]))
  _rounding.assert_within(got32, _parity.run_optax(make_optax(), prob, np.float32), free, "free")


ALIASES = {
  "adam": lambda: jadam.adam(1e-2),
  "adam_amsgrad_wd": lambda: jadam.adam(1e-2, weight_decay=0.1, amsgrad=True),
  "adamw": lambda: jadam.adamw(1e-2),
  "sgd_nesterov": lambda: jadam.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
  "rmsprop_centered_momentum": lambda: jadam.rmsprop(1e-2, centered=True, momentum=0.9),
  "adagrad": lambda: jadam.adagrad(1e-2, lr_decay=0.1),
}


def _params():
  return {
    "w": jnp.linspace(1.0, 2.0, 6, dtype=jnp.float32).reshape(2, 3),
    "h": jnp.linspace(1.0, 2.0, 4, dtype=jnp.bfloat16),
  }


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_no_retrace_on_second_step(name):
  tx = ALIASES[name]()
  params = _params()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.tree.map(lambda p: (p * p - 1).astype(p.dtype), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  chex.clear_trace_counter()
  state0 = tx.init(params)
  p1, state1 = step(params, state0)
  p2, state2 = step(p1, state1)  # a retrace here (changed dtypes or structure) would raise
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, p1, p2)
  assert not np.allclose(np.asarray(p2["w"]), np.asarray(params["w"]))


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_scan_keeps_state_dtypes_and_shapes(name):
  tx = ALIASES[name]()
  params = _params()

  def body(carry, _):
    params, state = carry
    grads = jax.tree.map(lambda p: (p - 1.5).astype(p.dtype), params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  state0 = tx.init(params)
  (params20, state20), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=20))((params, state0))
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state20)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, params20)
  chex.assert_tree_all_finite(params20)


def test_vmap_over_independent_problems():
  """A batch of 4 problems under jax.vmap: each member equals its own reference run."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(4, 40, 3))  # (batch, steps, n)
    p0 = rng.uniform(1, 2, (4, 3))
    tx = jadam.adam(1e-2, weight_decay=0.05, amsgrad=True)

    def run(p, gs):
      def body(carry, g):
        theta, state = carry
        u, state = tx.update(g, state, theta)
        theta = optax.apply_updates(theta, u)
        return (theta, state), theta

      return jax.lax.scan(body, (p, tx.init(p)), gs)[1]

    got = jax.jit(jax.vmap(run))(jnp.asarray(p0), jnp.asarray(grads))
    for i in range(4):
      want = reference.adam(grads[i], p0[i], lr=1e-2, weight_decay=0.05, amsgrad="torch")
      chex.assert_trees_all_close(np.asarray(got[i]), want, rtol=1e-12, atol=0)


SHARD_MAP_ALIASES = {
  "adam_wd": (lambda: jadam.adam(1e-2, weight_decay=0.1), functools.partial(reference.adam, lr=1e-2, weight_decay=0.1)),
  "sgd_momentum": (
    lambda: jadam.sgd(1e-2, momentum=0.9, dampening=0.1),
    functools.partial(reference.sgd, lr=1e-2, momentum=0.9, dampening=0.1),
  ),
  "rmsprop_centered_momentum": (
    lambda: jadam.rmsprop(1e-2, centered=True, momentum=0.5),
    functools.partial(reference.rmsprop, lr=1e-2, centered=True, momentum=0.5),
  ),
  "adagrad": (
    lambda: jadam.adagrad(1e-2, initial_accumulator_value=0.1),
    functools.partial(reference.adagrad, lr=1e-2, initial_accumulator_value=0.1),
  ),
}


@pytest.mark.parametrize("name", sorted(SHARD_MAP_ALIASES))
def test_shard_map_over_eight_devices(name):
  """The whole run (init included) inside jax.shard_map over 8 CPU devices equals the unsharded run."""
  assert jax.device_count() >= 8
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  make, ref = SHARD_MAP_ALIASES[name]
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    grads = jnp.asarray(rng.normal(size=(30, 16)))
    p0 = jnp.asarray(rng.uniform(1, 2, 16))
    tx = make()

    def run(p, gs):
      def body(carry, g):
        theta, state = carry
        u, state = tx.update(g, state, theta)
        return (optax.apply_updates(theta, u), state), None

      # init inside shard_map: the state must carry the shard's varying axes for scan to accept it.
      return jax.lax.scan(body, (p, tx.init(p)), gs)[0][0]

    sharded = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("x"), P(None, "x")), out_specs=P("x")))
    got = sharded(p0, grads)
    want = jax.jit(run)(p0, grads)
    chex.assert_trees_all_close(got, want, rtol=1e-14, atol=0)
    chex.assert_trees_all_close(np.asarray(got), ref(np.asarray(grads), np.asarray(p0))[-1], rtol=1e-12, atol=0)


def test_state_follows_named_sharding_of_params():
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  sharding = NamedSharding(mesh, P("x"))
  params = jax.device_put(jnp.linspace(1.0, 2.0, 32, dtype=jnp.float32), sharding)
  tx = jadam.adam(1e-2)
  state = jax.jit(tx.init)(params)
  grads = jax.device_put(jnp.full(32, 0.5, jnp.float32), sharding)
  updates, state = jax.jit(tx.update)(grads, state, params)
  moments_state = state[1]  # after add_l2
  assert moments_state.mu.sharding.is_equivalent_to(sharding, 1)
  assert moments_state.nu.sharding.is_equivalent_to(sharding, 1)
  assert updates.sharding.is_equivalent_to(sharding, 1)
  # the first step is -lr g / (|g| + eps): float32 against the exact value, within the rounding model's bound
  (model,) = _rounding.of_alias(jadam.adam, dict(learning_rate=1e-2), given_names=True)([np.asarray(grads)], params)
  _rounding.assert_within(updates, model["update"].value, model["update"])


class PmapTest(chex.TestCase):
  @chex.variants(with_pmap=True, with_jit=True, without_jit=True)
  def test_pmap_variant_same_numbers_as_no_jit(self):
    """The update pmapped over the CPU devices (args broadcast) gives the reference numbers, as no-jit does."""
    with jax.enable_x64(True):
      rng = np.random.default_rng(4)
      grads = rng.normal(size=(10, 3))
      p0 = rng.uniform(1, 2, 3)
      tx = jadam.adam(1e-2, amsgrad=True, weight_decay=0.1)

      @self.variant
      def step(g, state, theta):
        u, state = tx.update(g, state, theta)
        return optax.apply_updates(theta, u), state

      theta, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
      plain_theta, plain_state = theta, state
      for g, want in zip(grads, reference.adam(grads, p0, lr=1e-2, amsgrad="torch", weight_decay=0.1), strict=True):
        theta, state = step(jnp.asarray(g), state, theta)
        u, plain_state = tx.update(jnp.asarray(g), plain_state, plain_theta)
        plain_theta = optax.apply_updates(plain_theta, u)
        chex.assert_trees_all_close(theta, plain_theta, rtol=1e-14, atol=0)
        chex.assert_trees_all_close(theta, want, rtol=1e-12, atol=0)


WRAPPERS = {
  "multi_steps": lambda adam: optax.MultiSteps(adam, every_k_schedule=3),
  "apply_if_finite": lambda adam: optax.apply_if_finite(adam, max_consecutive_errors=2),
  "masked": lambda adam: optax.masked(adam, {"w": True, "b": False}),
  "multi_transform": lambda adam: optax.multi_transform({"a": adam, "z": optax.set_to_zero()}, {"w": "a", "b": "z"}),
  "clip_chain": lambda adam: optax.chain(optax.clip_by_global_norm(1.0), adam),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_composes_with_optax_wrappers_like_optax_adam(wrapper):
  """jadam.adam inside optax's wrappers gives what optax.adam gives inside them (float64)."""
  wrap = WRAPPERS[wrapper]
  with jax.enable_x64(True):
    rng = np.random.default_rng(8)
    params = {"w": jnp.asarray(rng.uniform(1, 2, (2, 3))), "b": jnp.asarray(rng.uniform(1, 2, 3))}
    grads = [
      jax.tree.map(lambda p, i=i: jnp.asarray(np.random.default_rng(i).normal(size=p.shape)), params) for i in range(9)
    ]
    grads[4] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[4])  # apply_if_finite skips it
    results = []
    # optax.MultiSteps itself divides a float by its int32 counter: it needs standard promotion.
    jadam_promotion = "standard" if wrapper == "multi_steps" else "strict"
    for tx, promotion in ((wrap(jadam.adam(1e-2)), jadam_promotion), (wrap(optax.adam(1e-2)), "standard")):
      with jax.numpy_dtype_promotion(promotion):
        p, state = params, tx.init(params)
        step = jax.jit(tx.update)
        for g in grads if wrapper in ("apply_if_finite",) else grads[:4] + grads[5:]:
          u, state = step(g, state, p)
          p = optax.apply_updates(p, u)
        results.append(p)
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-12, atol=0)
    assert not np.allclose(np.asarray(results[0]["w"]), np.asarray(params["w"]))
    chex.assert_tree_all_finite(results[0])


def test_vmap_over_learning_rates_is_a_sweep():
  """Hyperparameters as traced values: a vmap over learning rates equals separate runs."""
  rng = np.random.default_rng(9)
  grads = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
  p0 = jnp.asarray(rng.uniform(1, 2, 3), jnp.float32)

  def run(lr):
    tx = jadam.adam(lr, weight_decay=0.1)

    def body(carry, g):
      theta, state = carry
      u, state = tx.update(g, state, theta)
      return (optax.apply_updates(theta, u), state), None

    return jax.lax.scan(body, (p0, tx.init(p0)), grads)[0][0]

  lrs = jnp.asarray([1e-3, 1e-2, 3e-2], jnp.float32)
  swept = jax.jit(jax.vmap(run))(lrs)
  for i, lr in enumerate(lrs):
    # the same float32 hyperparameters, batched or not: within the rounding model's bound of each other
    model = _rounding.of_alias(jadam.adam, dict(learning_rate=lr, weight_decay=0.1))(np.asarray(grads), p0)
    _rounding.assert_within(swept[i], jax.jit(run)(lr), model[-1]["params"], f"lr={lr}")
  assert not np.allclose(np.asarray(swept[0]), np.asarray(swept[2]))
