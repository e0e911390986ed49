"""The documentation: the Sphinx site builds with warnings as errors, the API reference lists every public name once,
and every Python block of README.md and the guides runs as written."""

import contextlib
import io
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import jadam
import jadam.keras
import jadam.torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# A block preceded by this line is shown but not run; keep them few, for what needs a second process or long training.
NOT_RUN = "<!-- not run:"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]
MARKDOWN = [p for p in MARKDOWN if "_build" not in p.parts]


def _public(module) -> set[str]:
  if hasattr(module, "__all__"):
    return set(module.__all__)
  # jadam.keras has no __all__: its public names are those it defines.
  return {
    n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", "") == module.__name__
  }


def _documented() -> list[str]:
  """Every `.. autofunction::`/`.. autoclass::` target of docs/api, in order."""
  found = []
  for page in sorted((DOCS / "api").glob("*.rst")):
    found += re.findall(r"^\.\. auto(?:function|class|data):: (\S+)$", page.read_text(), flags=re.M)
  return found


def test_api_reference_lists_every_public_name_once():
  documented = _documented()
  repeated = sorted({n for n in documented if documented.count(n) > 1})
  assert not repeated, f"documented more than once in docs/api: {repeated}"
  public = {f"{m.__name__}.{n}" for m in (jadam, jadam.torch, jadam.keras) for n in _public(m)}
  missing, extra = sorted(public - set(documented)), sorted(set(documented) - public)
  assert not missing, f"public names with no entry in docs/api/*.rst (add an autofunction/autoclass line): {missing}"
  assert not extra, f"docs/api/*.rst documents names that are not public: {extra}"


def test_sphinx_builds_without_warnings(tmp_path):
  """`make docs`'s build: -W turns every warning, a broken cross-reference included (-n), into an error."""
  cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-n", "-W", "--keep-going", "-q", str(DOCS), str(tmp_path)]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
  assert (tmp_path / "index.html").exists() and (tmp_path / "api" / "stages.html").exists()


def _python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, code) of each ```python block, in order, less those marked NOT_RUN on the line before."""
  lines = path.read_text().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    if lines[i].strip() == "```python":
      start = i + 1
      end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
      marked = i > 0 and lines[i - 1].strip().startswith(NOT_RUN)
      if not marked:
        blocks.append((start + 1, "\n".join(lines[start:end])))
      i = end
    i += 1
  return blocks


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path, tmp_path, monkeypatch):
  """A file's blocks run in order in one namespace, as a reader pastes them, under JAX's default dtype rules."""
  blocks = _python_blocks(path)
  if not blocks:
    pytest.skip("no python blocks")
  monkeypatch.chdir(tmp_path)  # blocks that write files write them here
  namespace = {"__name__": "__docs__"}
  with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(io.StringIO()):
    for line, code in blocks:
      try:
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
      except Exception as e:
        raise AssertionError(f"{path.relative_to(ROOT)}, the block at line {line} fails: {e!r}") from e


def test_not_run_blocks_are_few():
  """The opt-out is for blocks that need a second process or a long training, not for blocks that broke."""
  marked = sum(p.read_text().count(NOT_RUN) for p in MARKDOWN)
  assert marked <= 4, f"{marked} python blocks are marked {NOT_RUN!r}"
