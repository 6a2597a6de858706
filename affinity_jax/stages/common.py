"""What every stage shares: the run context (config, workdir, mesh), datasets, models."""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from affinity_jax import io
from affinity_jax import sharding
from affinity_jax.data import sources
from affinity_jax.errors import UserError
from affinity_jax.inference import cam
from affinity_jax.inference import canvas
from affinity_jax.inference import segment
from affinity_jax.inference import walk
from affinity_jax.models import heads
from affinity_jax.training import checkpoint
from affinity_jax.training import loop
from affinity_jax.workdir import CHECKPOINT
from affinity_jax.workdir import Workdir


@dataclasses.dataclass(eq=False)  # Hashed by identity, for functools.cache.
class Context:
  """One run: the resolved config, its workdir and the device mesh."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh

  @functools.cached_property
  def files(self) -> Workdir:
    """The workdir's stores (`affinity_jax.workdir`)."""
    return Workdir(self.workdir, jax.process_index())

  @functools.cached_property
  def data_dir(self) -> str:
    """Where the prepared datasets are: `data.data_dir`, else the workdir's."""
    if io.is_remote(self.config.data.data_dir):
      raise UserError(f"data.data_dir={self.config.data.data_dir}: prepared datasets "
                      "(ArrayRecord files) are read from a local disk; give a local folder, "
                      "or leave it empty")
    return self.config.data.data_dir or self.files.datasets

  @property
  def datasets_per_host(self) -> bool:
    """Whether every host prepares its own datasets (a workdir in a bucket), not only
    the first."""
    return not self.config.data.data_dir and self.files.datasets_per_host

  def _dataset_params(self) -> dict[str, Any]:
    if self.config.data.name == "scenes":
      return dict(self.config.data.scenes)
    return {}

  def prepare_data(self) -> None:
    """Prepares the dataset once (a no-op when it already is)."""
    data = self.config.data
    sources.prepare(data.name, self.data_dir, data.manual_dir or None,
                    **self._dataset_params())

  @functools.cache
  def split(self, name: str) -> sources.DecodedSource:
    return sources.open_split(self.config.data.name, name, self.data_dir,
                              **self._dataset_params())

  def label_splits(self) -> tuple[str, ...]:
    """Splits whose images get CAMs, CRF labels and pseudo masks (label, then eval)."""
    data = self.config.data
    return tuple(dict.fromkeys((data.label_split, data.eval_split)))

  @functools.cached_property
  def examples(self) -> sources.ById:
    """The examples of the label splits by image id, the first split holding it wins."""
    return sources.ById([self.split(name) for name in self.label_splits()])

  def label_ids(self, only_mine: bool = True) -> list[str]:
    """Ids of the label splits (each once); by default only this process's share."""
    ids = self.examples.ids()
    return ids[jax.process_index()::jax.process_count()] if only_mine else ids

  def example(self, image_id: str) -> dict:
    """The decoded example `image_id` of the label splits."""
    return self.examples[image_id]

  def make_model(self, kind: str, pretrained: bool = True) -> nnx.Module:
    """A fresh network: kind is "cam", "aff" or "seg"; with `model.pretrained` loaded
    unless `pretrained` is False."""
    cls = {"cam": heads.CAMNet, "aff": heads.AffinityNet, "seg": heads.SegNet}[kind]
    seg = self.config.seg
    kw = dict(dilation=seg.head_dilation, width=seg.head_width) if kind == "seg" else {}
    if kind == "cam" and self.config.cam.imagenet_prior:
      kw = dict(imagenet_prior=True)
    if kind == "aff" and self.config.aff.level_stages:
      # Only Lite0 takes it; `build_backbone` turns the option into a UserError otherwise.
      kw = dict(level_stages=tuple(self.config.aff.level_stages))
    model = cls(self.config.model.backbone, rngs=nnx.Rngs(self.config.seed),
                norm=self.config.model.norm, **kw)
    if pretrained and self.config.model.pretrained:
      from affinity_jax.weights import load
      load.load_pretrained(model, self.config.model.pretrained)
    return model

  def frozen_prefixes(self, kind: str, model: nnx.Module) -> tuple[str, ...]:
    """Parameters stage `kind` does not train: the backbone's own frozen layers, then
    the config's `<kind>.frozen` prefixes."""
    return tuple(model.backbone.frozen_prefixes) + tuple(self.config[kind].frozen)

  def trained_model(self, kind: str) -> nnx.Module:
    """The network `kind` from `<kind>.weights` when given, else as its training stage
    left it (parameters only); a UserError names the stage to run when it has not
    finished."""
    model = self.make_model(kind, pretrained=False)  # The checkpoint holds every weight.
    # On this host's devices: every host infers its own images.
    replicated = sharding.replicated(self.local_mesh)
    if self.config[kind].weights:
      return load_trained(model, self.config[kind].weights, kind, replicated)
    return self.files.checkpoints(kind).load(model, self.config[kind].train.steps, replicated)

  def nothing_to_train(self, kind: str) -> bool:
    """Whether training stage `kind` has nothing to do because the network is given
    (`<kind>.weights`; for the classifier also `cam.cams_from`); says so."""
    given = self.config[kind].weights or (kind == "cam" and self.config.cam.cams_from)
    if given:
      key = f"{kind}.weights" if self.config[kind].weights else "cam.cams_from"
      print(f"[train_{kind}] {key} is set: nothing to train", flush=True)
    return bool(given)

  def trained(self, kind: str) -> bool:
    """Whether network `kind` ("cam", "aff", "seg") needs no training: its weights are
    given (`<kind>.weights`) or its training stage has finished. The classifier also
    needs none once the CAM store is complete (CAMs imported from another method)."""
    if self.config[kind].weights:
      return True
    if kind == "cam" and (self.config.cam.cams_from or self.files.cams.finished()):
      return True
    return self.files.checkpoints(kind).finished(self.config[kind].train.steps)

  @functools.cached_property
  def local_mesh(self) -> jax.sharding.Mesh:
    """This host's devices: inference splits its batches over them (every host infers
    its own images)."""
    return sharding.make_mesh(jax.local_devices())

  @functools.cached_property
  def canvases(self) -> canvas.Canvases:
    """The input shapes of inference (`data.infer_canvases`, `data.infer_pad`)."""
    return canvas.Canvases.from_config(self.config.data)

  def classifier(self) -> cam.Classifier:
    """The trained classifier with the config's scales and padding, on `local_mesh`."""
    return cam.Classifier(self.trained_model("cam"), self.config.cam.scales,
                          self.canvases, self.config.cam.infer_batch, self.local_mesh)

  def walker(self) -> walk.Walker:
    """The trained AffinityNet and the config's walk, on `local_mesh`."""
    return walk.Walker(self.trained_model("aff"), self.config.rw, self.canvases,
                       self.local_mesh)

  def segmenter(self):
    """`predict(image uint8 [H, W, 3]) -> uint8 [H, W]` of the trained segmentation net."""
    return segment.predictor(self.trained_model("seg"), self.canvases)


