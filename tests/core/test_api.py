"""The public API: names, docstrings, the README example and the docstring examples."""

import doctest
import importlib
import inspect
import pkgutil

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import jadam

PUBLIC = sorted(jadam.__all__)
# Training-step helpers: functions of (tx, ...), not factories of transformations.
STEP_HELPERS = {"make_train_step", "make_update_step", "update_and_apply"}
# Row-sparse helpers (issue 12): applying updates, differentiating; not factories either.
STEP_HELPERS |= {"apply_updates", "value_and_sparse_grad"}
# Checkpoint helpers: functions of (directory, tree).
CHECKPOINT = {"restore_state", "save_state"}
# Tuning: sweeps over configurations of a factory, and early stopping (not optimizer factories).
TUNING = {"early_stopping", "sweep", "sweep_grid"}
FACTORIES = [n for n in PUBLIC if inspect.isfunction(getattr(jadam, n)) and n not in STEP_HELPERS | CHECKPOINT | TUNING]


@pytest.mark.parametrize("name", sorted(TUNING))
def test_tuning_helpers_state_their_contract(name):
  doc = inspect.getdoc(getattr(jadam, name))
  assert doc and "Examples:" in doc and (name == "sweep_grid" or "Returns:" in doc)


@pytest.mark.parametrize("name", sorted(STEP_HELPERS))
def test_step_helpers_state_their_contract(name):
  doc = inspect.getdoc(getattr(jadam, name))
  assert doc and "Returns:" in doc and "Args:" in doc


@pytest.mark.parametrize("name", sorted(CHECKPOINT))
def test_checkpoint_helpers_state_their_contract(name):
  doc = inspect.getdoc(getattr(jadam, name))
  assert doc and "Args:" in doc and "Raises:" in doc


def test_all_is_sorted_and_unique():
  assert list(jadam.__all__) == PUBLIC and len(set(PUBLIC)) == len(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_in_all_resolves(name):
  obj = getattr(jadam, name)
  assert obj is not None
  home = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", "")
  assert home.startswith("jadam")


def test_every_public_function_is_in_all():
  public = {
    n for n, v in vars(jadam).items() if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
  }
  assert public <= set(jadam.__all__), public - set(jadam.__all__)


@pytest.mark.parametrize("name", FACTORIES)
def test_every_factory_has_a_docstring_with_math(name):
  doc = inspect.getdoc(getattr(jadam, name))
  assert doc, f"jadam.{name} has no docstring"
  assert ".. math::" in doc, f"jadam.{name}'s docstring states no math"
  assert "Returns:" in doc, f"jadam.{name}'s docstring has no Returns section"


@pytest.mark.parametrize("name", FACTORIES)
def test_every_factory_builds_a_gradient_transformation(name):
  factory = getattr(jadam, name)
  required = [p for p in inspect.signature(factory).parameters.values() if p.default is inspect.Parameter.empty]
  tx = factory(*[1e-3] * len(required))
  assert isinstance(tx, optax.GradientTransformation)


def test_factories_take_no_var_kwargs():
  """optax.inject_hyperparams reads the signature: no *args or **kwargs."""
  for name in FACTORIES:
    kinds = {p.kind for p in inspect.signature(getattr(jadam, name)).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds, name


def test_readme_example_runs():
  tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-3))
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = tx.init(params)
  grads = {"w": jnp.full((3, 2), 10.0), "b": jnp.full(2, -10.0)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  params = optax.apply_updates(params, updates)
  # The first Adam step is -lr * sign(g), clipping or not.
  chex.assert_trees_all_close(params, {"w": jnp.full((3, 2), 1 - 1e-3), "b": jnp.full(2, 1e-3)}, rtol=1e-5)


def _jadam_modules():
  yield jadam
  for info in pkgutil.iter_modules(jadam.__path__):
    yield importlib.import_module(f"jadam.{info.name}")


@pytest.mark.parametrize("module", list(_jadam_modules()), ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
  """doctest.testmod under the suite's strict dtype promotion."""
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0


def test_alias_docstrings_have_examples():
  result = doctest.testmod(importlib.import_module("jadam._optimizers"), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_version():
  assert isinstance(jadam.__version__, str) and jadam.__version__.count(".") == 2
