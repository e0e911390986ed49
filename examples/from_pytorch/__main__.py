"""``python -m examples.from_pytorch``: a PyTorch run continued in jadam + Flax NNX from its checkpoint and handed back.

PyTorch trains a small CNN (AdamW, CosineAnnealingLR) for N steps and saves a checkpoint; jadam reads it
(`jadam.torch.load_checkpoint`, `load_state_dict`) and trains N steps; PyTorch takes the state back
(`jadam.torch.state_dict`, `scheduler_state_dict`) for N more. The loss curves are printed next to one
uninterrupted PyTorch run of 3N steps. Needs torch (the `test` extra).

Examples:
  python -m examples.from_pytorch                           # float64, 100 steps a leg
  python -m examples.from_pytorch --dtype float32 --steps 30
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from examples import _cli  # noqa: E402
from examples.from_pytorch import transfer  # noqa: E402

PROG = "python -m examples.from_pytorch"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  base = transfer.Config()
  p = _cli.parser(PROG, __doc__)
  p.add_argument("--steps", type=int, default=base.steps, help="steps in each of the three legs")
  p.add_argument("--dtype", default=base.dtype, choices=["float64", "float32"], help="parameters and arithmetic")
  p.add_argument("--print-every", type=int, default=base.print_every, help="steps between two printed losses")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  jax.config.update("jax_enable_x64", args.dtype == "float64")
  transfer.run(transfer.Config(steps=args.steps, dtype=args.dtype, print_every=args.print_every))


if __name__ == "__main__":
  _cli.run(PROG, main)
