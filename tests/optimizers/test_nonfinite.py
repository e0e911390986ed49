"""Non-finite gradients: `optax.apply_if_finite` around a jadam optimizer skips them exactly.

The policy (docs/guides/reliability.md): a step whose gradient holds a NaN or an Inf
anywhere leaves the parameters, every moment and every step count as they
were, as if the step had not been taken; `max_consecutive_errors` such steps in
a row are skipped, and the next one is applied, so that a run whose gradients
stay broken fails loudly (NaN parameters) instead of stalling silently.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers.bits import assert_bitwise_equal

STEPS = 20
OPTIMIZERS = {
  "adam": lambda: jadam.adam(1e-2, amsgrad=True, weight_decay=0.01),
  "adamw": lambda: jadam.adamw(1e-2, weight_decay=0.1),
  "sgd_momentum": lambda: jadam.sgd(1e-2, momentum=0.9, dampening=0.1),
  "rmsprop": lambda: jadam.rmsprop(1e-2, centered=True, momentum=0.5),
  "adagrad": lambda: jadam.adagrad(1e-1, lr_decay=0.01),
  "nadam": lambda: jadam.nadam(1e-2),
  "torch_adam_schedule": lambda: jadam.torch.Adam(lr=jadam.torch.StepLR(1e-2, step_size=4, gamma=0.5)),
}


def _params():
  return {
    "w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
    "b": jnp.full(4, 0.5, jnp.float32),
    "h": jnp.linspace(1.0, 2.0, 3, dtype=jnp.bfloat16),
    "i": jnp.arange(2, dtype=jnp.int32),  # not optimized: passes through
  }


@functools.cache
def _step(name, max_consecutive_errors):
  tx = optax.apply_if_finite(OPTIMIZERS[name](), max_consecutive_errors)
  return tx, jax.jit(lambda g, s, p: jadam.update_and_apply(tx, g, s, p) + (tx.update(g, s, p)[0],))


def _gradient(params, target):
  """The gradient of 0.5 |p - target|^2: it follows the parameters, so a wrongly applied step shows later."""
  return {k: (p - target[k]).astype(p.dtype) if k != "i" else jnp.zeros_like(p) for k, p in params.items()}


def _inject(grads, rng):
  """One random element of one random float leaf set to NaN, +Inf or -Inf."""
  key = rng.choice(["w", "b", "h"])
  leaf = np.array(grads[key], np.float32)
  leaf.flat[rng.integers(leaf.size)] = rng.choice([np.nan, np.inf, -np.inf])
  return {**grads, key: jnp.asarray(leaf, grads[key].dtype)}


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nonfinite_steps_are_skipped_exactly(name, seed):
  rng = np.random.default_rng(seed)
  bad = set(rng.choice(STEPS, size=6, replace=False).tolist()) | {0}  # step 0 too: before any moment exists
  targets = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _params()) for _ in range(STEPS)]
  tx, step = _step(name, max_consecutive_errors=STEPS)

  # The run that meets the bad gradients ...
  params, state = _params(), tx.init(_params())
  for t in range(STEPS):
    grads = _gradient(params, targets[t])
    if t in bad:
      grads = _inject(grads, rng)
    new_params, new_state, updates = step(grads, state, params)
    if t in bad:  # nothing moved: parameters, moments, counts
      assert_bitwise_equal(new_params, params, f"{name} params at bad step {t}")
      assert_bitwise_equal(new_state.inner_state, state.inner_state, f"{name} state at bad step {t}")
      assert not bool(new_state.last_finite) and int(new_state.notfinite_count) >= 1
      assert all(not np.any(np.asarray(u, np.float32)) for u in jax.tree.leaves(updates))
    else:
      assert int(new_state.notfinite_count) == 0  # the consecutive counter resets
    params, state = new_params, new_state

  # ... is, bit for bit, the run that never saw them.
  clean_params, clean_state = _params(), tx.init(_params())
  for t in sorted(set(range(STEPS)) - bad):
    clean_params, clean_state, _ = step(_gradient(clean_params, targets[t]), clean_state, clean_params)
  assert_bitwise_equal(params, clean_params, f"{name} params")
  assert_bitwise_equal(state.inner_state, clean_state.inner_state, f"{name} state")
  assert int(state.total_notfinite) == len(bad) and int(clean_state.total_notfinite) == 0
  counts = [
    int(c) for p, c in jax.tree_util.tree_leaves_with_path(state.inner_state) if "count" in jax.tree_util.keystr(p)
  ]
  assert counts and all(c == STEPS - len(bad) for c in counts)  # every inner count: good steps only


def test_after_max_consecutive_errors_the_bad_step_is_applied():
  """Optax's documented give-up: the (max+1)-th bad step in a row goes through, and NaN reaches the moments."""
  tx, step = _step("adam", max_consecutive_errors=2)
  params = _params()
  state = tx.init(params)
  nan = {**_gradient(params, params), "w": jnp.full((3, 4), jnp.nan, jnp.float32)}
  for _ in range(2):
    params, state, _ = step(nan, state, params)
    assert not np.any(np.isnan(np.asarray(params["w"])))
  params, state, _ = step(nan, state, params)
  assert np.all(np.isnan(np.asarray(params["w"])))  # loud, not silent
  assert np.all(np.isnan(np.asarray(state.inner_state[1].nu["w"])))  # and in the moments for good


