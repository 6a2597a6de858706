"""The small VOC run several tests share: `configs/voc12_lite0.py:cpu_tiny` on the real
40-image sample in ../shared/voc_sample, on the tiny backbone for speed (Lite0's
ImageNet weights and its ImageNet prior have tests of their own)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "..", "shared", "voc_sample")
CONFIG = "configs/voc12_lite0.py:cpu_tiny"
# The tiny backbone's counterpart of :cpu's aff.frozen (every Lite0 layer below its last
# block and head conv): AffinityNet trains the last stage only.
AFF_FROZEN = ("backbone/stem1", "backbone/stem2", "backbone/stem3", "backbone/stage1",
              "backbone/stage2")
OVERRIDES = {"data.manual_dir": SAMPLE, "model.backbone": "tiny", "model.pretrained": "",
             "cam.imagenet_prior": "False", "aff.frozen": repr(AFF_FROZEN)}


def args() -> list[str]:
  """`affinity_jax.main`'s --config arguments for this run."""
  return [f"--config={CONFIG}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
