"""jadam.torch.state_dict / load_state_dict for Adafactor and Muon, against live torch.optim state dicts, both ways."""

import contextlib
import copy

import jax
import numpy as np
import pytest

import jadam
from tests.helpers import reference_adafactor_muon as R

torch = pytest.importorskip("torch")

ADAFACTOR_SHAPES = {"a_matrix": (5, 3), "b_batched": (2, 3, 4), "c_vector": (4,), "d_scalar": ()}
MUON_SHAPES = {"a_square": (4, 4), "b_tall": (6, 3), "c_wide": (3, 7)}
BEFORE, AFTER = 30, 40


@contextlib.contextmanager
def _torch_newton_schulz_in_float64():
  """As in test_muon: PyTorch's own iteration, its `.bfloat16()` cast made a float64 copy."""
  import torch.optim._muon as muon_module

  class NoBfloat16(torch.Tensor):
    def bfloat16(self):
      return self.as_subclass(torch.Tensor).clone()

  original = muon_module._zeropower_via_newtonschulz
  muon_module._zeropower_via_newtonschulz = lambda g, *args: original(g.as_subclass(NoBfloat16), *args)
  try:
    yield
  finally:
    muon_module._zeropower_via_newtonschulz = original


OPTIMIZERS = [
  (
    "Adafactor",
    ADAFACTOR_SHAPES,
    lambda ps: torch.optim.Adafactor(ps, lr=0.05, weight_decay=0.1, maximize=True),
    lambda: jadam.torch.Adafactor(lr=0.05, weight_decay=0.1, maximize=True),
  ),
  (
    "Adafactor-groups",
    ADAFACTOR_SHAPES,
    lambda ps: torch.optim.Adafactor(
      [{"params": [ps[0], ps[2]], "lr": 0.2, "eps": (1e-5, 1e-2)}, {"params": [ps[1], ps[3]]}], lr=0.05
    ),
    lambda: jadam.torch.Adafactor([{"params": "a_matrix|c_vector", "lr": 0.2, "eps": (1e-5, 1e-2)}], lr=0.05),
  ),
  (
    "Muon",
    MUON_SHAPES,
    lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
    lambda: jadam.torch.Muon(lr=0.02, momentum=0.9, adjust_lr_fn="match_rms_adamw", ns_dtype=None),
  ),
]
IDS = [name for name, *_ in OPTIMIZERS]


def _torch_run(make, shapes, steps, **kw):
  with _torch_newton_schulz_in_float64():
    return R.run_torch(lambda tensors: [make([tensors[k] for k in sorted(tensors)])], shapes, steps, **kw)


def _same_state_dict(got, want):
  assert got["state"].keys() == want["state"].keys()
  for i, entry in want["state"].items():
    assert got["state"][i].keys() == entry.keys(), i
    for key, value in entry.items():
      assert got["state"][i][key].shape == value.shape and got["state"][i][key].dtype == value.dtype, (i, key)
      np.testing.assert_allclose(got["state"][i][key].numpy(), value.numpy(), rtol=1e-12, atol=1e-300)
  assert len(got["param_groups"]) == len(want["param_groups"])
  for g, w in zip(got["param_groups"], want["param_groups"], strict=True):
    assert g.keys() == w.keys() and g["params"] == w["params"]
    assert all(g[k] == w[k] for k in w if k != "params"), (g, w)


@pytest.mark.parametrize("name, shapes, make_torch, make_jadam", OPTIMIZERS, ids=IDS)
def test_torch_state_continues_in_jadam(name, shapes, make_torch, make_jadam):
  trajectory, (opt,) = _torch_run(make_torch, shapes, BEFORE)
  params = {k: v[-1] for k, v in trajectory.items()}
  saved = copy.deepcopy(opt.state_dict())  # torch's load_state_dict shares the tensors it is given
  want, _ = _torch_run(make_torch, shapes, AFTER, state=(params, copy.deepcopy(saved)), start=BEFORE)
  with jax.enable_x64(True):
    tx = make_jadam()
    state = jadam.torch.load_state_dict(tx, params, saved)
    got, _, _ = R.run_jax(tx, shapes, AFTER, params=params, state=state, start=BEFORE)
    assert R.max_rel_diff(got, want) <= 1e-12
    # And uninterrupted: jadam from the start equals the torch run continued.
    whole, _, _ = R.run_jax(make_jadam(), shapes, BEFORE + AFTER)
  assert R.max_rel_diff({k: v[BEFORE:] for k, v in whole.items()}, want) <= 1e-12


@pytest.mark.parametrize("name, shapes, make_torch, make_jadam", OPTIMIZERS, ids=IDS)
def test_jadam_state_is_torch_s_and_continues_in_torch(name, shapes, make_torch, make_jadam):
  trajectory, (opt,) = _torch_run(make_torch, shapes, BEFORE)
  with jax.enable_x64(True):
    tx = make_jadam()
    _, params, state = R.run_jax(tx, shapes, BEFORE)
    with R.torch_default_dtype(torch.float64):  # torch's step dtype follows the default dtype, as the run's did
      exported = jadam.torch.state_dict(tx, state, params)
    _same_state_dict(exported, opt.state_dict())  # torch's keys, shapes, dtypes and values
    want, _, _ = R.run_jax(tx, shapes, AFTER, params=params, state=state, start=BEFORE)
    # Round trip: loading what was exported gives the same state back.
    again = jadam.torch.load_state_dict(tx, params, exported, steps=BEFORE)  # Muon's state has no step
    jax.tree.map(np.testing.assert_array_equal, again, state)
  params = {k: np.asarray(v) for k, v in params.items()}
  got, _ = _torch_run(make_torch, shapes, AFTER, state=(params, copy.deepcopy(exported)), start=BEFORE)
  assert R.max_rel_diff(got, want) <= 1e-12


def test_adafactor_state_dict_of_another_optimizer_is_refused():
  _, (opt,) = _torch_run(lambda ps: torch.optim.Adam(ps, lr=0.1), ADAFACTOR_SHAPES, 2)
  params = {k: np.zeros(s, np.float32) for k, s in ADAFACTOR_SHAPES.items()}
  with pytest.raises(ValueError, match="not a state dict of torch.optim.Adafactor"):
    jadam.torch.load_state_dict(jadam.torch.Adafactor(), params, opt.state_dict())


def test_muon_state_dict_with_wrong_shapes_is_refused():
  _, (opt,) = _torch_run(lambda ps: torch.optim.Muon(ps), MUON_SHAPES, 2)
  params = {k: np.zeros(s[::-1], np.float32) for k, s in MUON_SHAPES.items()}
  with pytest.raises(ValueError, match="shape"):
    jadam.torch.load_state_dict(jadam.torch.Muon(), params, opt.state_dict())
