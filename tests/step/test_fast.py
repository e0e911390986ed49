"""The fast path: update and apply in one jit, params and state donated without copies."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import jadam


def _tree():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (8, 4)), "b": jnp.zeros(4)}


class UpdateAndApplyTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_update_then_apply_updates(self):
    tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-2, weight_decay=1e-3))
    params = _tree()
    grads = jax.tree.map(jnp.cos, params)
    state = tx.init(params)
    want_updates, want_state = tx.update(grads, state, params)
    want = optax.apply_updates(params, want_updates)
    got, got_state = self.variant(functools.partial(jadam.update_and_apply, tx))(grads, state, params)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-6)

  def test_update_step_donates_without_copies(self):
    tx = jadam.adam(1e-3)
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    state = tx.init(params)
    hlo = jadam.make_update_step(tx).lower(params, state, params).compile().as_text()
    assert " copy(" not in hlo
    # the pitfall it avoids: donated inputs in another order than the outputs
    naive = jax.jit(functools.partial(jadam.update_and_apply, tx), donate_argnums=(1, 2))
    assert " copy(" in naive.lower(params, state, params).compile().as_text()

  def test_update_step_runs_many_steps_and_matches_reference_loop(self):
    tx = jadam.adam(1e-2)
    params = {"w": jnp.linspace(-1.0, 1.0, 12)}
    step, ref_state = jadam.make_update_step(tx), tx.init(params)
    ref, state = params, tx.init(jax.tree.map(jnp.array, params))
    got = jax.tree.map(jnp.array, params)
    for t in range(5):
      grads = {"w": jnp.sin(got["w"] * (t + 1))}
      ref_grads = {"w": jnp.sin(ref["w"] * (t + 1))}
      got, state = step(got, state, grads)
      updates, ref_state = jax.jit(tx.update)(ref_grads, ref_state, ref)
      ref = optax.apply_updates(ref, updates)
    chex.assert_trees_all_close(got, ref, rtol=1e-6)

  @parameterized.parameters(True, False)
  def test_train_step(self, has_aux):
    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def loss_fn(params, x, y):
      loss = jnp.mean((x @ params["w"] - y) ** 2)
      return (loss, {"loss": loss}) if has_aux else loss

    tx = jadam.adam(0.1)
    step = jadam.make_train_step(loss_fn, tx, has_aux=has_aux)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    losses = []
    for _ in range(100):
      params, state, loss, *aux = step(params, state, x, y)
      losses.append(float(loss))
    assert losses[-1] < 1e-2 * losses[0]
    if has_aux:
      assert float(aux[0]["loss"]) == losses[-1]
    np.testing.assert_allclose(params["w"], [1.0, -2.0, 0.5], atol=0.05)

  def test_train_step_errors(self):
    with self.assertRaisesRegex(TypeError, "has_aux"):
      jadam.make_train_step(lambda p: p, jadam.adam(), has_aux=1)
