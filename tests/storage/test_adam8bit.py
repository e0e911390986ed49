"""8-bit block-wise quantized moments (jadam.Quantized, adam8bit): layout, numerics, composability, bad input."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
from jadam._storage import quantize as _quantize
from tests.helpers import rounding as _rounding


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


def _dynamic_map_model(signed):
  """bitsandbytes' map (jadam._storage.quantize.dynamic_map's formulas) in the rounding model's arithmetic, sorted:
  how far two float32 programs' maps may be apart. A linspace point 0.1 + k (1 - 0.1) / (n - 1) carries the
  rounding of its step k-fold, whatever the library's order (torch.linspace counts from either end)."""
  values = [_rounding.Gap(0.0), _rounding.Gap(1.0)]
  for i in range(7):
    items = 2**i + 1 if signed else 2 ** (i + 1) + 1
    start = _rounding.given(0.1)
    step = (1 - start) / (items - 1)
    grid = [start + step * k for k in range(items)]
    for a, b in zip(grid[:-1], grid[1:], strict=True):
      x = _rounding.lift(_f32(10.0 ** (-6 + i))) * ((a + b) / 2)
      values += [x, -x] if signed else [x]
  values += [_rounding.Gap(0.0)] * (256 - len(values))
  order = np.argsort([float(v.value) for v in values], kind="stable")
  return _rounding.Gap([values[i].value for i in order], [values[i].gap for i in order])


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
  F = _bnb().functional
  ours, theirs = _quantize.dynamic_map(signed), F.create_dynamic_map(signed=signed).numpy()
  # numpy's linspace and torch's round the grid otherwise: within the rounding model's bound
  _rounding.assert_within(ours, theirs, _dynamic_map_model(signed))
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
  """Same blocks: bitsandbytes' codes and scales read back by jadam give its values; jadam's error is no larger."""
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
    # the maps within the rounding model's bound of each other, times the same scale, rounded
    values = _dynamic_map_model(signed)
    scales = np.repeat(st.absmax.numpy(), 256)[: x.size]
    code = qb.numpy().astype(int)
    bound = _rounding.Gap(values.value[code], values.gap[code]) * scales
    _rounding.assert_within(read, theirs, bound)
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
  # a block of ones is coded exactly: the first step -lr g / (|g| + eps), float32 against the exact value
  (model,) = _rounding.adam([np.ones((8, 512))], np.ones((8, 512)), lr=_rounding.given(1e-3))
  _rounding.assert_within(updates["w"], model["update"].value, model["update"])
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(jadam.adam8bit, static_args=("amsgrad", "maximize"))(1e-2).init(params)


def test_apply_if_finite_keeps_the_codes():
  params = {"w": jnp.ones((8, 512))}
  tx = optax.apply_if_finite(jadam.adam8bit(1e-2), max_consecutive_errors=3)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  bad = {"w": params["w"].at[0, 0].set(jnp.nan)}
  _, after = tx.update(bad, state, params)
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(after.inner_state), strict=True):
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
  want = (optax.apply_updates(params, updates), s2)
  _assert_q8_step_within_model(
    (p1, s1), want, (params, state), params, dict(lr=_f32(1e-3)), t=1, block_size=256, what=""
  )


