"""Prints how far jadam.torch is from torch.optim for every setting of tests/torch/test_torch_front.py.

    python -m tools.report_torch_front

Float64: max relative difference over 500 steps. Float32: max difference in
ulps of each leaf's scale after 1, 10, 50 and 500 steps.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jadam  # noqa: E402
from tests.helpers import torch_front as H  # noqa: E402
from tests.torch.test_torch_front import CASES, _name  # noqa: E402


def main():
  print("| setting | float64 max rel. diff (500 steps) | float32 ulps after 1 / 10 / 50 / 500 steps |")
  print("| --- | --- | --- |")
  worst64, worst32 = 0.0, 0.0
  for name, kw in CASES:

    def make(groups, name=name, kw=kw):
      return getattr(torch.optim, name)(groups, foreach=False, **kw)

    want = H.run_torch(make, 500, np.float64)
    with jax.enable_x64(True):
      got = H.run_jax(getattr(jadam.torch, name)(**kw), 500, np.float64)
    rel = H.max_rel_diff(got, want)
    w32 = H.run_torch(make, 500, np.float32)
    g32 = H.run_jax(getattr(jadam.torch, name)(**kw), 500, np.float32)
    ulps = [
      H.max_ulps({k: v[:n] for k, v in g32.items()}, {k: v[:n] for k, v in w32.items()}) for n in (1, 10, 50, 500)
    ]
    worst64, worst32 = max(worst64, rel), max(worst32, ulps[-1])
    print(f"| `{_name((name, kw))}` | {rel:.1e} | {' / '.join(f'{u:g}' for u in ulps)} |")
  print(f"\nworst float64 relative difference {worst64:.2e}; worst float32 drift after 500 steps {worst32:g} ulps")


if __name__ == "__main__":
  main()
