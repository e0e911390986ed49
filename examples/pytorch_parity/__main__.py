"""``python -m examples.pytorch_parity``: one MLP trained with torch.optim and with jadam.torch, side by side.

The same weights, batches and recipe (AdamW + cosine + parameter groups, SGD + OneCycleLR, NAdam with a
per-layer learning rate + StepLR), written with PyTorch's arguments on both sides; prints both loss curves
and the largest difference. Needs torch (the `test` extra).

Examples:
  python -m examples.pytorch_parity                         # every recipe, float64, 300 steps
  python -m examples.pytorch_parity --recipe sgd_onecycle --dtype float32
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from examples import _cli  # noqa: E402
from examples.pytorch_parity import parity  # noqa: E402

PROG = "python -m examples.pytorch_parity"
RECIPES = ["adamw_cosine", "sgd_onecycle", "nadam_layers"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  base = parity.Config()
  p = _cli.parser(PROG, __doc__)
  p.add_argument("--recipe", default="all", choices=[*RECIPES, "all"], help="which recipe to train")
  p.add_argument("--steps", type=int, default=base.steps, help="training steps of each recipe")
  p.add_argument("--dtype", default=base.dtype, choices=["float64", "float32"], help="parameters and arithmetic")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  names = RECIPES if args.recipe == "all" else [args.recipe]
  for name in names:
    parity.run(parity.Config(recipe=name, steps=args.steps, dtype=args.dtype))
    print()


if __name__ == "__main__":
  _cli.run(PROG, main)
