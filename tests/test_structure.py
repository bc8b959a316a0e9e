"""The package's shape: no import cycle between files or between packages,
and no file over 400 lines without a reason written at its top.

Imports are read with `ast` from the source (function-level imports too: a
lazy import is still a dependency), so this runs without importing anything.
An import of `a.b.c` is an edge to the file that defines `a.b.c` (a module,
or the package's __init__ when `c` is a name in it); the implicit import of
parent packages is not an edge, as in pylint's cyclic-import check.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dynamo_jax"
MAX_LINES = 400
LONG_FILE_MARK = "Longer than 400 lines because"


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every .py file of the package."""
  out = {}
  for root, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join(rel)] = path
  return out


def _target(name: str, modules) -> str | None:
  """The module a dotted import name lands in (longest known prefix)."""
  parts = name.split(".")
  for end in range(len(parts), 0, -1):
    candidate = ".".join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    is_pkg = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as fh:
      tree = ast.parse(fh.read(), path)
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = module.split(".")
          anchor = anchor if is_pkg else anchor[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        # `from pkg import sub` imports the submodule when there is one.
        names = [f"{base}.{a.name}" for a in node.names] or [base]
      for name in names:
        if not name.startswith(PACKAGE):
          continue
        target = _target(name, modules)
        if target and target != module:
          graph[module].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as a list of nodes, or None (iterative DFS)."""
  color = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
  for start in sorted(graph):
    if color[start]:
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    color[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        color[node] = 2
        stack.pop()
        path.pop()
      elif color[child] == 1:
        return path[path.index(child):] + [child]
      elif color[child] == 0:
        color[child] = 1
        path.append(child)
        stack.append((child, iter(sorted(graph[child]))))
  return None


def _package_of(module: str) -> str:
  """dynamo_jax.decoding.ar -> dynamo_jax.decoding; top-level modules
  (dynamo_jax.cli) stand for themselves."""
  parts = module.split(".")
  if len(parts) <= 2:
    return module
  return ".".join(parts[:2])


def test_no_import_cycle_between_files():
  graph = import_graph()
  # The package root re-exports the public API, so it imports nearly
  # everything; nothing inside imports it back (checked here).
  importers = sorted(m for m, deps in graph.items() if PACKAGE in deps)
  assert not importers, f"modules importing the package root: {importers}"
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_packages():
  graph = import_graph()
  packages: dict[str, set[str]] = {}
  for module, deps in graph.items():
    if module == PACKAGE:
      continue
    src = _package_of(module)
    packages.setdefault(src, set())
    for dep in deps:
      dst = _package_of(dep)
      if dst != src and dst != PACKAGE:
        packages[src].add(dst)
        packages.setdefault(dst, set())
  cycle = find_cycle(packages)
  assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c",
                                                               "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("module,path", sorted(_modules().items()))
def test_long_files_say_why(module, path):
  with open(path, encoding="utf-8") as fh:
    lines = fh.read().splitlines()
  if len(lines) > MAX_LINES:
    head = "\n".join(lines[:40])
    assert LONG_FILE_MARK in head, (
        f"{module} has {len(lines)} lines; split it along its seams or say "
        f"why at its top ('{LONG_FILE_MARK} ...').")
