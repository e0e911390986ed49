"""The example's three legs (torch -> jadam + Flax NNX -> torch) follow the uninterrupted torch run."""

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flax.nnx")

from examples.from_pytorch import transfer  # noqa: E402


def test_moved_run_follows_torch():
  with jax.enable_x64(True):
    curves = transfer.run(transfer.Config(steps=6, print_every=6))
  ref, moved = np.asarray(curves["reference"]), np.asarray(curves["moved"])
  assert len(moved) == 18
  np.testing.assert_allclose(moved, ref, rtol=1e-12)
