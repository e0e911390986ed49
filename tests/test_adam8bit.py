"""8-bit block-wise quantized moments (jadam.Quantized, adam8bit): layout, numerics, composability, bad input."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jadam
from jadam import _quantize


def _bnb():
  pytest.importorskip("torch")
  return pytest.importorskip("bitsandbytes")


def _state_bytes_per_param(state, n):
  return sum(x.nbytes for x in jax.tree.leaves(state) if jnp.ndim(x) > 0) / n


def _run(tx, grads, params, *, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# --- the map and the quantizer -------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
  F = _bnb().functional
  ours, theirs = _quantize.dynamic_map(signed), F.create_dynamic_map(signed=signed).numpy()
  # torch.linspace rounds a few grid points one ulp away from numpy's.
  np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=0)
  assert np.all(np.diff(ours) >= 0) and ours[-1] == 1 and (0.0 in ours)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest(signed):
  rng = np.random.default_rng(0)
  bounds = _quantize._BOUNDS[signed]
  y = np.concatenate([rng.uniform(-1, 1, 20000), 10.0 ** rng.uniform(-12, 0, 20000), bounds])
  y = np.concatenate([y, np.nextafter(bounds, np.float32(2)), -y]).astype(np.float32)
  y = np.clip(y, -1, 1)
  expected = np.searchsorted(bounds, y, side="left")  # nearest code, ties to the lower one
  np.testing.assert_array_equal(np.asarray(_quantize._codes(jnp.asarray(y), signed)), expected)


def test_round_trip_against_bitsandbytes():
  """Same blocks: bitsandbytes' codes and scales read back by jadam give bitsandbytes' values; jadam's error is no larger."""
  torch = pytest.importorskip("torch")
  F = _bnb().functional
  rng = np.random.default_rng(1)
  g = (rng.standard_normal(8192) * 10.0 ** rng.uniform(-6, 0, 8192)).astype(np.float32)
  for x, signed in ((g, True), (g * g, False)):
    qb, st = F.quantize_blockwise(torch.from_numpy(x), code=F.create_dynamic_map(signed=signed), blocksize=256)
    theirs = F.dequantize_blockwise(qb, st).numpy()
    q = _quantize.quantize(jnp.asarray(x), 256, signed=signed)
    np.testing.assert_array_equal(np.asarray(q.absmax), st.absmax.numpy())
    read = _quantize.dequantize(
      _quantize.QuantizedArray(jnp.asarray(qb.numpy()), jnp.asarray(st.absmax.numpy())), 256, signed=signed
    )
    np.testing.assert_allclose(np.asarray(read), theirs, rtol=5e-7, atol=0)  # the maps differ by an ulp
    back = np.asarray(_quantize.dequantize(q, 256, signed=signed))
    assert np.linalg.norm(back - x) <= np.linalg.norm(theirs - x) * 1.0001


def test_layout_and_padding():
  assert _quantize.absmax_shape((64, 512), 256) == (64, 2)  # per-row blocks
  assert _quantize.absmax_shape((3, 3, 32, 64), 256) == (72,)  # flat, as bitsandbytes
  assert _quantize.absmax_shape((1000,), 256) == (4,)  # last block padded
  x = jax.random.normal(jax.random.key(0), (1000,))
  for shape in [(1000,), (8, 125), (2, 500)]:
    q = _quantize.quantize(x.reshape(shape), 128, signed=True)
    assert q.codes.shape == shape and q.codes.dtype == jnp.uint8
    back = _quantize.dequantize(q, 128, signed=True)
    np.testing.assert_allclose(back.reshape(-1), x, atol=0.02 * float(jnp.max(jnp.abs(x))))
  # The same values in rows of 512 or flat give the same codes: per-row blocks are bitsandbytes' blocks.
  a = _quantize.quantize(x[:512].reshape(2, 256), 256, signed=True)
  b = _quantize.quantize(x[:512], 256, signed=True)
  np.testing.assert_array_equal(a.codes.reshape(-1), b.codes)
  np.testing.assert_array_equal(a.absmax.reshape(-1), b.absmax)


