"""jadam._kernels.optax_compat, the one module that looks inside optax, against the installed optax.

It must find the parts of each of optax's combinators the planner serves (and
the planner must then serve them, equal to the stages), and refuse, never
guess, where optax's closures are not as it expects (another optax version).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._kernels import optax_compat as compat
from jadam._kernels import plan
from jadam._kernels.base import Unserved

P = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.linspace(0.5, -0.3, 5)}
G = jax.tree.map(lambda x: 0.3 * x + 0.1, P)


def test_chain_parts_in_order():
  a, b = jadam.scale_by_lr(0.1), jadam.flip_sign()
  parts = [compat.unwrap(f) for f in compat.chain_parts(optax.chain(a, b).update)]
  assert parts == [a.update, b.update]
  named = optax.named_chain(("first", a), ("second", b))
  assert [compat.unwrap(f) for f in compat.chain_parts(named.update)] == [a.update, b.update]
  state = named.init(P)
  assert compat.named_chain_rebuild(named.update, state)(["x", "y"]) == type(state)(first="x", second="y")
  assert compat.chain_parts(a.update) is None


def test_clip_and_masked():
  assert compat.clip_max_norm(optax.clip_by_global_norm(2.5).update) == 2.5
  assert compat.clip_max_norm(optax.clip(2.5).update) is None
  inner, mask = jadam.add_l2(0.1), {"w": True, "b": False}
  tx = optax.masked(inner, mask)
  found, found_mask = compat.masked(tx.update, tx.init(P))
  assert compat.unwrap(found.update) is inner.update and found_mask is mask
  assert compat.masked(tx.update, optax.EmptyState()) is None  # the state must be optax's too


SERVED = {
  "chain": lambda: optax.chain(jadam.adam(0.01)),
  "named_chain": lambda: optax.named_chain(("clip", optax.clip_by_global_norm(0.1)), ("adam", jadam.adam(0.01))),
  "clip_by_global_norm": lambda: optax.chain(optax.clip_by_global_norm(0.1), jadam.adam(0.01)),
  "inject_hyperparams": lambda: optax.inject_hyperparams(jadam.adamw)(learning_rate=0.01, weight_decay=0.1),
  "apply_if_finite": lambda: optax.apply_if_finite(jadam.adam(0.01), 2),
  "partition": lambda: optax.partition({"a": jadam.adam(0.01), "b": jadam.adamw(0.1)}, {"w": "a", "b": "b"}),
  "masked_decay": lambda: optax.chain(
    jadam.scale_by_moments(),
    jadam.bias_correct(),
    jadam.normalize(),
    optax.masked(jadam.add_l2(0.1), {"w": True, "b": False}),
    jadam.scale_by_lr(0.01),
  ),
}


@pytest.mark.parametrize("name", sorted(SERVED))
def test_each_combinator_is_served_and_equals_its_stages(name):
  tx = SERVED[name]()
  state = tx.init(P)
  for _ in range(2):
    p_k, s_k = jadam.update_and_apply(tx, G, state, P, fused=True)
    p_s, s_s = jadam.update_and_apply(tx, G, state, P, fused=False)
    assert jax.tree.structure(s_k) == jax.tree.structure(s_s)
    for a, b in zip(jax.tree.leaves((p_k, s_k)), jax.tree.leaves((p_s, s_s)), strict=True):
      # the same operations on the same float32 inputs: a few ulps of the value (FMA contractions may differ)
      tol = 8 * np.spacing(np.abs(np.asarray(b, np.float32))) if jnp.issubdtype(b.dtype, jnp.floating) else 0
      assert np.all(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= tol)
    state = s_s


def _impostor(qualname, **free):
  """A function that looks like optax's `qualname` to a reader of names, with only the free variables `free`."""
  env = dict(free)
  code = "def make({0}):\n  def update_fn(updates, state, params=None):\n    return ({0},)\n  return update_fn".format(
    ", ".join(env) or ""
  )
  scope = {}
  exec(code, scope)  # noqa: S102 - a closure with exactly these free variables
  fn = scope["make"](*env.values())
  fn.__module__, fn.__qualname__ = "optax.transforms._combining", qualname
  return fn


@pytest.mark.parametrize(
  "qualname, free, call",
  [
    ("chain.<locals>.update_fn", {"renamed_fns": ()}, lambda f: compat.chain_parts(f)),
    ("clip_by_global_norm.<locals>.update_fn", {"limit": 1.0}, lambda f: compat.clip_max_norm(f)),
    ("masked.<locals>.update_fn", {"inner": None}, lambda f: compat.masked(f, optax.MaskedState(None))),
    ("with_extra_args_support.<locals>.update", {"wrapped": None}, lambda f: compat.unwrap(f)),
  ],
)
def test_another_optax_version_is_refused(qualname, free, call):
  with pytest.raises(Unserved, match="an unknown version of optax"):
    call(_impostor(qualname, **free))


def test_the_planner_refuses_through_an_unknown_wrapper():
  """A transformation it cannot open (here optax.masked around a whole chain) runs as its stages."""
  tx = optax.masked(jadam.adam(0.01), {"w": True, "b": False})
  with pytest.raises(Unserved):
    plan.run(tx.update, tx.init(P), G, P, plan.Ctx(apply=None, require=True))
