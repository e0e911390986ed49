"""jadam against committed torch.optim float64 trajectories: checks the numbers where torch is absent.

tools/make_golden.py wrote tests/parity/golden/*.npz with torch; this test needs only NumPy.
"""

import os

import jax
import numpy as np
import pytest

from tests.helpers import parity as _parity
from tools import make_golden

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def _load(name):
  with np.load(os.path.join(GOLDEN, f"{name}.npz"), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def test_every_golden_file_is_present():
  assert sorted(f[: -len(".npz")] for f in os.listdir(GOLDEN) if f.endswith(".npz")) == sorted(make_golden.NAMES)


@pytest.mark.parametrize("name", make_golden.NAMES)
def test_matches_torch_golden_trajectory_float64(name):
  data = _load(name)
  assert str(data["torch_version"]).startswith("2.")
  prob = _parity.Problem(params=data["params"], a=data["a"], b=data["b"], noise=data["noise"], feedback=True)
  want = data["thetas"]
  assert want.shape == (make_golden.STEPS, make_golden.N) and want.dtype == np.float64
  with jax.enable_x64(True):
    got = _parity.run_jax(_parity.CONFIGS[name].jadam(), prob, np.float64)
  assert _parity.max_rel(got, want) <= 1e-12
  assert np.max(np.abs(want[-1] - prob.params)) > 1e-2  # the trajectory moved
