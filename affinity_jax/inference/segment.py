"""The segmentation network in inference mode."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax.data import transforms
from affinity_jax.inference import canvas as canvas_lib


def predictor(model: nnx.Module, canvases: canvas_lib.Canvases = canvas_lib.Canvases()):
  """`predict(image uint8 [H, W, 3]) -> label ids uint8 [H, W]` (single scale).

  The input is zero-padded (bottom/right) onto its canvas (`inference.canvas`): one
  program per canvas.
  """
  graphdef, state = nnx.split(model)
  norm = model.backbone.normalization

  @jax.jit
  def forward(state, x):
    logits, _ = nnx.merge(graphdef, state)(x, train=False)
    return jnp.argmax(logits, -1).astype(jnp.uint8)

  def predict(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    x = canvas_lib.pad_onto(transforms.normalize(image, norm), canvases.at_scale(h, w))
    return np.asarray(forward(state, jax.device_put(x)))[0, :h, :w]
  return predict
