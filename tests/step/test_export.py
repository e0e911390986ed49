"""jax.export of the step helpers: pure XLA for every platform set, and the same results as the live step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._kernels import build as _kernels

PLATFORMS = [("cpu",), ("cuda",), ("tpu",), ("cpu", "cuda", "tpu")]
# Require the kernel where it runs (the CPU); on an accelerator the helpers' own choice (pure XLA).
FUSED = True if jax.default_backend() == "cpu" else None


def _custom_calls(exp):
  text = exp.mlir_module()
  return [line.strip() for line in text.splitlines() if "stablehlo.custom_call" in line and "@Sharding" not in line]


def _loss(params, x):
  return sum(jnp.sum(jnp.sin(p) * x) for p in jax.tree.leaves(params))


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 3000).reshape(30, 100), "b": jnp.linspace(0.0, 1.0, 7)}


def _helpers(tx):
  """(name, jitted function, its arguments) for each helper; not donated, so the inputs can be reused."""
  params = _params()
  grads = jax.tree.map(jnp.cos, params)
  x = jnp.float32(0.5)
  return [
    ("make_train_step", jadam.make_train_step(_loss, tx, donate=False, fused=FUSED), (params, tx.init(params), x)),
    ("make_update_step", jadam.make_update_step(tx, donate=False, fused=FUSED), (params, tx.init(params), grads)),
    (
      "update_and_apply",
      jax.jit(functools.partial(jadam.update_and_apply, tx, fused=FUSED)),
      (grads, tx.init(params), params),
    ),
  ]


def _assert_close(got, want, ulps):
  """Each leaf within `ulps` ulps of its largest value (the exported step is XLA's, which may contract differently)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.size and jnp.issubdtype(a.dtype, jnp.floating):
      tol = ulps * np.spacing(np.max(np.abs(b)).astype(b.dtype))
      assert np.max(np.abs(a - b)) <= tol, (np.max(np.abs(a - b)), tol)
    else:
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("platforms", PLATFORMS, ids="+".join)
@pytest.mark.parametrize(
  "make_tx",
  [
    lambda: jadam.adam(1e-2, weight_decay=1e-2),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-2, amsgrad=True)),
    lambda: jadam.torch.AdamW(lr=1e-2, maximize=True),
    lambda: optax.apply_if_finite(jadam.adam(1e-2), 3),
  ],
  ids=["adam", "clip_adamw_amsgrad", "torch_adamw_maximize", "apply_if_finite"],
)
def test_helpers_export_as_pure_xla(platforms, make_tx):
  if jax.default_backend() == "cpu" and not _kernels.load():
    pytest.skip("the kernel is unavailable: nothing to keep out of the export")
  tx = make_tx()
  for name, fn, args in _helpers(tx):
    if jax.default_backend() == "cpu":
      assert "@jadam_adam_f32" in fn.lower(*args).as_text(), name  # the live CPU step takes the kernel
    exp = jax.export.export(fn, platforms=platforms)(*args)
    assert _custom_calls(exp) == [], (name, _custom_calls(exp)[:2])
    if "cpu" in platforms:
      _assert_close(exp.call(*args), fn(*args), ulps=4)


@pytest.mark.parametrize("platforms", [("cuda",), ("tpu",)], ids="+".join)
def test_many_leaves_lower_as_pure_xla_for_accelerators(platforms):
  tx = jadam.adamw(1e-3)
  params = [jax.ShapeDtypeStruct((100,), jnp.float32)] * 2000
  state = jax.eval_shape(tx.init, params)
  step = jadam.make_update_step(tx, fused=FUSED)  # the kernel's primitive, forced even on small leaves
  exp = jax.export.export(step, platforms=platforms)(params, state, params)
  assert _custom_calls(exp) == []


@pytest.mark.parametrize("platforms", [("cuda",), ("tpu",)], ids="+".join)
def test_mnist_train_step_lowers_as_pure_xla_for_accelerators(platforms):
  pytest.importorskip("flax")
  from examples.mnist import models, train  # pylint: disable=g-import-not-at-top

  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adamw(1e-3))
  module = models.LinenCNN()
  images = jax.ShapeDtypeStruct((32, 28, 28), jnp.uint8)
  labels = jax.ShapeDtypeStruct((32,), jnp.int32)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])

  def loss(params, images, labels):
    return train._mean_loss(module.apply({"params": params}, models.prepare(images)), labels)

  step = jadam.make_train_step(loss, tx, fused=FUSED)
  state = jax.eval_shape(tx.init, params)
  exp = jax.export.export(step, platforms=platforms)(params, state, images, labels)
  assert _custom_calls(exp) == []
  # and the example's own Linen step, as examples/mnist runs it (jadam.make_train_step inside; jit to export it)
  task = train.make_linen_task(tx, seed=0)
  totals = jnp.zeros(3)
  exp = jax.export.export(jax.jit(task.train_step), platforms=platforms)(task.state, totals, images, labels)
  assert _custom_calls(exp) == []


def test_a_step_built_inside_jit_from_traced_hyperparameters_exports_as_pure_xla():
  """A transformation built inside `jit` from a traced learning rate: the kernel's trace closes over it, so it
  becomes an operand of the planned step, and the stages' lowering (export) and batching rule (vmap over the
  learning rate) read it there."""
  if jax.default_backend() == "cpu" and not _kernels.load():
    pytest.skip("the kernel is unavailable")
  params = _params()
  grads = jax.tree.map(jnp.cos, params)
  state = jadam.adamw(1e-2).init(params)

  @jax.jit
  def step(lr, grads, state, params):
    return jadam.update_and_apply(jadam.adamw(lr, weight_decay=0.1), grads, state, params, fused=FUSED)

  @jax.jit
  def stages(lr, grads, state, params):
    return jadam.update_and_apply(jadam.adamw(lr, weight_decay=0.1), grads, state, params, fused=False)

  lr = jnp.float32(1e-2)
  if jax.default_backend() == "cpu":
    assert "@jadam_adam_f32" in step.lower(lr, grads, state, params).as_text()
  want = stages(lr, grads, state, params)
  _assert_close(step(lr, grads, state, params), want, ulps=4)
  exp = jax.export.export(step, platforms=("cpu", "cuda"))(lr, grads, state, params)
  assert _custom_calls(exp) == []
  _assert_close(exp.call(lr, grads, state, params), want, ulps=4)
  rates = jnp.asarray([1e-2, 3e-2], jnp.float32)
  batched = jax.vmap(step, in_axes=(0, None, None, None))(rates, grads, state, params)
  for j in range(2):
    got = jax.tree.map(lambda x, j=j: x[j], batched)
    _assert_close(got, stages(rates[j], grads, state, params), ulps=4)
