"""colab/install.py: the pip commands the notebooks' install cell runs, per runtime.

The detection inputs (environment, device paths, installed jax distributions) are
injected; no pip runs here.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("colab_install",
                                               os.path.join(ROOT, "colab", "install.py"))
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

with open(os.path.join(ROOT, "requirements.lock")) as _f:
  PINS = install.read_lock(_f.read())
JAX = install.locked_version(PINS, "jax")
REPO = "/content/affinity_jax"

CPU_JAX = {"jax": JAX, "jaxlib": JAX}
CUDA_JAX = {**CPU_JAX, "jax-cuda12-plugin": JAX, "jax-cuda12-pjrt": JAX}
TPU_JAX = {**CPU_JAX, "libtpu": "0.0.30"}
OLD_CUDA_JAX = {"jax": "0.7.2", "jaxlib": "0.7.2", "jax-cuda12-plugin": "0.7.2",
                "jax-cuda12-pjrt": "0.7.2"}
# What a CUDA 13 machine image shipped (jax 0.11.2 on an H200): a newer series than the
# locked flax imports on.
NEW_CUDA_JAX = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda13-plugin": "0.11.2",
                "jax-cuda13-pjrt": "0.11.2"}


def _locked(name):
  return install.locked_version(PINS, name)


def _names(command):
  """Distribution names a pip command installs (options and paths left out)."""
  return {install.normalise(re.match(r"[A-Za-z0-9._-]+", a).group(0))
          for a in command[command.index("-q") + 1:]
          if not a.startswith("-") and not a.startswith("/")}


def test_lock_parsing_reads_every_pin_with_what_needs_it():
  lock = """# header
appnope==1.0.0 ; sys_platform == 'darwin'
    # via ipykernel
Flax==0.12.8
    # via -r requirements.txt
rich==15.0.0
    # via
    #   flax
    #   -r requirements-dev.txt
# a comment of our own
ipykernel==7.4.0
    # via -r requirements-dev.txt
