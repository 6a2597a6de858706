"""Stage 1: train the classifier (`train_cam`) and infer multi-scale CAMs (`infer_cam`),
or import another method's CAMs (`import_cams`) and write ours in other formats
(`export_cams`)."""

import os

import numpy as np

from affinity_jax import stopping
from affinity_jax.data import pipeline
from affinity_jax.errors import UserError
from affinity_jax.labels import cam_files
from affinity_jax.progress import Progress
from affinity_jax.stages import common
from affinity_jax.training import losses


def train(ctx: common.Context) -> None:
  c = ctx.config
  if ctx.nothing_to_train("cam"):
    return
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
  if ctx.config.cam.cams_from:
    import_cams(ctx, ctx.config.cam.cams_from, ctx.config.cam.cams_format)
    return
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


def import_cams(ctx: common.Context, directory: str, fmt: str) -> int:
  """Fills the workdir's CAM store from another method's files, one per image.

  Every image of the label splits needs its file (`labels.cam_files`), of the image's
  size; the CAMs define the image's present classes from then on. Files of other images
  are left alone. Images already in the store are skipped, so an interrupted import
  resumes.

  Args:
    ctx: the run.
    directory: the folder of `<id>.npy` (psa, irn) or `<id>.npz` (npz) files.
    fmt: `psa`, `irn` or `npz`.

  Returns:
    The number of images imported now.

  Raises:
    UserError: the folder is missing, files are missing (the first named, with the
      count) or a file is refused (`cam_files.read`).
  """
  cam_files.checked_format(fmt)
  if not os.path.isdir(directory):
    raise UserError(f"cam.cams_from: {directory} is not a folder")
  store = ctx.files.cams
  ids = ctx.label_ids()
  missing = [i for i in ids if not os.path.exists(cam_files.path(directory, i, fmt))]
  if missing:
    raise UserError(f"{cam_files.path(directory, missing[0], fmt)}: CAM file missing "
                    f"({len(missing)} of the {len(ids)} images of "
                    f"{'/'.join(ctx.label_splits())} have none in {directory})")
  todo = [i for i in ids if not store.exists(i)]
  with Progress(total=len(todo), desc="import CAMs", disable=None) as bar:
    for done, image_id in enumerate(todo, 1):
      size = ctx.example(image_id)["image"].shape[:2]
      cams, keys = cam_files.read(cam_files.path(directory, image_id, fmt), fmt, size)
      store.save(image_id, cams, keys)
      bar.update(1)
      stopping.stop_if_requested(f"in the CAM import, {done} of {len(todo)} images stored")
  store.mark_finished()
  print(f"[infer_cam] imported the {fmt} CAMs of {len(ids)} images from {directory}",
        flush=True)
  return len(todo)


def export_cams(ctx: common.Context, directory: str, fmt: str) -> int:
  """Writes every CAM of the workdir's store as `<directory>/<id>` in format `fmt`
  (`labels.cam_files.write`), for psa's `infer_aff.py --cam_dir`, IRN's later steps or
  other methods.

  Returns:
    The number of images written.

  Raises:
    UserError: the CAM store is not complete (run infer_cam first).
  """
  cam_files.checked_format(fmt)
  store = ctx.files.cams
  if not store.finished():
    raise UserError(f"{store.directory}: the CAMs are not complete; run --mode=infer_cam "
                    "first")
  ids = [i for i in ctx.label_ids() if store.exists(i)]
  os.makedirs(directory, exist_ok=True)
  with Progress(total=len(ids), desc="export CAMs", disable=None) as bar:
    for image_id in ids:
      cams, keys = store.load(image_id)
      cam_files.write(cam_files.path(directory, image_id, fmt), fmt, cams, keys)
      bar.update(1)
  return len(ids)
