"""The import rule of docs/design.md: no module imports a higher layer, and the
packages of one layer import each other without a cycle.

Every module of the package is parsed (not imported), and every `affinity_jax` import
in it, function-level ones included, is checked against the layer table.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "affinity_jax")

# Top-level module or folder of affinity_jax -> layer (docs/design.md, "Layers").
LAYERS = {
    "errors": 0, "io": 0, "constants": 0, "runtime": 0, "config_lib": 0, "progress": 0,
    "compilation": 0, "stopping": 0, "sharding": 0,
    "ops": 1,
    "models": 2, "weights": 2,
    "data": 3, "training": 3, "labels": 3, "evaluation": 3, "workdir": 3, "defaults": 3,
    "inference": 4,
    "stages": 5,
    "demo": 6, "benchmarks": 6, "main": 6, "convert": 6, "launch": 6, "cams": 6,
}


def _modules():
  for folder, _, files in os.walk(ROOT):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.relpath(os.path.join(folder, name), ROOT)


def _top(path: str) -> str:
  """affinity_jax/<top>/... or affinity_jax/<top>.py -> top."""
  return path.split(os.sep)[0].removesuffix(".py")


def _imported_tops(source: str) -> set[str]:
  """The affinity_jax top-level modules or folders that `source` imports."""
  tree = ast.parse(source)
  tops = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from affinity_jax import io` names the module in the alias.
      names = ([f"{node.module}.{alias.name}" for alias in node.names]
               if node.module == "affinity_jax" else [node.module])
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "affinity_jax" and len(parts) > 1:
        tops.add(parts[1])
  return tops


def _sources() -> dict[str, str]:
  """Path under affinity_jax/ -> source, for every module but the package's own."""
  out = {}
  for path in _modules():
    if path != "__init__.py":
      with open(os.path.join(ROOT, path)) as f:
        out[path] = f.read()
  return out


def _same_layer_imports(sources: dict[str, str]) -> dict[str, set[str]]:
  """Top-level module or folder -> the others of its layer that its modules import."""
  edges = {}
  for path, source in sources.items():
    top = _top(path)
    edges.setdefault(top, set()).update(
        t for t in _imported_tops(source) if t != top and LAYERS[t] == LAYERS[top])
  return edges


def _cycle(edges: dict[str, set[str]]) -> list[str]:
  """A cycle of `edges` as the path that closes it (`[a, b, a]`), or [] when none."""
  done, path = set(), []

  def visit(node):
    if node in path:
      return path[path.index(node):] + [node]
    if node in done:
      return []
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      found = visit(nxt)
      if found:
        return found
    path.pop()
    done.add(node)
    return []

  for node in sorted(edges):
    found = visit(node)
    if found:
      return found
  return []


def test_every_module_has_a_layer():
  unknown = {_top(p) for p in _modules() if p != "__init__.py"} - set(LAYERS)
  assert not unknown, f"add {sorted(unknown)} to LAYERS here and in docs/design.md"


@pytest.mark.parametrize("path", [p for p in _modules() if p != "__init__.py"])
def test_no_module_imports_a_higher_layer(path):
  layer = LAYERS[_top(path)]
  with open(os.path.join(ROOT, path)) as f:
    imported = _imported_tops(f.read())
  higher = sorted(t for t in imported if LAYERS[t] > layer)
  assert not higher, f"affinity_jax/{path} (layer {layer}) imports {higher}"


def test_the_check_sees_function_level_and_package_imports():
  source = ("from affinity_jax import io\n"
            "def f():\n  from affinity_jax.stages import pipeline\n"
            "import affinity_jax.inference.walk\n"
            "from . import sibling\n")
  assert _imported_tops(source) == {"io", "stages", "inference"}


def test_no_cycle_between_packages_of_one_layer():
  edges = _same_layer_imports(_sources())
  cycle = _cycle(edges)
  assert not cycle, f"packages of one layer import each other: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle_through_a_third_package():
  sources = {"data/a.py": "from affinity_jax.labels import b\n",
             "labels/b.py": "def f():\n  import affinity_jax.evaluation.c\n",
             "evaluation/c.py": "from affinity_jax.data import a\nfrom affinity_jax import io\n",
             "io.py": ""}
  edges = _same_layer_imports(sources)
  assert edges == {"data": {"labels"}, "labels": {"evaluation"}, "evaluation": {"data"},
                   "io": set()}
  assert _cycle(edges) == ["data", "labels", "evaluation", "data"]
  del sources["evaluation/c.py"]
  assert _cycle(_same_layer_imports(sources)) == []