def test_never_giving_up():
  """max_consecutive_errors at the int32 maximum: the counter saturates below it, every bad step is skipped."""
  tx, step = _step("adam", max_consecutive_errors=2**31 - 1)
  params = _params()
  state = tx.init(params)
  state = state._replace(notfinite_count=jnp.asarray(2**31 - 3, jnp.int32))
  inf = {**_gradient(params, params), "b": jnp.full(4, jnp.inf, jnp.float32)}
  for _ in range(5):
    new_params, state, _ = step(inf, state, params)
    assert_bitwise_equal(new_params, params)
  assert int(state.notfinite_count) == 2**31 - 1


def test_a_skipped_step_turns_negative_zero_parameters_positive():
  """The one bit a skipped step changes: optax.apply_updates adds +0.0, and -0.0 + 0.0 = +0.0 in IEEE arithmetic."""
  tx, step = _step("adam", max_consecutive_errors=3)
  params = {**_params(), "b": jnp.asarray([-0.0, 0.0, 1.0, -1.0], jnp.float32)}
  nan = {**_gradient(params, params), "w": jnp.full((3, 4), jnp.nan, jnp.float32)}
  new_params, _, _ = step(nan, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(new_params["b"]), np.asarray(params["b"]))  # equal as numbers
  assert list(np.signbit(np.asarray(new_params["b"]))) == [False, False, False, True]


# --- Without apply_if_finite: the parameters a non-finite gradient reaches are torch.optim's -----------------------
# Every jadam.torch optimizer against torch.optim (the 8-bit ones against torch.optim.Adam / AdamW: bitsandbytes
# turns a whole block NaN for an infinite gradient, jadam keeps it in its own parameter, as torch.optim.Adam does).
TORCH_FRONT = {
  "Adam": ("Adam", {}),
  "Adam amsgrad weight_decay": ("Adam", dict(amsgrad=True, weight_decay=0.1)),
  "Adam maximize": ("Adam", dict(maximize=True)),
  "AdamW": ("AdamW", {}),
  "SGD": ("SGD", dict(lr=0.1)),
  "SGD nesterov weight_decay": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
  "SGD dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
  "RMSprop": ("RMSprop", {}),
  "RMSprop centered momentum": ("RMSprop", dict(centered=True, momentum=0.5, weight_decay=0.1)),
  "Adagrad": ("Adagrad", {}),
  "Adagrad lr_decay": ("Adagrad", dict(lr_decay=0.1, weight_decay=0.1)),
  "Adamax": ("Adamax", {}),
  "NAdam": ("NAdam", {}),
  "NAdam decoupled": ("NAdam", dict(decoupled_weight_decay=True, weight_decay=0.1)),
  "RAdam": ("RAdam", {}),
  "RAdam decoupled": ("RAdam", dict(decoupled_weight_decay=True, weight_decay=0.1)),
  "Adadelta": ("Adadelta", {}),
  "Adadelta weight_decay": ("Adadelta", dict(weight_decay=0.1)),
  "Rprop": ("Rprop", {}),
  "Rprop maximize": ("Rprop", dict(maximize=True)),
  "ASGD": ("ASGD", {}),
  "ASGD averaging weight_decay": ("ASGD", dict(t0=1, weight_decay=0.1)),
  "SparseAdam": ("SparseAdam", {}),
  "Adam8bit": ("Adam8bit", dict(min_8bit_size=0)),
  "AdamW8bit": ("AdamW8bit", dict(min_8bit_size=0)),
}
_TORCH_OF = {"Adam8bit": "Adam", "AdamW8bit": "AdamW"}


@pytest.mark.parametrize("name", sorted(TORCH_FRONT))
def test_nonfinite_gradients_reach_the_parameters_torch_reaches(name):
  """NaN, +inf, -inf in one element or all, at the first or second step: after each of four steps, every parameter
  is NaN, infinite or finite exactly where torch.optim's is (float32, jitted, the fused kernel where it serves)."""
  torch = pytest.importorskip("torch")
  from tests.helpers import torch_front as harness

  cls, kw = TORCH_FRONT[name]
  sparse = cls == "SparseAdam"
  size = 300 if cls.endswith("8bit") else 6  # 8-bit: a whole block of 256 and a partial one
  torch_kw = {k: v for k, v in kw.items() if k != "min_8bit_size"}

  def make_opt(ps):
    return getattr(torch.optim, _TORCH_OF.get(cls, cls))(ps, **torch_kw)

  tx = getattr(jadam.torch, cls)(**kw)
  step = jax.jit(lambda g, s, p: jadam.update_and_apply(tx, g, s, p))
  params0, cases = harness.nonfinite_gradients(size)
  for case, grads in cases.items():
    want = harness.torch_patterns(make_opt, params0, grads, sparse=sparse)
    got = harness.jax_patterns(step, tx.init, params0, grads, sparse=sparse)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
      assert np.array_equal(g, w), f"{name}, {case}, after step {t}: jadam {g.tolist()[:8]}, torch {w.tolist()[:8]}"
