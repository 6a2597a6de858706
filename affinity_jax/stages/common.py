"""What every stage shares: the run context (config, workdir, mesh), datasets, models."""

import dataclasses
import functools
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
from affinity_jax.training import loop
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
    kw = dict(dilation=self.config.seg.head_dilation) if kind == "seg" else {}
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
    """The network `kind` as its training stage left it (parameters only); a UserError
    names the stage to run when it has not finished."""
    model = self.make_model(kind, pretrained=False)  # The checkpoint holds every weight.
    # On this host's devices: every host infers its own images.
    return self.files.checkpoints(kind).load(model, self.config[kind].train.steps,
                                             sharding.replicated(self.local_mesh))

  def trained(self, kind: str) -> bool:
    """Whether the training stage of network `kind` ("cam", "aff", "seg") has finished."""
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
