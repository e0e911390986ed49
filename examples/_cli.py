"""What every example's command line shares: help that shows each default, and expected errors as one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the epilog's examples as written and appends each flag's default to its help.

  A flag whose help already says its default, or whose default is None or a switch's False, is left as it is.
  """

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    default = action.default
    if "default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
      return text
    if not action.option_strings:
      return text
    return f"{text} (default: %(default)s)"


def parser(prog: str, doc: str, description: str | None = None) -> argparse.ArgumentParser:
  """An `ArgumentParser` named `prog` (``python -m examples.<name>``), whose epilog is `doc`'s ``Examples:``."""
  epilog = doc.split("Examples:", 1)[1] if "Examples:" in doc else None
  first = description or doc.strip().split("\n\n")[0].replace("``", "")
  if first.startswith(prog + ":"):
    first = first[len(prog) + 1 :].strip()
    first = first[:1].upper() + first[1:]
  return argparse.ArgumentParser(prog=prog, description=first, formatter_class=HelpFormatter, epilog=epilog)


def add_mnist_data_arguments(p: argparse.ArgumentParser, data_dir: str | None) -> None:
  """`--data-dir` and `--no-download`: where the examples that train on MNIST find it."""
  p.add_argument(
    "--data-dir",
    default=data_dir,
    help="folder with the four IDX files (default: cache, download, or the shipped sample)",
  )
  p.add_argument(
    "--no-download", dest="download", action="store_false", help="never try the mirrors (default: download if missing)"
  )


# What a user can cause and fix: a missing file or package, a workdir in the way, a bad value.
EXPECTED = (ValueError, OSError, ImportError)


# The MNIST examples' arguments that go into their Config as they are (`--epochs` ... `--test-limit`).
MNIST_RUN_FIELDS = (
  "epochs",
  "batch_size",
  "eval_batch_size",
  "seed",
  "data_dir",
  "download",
  "resume",
  "progress",
  "plot",
  "train_limit",
  "test_limit",
)


def mnist_run_fields(a: argparse.Namespace) -> dict[str, object]:
  """The parsed values of :data:`MNIST_RUN_FIELDS`, by name, for ``dataclasses.replace(config, **...)``."""
  return {name: getattr(a, name) for name in MNIST_RUN_FIELDS}


def run(prog: str, main: Callable[[], object]) -> None:
  """Calls `main`; an expected error ends the process with one line (JADAM_TRACEBACK=1 shows the traceback)."""
  try:
    main()
  except KeyboardInterrupt:
    sys.exit(f"{prog}: interrupted")
  except EXPECTED as e:
    if os.environ.get("JADAM_TRACEBACK"):
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    sys.exit(f"{prog}: error: {message}")
