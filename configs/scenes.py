r"""The embedded default: the whole pipeline on generated scenes, on a laptop CPU.

Nothing is downloaded: the dataset is drawn from a seed (affinity_jax.data.scenes) and
the tiny backbone trains from scratch. Every object has a small class-coloured part on
a body shared by all classes, so CAMs light up the part only and the random walk has
the body to recover, as on real images.

  python -m affinity_jax.main --config=configs/scenes.py --workdir=/tmp/scenes

Expected (2 CPU cores, 4 to 9 minutes; 8 min 22 s on a 2-core AMD EPYC, Zen 3):
CAM+RW at least 10 mIoU points above CAM in /tmp/scenes/eval/results.md.
`configs/scenes.py:tiny` is the seconds-long variant the tests run (numbers
meaningless).
"""

from affinity_jax import config_lib
from affinity_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.data.name = "scenes"
  c.data.train_split = "train"
  c.data.label_split = "train"
  c.data.eval_split = "train"
  c.data.seg_eval_split = "val"
  c.data.num_workers = 0
  c.data.color_jitter = False  # Classes differ by hue: hue jitter would blur them.
  c.data.scenes.update(num_train=400, num_val=100, image_size=128, num_classes=5)
  c.data.infer_canvases = ()  # Every image has one size: one program per scale anyway.

  c.model.backbone = "tiny"
  c.model.norm = "batch"  # Trainable BatchNorm: GroupNorm learns the small parts far slower.

  c.cam.batch_size = 16
  c.cam.crop = 128
  c.cam.resize_long = (96, 160)
  c.cam.train.update(optimizer="adam", steps=400, lr=0.001, log_every=20, ckpt_every=200)

  # The tiny net's CAMs are flatter than ResNet-38's on VOC (background cells at 0.2-0.4
  # of the class max), so the VOC powers (4 / 32 / 16) call almost every cell
  # foreground. These make low alpha's foreground the cells above ~0.5, high alpha's
  # background those below ~0.2, and the walk's background 1 - max (docs: README).
  c.crf.la_alpha = 1.0
  c.crf.ha_alpha = 6.0
  c.crf.num_workers = 2
  c.rw.alpha = 1.0

  c.aff.batch_size = 8
  c.aff.crop = 128
  c.aff.train.update(optimizer="adam", steps=600, lr=0.001, log_every=20, ckpt_every=200)

  c.rw.batch_size = 16

  c.seg.head_dilation = 2  # The scenes' grid is 16x16: dilation 12 would see padding.
  c.seg.batch_size = 8
  c.seg.crop = 128
  c.seg.resize_long = (96, 160)
  c.seg.train.update(optimizer="adam", steps=600, lr=0.001, log_every=20, ckpt_every=200)

  c.eval.num_overlays = 6

  return config_lib.apply_variant(c, arg, VARIANTS)


def tiny(c):
  """Seconds-long: 16 images of 64 px, 4 steps per network (numbers meaningless)."""
  c.data.scenes.update(num_train=16, num_val=8, image_size=64)
  c.cam.crop = c.aff.crop = c.seg.crop = 64
  c.cam.resize_long = c.seg.resize_long = (48, 80)
  c.cam.scales = (1.0, 0.5)
  c.crf.num_workers = 0
  c.rw.t = 16
  for stage in (c.cam, c.aff, c.seg):
    stage.batch_size = 8
    stage.train.update(steps=4, ckpt_every=2, log_every=1)
  c.eval.num_overlays = 2


VARIANTS = {"tiny": tiny}
