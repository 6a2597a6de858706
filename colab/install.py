"""Installs affinity_jax into a Colab runtime without breaking the runtime's jax.

The notebooks' first cell runs this after cloning the repository. It:

1. looks at the machine: an NVIDIA GPU (`nvidia-smi` or `/dev/nvidia*`), a TPU
   (`TPU_NAME`, `COLAB_TPU_ADDR`, `TPU_ACCELERATOR_TYPE`, `/dev/accel*`, `/dev/vfio/<n>`)
   or neither;
2. keeps the installed jax when it can use that accelerator (Colab's GPU and TPU runtimes
   ship jax with the CUDA plugin or libtpu) and is of a release series the locked Flax,
   Optax and Orbax work with (from MIN_JAX up to the locked jax's minor release);
   otherwise installs `jax[cuda12]`, `jax[tpu]` or plain jax at the version
   pinned in requirements.lock;
3. installs the lock's other runtime packages (not the test and notebook tools, so the
   runtime's own Jupyter stays) with `--no-deps`, then the package itself with
   `--no-deps`, so neither step can replace jax;
4. prints the devices jax ended up with, from a fresh interpreter.

Standard library only: it runs before affinity_jax and its dependencies are installed.
`python colab/install.py --dry-run` prints the pip commands without running them.
"""

import argparse
import glob
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Iterable, Mapping, NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(REPO, "requirements.lock")

# The lowest jax that the locked flax, optax and orbax-checkpoint declare they accept
# (flax 0.12.8: jax>=0.10.0). A runtime's older jax is replaced rather than kept, since
# those packages are installed with --no-deps and would otherwise break on import.
# tests/test_colab_install.py checks this against the installed packages' metadata.
MIN_JAX = "0.10.0"

# Distributions that make up a jax installation, whose versions decide whether to keep it.
JAX_DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                     "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu", "libtpu-nightly")
JAX_EXTRAS = {"gpu": "[cuda12]", "tpu": "[tpu]", "cpu": ""}
RUNTIME_REQUIREMENTS = "-r requirements.txt"


class Pin(NamedTuple):
  """One package of the lock file.

  Attributes:
    name: normalised distribution name (lower case, `-` separated).
    line: the requirement as pip takes it, e.g. `appnope==1.0.0 ; sys_platform == 'darwin'`.
    via: what needs it, as uv wrote it: package names or `-r <requirements file>`.
  """
  name: str
  line: str
  via: tuple[str, ...]


def normalise(name: str) -> str:
  """Normalises a distribution name as pip compares them (PEP 503)."""
  return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> list[Pin]:
  """Parses a `uv pip compile` output with its `# via` annotations.

  Args:
    text: the contents of requirements.lock.

  Returns:
    The pins in file order.
  """
  pins = []
  for raw in text.splitlines():
    stripped = raw.strip()
    if not stripped:
      continue
    if not raw[0].isspace() and not stripped.startswith("#"):
      name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", stripped).group(0)
      pins.append(Pin(normalise(name), stripped, ()))
    elif pins and raw[0].isspace() and stripped.startswith("#"):
      # "# via x" holds one item; "# via" alone is followed by "#   x" lines.
      item = stripped[1:].strip()
      if item.startswith("via"):
        item = item[len("via"):].strip()
      if item:
        via = item if item.startswith("-r ") else normalise(item)
        pins[-1] = pins[-1]._replace(via=pins[-1].via + (via,))
  return pins


def runtime_pins(pins: Iterable[Pin]) -> list[Pin]:
  """The pins requirements.txt needs, directly or through other packages.

  Leaves out what only requirements-dev.txt brings (pytest, ipykernel, ipython, ...):
  replacing a notebook runtime's own kernel packages can break the runtime.

  Args:
    pins: the lock's pins.

  Returns:
    The needed pins, in the lock's order.
  """
  pins = list(pins)
  needed = set()
  grew = True
  while grew:
    grew = False
    for pin in pins:
      if pin.name not in needed and any(v == RUNTIME_REQUIREMENTS or v in needed
                                        for v in pin.via):
        needed.add(pin.name)
        grew = True
  return [p for p in pins if p.name in needed]


def is_jax_distribution(name: str) -> bool:
  """Whether a distribution belongs to a jax installation (jax, jaxlib, plugins, libtpu)."""
  name = normalise(name)
  return (name in ("jax", "jaxlib") or name.startswith(("jax-cuda", "jax-rocm"))
          or name.startswith("libtpu"))


def locked_version(pins: Iterable[Pin], name: str) -> str:
  """The version the lock pins `name` to."""
  for pin in pins:
    if pin.name == name:
      return re.search(r"==\s*([^\s;]+)", pin.line).group(1)
  raise KeyError(f"{name} is not in requirements.lock")


def version_tuple(version: str) -> tuple[int, ...]:
  """The leading numeric release of a version: `0.4.30+cuda12` -> (0, 4, 30)."""
  return tuple(int(n) for n in re.match(r"\d+(\.\d+)*", version).group(0).split("."))


