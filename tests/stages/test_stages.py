"""The named stages: chained by hand they are jadam.adam; rearranged they are torch's, optax's and Keras's variants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jadam
from tests.helpers import parity as _parity
from tests.helpers import reference

STEPS = 500
LR, B1, B2, EPS, WD = 1e-2, 0.85, 0.995, 1e-7, 0.05


def _by_hand(*, amsgrad=None, wd=WD):
  """The chain of jadam.adam written out; `amsgrad` is where max_nu goes: "torch" (before bias_correct) or "optax"."""
  return optax.chain(
    jadam.add_l2(wd),
    jadam.scale_by_moments(B1, B2),
    *([jadam.max_nu()] if amsgrad == "torch" else []),
    jadam.bias_correct(),
    *([jadam.max_nu()] if amsgrad == "optax" else []),
    jadam.normalize(EPS),
    jadam.scale_by_lr(LR),
  )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_hand_chain_is_adam_bitwise(dtype, amsgrad):
  prob = _parity.problem(STEPS)
  with jax.enable_x64(dtype == np.float64):
    got = _parity.run_jax(_by_hand(amsgrad="torch" if amsgrad else None), prob, dtype)
    want = _parity.run_jax(jadam.adam(LR, B1, B2, EPS, weight_decay=WD, amsgrad=amsgrad), prob, dtype)
  assert got.dtype == dtype
  chex.assert_trees_all_equal(got, want)


class AmsgradPlacementTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("torch", "torch"), ("optax", "optax"))
  def test_max_nu_placement_matches_reference(self, where):
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      # Shrinking gradients make the running maximum bind.
      grads = rng.normal(size=(60, 4)) * np.linspace(2.0, 0.1, 60)[:, None]
      p0 = rng.uniform(1, 2, 4)
      tx = _by_hand(amsgrad=where, wd=0.0)
      theta = jnp.asarray(p0)
      state, update = self.variant(tx.init)(theta), self.variant(tx.update)
      thetas = []
      for g in grads:
        u, state = update(jnp.asarray(g), state, theta)
        theta = optax.apply_updates(theta, u)
        thetas.append(theta)
      want = reference.adam(grads, p0, lr=LR, b1=B1, b2=B2, eps=EPS, amsgrad=where)
      chex.assert_trees_all_close(np.asarray(thetas), want, rtol=1e-12, atol=0)
      other = reference.adam(
        grads, p0, lr=LR, b1=B1, b2=B2, eps=EPS, amsgrad={"torch": "optax", "optax": "torch"}[where]
      )
      assert _parity.max_rel(np.asarray(thetas), other) > 1e-6  # the two placements really differ here


def _torch_amsgrad(params):
  import torch

  return torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS, amsgrad=True)


def test_max_nu_before_bias_correct_is_torch_amsgrad():
  pytest.importorskip("torch")
  prob = _parity.problem(STEPS)
  with jax.enable_x64(True):
    got = _parity.run_jax(_by_hand(amsgrad="torch", wd=0.0), prob, np.float64)
    other = _parity.run_jax(_by_hand(amsgrad="optax", wd=0.0), prob, np.float64)
    want = _parity.run_torch(_torch_amsgrad, prob, np.float64)
  assert _parity.max_rel(got, want) <= 1e-12
  assert _parity.max_rel(other, want) > 1e-9
  got32, g32 = _parity.run_jax(_by_hand(amsgrad="torch", wd=0.0), prob, np.float32, with_grads=True)
  per_step = _parity.run_torch(_torch_amsgrad, prob, np.float32, teacher=(got32, g32))
  assert _parity.max_ulps(got32, per_step) <= 2


def test_max_nu_after_bias_correct_is_optax_amsgrad():
  prob = _parity.problem(STEPS)

  def make_optax():
    return optax.amsgrad(LR, B1, B2, EPS)

  with jax.enable_x64(True):
    got = _parity.run_jax(_by_hand(amsgrad="optax", wd=0.0), prob, np.float64)
    other = _parity.run_jax(_by_hand(amsgrad="torch", wd=0.0), prob, np.float64)
    want = _parity.run_optax(make_optax(), prob, np.float64)
  assert _parity.max_rel(got, want) <= 1e-12
  assert _parity.max_rel(other, want) > 1e-9
  got32, g32 = _parity.run_jax(_by_hand(amsgrad="optax", wd=0.0), prob, np.float32, with_grads=True)
  per_step = _parity.run_optax(make_optax(), prob, np.float32, teacher=(got32, g32))
  assert _parity.max_ulps(got32, per_step) <= 2


def _keras_form(eps):
  return optax.chain(
    jadam.scale_by_moments(0.9, 0.999),
    jadam.bias_correct(into_step=True),
    jadam.normalize(eps),
    jadam.scale_by_lr(1e-3),
  )


class IntoStepTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("unit", 1.0), ("eps_dominated", 1e-7))
  def test_into_step_matches_keras_reference(self, scale):
    eps = 1e-7  # Keras's default
    with jax.enable_x64(True):
      rng = np.random.default_rng(5)
      grads = scale * rng.normal(size=(100, 4))
      p0 = rng.uniform(1, 2, 4)
      tx = _keras_form(eps)
      theta = jnp.asarray(p0)
      state, update = self.variant(tx.init)(theta), self.variant(tx.update)
      thetas = []
      for g in grads:
        u, state = update(jnp.asarray(g), state, theta)
        theta = optax.apply_updates(theta, u)
        thetas.append(theta)
      thetas = np.asarray(thetas)
      chex.assert_trees_all_close(thetas, reference.adam(grads, p0, lr=1e-3, eps=eps, keras=True), rtol=1e-12, atol=0)
      standard = reference.adam(grads, p0, lr=1e-3, eps=eps)

      def first(th):
        return np.abs(th[0] - p0)  # the size of the first step

      rel = np.max(np.abs(first(thetas) - first(standard)) / first(standard))
      if scale == 1.0:
        assert rel < 1e-4  # eps is small next to |g|: the two forms nearly agree
      else:
        assert rel > 0.5  # eps acts as eps / sqrt(1 - b2) ~ 32 eps at t = 1: the step shrinks by most of itself


@pytest.mark.parametrize(
  "tx, updates, stage, must_come_first",
  [
    (jadam.bias_correct(), "tree", "jadam.bias_correct", "jadam.scale_by_moments"),
    (jadam.max_nu(), "tree", "jadam.max_nu", "jadam.scale_by_moments"),
    (jadam.normalize(), "tree", "jadam.normalize", "jadam.scale_by_moments"),
    (jadam.center(), "tree", "jadam.center", "jadam.scale_by_moments"),
    (jadam.scale_by_lr(1e-3), "moments", "jadam.scale_by_lr", "jadam.normalize"),
    (jadam.add_l2(0.1), "moments", "jadam.add_l2", "jadam.normalize"),
    (jadam.scale_by_moments(), "moments", "jadam.scale_by_moments", "jadam.normalize"),
    (jadam.momentum(0.9), "moments", "jadam.momentum", "jadam.normalize"),
    (jadam.flip_sign(), "moments", "jadam.flip_sign", "jadam.normalize"),
    (jadam.accumulate_squares(), "moments", "jadam.accumulate_squares", "jadam.normalize"),
  ],
)
def test_wrong_kind_of_updates_names_the_stage_that_must_come_first(tx, updates, stage, must_come_first):
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 0.5)}
  if updates == "moments":
    moments_tx = jadam.scale_by_moments()
    grads, _ = moments_tx.update(grads, moments_tx.init(params), params)
    assert isinstance(grads, jadam.Moments)
  with pytest.raises(TypeError) as info:
    tx.update(grads, tx.init(params), params)
  assert stage in str(info.value) and must_come_first in str(info.value)


def test_wrong_order_inside_a_chain_raises_at_trace_time():
  tx = optax.chain(jadam.scale_by_moments(), jadam.scale_by_lr(1e-3))
  params = jnp.ones(3)
  with pytest.raises(TypeError, match="jadam.normalize"):
    jax.jit(tx.update)(params, tx.init(params), params)


def test_bias_correct_twice_raises():
  tx = optax.chain(jadam.scale_by_moments(), jadam.bias_correct(), jadam.bias_correct(), jadam.normalize())
  params = jnp.ones(3)
  with pytest.raises(TypeError, match="already bias-corrected"):
    tx.update(params, tx.init(params), params)


def test_add_l2_without_params_raises_value_error():
  tx = jadam.add_l2(0.1)
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="jadam.add_l2"):
    jadam.adam(1e-3, weight_decay=0.1).update(params, jadam.adam(1e-3, weight_decay=0.1).init(params))


def test_add_l2_mask_spares_masked_leaves():
  params = {"w": jnp.full(3, 2.0), "b": jnp.full(2, 2.0)}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = jadam.add_l2(0.5, mask={"w": True, "b": False})
  out, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_equal(out, {"w": jnp.full(3, 1.0), "b": jnp.zeros(2)})


def test_center_then_normalize_is_centered_rmsprop_step():
  """center gives g / (sqrt(v - m^2) + eps), by hand for one step from zero state."""
  with jax.enable_x64(True):
    tx = optax.chain(jadam.scale_by_moments(0.9, 0.9), jadam.center(), jadam.normalize(0.0))
    g = jnp.asarray([0.5, -2.0, 3.0])
    u, _ = tx.update(g, tx.init(g), g)
    v, m = 0.1 * g * g, 0.1 * g
    chex.assert_trees_all_close(u, g / jnp.sqrt(v - m * m), rtol=1e-14)


def test_max_nu_with_into_step_is_keras_amsgrad():
  """max_nu before bias_correct(into_step=True): Keras's amsgrad, max over raw v with eps-hat outside the root."""
  prob = _parity.problem(STEPS, scale=1e-3)
  tx = optax.chain(
    jadam.scale_by_moments(B1, B2),
    jadam.max_nu(),
    jadam.bias_correct(into_step=True),
    jadam.normalize(EPS),
    jadam.scale_by_lr(LR),
  )
  with jax.enable_x64(True):
    got, grads = _parity.run_jax(tx, prob, np.float64, with_grads=True)
  want = reference.adam(grads, prob.params, lr=LR, b1=B1, b2=B2, eps=EPS, keras=True, amsgrad=True)
  assert _parity.max_rel(got, want) <= 1e-12
  plain = reference.adam(grads, prob.params, lr=LR, b1=B1, b2=B2, eps=EPS, keras=True)
  assert _parity.max_rel(got, plain) > 1e-9