def test_v_never_rounds_to_zero_and_zero_blocks_stay_zero():
  v = jnp.concatenate([jnp.ones(1), jnp.full(255, 1e-12)])
  q = _quantize.quantize(v, 256, signed=False)
  assert int(jnp.min(q.codes)) == 1  # the smallest positive code, not zero
  z = _quantize.quantize(jnp.zeros(256), 256, signed=False)
  assert float(jnp.max(jnp.abs(_quantize.dequantize(z, 256, signed=False)))) == 0.0
  m = _quantize.quantize(jnp.concatenate([jnp.ones(1), jnp.full(255, 1e-12)]), 256, signed=True)
  assert float(jnp.abs(_quantize.dequantize(m, 256, signed=True)[1])) == 0.0  # m may round to zero


# --- the optimizer ---------------------------------------------------------------


def test_state_is_about_two_bytes_per_parameter():
  n = 1024 * 1024
  params = {"w": jnp.zeros((1024, 1024))}
  tx = jadam.adam8bit(1e-3)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  per_param = _state_bytes_per_param(state, n)
  assert 2.0 < per_param <= 2.1, per_param
  moments = state[1]  # add_l2 comes first (its weight_decay 0)
  assert moments.mu.codes["w"].dtype == jnp.uint8 and moments.nu.absmax["w"].shape == (1024, 4)


def test_small_leaves_are_exactly_adam():
  key = jax.random.split(jax.random.key(0), 3)
  params = {"big": jax.random.normal(key[0], (16, 512)), "small": jax.random.normal(key[1], (100,))}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(5)]
  p8, _ = _run(jadam.adam8bit(1e-2, weight_decay=1e-3), grads, params)
  p32, _ = _run(jadam.adam(1e-2, weight_decay=1e-3), grads, params)
  np.testing.assert_array_equal(p8["small"], p32["small"])
  assert not np.array_equal(p8["big"], p32["big"])
  np.testing.assert_allclose(p8["big"], p32["big"], atol=5 * 1e-2 * 0.05)


def test_close_to_adam_on_one_scale():
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((64, 256))}
  grads = [{"w": jnp.asarray(rng.standard_normal((64, 256)) + 0.5, jnp.float32)} for _ in range(30)]
  p8, _ = _run(jadam.adam8bit(1e-3), grads, params)
  p32, _ = _run(jadam.adam(1e-3), grads, params)
  rel = float(jnp.linalg.norm(p8["w"] - p32["w"]) / jnp.linalg.norm(p32["w"]))
  assert rel < 0.02, rel


def test_no_farther_from_adam_than_bitsandbytes():
  """The fast version of benchmarks/adam8bit_fidelity.py: scales over six decades in each block."""
  bnb = _bnb()
  torch = pytest.importorskip("torch")
  from benchmarks import adam8bit_fidelity as fid

  n, steps = 16384, 60
  grads = fid.gradients(n, steps)
  start = np.zeros(n, np.float32)
  ours = fid.distances(
    fid.run_jadam(jadam.adam8bit(1e-3), grads, start), fid.run_jadam(jadam.adam(1e-3), grads, start), start
  )
  theirs = fid.distances(
    fid.run_torch(lambda p: bnb.optim.Adam8bit(p, lr=1e-3), grads, start),
    fid.run_torch(lambda p: torch.optim.Adam(p, lr=1e-3), grads, start),
    start,
  )
  assert ours[0] <= theirs[0], (ours, theirs)


def test_torch_front_is_bitsandbytes_arguments():
  params = {"w": jnp.linspace(-1, 1, 8192).reshape(16, 512)}
  grads = [jax.tree.map(lambda p, i=i: jnp.cos(p * (i + 1)), params) for i in range(3)]
  a, _ = _run(jadam.torch.Adam8bit(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1), grads, params)
  b, _ = _run(jadam.adamw8bit(1e-2, b1=0.8, b2=0.99, weight_decay=0.1), grads, params)
  np.testing.assert_array_equal(a["w"], b["w"])
  c, _ = _run(jadam.torch.AdamW8bit(lr=1e-2), grads, params)
  d, _ = _run(jadam.adamw8bit(1e-2, weight_decay=1e-2), grads, params)
  np.testing.assert_array_equal(c["w"], d["w"])
  with pytest.raises(ValueError, match="amsgrad"):
    jadam.torch.Adam8bit(amsgrad=True)
  with pytest.raises(ValueError, match="optim_bits"):
    jadam.torch.AdamW8bit(optim_bits=8)


