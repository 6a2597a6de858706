"""The input shapes of inference: images zero-padded onto a few fixed canvases.

A jitted network compiles one program per input shape. VOC's images come in dozens of
sizes (long side 500, short side anywhere from ~100 to 500), and a compile costs tens of
seconds for ResNet-38 on a GPU, more on a TPU. So inference pads every image (bottom and
right, zeros after normalisation) onto the smallest of a few canvases that holds it: the
number of programs per stage is set by the config (`data.infer_canvases`), not by the
data. An image larger than every canvas is padded to a multiple of `data.infer_pad`
instead (one more program for its size); with no canvases at all every image is
(`tight` padding, the behaviour before canvases). `data.infer_pad=0` (no canvases) pads
nothing: every image and scale runs at its own size, as psa's `infer_cls.py` does (one
program per image size and scale; `configs/voc12_resnet38.py:from_reference`).

The canvas changes what the network sees near an image's bottom and right edges (more
zero-valued input where tight padding had fewer rows): docs/inference.md measures it.
"""

import dataclasses
import math

import numpy as np

from affinity_jax.errors import UserError
from affinity_jax.inference import STRIDE


@dataclasses.dataclass(frozen=True)
class Canvases:
  """The canvases of `data.infer_canvases`, and the tight padding beyond them.

  Attributes:
    sizes: (H, W) of each canvas at scale 1, smallest area first.
    multiple: tight padding (`data.infer_pad`): images beyond every canvas (or all
      images, with no canvases) are padded to a multiple of this; 0 (only without
      canvases): not padded at all (`exact`).
  """
  sizes: tuple[tuple[int, int], ...] = ()
  multiple: int = STRIDE

  def __post_init__(self):
    sizes = tuple(sorted(((int(h), int(w)) for h, w in self.sizes),
                         key=lambda s: (s[0] * s[1], s)))
    if any(h <= 0 or w <= 0 or h % STRIDE or w % STRIDE for h, w in sizes):
      raise UserError(f"data.infer_canvases: {self.sizes!r}; each canvas is (height, "
                      f"width), positive multiples of {STRIDE}")
    if self.multiple < 0 or self.multiple % STRIDE or (self.multiple == 0 and sizes):
      raise UserError(f"data.infer_pad: {self.multiple!r}; expected a positive multiple "
                      f"of {STRIDE}, or 0 (no padding) with data.infer_canvases=()")
    object.__setattr__(self, "sizes", sizes)

  @property
  def exact(self) -> bool:
    """Whether images run at their own size, unpadded (`data.infer_pad=0`)."""
    return self.multiple == 0

  @classmethod
  def from_config(cls, data_config) -> "Canvases":
    """`Canvases` of `config.data` (`infer_canvases`, `infer_pad`); a UserError names
    the key when its value is malformed."""
    try:
      sizes = tuple((h, w) for h, w in data_config.infer_canvases)
    except (TypeError, ValueError):
      raise UserError(f"data.infer_canvases: {data_config.infer_canvases!r}; expected "
                      "(height, width) pairs, e.g. ((384, 512), (512, 512))") from None
    return cls(sizes, int(data_config.infer_pad))

  def canvas(self, height: int, width: int) -> tuple[int, int]:
    """The (H, W) at scale 1 that an image of height x width is padded onto: the
    smallest canvas that holds it, else the image padded to `multiple`. Images with the
    same canvas share every compiled program."""
    for h, w in self.sizes:
      if height <= h and width <= w:
        return h, w
    if self.exact:
      return height, width
    return round_up(height, self.multiple), round_up(width, self.multiple)

  def at_scale(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
    """The padded input size of an image of height x width resized by `scale`.

    On a canvas: the canvas resized by `scale`, rounded up to a multiple of the stride
    (it holds the image resized the same way, `ops.cam.pass_plan`'s rounding). Beyond
    every canvas: the resized image rounded up to `multiple` (`exact`: not rounded).
    """
    if self.exact:
      return max(1, round(height * scale)), max(1, round(width * scale))
    h, w = self.canvas(height, width)
    if (h, w) in self.sizes:
      multiple = STRIDE
    else:
      h, w, multiple = height, width, self.multiple
    return (round_up(max(1, round(h * scale)), multiple),
            round_up(max(1, round(w * scale)), multiple))


def pad_onto(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """float32 [1, *size, C]: x [h, w, C] at the top left, zeros elsewhere."""
  out = np.zeros((1,) + tuple(size) + x.shape[2:], np.float32)
  out[0, :x.shape[0], :x.shape[1]] = x
  return out


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= `n`."""
  return math.ceil(n / multiple) * multiple