def _run_keras(prob, steps, teacher=None):
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("keras is not on its JAX backend")
  a, b, noise = (np.asarray(x, np.float32) for x in (prob.a, prob.b, prob.noise))
  with jax.numpy_dtype_promotion("standard"):
    var = keras.Variable(np.asarray(prob.params, np.float32), dtype="float32")
    opt = keras.optimizers.Adam(LR, beta_1=B1, beta_2=B2, epsilon=EPS)
    opt.build([var])
    out = []
    for t in range(steps):
      if teacher is None:
        g = a * np.asarray(var.value) - b + noise[t]
      else:
        var.assign(teacher[0][t - 1] if t else np.asarray(prob.params, np.float32))
        g = teacher[1][t]
      opt.apply([jnp.asarray(g)], [var])
      out.append(np.asarray(var.value))
  return np.stack(out)


@pytest.mark.parametrize("scale", [1.0, 1e-5], ids=["unit", "eps_dominated"])
def test_into_step_matches_live_keras_float32(scale):
  """keras.optimizers.Adam (JAX backend) against bias_correct(into_step=True), in float32 ulps."""
  prob = _parity.problem(200, scale=scale)

  def chain(into_step):
    return optax.chain(
      jadam.scale_by_moments(B1, B2),
      jadam.bias_correct(into_step=into_step),
      jadam.normalize(EPS),
      jadam.scale_by_lr(LR),
    )

  got, grads = _parity.run_jax(chain(True), prob, np.float32, with_grads=True)
  assert _parity.max_ulps(got, _run_keras(prob, 200, teacher=(got, grads))) <= 2
  if scale == 1.0:
    assert _parity.max_ulps(got, _run_keras(prob, 200)) <= 64
  else:  # where eps matters, the standard form is far from Keras
    std, std_grads = _parity.run_jax(chain(False), prob, np.float32, with_grads=True)
    assert _parity.max_ulps(std, _run_keras(prob, 200, teacher=(std, std_grads))) > 1000
