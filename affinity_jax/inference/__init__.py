"""Trained networks in inference mode: what the stages, the demo and the benchmarks share.

`cam` (multi-scale CAMs and image labels), `walk` (AffinityNet + random walk, batched
and padded), `segment` (the segmentation net). Models come restored (parameters only)
from `Workdir.checkpoints(kind).load`.
"""

STRIDE = 8   # Every backbone's output stride: feature maps are ceil(H / 8) x ceil(W / 8).