def detect_accelerator(env: Mapping[str, str], devices: Iterable[str],
                       has_nvidia_smi: bool) -> str:
  """Says which accelerator the machine has.

  Args:
    env: the environment variables.
    devices: existing device paths, e.g. `/dev/nvidia0`, `/dev/accel0`, `/dev/vfio/0`.
    has_nvidia_smi: whether `nvidia-smi` is on the PATH.

  Returns:
    "gpu", "tpu" or "cpu".
  """
  devices = list(devices)
  if has_nvidia_smi or any(re.fullmatch(r"/dev/nvidia\d+", d) for d in devices):
    return "gpu"
  # /dev/vfio/vfio exists wherever the vfio driver is loaded; TPUs appear as numbered
  # groups next to it (v5e and later) or as /dev/accel<n> (earlier TPU VMs).
  if (any(env.get(k) for k in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"))
      or any(re.fullmatch(r"/dev/(accel\d+|vfio/\d+)", d) for d in devices)):
    return "tpu"
  return "cpu"


def jax_matches(accelerator: str, installed: Mapping[str, str], locked_jax: str) -> bool:
  """Whether the installed jax can run on `accelerator` and is new enough to keep.

  Args:
    accelerator: "gpu", "tpu" or "cpu".
    installed: distribution name -> version, for the installed JAX_DISTRIBUTIONS.
    locked_jax: the lock's jax version; a newer minor release is not kept, since it
      can drop what the locked Flax imports (on an H200 runtime with jax 0.11.2, flax
      0.12.8's nnx failed to import: `jax.experimental.hijax` has no `HiPrimitive`,
      while that runtime's own flax 0.12.10 ran the whole pipeline).

  Returns:
    True when jax and jaxlib are installed, jax is at least MIN_JAX and of a minor
    release no newer than `locked_jax`'s, and, on a GPU, the CUDA plugin of jax's
    version is installed or, on a TPU, libtpu.
  """
  jax, jaxlib = installed.get("jax"), installed.get("jaxlib")
  if (not jax or not jaxlib or version_tuple(jax) < version_tuple(MIN_JAX)
      or version_tuple(jax)[:2] > version_tuple(locked_jax)[:2]):
    return False
  if accelerator == "gpu":
    # A CUDA plugin and its PJRT runtime of jax's own version (jaxlib itself has no CUDA
    # since jax 0.4.26, far below MIN_JAX).
    return any(
        installed.get(f"jax-cuda{major}-plugin") == jax
        and installed.get(f"jax-cuda{major}-pjrt", jax) == jax for major in (12, 13))
  if accelerator == "tpu":
    return any(name.startswith("libtpu") for name in installed)
  return True


def pip(*args: str) -> list[str]:
  """A `pip install` command line for the running interpreter."""
  return [sys.executable, "-m", "pip", "install", "-q", *args]


def plan(accelerator: str, installed: Mapping[str, str], pins: list[Pin],
         repo: str = REPO) -> list[list[str]]:
  """The pip commands that install affinity_jax for this machine, in order.

  Args:
    accelerator: "gpu", "tpu" or "cpu" (detect_accelerator).
    installed: distribution name -> version of the installed jax distributions.
    pins: the lock's pins (read_lock).
    repo: the repository to install in editable mode.

  Returns:
    Commands for subprocess: jax first when the installed one does not match (with its
    dependencies, which the lock's pins then overwrite), then the lock's runtime pins
    except jax's own distributions, then the package; both with --no-deps.
  """
  commands = []
  jax = locked_version(pins, "jax")
  if not jax_matches(accelerator, installed, jax):
    jaxlib = locked_version(pins, "jaxlib")
    commands.append(pip(f"jax{JAX_EXTRAS[accelerator]}=={jax}", f"jaxlib=={jaxlib}"))
  rest = [p.line for p in runtime_pins(pins) if not is_jax_distribution(p.name)]
  commands.append(pip("--no-deps", *rest))
  commands.append(pip("--no-deps", "-e", repo))
  return commands


def installed_jax(version: Callable[[str], str] = importlib.metadata.version
                  ) -> dict[str, str]:
  """Versions of the installed JAX_DISTRIBUTIONS, read from metadata (jax not imported)."""
  found = {}
  for name in JAX_DISTRIBUTIONS:
    try:
      found[name] = version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def machine_devices() -> list[str]:
  """The device paths detect_accelerator looks at that exist on this machine."""
  return glob.glob("/dev/nvidia*") + glob.glob("/dev/accel*") + glob.glob("/dev/vfio/*")


# Run in a fresh interpreter: this process must not import a jax it may have replaced.
SHOW_DEVICES = ("import jax; print(jax.default_backend()); "
                "print(f'jax {jax.__version__} devices: {jax.devices()}')")


def main(argv: list[str] | None = None) -> int:
  """Detects, installs, prints the devices; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="print the pip commands instead of running them")
  args = parser.parse_args(argv)

  accelerator = detect_accelerator(os.environ, machine_devices(),
                                   shutil.which("nvidia-smi") is not None)
  installed = installed_jax()
  with open(LOCK) as f:
    pins = read_lock(f.read())
  kept = jax_matches(accelerator, installed, locked_version(pins, "jax"))
  print(f"accelerator: {accelerator}; installed jax: "
        f"{', '.join(f'{k} {v}' for k, v in installed.items()) or 'none'}; "
        f"{'keeping it' if kept else 'installing the locked jax for it'}", flush=True)
  for command in plan(accelerator, installed, pins):
    if args.dry_run:
      print(shlex.join(command))
    else:
      subprocess.check_call(command)
  if args.dry_run:
    return 0

  # stderr is left alone so that jax's own warnings and errors show in the cell.
  backend, devices = subprocess.run([sys.executable, "-c", SHOW_DEVICES], check=True,
                                    stdout=subprocess.PIPE, text=True).stdout.split("\n", 1)
  print(devices.strip())
  if accelerator != "cpu" and backend != accelerator:
    print(f"warning: this machine has a {accelerator.upper()} but jax runs on "
          f"{backend}; see docs/colab.md", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
