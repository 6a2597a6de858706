"""The import rule of docs/design.md: no module imports a higher layer.

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
    "compilation": 0, "stopping": 0,
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
