"""The segmentation network in inference mode."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affinity_jax.data import transforms


def predictor(model: nnx.Module, pad_multiple: int = 8):
  """`predict(image uint8 [H, W, 3]) -> label ids uint8 [H, W]` (single scale).

  The input is zero-padded (bottom/right) to a multiple of `pad_multiple` (of 8).
  """
  graphdef, state = nnx.split(model)
  norm = model.backbone.normalization

  @jax.jit
  def forward(state, x):
    logits, _ = nnx.merge(graphdef, state)(x, train=False)
    return jnp.argmax(logits, -1).astype(jnp.uint8)

  def predict(image: np.ndarray) -> np.ndarray:
    x, _ = transforms.pad_to_multiple(transforms.normalize(image, norm), pad_multiple, 0.0)
    return np.asarray(forward(state, jnp.asarray(x[None])))[0, :image.shape[0],
                                                              :image.shape[1]]
  return predict