def test_checkpoint_round_trip_and_float32_mismatch(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  params = {"w": jax.random.normal(jax.random.key(0), (16, 512)), "b": jnp.ones(4)}
  tx = jadam.adam8bit(1e-2)
  _, state = _run(tx, [params] * 2, params)
  jadam.save_state(os.fspath(tmp_path / "s"), state)
  restored = jadam.restore_state(os.fspath(tmp_path / "s"), tx.init(params))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # another optimizer's state: refused naming both (the checkpoint records which optimizer wrote it)
  with pytest.raises(ValueError, match=r"written by jadam.adam8bit .* a state of jadam.adam \("):
    jadam.restore_state(os.fspath(tmp_path / "s"), jadam.adam(1e-2).init(params))
  # a state of the same optimizer with float32 moments (its leaves differ): the first leaf that differs
  with pytest.raises(ValueError, match=re.escape(".mu")) as e:
    jadam.restore_state(os.fspath(tmp_path / "s"), jadam.adam8bit(1e-2, min_8bit_size=10**9).init(params))
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


# --- the fused CPU kernel (jadam/_kernels: jadam_adam_f32_q8) ------------------------


def _paths(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _block_max(x, block_size):
  """The maximum of each block of `x` (>= 0, float64), as the absmax, and broadcast back to one per value."""
  per_row, _ = _quantize._blocks(x.shape, block_size)
  if per_row:
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size).max(-1)
    return blocks, np.repeat(blocks, block_size, axis=-1).reshape(x.shape)
  flat = np.zeros(-(-x.size // block_size) * block_size)
  flat[: x.size] = x.reshape(-1)
  blocks = flat.reshape(-1, block_size).max(-1)
  return blocks, np.repeat(blocks, block_size)[: x.size].reshape(x.shape)


def _f32(x):
  return float(np.float32(x))


def _assert_q8_step_within_model(got, want, start, grads, hp, *, t, block_size, what):
  """`got` and `want`, two programs' (params, state) after step `t` of 8-bit Adam (`hp`: tests/helpers/rounding.adam's
  keywords, for every leaf) from `start` = (params, state) and `grads`, within the rounding model's bound.

  The step reads the old moments as both programs decode them (the same codes and scales) and passes the new
  moments on unquantized, so the parameters (and the moments of leaves kept in float32) are the float32 model's.
  Each block's scale is the maximum of |m|: within the block's largest gap of m (the maximum is 1-Lipschitz). A code
  may differ, by one, only where a boundary of the map lies within the gap of m / scale; elsewhere it is the same.
  """
  params, state = start
  before, got_s, want_s = _paths(state), _paths(got[1]), _paths(want[1])
  checked = set()
  for name, p in params.items():
    key = f"[{name!r}]"
    stored = {
      (k, part): before[next(q for q in before if f".{k}.{part}{key}" in q)]
      for k in ("mu", "nu")
      for part in ("codes", "absmax")
    }
    quantized = stored["mu", "codes"].dtype == np.uint8
    moments = {
      k: np.asarray(
        _quantize.dequantize(
          _quantize.QuantizedArray(stored[k, "codes"], stored[k, "absmax"]), block_size, signed=k == "mu"
        )
      )
      if quantized
      else stored[k, "codes"]
      for k in ("mu", "nu")
    }
    g = grads[name] if isinstance(grads[name], _rounding.Gap) else np.asarray(grads[name])
    (step,) = _rounding.adam([g], np.asarray(p), start=moments, t0=t - 1, **hp)
    _rounding.assert_within(got[0][name], want[0][name], step["params"], f"{what} params {name}")
    for k in ("mu", "nu"):
      codes, scales = (next(q for q in got_s if q.endswith(f".{k}.{part}{key}")) for part in ("codes", "absmax"))
      checked.update((codes, scales))
      m = step[k]
      if not quantized:
        _rounding.assert_within(got_s[codes], want_s[codes], m, f"{what} {codes}")
        continue
      blocks, per_value = _block_max(np.abs(m.value), block_size)
      block_gaps, gaps = _block_max(m.gap, block_size)
      _rounding.assert_within(got_s[scales], want_s[scales], _rounding.Gap(blocks, block_gaps), f"{what} {scales}")
      a, b = got_s[codes].astype(int), want_s[codes].astype(int)
      assert np.max(np.abs(a - b), initial=0) <= 1, (what, codes)
      x = m / _rounding.Gap(np.where(per_value > 0, per_value, 1.0), gaps)
      bounds = _quantize._BOUNDS[k == "mu"].astype(np.float64)
      i = np.clip(np.searchsorted(bounds, x.value), 1, bounds.size - 1)
      near = np.minimum(np.abs(x.value - bounds[i - 1]), np.abs(x.value - bounds[i]))
      assert np.all((a == b) | (near <= x.gap)), (what, codes, int(np.sum((a != b) & (near > x.gap))))
  lr = _rounding.lift(hp["lr"](t - 1) if callable(hp["lr"]) else hp["lr"])
  for path, a in got_s.items():  # counts, common hyperparameters; a scheduled rate within its own gap
    if path.endswith(".hyperparams['learning_rate']"):
      _rounding.assert_within(a, want_s[path], lr, f"{what} {path}")
    elif path not in checked:
      np.testing.assert_array_equal(a, want_s[path], err_msg=f"{what} {path}")


class _Cos(_rounding.Gap):
  """A Gap with cos: |cos(a + d) - cos(a)| <= d, and the function's own rounding, a few ulps of 1 at most."""

  def cos(self):
    return _rounding.Gap(np.cos(self.value), self.gap + 4 * 2.0**-23)


def _decoded(m, block_size, signed):
  """The 8-bit moment that two programs store for `m` (a Gap) and read back, as a Gap, with the codes each may
  choose: the block scale max |m| within the block's largest gap; the code of m / scale any code whose interval
  meets m / scale give or take its gap. Returns (decoded, lowest code, highest code, scales as a Gap)."""
  blocks, scale = _block_max(np.abs(m.value), block_size)
  block_gaps, scale_gap = _block_max(m.gap, block_size)
  # m / scale as the rule for a division says, any code at all where the scale is within its gap of 0
  margin = scale - scale_gap
  x = m.value / np.where(scale > 0, scale, 1.0)
  x_gap = np.where(margin > 0, (m.gap + np.abs(x) * scale_gap) / np.where(margin > 0, margin, 1.0), np.inf)
  x_gap = x_gap + 4 * 2.0**-24 * 2 * np.abs(x)  # the reciprocal and the product, two programs
  bounds, values = _quantize._BOUNDS[signed].astype(np.float64), _quantize._MAPS[signed].astype(np.float64)
  low, high = (np.searchsorted(bounds, np.clip(x + d, -1, 1)) for d in (-x_gap, x_gap))
  code = np.searchsorted(bounds, np.clip(x, -1, 1))
  if not signed:  # a positive v never takes code 0
    low, high, code = (np.where(x > 0, np.maximum(c, 1), c) for c in (low, high, code))
  decoded = _rounding.Gap(values[code] * scale, (values[high] - values[low]) * scale)
  decoded = decoded + _rounding.Gap(0.0, np.abs(values[code]) * scale_gap)  # the scale's own gap, and a rounding
  return decoded, low, high, _rounding.Gap(blocks, block_gaps)


def _assert_q8_run_within_model(got, want, params, gradient, steps, block_size, **hp):
  """Two programs' (params, state) after `steps` steps of 8-bit Adam (`hp`: tests/helpers/rounding.adam's keywords)
  from `params` and zero moments, the gradient `gradient(params)` (of a :class:`_Cos`), within the rounding model's
  bound: each step from the moments as :func:`_decoded` says two programs may read them back, every code where
  a boundary lies within the gap, the scales within theirs."""
  got_s, want_s = _paths(got[1]), _paths(want[1])
  checked = set()
  for name, p in params.items():
    theta = _rounding.lift(np.asarray(p, np.float64))
    quantized = np.size(p) >= 64
    moments, codes = {"mu": 0.0, "nu": 0.0}, {}
    for t in range(1, steps + 1):
      g = gradient(_Cos(theta.value, theta.gap))
      (step,) = _rounding.adam([g], theta, start=moments, t0=t - 1, **hp)
      theta = step["params"]
      for k in ("mu", "nu"):
        if quantized:
          moments[k], *codes[k] = _decoded(step[k], block_size, signed=k == "mu")
        else:
          moments[k] = step[k]
    _rounding.assert_within(got[0][name], want[0][name], theta, f"params {name}")
    for k in ("mu", "nu"):
      paths = {part: next(q for q in got_s if q.endswith(f".{k}.{part}[{name!r}]")) for part in ("codes", "absmax")}
      checked.update(paths.values())
      if not quantized:
        _rounding.assert_within(got_s[paths["codes"]], want_s[paths["codes"]], step[k], paths["codes"])
        continue
      low, high, scales = codes[k]
      _rounding.assert_within(got_s[paths["absmax"]], want_s[paths["absmax"]], scales, paths["absmax"])
      a, b = got_s[paths["codes"]].astype(int), want_s[paths["codes"]].astype(int)
      assert np.all(np.abs(a - b) <= high - low), (paths["codes"], int(np.sum(np.abs(a - b) > high - low)))
  for path, a in got_s.items():  # the counts
    if path not in checked:
      np.testing.assert_array_equal(a, want_s[path], err_msg=path)


def _kernel():
  from jadam._kernels import build

  if not build.load():
    pytest.skip(f"the fused kernel is unavailable here: {build.error()}")


def _floats_around(centres, ulps):
  """Every float32 within `ulps` ulps of each of `centres` (positive), in [0, 1]."""
  bits = np.asarray(centres, np.float32).view(np.int32)[:, None] + np.arange(-ulps, ulps + 1, dtype=np.int32)
  y = np.clip(bits, 0, None).astype(np.int32).view(np.float32).reshape(-1)
  return y[y <= 1.0]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_kernel_code_search_is_searchsorted(signed):
  """The kernel codes by arithmetic (_quantize._search_table), and by the exact table lookup only within rounding of
  a boundary: its codes are searchsorted(bounds, y) on every float within 4096 ulps of each boundary and of the
  binades' edges, on both signs where the map is signed, on 0, 1, NaN and tiny values and on a log-uniform sample;
  and the table lookup's codes on a sweep of [-1, 1] by a stride of 1009 floats (JADAM_EXHAUSTIVE=1: every float,
  3.2e9 in all, about two minutes)."""
  _kernel()
  from jadam._kernels import build

  bounds = _quantize._BOUNDS[signed]
  rng = np.random.default_rng(0)
  edges = 2.0 ** np.arange(-40, 1, dtype=np.float64)
  sample = (10.0 ** rng.uniform(-9, 0, 1 << 20)).astype(np.float32)
  special = np.asarray([0.0, 1.0, np.nextafter(1, 0), 1e-38, 1e-45, 2.0**-31, 2.0**-30, np.nan], np.float32)
  y = np.concatenate([_floats_around(bounds[bounds > 0], 4096), _floats_around(edges, 64), sample, special])
  if signed:
    y = np.concatenate([y, -y])
  y = rng.permutation(y)  # vectors mixing near-boundary values with others, so a fallback covers all 16
  got = build.quant_codes(y, signed)
  want = np.searchsorted(bounds, y, side="left")  # NaN sorts last: code 255, as the table
  wrong = np.flatnonzero(got != want)
  assert wrong.size == 0, (y[wrong[:5]], got[wrong[:5]], want[wrong[:5]])

  stride = 1 if os.environ.get("JADAM_EXHAUSTIVE", "") not in ("", "0") else 1009
  chunk = (1 << 25) * stride
  for sign in (0, 0x80000000) if signed else (0,):
    for lo in range(0, 0x3F800001, chunk):
      bits = np.arange(lo, min(lo + chunk, 0x3F800001), stride, dtype=np.uint32) | np.uint32(sign)
      y = bits.view(np.float32)
      wrong = np.flatnonzero(build.quant_codes(y, signed) != np.asarray(_quantize._codes(jnp.asarray(y), signed)))
      assert wrong.size == 0, y[wrong[:5]]


def _kernel_leaves(seed=0):
  """Flat leaves with a partial last block, per-row leaves, a 3-d flat leaf, a one-element leaf, a small leaf."""
  shapes = {"flat": (5000,), "rows": (8, 4096), "cube": (3, 5, 11), "one": (1,), "small": (7,), "vec": (70001,)}
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {name: jax.random.normal(k, s) for (name, s), k in zip(shapes.items(), keys, strict=True)}


def _kernel_grads(params, t):
  # scales over decades inside each block, signs both ways, some exact zeros
  return jax.tree.map(
    lambda p: jnp.sin(3.0 * p + t) * jnp.exp(-6.0 * jnp.abs(p)) * (1.0 + t % 3) * (p > -2.0).astype(p.dtype), params
  )


def _fused_update(tx):
  from jadam import _step

  return jax.jit(lambda g, s, p: _step.update_and_apply(tx, g, s, p, fused=True))


def _calls(fn, *args):
  text = fn.lower(*args).as_text()
  return text.count("@jadam_adam_f32_q8"), len(re.findall(r"@jadam_adam_f32\(", text))


def _is_moment(x):
  return isinstance(x, _quantize.QuantizedMoment)


def _assert_bitwise(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))  # bits (-0.0, NaN)


def _fused_step_is_generic(tx, fused, grads, state, params):
  """One fused step, checked bit for bit against the generic step op by op (eager); returns (params, state)."""
  got = fused(grads, state, params)
  updates, want_state = tx.update(grads, state, params)
  _assert_bitwise(got, (optax.apply_updates(params, updates), want_state))
  return got


KERNEL_CONFIGS = {
  "adam8bit": lambda bs: jadam.adam8bit(1e-2, block_size=bs, min_8bit_size=64),
  "adam8bit_l2_maximize": lambda bs: jadam.adam8bit(
    1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2, maximize=True, block_size=bs, min_8bit_size=0
  ),
  "adamw8bit": lambda bs: jadam.adamw8bit(1e-2, weight_decay=0.1, block_size=bs, min_8bit_size=64),
  "clip_adamw8bit": lambda bs: optax.chain(
    optax.clip_by_global_norm(1.0), jadam.adamw8bit(1e-2, eps_root=1e-12, block_size=bs, min_8bit_size=64)
  ),
  "torch_adamw8bit_groups": lambda bs: jadam.torch.AdamW8bit(
    [{"params": "rows|flat|vec", "lr": 1e-2}, {"params": "cube|one|small", "weight_decay": 0.1, "min_8bit_size": 0}],
    lr=1e-3,
  ),
}


@pytest.mark.parametrize("block_size", [64, 256, 2048])
@pytest.mark.parametrize("config", list(KERNEL_CONFIGS))
def test_kernel_is_the_generic_step_bit_for_bit(config, block_size):
  """The fused 8-bit step gives the generic step's codes, scales and parameters, bit for bit, step after step.

  The reference is the generic path op by op (eager), whose float32 rounding is the one the kernel reproduces;
  under jit XLA may contract a multiply-add (see tests/kernels/test_kernels.py), so that comparison is to a few ulps.
  """
  _kernel()
  if config.startswith("torch") and block_size != 256:
    pytest.skip("bitsandbytes' front has one block size, 256")
  tx = KERNEL_CONFIGS[config](block_size)
  params = _kernel_leaves()
  state = tx.init(params)
  fused = _fused_update(tx)
  q8, f32 = _calls(fused, params, state, params)
  # both formats in one tree where some leaves are below min_8bit_size: the 8-bit call and the float32 one
  moments = [x for x in jax.tree.leaves(state, is_leaf=_is_moment) if _is_moment(x)]
  small = any(c.dtype != jnp.uint8 for m in moments for c in jax.tree.leaves(m.codes))
  assert q8 >= 1 and (f32 >= 1) == small
  for t in range(3):
    params, state = _fused_step_is_generic(tx, fused, _kernel_grads(params, t), state, params)
  codes = jax.tree.leaves(state)
  assert any(c.dtype == jnp.uint8 and np.any(np.asarray(c) > 0) for c in codes)


def test_kernel_within_rounding_of_the_jitted_generic_step():
  _kernel()
  tx = jadam.adamw8bit(1e-2, min_8bit_size=64)
  params = _kernel_leaves(1)
  state = tx.init(params)
  grads = _kernel_grads(params, 0)
  got_p, got_s = _fused_update(tx)(grads, state, params)
  from jadam import _step

  want_p, want_s = jax.jit(lambda g, s, p: _step.update_and_apply(tx, g, s, p, fused=False))(grads, state, params)
  # a code may sit on a boundary that a contracted multiply-add crosses: the rounding model says where
  hp = dict(lr=_f32(1e-2), decoupled_weight_decay=_f32(1e-2))
  _assert_q8_step_within_model(
    (got_p, got_s), (want_p, want_s), (params, state), grads, hp, t=1, block_size=256, what=""
  )


def test_kernel_apply_if_finite_rejects_and_accepts():
  """A rejected step keeps codes and scales; a second error in a row is accepted, inf and all, as the generic step
  (op by op: optax.apply_if_finite's lax.cond would compile the inner step, contractions and all).

  Not compared: steps after one that took an inf into the moments (a block of NaNs next to an inf: which of the
  two XLA's reduction keeps is its own business, and such a state is lost anyway).
  """
  _kernel()
  inner = jadam.adam8bit(1e-2, weight_decay=1e-2, min_8bit_size=64)
  tx = optax.apply_if_finite(inner, 1)
  params = _kernel_leaves(2)
  state = tx.init(params)
  fused = _fused_update(tx)
  assert _calls(fused, params, state, params)[0] >= 1
  for t in range(3):
    grads = _kernel_grads(params, t)
    if t in (1, 2):  # a NaN in a partial last block, in a full one and in whole blocks (a row); then an inf
      grads = {k: g.at[0].set(jnp.nan if t == 1 else jnp.inf) for k, g in grads.items()}
    got = fused(grads, state, params)
    if t == 1:  # rejected: nothing moves (apply_updates adds zeros), codes and scales as they were
      want = (jax.tree.map(lambda p: p + 0, params), state.inner_state)
    else:
      updates, new_inner = inner.update(grads, state.inner_state, params)
      want = (optax.apply_updates(params, updates), new_inner)
    _assert_bitwise((got[0], got[1].inner_state), want)
    assert int(got[1].notfinite_count) == (1 if t == 1 else 2 if t == 2 else 0)
    params, state = got
    params = jax.tree.map(lambda p: jnp.where(jnp.isfinite(p), p, 0.5), params)
  # a NaN accepted at once (max_consecutive_errors=0): NaN blocks coded as the generic step codes them
  tx = optax.apply_if_finite(inner, 0)
  grads = {k: g.at[0].set(jnp.nan) for k, g in _kernel_grads(params, 3).items()}
  got = _fused_update(tx)(grads, tx.init(params)._replace(inner_state=state.inner_state), params)
  updates, new_inner = inner.update(grads, state.inner_state, params)
  _assert_bitwise((got[0], got[1].inner_state), (optax.apply_updates(params, updates), new_inner))


def test_kernel_inject_hyperparams_with_a_schedule():
  _kernel()
  static = ("block_size", "min_8bit_size", "amsgrad", "maximize")
  tx = optax.inject_hyperparams(jadam.adam8bit, static_args=static)(
    learning_rate=optax.linear_schedule(1e-2, 1e-3, 5), b1=0.8, block_size=128, min_8bit_size=64
  )
  params = _kernel_leaves(3)
  state = tx.init(params)
  fused = _fused_update(tx)
  assert _calls(fused, params, state, params)[0] >= 1
  for t in range(4):
    grads = _kernel_grads(params, t)
    got = fused(grads, state, params)
    updates, want_state = tx.update(grads, state, params)
    want = (optax.apply_updates(params, updates), want_state)
    # the moments bit for bit (they do not read the rate); the schedule's learning rate may fold differently under
    # jit (as for float32): the parameters within the rounding model's bound
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
      a, b = np.asarray(a), np.asarray(b)
      if a.dtype == np.uint8 or a.size != 1 and a.shape not in [p.shape for p in params.values()]:
        np.testing.assert_array_equal(a, b)  # codes and scales
    hp = dict(lr=lambda c: (_rounding.lift(_f32(1e-2)) - _f32(1e-3)) * (1 - _rounding.lift(min(c, 5)) / 5) + _f32(1e-3))
    hp.update(b1=_f32(0.8))
    _assert_q8_step_within_model(got, want, (params, state), grads, hp, t=t + 1, block_size=128, what=f"step {t + 1}")
    params, state = got


def test_kernel_update_step_donates_in_place_without_retracing():
  _kernel()
  traces = []
  tx = jadam.adam8bit(1e-3, min_8bit_size=64)

  def loss(params, x):
    traces.append(1)
    return sum(jnp.sum(jnp.sin(p) * x) for p in jax.tree.leaves(params))

  params = _kernel_leaves(4)
  state = tx.init(params)
  hlo = jadam.make_update_step(tx).lower(params, state, params).compile().as_text()
  assert 'custom_call_target="jadam_adam_f32_q8"' in hlo and " copy(" not in hlo
  train = jadam.make_train_step(loss, tx)
  want_p, want_s = params, state
  got_p, got_s = jax.tree.map(jnp.copy, (params, state))
  x = jnp.float32(0.5)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      got_p, got_s, _ = train(got_p, got_s, x)
  assert len(traces) == 1
  for _ in range(3):
    grads = jax.grad(loss)(want_p, x)
    updates, want_s = tx.update(grads, want_s, want_p)
    want_p = optax.apply_updates(want_p, updates)
  _assert_q8_run_within_model((got_p, got_s), (want_p, want_s), params, lambda p: p.cos() * 0.5, 3, 256, lr=_f32(1e-3))


def test_kernel_refusals_fall_back_to_the_generic_step():
  _kernel()
  params = {"w": jnp.ones((4, 256))}
  for tx, why in (
    (jadam.adam8bit(1e-3, amsgrad=True, min_8bit_size=0), "8-bit moments with amsgrad"),
    (jadam.adam(1e-3, mu_dtype=jadam.Quantized(), nu_dtype=jnp.float32), "8-bit moments for one moment only"),
  ):
    from jadam import _step

    auto = jax.jit(lambda g, s, p, tx=tx: _step._apply(tx, g, s, p, fused=None, multi_device_ok=True))
    assert "jadam_adam_f32_q8" not in auto.lower(params, tx.init(params), params).as_text()
    with pytest.raises(ValueError, match=re.escape(why)):
      _fused_update(tx).lower(params, tx.init(params), params)


def test_kernel_step_exports_as_pure_xla():
  _kernel()
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw8bit(1e-2, min_8bit_size=64))
  params = _kernel_leaves(5)
  state = tx.init(params)
  grads = _kernel_grads(params, 0)
  fused = _fused_update(tx)
  assert _calls(fused, grads, state, params)[0] >= 1
  for platforms in (("cpu",), ("cuda", "tpu")):
    exp = jax.export.export(fused, platforms=platforms)(grads, state, params)
    assert not [line for line in exp.mlir_module().splitlines() if "custom_call @jadam" in line]
  got = jax.export.export(fused, platforms=("cpu",))(grads, state, params).call(grads, state, params)
  want = fused(grads, state, params)
  clipped = _rounding.clipped_by_global_norm(grads, 1.0)
  hp = dict(lr=_f32(1e-2), decoupled_weight_decay=_f32(1e-2))
  _assert_q8_step_within_model(got, want, (params, state), clipped, hp, t=1, block_size=256, what="exported")


def test_kernel_reads_every_code_back_as_the_map():
  """Old codes 0..255 everywhere (the 64-wide, 16-wide and scalar paths of the kernel), any scales: bit for bit."""
  _kernel()
  tx = jadam.adamw8bit(1e-2, block_size=256, min_8bit_size=0)
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.standard_normal(256 * 9 + 113), jnp.float32), "b": jnp.ones((3, 512))}
  state = tx.init(params)

  def filled(q, signed):
    codes = jax.tree.map(lambda c: jnp.asarray(rng.permutation(c.size) % 256, jnp.uint8).reshape(c.shape), q.codes)
    absmax = jax.tree.map(
      lambda a: jnp.asarray(rng.uniform(0, 2, a.shape) * (1 if signed else 1e-2), jnp.float32), q.absmax
    )
    return _quantize.QuantizedMoment(codes=codes, absmax=absmax)

  def fill(s):
    return s._replace(mu=filled(s.mu, True), nu=filled(s.nu, False))

  state = tuple(fill(s) if isinstance(s, jadam.ScaleByMomentsState) else s for s in state)
  assert any(isinstance(s, jadam.ScaleByMomentsState) for s in state)
  _fused_step_is_generic(tx, _fused_update(tx), _kernel_grads(params, 0), state, params)