"""
  pins = install.read_lock(lock)
  assert [p.name for p in pins] == ["appnope", "flax", "rich", "ipykernel"]
  assert pins[0].line == "appnope==1.0.0 ; sys_platform == 'darwin'"
  assert pins[2].via == ("flax", "-r requirements-dev.txt")
  assert pins[3].via == ("-r requirements-dev.txt",)
  assert [p.name for p in install.runtime_pins(pins)] == ["flax", "rich"]


def test_runtime_pins_are_the_packages_requirements_txt_needs():
  names = {p.name for p in install.runtime_pins(PINS)}
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    direct = {install.normalise(re.match(r"[A-Za-z0-9._-]+", line).group(0))
              for line in f if line.strip() and not line.startswith("#")}
  assert direct <= names
  assert {"scipy", "ml-dtypes", "rich", "tensorstore"} <= names   # Through other packages.
  assert not {"pytest", "ipykernel", "ipython", "jupyter-client", "tornado"} & names


@pytest.mark.parametrize("env, devices, smi, expected", [
    ({}, [], False, "cpu"),
    ({}, ["/dev/vfio/vfio"], False, "cpu"),
    ({}, [], True, "gpu"),
    ({}, ["/dev/nvidiactl", "/dev/nvidia0"], False, "gpu"),
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, [], False, "tpu"),
    ({"TPU_NAME": "local"}, [], False, "tpu"),
    ({}, ["/dev/accel0", "/dev/accel1"], False, "tpu"),
    ({}, ["/dev/vfio/vfio", "/dev/vfio/0"], False, "tpu"),
])
def test_detects_the_accelerator(env, devices, smi, expected):
  assert install.detect_accelerator(env, devices, smi) == expected


@pytest.mark.parametrize("accelerator, installed, keeps", [
    ("cpu", CPU_JAX, True),
    ("cpu", CUDA_JAX, True),           # Colab's image carries the plugin on CPU too.
    ("cpu", {}, False),
    ("cpu", {"jax": JAX}, False),      # No jaxlib.
    ("gpu", CUDA_JAX, True),
    ("gpu", {"jax": "0.10.3", "jaxlib": "0.10.3", "jax-cuda12-plugin": "0.10.3"}, True),
    ("gpu", CPU_JAX, False),
    ("gpu", {**CUDA_JAX, "jax-cuda12-plugin": "0.10.1"}, False),   # Plugin of another jax.
    ("gpu", {**CUDA_JAX, "jax-cuda12-pjrt": "0.10.1"}, False),
    ("gpu", {"jax": "0.4.25", "jaxlib": "0.4.25+cuda12.cudnn89"}, False),   # Too old.
    ("gpu", OLD_CUDA_JAX, False),      # Older than the locked flax accepts.
    ("gpu", NEW_CUDA_JAX, False),      # Newer than the locked flax imports on.
    ("cpu", {"jax": "0.11.2", "jaxlib": "0.11.2"}, False),
    ("tpu", {**TPU_JAX, "jax": "0.11.2", "jaxlib": "0.11.2"}, False),
    ("gpu", {}, False),
    ("tpu", TPU_JAX, True),
    ("tpu", CUDA_JAX, False),
    ("tpu", {**TPU_JAX, "jax": "0.7.2", "jaxlib": "0.7.2"}, False),
    ("tpu", {}, False),
])
def test_keeps_or_installs_jax_for_the_runtime(accelerator, installed, keeps):
  commands = install.plan(accelerator, installed, PINS, REPO)
  assert install.jax_matches(accelerator, installed, JAX) == keeps
  assert len(commands) == (2 if keeps else 3)
  if not keeps:
    extra = {"cpu": "", "gpu": "[cuda12]", "tpu": "[tpu]"}[accelerator]
    assert commands[0] == install.pip(f"jax{extra}=={JAX}", f"jaxlib=={_locked('jaxlib')}")
    assert "--no-deps" not in commands[0]   # The accelerator's plugin comes as a dependency.
  # Neither later step may touch jax: both --no-deps, no jax distribution named.
  packages, editable = commands[-2], commands[-1]
  assert "--no-deps" in packages and "--no-deps" in editable
  assert not any(install.is_jax_distribution(n) for n in _names(packages) | _names(editable))
  assert editable == install.pip("--no-deps", "-e", REPO)


def test_packages_are_the_locks_runtime_pins_without_jax():
  packages = install.plan("gpu", CUDA_JAX, PINS, REPO)[0]
  assert packages[:4] == [sys.executable, "-m", "pip", "install"]
  assert f"flax=={_locked('flax')}" in packages
  assert "colorama==0.4.6 ; sys_platform == 'win32'" in packages   # Markers kept for pip.
  expected = {p.name for p in install.runtime_pins(PINS)} - {"jax", "jaxlib"}
  assert _names(packages) == expected


def test_jax_distributions():
  assert all(install.is_jax_distribution(n) for n in (
      "jax", "jaxlib", "jax_cuda12_plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
      "libtpu", "libtpu-nightly"))
  assert not any(install.is_jax_distribution(n) for n in ("flax", "jaxtyping", "optax"))


def test_installed_jax_reads_metadata_without_importing():
  versions = {"jax": JAX, "jaxlib": JAX, "libtpu": "0.0.30"}

  def version(name):
    if name not in versions:
      raise importlib.metadata.PackageNotFoundError(name)
    return versions[name]

  assert install.installed_jax(version) == versions


def test_min_jax_is_what_the_locked_jax_users_declare():
  # Needs the lock installed (CI, README): metadata of another flax says nothing.
  floors = []
  for name in ("flax", "optax", "orbax-checkpoint"):
    if importlib.metadata.version(name) != _locked(name):
      pytest.skip(f"{name} {importlib.metadata.version(name)} is not the locked version")
    for requirement in importlib.metadata.requires(name) or []:
      m = re.fullmatch(r"jax\s*>=\s*([\d.]+)", requirement.strip())
      if m:
        floors.append(install.version_tuple(m.group(1)))
  assert install.version_tuple(install.MIN_JAX) == max(floors)
  assert install.version_tuple(JAX) >= install.version_tuple(install.MIN_JAX)


def test_keeps_the_locked_minor_release_and_not_the_next():
  major, minor = install.version_tuple(JAX)[:2]
  same, next_minor = f"{major}.{minor}.99", f"{major}.{minor + 1}.0"
  for version, keeps in ((same, True), (next_minor, False)):
    installed = {"jax": version, "jaxlib": version, "jax-cuda12-plugin": version}
    assert install.jax_matches("gpu", installed, JAX) == keeps
    assert len(install.plan("gpu", installed, PINS, REPO)) == (2 if keeps else 3)


def test_dry_run_on_this_machine_prints_the_plan(capsys):
  assert install.main(["--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("accelerator: ")
  assert lines[-1].endswith(f"-m pip install -q --no-deps -e {ROOT}")


def test_both_notebooks_start_with_the_same_thin_install_cell():
  cells = []
  for name in ("demo.ipynb", "propagation_benchmark.ipynb"):
    with open(os.path.join(ROOT, "colab", name)) as f:
      code = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    cells.append("".join(code[0]["source"]))
  assert cells[0] == cells[1]
  cell = cells[0]
  assert "if 'google.colab' in sys.modules:" in cell   # Nothing happens outside Colab.
  assert "colab/install.py" in cell
  assert "pip" not in cell   # Every pip command comes from install.py.
  assert len(cell.splitlines()) <= 10
  # The cell's shell and magic lines are IPython syntax: it must still compile.
  transformer = pytest.importorskip("IPython.core.inputtransformer2")
  code = transformer.TransformerManager().transform_cell(cell)
  compile(code, "install_cell", "exec")
  assert "colab/install.py" in code and "sys.executable" in code
