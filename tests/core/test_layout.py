"""The import graph of jadam/, read from the source (every import, function-level ones too).

Arrows only point down (STYLE.md): the core never imports a front door
(`jadam.torch`, `jadam.keras`, nor the package root that re-exports them), and
no two jadam modules import each other, directly or around a longer cycle. The
graph is read with `ast`, not by importing, so an import inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "jadam"
FRONT_DOORS = ("jadam.torch", "jadam.keras")

# Cycles allowed between jadam's modules (sorted module names, as `cycles()` names them): none.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, pathlib.Path]) -> str | None:
  """The jadam module that importing `name` executes last: the longest known prefix."""
  while name and name not in known:
    name = name.rpartition(".")[0]
  return name or None


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  base = here.split(".")
  base = base if is_package else base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, known: dict[str, pathlib.Path]) -> set[str]:
  """Every jadam module that module `name` imports, anywhere in its body."""
  path = known[name]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(node, name, path.name == "__init__.py")
      targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
    else:
      continue
    found.update(t for t in map(lambda t: _resolve(t, known), targets) if t is not None and t.startswith("jadam"))
  found.discard(name)
  return found


def graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports_of(name, known) for name in known}


def cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
  """The strongly connected components of more than one module (Tarjan), each as a sorted tuple."""
  index, low, stack, on_stack, found = {}, {}, [], set(), set()

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.add(tuple(sorted(component)))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def is_front_door(name: str) -> bool:
  return name == "jadam" or any(name == d or name.startswith(d + ".") for d in FRONT_DOORS)


def test_the_graph_is_read():
  edges = graph()
  assert "jadam.torch._schedulers" in edges["jadam.torch._optim"]  # a top-level import
  assert "jadam._core.common" in edges["jadam._tuning.plateau"]
  assert all(name.startswith("jadam") for targets in edges.values() for name in targets)


@pytest.mark.parametrize("name", sorted(n for n in modules() if not is_front_door(n)))
def test_the_core_never_imports_a_front_door(name):
  doors = sorted(t for t in imports_of(name, modules()) if is_front_door(t))
  assert not doors, f"{name} imports {doors}: the front doors wrap the core, never the other way round."


def test_no_import_cycles():
  found = cycles(graph())
  assert found <= KNOWN_CYCLES, f"import cycles between jadam modules: {sorted(found - KNOWN_CYCLES)}"


def test_cycles_are_found():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
  assert cycles({"a": {"b"}, "b": set()}) == set()
