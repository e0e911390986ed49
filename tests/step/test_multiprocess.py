"""Two JAX processes on localhost (jax.distributed, gloo): the multi-host route, tested end to end.

Each test starts 2 processes of 2 CPU devices each through `tests/helpers/processes.py`; the
functions they run are the module-level ones below whose names start with ``worker_``. Each
returns its arrays, which the test compares across processes and with a one-process run in
this (pytest's) process.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jadam
from tests.helpers import processes as _processes

V, D, BATCH, STEPS = 64, 16, 16, 3


def _params():
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  return {
    "table": jax.random.normal(k0, (V, D)),
    "w1": jax.random.normal(k1, (D, 64)) / 4,
    "b1": jnp.zeros(64),
    "w2": jax.random.normal(k2, (64, 8)) / 8,
    "b2": jnp.zeros(8),
  }


def _loss(params, ids, y):
  h = jnp.tanh(params["table"][ids["table"]].mean(axis=1) @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def _batches():
  ids = jax.random.randint(jax.random.key(1), (STEPS, BATCH, 4), 0, V)
  y = jnp.sin(jax.random.normal(jax.random.key(2), (STEPS, BATCH, 8)))
  return np.asarray(ids), np.asarray(y)


def _sparse_labels(params):
  return {k: "table" if k == "table" else "rest" for k in params}


_OPTIMIZERS = {
  "adam": lambda: jadam.adam(1e-2),
  "adamw_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-2, weight_decay=1e-2)),
  "adam8bit": lambda: jadam.adam8bit(1e-2, block_size=64, min_8bit_size=256),
  "torch_adamw_groups": lambda: jadam.torch.AdamW(
    [{"params": "b.*", "weight_decay": 0.0}, {"params": "table", "lr": 1e-3}], lr=1e-2, weight_decay=1e-2
  ),
  "sparse_adam": lambda: optax.partition(
    {"table": jadam.sparse_adam(1e-2), "rest": jadam.adam(1e-2)}, _sparse_labels(_params())
  ),
}


def _local(x):
  """A replicated global array's values, from this process's first shard."""
  return np.asarray(x.addressable_shards[0].data)


def _put(value, sharding):
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _train(name, devices):
  """`STEPS` data-parallel steps over `devices` (params and state replicated, the batch split); the results, flat."""
  mesh = Mesh(np.array(devices), ("data",))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tx = _OPTIMIZERS[name]()
  params = jax.tree.map(lambda p: _put(p, replicated), _params())
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  loss = jadam.value_and_sparse_grad(_loss) if name == "sparse_adam" else _loss
  step = jadam.make_train_step(loss, tx)  # the fused kernel on each device's copy (sparse_adam: XLA's step)
  ids, ys = _batches()
  hlo = step.lower(params, state, {"table": _put(ids[0], split)}, _put(ys[0], split)).compile().as_text()
  flat = {"kernel": np.asarray('custom_call_target="jadam_adam' in hlo)}
  for t in range(STEPS):
    params, state, _ = step(params, state, {"table": _put(ids[t], split)}, _put(ys[t], split))
  flat |= {f"params{jax.tree_util.keystr(p)}": _local(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  flat |= {f"state{jax.tree_util.keystr(p)}": _local(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}
  return flat


def _fsdp(mesh, leaf):
  for axis, size in enumerate(leaf.shape):
    if size % mesh.size == 0:
      return NamedSharding(mesh, P(*[None] * axis, "data"))
  return NamedSharding(mesh, P())


def _gathered(x):
  """A global array's values, in every process (FSDP shards live in both)."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _resume(devices, directory):
  """FSDP steps of jadam.adam from an eager `tx.init`, saved after 2, restored into an eager `like`, resumed.

  Returns the parameters after step 3 with and without the interruption.
  """
  mesh = Mesh(np.array(devices), ("data",))
  shardings = jax.tree.map(lambda p: _fsdp(mesh, p), _params())
  tx = jadam.adam(1e-2)
  params = jax.tree.map(_put, _params(), shardings)
  state = tx.init(params)  # eager: the step counts on the default device, uncommitted
  step = jadam.make_train_step(_loss, tx, donate=False)  # the fused kernel on each shard
  ids, ys = _batches()
  split = NamedSharding(mesh, P("data"))
  batch = [({"table": _put(ids[t], split)}, _put(ys[t], split)) for t in range(STEPS)]
  for t in range(STEPS - 1):
    params, state, _ = step(params, state, *batch[t])
  jadam.save_state(os.path.join(directory, "step_2"), state)
  want, _, _ = step(params, state, *batch[-1])
  restored = jadam.restore_state(os.path.join(directory, "step_2"), like=tx.init(params))
  got, _, _ = step(params, restored, *batch[-1])
  flat = {f"resumed{jax.tree_util.keystr(p)}": _gathered(x) for p, x in jax.tree_util.tree_leaves_with_path(got)}
  return flat | {
    f"straight{jax.tree_util.keystr(p)}": _gathered(x) for p, x in jax.tree_util.tree_leaves_with_path(want)
  }


