"""Multi-scale CAM inference: batched over images and split over devices."""

import jax
import numpy as np
from flax import nnx

from affinity_jax import sharding
from affinity_jax.data import transforms
from affinity_jax.models import heads
from affinity_jax.ops import cam as cam_ops
from affinity_jax.inference import cam as cam_inference


def test_batched_cams_over_8_devices_equal_one_image_at_a_time():
  assert jax.device_count() == 8   # conftest.py
  model = heads.CAMNet("tiny", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  examples = [dict(image=rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
                   labels=(rng.random(20) < 0.3).astype(np.uint8)) for _ in range(3)]
  scales = (1.0, 0.5)
  norm = model.backbone.normalization
  forward, state = cam_inference.classifier_forward(model, sharding.make_mesh())
  # 3 images x 2 flips = 6 inputs per scale, padded to 8 and split over 8 devices.
  assert len(jax.tree.leaves(state)[0].sharding.device_set) == 8
  got = cam_inference.batched_cams(forward, state, examples, norm, scales)
  forward1, state1 = cam_inference.classifier_forward(model)
  for example, cams in zip(examples, got):
    want = cam_inference.multiscale_cams(forward1, state1, example, norm, scales)
    assert cams.shape == (40, 56, 20)
    np.testing.assert_allclose(cams, want, atol=1e-5)
    absent = example["labels"] == 0
    assert not cams[..., absent].any() and cams[..., ~absent].max() > 0.9


def test_multiscale_inputs_follow_the_pass_plan():
  img = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
  passes = cam_inference.multiscale_inputs(img, "imagenet_rgb")
  assert [r for _, r in passes] == cam_ops.pass_plan(37, 50)
  for x, r in passes:
    assert x.shape[1:3] == r.padded
    assert r.size == (round(37 * r.scale), round(50 * r.scale))
    want = transforms.normalize(transforms.resize(img, r.size, "bicubic"), "imagenet_rgb")
    if r.flip:
      want = want[:, ::-1]
    np.testing.assert_array_equal(x[0, :r.size[0], :r.size[1]], want)
    assert not x[0, r.size[0]:].any() and not x[0, :, r.size[1]:].any()
  assert len(cam_inference.multiscale_inputs(img, "imagenet_rgb", flip=False)) == 4