def test_against_bitsandbytes_adam8bit_one_scale():
  """On gradients of one scale jadam's and bitsandbytes' 8-bit trajectories agree closely (no shared rounding)."""
  bnb = _bnb()
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  n = 8192
  grads = (rng.standard_normal((20, n)) + 0.2).astype(np.float32)
  p = torch.nn.Parameter(torch.zeros(n))
  opt = bnb.optim.Adam8bit([p], lr=1e-3, weight_decay=0.1)
  for g in grads:
    p.grad = torch.from_numpy(g)
    opt.step()
  ours, _ = _run(jadam.torch.Adam8bit(lr=1e-3, weight_decay=0.1), [jnp.asarray(g) for g in grads], jnp.zeros(n))
  ours, theirs = np.asarray(ours), p.detach().numpy()
  # bitsandbytes' CPU search picks another code now and then (an approximate binary search).
  assert np.mean(np.abs(ours - theirs) < 1e-5) > 0.95
  assert np.linalg.norm(ours - theirs) < 0.01 * np.linalg.norm(theirs)


# --- composability ----------------------------------------------------------------


def test_chain_of_stages_amsgrad_and_schedules():
  spec = jadam.Quantized(block_size=128)
  tx = optax.chain(
    jadam.scale_by_moments(0.9, 0.99, mu_dtype=spec, nu_dtype=spec),
    jadam.max_nu(),
    jadam.bias_correct(),
    jadam.normalize(1e-8),
    jadam.scale_by_lr(optax.linear_schedule(1e-2, 1e-3, 10)),
  )
  params = {"w": jnp.ones((4, 256))}
  new, state = _run(tx, [params] * 3, params)
  assert jnp.all(jnp.isfinite(new["w"])) and state[1].nu_max["w"].dtype == jnp.float32
  new2, _ = _run(
    jadam.adam8bit(optax.linear_schedule(1e-2, 1e-3, 10), amsgrad=True, min_8bit_size=0), [params] * 3, params
  )
  assert jnp.all(new2["w"] < 1)


def test_inject_hyperparams_needs_static_block_size():
  params = {"w": jnp.ones((8, 512))}
  tx = optax.inject_hyperparams(jadam.adam8bit, static_args=("block_size", "min_8bit_size", "amsgrad", "maximize"))(
    learning_rate=1e-2, block_size=256
  )
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(1e-3)
  updates, _ = jax.jit(tx.update)(params, state, params)
  np.testing.assert_allclose(updates["w"], -1e-3, rtol=1e-5)
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(jadam.adam8bit, static_args=("amsgrad", "maximize"))(1e-2).init(params)


def test_apply_if_finite_keeps_the_codes():
  params = {"w": jnp.ones((8, 512))}
  tx = optax.apply_if_finite(jadam.adam8bit(1e-2), max_consecutive_errors=3)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  bad = {"w": params["w"].at[0, 0].set(jnp.nan)}
  _, after = tx.update(bad, state, params)
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(after.inner_state)):
    np.testing.assert_array_equal(a, b)


def test_jit_no_retrace_no_host_transfer():
  traces = []
  tx = jadam.adam8bit(1e-3)

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.ones((8, 512)), "b": jnp.ones(3)}
  state = tx.init(params)
  params, state = step(params, state, params)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      params, state = step(params, state, params)
  assert len(traces) == 1