def worker_train(out):
  """Every optimizer of `_OPTIMIZERS`, and `_resume`, in one pair of processes (starting them is most of the time)."""
  assert jax.process_count() == 2 and jax.device_count() == 4
  found = {f"{name}:{k}": v for name in _OPTIMIZERS for k, v in _train(name, jax.devices()).items()}
  return found | {f"resume:{k}": v for k, v in _resume(jax.devices(), out).items()}


@pytest.fixture(scope="module")
def two_processes():
  return _processes.run(__file__, "worker_train", timeout=120)


def _close_at_leaf_scale(got, want, rtol):
  """max |got - want| <= rtol * max |want|, leaf by leaf; integer leaves (counts, 8-bit codes) equal.

  A parameter moves by lr * u per step with |u| <= ~1 whatever its gradient's size, so a
  few-ulp change in the gradient (the batch mean summed in another order) moves it by a few
  ulps of the step, not of its value: a bias that started at 0 may have cancelled to 1e-4.
  """
  for key in want:
    if not np.issubdtype(want[key].dtype, np.floating):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
      continue
    g, w = got[key].astype(np.float64), want[key].astype(np.float64)
    assert np.max(np.abs(g - w), initial=0) <= rtol * np.max(np.abs(w), initial=0), (key, np.max(np.abs(g - w)))


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_data_parallel_two_processes_equal_one(name, two_processes):
  first, second = (_of(r, name) for r in two_processes)
  assert first and first.keys() == second.keys()
  for key in first:  # the same program on the same global values: the same bits in both processes
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
  assert first["kernel"] == (name != "sparse_adam")  # the row-sparse kernel takes whole tables: XLA's step
  want = _train(name, jax.devices()[:1])
  del want["kernel"]  # one device: the row-sparse kernel serves sparse_adam
  assert want.keys() == first.keys() - {"kernel"}
  # The batch mean is reduced over 4 devices in another order than over 1: a few ulps in the
  # gradient; Adam's step is m / sqrt(v), scale-free, so they stay a few ulps of the parameters.
  params = {k: v for k, v in want.items() if k.startswith("params")}
  _close_at_leaf_scale(first, params, rtol=1e-6)
  if name != "adam8bit":  # 8-bit moments: one ulp of the gradient may round a code to its neighbour
    _close_at_leaf_scale(first, want, rtol=1e-5)


def _of(run, prefix):
  return {k.split(":", 1)[1]: v for k, v in run.items() if k.startswith(prefix + ":")}


def test_checkpoint_saved_and_resumed_across_two_processes(two_processes, tmp_path):
  """FSDP over both processes: save at step 2, restore into an eager `like`, resume = never stopped = one process."""
  first, second = (_of(r, "resume") for r in two_processes)
  assert first and first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
  for key in [k for k in first if k.startswith("resumed")]:
    np.testing.assert_array_equal(first[key], first[key.replace("resumed", "straight")], err_msg=key)
  want = _resume(jax.devices()[:1], str(tmp_path))
  _close_at_leaf_scale(first, want, rtol=1e-6)
