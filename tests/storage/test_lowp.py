"""bfloat16 moments: stochastic rounding decays as beta^t on average, lowers memory, reproduces."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._storage import bf16 as _lowp


def _bf16_neighbours(x):
  """The two bfloat16 values around each float32 `x` (truncation and the next one up in magnitude)."""
  bits = np.asarray(x, np.float32).view(np.uint32)
  low = (bits & np.uint32(0xFFFF0000)).view(np.float32)
  high = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
  return low, high


def test_round_to_bfloat16_is_unbiased_and_picks_a_neighbour():
  x = jax.random.uniform(jax.random.key(0), (512,), jnp.float32, -3.0, 3.0)
  rounds = jax.jit(jax.vmap(lambda t: _lowp.round_to_bfloat16(x, t, 0)))(jnp.arange(4000))
  got = np.asarray(rounds, np.float32)
  low, high = _bf16_neighbours(x)
  assert np.all((got == low) | (got == high))
  spacing = np.abs(high - low)
  # mean of 4000 Bernoulli draws: standard error <= spacing / (2 sqrt(4000)) ~ spacing / 126
  np.testing.assert_array_less(np.abs(got.mean(0) - np.asarray(x)), spacing / 20)
  # round-to-nearest would be off by up to half a spacing, on average spacing / 4
  nearest = np.asarray(x.astype(jnp.bfloat16), np.float32)
  assert np.mean(np.abs(nearest - np.asarray(x)) / spacing) > 0.2
  assert np.mean(np.abs(got.mean(0) - np.asarray(x)) / spacing) < 0.02


def test_round_to_bfloat16_keeps_exact_values_and_non_finite():
  x = jnp.array([0.0, -0.0, 1.0, -2.5, 3.0e38, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  for t in range(5):
    got = np.asarray(_lowp.round_to_bfloat16(x, jnp.int32(t), 3), np.float32)
    np.testing.assert_array_equal(got[:4], np.asarray(x[:4]))
    assert got[5] == np.inf and got[6] == -np.inf and np.isnan(got[7])


def test_bits_are_deterministic_and_vary_with_step_and_stream():
  a = _lowp.hash_bits((64, 3), jnp.int32(7), 1)
  np.testing.assert_array_equal(a, _lowp.hash_bits((64, 3), jnp.int32(7), 1))
  assert np.mean(np.asarray(a) == np.asarray(_lowp.hash_bits((64, 3), jnp.int32(8), 1))) < 0.01
  assert np.mean(np.asarray(a) == np.asarray(_lowp.hash_bits((64, 3), jnp.int32(7), 3))) < 0.01
  # roughly uniform: each of the 16 top bits set about half the time
  top = (np.asarray(_lowp.hash_bits((4096,), jnp.int32(1), 0)) >> 16)[:, None] >> np.arange(16) & 1
  np.testing.assert_allclose(top.mean(0), 0.5, atol=0.05)


def _run(tx, params, grads_fn, steps):
  state = tx.init(params)

  def body(state, t):
    _, state = tx.update(grads_fn(t), state, params)
    return state, None

  return jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(steps))[0])(state)


def test_zero_gradient_second_moment_decays_as_b2_to_the_t():
  params = jnp.zeros(4096, jnp.float32)
  tx = jadam.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  ones = jnp.ones_like(params)
  state = _run(tx, params, lambda t: jnp.where(t == 0, ones, 0 * ones), 1001)
  mu, nu = state[1].mu, state[1].nu
  assert mu.dtype == nu.dtype == jnp.bfloat16
  want_nu = 0.001 * 0.999**1000  # 0.37 of the first value: round-to-nearest would keep 0.001
  want_mu = 0.1 * 0.9**1000
  np.testing.assert_allclose(np.asarray(nu, np.float32).mean(), want_nu, rtol=2**-8)
  # each element too: the rounding noise accumulates like an AR(1) walk with
  # per-step size 2^-9 and memory 1/(1 - b2), a few percent of the value
  assert np.asarray(nu, np.float32).std() < 0.1 * want_nu
  np.testing.assert_allclose(np.asarray(nu, np.float32), want_nu, rtol=0.3)
  np.testing.assert_allclose(np.asarray(mu, np.float32).mean(), want_mu, atol=1e-30)
  mu = _run(tx, params, lambda t: jnp.where(t == 0, ones, 0 * ones), 41)[1].mu
  np.testing.assert_allclose(np.asarray(mu, np.float32).mean(), 0.1 * 0.9**40, rtol=2**-8)


def test_constant_gradient_second_moment_stays_near_g_squared():
  params = jnp.zeros(4096, jnp.float32)
  g = jnp.full_like(params, 0.3)
  for nu_dtype in (jnp.bfloat16, jnp.float32):
    state = _run(jadam.adam(1e-3, nu_dtype=nu_dtype), params, lambda t: g, 3000)
    nu = np.asarray(state[1].nu, np.float32)
    want = 0.09 * (1 - 0.999**3000)
    np.testing.assert_allclose(nu.mean(), want, rtol=2**-8)
    np.testing.assert_allclose(nu, want, rtol=0.2)  # no element collapses
  # round-to-nearest in bf16 stalls well below g^2: the increment 0.001 (g^2 - v) drops under half an ulp
  v = jnp.bfloat16(0.0)
  for _ in range(3000):
    v = (0.999 * v.astype(jnp.float32) + 0.001 * 0.09).astype(jnp.bfloat16)
  assert float(v) < 0.8 * want


def test_bf16_moments_track_float32_training():
  key = jax.random.key(1)
  params = {"w": jax.random.normal(key, (32, 16)), "b": jnp.zeros(16)}
  x = jax.random.normal(jax.random.key(2), (64, 32))

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - 0.5) ** 2)

  def train(tx):
    state = tx.init(params)

    def body(carry, _):
      p, s = carry
      p, s = jadam.update_and_apply(tx, jax.grad(loss)(p), s, p)
      return (p, s), loss(p)

    return jax.jit(lambda: jax.lax.scan(body, (params, state), length=300))()

  (p32, _), l32 = train(jadam.adam(1e-2))
  (p16, s16), l16 = train(jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16))
  assert jax.tree.leaves(s16[1].nu)[0].dtype == jnp.bfloat16
  assert float(l16[-1]) < 0.5 * float(l16[0])
  np.testing.assert_allclose(float(l16[-1]), float(l32[-1]), rtol=0.05)
  (p16b, _), _ = train(jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16))
  chex.assert_trees_all_equal(p16, p16b)  # reproducible: the bits are a function of the step


def _state_bytes(state):
  return sum(x.nbytes for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)


@pytest.mark.parametrize(("kwargs", "per_param"), [({}, 8), ({"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, 4)])
def test_state_bytes_per_parameter(kwargs, per_param):
  params = {"a": jnp.zeros((100, 30)), "b": jnp.zeros(1000)}
  assert _state_bytes(jadam.adam(**kwargs).init(params)) == per_param * 4000


def test_bf16_moments_lower_the_compiled_step_memory():
  params = jnp.zeros(1 << 20, jnp.float32)

  def peak(tx):
    state = tx.init(params)
    mem = jadam.make_update_step(tx).lower(params, state, params).compile().memory_analysis()
    if mem is None:
      pytest.skip("no memory_analysis on this backend")
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes

  fp32, bf16 = peak(jadam.adam()), peak(jadam.adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16))
  assert bf16 <= fp32 - 3 * (1 << 20)  # 4 of the 8 state bytes per parameter saved, less slack


def test_optax_interop_with_bf16_moments():
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-3, nu_dtype=jnp.bfloat16))
  params = jnp.ones(8)
  updates, state = jax.jit(tx.update)(jnp.full(8, 0.5), tx.init(params), params)
  np.testing.assert_allclose(updates, -1e-3, rtol=1e-2)
  assert state[1][1].nu.dtype == jnp.bfloat16
