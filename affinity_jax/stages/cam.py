"""Stage 1: train the classifier (`train_cam`) and infer multi-scale CAMs (`infer_cam`)."""

import numpy as np

from affinity_jax import stopping
from affinity_jax.data import pipeline
from affinity_jax.progress import Progress
from affinity_jax.stages import common
from affinity_jax.training import losses


def train(ctx: common.Context) -> None:
  c = ctx.config
  model = ctx.make_model("cam")
  batches = pipeline.classification_batches(
      ctx.split(c.data.train_split), mesh=ctx.mesh, batch_size=c.cam.batch_size,
      seed=c.seed, crop_size=c.cam.crop, long_side=tuple(c.cam.resize_long),
      normalization=model.backbone.normalization, jitter=c.data.color_jitter,
      worker_count=c.data.num_workers)
  common.train(ctx, "cam", model, losses.classification_loss, batches)


def infer(ctx: common.Context) -> None:
  """Stores the merged 8-pass CAMs of each image's present classes.

  `cam.infer_batch` images of one canvas at a time go through the passes together,
  each forward split over this host's devices.
  """
  classifier, store = ctx.classifier(), ctx.files.cams
  todo = [i for i in ctx.label_ids() if not store.exists(i)]
  examples = ((i, ctx.example(i)) for i in todo)
  canvas_of = lambda item: ctx.canvases.canvas(*item[1]["image"].shape[:2])
  stored = 0
  with Progress(total=len(todo), desc="infer_cam", disable=None) as bar:
    for chunk in common.grouped_batches(examples, canvas_of, ctx.config.cam.infer_batch):
      ids, chunk_examples = zip(*chunk)
      for image_id, example, cams in zip(ids, chunk_examples,
                                         classifier.cams(list(chunk_examples))):
        keys = np.flatnonzero(example["labels"]) + 1
        store.save(image_id, cams[..., keys - 1], keys)
        bar.update(1)
        stored += 1
        stopping.stop_if_requested(f"in infer_cam, {stored} of {len(todo)} images stored")
  store.mark_finished()
