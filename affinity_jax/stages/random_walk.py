"""Stage 4 (`infer_rw`): AffinityNet features + banded random walk -> pseudo masks.

Walks `config.rw.batch_size` images of one canvas at a time (`inference.walk.Walker`)
and stores the argmax labels; with `config.rw.dcrf` also a dense CRF of the walk's scores, in
`config.crf.num_workers` processes while the next batches walk.
"""

import functools

from affinity_jax import stopping
from affinity_jax.inference import walk
from affinity_jax.labels import crf
from affinity_jax.progress import Progress
from affinity_jax.stages import common


def infer(ctx: common.Context) -> None:
  c, files = ctx.config, ctx.files
  walker = ctx.walker()
  todo = [i for i in ctx.label_ids()
          if not files.rw.exists(i) or (c.rw.dcrf and not files.rw_crf.exists(i))]

  def walked():
    """Walks the images in batches of one canvas, stores their labels, yields the
    dense-CRF jobs."""
    images = ((i, ctx.example(i)["image"]) for i in todo)
    canvas_of = lambda item: ctx.canvases.canvas(*item[1].shape[:2])
    for chunk in common.grouped_batches(images, canvas_of, c.rw.batch_size):
      ids, chunk_images = zip(*chunk)
      cams = [files.cams.load(i) for i in ids]
      for image_id, image, (_, keys), scores in zip(ids, chunk_images, cams,
                                                    walker(list(chunk_images), cams)):
        files.rw.save(image_id, walk.labels(scores, keys))
        yield files.rw_crf.path(image_id), image, scores, walk.label_ids(keys)
        if stopping.requested():  # Stop after this image; its CRF finishes too.
          return

  with Progress(total=len(todo), desc="infer_rw", disable=None) as bar:
    if c.rw.dcrf:
      # The CRF runs in the CRF worker processes while the next batches walk.
      work = functools.partial(crf.label_png, unary_weight=c.rw.dcrf_unary_weight)
      crf.map_jobs(work, walked(), c.crf.num_workers, lambda _: bar.update(1))
    else:
      for _ in walked():
        bar.update(1)
  stopping.stop_if_requested("in infer_rw, the images walked so far stored")
  files.rw.mark_finished()
