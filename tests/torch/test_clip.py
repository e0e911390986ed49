"""jadam.torch.clip_grad_norm / clip_grad_value against torch.nn.utils, float64, to 1e-12."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jadam
from tests.helpers import torch_front as H

torch = pytest.importorskip("torch")


def _grads(seed, scale):
  rng = np.random.default_rng(seed)
  return {
    "a": scale * rng.normal(size=(4, 3)),
    "b": scale * rng.normal(size=(5,)),
    "c": scale * rng.normal(size=(2, 2)),
  }


def _torch_clip(grads, fn):
  ts = [torch.tensor(g, requires_grad=True) for g in grads.values()]
  for t, g in zip(ts, grads.values(), strict=True):
    t.grad = torch.tensor(g)
  out = fn(ts)
  return {k: t.grad.numpy() for k, t in zip(grads, ts, strict=True)}, out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and not (the coefficient clamps to 1)
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
  grads = _grads(0, 2.0)
  want, want_norm = _torch_clip(grads, lambda ts: torch.nn.utils.clip_grad_norm_(ts, max_norm, norm_type))
  with jax.enable_x64(True):
    tx = jadam.torch.clip_grad_norm(max_norm, norm_type)
    got, _ = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, tx.init(None))
    norm = jadam.torch._clip.total_norm({k: jnp.asarray(v) for k, v in grads.items()}, norm_type)
  np.testing.assert_allclose(float(norm), float(want_norm), rtol=1e-14)
  for k in grads:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-14, atol=0)


def test_clip_grad_norm_is_not_optax_clip_by_global_norm():
  """torch divides by norm + 1e-6: optax's clip_by_global_norm lands 1e-7 (relative) away, jadam's does not."""
  grads = _grads(1, 1.0)
  want, _ = _torch_clip(grads, lambda ts: torch.nn.utils.clip_grad_norm_(ts, 0.1))
  with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
    g = {k: jnp.asarray(v) for k, v in grads.items()}
    ours = jadam.torch.clip_grad_norm(0.1).update(g, jadam.torch.clip_grad_norm(0.1).init(None))[0]
    theirs = optax.clip_by_global_norm(0.1).update(g, optax.EmptyState())[0]
  assert max(np.max(np.abs(np.asarray(ours[k]) / want[k] - 1)) for k in g) < 1e-14
  assert max(np.max(np.abs(np.asarray(theirs[k]) / want[k] - 1)) for k in g) > 1e-9


def test_clip_grad_norm_first_in_a_chain_follows_torch_over_a_run():
  """A ported recipe: clip_grad_norm_(1.0) then AdamW, 200 steps, float64."""
  steps = 200

  def make(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)

  # torch: clip between backward and step (a wrapped optimizer whose step clips first)
  class Clipped:
    def __init__(self, groups):
      self.opt = make(groups)
      self.param_groups = self.opt.param_groups

    def step(self):
      torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 1.0)
      self.opt.step()

  want = H.run_torch(Clipped, steps, np.float64)
  with jax.enable_x64(True):
    got = H.run_jax(
      optax.chain(jadam.torch.clip_grad_norm(1.0), jadam.torch.AdamW(lr=1e-2, weight_decay=0.1)), steps, np.float64
    )
  assert H.max_rel_diff(got, want) <= 1e-12


def test_error_if_nonfinite_eagerly_and_under_checkify():
  g = {"a": jnp.asarray([1.0, jnp.inf])}
  tx = jadam.torch.clip_grad_norm(1.0, error_if_nonfinite=True)
  with pytest.raises(RuntimeError, match=r"The total norm of order 2.0 for gradients from `parameters` is non-finite"):
    tx.update(g, tx.init(None))
  err, _ = jax.jit(checkify.checkify(tx.update))(g, tx.init(None))
  with pytest.raises(checkify.JaxRuntimeError, match="is non-finite"):
    err.throw()
  err, _ = jax.jit(checkify.checkify(tx.update))({"a": jnp.ones(2)}, tx.init(None))
  err.throw()  # finite: no error
  quiet = jadam.torch.clip_grad_norm(1.0)
  out = np.asarray(jax.jit(quiet.update)(g, quiet.init(None))[0]["a"])
  assert out[0] == 0 and np.isnan(out[1])  # scaled by max_norm / inf = 0, as torch: 1 * 0 and inf * 0


def test_clip_grad_value_matches_torch():
  grads = _grads(2, 2.0)
  want, _ = _torch_clip(grads, lambda ts: torch.nn.utils.clip_grad_value_(ts, 0.7))
  with jax.enable_x64(True):
    tx = jadam.torch.clip_grad_value(0.7)
    got, _ = jax.jit(tx.update)({k: jnp.asarray(v) for k, v in grads.items()}, tx.init(None))
  for k in grads:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])
  z = jnp.asarray([2 - 0.5j, -3 + 4j], jnp.complex64)
  out, _ = tx.update(z, tx.init(None))
  np.testing.assert_allclose(out, [0.7 - 0.5j, -0.7 + 0.7j], rtol=1e-6)  # part by part


def test_integer_leaves_and_schedules():
  tx = jadam.torch.clip_grad_norm(lambda count: 1.0 / (1.0 + count.astype(jnp.float32)))
  g = {"w": jnp.full(4, 10.0), "i": jnp.arange(3)}
  state = tx.init(None)
  u, state = tx.update(g, state)
  np.testing.assert_array_equal(u["i"], g["i"])
  np.testing.assert_allclose(np.linalg.norm(u["w"]), 1.0 * 20 / (20 + 1e-6), rtol=1e-6)
  u, state = tx.update(g, state)
  np.testing.assert_allclose(np.linalg.norm(u["w"]), 0.5 * 20 / (20 + 1e-6), rtol=1e-6)
