"""What every stage shares: the run context, datasets, models and stored outputs."""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from affinity_jax import constants
from affinity_jax import io
from affinity_jax.data import sources
from affinity_jax.errors import UserError
from affinity_jax.models import heads
from affinity_jax.training import loop


@dataclasses.dataclass(eq=False)  # Hashed by identity, for functools.cache.
class Context:
  """One run: the resolved config, its workdir and the device mesh."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  @functools.cached_property
  def data_dir(self) -> str:
    return self.config.data.data_dir or self.path("tfds")

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

  @functools.cache
  def _index(self, splits: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    """image id -> (split, record index), the first split holding it wins."""
    index = {}
    for name in splits:
      for i, image_id in enumerate(self.split(name).ids()):
        index.setdefault(image_id, (name, i))
    return index

  def label_ids(self, only_mine: bool = True) -> list[str]:
    """Ids of the label splits (each once); by default only this process's share."""
    ids = list(self._index(self.label_splits()))
    return ids[jax.process_index()::jax.process_count()] if only_mine else ids

  def example(self, image_id: str) -> dict:
    """The decoded example `image_id` of the label splits."""
    name, i = self._index(self.label_splits())[image_id]
    return self.split(name)[i]

  def make_model(self, kind: str, pretrained: bool = True) -> nnx.Module:
    """A fresh network: kind is "cam", "aff" or "seg"; with `model.pretrained` loaded
    unless `pretrained` is False."""
    cls = {"cam": heads.CAMNet, "aff": heads.AffinityNet, "seg": heads.SegNet}[kind]
    kw = dict(dilation=self.config.seg.head_dilation) if kind == "seg" else {}
    if kind == "aff" and self.config.aff.level_stages:
      if self.config.model.backbone != "lite0":
        raise UserError(f"aff.level_stages: only the lite0 backbone has it, not "
                        f"{self.config.model.backbone!r}")
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
    """The network `kind` as its training stage left it; error if that is not done."""
    model = self.make_model(kind, pretrained=False)  # The checkpoint holds every weight.
    stage_config = self.config[kind].train
    step = loop.restore_model(model, stage_config, self.path(kind),
                              self.frozen_prefixes(kind, model), self.mesh)
    if not _complete(step, stage_config):
      raise UserError(f"{self.path(kind, 'ckpt')}: training stage train_{kind} has not "
                      f"finished (step {step or 0} of {stage_config.steps}); run "
                      f"--mode=train_{kind} first")
    return model


def _complete(step: int | None, train_config) -> bool:
  return step is not None and step >= train_config.steps


def trained(ctx: Context, kind: str) -> bool:
  """Whether the training stage of network `kind` ("cam", "aff", "seg") has finished."""
  train_config = ctx.config[kind].train
  return _complete(loop.latest_step(ctx.path(kind), train_config), train_config)


def _marker(ctx: Context, folder: str) -> str:
  # One marker per process: on several hosts each writes its share of the images.
  return ctx.path(folder, f"DONE-{jax.process_index()}")


def finished(ctx: Context, folder: str) -> bool:
  """Whether an inference stage wrote all its files into `folder` (see `mark_finished`)."""
  return os.path.exists(_marker(ctx, folder))


def mark_finished(ctx: Context, folder: str) -> None:
  """Records that every per-image file of `folder` is written (a killed run has none)."""
  io.write_text(_marker(ctx, folder), "")


def normalization(model: nnx.Module) -> str:
  return model.backbone.normalization


# Stored per-image outputs ------------------------------------------------------------


def save_cams(path: str, cams: np.ndarray, keys: np.ndarray) -> None:
  """Merged CAMs of the present classes, float16 [H, W, k], with their label ids [k]."""
  io.save_npz(path, cams=cams.astype(np.float16), keys=np.asarray(keys, np.int32))


def load_cams(path: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (cams float32 [H, W, k], keys int32 [k])."""
  try:
    with np.load(path) as f:
      return f["cams"].astype(np.float32), f["keys"]
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f"{path}: cannot read stored CAMs ({e}); delete it and rerun "
                    "--mode=infer_cam") from None


def full_cams(cams: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[H, W, k] maps of label ids `keys` -> [H, W, 20] with zeros for absent classes."""
  out = np.zeros(cams.shape[:2] + (constants.NUM_CLASSES,), np.float32)
  out[..., np.asarray(keys) - 1] = cams
  return out


def all_exist(directory: str, ids: list[str], suffix: str) -> bool:
  return all(os.path.exists(os.path.join(directory, i + suffix)) for i in ids)
