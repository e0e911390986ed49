"""Determinism: the same seed and inputs give the same bits, run to run, compile to compile and process to process.

What is and is not bitwise (docs/guides/reliability.md):

- Two runs of the same program (jitted, or both eager) give bit-identical
  parameters and state, compiled twice in this process or once in a new one;
  bfloat16 moments too (their stochastic rounding draws its bits from a hash of
  the element index and the step, not from a PRNG state).
- A jitted step and the same step run eagerly are *not* bit-identical in
  general: XLA on CPU contracts ``a * b + c`` into a fused multiply-add under
  `jit` (one rounding instead of two), and eager execution runs each operation
  on its own. They agree to within a couple of ulps of each leaf's scale per
  step; integer state (counts) and the rounding bits agree exactly.
"""

import hashlib
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._storage import bf16 as _lowp
from tests.helpers.bits import assert_bitwise_equal, bits

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 40
OPTIMIZERS = {
  "adam": "jadam.adam(1e-2, amsgrad=True, weight_decay=0.01)",
  "adam_bf16_moments": "jadam.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)",
  "sgd": "jadam.sgd(1e-2, momentum=0.9, nesterov=True)",
  "rmsprop": "jadam.rmsprop(1e-2, centered=True, momentum=0.5)",
  "radam": "jadam.radam(1e-2)",
  "torch_adamw_groups": (
    "jadam.torch.AdamW([{'params': 'b.*', 'lr': 1e-3}], lr=jadam.torch.CosineAnnealingLR(1e-2, T_max=40))"
  ),
}

# The training run, as source: the parent runs it and a child process runs the same text.
PROGRAM = textwrap.dedent("""
    import jax, jax.numpy as jnp, jadam

    def train(tx, steps, seed=0, jit=True):
      k_w, k_b, k_x = jax.random.split(jax.random.key(seed), 3)
      params = {"w": jax.random.normal(k_w, (8, 4)), "b": jax.random.normal(k_b, (4,)).astype(jnp.bfloat16)}
      xs = jax.random.normal(k_x, (steps, 16, 8))

      def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w"] + p["b"].astype(jnp.float32)) ** 2)

      def step(p, s, x):
        return jadam.update_and_apply(tx, jax.grad(loss)(p, x), s, p)

      step = jax.jit(step) if jit else step
      state = tx.init(params)
      for t in range(steps):
        params, state = step(params, state, xs[t])
      return params, state
""")
_namespace = {}
exec(PROGRAM, _namespace)
train = _namespace["train"]


def _digest(tree):
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(bits(leaf)).tobytes())
  return h.hexdigest()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_two_jitted_runs_are_bitwise_identical(name):
  first = train(eval(OPTIMIZERS[name]), STEPS)
  second = train(eval(OPTIMIZERS[name]), STEPS)  # a new transformation and a new jit: compiled again
  assert_bitwise_equal(second, first, name)


def test_two_eager_runs_are_bitwise_identical():
  tx = eval(OPTIMIZERS["adam_bf16_moments"])
  assert_bitwise_equal(train(tx, 2, jit=False), train(tx, 2, jit=False), "eager")


def test_a_new_process_gives_the_same_bits():
  chosen = {k: OPTIMIZERS[k] for k in ("adam_bf16_moments", "torch_adamw_groups")}
  child = PROGRAM + textwrap.dedent(f"""
      import hashlib, numpy as np, optax
      from tests.helpers.bits import bits
      for name, make in {chosen!r}.items():
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(train(eval(make), {STEPS})):
          h.update(np.ascontiguousarray(bits(leaf)).tobytes())
        print(name, h.hexdigest())
  """)
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }
  out = subprocess.run(
    [sys.executable, "-c", child], check=True, cwd=ROOT, env=env, capture_output=True, text=True
  ).stdout
  theirs = dict(line.split() for line in out.splitlines())
  ours = {name: _digest(train(eval(make), STEPS)) for name, make in chosen.items()}
  assert theirs == ours


@pytest.mark.parametrize("name", ["adam", "adam_bf16_moments", "sgd"])
def test_jit_and_eager_agree_to_a_couple_of_ulps_per_step(name):
  """Not bitwise: XLA fuses a * b + c into an FMA under jit. Integer state is exact."""
  tx = eval(OPTIMIZERS[name])
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.bfloat16)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params) for _ in range(2)]
  update = jax.jit(tx.update)
  state = update(grads[0], tx.init(params), params)[1]  # moments and momentum not zero
  eager = tx.update(grads[1], state, params)
  jitted = update(grads[1], state, params)
  for (path, e), j in zip(jax.tree_util.tree_leaves_with_path(eager), jax.tree.leaves(jitted), strict=True):
    e, j = np.asarray(e), np.asarray(j)
    assert e.dtype == j.dtype and e.shape == j.shape
    if not np.issubdtype(e.dtype, np.floating) and e.dtype.name != "bfloat16":
      np.testing.assert_array_equal(e, j, err_msg=jax.tree_util.keystr(path))  # counts: exact
      continue
    e64, j64 = e.astype(np.float64), j.astype(np.float64)
    ulp = float(jnp.finfo(e.dtype).eps) * max(np.max(np.abs(e64), initial=0.0), 1e-30)
    assert np.max(np.abs(e64 - j64), initial=0.0) <= 2 * ulp, jax.tree_util.keystr(path)


def test_where_jit_and_eager_are_bitwise():
  """No contraction opportunity, no difference: a single multiply (plain SGD), a sign flip, the rounding bits."""
  g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)}
  for tx in (jadam.sgd(1e-2), optax.chain(jadam.flip_sign(), jadam.scale_by_lr(3e-3))):
    state = tx.init(g)
    assert_bitwise_equal(jax.jit(tx.update)(g, state, g), tx.update(g, state, g))
  count = jnp.asarray(12345, jnp.int32)
  assert_bitwise_equal(
    jax.jit(_lowp.hash_bits, static_argnums=(0, 2))((4, 5), count, 3), _lowp.hash_bits((4, 5), count, 3)
  )
  x = jnp.linspace(-1.0, 1.0, 20, dtype=jnp.float32) / 3
  assert_bitwise_equal(
    jax.jit(_lowp.round_to_bfloat16, static_argnums=2)(x, count, 1), _lowp.round_to_bfloat16(x, count, 1)
  )
