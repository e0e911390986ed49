"""Records torch.optim float64 trajectories into tests/parity/golden/*.npz, for tests/parity/test_golden.py.

    python -m tools.make_golden

Each file holds one optimizer setting of `tests.helpers.parity.CONFIGS` run by torch for
STEPS steps of the noisy quadratic (gradients fed back from the parameters):
the problem (`params`, `a`, `b`, `noise`), the parameters after every step
(`thetas`) and the torch version that made them. Plain arrays, no pickle:
read them with np.load(path, allow_pickle=False).
"""

import os

import numpy as np

from tests.helpers import parity as _parity

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "parity", "golden")

STEPS, N = 50, 5
NAMES = (
  "adam",
  "adam_amsgrad_weight_decay",
  "adam_maximize",
  "adamw",
  "sgd_momentum_dampening",
  "sgd_nesterov",
  "rmsprop_centered_momentum",
  "adagrad_lr_decay_initial_accumulator",
)


def main():
  import torch

  out_dir = GOLDEN
  os.makedirs(out_dir, exist_ok=True)
  for i, name in enumerate(NAMES):
    c = _parity.CONFIGS[name]
    prob = c.problem(STEPS, n=N, seed=100 + i)
    thetas = _parity.run_torch(c.torch, prob, np.float64)
    path = os.path.join(out_dir, f"{name}.npz")
    np.savez(
      path,
      params=prob.params,
      a=prob.a,
      b=prob.b,
      noise=prob.noise,
      thetas=thetas,
      torch_version=np.array(torch.__version__),
    )
    print(f"{path}: {thetas.shape}, last {thetas[-1]}")


if __name__ == "__main__":
  main()