def test_step_helpers():
  tx = jadam.adam8bit(1e-3)
  params = {"w": jnp.linspace(0, 1, 8192).reshape(16, 512)}
  state = tx.init(params)
  step = jadam.make_update_step(tx, donate=False)
  p1, s1 = step(params, state, params)
  updates, s2 = jax.jit(tx.update)(params, state, params)
  np.testing.assert_allclose(p1["w"], optax.apply_updates(params, updates)["w"], rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(s1[1].mu.codes["w"], s2[1].mu.codes["w"])


def test_checkpoint_round_trip_and_float32_mismatch(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  params = {"w": jax.random.normal(jax.random.key(0), (16, 512)), "b": jnp.ones(4)}
  tx = jadam.adam8bit(1e-2)
  _, state = _run(tx, [params] * 2, params)
  jadam.save_state(os.fspath(tmp_path / "s"), state)
  restored = jadam.restore_state(os.fspath(tmp_path / "s"), tx.init(params))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=re.escape(".mu")) as e:
    jadam.restore_state(os.fspath(tmp_path / "s"), jadam.adam(1e-2).init(params))
  assert "codes" in str(e.value)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")
@pytest.mark.parametrize("spec", [P("data", None), P(None, "data")])
def test_sharded_like_the_params(spec):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, spec)
  w = jax.device_put(jax.random.normal(jax.random.key(0), (16, 2048)), sharding)  # 256 columns per shard
  tx = jadam.adam8bit(1e-3)
  state = tx.init({"w": w})
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  hlo = step.lower({"w": w}, state, {"w": w}).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|collective-permute|all-to-all", hlo)
  updates, state = step({"w": w}, state, {"w": w})
  for moment in (state[1].mu, state[1].nu):
    assert moment.codes["w"].sharding.is_equivalent_to(sharding, 2)
    assert moment.absmax["w"].sharding.is_equivalent_to(sharding, 2)
  single, _ = jax.jit(lambda p, s, g: tx.update(g, s, p))(
    {"w": jax.device_get(w)}, tx.init({"w": jnp.asarray(jax.device_get(w))}), {"w": jnp.asarray(jax.device_get(w))}
  )
  np.testing.assert_array_equal(updates["w"], single["w"])


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [0, -256, 3, 100])
def test_block_size_must_be_a_power_of_two(block_size):
  with pytest.raises(ValueError, match="block_size must be a positive power of two"):
    jadam.adam8bit(block_size=block_size)


@pytest.mark.parametrize("block_size", [256.0, True, "256", np.array(256.0)])
def test_block_size_must_be_an_int(block_size):
  with pytest.raises(TypeError, match="block_size"):
    jadam.Quantized(block_size=block_size)


def test_min_8bit_size_checked():
  with pytest.raises(ValueError, match="min_8bit_size"):
    jadam.adam8bit(min_8bit_size=-1)


def test_integer_and_complex_leaves_fall_back():
  params = {
    "w": jnp.ones((4, 256)),
    "steps": jnp.zeros(3, jnp.int32),
    "z": jnp.ones(5000, jnp.complex64) * (1 + 1j),
  }
  grads = {"w": params["w"], "steps": params["steps"], "z": params["z"] * 0.5}
  tx = jadam.adam8bit(1e-3)
  state = tx.init(params)
  assert state[1].mu.codes["z"].dtype == jnp.complex64  # documented fallback: the moment jadam.adam keeps
  assert state[1].mu.codes["steps"].dtype == jnp.int32
  updates, _ = jax.jit(tx.update)(grads, state, params)
  expected, _ = jax.jit(jadam.adam(1e-3).update)(grads, jadam.adam(1e-3).init(params), params)
  np.testing.assert_array_equal(updates["z"], expected["z"])
  np.testing.assert_array_equal(updates["steps"], jnp.zeros(3, jnp.int32))  # integer leaves do not move


def test_quantized_spec_is_refused_by_a_float_dtype_argument():
  with pytest.raises(TypeError, match="nu_dtype"):
    jadam.max_nu(nu_dtype=jadam.Quantized())


def test_benchmark_rows_run(capsys):
  from benchmarks import adam8bit_fidelity, memory

  row = memory.measure_one("jadam.adam8bit", 1 << 16, steps=1)
  assert 2.0 < row["state_bytes_per_param"] <= 2.1
  adam8bit_fidelity.main(["--n", "4096", "--steps", "3"])
  assert "| jadam.adam8bit vs jadam.adam |" in capsys.readouterr().out
