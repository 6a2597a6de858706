"""The real VOC sample the tests use, and the small VOC run several tests share.

The sample is a VOC-layout folder (`VOC2012/` with 24 train and 16 val images that
together hold every class): `$AFFINITY_JAX_VOC_SAMPLE` if set, else `../shared/voc_sample`
beside the repository. Tests reach it through the `voc_sample` fixture (conftest.py),
which skips them when it is absent.

The shared run is `configs/voc12_lite0.py:cpu_tiny` on that sample, on the tiny backbone
for speed (Lite0's ImageNet weights and its ImageNet prior have tests of their own).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "AFFINITY_JAX_VOC_SAMPLE"
SAMPLE = os.path.abspath(os.environ.get(ENV) or os.path.join(REPO, "..", "shared", "voc_sample"))


def sample_or_skip_reason() -> str | None:
  """None when the sample is there, else why tests that need it skip."""
  if os.path.isdir(os.path.join(SAMPLE, "VOC2012", "JPEGImages")):
    return None
  return f"no VOC sample at {SAMPLE} (set {ENV} to a folder holding VOC2012/)"
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