def test_kernel_threads_split_at_block_boundaries():
  """Above the kernel's parallel threshold (2^18 values) the blocks are shared out between threads: same bits."""
  _kernel()
  tx = jadam.adamw8bit(1e-2, block_size=128, min_8bit_size=64)
  keys = jax.random.split(jax.random.key(7), 2)
  params = {"big": jax.random.normal(keys[0], (300_001,)), "rows": jax.random.normal(keys[1], (600, 512))}
  state = tx.init(params)
  fused = _fused_update(tx)
  for t in range(2):
    params, state = _fused_step_is_generic(tx, fused, _kernel_grads(params, t), state, params)


# --- non-finite and huge gradients: one stated rule, both paths ------------------

F32_MAX = float(np.finfo(np.float32).max)


def _torch_adam_pattern(p0, grads):
  """torch.optim.Adam's NaN / inf / finite pattern of the parameters after each step, or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  p = torch.nn.Parameter(torch.tensor(np.asarray(p0)))
  opt = torch.optim.Adam([p], lr=1e-2)
  out = []
  for g in grads:
    p.grad = torch.tensor(np.asarray(g))
    opt.step()
    out.append(_pattern(p.detach().numpy()))
  return out


def _pattern(x):
  x = np.asarray(x)
  return np.where(np.isnan(x), 2, np.where(np.isinf(x), 1, 0))


@pytest.mark.parametrize("size", [300, 5000, 70001])  # a partial block alone; 20 blocks; a long flat leaf
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e19, -1e30, F32_MAX])
def test_non_finite_and_huge_gradients_touch_only_their_parameter(value, size):
  """The rule of both paths: a block's scale is the largest non-NaN magnitude, capped at float32's maximum, and
  (1 - b2) g^2 is formed as ((1 - b2) g) g, so that a finite gradient never overflows it where v can hold it
  (|g| below about 5.8e20 for b2 = 0.999) and a NaN, an inf or a v beyond float32 never spills over its block.
  The parameter whose gradient is NaN or infinite becomes NaN (inf / inf), as in torch.optim.Adam; every other
  stays finite, as in torch.optim.Adam (bitsandbytes' Adam8bit turns the block NaN for |g| >= ~6e20 or inf)."""
  _kernel()
  tx = jadam.adam8bit(1e-2, min_8bit_size=0)
  rng = np.random.default_rng(0)
  p0 = {"w": jnp.asarray(rng.normal(size=size), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=size), jnp.float32)} for _ in range(4)]
  grads[1] = {"w": grads[1]["w"].at[size // 2].set(value)}
  torch_patterns = _torch_adam_pattern(p0["w"], [g["w"] for g in grads])
  from jadam import _step

  paths = {
    "eager": lambda g, s, p: _step.update_and_apply(tx, g, s, p, fused=False),
    "jit": jax.jit(lambda g, s, p: _step.update_and_apply(tx, g, s, p, fused=False)),
    "kernel": _fused_update(tx),
  }
  for name, step in paths.items():
    params, state = p0, tx.init(p0)
    for t, g in enumerate(grads):
      if name == "kernel" and t <= 1:  # the generic step op by op, bit for bit, NaN blocks and capped scales too
        # (not later: the kernel adds weight_decay * p = 0 * NaN to the gradient of a parameter that is NaN
        # already, where the generic add_l2 skips a weight_decay of 0; its moments, not its parameter, differ)
        params, state = _fused_step_is_generic(tx, step, g, state, params)
      else:
        params, state = step(g, state, params)
      want = np.zeros(size, int)
      if t >= 1 and not np.isfinite(value):
        want[size // 2] = 2
      got = _pattern(params["w"])
      assert np.array_equal(got, want), (name, t, np.flatnonzero(got)[:5], got[np.flatnonzero(got)[:5]])
      if torch_patterns is not None:
        assert np.array_equal(got, torch_patterns[t]), (name, t)
      moments = [x for x in jax.tree.leaves(state, is_leaf=_is_moment) if _is_moment(x)]
      assert len(moments) == 2 and all(np.all(np.isfinite(np.asarray(m.absmax["w"]))) for m in moments), (name, t)
