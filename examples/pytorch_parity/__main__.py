"""python -m examples.pytorch_parity [--recipe adamw_cosine|sgd_onecycle|nadam_layers|all] [--steps N] [--dtype float64|float32]"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from examples.pytorch_parity import parity  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--recipe", default="all", choices=["adamw_cosine", "sgd_onecycle", "nadam_layers", "all"])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
  args = parser.parse_args()
  names = ["adamw_cosine", "sgd_onecycle", "nadam_layers"] if args.recipe == "all" else [args.recipe]
  for name in names:
    parity.run(parity.Config(recipe=name, steps=args.steps, dtype=args.dtype))
    print()


if __name__ == "__main__":
  main()
