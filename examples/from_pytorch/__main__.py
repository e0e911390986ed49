"""python -m examples.from_pytorch [--steps N] [--dtype float64|float32] [--print-every K]"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from examples.from_pytorch import transfer  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=100, help="steps in each of the three legs")
  parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
  parser.add_argument("--print-every", type=int, default=25)
  args = parser.parse_args()
  jax.config.update("jax_enable_x64", args.dtype == "float64")
  transfer.run(transfer.Config(steps=args.steps, dtype=args.dtype, print_every=args.print_every))


if __name__ == "__main__":
  main()
