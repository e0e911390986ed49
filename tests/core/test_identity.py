"""A state knows which optimizer made it (issue 22, items 1-2): another optimizer's update and restore refuse it.

`adam` and `rmsprop(centered=True)` (and `radam` -> `rmsprop`) have the same
sequence of stage state types, so before states carried their optimizer's
identity each accepted the other's state; and the message named whichever
optimizer had been built first with that sequence.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._core import registry

P = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
G = jax.tree.map(lambda x: x + 0.5, P)

# (the optimizer, the one whose state it is given): pairs whose stage-type sequences coincide
COINCIDE = [
  ("adam", lambda: jadam.adam(1e-3), "rmsprop", lambda: jadam.rmsprop(1e-3, centered=True)),
  ("rmsprop", lambda: jadam.rmsprop(1e-3, centered=True), "adam", lambda: jadam.adam(1e-3)),
  ("rmsprop", lambda: jadam.rmsprop(1e-3), "radam", lambda: jadam.radam(1e-3)),
]


def _stage_types(state):
  return tuple(type(s).__name__ for s in state)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  "mine, make_mine, theirs, make_theirs", COINCIDE, ids=[f"{a}<-{b}" for a, b in [(c[0], c[2]) for c in COINCIDE]]
)
def test_state_of_another_optimizer_is_refused(mine, make_mine, theirs, make_theirs, jit):
  # build the receiver first and the maker last: the message must name the maker all the same
  tx = make_mine()
  state = make_theirs().init(P)
  update = jax.jit(tx.update) if jit else tx.update
  if mine != "rmsprop" or theirs != "radam":
    assert _stage_types(state) == _stage_types(tx.init(P))  # the case the old check could not see
  with pytest.raises(TypeError, match=rf"jadam.{mine}'s update received a state made by jadam.{theirs}'s init"):
    update(G, state, P)


@pytest.mark.parametrize("fused", [None, False])
def test_the_kernel_path_refuses_it_too(fused):
  state = jadam.rmsprop(1e-3, centered=True).init(P)
  with pytest.raises(TypeError, match=r"jadam.adam's update received a state made by jadam.rmsprop's init"):
    jadam.update_and_apply(jadam.adam(1e-3), G, state, P, fused=fused)


def test_own_state_is_accepted_also_as_a_plain_tuple():
  tx = jadam.adam(1e-3)
  state = tx.init(P)
  _, new = tx.update(G, state, P)
  assert isinstance(new, registry.OptimizerState) and new.identity.optimizer == "jadam.adam"
  _, again = tx.update(G, tuple(new), P)  # a tree rebuilt by hand: its stage types are all it says
  assert registry.identity_of(again) == new.identity


def test_a_fresh_optimizer_object_accepts_a_state_made_by_an_equal_one():
  state = jadam.adam(1e-3).init(P)
  _, new = jadam.adam(1e-3).update(G, state, P)  # no init on this object: its identity comes from eval_shape
  assert new.identity == state.identity


def test_the_state_is_optax_chains_tree():
  """Same children and key paths as optax.chain's tuple; the identity is static metadata, free under jit."""
  tx = jadam.adam(1e-3)
  state = tx.init(P)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  plain = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tuple(state))]
  assert paths == plain and paths[0].startswith("[0]")
  assert state[1].mu["w"].shape == (2, 3)  # indexing as a tuple
  mapped = optax.tree_map_params(tx, lambda p: p * 0 + 7, state)
  assert isinstance(mapped, registry.OptimizerState) and float(mapped[1].mu["w"][0, 0]) == 7
  shapes = jax.eval_shape(tx.init, P)
  assert registry.identity_of(shapes) == state.identity
  _, new = jax.jit(tx.update)(G, state, P)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  spec = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
  placed = jax.device_put(state, spec)
  assert registry.identity_of(placed) == state.identity


def test_inject_hyperparams_keeps_the_identity():
  tx = optax.inject_hyperparams(jadam.adam)(learning_rate=1e-2)
  state = tx.init(P)
  _, new = jax.jit(tx.update)(G, state, P)
  assert registry.identity_of(new.inner_state).optimizer == "jadam.adam"


def test_checkpoint_records_and_checks_the_optimizer(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  state = jadam.adam(1e-3).init(P)
  path = os.path.join(tmp_path, "adam")
  jadam.save_state(path, state)
  like = jadam.rmsprop(1e-3, centered=True).init(P)
  with pytest.raises(ValueError, match=r"written by jadam.adam \(stages AddL2State, .*a state of jadam.rmsprop"):
    jadam.restore_state(path, like)
  back = jadam.restore_state(path, jadam.adam(1e-3).init(P))
  assert back.identity == state.identity
  np.testing.assert_array_equal(back[1].nu["w"], state[1].nu["w"])


def test_checkpoint_inside_a_larger_tree_names_the_path(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  tree = {"opt": jadam.radam(1e-3).init(P), "step": jnp.array(3)}
  path = os.path.join(tmp_path, "ck")
  jadam.save_state(path, tree)
  with pytest.raises(ValueError, match=r"written by jadam.radam .* at \['opt'\], and .* jadam.rmsprop"):
    jadam.restore_state(path, {"opt": jadam.rmsprop(1e-3).init(P), "step": jnp.array(0)})


def test_checkpoint_of_another_stage_sequence_names_both(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  path = os.path.join(tmp_path, "adamax")
  jadam.save_state(path, jadam.adamax(1e-3).init(P))
  with pytest.raises(ValueError, match=r"written by jadam.adamax .*ScaleByInfMomentsState.* a state of jadam.adam "):
    jadam.restore_state(path, jadam.adam(1e-3).init(P))