def load_trained(model: nnx.Module, path: str, kind: str,
                 sharding: jax.sharding.Sharding | None = None) -> nnx.Module:
  """Puts a trained network's weights into `model` (the config's `<kind>.weights`).

  Args:
    model: the network as built (`Context.make_model`), updated in place.
    path: a weights file with every array of the network (psa's `res38_cls.pth`,
      `res38_aff.pth`, `vgg_cls.pth`: `weights.load_pretrained` reads the head layers
      too), or one of our training checkpoints: a workdir, its `<kind>/` folder or its
      `<kind>/ckpt/` (the newest step is read).
    kind: "cam", "aff" or "seg", for messages and the workdir's folder.
    sharding: where the arrays go (default: where the model's arrays are).

  Returns:
    `model`.

  Raises:
    UserError: one line naming the key and the file: unreadable, for another network
      or backbone, or lacking some of the network's arrays.
  """
  key = f"{kind}.weights"
  name = type(model).__name__
  if io.isdir(path):
    store = Workdir(path).checkpoints(kind)
    candidates = (store.checkpoints, os.path.join(path, CHECKPOINT), path)
    directory = next((d for d in candidates if _has_steps(d)), None)
    if directory is None:
      raise UserError(f"{key}: {path} holds no training checkpoint (looked for step folders "
                      f"in {kind}/{CHECKPOINT}/, {CHECKPOINT}/ and the folder itself)")
    try:
      checkpoint.restore_model(model, directory, None, sharding)
    except Exception as e:  # noqa: BLE001 -- orbax reports mismatches in many types.
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise UserError(f"{key}: {directory} does not restore into the "
                      f"{_backbone_name(model)} {name} ({type(e).__name__}: {first})") from None
    print(f"[{kind}] weights from {directory} (newest step)", flush=True)
    return model
  from affinity_jax.weights import load
  report = load.load_pretrained(model, path, verbose=False)
  if report.kept:
    raise UserError(f"{key}: {path} lacks {len(report.kept)} arrays of the trained "
                    f"{_backbone_name(model)} {name} (e.g. {', '.join(report.kept[:3])}); "
                    f"is it the {kind} network's file?")
  if report.unused:
    raise UserError(f"{key}: {path} holds {len(report.unused)} arrays the "
                    f"{_backbone_name(model)} {name} has no place for (e.g. "
                    f"{', '.join(report.unused[:3])})")
  if sharding is not None:
    nnx.update(model, jax.device_put(nnx.state(model), sharding))
  print(f"[{kind}] weights from {path} ({report.source_format}, "
        f"{report.loaded_values / 1e6:.1f}M values)", flush=True)
  return model


def _backbone_name(model: nnx.Module) -> str:
  """The backbone name of a network, for messages."""
  from affinity_jax.weights import load
  return load.backbone_name(model.backbone)


def _has_steps(directory: str) -> bool:
  return any(n.isdigit() for n in io.listdir(directory))


def train(ctx: Context, kind: str, model: nnx.Module, loss_fn, batches) -> None:
  """Trains network `kind` with `loop.train` in its checkpoint folder (resuming)."""
  store = ctx.files.checkpoints(kind)
  loop.train(model, loss_fn, batches, ctx.config[kind].train,
             loop.Output(store.checkpoints, store.metrics, kind),
             ctx.frozen_prefixes(kind, model), ctx.mesh)


def grouped_batches(items, key, size: int):
  """Chunks of at most `size` items with one `key(item)` each, every chunk yielded as
  soon as it is full, then the partial ones; a few items per key are held at a time."""
  groups = {}
  for item in items:
    group = groups.setdefault(key(item), [])
    group.append(item)
    if len(group) == size:
      yield groups.pop(key(item))
  yield from groups.values()
