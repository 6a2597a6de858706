"""Every config key of an experiment, with the paper's settings as defaults.

Each file in `configs/` starts from `base_config()` and changes what its experiment
needs. Keys cannot be added afterwards (configs are locked), so this module is the one
list of what can be set, each key explained where it is set. It imports no jax, so
loading a config (and checking it against a workdir) stays fast.
"""

import ml_collections


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Every key `training.loop.train` reads, neutral values updated with `overrides`."""
  config = ml_collections.ConfigDict(dict(
      steps=1000,           # number of optimiser steps (the poly schedule's max_step)
      lr=0.01,              # base learning rate (pretrained weights)
      schedule="poly",      # "poly": lr * (1 - step/steps) ** poly_power, or "constant"
      poly_power=0.9,
      optimizer="sgd",      # "sgd" (the spec) or "adam" (quick CPU demos)
      momentum=0.9,         # the reference effectively uses 5e-4; see docs/training.md
      weight_decay=5e-4,    # L2 on weights only, added to the gradient
      log_every=10,         # period of the loss/lr/images-per-s in the progress display
      ckpt_every=500,       # checkpoint period in steps; the last step is always saved
      keep=2,               # checkpoints kept
      seed=0,               # base key of the per-step dropout keys
      progress=True,        # progress display: a bar on a terminal, else timed lines
  ))
  config.update(overrides)
  return config


def base_config() -> ml_collections.ConfigDict:
  """The reference ResNet-38 settings on VOC 2012 (the paper and its code, psa)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="voc12",              # "voc12" or "scenes"
      manual_dir="",             # voc12: the VOCdevkit (or VOC2012) folder you prepared
      data_dir="",               # prepared TFDS datasets; "" = <workdir>/tfds
      train_split="train_aug",   # classifier and AffinityNet training
      label_split="train_aug",   # images that get CAMs, CRF labels and pseudo masks
      eval_split="train",        # pseudo masks scored against ground truth here
      seg_eval_split="val",      # segmentation net scored here
      # Grain worker processes for decoding and augmentation; -1: one per core of the
      # host that runs the stage, less one for the main process, at most 16
      # (data.pipeline.default_worker_count; resolved at run time, never stored).
      num_workers=-1,
      # Inference pads every image (bottom/right, zeros) onto the smallest of these
      # (height, width) canvases that holds it, resized with each inference scale: one
      # compiled program per canvas and scale, whatever the image sizes
      # (inference/canvas.py, docs/inference.md). VOC's images (long side 500) fit the
      # two; () pads each image to a multiple of `infer_pad` instead ("tight": one
      # program per padded size).
      infer_canvases=((384, 512), (512, 512)),
      # Images beyond every canvas are zero-padded to a multiple of this (of 8); 0 with
      # no canvases: not padded, each image and scale at its own size as psa runs them.
      infer_pad=64,
      color_jitter=True,         # brightness/contrast/saturation 0.3, hue 0.1 in training
      scenes=ml_collections.ConfigDict(dict(  # the generated dataset (name="scenes")
          num_train=400, num_val=100, image_size=128, num_classes=5, seed=0)),
  ))

  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet38",       # resnet38 | vgg16 | lite0 | tiny
      pretrained="",             # weights file (.pth/.params/.h5) or converted checkpoint
      norm="frozen",             # frozen (inference statistics, the spec) | batch
  ))

  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",    # "" single process, "auto" (TPU pods, SLURM), "host:port"
      num_processes=0,
      process_id=-1,
      # A process that stops answering for this long makes the others fail (jax's
      # default); a process that fails exits at once, so the others see it sooner.
      heartbeat_timeout_s=100,
  ))

  # Stage 1: classifier. 15 epochs of train_aug (10,582 images) at batch 16.
  c.cam = ml_collections.ConfigDict(dict(
      batch_size=16,
      crop=448,
      resize_long=(256, 512),    # random long side before the crop
      scales=(1.0, 0.5, 1.5, 2.0),  # inference scales, each also flipped
      infer_batch=4,             # images of one size per inference call (x2 flips)
      # Parameter path prefixes kept fixed on top of the backbone's own frozen layers,
      # e.g. ("backbone",) trains only the classifier (the same key in aff and seg).
      frozen=(),
      # Lite0 only: CAMs of the VOC classes with ImageNet counterparts from the backbone's
      # ImageNet classifier (models.heads.CAMNet); the spec trains them all (False).
      imagenet_prior=False,
      # A trained classifier to infer the CAMs with instead of training one (train_cam
      # then trains nothing): psa's `res38_cls.pth` / `vgg_cls.pth` (the classifier's
      # every array, fc8 included) or one of ours (a workdir, its `cam/` or `cam/ckpt/`).
      # The same key in aff and seg. docs/interop.md.
      weights="",
      # Another method's CAM files to use instead of inferring CAMs (infer_cam imports
      # them, train_cam trains nothing): a folder of one `<id>.npy` / `<id>.npz` per
      # image in `cams_format`, "psa", "irn" or "npz" (labels/cam_files.py).
      cams_from="",
      cams_format="psa",
      train=train_config(steps=9920, lr=0.01, momentum=0.9),
  ))

  # Stage 2: dense CRF on the host, low and high background power.
  c.crf = ml_collections.ConfigDict(dict(
      la_alpha=4.0,
      ha_alpha=32.0,             # the code's value; the paper says 24
      num_workers=2,             # CRF worker processes
  ))

  # Stage 3: AffinityNet. 8 epochs of train_aug at batch 8.
  c.aff = ml_collections.ConfigDict(dict(
      batch_size=8,
      crop=448,
      radius=5,
      border="full",             # "full": every pair inside the crop; "reference": psa's
      frozen=(),                 # as cam.frozen
      # Backbone stages whose ends give the `low` and `mid` feature levels (Lite0 only;
      # () keeps the backbone's default, Lite0's (3, 5)).
      level_stages=(),
      # A trained AffinityNet instead of training one (train_aff trains nothing and
      # aff_labels, which only feeds it, is skipped): psa's `res38_aff.pth` or ours.
      weights="",
      train=train_config(steps=10580, lr=0.1, momentum=0.9),
  ))

  # Stage 4: random walk.
  c.rw = ml_collections.ConfigDict(dict(
      alpha=16.0,                # background power of the walk's input
      beta=8.0,                  # Hadamard power of the affinities
      t=256,                     # walk length (the reference squares 8 times: 2^8)
      radius=5,
      border="full",             # "full": every pixel gets edges; "reference": psa's rule
      batch_size=4,              # images per device call, padded to the largest
      # Also embed the mirrored image and walk on the mean embedding (its mirror
      # mirrored back): the affinities' counterpart of the CAMs' flipped passes.
      flip=False,
      # Image scales AffinityNet embeds the image at (each also mirrored with `flip`),
      # each embedding resized back to the 1/8 grid and averaged; the walk always runs
      # on the unscaled image's grid. (1.0,): the reference's single pass.
      scales=(1.0,),
      # "class": each channel of the walk's output divided by its maximum over the
      # image, as the CAMs were (`inference.walk.normalize`); "none": the reference.
      normalize="none",
      dcrf=True,                 # also write CAM+RW+dCRF labels (the paper's third row)
      # Weight of the walk's -log scores against the dCRF's pairwise terms (the label
      # stage's CRF uses 1).
      dcrf_unary_weight=1.0,
  ))

  # Stage 5: segmentation network on the pseudo masks.
  c.seg = ml_collections.ConfigDict(dict(
      enabled=True,
      head_dilation=12,          # the LargeFOV head's 3x3 dilation (fit it to the grid)
      head_width=512,            # channels of the LargeFOV head's 3x3 conv (fc8)
      batch_size=16,
      crop=448,
      resize_long=(256, 512),
      frozen=(),                 # as cam.frozen
      weights="",                # a trained segmentation net of ours, as cam.weights
      train=train_config(steps=6000, lr=0.01, momentum=0.9),
  ))

  c.eval = ml_collections.ConfigDict(dict(
      cam_threshold=0.15,        # constant background score for the CAM-only labels
      # Also score CAM labels at each of these thresholds and report the best one, so
      # the CAM baseline is not judged by a threshold that happens to suit it badly.
      cam_sweep=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
      num_overlays=6,            # images in eval/overlays.png
  ))
  return c


def shrink_for_smoke_test(c: ml_collections.ConfigDict) -> None:
  """Turns a VOC config into its `tiny` variant: train split only, tiny crops, 2 steps."""
  c.data.train_split = c.data.label_split = c.data.eval_split = "train"
  c.data.num_workers = 0
  c.cam.scales = (1.0,)
  c.crf.num_workers = 0
  c.rw.t = 8
  c.rw.dcrf = False
  c.seg.enabled = False
  for stage in (c.cam, c.aff, c.seg):
    stage.batch_size = 8
    stage.crop = 64
    stage.train.update(steps=2, ckpt_every=1, log_every=1)
  c.cam.resize_long = c.seg.resize_long = (48, 80)
