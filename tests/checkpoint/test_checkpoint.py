"""Checkpoints: every optimizer's state, saved and restored with orbax, resumes bit for bit; mismatches are refused."""

import hashlib
import os
import pathlib
import pickle
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("orbax.checkpoint")

import jadam  # noqa: E402
from tests.helpers.bits import assert_bitwise_equal  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS, STOPS = 30, (1, 7, 20)


def _params():
  return {
    "w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
    "b": jnp.full(4, 0.5, jnp.float32),
    "h": jnp.linspace(1.0, 2.0, 3, dtype=jnp.bfloat16),
    "scale": jnp.asarray(2.0, jnp.float32),
  }


def _noise():
  """Per-step targets: the gradient of 0.5 |p - target|^2 is p - target, so it follows the parameters."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(STEPS, *p.shape)), p.dtype), _params())


OPTIMIZERS = {
  "adam": lambda: jadam.adam(1e-2),
  "adam_amsgrad_weight_decay": lambda: jadam.adam(1e-2, amsgrad=True, weight_decay=0.1),
  "adam_bf16_moments": lambda: jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),  # stochastic rounding
  "adamw": lambda: jadam.adamw(1e-2, weight_decay=0.1),
  "sgd_nesterov": lambda: jadam.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
  "rmsprop_centered_momentum": lambda: jadam.rmsprop(1e-2, centered=True, momentum=0.5),
  "adagrad": lambda: jadam.adagrad(1e-1, lr_decay=0.01, initial_accumulator_value=0.1),
  "adamax": lambda: jadam.adamax(1e-2),
  "nadam": lambda: jadam.nadam(1e-2, weight_decay=0.01, decoupled_weight_decay=True),
  "radam": lambda: jadam.radam(1e-2),  # rectified from step 6 on: both branches are crossed
  "torch_adamw_groups_cosine": lambda: jadam.torch.AdamW(
    [{"params": "b", "lr": 1e-3, "weight_decay": 0.0}], lr=jadam.torch.CosineAnnealingLR(1e-2, T_max=STEPS)
  ),
  "torch_adam_plateau": lambda: jadam.torch.Adam(lr=jadam.torch.ReduceLROnPlateau(1e-2, patience=2), amsgrad=True),
  "keras_adam": lambda: jadam.keras.Adam(1e-2, amsgrad=True, weight_decay=0.01),
  "inject_hyperparams_schedule": lambda: optax.inject_hyperparams(jadam.adam, hyperparam_dtype=jnp.float32)(
    learning_rate=optax.linear_schedule(1e-2, 1e-3, STEPS), weight_decay=0.01
  ),
  "apply_if_finite": lambda: optax.apply_if_finite(jadam.adam(1e-2), 3),
}


def _loss(params, target):
  return sum(
    0.5 * jnp.sum(jnp.square(p.astype(jnp.float32) - t.astype(jnp.float32)))
    for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True)
  )


def _make_step(tx):
  @jax.jit
  def step(params, state, target):
    step.traces += 1  # at trace time only
    loss, grads = jax.value_and_grad(_loss)(params, target)
    updates, state = tx.update(grads, state, params, value=loss)  # `value` feeds ReduceLROnPlateau; others ignore it
    return optax.apply_updates(params, updates), state

  step.traces = 0
  return step


def _run(step, params, state, noise, start, stop):
  for t in range(start, stop):
    params, state = step(params, state, jax.tree.map(lambda n, t=t: n[t], noise))
  return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_from_a_checkpoint_is_bitwise_an_uninterrupted_run(name, tmp_path):
  tx, noise, params = OPTIMIZERS[name](), _noise(), _params()
  step = _make_step(tx)
  at = {0: (params, tx.init(params))}
  for t in range(STEPS):
    at[t + 1] = _run(step, *at[t], noise, t, t + 1)
  for k in STOPS:
    jadam.save_state(tmp_path / f"step_{k}", {"params": at[k][0], "opt_state": at[k][1]})
    fresh = OPTIMIZERS[name]()  # as a new process would build it
    like = {"params": params, "opt_state": fresh.init(params)}
    restored = jadam.restore_state(tmp_path / f"step_{k}", like)
    assert_bitwise_equal(restored, {"params": at[k][0], "opt_state": at[k][1]}, f"{name} restored at {k}")
    resumed = _run(step, restored["params"], restored["opt_state"], noise, k, STEPS)
    assert_bitwise_equal(resumed, at[STEPS], f"{name} resumed at {k}")
  # The restored state has the avals of the original (dtypes, weak types, shapes): no retrace.
  assert step.traces == 1
  # ... and the run did move: a checkpoint of the initial state would not have passed for step 20.
  assert not np.array_equal(np.asarray(at[20][0]["w"]), np.asarray(at[0][0]["w"]))


def test_nnx_optimizer_resumes_bitwise(tmp_path):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 8, rngs=rngs)
      self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.tanh(self.hidden(x)))

  def make():
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, jadam.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)

  graphdef, state = nnx.split(make())
  rng = np.random.default_rng(1)
  xs, ys = (
    jnp.asarray(rng.normal(size=(STEPS, 16, 3)), jnp.float32),
    jnp.asarray(rng.normal(size=(STEPS, 16, 1)), jnp.float32),
  )

  @jax.jit
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  at = [state]
  for t in range(STEPS):
    at.append(step(at[-1], xs[t], ys[t]))
  for k in STOPS:
    jadam.save_state(tmp_path / f"step_{k}", at[k])
    model, optimizer = make()
    restored = jadam.restore_state(tmp_path / f"step_{k}", nnx.state((model, optimizer)))
    nnx.update((model, optimizer), restored)  # into live objects, as a training script would
    assert int(optimizer.step[...]) == k
    state = nnx.state((model, optimizer))
    for t in range(k, STEPS):
      state = step(state, xs[t], ys[t])
    assert_bitwise_equal(state, at[STEPS], f"nnx resumed at {k}")


def test_linen_train_state_resumes_bitwise(tmp_path):
  import flax.linen as nn
  from flax.training import train_state

  module = nn.Dense(2)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(STEPS, 8, 3)), jnp.float32)

  def make():
    params = module.init(jax.random.key(0), x[0])["params"]
    tx = jadam.torch.Adam(lr=jadam.torch.StepLR(1e-2, step_size=5, gamma=0.5), weight_decay=0.01)
    return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)  # step is the Python int 0

  @jax.jit
  def step(state, x):
    grads = jax.grad(lambda p: jnp.sum(state.apply_fn({"params": p}, x) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  at = [make()]
  for t in range(STEPS):
    at.append(step(at[-1], x[t]))
  for k in STOPS:
    jadam.save_state(tmp_path / f"step_{k}", at[k])
    state = jadam.restore_state(tmp_path / f"step_{k}", make())
    for t in range(k, STEPS):
      state = step(state, x[t])
    assert int(state.step) == STEPS
    assert_bitwise_equal((state.params, state.opt_state), (at[STEPS].params, at[STEPS].opt_state), f"linen at {k}")


def test_resume_in_a_new_process(tmp_path):
  """The checkpoint carries nothing of the process that wrote it: a fresh interpreter resumes it bit for bit."""
  make = "optax.inject_hyperparams(jadam.adam)(learning_rate=optax.linear_schedule(1e-2, 1e-3, 30), weight_decay=0.01)"
  tx = eval(make)
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)}
  step = jax.jit(lambda p, s: jadam.update_and_apply(tx, jax.tree.map(jnp.sin, p), s, p))
  state = (params, tx.init(params))
  for _ in range(7):
    state = step(*state)
  jadam.save_state(tmp_path / "step_7", state)
  for _ in range(STEPS - 7):
    state = step(*state)
  child = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, optax, jadam
      tx = {make}
      params = {{"w": jnp.zeros(6, jnp.float32)}}
      state = jadam.restore_state({str(tmp_path / "step_7")!r}, (params, tx.init(params)))
      step = jax.jit(lambda p, s: jadam.update_and_apply(tx, jax.tree.map(jnp.sin, p), s, p))
      for _ in range({STEPS - 7}):
        state = step(*state)
      jadam.save_state({str(tmp_path / "final")!r}, state)
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  subprocess.run([sys.executable, "-c", child], check=True, cwd=ROOT, env=env, capture_output=True)
  assert_bitwise_equal(jadam.restore_state(tmp_path / "final", state), state, "new process")


# --- what a restore refuses ----------------------------------------------------------------------


def _digest(root):
  """Every file under `root` (the directory itself included) with a hash of its bytes."""
  out = {}
  for directory, _, files in os.walk(root):
    for f in files:
      path = os.path.join(directory, f)
      out[os.path.relpath(path, root)] = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
  return out


PARAMS = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)}


def _with_count_dtype(state, dtype):
  return (state[0]._replace(count=jnp.zeros([], dtype)), *state[1:])


MISMATCHES = {
  # name: (the optimizer that saved, the tree restored into, the message)
  "other_optimizer": (
    jadam.adam(1e-3),
    jadam.sgd(1e-3, momentum=0.9).init(PARAMS),
    r"it holds a state written by jadam.adam \(stages AddL2State, ScaleByMomentsState, EmptyState, EmptyState,"
    r" ScaleByLrState\), and the tree to restore into is a state of jadam.sgd \(stages AddL2State, MomentumState,"
    r" ScaleByLrState\)",
  ),
  "extra_leaf": (
    jadam.adam(1e-3),
    jadam.adam(1e-3).init({**PARAMS, "c": jnp.ones(2, jnp.float32)}),
    r"\[1\]\.mu\['c'\] in the tree to restore into, \[1\]\.mu\['w'\] in the checkpoint",
  ),
  "missing_leaf": (
    jadam.adam(1e-3),
    jadam.adam(1e-3).init({"w": PARAMS["w"]}),
    r"leaf 2 is \[1\]\.mu\['w'\] in the tree to restore into, \[1\]\.mu\['b'\] in the checkpoint",
  ),
  "bf16_moments_into_float32": (
    jadam.adam(1e-3, mu_dtype=jnp.bfloat16),
    jadam.adam(1e-3).init(PARAMS),
    r"at \[1\]\.mu\['b'\]: expected float32\[4\], found bfloat16\[4\]",
  ),
  "float32_moments_into_bf16": (
    jadam.adam(1e-3),
    jadam.adam(1e-3, nu_dtype=jnp.bfloat16).init(PARAMS),
    r"at \[1\]\.nu\['b'\]: expected bfloat16\[4\], found float32\[4\]",
  ),
  "wrong_shape": (
    jadam.adam(1e-3),
    jadam.adam(1e-3).init({**PARAMS, "w": jnp.ones((4, 3), jnp.float32)}),
    r"at \[1\]\.mu\['w'\]: expected float32\[4,3\], found float32\[3,4\]",
  ),
  "none_where_an_array_was": (
    jadam.rmsprop(1e-3, centered=True),
    jadam.rmsprop(1e-3).init(PARAMS),  # mu is None without centering
    r"leaf 2 is \[1\]\.mu in the tree to restore into, \[1\]\.mu\['b'\] in the checkpoint",
  ),
  "count_dtype": (
    jadam.adam(1e-3),
    _with_count_dtype(jadam.adam(1e-3).init(PARAMS), jnp.int16),
    r"at \[0\]\.count: expected int16\[\], found int32\[\]",
  ),
}


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_a_mismatched_restore_raises_and_leaves_the_checkpoint_untouched(name, tmp_path):
  saver, like, message = MISMATCHES[name]
  state = saver.update(PARAMS, saver.init(PARAMS), PARAMS)[1]
  jadam.save_state(tmp_path / "ckpt", state)
  before = _digest(tmp_path)
  with pytest.raises(ValueError, match="does not match the tree to restore into") as info:
    jadam.restore_state(tmp_path / "ckpt", like)
  assert re.search(message, str(info.value)), str(info.value)
  assert "Nothing was restored" in str(info.value)
  assert _digest(tmp_path) == before  # not a byte written, renamed or removed
  # ... and the checkpoint still restores into the right tree.
  assert_bitwise_equal(jadam.restore_state(tmp_path / "ckpt", saver.init(PARAMS)), state)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    jadam.restore_state(tmp_path / "nowhere", PARAMS)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a checkpoint written by jadam.save_state"):
    jadam.restore_state(tmp_path / "empty", PARAMS)
  jadam.save_state(tmp_path / "ckpt", PARAMS)
  with pytest.raises(ValueError, match="already exists"):  # orbax's: a checkpoint is never overwritten in place
    jadam.save_state(tmp_path / "ckpt", PARAMS)


def test_odd_trees_round_trip(tmp_path):
  """None leaves, EmptyState, zero-size arrays (which orbax alone refuses), ints, bools, NumPy arrays, scalars."""
  tree = {
    "state": optax.apply_if_finite(jadam.rmsprop(1e-3), 2).init(
      {"w": jnp.ones((2, 3), jnp.bfloat16), "empty": jnp.zeros((0, 4), jnp.float32), "i": jnp.arange(3), "n": None}
    ),
    "numpy": np.arange(4, dtype=np.float32),
    "scalar": 3,
    "alone": optax.EmptyState(),
  }
  jadam.save_state(tmp_path / "odd", tree)
  restored = jadam.restore_state(tmp_path / "odd", tree)
  assert_bitwise_equal(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, tree))
  assert isinstance(restored["numpy"], np.ndarray) and isinstance(restored["scalar"], int)
  assert isinstance(restored["state"].inner_state[1].nu["empty"], jax.Array)
  jadam.save_state(tmp_path / "only_empty", optax.EmptyState())
  assert jadam.restore_state(tmp_path / "only_empty", optax.EmptyState()) == optax.EmptyState()


def test_restored_arrays_take_the_sharding_of_like(tmp_path):
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  params = {"w": jax.device_put(jnp.arange(16, dtype=jnp.float32), sharded)}
  tx = jadam.adam(1e-3)
  state = jax.jit(tx.update)(params, tx.init(params), params)[1]
  jadam.save_state(tmp_path / "ckpt", state)
  restored = jadam.restore_state(tmp_path / "ckpt", tx.init(params))
  assert restored[1].mu["w"].sharding == state[1].mu["w"].sharding
  assert_bitwise_equal(restored, state)


def _flip_a_byte_of_the_data(checkpoint: pathlib.Path) -> None:
  """Flips one bit in the middle of the largest file orbax wrote for the arrays (its data chunks)."""
  files = [f for f in (checkpoint / "arrays").rglob("*") if f.is_file() and f.parent.name == "d"]
  data = max(files, key=lambda f: f.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  data.write_bytes(bytes(raw))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_flipped_bit_in_the_data_is_refused_naming_the_leaf(sharded, tmp_path):
  # orbax keeps no checksum of its data: without jadam's digests the flipped bit restores as a wrong value
  w = jnp.asarray(np.random.default_rng(0).normal(size=4096), jnp.float32)  # stored raw: zstd cannot shrink it
  if sharded:
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    w = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  params = {"w": w}
  tx = jadam.adam(1e-3)
  state = jax.jit(tx.update)(params, tx.init(params), params)[1]
  jadam.save_state(tmp_path / "ckpt", state)
  _flip_a_byte_of_the_data(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"corrupt: the values read for \[1\]\.(mu|nu)\['w'\]"):
    jadam.restore_state(tmp_path / "ckpt", tx.init(params))


def test_a_checkpoint_without_its_checksums_is_refused(tmp_path):
  jadam.save_state(tmp_path / "ckpt", PARAMS)
  import shutil

  shutil.rmtree(tmp_path / "ckpt" / "checksums")
  with pytest.raises(ValueError, match="no 'checksums' item"):
    jadam.restore_state(tmp_path / "ckpt", PARAMS)


def test_save_and_restore_never_pickle(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("pickle was called")

  for name in ("dump", "dumps", "load", "loads"):
    monkeypatch.setattr(pickle, name, refuse)
  tx = jadam.torch.Adam(lr=jadam.torch.ReduceLROnPlateau(1e-3))
  state = tx.init(PARAMS)
  jadam.save_state(tmp_path / "ckpt", state)
  assert_bitwise_equal(jadam.restore_state(tmp_path / "ckpt", tx.init(PARAMS)), state)


def test_no_pickle_in_jadam_or_examples():
  # Nothing unpickles: no pickle.load(s), Unpickler, cloudpickle, dill or allow_pickle=True, and every
  # torch.load is weights_only=True (a restricted unpickler of tensors and containers; jadam.torch's
  # load_checkpoint catches the pickle.UnpicklingError it raises for a file that would run code).
  pattern = re.compile(
    r"\bpickle\.loads?\(|Unpickler\(|cloudpickle|\bdill\b|allow_pickle\s*=\s*True"
    r"|torch\.load\((?![^)]*weights_only=True)"
  )
  hits = [
    f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
    for folder in ("jadam", "examples")
    for path in sorted((ROOT / folder).rglob("*.py"))
    for n, line in enumerate(path.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert not hits, hits
  assert sum(1 for _ in (ROOT / "jadam").rglob("*.py")) > 5  # the search did look somewhere
